"""``mapsync agent``: the long-running agent, polling every channel and watching push inboxes.

Polling is driven by :mod:`schedule`: every channel is pulled at start, then every
``interval`` seconds plus a random 0..``jitter`` seconds per run, so fifty nodes do not hit
the publisher in step. schedule reads the wall clock; :class:`PollSchedule` keeps it on the
monotonic one, so a clock stepped back does not stop polling. With ``watch``,
:mod:`watchdog` observes each channel's ``inbox``, where the publisher pushes
(``mapsync.transport.inbox``)::

    INBOX/releases/<serial>/    the release, written first
    INBOX/LATEST                written last (rsync: a temporary file, then a rename)

A LATEST created, moved into place or modified there makes the channel due for a pull from
the inbox. The watchdog thread only signals; pulls from the inbox run on the main thread.
Polls run on a worker thread each (one per channel at a time), so a source that accepts and
never answers cannot hold up a pushed release for its whole ``timeout``: when a push finds
the channel held by this agent's own poll, it stops that poll's rsync, installs, and polls
again. Every pull, from either thread, holds the channel's lock (``pull``), so one channel
is still installed by one run at a time, in this process or with a ``mapsync pull`` from a
timer. An inbox replaced while watched (rm -rf and mkdir, a move, a symlink swap) is
watched again (:meth:`Agent._rewatch`).

The inbox is untrusted: ``pull`` verifies what it offers exactly as it verifies the
repository (signature, serial, expiry, every hash). A pull from the inbox is no check of
the source: it records ``last_push``, and ``mapsync status`` keeps reporting a source that
fails until a poll reaches one again.

A failed pull is logged and recorded in the channel's state (``mapsync status`` shows it);
it never ends the loop. SIGTERM and SIGHUP end it with exit 128+n, at once while idle, from
inside a pull too (SystemExit; the signal is also remembered and checked after every pull,
in case the exception got lost). The observer is stopped on the way out, the rsyncs of
polls in flight are ended, and a pull cut off mid-way leaves the old set serving (``pull``'s
own guarantees). SIGHUP does so only if the config still loads (``mapsync agent`` checks it
first: :func:`mapsync.signals.on_hangup`); if not, it is logged and the agent runs on.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import os
import queue
import re
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import schedule
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from mapsync import log, signals
from mapsync.agent.node import NodeChannel
from mapsync.agent.pull import PullResult, pull
from mapsync.atomic import remove_tree
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import ConfigError, LockBusy, MapsyncError, TransferStopped
from mapsync.release import LATEST, MAX_LATEST_BYTES, RELEASES, Latest, parse_latest
from mapsync.transport.rsync import Transfers, stoppable

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver, ObservedWatch

_log = log.get("agent")

# A push ends with one rename of LATEST: the pull starts at once. A writer that rewrites
# LATEST in place sends a burst (created, modified, closed): pull once the inbox has been
# quiet this long ...
DEBOUNCE = 0.1
# ... but never hold a pull back longer than this while events keep coming.
MAX_DEFER = 0.5
# A `mapsync pull` holds the channel's lock: try the inbox again this much later, rather than
# leave a pushed release waiting for the next poll.
LOCK_RETRY = 1.0
# This agent's own poll holds it: the poll is stopped (see Agent.from_inbox); try this often
# until it has let go.
PREEMPT_RETRY = 0.05
# On the way out, wait this long for a poll that was told to stop.
POLL_JOIN = 5.0
# Wake at least this often (a wall-clock step is noticed then, see PollSchedule).
MAX_SLEEP = 60.0
# While watching, look this often whether an inbox was replaced (rm -rf and mkdir, a move, a
# symlink swap) and the watch must move to the new directory; the watch on the inbox's parent
# usually says so at once.
REWATCH_CHECK = 5.0
# Sleep in slices this long. SIGTERM is sent to the process, and any thread may take it (one
# busy starting rsync, say); Python then runs the handler in the main thread only once that
# thread runs again, so a single long wait could hold the exit back for its whole length.
SIGNAL_CHECK = 0.2
# The events that mean "a LATEST is now in place". (Deleted is not one; opened/attrib are noise.)
ARRIVALS = frozenset({"created", "moved", "modified", "closed"})
_SERIAL = re.compile(r"^[0-9]{1,18}\Z")


# A wall clock that disagrees with the monotonic clock by more than this since the last look
# was stepped (NTP, an operator, a VM resumed): slewing moves it by milliseconds a minute.
CLOCK_STEP = 1.0


class PollSchedule:
    """The polls' :class:`schedule.Scheduler`, kept on the monotonic clock.

    schedule reads the wall clock (``datetime.now()``): stepped back an hour, it would run
    no poll for an hour; stepped forward, every poll at once. So before every look at the
    schedule, and after every job (before schedule computes that job's next run from the
    stepped clock), the wall clock is compared with the monotonic one, and a step moves
    every job's next run by the same amount: polls keep their interval, whatever the wall
    clock does.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = schedule.Scheduler()
        self._monotonic = monotonic
        self._anchor = (self._wall(), monotonic())

    @staticmethod
    def _wall() -> datetime.datetime:
        return datetime.datetime.now()  # the clock schedule reads: naive local time

    def every(self, interval: int, jitter: int, job: Callable[[], object]) -> None:
        """Run ``job`` every ``interval`` to ``interval + jitter`` seconds (random each time)."""

        def run() -> None:
            try:
                job()
            finally:
                self._realign()

        self.scheduler.every(interval).to(interval + jitter).seconds.do(run)

    def run_pending(self) -> None:
        """Run the jobs that are due."""
        self._realign()
        self.scheduler.run_pending()

    @property
    def idle_seconds(self) -> float | None:
        """Seconds until the next job is due (None without any)."""
        self._realign()
        return self.scheduler.idle_seconds

    def _realign(self) -> None:
        wall, mono = self._wall(), self._monotonic()
        then_wall, then_mono = self._anchor
        self._anchor = (wall, mono)
        step = (wall - then_wall).total_seconds() - (mono - then_mono)
        if abs(step) <= CLOCK_STEP:
            return
        shift = datetime.timedelta(seconds=step)
        for job in self.scheduler.jobs:
            if job.next_run is not None:
                job.next_run += shift
        _log.warning(
            "the wall clock was stepped; polls keep their interval",
            step_seconds=round(step, 1),
        )


class Agent:
    """The loop of ``mapsync agent``: scheduled polls of every channel's ``source``, and,
    for the channels in ``watched``, pulls from the push inbox as soon as a LATEST lands."""

    def __init__(self, cfg: AgentConfig, interval: int, watched: dict[str, AgentChannel]) -> None:
        self.cfg = cfg
        self.interval = interval
        self.watched = watched
        self.polls = PollSchedule()
        self._wake = threading.Event()
        # (channel, whether LATEST was renamed into place: whole at once, no need to wait)
        self._arrived: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        # channel → (monotonic time of the first event of a burst, time its inbox pull is due)
        self._due: dict[str, tuple[float, float]] = {}
        self._observer: BaseObserver | None = None
        # channel → the inbox directory watched now ((st_dev, st_ino), its watch), or None
        # while the inbox is missing or not a directory
        self._watching: dict[str, tuple[tuple[int, int], ObservedWatch] | None] = {}
        self._dead: set[str] = set()  # channels whose inbox was deleted (the watchdog thread says)
        # Polls run on worker threads (a hung source must not hold up pushed releases).
        self._polling: dict[str, _Poll] = {}  # channel → its poll in flight
        self._polled: queue.SimpleQueue[str] = queue.SimpleQueue()  # polls that ended
        self._starting: set[str] = set()  # channels whose first poll has not ended yet

    def run(self) -> NoReturn:
        """Pull everything once, then poll and react to pushes until a signal ends the process."""
        signals.install()  # as main() does: exit 128+n, and remembered (mapsync.signals)
        observer = self._observe() if self.watched else None
        try:
            if observer is not None:
                _log.info(
                    "watching the push inboxes",
                    watching={name: str(ch.inbox) for name, ch in sorted(self.watched.items())},
                )
            self._starting = set(self.cfg.channels)
            for ch in self.cfg.channels.values():
                self.start_poll(ch)
                self.polls.every(
                    self.interval, self.cfg.jitter, functools.partial(self.start_poll, ch)
                )
            while True:
                self._wait()
                signals.stop_if_received()
                if observer is not None and not observer.is_alive():
                    # Pushes would only be seen on polls from now on; exit (2) instead, so
                    # systemd restarts the agent (Restart=on-failure) and the journal shows why.
                    raise MapsyncError("watching the push inboxes stopped unexpectedly")
                self._rewatch()
                self._polls_ended()
                self._pull_pushed()
                self.polls.run_pending()
                signals.stop_if_received()
        except (SystemExit, KeyboardInterrupt) as exc:
            code = exc.code if isinstance(exc, SystemExit) else 128 + signal.SIGINT
            _log.info("agent stopping", exit=code)
            raise
        finally:
            self._stop_polls()
            if observer is not None:
                observer.stop()
                observer.join()

    # -- polling -----------------------------------------------------------------------------

    def start_poll(self, ch: AgentChannel) -> None:
        """Start a poll of ``ch``'s source (and mirrors) on a worker thread, unless one is
        still running. When it ends, the main thread looks at the inbox (if watched): a
        release pushed while the agent was down, or whose event was missed, goes in then."""
        if ch.name in self._polling:
            _log.info("poll skipped: the last one is still running", channel=ch.name)
            return
        poll = _Poll(ch, Transfers())
        self._polling[ch.name] = poll
        poll.thread = threading.Thread(
            target=self._poll, args=(poll,), name=f"poll-{ch.name}", daemon=True
        )
        poll.thread.start()

    def _poll(self, poll: _Poll) -> None:
        """The worker thread of one poll. Every rsync it starts belongs to ``poll.transfers``,
        so the main thread can end them (a pushed release to install, a signal)."""
        try:
            with stoppable(poll.transfers):
                self._pull(poll.channel, "poll")
        except LockBusy as exc:
            # A `mapsync pull` (a timer, an operator) is doing this very job right now.
            _log.info(
                "poll skipped: the channel is busy", channel=poll.channel.name, reason=str(exc)
            )
        except SystemExit:
            pass  # a signal came: the main thread handles it (and ends this poll's rsync)
        finally:
            self._polled.put(poll.channel.name)
            self._wake.set()

    def _polls_ended(self) -> None:
        """On the main thread: the polls that ended since the last look; then their inboxes."""
        while True:
            try:
                name = self._polled.get_nowait()
            except queue.Empty:
                break
            poll = self._polling.pop(name)
            if poll.thread is not None:
                poll.thread.join()
            if name in self.watched:
                self.from_inbox(self.watched[name])
            if poll.preempted:
                # Stopped for a pushed release, so the source went unchecked: again, now.
                self.start_poll(poll.channel)
            if name in self._starting:
                self._starting.discard(name)
                if not self._starting:
                    _log.info(
                        "agent started",
                        channels=sorted(self.cfg.channels),
                        interval=self.interval,
                        jitter=self.cfg.jitter,
                        watching={n: str(c.inbox) for n, c in sorted(self.watched.items())},
                    )

    def _stop_polls(self) -> None:
        """End the rsyncs of every poll in flight and wait (a little) for the polls to end,
        so no rsync outlives the agent; a poll that is installing finishes its swap."""
        for poll in self._polling.values():
            poll.transfers.stop(reason="the agent is stopping")
        deadline = time.monotonic() + POLL_JOIN
        for poll in self._polling.values():
            if poll.thread is not None:
                poll.thread.join(max(0.0, deadline - time.monotonic()))

    def _pull(self, ch: AgentChannel, origin: str) -> PullResult | None:
        """``pull(ch)``; a failure is logged (``pull`` has recorded it in the state) and None
        returned, so the loop goes on. LockBusy is the caller's to handle. A "push" pull
        leaves the source's health in the state as the last poll found it."""
        try:
            try:
                return pull(self.cfg, ch, pushed=origin == "push")
            finally:
                signals.stop_if_received()  # whatever became of the SystemExit inside
        except LockBusy:
            raise
        except TransferStopped as exc:
            _log.info("pull stopped", channel=ch.name, origin=origin, reason=str(exc))
        except MapsyncError as exc:
            _log.error(
                "pull failed",
                channel=ch.name,
                origin=origin,
                source=ch.source,
                error=str(exc),
                exit=exc.exit_code,
            )
        except Exception:
            # A bug must not stop the other channels (or this one's next run) for good.
            _log.exception("pull crashed", channel=ch.name, origin=origin, source=ch.source)
        return None

    # -- the push inbox ----------------------------------------------------------------------

    def from_inbox(self, ch: AgentChannel) -> None:
        """Install what ``ch``'s inbox offers, if its LATEST is newer than the installed serial.

        A LATEST that is not newer is ignored quietly: the poll may have installed that
        release from the source already, and a pull would call it a rollback attack.
        """
        assert ch.inbox is not None
        offered = offered_serial(ch.inbox)
        if offered is None:
            _log.debug("inbox has no LATEST", channel=ch.name, inbox=str(ch.inbox))
            return
        # Read without the channel lock and without changing anything (finishing a swap is
        # for a pull, under the lock).
        current = NodeChannel.look(self.cfg, ch).installed_serial()
        if isinstance(offered, Latest) and current is not None and offered.serial <= current:
            _log.debug(
                "inbox holds nothing newer",
                channel=ch.name,
                inbox=str(ch.inbox),
                offered=offered.serial,
                installed=current,
            )
            return
        if isinstance(offered, str):
            # Pulled all the same: pull refuses it and records the refusal in the state, so
            # `mapsync status` shows that the inbox holds something wrong.
            _log.warning("the inbox LATEST is unusable", channel=ch.name, reason=offered)
        inbox = replace(ch, source=str(ch.inbox), mirrors=(), password_file=None)
        try:
            result = self._pull(inbox, "push")
        except LockBusy as exc:
            now = time.monotonic()
            poll = self._polling.get(ch.name)
            if poll is None:
                _log.info(
                    "inbox pull deferred: the channel is busy",
                    channel=ch.name,
                    retry_in=LOCK_RETRY,
                    reason=str(exc),
                )
                self._due[ch.name] = (now, now + LOCK_RETRY)
                return
            # This agent's own poll holds the channel, perhaps waiting on a source that
            # never answers (up to `timeout`, per mirror). A verified release is waiting
            # here: stop the poll's rsync (a poll already installing finishes first), install
            # this, then poll again. One install at a time per channel still holds: the
            # channel lock is never shared, only given up sooner.
            if not poll.preempted:
                poll.preempted = True
                _log.info(
                    "stopping the poll to install a pushed release",
                    channel=ch.name,
                    source=ch.source,
                )
                poll.transfers.stop(
                    reason="stopped to install a pushed release; the source is polled again"
                )
            self._due[ch.name] = (now, now + PREEMPT_RETRY)
            return
        if result is None:
            return
        if isinstance(offered, Latest) and result.serial == offered.serial:
            # What the inbox named is installed; releases below it can never be installed
            # again (a lower serial is refused). The push keeps the newest one as its basis.
            # Pruned before the line below, so that the line marks the end of the handling.
            prune_inbox(ch.inbox, result.serial, ch.name)
        if result.action == "installed":
            _log.info(
                "pushed release installed",
                channel=ch.name,
                serial=result.serial,
                inbox=inbox.source,
            )

    def _observe(self) -> BaseObserver:
        from watchdog.observers import Observer

        observer = Observer()
        self._observer = observer
        try:
            for ch in self.watched.values():
                assert ch.inbox is not None
                where = f"[agent.channels.{ch.name}] inbox {ch.inbox}"
                try:
                    if not ch.inbox.is_dir():
                        # Owned by this user: a push arriving as another one (ssh, an rsync
                        # daemon's uid) needs the operator to chown it. Private: a mailstore
                        # channel's releases carry password hashes.
                        ch.inbox.mkdir(parents=True, mode=0o700)
                        _log.info("created the push inbox", channel=ch.name, inbox=str(ch.inbox))
                    # The parent tells when the inbox itself is replaced (see _rewatch).
                    observer.schedule(
                        _ParentHandler(ch.inbox.name, self._wake.set),
                        str(ch.inbox.parent),
                        recursive=False,
                    )
                    self._watching[ch.name] = self._watch_inbox(observer, ch)
                    if self._watching[ch.name] is None:
                        raise OSError(f"{ch.inbox} is not a directory")
                except OSError as exc:
                    raise ConfigError(f"{where}: cannot be watched: {exc}") from None
            try:
                observer.start()
            except OSError as exc:  # e.g. the inotify watch limit
                raise ConfigError(f"watching the push inboxes failed: {exc}") from None
        except BaseException:
            observer.stop()
            raise
        return observer

    def _watch_inbox(
        self, observer: BaseObserver, ch: AgentChannel
    ) -> tuple[tuple[int, int], ObservedWatch] | None:
        """Watch the directory that is ``ch.inbox`` now (through a symlink: its target);
        None if there is none. OSError if it cannot be watched."""
        assert ch.inbox is not None
        identity = _directory(ch.inbox)
        if identity is None:
            return None
        handler = _InboxHandler(ch.name, str(ch.inbox), self._arrival, self._gone)
        watch = observer.schedule(handler, str(ch.inbox), recursive=False, follow_symlink=True)
        return identity, watch

    def _rewatch(self) -> None:
        """Move the watch of every inbox that was replaced since it was set up (rm -rf and
        mkdir, a move, a symlink swap) to the directory there now, and say so; look at once
        for a LATEST that came meanwhile. A watch left on the old directory would see nothing
        again, and pushes would wait for the next poll."""
        observer = self._observer
        if observer is None:
            return
        for name, ch in self.watched.items():
            assert ch.inbox is not None
            watching = self._watching.get(name)
            now = _directory(ch.inbox)
            dead = name in self._dead
            self._dead.discard(name)
            if watching is not None and now == watching[0] and not dead:
                continue
            if watching is None and now is None:
                continue
            if watching is not None:
                with contextlib.suppress(KeyError, OSError):
                    observer.unschedule(watching[1])  # its emitter may have stopped already
            try:
                self._watching[name] = self._watch_inbox(observer, ch)
            except OSError as exc:
                self._watching[name] = None
                _log.error(
                    "the push inbox was replaced and cannot be watched; pushes wait for polls",
                    channel=name,
                    inbox=str(ch.inbox),
                    error=exc.strerror or str(exc),
                )
                continue
            if self._watching[name] is None:
                _log.warning(
                    "the push inbox is gone; watching for it to come back",
                    channel=name,
                    inbox=str(ch.inbox),
                )
                continue
            _log.warning(
                "the push inbox was replaced; watching the new directory",
                channel=name,
                inbox=str(ch.inbox),
            )
            t = time.monotonic()
            self._due[name] = (t, t)  # a push may have landed before the new watch

    def _gone(self, channel: str, deleted: bool) -> None:
        """Called on the watchdog thread when a directory in (or the) inbox went away."""
        if deleted:
            # Its watch is dead even if a new directory got the same inode number.
            self._dead.add(channel)
        self._wake.set()

    def _arrival(self, channel: str, renamed: bool) -> None:
        """Called on the watchdog thread: note it, wake the main thread, do nothing else."""
        self._arrived.put((channel, renamed))
        self._wake.set()

    def _wait(self) -> None:
        """Sleep until the next poll, the next due inbox pull or a new arrival; a signal
        interrupts the wait (SystemExit)."""
        timeout = self.polls.idle_seconds
        timeout = MAX_SLEEP if timeout is None else min(timeout, MAX_SLEEP)
        if self.watched:
            timeout = min(timeout, REWATCH_CHECK)
        if self._due:
            timeout = min(timeout, min(due for _, due in self._due.values()) - time.monotonic())
        deadline = time.monotonic() + timeout
        while timeout > 0 and not self._wake.wait(min(timeout, SIGNAL_CHECK)):
            timeout = deadline - time.monotonic()
        self._wake.clear()  # before draining: an arrival after this sets it again
        while True:
            try:
                name, renamed = self._arrived.get_nowait()
            except queue.Empty:
                break
            now = time.monotonic()
            first = self._due[name][0] if name in self._due else now
            self._due[name] = (first, pull_due(first, now, renamed))

    def _pull_pushed(self) -> None:
        now = time.monotonic()
        for name, (_, due) in sorted(self._due.items()):
            if due <= now:
                del self._due[name]
                self.from_inbox(self.watched[name])


def pull_due(first: float, now: float, renamed: bool) -> float:
    """When to pull an inbox whose LATEST was last written at ``now`` (its first event of the
    burst at ``first``): at once for a LATEST renamed into place (a push's last step, whole);
    else once quiet for DEBOUNCE, at most MAX_DEFER after the first event."""
    return now if renamed else min(now + DEBOUNCE, first + MAX_DEFER)


class _Poll:
    """One poll in flight: its channel, the rsyncs it runs, its worker thread."""

    def __init__(self, channel: AgentChannel, transfers: Transfers) -> None:
        self.channel = channel
        self.transfers = transfers
        self.thread: threading.Thread | None = None
        self.preempted = False  # stopped for a pushed release (the main thread sets it)


class _InboxHandler(FileSystemEventHandler):
    """Signals ``notify(channel, renamed)`` when a LATEST lands in the (non-recursively)
    watched inbox (``renamed``: moved into place whole, not written there),
    and ``gone()`` when the inbox itself is deleted or moved away."""

    def __init__(
        self,
        channel: str,
        inbox: str,
        notify: Callable[[str, bool], None],
        gone: Callable[[str, bool], None],
    ) -> None:
        super().__init__()
        self.channel = channel
        self.inbox = inbox
        self.notify = notify
        self.gone = gone

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type in ("deleted", "moved"):
                # The inbox itself (its watch is dead), or only releases/<n> (_rewatch looks).
                self.gone(self.channel, os.fsdecode(event.src_path) == self.inbox)
            return
        if event.event_type not in ARRIVALS:
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        if os.path.basename(os.fsdecode(path)) == LATEST:
            self.notify(self.channel, event.event_type == "moved")
            _log.debug("LATEST arrived in the inbox", channel=self.channel, kind=event.event_type)


class _ParentHandler(FileSystemEventHandler):
    """Calls ``changed()`` on any event about the entry ``name`` of the watched directory
    (the inbox created, deleted, moved, or a symlink there swapped)."""

    def __init__(self, name: str, changed: Callable[[], None]) -> None:
        super().__init__()
        self.name = name
        self.changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = (
            [event.src_path, event.dest_path] if event.event_type == "moved" else [event.src_path]
        )
        if any(os.path.basename(os.fsdecode(p)) == self.name for p in paths):
            self.changed()


def _directory(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the directory at ``path`` (a symlink followed), None if none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def offered_serial(inbox: Path) -> Latest | str | None:
    """The LATEST in ``inbox``: parsed, an error message when it is not a sane LATEST, or
    None when there is none. Read without following a symlink and never more than a LATEST's
    size, so a hostile inbox cannot point the agent at a FIFO or a huge file."""
    path = inbox / LATEST
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: a symlink, not followed (a LATEST must be a regular file)"
        return f"{path}: {exc.strerror or exc}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return f"{path}: not a regular file"
        data = os.read(fd, MAX_LATEST_BYTES + 1)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    try:
        return parse_latest(data, str(path))
    except MapsyncError as exc:
        return str(exc)


def prune_inbox(inbox: Path, below: int, channel: str) -> list[int]:
    """Delete ``INBOX/releases/<s>`` for every ``s < below``; return the serials removed.

    Best effort: a failure is logged, never raised. Nothing outside the inbox is touched,
    even while the push account (which owns the inbox) swaps things around: the inbox and
    then ``releases`` are opened without following a symlink, and every listing and delete
    is relative to that one directory descriptor — a path is never resolved twice. A
    symlinked inbox or ``releases`` is left alone (and logged), a symlink (or stray file)
    named like a release is unlinked itself, and :func:`shutil.rmtree` (given ``dir_fd``,
    resistant to symlink attacks) does not follow symlinks inside a release.
    """
    releases = inbox / RELEASES
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        top = os.open(inbox, flags)
    except OSError as exc:
        _not_pruned(channel, inbox, exc)
        return []
    try:
        try:
            fd = os.open(RELEASES, flags, dir_fd=top)
        except OSError as exc:
            _not_pruned(channel, releases, exc)
            return []
    finally:
        os.close(top)
    removed = []
    try:
        with os.scandir(fd) as listing:
            entries = list(listing)
        for entry in entries:
            if not _SERIAL.match(entry.name) or int(entry.name) >= below:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    remove_tree(entry.name, dir_fd=fd)
                else:
                    os.unlink(entry.name, dir_fd=fd)
            except OSError as exc:
                _log.warning(
                    "could not prune an old release from the inbox",
                    channel=channel,
                    path=str(releases / entry.name),
                    error=str(exc),
                )
                continue
            removed.append(int(entry.name))
    except OSError as exc:
        _log.warning(
            "could not prune the inbox", channel=channel, path=str(releases), error=str(exc)
        )
    finally:
        os.close(fd)
    if removed:
        _log.debug("pruned the inbox", channel=channel, serials=sorted(removed))
    return sorted(removed)


def _not_pruned(channel: str, path: Path, exc: OSError) -> None:
    """Why ``path`` (the inbox or its ``releases``) could not be opened for pruning."""
    if exc.errno == errno.ENOENT:
        return  # nothing pushed yet, nothing to prune
    # With O_DIRECTORY, Linux reports a symlink as ENOTDIR; look, for the message only.
    if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and path.is_symlink()):
        _log.warning(
            "not pruning the inbox: a symlink, not followed", channel=channel, path=str(path)
        )
    else:
        _log.warning(
            "not pruning the inbox", channel=channel, path=str(path), error=exc.strerror or str(exc)
        )


def run(
    cfg: AgentConfig, config_path: Path, *, interval: int | None = None, watch: bool = False
) -> NoReturn:
    """Run the agent until a signal ends the process (SystemExit 128+n).

    ``interval`` overrides ``[agent] interval``. With ``watch``, every channel that has an
    ``inbox`` is watched; if none has, that is a ConfigError naming ``config_path``.
    """
    Agent(cfg, interval or cfg.interval, watched_inboxes(cfg, config_path, watch)).run()


def watched_inboxes(cfg: AgentConfig, config_path: Path, watch: bool) -> dict[str, AgentChannel]:
    """The channels ``agent`` watches the inbox of: with ``watch``, every one that has an
    ``inbox`` (a ConfigError naming ``config_path`` if none has, or if an inbox could not be
    watched: :func:`inbox_problem`); else none."""
    watched = {n: ch for n, ch in cfg.channels.items() if ch.inbox is not None} if watch else {}
    if watch and not watched:
        raise ConfigError(
            f"{config_path}: agent --watch needs a push inbox, but no [agent.channels.*] sets "
            "`inbox`; set one where the publisher pushes, or run without --watch"
        )
    for name, ch in watched.items():
        assert ch.inbox is not None
        why = inbox_problem(ch.inbox)
        if why is not None:
            raise ConfigError(
                f"{config_path}: [agent.channels.{name}] inbox {ch.inbox}: cannot be watched: {why}"
            )
    return watched


def inbox_problem(inbox: Path) -> str | None:
    """Why the agent could not watch ``inbox`` (None: it can), without making anything: a
    path there that is not a directory, or, the inbox missing (the agent makes it), a
    nearest existing parent this process cannot make it in (a read-only filesystem, such
    as a path outside the unit's ReadWritePaths=). Checked before the agent starts, and
    before a SIGHUP restarts it: a restart into an inbox it cannot make would fail at every
    start."""
    path = inbox
    while True:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if path.parent == path:
                return f"{path} does not exist"
            path = path.parent
            continue
        except OSError as exc:
            return f"{path}: {exc.strerror or exc}"
        break
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if path != inbox and not os.access(path, os.W_OK | os.X_OK):
        return f"it does not exist, and cannot be made in {path} (read-only, or not writable)"
    return None

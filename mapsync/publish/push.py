"""Push: each channel's current release into the inboxes of its nodes (``push = [...]``).

A push is a shortcut, not the delivery guarantee: agents poll the repository anyway. So a
failed push never undoes or fails the publish; it is logged (channel, destination, rsync's
message), makes ``mapsync publish`` exit 2 once everything else is done, and is retried by
later ``publish`` runs, changed database or not, until the destination has the serial LATEST
names. A destination that keeps failing is retried with a growing delay (30 s after the first
failure, doubling up to 15 min), so one dead node does not cost every run of ``publish
--interval`` its ``push_timeout``: until then a run skips it at no cost, reports it as failed
(exit 2, "not tried", with the last error and when it is tried again) and leaves its record
alone. A successful delivery clears the count. What each destination last received is
recorded in ``REPO/.private/<channel>/pushed.json`` (written atomically; agents never fetch it)::

    {"destinations": {"rsync://mx1.example.net/inbox/mx": {
        "serial": 41, "delivered": "2026-05-01T10:00:00Z", "bytes": 2113,
        "error": "rsync failed (exit 10): ...", "failed_serial": 42, "failed_at": "...",
        "failures": 3}}}

The inbox keeps the delivered release and the one before it (an agent may be fetching that
one at the moment of the push); the push removes older ones, so agents need not prune.
Deleting ``pushed.json`` (or one destination's entry) makes the next run push again, at once.

The destinations of a channel are pushed in parallel, so a slow one delays none of the others;
SIGTERM/SIGHUP (or ^C) starts no further delivery and ends the rsyncs that are running. Each
delivery holds its destination's own lock (``push-<hash>.lock``) and writes its outcome into
the record itself: ``publish --interval`` waits for a run's deliveries only a moment
(:data:`LOOP_GRACE`), so a node that hangs (up to ``push_timeout``) holds back neither the
loop nor the next release to the other nodes; until its delivery ends, runs find it ``in
flight`` and leave it be.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mapsync import log
from mapsync.atomic import atomic_write
from mapsync.config import PublisherChannel, PublisherConfig
from mapsync.errors import MapsyncError, TransportError
from mapsync.locks import waiting_lock
from mapsync.publish.plan import ChannelPlan
from mapsync.publish.repository import Repository
from mapsync.release import (
    LATEST,
    MANIFEST,
    iso,
    parse_iso,
    parse_latest,
    parse_manifest,
    patch_dir,
    utcnow,
)
from mapsync.transport.inbox import Inbox
from mapsync.transport.rsync import Transfers

_log = log.get("publisher")

PUSHED = "pushed.json"  # REPO/.private/<channel>/ (mapsync.publish.repository)
PUSH_LOCK = "push.lock"
MAX_PARALLEL = 16  # destinations of one channel pushed at once (each an rsync process)
# How long a run of publish --interval waits for its deliveries before it goes on (those still
# running end on their own, and note themselves).
LOOP_GRACE = 2.0
# A failed destination is tried again BACKOFF seconds after its first failure in a row, twice
# that after the second, ..., at most BACKOFF_MAX after the last one.
BACKOFF = 30.0
BACKOFF_MAX = 15 * 60.0


@dataclass(frozen=True)
class Push:
    """What one publish run did for one destination of one channel.

    ``action``: ``pushed``, ``current`` (it already had ``serial``), ``failed``, ``would
    push`` (dry run), or ``in flight`` (an earlier run's delivery to it still running:
    ``publish --interval``; the run after it ends brings this serial). A failed destination this run did not try, because it is
    backing off, is ``failed`` too (``publish`` exits 2 while a node lacks the release) with
    ``deferred`` set; ``retry_at`` says when a failed destination is tried again."""

    channel: str
    destination: str
    serial: int | None  # None: the channel's LATEST could not be read
    action: str
    bytes: int = 0
    error: str | None = None
    deferred: bool = False
    retry_at: str | None = None


class PushFailed(TransportError):
    """The release is published, but pushing it to some node inboxes failed (exit 2)."""

    def __init__(self, failed: list[Push]) -> None:
        self.failed = failed
        where = ", ".join(
            f"channel {p.channel}"
            + (f" serial {p.serial}" if p.serial else "")
            + f" → {p.destination}"
            for p in failed
        )
        super().__init__(
            f"published, but the push failed for {len(failed)} destination(s) ({where}); "
            "agents still poll the repository, and the push is retried by a later publish run"
        )


def read_record(repo: Repository, channel: str) -> dict[str, dict[str, Any]]:
    """``REPO/.private/<channel>/pushed.json``: destination → what it last received (empty if
    none)."""
    try:
        data = json.loads(repo.private(channel, PUSHED).read_bytes())
    except (FileNotFoundError, ValueError):
        return {}
    dests = data.get("destinations") if isinstance(data, dict) else None
    if not isinstance(dests, dict):
        return {}
    return {k: v for k, v in dests.items() if isinstance(v, dict)}


def delivered(record: dict[str, dict[str, Any]], destination: str) -> int | None:
    """The serial last pushed to ``destination`` by the push record, if any."""
    serial = record.get(destination, {}).get("serial")
    return serial if isinstance(serial, int) else None


def backoff(failures: int) -> timedelta:
    """How long a destination that failed ``failures`` times in a row is left alone."""
    n = min(max(failures, 1), 32)  # beyond 2^31 x 30 s the cap holds anyway
    return timedelta(seconds=min(BACKOFF * 2 ** (n - 1), BACKOFF_MAX))


def failures(entry: dict[str, Any]) -> int:
    """Failures in a row of one destination's record (0: its last push went through)."""
    if "error" not in entry:
        return 0
    n = entry.get("failures")
    return n if isinstance(n, int) and n >= 1 else 1  # a record written before the count


def retry_at(entry: dict[str, Any]) -> datetime | None:
    """When a destination whose last push failed is tried again; None: at the next run."""
    failed_at = entry.get("failed_at")
    if not failures(entry) or not isinstance(failed_at, str):
        return None
    try:
        return parse_iso(failed_at) + backoff(failures(entry))
    except ValueError:
        return None


def push_channels(
    cfg: PublisherConfig,
    names: list[str] | None = None,
    *,
    dry_run: bool = False,
    plans: list[ChannelPlan] | None = None,
    grace: float | None = None,
) -> list[Push]:
    """Push the current release of every selected channel to each destination that does not
    have it yet. A dry run pushes nothing: it reports what would be pushed, counting the
    serial ``plans`` would publish. ``grace``: wait at most that many seconds for the
    deliveries (``publish --interval``: a node that hangs holds back no later run); the ones
    still running are logged and recorded when they end, and a later run finds them ``in
    flight`` until then. None: wait for every one (a run that exits after)."""
    repo = Repository(cfg.repository, read_only=dry_run)
    channels = [ch for ch in cfg.channels.values() if ch.push and (not names or ch.name in names)]
    # A plan the guards refuse publishes nothing: its serial is never pushed.
    planned = {
        p.channel: p.serial for p in plans or [] if p.pending and p.serial and not p.violations
    }
    outcomes: list[Push] = []
    for ch in channels:
        if dry_run:
            outcomes += _would_push(repo, ch, planned.get(ch.name))
            continue
        try:
            outcomes += _push_channel(cfg, repo, ch, grace)
        except (MapsyncError, OSError) as exc:
            # The channel could not start or finish (LATEST unreadable, another run pushing,
            # the record not written): every destination counts as failed and is retried.
            _log.error("push failed", channel=ch.name, error=str(exc))
            outcomes += [Push(ch.name, d, None, "failed", error=str(exc)) for d in ch.push]
    return outcomes


def _would_push(repo: Repository, ch: PublisherChannel, planned: int | None) -> list[Push]:
    latest = repo.latest(ch.name)
    serial = planned or (latest.serial if latest else None)
    if serial is None:
        return []
    record = read_record(repo, ch.name)
    return [
        Push(ch.name, d, serial, "current" if delivered(record, d) == serial else "would push")
        for d in ch.push
    ]


def _push_channel(
    cfg: PublisherConfig, repo: Repository, ch: PublisherChannel, grace: float | None
) -> list[Push]:
    if not repo.channel(ch.name).is_dir():
        return []  # nothing published yet
    # Which serial goes where is decided under the channel's lock; each destination's
    # delivery then holds that destination's own lock from start to end, so two deliveries
    # never write one inbox at once, and one never writes an older serial than the inbox has
    # (the record is read again under it). A delivery still running (a hung node, up to
    # push_timeout) holds back no other destination, nor the next run's release to them.
    lock = repo.private(ch.name, PUSH_LOCK)
    lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    busy = f"{lock}: another mapsync publish is pushing this channel"
    claimed: list[tuple[str, int]] = []  # destination, its lock's descriptor
    try:
        with waiting_lock(lock, cfg.lock_wait, busy):
            path = repo.channel(ch.name) / LATEST
            try:
                latest_bytes = path.read_bytes()
            except FileNotFoundError:
                return []  # nothing published yet
            serial = parse_latest(latest_bytes, str(path)).serial
            record = read_record(repo, ch.name)
            todo = [d for d in ch.push if delivered(record, d) != serial]
            done = [Push(ch.name, d, serial, "current") for d in ch.push if d not in todo]
            now = utcnow()
            for dest in todo:
                entry = record.get(dest, {})
                when = retry_at(entry)
                if when is not None and when > now:
                    done.append(_deferred(ch, dest, serial, entry, when))
                    continue
                fd = _try_lock(repo.private(ch.name, _dest_lock(dest)))
                if fd is None:
                    # Its delivery of an earlier serial is still running: the next run after
                    # it ends brings this one.
                    _log.debug("push in flight", channel=ch.name, destination=dest)
                    done.append(Push(ch.name, dest, serial, "in flight"))
                    continue
                claimed.append((dest, fd))
    except BaseException:
        for _, fd in claimed:
            os.close(fd)
        raise
    if not claimed:
        return done
    # The deliveries own the descriptors from here: each closes its own.
    return done + _Delivery(cfg, repo, ch, serial, latest_bytes, record).run(claimed, grace)


def _dest_lock(dest: str) -> str:
    """The lock file of one destination's deliveries, in the channel's private directory."""
    return f"push-{hashlib.sha256(dest.encode()).hexdigest()[:16]}.lock"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding ``path``'s exclusive lock, or None if another holds it
    (a delivery to that destination still running, in this process or another)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


# The deliveries of publish --interval still running when their run returned: stopped (their
# rsyncs ended) when the loop ends (stop_pushes).
_running: set[Transfers] = set()
_running_lock = threading.Lock()


def stop_pushes() -> None:
    """End the rsyncs of every delivery still running (``publish --interval`` ending)."""
    with _running_lock:
        jobs = list(_running)
    for job in jobs:
        job.stop(reason="the publisher is stopping")


class _Delivery:
    """The deliveries of one run to one channel's destinations, each on a thread of its own
    holding its destination's lock; each notes its outcome in the push record itself."""

    def __init__(
        self,
        cfg: PublisherConfig,
        repo: Repository,
        ch: PublisherChannel,
        serial: int,
        latest_bytes: bytes,
        record: dict[str, dict[str, Any]],
    ) -> None:
        self.cfg, self.repo, self.ch, self.serial = cfg, repo, ch, serial
        self.latest_bytes, self.record = latest_bytes, record
        self.release = repo.release(ch.name, serial)
        self.transfers = Transfers()

    def run(self, claimed: list[tuple[str, int]], grace: float | None) -> list[Push]:
        """Deliver to each destination of ``claimed`` (its lock's descriptor, closed when its
        delivery ends); wait for all (``grace`` None) or at most ``grace`` seconds, and return
        what ended by then (the rest is logged and recorded when it ends)."""
        if len(claimed) == 1 and grace is None:
            dest, fd = claimed[0]
            return [self._one(dest, fd)]  # in this thread: rsync.run ends its rsync on a signal
        pool = ThreadPoolExecutor(min(MAX_PARALLEL, len(claimed)))
        with _running_lock:
            _running.add(self.transfers)
        left = [len(claimed)]

        def ended(_: object) -> None:  # after every delivery: no longer one to stop
            with _running_lock:
                left[0] -= 1
                if not left[0]:
                    _running.discard(self.transfers)

        futures = []
        try:
            for dest, fd in claimed:
                futures.append(pool.submit(self._one, dest, fd))
                futures[-1].add_done_callback(ended)
            finished, _ = wait(futures, timeout=grace)
        except BaseException:
            # SIGTERM/SIGHUP (SystemExit) or ^C: start no queued delivery, end the running
            # ones, and let go only once their rsyncs are gone.
            pool.shutdown(wait=False, cancel_futures=True)
            for f, (_, fd) in zip(futures, claimed, strict=False):
                if f.cancelled():
                    os.close(fd)
            for _, fd in claimed[len(futures) :]:
                os.close(fd)
            self.transfers.stop()
            pool.shutdown(wait=True)
            raise
        finally:
            pool.shutdown(wait=False)  # the threads still delivering end on their own
        return [f.result() for f in futures if f in finished]

    def _one(self, dest: str, fd: int) -> Push:
        """Deliver to ``dest`` holding its lock (``fd``, closed at the end), and note it."""
        try:
            # What the record says now, under this destination's lock: another run may have
            # delivered this serial, or a later one, since this run read it.
            entry = read_record(self.repo, self.ch.name).get(dest, self.record.get(dest, {}))
            have = entry.get("serial")
            if isinstance(have, int) and have >= self.serial and "error" not in entry:
                return Push(self.ch.name, dest, self.serial, "current")
            push = self._deliver(dest, entry)
            return self._note(push)
        finally:
            os.close(fd)

    def _deliver(self, dest: str, entry: dict[str, Any]) -> Push:
        cfg, repo, ch, serial = self.cfg, self.repo, self.ch, self.serial
        started = time.monotonic()
        try:
            basis = entry.get("serial") if isinstance(entry.get("serial"), int) else None
            fresh = basis is None or "error" in entry
            inbox = Inbox(dest, cfg.push_timeout, cfg.ssh, self.transfers)
            patched, kept, moved = (
                _patches_for(inbox, repo, ch.name, serial, basis) if not fresh else ({}, None, 0)
            )
            moved += inbox.deliver(
                self.release,
                serial,
                self.latest_bytes,
                basis,
                prepare=fresh,
                patches=repo.channel(ch.name) / patch_dir(serial) if patched else None,
                patched=patched.values(),
                agent_basis=kept,
            )
        except (MapsyncError, OSError) as exc:
            n = failures(entry) + 1
            _log.error(
                "push failed",
                channel=ch.name,
                destination=dest,
                serial=serial,
                error=str(exc),
                failures=n,
                retry_in=f"{backoff(n).total_seconds():.0f}s",
            )
            return Push(ch.name, dest, serial, "failed", error=str(exc))
        _log.info(
            "pushed release",
            channel=ch.name,
            destination=dest,
            serial=serial,
            bytes=moved,
            seconds=round(time.monotonic() - started, 3),
            patches=",".join(sorted(patched)) or None,
        )
        return Push(ch.name, dest, serial, "pushed", moved)

    def _note(self, push: Push) -> Push:
        """``push`` written into the channel's record (under its lock), with when a failed
        destination is tried again."""
        lock = self.repo.private(self.ch.name, PUSH_LOCK)
        busy = f"{lock}: another mapsync publish is pushing this channel"
        try:
            with waiting_lock(lock, self.cfg.lock_wait, busy):
                new = _write_record(self.repo, self.ch, read_record(self.repo, self.ch.name), push)
        except (MapsyncError, OSError) as exc:
            # Delivered (or not) all the same; the next run pushes again what it cannot see.
            _log.error("push record not written", channel=self.ch.name, error=str(exc))
            return push
        if push.action == "failed" and (when := retry_at(new[push.destination])) is not None:
            return replace(push, retry_at=iso(when))
        return push


def _patches_for(
    inbox: Inbox, repo: Repository, channel: str, serial: int, basis: int | None
) -> tuple[dict[str, str], int | None, int]:
    """The maps of release ``serial`` the push may send as patches to ``inbox`` (map name →
    its text file, left out of the release), the serial the node's agent keeps the text of
    (None: unknown), and the bytes it took to learn that. Patches go where they are from
    ``basis``, the serial the inbox received before, and the agent says (``INBOX/BASIS``)
    that it keeps that serial's text to apply them to. Else none: the text goes as before,
    delta-encoded against the inbox's copy of ``basis`` (and of the agent's serial)."""
    if basis is None:
        return {}, None, 0
    try:
        manifest = parse_manifest(
            (repo.release(channel, serial) / MANIFEST).read_bytes(), f"release {serial}"
        )
    except (OSError, MapsyncError):
        return {}, None, 0
    patches = repo.channel(channel) / patch_dir(serial)
    usable = {
        name: manifest.maps[name].file
        for name, p in manifest.patches.items()
        if p.base == basis and name in manifest.maps and (patches / p.file).is_file()
    }
    if not usable:
        return {}, None, 0
    kept, moved = inbox.agent_basis()
    if kept != basis:
        _log.debug(
            "patches not pushed: the node's agent keeps another basis",
            channel=channel,
            destination=inbox.destination,
            serial=serial,
            basis=basis,
            agent_basis=kept,
        )
        return {}, kept, moved
    return usable, kept, moved


def _deferred(
    ch: PublisherChannel, dest: str, serial: int, entry: dict[str, Any], when: datetime
) -> Push:
    n = failures(entry)
    error = (
        f"not tried: {n} failure(s) in a row, next try at {iso(when)}; "
        f"last error ({entry.get('failed_at')}): {entry.get('error') or 'no message'}"
    )
    _log.debug(
        "push deferred", channel=ch.name, destination=dest, serial=serial, retry_at=iso(when)
    )
    return Push(ch.name, dest, serial, "failed", error=error, deferred=True, retry_at=iso(when))


def _write_record(
    repo: Repository, ch: PublisherChannel, record: dict[str, dict[str, Any]], push: Push
) -> dict[str, dict[str, Any]]:
    """The channel's push ``record`` with ``push``'s outcome, written (atomically)."""
    now = iso(utcnow())
    # Only configured destinations: one removed from the config is forgotten.
    new = {d: dict(record[d]) for d in ch.push if d in record}
    entry = new.setdefault(push.destination, {"serial": None})
    if push.action == "pushed":
        entry.update(serial=push.serial, delivered=now, bytes=push.bytes)
        for key in ("error", "failed_serial", "failed_at", "failures"):
            entry.pop(key, None)
    else:
        count = failures(entry) + 1
        entry.update(error=push.error, failed_serial=push.serial, failed_at=now, failures=count)
    data = json.dumps({"destinations": new}, indent=2, sort_keys=True) + "\n"
    atomic_write(repo.private(ch.name, PUSHED), data.encode())
    return new

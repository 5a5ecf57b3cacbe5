"""A mirror's own health: ``DEST/.mirror.json`` records every ``mapsync mirror`` run (one
shot, each ``--interval`` pass, ``--verify`` runs, failed ones too), so that ``mapsync status
--mirror DEST`` can tell a mirror that stopped following its SOURCE, long before its nodes
notice at their hourly cross-check (docs/scaling.md).

The note is a dot file in DEST, as the publisher's ``REPO/.publisher.json``: the rsync daemon
serving DEST excludes it (docs/security.md's ``exclude = .*``), a mirror of this mirror
copies only channel directories, and agents fetch only from a channel's directory.

Kept free of heavy imports (no cryptography, not the mirror's transport): monitoring runs it
every minute. What is served is read from DEST itself (each channel's ``LATEST`` and the
manifest it names), not from the note: that is what nodes get.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from mapsync import log
from mapsync.config import CHANNEL_NAME
from mapsync.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_WARNING,
    MapsyncError,
    described,
)
from mapsync.metrics import exposition, label
from mapsync.release import (
    LATEST,
    MANIFEST,
    MAX_LATEST_BYTES,
    MAX_MANIFEST_BYTES,
    Latest,
    Manifest,
    iso,
    manifest_sha256,
    parse_iso,
    parse_latest,
    parse_manifest,
    release_dir,
    utcnow,
)
from mapsync.runnote import (
    ago,
    first_line,
    in_future,
    read_note,
    read_small,
    span,
    stamp,
    write_note,
)

NOTE = ".mirror.json"
# Held (shared) by a `mirror --interval` process for its whole life: a one-shot run beside it
# (an operator's `mapsync mirror --verify`) notes its run, but not its own lack of an interval.
LOOP = ".mirror.loop"

# A mirror that has not finished a run for this many of its intervals (plus its rsync
# timeout: a run waiting on a SOURCE that does not answer records only when it gives up) is
# not following: WARNING.
IDLE_INTERVALS = 3
# CRITICAL when a release served expires within this part of its lifetime (created to
# expires): the publisher renews a release at half its lifetime, so a mirror serving one this
# old has not followed for a quarter of a lifetime at least, and its nodes expire next.
EXPIRING = 0.25
REPAIR_SHOWN = 86400  # damage found and repaired is mentioned (not a problem: it worked) for a day

_log = log.get("mirror")


@dataclass
class ChannelRun:
    """What one run did for one channel, as the note keeps it."""

    error: str | None = None  # the channel failed: what ended it (DEST serves what it served)
    warning: str | None = None  # served, but something is wrong (SOURCE no longer has it)
    mirrored: bool = False  # the run brought it to SOURCE's (its older releases tried again)
    skipped: dict[int, str] = field(default_factory=dict)  # older releases not copied: why
    damaged: dict[str, str] = field(default_factory=dict)  # found by a check here, and done


def record_mirror_run(
    dest: Path,
    source: str,
    error: BaseException | str | None,
    channels: dict[str, ChannelRun],
    *,
    interval: int | None = None,
    timeout: int | None = None,
    full: bool = False,
) -> None:
    """Note a finished run of the mirror in ``dest`` from ``source``: ``error`` the run's
    (None: it went through every channel; each channel's own error is in ``channels``),
    ``interval`` its loop's (None: one run), ``full`` a ``--verify`` run. Never fails the
    run: a note that cannot be written is logged."""
    note = read_note(dest / NOTE)
    now = iso(utcnow())
    if isinstance(error, BaseException):
        error = described(error)
    failed = [f"channel {n}: {r.error}" for n, r in sorted(channels.items()) if r.error]
    summary = "; ".join(([error] if error is not None else []) + failed) or None
    note["source"] = source
    if interval is not None or not looping(dest):
        # A one-shot run while a loop runs leaves the loop's: the note describes what runs,
        # and status judges a loop that stops or hangs by them.
        note["interval"] = interval
        note["timeout"] = timeout
    note["last_run"] = now
    note["last_error"] = first_line(summary) if summary is not None else None
    if summary is None:
        note["last_success"] = now
        if full:
            note["last_full_check"] = now
    old = note.get("channels")
    old = old if isinstance(old, dict) else {}
    runs: dict[str, object] = {}
    for name in sorted(set(old) | set(channels)):
        if not isinstance(name, str) or not CHANNEL_NAME.match(name):
            continue
        if name not in channels:
            if (dest / name).is_dir() and isinstance(old[name], dict):
                runs[name] = old[name]  # not looked at by this run (mirror --channel)
            continue  # removed from DEST: nothing of it to report
        before = old.get(name)
        runs[name] = _channel_note(dest, name, channels[name], before, now)
    note["channels"] = runs
    write_note(dest / NOTE, note, "the mirror run", _log)


class LoopMark:
    """A ``mirror --interval`` process's mark in DEST: a shared lock on ``DEST/.mirror.loop``,
    held for its life (the kernel drops it with the process, however it ends)."""

    def __init__(self, dest: Path) -> None:
        self.path = dest / LOOP
        self.fd: int | None = None

    def hold(self) -> None:
        """Take the mark; again where the file held is no longer DEST's (DEST recreated by
        hand while the loop runs)."""
        if self.fd is not None:
            try:
                st, held = os.stat(self.path, follow_symlinks=False), os.fstat(self.fd)
                if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                    return
            except OSError:
                pass
            self.release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def loop_running(dest: Path) -> Iterator[LoopMark]:
    """Mark a ``mirror --interval`` process running in ``dest`` while in the block
    (:class:`LoopMark`; each pass takes it again: :meth:`LoopMark.hold`)."""
    mark = LoopMark(dest)
    mark.hold()
    try:
        yield mark
    finally:
        mark.release()


def looping(dest: Path) -> bool:
    """Whether a ``mirror --interval`` process runs in ``dest`` (:func:`loop_running`)."""
    try:
        fd = os.open(dest / LOOP, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _channel_note(
    dest: Path, name: str, run: ChannelRun, before: object, now: str
) -> dict[str, object]:
    before = before if isinstance(before, dict) else {}
    serial = _served_serial(dest / name)
    note: dict[str, object] = dict(before)
    note["serial"] = serial
    note["last_run"] = now
    note["last_error"] = first_line(run.error) if run.error else None
    if run.error is None:
        note["last_success"] = now
    skipped = {str(s): first_line(why, 200) for s, why in run.skipped.items()}
    old = before.get("skipped")
    if not run.mirrored and before.get("serial") == serial and isinstance(old, dict):
        # Tried again only when LATEST next moves: still missing until then.
        skipped = {**{str(k): str(v) for k, v in old.items()}, **skipped}
    here = dest / name
    missing = {
        s: why
        for s, why in sorted(skipped.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)
        if s.isdigit() and not (here / release_dir(int(s))).is_dir()
    }
    note["skipped"] = missing
    warnings = [first_line(run.warning)] if run.warning else []
    if missing:
        serials = sorted(missing, key=int, reverse=True)
        warnings.append(
            f"older release(s) {', '.join(serials)} not copied ({missing[serials[0]]}); tried "
            f"again when {LATEST} next moves"
        )
    note["warning"] = "; ".join(warnings) or None
    if run.damaged:
        note["last_repair"] = now
        note["last_damage"] = first_line(
            "; ".join(f"{what}: {why}" for what, why in sorted(run.damaged.items()))
        )
    return note


def _served_serial(home: Path) -> int | None:
    try:
        return _read_latest(home).serial
    except (OSError, MapsyncError):
        return None


def _read_latest(home: Path) -> Latest:
    path = home / LATEST
    return parse_latest(_read_small(path, MAX_LATEST_BYTES), str(path))


def _read_small(path: Path, limit: int) -> bytes:
    """``path``'s bytes (at most ``limit`` + 1: the parser refuses more), never through a
    symlink, never waiting; MapsyncError for anything but a regular file."""
    data = read_small(path, limit, follow=False)
    if data is None:
        raise MapsyncError(f"{path}: not a regular file")
    return data


@dataclass
class ServedChannel:
    """One channel as DEST serves it, and as the note's runs left it."""

    channel: str
    serial: int | None = None  # the release DEST's LATEST names (None: none, or unreadable)
    created: str | None = None
    expires: str | None = None
    problem: str | None = None  # what nodes would get instead of a release
    last_run: str | None = None
    last_success: str | None = None
    last_error: str | None = None
    warning: str | None = None
    last_repair: str | None = None
    last_damage: str | None = None


@dataclass
class MirrorStatus:
    """The mirror's health as ``mapsync status --mirror DEST`` reports it."""

    code: int
    message: str
    dest: str
    source: str | None = None
    interval: int | None = None
    last_run: str | None = None
    last_success: str | None = None
    last_error: str | None = None
    last_full_check: str | None = None
    channels: list[ServedChannel] = field(default_factory=list)


def _served(dest: Path, note: dict[str, object]) -> list[ServedChannel]:
    """Every channel DEST serves (a directory named like one, with a ``LATEST``) or the
    note names (one whose first copy never got to its ``LATEST``)."""
    runs = note.get("channels")
    runs = runs if isinstance(runs, dict) else {}
    try:
        names = {
            p.name
            for p in dest.iterdir()
            if CHANNEL_NAME.match(p.name) and os.path.lexists(p / LATEST)
        }
    except OSError:
        names = set()
    # One whose first copy failed: its directory is there, no LATEST yet. (One removed from
    # DEST, as a channel SOURCE no longer has is, is no longer served: not reported.)
    names |= {
        n for n in runs if isinstance(n, str) and CHANNEL_NAME.match(n) and (dest / n).is_dir()
    }
    out = []
    for name in sorted(names):
        run = runs.get(name)
        run = run if isinstance(run, dict) else {}
        ch = ServedChannel(name)
        for key in ("last_run", "last_success", "last_repair"):
            when = stamp(run, key)
            setattr(ch, key, iso(when) if when else None)
        for key in ("last_error", "warning", "last_damage"):
            value = run.get(key)
            setattr(ch, key, first_line(value) if isinstance(value, str) and value else None)
        _look(dest / name, ch)
        out.append(ch)
    return out


def _look(home: Path, ch: ServedChannel) -> None:
    """Fill in what ``home`` serves: its serial, and the created and expires of the
    manifest its ``LATEST`` names (the one nodes fetch, as they would find it)."""
    try:
        latest = _read_latest(home)
    except FileNotFoundError:
        return  # nothing served (yet)
    except (OSError, MapsyncError) as exc:
        ch.problem = f"its {LATEST} is damaged ({' '.join(described(exc).split())})"
        return
    ch.serial = latest.serial
    path = home / release_dir(latest.serial) / MANIFEST
    try:
        data = _read_small(path, MAX_MANIFEST_BYTES)
        if manifest_sha256(data) != latest.manifest_sha256:
            raise MapsyncError(f"{path}: not the manifest {LATEST} names")
        manifest: Manifest = parse_manifest(data, str(path))
        parse_iso(manifest.created), parse_iso(manifest.expires)
    except (OSError, MapsyncError, ValueError) as exc:
        ch.problem = (
            f"the release its {LATEST} names is damaged ({' '.join(described(exc).split())})"
        )
        return
    ch.created, ch.expires = manifest.created, manifest.expires


def _until(then: datetime, now: datetime) -> str:
    seconds = int((then - now).total_seconds())
    return f"expires in {span(seconds)}" if seconds > 0 else f"expired {span(-seconds)} ago"


def mirror_status(dest: Path, now: datetime | None = None) -> MirrorStatus:
    """OK while the mirror's runs succeed; WARNING when its last run failed, a channel has a
    warning (SOURCE no longer has it, older releases not copied), a recorded time lies in
    the future (a clock stepped back), or, run with ``--interval``, no run finished for
    :data:`IDLE_INTERVALS` intervals plus its rsync timeout; CRITICAL when a channel serves
    nothing nodes can use (no release, or a damaged one) or a release that expires within
    :data:`EXPIRING` of its lifetime (or has expired): nodes pulling from it go CRITICAL
    next; UNKNOWN when no run is recorded in ``DEST/.mirror.json``."""
    now = now or utcnow()
    note = read_note(dest / NOTE)
    source = note.get("source")
    interval = note.get("interval")
    interval = interval if isinstance(interval, int) and interval > 0 else None
    timeout = note.get("timeout")
    timeout = timeout if isinstance(timeout, int) and timeout > 0 else 300
    last_run, last_success = stamp(note, "last_run"), stamp(note, "last_success")
    error = note.get("last_error")
    error = first_line(error) if isinstance(error, str) and error else None
    full = stamp(note, "last_full_check")
    st = MirrorStatus(
        EXIT_UNKNOWN,
        "",
        str(dest),
        source if isinstance(source, str) else None,
        interval,
        iso(last_run) if last_run else None,
        iso(last_success) if last_success else None,
        error,
        iso(full) if full else None,
    )
    if last_run is None:
        where = "" if dest.is_dir() else f" ({dest} is not a directory)"
        st.message = f"no mirror run recorded in {dest / NOTE}{where}"
        return st
    st.channels = _served(dest, note)
    success = f"last successful run {ago(last_success, now)}"
    failed = f"; last run failed: {error}" if error else ""
    critical = []
    for ch in st.channels:
        if ch.problem:
            critical.append(f"channel {ch.channel}: {ch.problem}; nodes refuse it")
        elif ch.serial is None:
            why = f": {ch.last_error}" if ch.last_error else ""
            critical.append(f"channel {ch.channel}: serves no release (never copied whole{why})")
        elif ch.expires is not None and ch.created is not None:
            created, expires = parse_iso(ch.created), parse_iso(ch.expires)
            life = max((expires - created).total_seconds(), 0)
            if now >= expires - timedelta(seconds=life * EXPIRING):
                critical.append(
                    f"channel {ch.channel}: serves serial {ch.serial}, which "
                    f"{_until(expires, now)} ({ch.expires}; not renewed: nodes pulling it go "
                    "CRITICAL when it expires)"
                )
    if not st.channels:
        critical.append(f"serves no channel from {dest}")
    if critical:
        st.code = EXIT_ERROR
        st.message = "; ".join(critical) + f"; {success}{failed}"
        return st
    warnings = [
        f"the {what} is recorded {ago(when, now)}: this host's clock was stepped back or was "
        "ahead when it ran"
        for what, when in (("last run", last_run), ("last successful run", last_success))
        if when is not None and in_future(when, now)
    ]
    warnings += [
        # As a node's status: the expiry above is judged on this clock, which is behind the
        # publisher's (a mirror that stopped following would look fresh).
        f"channel {ch.channel}: serves serial {ch.serial}, created {ago(parse_iso(ch.created), now)} "
        f"({ch.created}): this host's clock is behind the publisher's or was stepped back; "
        "expiry is judged on it"
        for ch in st.channels
        if ch.created is not None and in_future(parse_iso(ch.created), now)
    ]
    if error:
        warnings.append(f"last run failed {ago(last_run, now)}: {error}")
    warnings += [f"channel {ch.channel}: {ch.warning}" for ch in st.channels if ch.warning]
    if interval is not None and (now - last_run).total_seconds() > (
        IDLE_INTERVALS * interval + timeout
    ):
        warnings.append(
            f"no mirror run for {ago(last_run, now)[:-4]} (it runs every {span(interval)}: "
            "stopped, or stuck?)"
        )
    if warnings:
        st.code = EXIT_WARNING
        st.message = "; ".join(warnings) + f"; {success}"
        return st
    first = min(st.channels, key=lambda c: c.expires or "")
    served = ", ".join(f"{c.channel} {c.serial}" for c in st.channels)
    expiry = (
        f"; first to expire: {first.channel}, {_until(parse_iso(first.expires), now)}"
        if first.expires
        else ""
    )
    repaired = [
        f"channel {c.channel}: repaired {ago(parse_iso(c.last_repair), now)} ({c.last_damage})"
        for c in st.channels
        if c.last_repair and (now - parse_iso(c.last_repair)).total_seconds() < REPAIR_SHOWN
    ]
    st.code = EXIT_OK
    st.message = f"serving {served}{expiry}; {success}" + "".join(f"; {r}" for r in repaired)
    return st


_METRICS = (
    ("mapsync_mirror_status", "Mirror status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."),
    ("mapsync_mirror_last_run_timestamp_seconds", "Unix time of the last mirror run."),
    (
        "mapsync_mirror_last_success_timestamp_seconds",
        "Unix time of the last mirror run that succeeded.",
    ),
    ("mapsync_mirror_serial", "Serial of the release the mirror's LATEST names, per channel."),
    (
        "mapsync_mirror_expiry_timestamp_seconds",
        "Unix time at which the release the mirror serves expires, per channel.",
    ),
)


def mirror_metrics(st: MirrorStatus) -> str:
    """node_exporter textfile metrics of the mirror in ``st.dest`` (each sample labelled with
    it: two mirrors on one host write two files, and their samples must differ). A mirror
    behind the publisher: ``mapsync_publisher_serial - mapsync_mirror_serial``."""
    where = label("dest", st.dest)
    samples: dict[str, list[str]] = {name: [] for name, _ in _METRICS}
    samples["mapsync_mirror_status"].append(f"{{{where}}} {st.code}")
    for when, name in (
        (st.last_run, "mapsync_mirror_last_run_timestamp_seconds"),
        (st.last_success, "mapsync_mirror_last_success_timestamp_seconds"),
    ):
        if when:
            samples[name].append(f"{{{where}}} {int(parse_iso(when).timestamp())}")
    for ch in st.channels:
        labels = f"{{{label('channel', ch.channel)},{where}}}"
        if ch.serial is not None:
            samples["mapsync_mirror_serial"].append(f"{labels} {ch.serial}")
        if ch.expires is not None and ch.problem is None:
            stamp_ = int(parse_iso(ch.expires).timestamp())
            samples["mapsync_mirror_expiry_timestamp_seconds"].append(f"{labels} {stamp_}")
    return exposition(_METRICS, samples)

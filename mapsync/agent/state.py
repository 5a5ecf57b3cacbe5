"""What an agent remembers per channel between runs: ``STATE/<channel>/state.json``.

What is *installed* is never taken from here: it is read from the live set itself
(``TARGET/.mapsync/current/MANIFEST.json``), so status cannot claim more than is true.
This file only records when the source was last checked and what went wrong, plus what
protects the node when the live set is lost: the highest serial ever installed (the floor a
source must not go below, even after ``target`` was wiped) and the size and mtime of every
live file as installed (the cheap check each pull and ``status`` make).

A damaged file (empty, truncated, wrong types) is never fatal: :meth:`ChannelState.load`
raises :class:`StateDamaged` naming it, ``pull`` then rebuilds the state from the live set
and the kept releases. It is written 0600 in a 0700 directory (docs/security.md).

A run that changed nothing but the times of its check (``last_attempt``, ``last_success``,
``last_push``: a nothing-changed poll, every minute on every node) writes only those times,
to ``.state.json.checked`` beside the state file (and beside its public copy), without fsync:
lost in a crash, they cost nothing (the next run writes them again; ``status`` meanwhile
shows the check before), and the state file, untouched, keeps everything that protects the
node. :meth:`ChannelState.load` takes a time from there when it is newer.

A pull from the push inbox is not a check of the source: it records ``last_push`` (and the
install), never ``last_success``, ``last_source`` or ``failed_sources``, and it clears only
an error of its own (``last_error_origin`` "inbox"), so a working push does not hide a dead
publisher or mirror from ``status``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mapsync import log
from mapsync.atomic import atomic_write, remove_tree
from mapsync.errors import LockBusy, MapsyncError
from mapsync.release import parse_iso

_log = log.get("agent")

STATE_MODE = 0o600
PUBLIC_MODE = 0o644  # the copy for unprivileged `status` ([agent] status_dir)
# Where a failed check's own output starts in its error (mapsync.agent.hooks), last: the
# state file (0600) keeps it, its world-readable copy does not (a check may print what it
# read of the maps, hashes and all: `doveadm auth test`, `head dovecot_users`).
SAID = "; it said: "
PRIVATE_OUTPUT = "(not in this copy: the agent's log and its state file have it)"
DIR_MODE = 0o700


class StateDamaged(MapsyncError):
    """``state.json`` cannot be read as a channel state; names the file and what is wrong."""


@dataclass(frozen=True)
class LiveFile:
    """Size, mtime, inode and ctime (ns) of one file of the live set as installed: the cheap
    check. ``ctime`` cannot be set back by anyone: a file rewritten in place with its old size
    and mtime restored (``touch -r``, ``os.utime``) still shows a new ctime. 0 = not recorded
    (a state file written before these were kept)."""

    size: int
    mtime_ns: int
    ino: int = 0
    ctime_ns: int = 0

    def differs(self, now: LiveFile) -> bool:
        """Whether ``now`` (the file as it is) is not the file this records."""
        if (self.size, self.mtime_ns) != (now.size, now.mtime_ns):
            return True
        return bool(self.ino and self.ctime_ns) and (self.ino, self.ctime_ns) != (
            now.ino,
            now.ctime_ns,
        )


@dataclass
class ChannelState:
    """What a node remembers about one channel between runs (its ``state.json``): the last
    attempt, success, error, install and pin."""

    last_attempt: str | None = None
    last_success: str | None = None  # last good check: source reached, release verified
    last_error: str | None = None
    last_error_at: str | None = None
    # The live set directory (name, inode) and files settings the agent could not give its
    # files (mapsync.agent.repair): not rebuilt for them again on every pull.
    ownership_unmet: str | None = None
    # Which kind of run failed last: "source" (a poll of the source and its mirrors) or
    # "inbox" (a pull of what was pushed); None in a state file older than the field.
    last_error_origin: Literal["source", "inbox"] | None = None
    last_install: str | None = None
    last_bytes: int | None = None
    reload_pending: bool = False
    pinned: int | None = None  # serial installed by ``rollback``; ``pull`` leaves it until --unpin
    last_source: str | None = None  # the source (or mirror) that answered the last good check
    # Sources tried before ``last_source`` on that run, and why each failed (source → error).
    failed_sources: dict[str, str] = field(default_factory=dict)
    last_push: str | None = None  # the last good pull from the push inbox
    # The highest serial ever installed here: no source may go below it, even when the live
    # set is gone (``rm -rf target``). A rollback's pin is the one way to an older serial.
    highest_serial: int | None = None
    live_serial: int | None = None  # the serial the live set had when installed or repaired
    live_set: str | None = None  # its directory in TARGET/.mapsync, which live_files describe
    # File name in the live set → [size, mtime_ns, ino, ctime_ns] as installed: compared on
    # every pull (a record of only [size, mtime_ns], from an older mapsync, still reads).
    live_files: dict[str, list[int]] = field(default_factory=dict)
    last_full_check: str | None = None  # the last sha256 check of every live file
    last_repair: str | None = None  # when a damaged live set was last rebuilt
    last_damage: str | None = None  # what was found damaged then

    @classmethod
    def load(cls, path: Path) -> ChannelState:
        """The state in ``path`` (a fresh one if there is none); StateDamaged if unreadable."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls()
        except IsADirectoryError:
            raise StateDamaged(f"{path}: is a directory, not a state file") from None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateDamaged(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise StateDamaged(f"{path}: holds a JSON {type(data).__name__}, not an object")
        hints = typing.get_type_hints(cls)
        known: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if not _fits(value, hints[f.name]):
                raise StateDamaged(
                    f"{path}: key {f.name!r} holds {json.dumps(value)[:60]}, not a valid value"
                )
            if f.name in _TIMES and value is not None:
                try:
                    parse_iso(value)
                except ValueError:
                    raise StateDamaged(
                        f"{path}: key {f.name!r} holds {value[:40]!r}, not a time"
                    ) from None
            known[f.name] = value
        if not all(
            isinstance(v, list) and len(v) in (2, 4) and all(_is_int(x) for x in v)
            for v in known.get("live_files", {}).values()
        ):
            raise StateDamaged(
                f"{path}: key 'live_files' is not a map of [size, mtime_ns, ino, ctime_ns]"
            )
        state = cls(**known)
        state._take_check_times(checked_path(path))
        return state

    def _take_check_times(self, path: Path) -> None:
        """The times of the check from ``path`` (:meth:`save_check_times`), each where it is
        newer than the state file's. Anything unreadable there is ignored: it is only ever a
        file a crash may have emptied, and the state file's own times stand."""
        try:
            data = json.loads(path.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return
        if not isinstance(data, dict):
            return
        for name in CHECK_TIMES:
            value = data.get(name)
            if not isinstance(value, str):
                continue
            try:
                parse_iso(value)
            except ValueError:
                continue
            mine = getattr(self, name)
            # iso() times are fixed-width: as strings they sort as the times do.
            if mine is None or value > mine:
                setattr(self, name, value)

    def check_times(self) -> dict[str, str | None]:
        """The times of the check (:data:`CHECK_TIMES`) as this state holds them."""
        return {name: getattr(self, name) for name in CHECK_TIMES}

    def without_check_times(self) -> dict[str, Any]:
        """Every field but the times of the check: what a run must write durably if it moved."""
        data = asdict(self)
        for name in CHECK_TIMES:
            del data[name]
        return data

    def save_check_times(self, path: Path, public: Path | None = None) -> None:
        """Write only the times of the check beside ``path`` (and beside ``public``), without
        fsync. A crash may lose them or leave the file empty; that costs nothing: the state
        file keeps the times of the last durable write, and the next run writes them again."""
        data = (json.dumps(self.check_times(), indent=2, sort_keys=True) + "\n").encode()
        atomic_write(checked_path(path), data, mode=STATE_MODE, durable=False)
        if public is not None:
            try:
                public.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                atomic_write(checked_path(public), data, mode=PUBLIC_MODE, durable=False)
            except OSError as exc:
                _log.warning(
                    "public status copy not written; `mapsync status` as another user than "
                    "root cannot see this run",
                    path=str(checked_path(public)),
                    error=exc.strerror or str(exc),
                )

    def save(self, path: Path, public: Path | None = None) -> None:
        """Write the state atomically, 0600 (it names sources and errors; docs/security.md),
        and, with ``public``, a world-readable copy there for unprivileged ``status``."""
        data = (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()
        atomic_write(path, data, mode=STATE_MODE)
        # The state file now holds the newest times: a file of them beside it is stale.
        checked_path(path).unlink(missing_ok=True)
        if public is not None:
            self.publish_copy(public, data)

    def publish_copy(self, public: Path, data: bytes | None = None) -> None:
        """The world-readable copy (0644 in a 0755 directory): the same fields, none of them
        secret (source URLs carry no password; a failed check's output is left out: it may
        quote the maps it read, password hashes included). Never fails the run."""
        fields = asdict(self)
        error = fields.get("last_error")
        if error and SAID in error:
            fields["last_error"] = error.split(SAID, 1)[0] + SAID + PRIVATE_OUTPUT
            data = None
        if data is None:
            data = (json.dumps(fields, indent=2, sort_keys=True) + "\n").encode()
        try:
            public.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            atomic_write(public, data, mode=PUBLIC_MODE)
            checked_path(public).unlink(missing_ok=True)
        except OSError as exc:
            error = exc.strerror or str(exc)
            if public.parent.exists() and not public.parent.is_dir():
                error = f"{public.parent} is not a directory ([agent] status_dir)"
            _log.warning(
                "public status copy not written; `mapsync status` as another user than root "
                "cannot see this run",
                path=str(public),
                error=error,
            )

    def save_in_place(self, path: Path) -> None:
        """Overwrite ``path`` in place: on a full disk its own blocks still take the outcome
        of the run, where a new file (the atomic write) cannot be created. Not atomic: a kill
        mid-write leaves a damaged file, which :meth:`load` reports and ``pull`` rebuilds."""
        data = (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, STATE_MODE)
        try:
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.pwrite(fd, view[done:], done)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        checked_path(path).unlink(missing_ok=True)

    def recorded_live(self) -> tuple[str | None, dict[str, LiveFile]]:
        """(set directory, size/mtime per file) as recorded when the live set was installed."""
        files = {name: LiveFile(*v) for name, v in self.live_files.items()}
        return self.live_set, files

    def note_installed(
        self, serial: int, set_name: str, files: dict[str, LiveFile], full_check: str
    ) -> None:
        """Record a set just made live (install, renewal, repair): its serial and directory,
        the floor, and the size/mtime of its files, all verified by sha256 at ``full_check``."""
        self.live_serial = serial
        self.live_set = set_name
        self.highest_serial = max(serial, self.highest_serial or serial)
        self.live_files = {
            n: [f.size, f.mtime_ns, f.ino, f.ctime_ns] for n, f in sorted(files.items())
        }
        self.last_full_check = full_check


# The times a nothing-changed run moves: written without fsync (ChannelState.save_check_times).
CHECK_TIMES = ("last_attempt", "last_success", "last_push")


def checked_path(path: Path) -> Path:
    """Where the times of the check of the state file (or public copy) ``path`` are written
    when nothing else changed: ``.NAME.checked`` beside it."""
    return path.with_name(f".{path.name}.checked")


_TIMES = frozenset(
    {
        "last_attempt",
        "last_success",
        "last_error_at",
        "last_install",
        "last_push",
        "last_full_check",
        "last_repair",
    }
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(value: object, hint: Any) -> bool:
    """Whether a JSON ``value`` fits the field type ``hint`` (str, int, bool, None, Literal,
    dict[str, ...], unions of these)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is dict:
        _, val_hint = typing.get_args(hint)
        return isinstance(value, dict) and all(
            isinstance(k, str) and _fits(v, val_hint) for k, v in value.items()
        )
    if origin is list:
        return isinstance(value, list)
    if hint is type(None):
        return value is None
    if hint is int:
        return _is_int(value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return False


def secure_dir(path: Path) -> None:
    """Create ``path`` 0700, or bring an existing one (made by an older mapsync, or by hand)
    back to 0700: the state names sources and errors, kept releases may hold password hashes."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) != DIR_MODE:
        _log.info(
            "tightening mode", path=str(path), mode=f"{stat.S_IMODE(st.st_mode):04o}", now="0700"
        )
        os.chmod(path, DIR_MODE)


def secure_file(path: Path) -> None:
    """Give an existing state file mode 0600 (an older mapsync wrote it 0644)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != STATE_MODE:
        os.chmod(path, STATE_MODE)


# What atomic_write (``.NAME.<random>.tmp``) leaves in STATE/<channel> when killed.
_STRAY_TMP = re.compile(r"^\..+\.tmp$")


def remove_stray_temp_files(root: Path) -> list[str]:
    """Delete the temporary files a killed run left in the channel's state directory (only
    ever called under the channel lock, so no run of ours is writing them); return their names."""
    removed = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    for name in sorted(names):
        if not _STRAY_TMP.match(name):
            continue
        path = root / name
        if path.is_dir() and not path.is_symlink():
            remove_tree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(name)
    if removed:
        _log.info("removed temporary files a killed run left", path=str(root), files=removed)
    return removed


@contextmanager
def channel_lock(path: Path) -> Iterator[None]:
    """One agent run per channel. The kernel drops a flock when its holder dies, so a
    killed run never leaves a lock behind that blocks the next one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        # Nothing of ours makes a directory here (a restore, a mistaken mkdir): it only
        # stops every run, so it goes, and the lock is a file again.
        _log.warning("the lock path was a directory; replaced by a lock file", path=str(path))
        remove_tree(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise MapsyncError(f"{path}: cannot open the channel lock: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise LockBusy(f"{path}: another agent run (pid {holder}) holds this channel") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)

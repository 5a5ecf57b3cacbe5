"""What an agent remembers per channel between runs: ``STATE/<channel>/state.json``.

What is *installed* is never taken from here: it is read from the live set itself
(``TARGET/.mapsync/current/MANIFEST.json``), so status cannot claim more than is true.
This file only records when the source was last checked and what went wrong.

A pull from the push inbox is not a check of the source: it records ``last_push`` (and the
install), never ``last_success``, ``last_source`` or ``failed_sources``, and it clears only
an error of its own (``last_error_origin`` "inbox"), so a working push does not hide a dead
publisher or mirror from ``status``.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from mapsync.atomic import atomic_write
from mapsync.errors import LockBusy


@dataclass
class ChannelState:
    last_attempt: str | None = None
    last_success: str | None = None  # last good check: source reached, release verified
    last_error: str | None = None
    last_error_at: str | None = None
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

    @classmethod
    def load(cls, path: Path) -> ChannelState:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, path: Path) -> None:
        # 0600, as docs/security.md promises for everything in the state directory.
        data = (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()
        atomic_write(path, data, mode=0o600)


@contextmanager
def channel_lock(path: Path) -> Iterator[None]:
    """One agent run per channel. The kernel drops a flock when its holder dies, so a
    killed run never leaves a lock behind that blocks the next one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
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

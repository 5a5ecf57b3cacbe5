"""A file lock that waits: the publisher's repository lock and its per-channel push lock.

``flock`` on an open file: the kernel drops it when its holder dies, so a killed run never
leaves a lock behind (the agent's own, non-waiting lock is :func:`mapsync.agent.state.channel_lock`).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mapsync.errors import LockBusy


@contextmanager
def waiting_lock(path: Path, wait: float, busy: str, *, create: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path``, waiting up to ``wait`` seconds; LockBusy(``busy``,
    plus how long it waited) if another process still holds it then. ``create=False`` (a
    reader that writes nothing): the file is opened only to read, and where there is none yet
    (so no holder either) nothing is locked."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY, 0o644)
    except FileNotFoundError:
        if create:
            raise
        yield
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(f"{busy} (waited {wait:.0f}s)") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # closing drops the lock

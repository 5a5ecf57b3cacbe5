"""Maps rendered ahead, on the second core, while the publisher validates the snapshot.

Validating a large snapshot and rendering its maps each take seconds, and rendering needs
validation only to know whether to publish at all. So the publisher forks one child as soon
as the snapshot and its :class:`~mapsync.maps.Directory` are in memory: the child writes each
map of each selected channel (text and cdb, :func:`~mapsync.formats.mapfile.write_map`) into
a scratch directory beside the channel's staging directory, while the parent validates.

The parent then takes each map from the child (:meth:`Ahead.take`: a rename into staging)
only if it would have rendered the very same thing: the same directory object (no row
skipped), the same serial in the header. Anything else (rows skipped, a map the child could
not write, a child that died) and the parent renders that map itself, as it always did, so
the bytes and every message are the same either way. Small snapshots are rendered inline:
the fork costs more than it saves.
"""

from __future__ import annotations

import gc
import os
import pickle
import shutil
import signal
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mapsync import log
from mapsync.config import PublisherChannel
from mapsync.formats import text
from mapsync.formats.mapfile import CdbFile, write_map
from mapsync.maps import Directory, Map
from mapsync.progress import track

_log = log.get("publisher")

# Rows (accounts and aliases) below which the maps are rendered inline: at 20,000 the whole
# render takes about 0.2 s, and a fork, a second interpreter's exit and the renames ~20 ms.
MIN_ROWS = 20_000
SCRATCH = ".rendering"  # beside .staging in the channel directory: the same file system
_LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class Job:
    """One map of one channel to render, and the serial its header names."""

    channel: PublisherChannel
    name: str
    spec: Map
    serial: int


def render(job: Job, directory: Directory, path: Path) -> tuple[text.TextInfo, CdbFile | None]:
    """Write ``job``'s map from ``directory`` to ``path`` (text, and the cdb's hash)."""
    ch, spec = job.channel, job.spec
    return write_map(
        track(spec.entries(directory, ch), f"render {ch.name}/{job.name}"),
        path,
        text.header(job.name, ch.name, job.serial),
        spec.separator,
        f"cdb {ch.name}/{job.name}" if spec.cdb else None,
    )


class Ahead:
    """The maps of ``jobs`` being rendered from ``directory`` by a forked child.

    Use as a context manager (or call :meth:`close`): it kills a child still running and
    removes the scratch directories whatever happened.
    """

    def __init__(self, jobs: list[Job], directory: Directory, scratch: dict[str, Path]) -> None:
        self.directory = directory
        self._jobs = {(j.channel.name, j.name): j for j in jobs}
        self._order = [(j.channel.name, j.name) for j in jobs]
        self._scratch = scratch
        self._results: dict[tuple[str, str], tuple[text.TextInfo, CdbFile] | None] = {}
        self._pid: int | None = None
        self._pipe: BinaryIO | None = None
        for path in scratch.values():
            shutil.rmtree(path, ignore_errors=True)  # a crashed run's leftovers
            path.mkdir(parents=True)
        sys.stdout.flush()  # nothing buffered may be written twice
        sys.stderr.flush()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; its work is checked by the parent's tests
            os.close(read)
            code = 1
            try:
                self._child(os.fdopen(write, "wb"))
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        self._pid = pid
        self._pipe = os.fdopen(read, "rb")

    def _child(self, out: BinaryIO) -> None:
        # The parent's handlers would run here too (SIGTERM raising SystemExit in the wrong
        # process): the child simply ends with the parent's run, or on its signal.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        gc.disable()  # a short life making millions of acyclic tuples (see paused_gc)
        for key in self._order:
            job = self._jobs[key]
            try:
                result = render(job, self.directory, self._scratch[key[0]] / job.name)
            except Exception:
                result = None  # the parent renders it itself, and raises as it always did
            data = pickle.dumps((key, result))
            out.write(_LENGTH.pack(len(data)) + data)
            out.flush()
            if result is None:
                break
        out.close()

    def _receive(self) -> Iterator[tuple[tuple[str, str], object]]:
        assert self._pipe is not None
        while head := self._pipe.read(_LENGTH.size):
            if len(head) < _LENGTH.size:
                return
            data = self._pipe.read(_LENGTH.unpack(head)[0])
            yield pickle.loads(data)  # from our own child

    def take(
        self, ch: PublisherChannel, name: str, directory: Directory, serial: int, path: Path
    ) -> tuple[text.TextInfo, CdbFile | None] | None:
        """Move map ``name`` of ``ch`` to ``path`` and return what :func:`render` returns, if
        the child rendered it from ``directory`` with ``serial``; None: render it yourself."""
        key = (ch.name, name)
        job = self._jobs.get(key)
        if job is None or directory is not self.directory or job.serial != serial:
            return None
        if key not in self._results and self._pipe is not None:
            for got, result in self._receive():
                self._results[got] = result  # type: ignore[assignment]
                if got == key:
                    break
            else:  # the child is done (or died): whatever it did not send, we render
                self._reap()
        result = self._results.pop(key, None)
        if result is None:
            return None
        os.replace(self._scratch[ch.name] / name, path)
        return result

    def _reap(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        if self._pid is not None:
            if os.waitpid(self._pid, os.WNOHANG) == (0, 0):  # still rendering: not needed
                os.kill(self._pid, signal.SIGKILL)
                os.waitpid(self._pid, 0)
            self._pid = None

    def close(self) -> None:
        """End the child if it still runs; remove the scratch directories."""
        self._reap()
        for path in self._scratch.values():
            shutil.rmtree(path, ignore_errors=True)

    def __enter__(self) -> Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rows(directory: Directory) -> int:
    """How many rows rendering ``directory`` walks: what decides whether to fork."""
    snap = directory.snapshot
    return len(snap.accounts) + len(snap.aliases)

"""The one atomic-write helper: temp file in the same directory, fsync, rename, fsync the dir.

Every file mapsync writes that someone else may read (LATEST, manifests, state, keys,
Prometheus textfiles) goes through :func:`atomic_write`; no second implementation. Every
directory that appears whole (a published release, an agent's kept release, its live set)
goes through :func:`commit_dir`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _fsync(path: Path, flags: int = 0) -> None:
    """fsync the file or directory (``flags`` ``os.O_DIRECTORY``) at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    _fsync(path, os.O_DIRECTORY)


def _fsync_tree(directory: Path) -> None:
    """fsync every regular file under ``directory``, then each directory, deepest first."""
    for entry in os.scandir(directory):
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            _fsync_tree(path)
        elif entry.is_file(follow_symlinks=False):
            _fsync(path)
    fsync_dir(directory)


def commit_dir(staging: Path, final: Path) -> None:
    """Make the fully written directory ``staging`` appear as ``final`` in one rename, durably.

    Every file in it is fsynced, then the directory itself, then it is renamed to ``final``
    (same filesystem) and the parent of ``final`` fsynced: a reader, and a machine that lost
    power, sees no ``final`` or the whole of it. ``final`` must not exist (rename(2) replaces
    only an empty directory). On an error ``staging`` is left where it is, for the caller to
    remove."""
    _fsync_tree(staging)
    os.rename(staging, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block ends cleanly.

    On any error the temporary file is removed and ``path`` is untouched. ``durable=False``
    skips both fsyncs: readers still see the old or the new bytes, but after a crash the file
    may be the old one or, on a filesystem that does not flush a file renamed over another
    (XFS; ext4 mounted ``noauto_da_alloc``), empty. Only for a file whose loss costs nothing.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (readers see the old or the new bytes);
    ``durable``: see :func:`atomic_writer`."""
    with atomic_writer(path, mode, durable=durable) as fh:
        fh.write(data)


def atomic_symlink(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` atomically, replacing whatever ``link`` was."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def copy_into(src: Path, fd: int) -> None:
    """Copy the file ``src`` into the open, empty file ``fd`` (its inode, owner and mode
    kept: the caller made it as it must be), in the kernel where it can (copy_file_range:
    a map of a hundred megabytes never passes through this process), else a megabyte at a
    time."""
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        copied = 0
        with contextlib.suppress(OSError):  # a file system or kernel without it
            while copied < size:
                n = os.copy_file_range(fin.fileno(), fd, size - copied)
                if n == 0:
                    break
                copied += n
        if copied == size:
            return
        fin.seek(0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        while chunk := fin.read(1 << 20):
            write_all(fd, chunk)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]

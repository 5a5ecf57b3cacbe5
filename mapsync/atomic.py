"""The one atomic-write helper: temp file in the same directory, fsync, rename, fsync the dir.

Every file mapsync writes that someone else may read (LATEST, manifests, state, keys,
Prometheus textfiles) goes through :func:`atomic_write`; no second implementation. Every
directory that appears whole (a published release, an agent's kept release, its live set)
goes through :func:`commit_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mapsync import signals


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


def remove_tree(
    path: Path | str, *, ignore_errors: bool = False, dir_fd: int | None = None
) -> None:
    """Remove the directory ``path`` and everything below it, with SIGTERM, SIGHUP and ^C
    held until it is done (then handled): a signal never leaves a tree half removed (a
    staging directory, an old release without its signature). ``ignore_errors`` and
    ``dir_fd`` as for :func:`shutil.rmtree`. Every tree mapsync removes goes through here."""
    with signals.held():
        shutil.rmtree(path, ignore_errors=ignore_errors, dir_fd=dir_fd)


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new private directory ``parent/<prefix>XXXX``, removed whole on leaving (see
    :func:`remove_tree`); a signal as it is made leaves none behind."""
    path: Path | None = None
    try:
        with signals.held():
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        yield path
    finally:
        if path is not None:
            remove_tree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block ends cleanly.

    On any error the temporary file is removed and ``path`` is untouched. ``durable=False``
    skips both fsyncs: readers still see the old or the new bytes, but after a crash the file
    may be the old one or, on a filesystem that does not flush a file renamed over another
    (XFS; ext4 mounted ``noauto_da_alloc``), empty. Only for a file whose loss costs nothing.
    """
    path = Path(path)
    tmp: Path | None = None
    fh: BinaryIO | None = None
    try:
        with signals.held():  # a signal between the file's making and its naming: none left
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmp = Path(tmp_name)
            fh = os.fdopen(fd, "wb")
        with fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fh is not None:
            fh.close()  # closed already unless the signal held above came at the block's end
        if tmp is not None:
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


class SourceChanged(OSError):
    """A file :class:`HashedOutput` copied from was written to meanwhile."""


class HashedOutput:
    """A file written front to back and hashed as it goes (sha256 and size): new bytes
    (:meth:`write`), or a range of another open file (:meth:`copy`), which is copied in the
    kernel (copy_file_range) where ``out`` is a file: a patched map of a hundred megabytes is
    nearly all unchanged ranges of the old one, and this machine's page cache takes them from
    the kernel several times faster than from this process's buffers (docs/benchmarks.md).
    ``out`` with no file descriptor (a BytesIO), or a file system or kernel that refuses the
    copy: the bytes are written as given. Small writes are gathered a megabyte at a time.

    The caller owns ``out``: anything it buffered is flushed first, nothing is left in it."""

    GATHER = 1 << 20

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._fd: int | None = None
        with contextlib.suppress(OSError, ValueError):  # io.UnsupportedOperation: no fd
            out.flush()
            self._fd = out.fileno()
        self._hash = hashlib.sha256()
        self.size = 0
        self._gathered: list[bytes | bytearray] = []
        self._gathered_size = 0
        self._pending: tuple[int, int, int] | None = None  # (fd, offset, length) to copy
        self._sources: dict[int, tuple[int, int, int, int]] = {}  # fd -> its stat, first seen

    def write(self, data: bytes | bytearray) -> None:
        """Append ``data`` (held until written: never changed by the caller after)."""
        if not data:
            return
        self._copy_pending()
        self._hash.update(data)
        self.size += len(data)
        self._gathered.append(data)
        self._gathered_size += len(data)
        if self._gathered_size >= self.GATHER:
            self._flush_gathered()

    def watch(self, fd: int) -> None:
        """Note the open file ``fd`` as it is before a byte of it is read: a file copied from
        that is written to from here on makes :meth:`finish` raise :class:`SourceChanged`.
        Call it before reading what :meth:`copy` will be given."""
        if fd not in self._sources:
            self._sources[fd] = _identity(fd)

    def copy(self, fd: int, offset: int, data: bytes | memoryview) -> None:
        """Append the bytes of the open file ``fd`` (given to :meth:`watch` before it was read) at
        ``offset``, which are ``data`` (read by the caller, hashed here): copied from ``fd``
        where the kernel can, adjacent ranges in one call."""
        length = memoryview(data).nbytes
        if not length:
            return
        self.watch(fd)  # a caller that did not: from here on, at least
        if self._fd is None:
            self.write(bytes(data))
            return
        self._hash.update(data)
        self.size += length
        self._flush_gathered()
        pending = self._pending
        if pending is not None and pending[0] == fd and pending[1] + pending[2] == offset:
            self._pending = (fd, pending[1], pending[2] + length)
            return
        self._copy_pending()
        self._pending = (fd, offset, length)

    def finish(self) -> tuple[str, int]:
        """Write what is left; the sha256 (hex) and size of everything appended.
        :class:`SourceChanged` if a file copied from was changed meanwhile (what was copied
        may then not be what was hashed)."""
        self._copy_pending()
        self._flush_gathered()
        for fd, seen in self._sources.items():
            if _identity(fd) != seen:
                raise SourceChanged(f"a file copied from changed while it was copied (fd {fd})")
        return self._hash.hexdigest(), self.size

    def _flush_gathered(self) -> None:
        if not self._gathered:
            return
        data = b"".join(self._gathered)
        self._gathered.clear()
        self._gathered_size = 0
        if self._fd is None:
            self._out.write(data)
        else:
            write_all(self._fd, data)

    def _copy_pending(self) -> None:
        if self._pending is None:
            return
        src, offset, length = self._pending
        self._pending = None
        assert self._fd is not None
        done = 0
        with contextlib.suppress(OSError):  # EXDEV, ENOSYS, EINVAL: written from here below
            while done < length:
                n = os.copy_file_range(src, self._fd, length - done, offset + done)
                if n == 0:  # the source ended early: what is left, read and written below
                    break
                done += n
        while done < length:
            chunk = os.pread(src, min(self.GATHER, length - done), offset + done)
            if not chunk:
                raise SourceChanged(
                    f"a file copied from shrank while copied (at byte {offset + done})"
                )
            write_all(self._fd, chunk)
            done += len(chunk)


def _identity(fd: int) -> tuple[int, int, int, int]:
    """What a write to the open file ``fd`` changes: inode, size, mtime and ctime."""
    st = os.fstat(fd)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

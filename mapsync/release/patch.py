"""Patches between two releases' text of one map (docs/release-format.md, "Patches").

A patch turns the text map of serial ``from`` into the one of the release that names it, byte
for byte. It is a line script, streamed in one pass over the old file::

    mapsync-patch 1
    =N          copy the old file's next N lines
    -LINE       the old file's next line is LINE: drop it
    +LINE       write LINE

ending with the ``=`` that copies the old file's last lines, after which the old file must be
at its end. The publisher writes it from a merge walk over the two sorted files
(:func:`make_patch`); the agent applies it (:func:`apply_patch`) and trusts the result only if
its sha256 and size are the signed manifest's. Parsing is strict: an unknown line, a NUL or
CR, a line over :data:`MAX_LINE` bytes, a removal of a line the old file does not have there,
an added line out of key order, a ``#`` line outside the header or a header line that is not
the format's: each is a :class:`~mapsync.errors.VerificationError` naming the patch file and
line.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mapsync.atomic import HashedOutput, SourceChanged
from mapsync.errors import VerificationError

MAGIC = b"mapsync-patch 1\n"
MAX_LINE = 64 * 1024  # bytes of one map line in a patch (a longer one: no patch is written)
CHUNK = 1 << 20
COMPARE_BLOCK = 1 << 16  # bytes compared at once where old and new text agree


@dataclass(frozen=True)
class Change:
    """A body line a patch removes (``removed``) or adds (``added``, before the old file's
    line ``following``; None: after its last), as :func:`apply_patch` met it."""

    removed: bytes | None
    added: bytes | None = None
    following: bytes | None = None


class NoPatch(Exception):
    """The two files cannot be patched one into the other (unsorted, a huge line)."""


def _key(line: bytes, sep: bytes) -> bytes:
    return line.split(sep, 1)[0]


def _is_header(line: bytes) -> bool:
    return line.startswith(b"#")


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap | bytes]:
    """The bytes of ``path``, mapped (not read into this process's memory)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield data


def _line(data: mmap.mmap | bytes, pos: int) -> bytes | None:
    """The line of ``data`` starting at ``pos`` (with its newline); None at the end."""
    if pos >= len(data):
        return None
    return data[pos : data.find(b"\n", pos) + 1]


def _common(a: mmap.mmap | bytes, i: int, b: mmap.mmap | bytes, j: int) -> int:
    """How many bytes ``a`` from ``i`` and ``b`` from ``j`` have in common: compared a block
    at a time (memcmp speed), the first differing block halved down to the byte."""
    n = min(len(a) - i, len(b) - j)
    k = 0
    while k < n:
        size = min(COMPARE_BLOCK, n - k)
        if a[i + k : i + k + size] == b[j + k : j + k + size]:
            k += size
            continue
        lo, hi = k, k + size  # they differ first somewhere in [lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a[i + lo : i + mid] == b[j + lo : j + mid]:
                lo = mid
            else:
                hi = mid
        return lo
    return n


def _count_lines(data: mmap.mmap | bytes, start: int, end: int) -> int:
    return sum(data[pos : min(pos + CHUNK, end)].count(b"\n") for pos in range(start, end, CHUNK))


@dataclass(frozen=True)
class KeyCounts:
    """How many keys of a text map's body a patch adds, removes, and gives another value."""

    added: int
    removed: int
    changed: int


def make_patch(old: Path, new: Path, out: BinaryIO, sep: bytes = b" ") -> KeyCounts:
    """Write to ``out`` the patch from text map ``old`` to ``new`` (both sorted by key, split
    at ``sep``, under ``#`` header lines), reading each once; return the keys it adds,
    removes and changes. :class:`NoPatch` when the files are not what a patch can express."""
    out.write(MAGIC)
    same = 0
    keys = {b"+": 0, b"-": 0, b"~": 0}  # body keys added, removed, changed

    def flush() -> None:
        nonlocal same
        if same:
            out.write(b"=%d\n" % same)
            same = 0

    def emit(op: bytes, line: bytes) -> None:
        if len(line) > MAX_LINE or b"\0" in line or b"\r" in line:
            raise NoPatch(f"a line of {len(line)} bytes, or with NUL or CR")
        flush()
        out.write(op + line)

    with _mapped(old) as a, _mapped(new) as b:
        for data, where in ((a, old), (b, new)):
            if data and data[-1:] != b"\n":
                raise NoPatch(f"{where}: last line has no newline")
        i = j = 0  # where the next line of each file starts
        x, y = _line(a, i), _line(b, j)
        # The header: the leading '#' lines, compared in place.
        while x is not None and _is_header(x) and y is not None and _is_header(y):
            if x == y:
                same += 1
            else:
                emit(b"-", x)
                emit(b"+", y)
            i, j = i + len(x), j + len(y)
            x, y = _line(a, i), _line(b, j)
        while x is not None and _is_header(x):
            emit(b"-", x)
            i += len(x)
            x = _line(a, i)
        while y is not None and _is_header(y):
            emit(b"+", y)
            j += len(y)
            y = _line(b, j)
        prev: bytes | None = None  # the last body line of the new file written
        added = False  # prev was added: the next line copied must sort after it
        while True:
            if x == y:  # the common case first: a line both files have at this place
                if x is None:
                    break
                if added:
                    if _key(x, sep) <= _key(prev, sep):  # type: ignore[arg-type]
                        raise NoPatch("lines are not sorted by key")
                    added = False
                # ... and every line after it that both have: skipped at memcmp speed
                end = a.rfind(b"\n", i, i + _common(a, i, b, j)) + 1
                same += _count_lines(a, i, end)
                prev = a[max(a.rfind(b"\n", i, end - 1) + 1, i) : end]
                i, j = end, j + (end - i)
                x, y = _line(a, i), _line(b, j)
                continue
            if (x is not None and _is_header(x)) or (y is not None and _is_header(y)):
                raise NoPatch("a '#' line after the header")
            kx = _key(x, sep) if x is not None else None
            ky = _key(y, sep) if y is not None else None
            if ky is None or (kx is not None and kx < ky):
                assert x is not None
                emit(b"-", x)
                keys[b"-"] += 1
                i += len(x)
                x = _line(a, i)
                continue
            assert y is not None
            if prev is not None and ky <= _key(prev, sep):
                raise NoPatch("lines are not sorted by key")
            if kx == ky:
                assert x is not None
                emit(b"-", x)  # a changed entry: its old line out, its new line in
                keys[b"~"] += 1
                i += len(x)
                x = _line(a, i)
            else:
                keys[b"+"] += 1
            emit(b"+", y)
            prev, added = y, True
            j += len(y)
            y = _line(b, j)
        # The closing '=' (possibly =0) says where the old file ends.
        out.write(b"=%d\n" % same)
    return KeyCounts(keys[b"+"], keys[b"-"], keys[b"~"])


def _bad(where: str, number: int, why: str) -> VerificationError:
    return VerificationError(f"{where}: line {number}: {why}")


class _Lines:
    """The old file of a patch, read a megabyte at a time: lines one by one, or many at once
    as whole blocks (a copy of a million lines is a few hundred block operations, not a
    million line objects)."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._buf = b""
        self._pos = 0
        self._base = 0  # the file offset of _buf[0]

    def _fill(self) -> bool:
        """Read the next block after what is left unread; False at the end of the file."""
        chunk = self._fh.read(CHUNK)
        if not chunk:
            return False
        self._base += self._pos
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def readline(self) -> bytes:
        """The next line (the last one may lack its newline); b"" at the end."""
        while True:
            end = self._buf.find(b"\n", self._pos)
            if end >= 0:
                line = self._buf[self._pos : end + 1]
                self._pos = end + 1
                return line
            if not self._fill():
                line = self._buf[self._pos :]
                self._pos = len(self._buf)
                return line

    def peekline(self) -> bytes:
        """The next line, left to be read."""
        line = self.readline()
        self._pos -= len(line)  # the line lies whole in the buffer just before _pos
        return line

    def take(self, n: int) -> Iterator[tuple[int, bytes]]:
        """The next ``n`` lines (each ending in a newline), in blocks, each with its offset
        in the file; EOFError if the file has fewer."""
        while n:
            count = self._buf.count(b"\n", self._pos)
            if count > n:
                end = self._pos
                for _ in range(n):
                    end = self._buf.index(b"\n", end) + 1
                count = n
            else:
                end = self._buf.rfind(b"\n") + 1
            if count:
                block = self._buf[self._pos : end]
                at = self._base + self._pos
                self._pos = end
                n -= count
                yield at, block
            if n and not self._fill():
                raise EOFError


def apply_patch(
    old: Path,
    patch: Path,
    out: BinaryIO,
    where: str,
    sep: bytes = b" ",
    changes: list[Change] | None = None,
    keep: int | None = None,
) -> tuple[str, int]:
    """Write ``old`` patched with ``patch`` to ``out``, streaming; return the sha256 and size
    of what was written. ``where`` names the patch in messages (VerificationError with the
    patch's line number). ``changes``, when given, gets each body line the patch removes or
    adds, in order (what an agent changes its cdb in place with: formats.cdbpatch); past
    ``keep`` of them, one more and no others (memory bounded: the caller then knows there
    were more than it would use)."""
    limit = sys.maxsize if keep is None else keep
    # The old file's runs of copied lines go from file to file in the kernel (HashedOutput).
    sink = HashedOutput(out)
    write = sink.write

    in_header = True  # only '#' lines written so far
    prev: bytes | None = None  # the last body line written
    check_next = False  # the next copied line must sort after an added one
    with open(old, "rb") as old_file, open(patch, "rb") as fp:
        old_fd = old_file.fileno()
        sink.watch(old_fd)  # before the first read: a write to it from here on is refused
        fo = _Lines(old_file)
        first = fp.readline(len(MAGIC) + 1)
        if first != MAGIC:
            raise _bad(where, 1, f"not a mapsync patch (expected {MAGIC!r})")
        number = 1
        last = b""  # the last operation: a patch ends with a copy
        while True:
            op = fp.readline(MAX_LINE + 2)
            if not op:
                break
            number += 1
            if not op.endswith(b"\n"):
                raise _bad(
                    where, number, f"longer than {MAX_LINE} bytes or without a final newline"
                )
            if b"\0" in op or b"\r" in op:
                raise _bad(where, number, "contains a NUL or CR")
            kind, line = op[:1], op[1:]
            last = kind
            if kind == b"=":
                digits = line[:-1]
                if (
                    not digits.isdigit()
                    or len(digits) > 18
                    or (digits[:1] == b"0" and digits != b"0")
                ):
                    raise _bad(where, number, f"bad copy count {digits[:40]!r}")
                remaining = int(digits)
                while remaining and (in_header or check_next):  # line by line, briefly
                    got = fo.readline()
                    if not got:
                        raise _bad(where, number, "copies past the end of the old file")
                    if _is_header(got):
                        if not in_header:
                            raise _bad(where, number, "copies a '#' line after the header")
                    else:
                        if check_next and prev is not None and _key(got, sep) <= _key(prev, sep):
                            raise _bad(where, number, "an added line is out of key order")
                        check_next = in_header = False
                        prev = got
                    write(got)
                    remaining -= 1
                if remaining:  # the bulk: whole blocks of body lines
                    # Not scanned for '#' lines: they come from the old file, and the result
                    # must have the manifest's sha256, whose text has none in its body.
                    try:
                        for at, data in fo.take(remaining):
                            sink.copy(old_fd, at, data)
                            prev = data[data.rfind(b"\n", 0, len(data) - 1) + 1 :]
                    except EOFError:
                        raise _bad(where, number, "copies past the end of the old file") from None
                continue
            if kind == b"-":
                got = fo.readline()
                if got != line:
                    raise _bad(
                        where, number, "removes a line the old file does not have at that place"
                    )
                if changes is not None and len(changes) <= limit and not _is_header(line):
                    changes.append(Change(line, None))
                continue
            if kind == b"+":
                if _is_header(line):
                    if not in_header:
                        raise _bad(where, number, "adds a '#' line after the header")
                    if (
                        not line.startswith(b"# ")
                        or not line[:-1].isascii()
                        or not line[:-1].decode().isprintable()
                    ):
                        raise _bad(where, number, "a header line that is not the text format's")
                else:
                    if line == b"\n":
                        raise _bad(where, number, "an empty map line")
                    try:
                        line.decode()
                    except UnicodeDecodeError:
                        raise _bad(where, number, "not UTF-8") from None
                    if prev is not None and _key(line, sep) <= _key(prev, sep):
                        raise _bad(where, number, "an added line is out of key order")
                    in_header = False
                    prev = line
                    check_next = True
                    if changes is not None and len(changes) <= limit:
                        # The old line the added one goes before (None: at the end).
                        changes.append(Change(None, line, fo.peekline() or None))
                write(line)
                continue
            raise _bad(where, number, f"unknown operation {kind!r}")
        if last != b"=":
            raise _bad(where, number, "the patch does not end with its closing copy")
        if fo.readline():
            raise _bad(where, number, "the old file goes on after the patch's end")
        try:
            return sink.finish()
        except SourceChanged:
            raise VerificationError(f"{where}: the old file changed while it was read") from None

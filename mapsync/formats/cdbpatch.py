"""A cdb changed in place of rebuilt: the bytes a full build of the changed pairs gives,
made from the previous cdb and the few changed pairs.

A cdb (as cdbx, tinycdb and ``postmap`` write it) is a 2048-byte header of 256 (position,
slots) pairs, the records ``klen vlen key value`` in the order they were added (here: the
text map's, sorted by key), then 256 hash tables of (hash, position) slots, table ``i``
holding the keys whose hash ends in byte ``i``, ``2n`` slots for ``n`` keys, each key at the
first free slot from ``(hash >> 8) % 2n`` in the order the keys were added. So a change of a
few records leaves every table whose key set it does not touch slot for slot as it was, with
the positions after the changed records moved by the same amounts (one vectorised pass); only
the tables that gain or lose a key are laid out anew, in record order (a few thousand slots
each at millions of keys). The records are copied around the changed ones.

The long-running publisher's incremental runs change the cdb they hold in memory
(:func:`patch_cdb`, from :mod:`mapsync.formats.splice`); an agent whose text came from a
patch changes the live cdb file into a new one a megabyte at a time (:func:`patch_cdb_file`,
the edits from :func:`edits_from_changes`) and proves it by the manifest's sha256 like a cdb
it built.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mapsync.formats.cdb import ODD_STARTS
from mapsync.release.patch import Change

if TYPE_CHECKING:
    import numpy as np

HEADER = 2048
CHUNK = 1 << 20  # bytes read, moved and written at a time from a file
_PAIR = struct.Struct("<II")


class NotPatchable(Exception):
    """The old cdb is not one this module can change (not laid out as a cdb writer lays it
    out, or not holding a record the change takes out): build the cdb whole instead."""


def cdb_hash(key: bytes) -> int:
    """The cdb hash (djb2 with xor) of ``key``."""
    h = 5381
    for c in key:
        h = (((h << 5) + h) ^ c) & 0xFFFFFFFF
    return h


@dataclass(frozen=True)
class Edit:
    """One key's change: ``old`` value (None: new key), ``new`` value (None: removed), and
    for a new key the key it goes before in the old cdb (None: after the last)."""

    key: bytes
    old: bytes | None
    new: bytes | None
    before: bytes | None = None


def edits_from_changes(changes: Iterable[Change], sep: bytes) -> list[Edit]:
    """The edits of a text map's cdb that the body lines a patch removed and added
    (:func:`mapsync.release.patch.apply_patch`, in order) make: a key removed and added
    again is one changed value. :class:`NotPatchable` for a line the cdb does not hold as
    a pair (blank, a comment: see :func:`mapsync.formats.cdb.build_text`)."""
    edits: list[Edit] = []
    for change in changes:
        line = change.removed if change.removed is not None else change.added
        assert line is not None
        if line[:1] in ODD_STARTS or not line.endswith(b"\n"):
            raise NotPatchable(f"line {line[:100]!r} is not a pair of the cdb")
        key, _, value = line[:-1].partition(sep)
        last = edits[-1] if edits and edits[-1].key == key else None
        if change.removed is not None:
            if last is not None and last.old is None and last.new is not None:
                edits[-1] = Edit(key, value, last.new)
            else:
                edits.append(Edit(key, value, None))
            continue
        if last is not None and last.new is None and last.old is not None:
            edits[-1] = Edit(key, last.old, value)
            continue
        following = change.following
        before = following[:-1].partition(sep)[0] if following is not None else None
        edits.append(Edit(key, None, value, before))
    return edits


class _Old:
    """The old cdb, read a range at a time: from memory (a view, no copy) or from an open
    file (``os.pread``: an agent patches a cdb without holding it)."""

    def __init__(self, data: bytes | None = None, fd: int | None = None) -> None:
        self._view = memoryview(data) if data is not None else None
        self._fd = fd
        self.size = len(data) if data is not None else os.fstat(fd).st_size  # type: ignore[arg-type]

    def read(self, pos: int, n: int) -> bytes | memoryview:
        if self._view is not None:
            return self._view[pos : pos + n]
        assert self._fd is not None
        got = os.pread(self._fd, n, pos)
        if len(got) != n:
            raise NotPatchable(f"the old cdb changed while read ({len(got)} of {n} bytes at {pos})")
        return got

    def ranges(self, start: int, end: int) -> Iterator[bytes | memoryview]:
        """Bytes ``start`` to ``end``: one view in memory, a megabyte at a time from a file."""
        if self._view is not None:
            yield self._view[start:end]
            return
        while start < end:
            n = min(CHUNK, end - start)
            yield self.read(start, n)
            start += n


def _find(old: _Old, header: np.ndarray, key: bytes) -> int:
    """The position of ``key``'s record in ``old``; :class:`NotPatchable` if none."""
    h = cdb_hash(key)
    tpos, slots = (int(x) for x in header[h & 255])
    if slots:
        start = (h >> 8) % slots
        for k in range(slots):
            hh, pos = _PAIR.unpack(old.read(tpos + ((start + k) % slots) * 8, 8))
            if pos == 0:
                break
            if hh == h:
                klen, _ = _PAIR.unpack(old.read(pos, 8))
                if bytes(old.read(pos + 8, klen)) == key:
                    return int(pos)
    raise NotPatchable(f"key {key[:100]!r} is not in the old cdb")


def _layout(hashes: list[int], positions: list[int]) -> list[int]:
    """One hash table of the entries (``hashes``, ``positions``), in record order: ``2n``
    slots, flattened (hash, position, hash, position, ...)."""
    size = 2 * len(hashes)
    table = [0] * (2 * size)
    for h, pos in zip(hashes, positions, strict=True):
        i = (h >> 8) % size
        while table[2 * i + 1]:
            i = (i + 1) % size
        table[2 * i] = h
        table[2 * i + 1] = pos
    return table


def patch_cdb(old: bytes, edits: Sequence[Edit]) -> bytes:
    """The cdb of ``old``'s pairs with ``edits`` (sorted by key, as the records are) applied:
    byte for byte what a writer adding the new pairs in key order makes."""
    out: list[bytes | memoryview] = []
    _patch(_Old(data=old), edits, out.append)
    return b"".join(out)


def patch_cdb_file(old: Path, edits: Sequence[Edit], new: Path) -> tuple[str, int]:
    """:func:`patch_cdb` from file ``old`` into the existing, empty file ``new``, a megabyte
    at a time (bounded memory: an agent's cdbs are tens of megabytes); the sha256 and size
    of what was written."""
    digest = hashlib.sha256()
    size = 0
    with open(old, "rb") as fin, open(new, "r+b") as fout:

        def write(data: bytes | memoryview) -> None:
            nonlocal size
            digest.update(data)
            fout.write(data)
            size += len(data)

        _patch(_Old(fd=fin.fileno()), edits, write)
    return digest.hexdigest(), size


def _patch(old: _Old, edits: Sequence[Edit], write: Callable[[bytes | memoryview], object]) -> None:
    """Write the patched cdb of :func:`patch_cdb` through ``write``, in order."""
    import numpy as np  # here: a publish or pull that changes no cdb in place never loads it

    if old.size < HEADER:
        raise NotPatchable("shorter than a cdb header")
    header = np.frombuffer(bytes(old.read(0, HEADER)), dtype="<u4").reshape(256, 2)
    end = int(header[0, 0])  # the records end where the first table begins
    sizes = header[:, 1].astype(np.int64) * 8
    expected = end + np.concatenate(([0], np.cumsum(sizes)[:-1]))
    if (header[:, 0].astype(np.int64) != expected).any() or end + int(sizes.sum()) != old.size:
        raise NotPatchable("tables are not laid out one after the other after the records")

    parts: list[tuple[int, int] | bytes] = []  # old ranges and new records, in order
    done = HEADER  # old bytes taken up to here
    offset = HEADER  # new bytes up to here
    bounds: list[int] = []  # old positions from which ...
    deltas: list[int] = []  # ... records move by this much more
    removed: set[int] = set()
    added: list[tuple[int, int]] = []  # (hash, new position)
    touched: set[int] = set()  # tables that gain or lose a key
    for edit in edits:
        if edit.old is not None:
            at = _find(old, header, edit.key)
            klen, vlen = _PAIR.unpack(old.read(at, 8))
            if bytes(old.read(at + 8 + klen, vlen)) != edit.old:
                raise NotPatchable(f"key {edit.key[:100]!r} has another value in the old cdb")
            length = 8 + klen + vlen
        else:
            at = end if edit.before is None else _find(old, header, edit.before)
            length = 0
        if at < done:
            raise NotPatchable("edits are not in the records' order")
        parts.append((done, at))
        offset += at - done
        record = b""
        if edit.new is not None:
            record = _PAIR.pack(len(edit.key), len(edit.new)) + edit.key + edit.new
            parts.append(record)
            if edit.old is None:
                h = cdb_hash(edit.key)
                added.append((h, offset))
                touched.add(h & 255)
            offset += len(record)
        elif edit.old is not None:
            removed.add(at)
            touched.add(cdb_hash(edit.key) & 255)
        done = at + length
        # A new record moves the one it goes before; a changed or removed one only those after.
        bounds.append(at if edit.old is None else at + 1)
        deltas.append(len(record) - length)
    parts.append((done, end))
    new_end = offset + (end - done)
    if new_end >= 1 << 32:
        raise NotPatchable("over 4 GB: not a 32-bit cdb")
    cuts = np.asarray(bounds, dtype=np.int64)
    shifts = np.concatenate(([0], np.cumsum(deltas))).astype(np.int64)

    def moved(slots: np.ndarray) -> np.ndarray:
        """``slots`` (hash, position) with each position moved as the records moved."""
        positions = slots[:, 1].astype(np.int64)
        new_positions = np.where(
            positions != 0, positions + shifts[np.searchsorted(cuts, positions, side="right")], 0
        )
        if len(new_positions) and int(new_positions.max()) >= 1 << 32:
            raise NotPatchable("over 4 GB: not a 32-bit cdb")
        out = np.empty_like(slots)
        out[:, 0] = slots[:, 0]
        out[:, 1] = new_positions
        return out

    def table(first: int, count: int) -> np.ndarray:
        data = old.read(end + first * 8, count * 8)
        return np.frombuffer(data, dtype="<u4").reshape(-1, 2)

    # The tables that gain or lose a key, laid out anew in record order (a few thousand
    # slots each at millions of keys); every other table is its old slots, moved.
    counts = header[:, 1].astype(np.int64)
    firsts = (header[:, 0].astype(np.int64) - end) // 8
    gone = np.fromiter(removed, dtype=np.int64) if removed else None
    relaid: dict[int, bytes] = {}
    for i in sorted(touched):
        own = table(int(firsts[i]), int(counts[i]))
        keep = own[:, 1] != 0
        if gone is not None:
            keep &= ~np.isin(own[:, 1].astype(np.int64), gone)
        kept = moved(own[keep])
        mine = [(h, p) for h, p in added if h & 255 == i]
        hashes = np.concatenate((kept[:, 0], np.array([h for h, _ in mine], dtype="<u4")))
        positions = np.concatenate((kept[:, 1], np.array([p for _, p in mine], dtype="<u4")))
        order = np.argsort(positions, kind="stable")  # record order: positions are distinct
        slots = _layout(hashes[order].tolist(), positions[order].tolist())
        relaid[i] = np.array(slots, dtype="<u4").tobytes()
        counts[i] = len(slots) // 2
    if new_end + 8 * int(counts.sum()) >= 1 << 32:
        raise NotPatchable("over 4 GB: not a 32-bit cdb")
    new_header = np.empty((256, 2), dtype="<u4")
    new_header[:, 0] = new_end + 8 * np.concatenate(([0], np.cumsum(counts)[:-1]))
    new_header[:, 1] = counts

    write(new_header.tobytes())
    for part in parts:
        if isinstance(part, bytes):
            write(part)
        else:
            for piece in old.ranges(*part):
                write(piece)
    run = 0  # first old slot of the current run of untouched tables

    def untouched(stop: int) -> None:
        """The old slots from ``run`` to ``stop``, moved, a megabyte at a time."""
        nonlocal run
        while run < stop:
            n = min(stop - run, CHUNK // 8)
            write(moved(table(run, n)).tobytes())
            run += n

    for i in sorted(touched):
        untouched(int(firsts[i]))
        write(relaid[i])
        run = int(firsts[i]) + int(header[i, 1])
    untouched((old.size - end) // 8)

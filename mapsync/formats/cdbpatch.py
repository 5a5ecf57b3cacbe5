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

import functools
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mapsync.atomic import HashedOutput
from mapsync.formats.text import ODD_STARTS
from mapsync.release.patch import Change

if TYPE_CHECKING:
    import numpy as np

HEADER = 2048
CHUNK = 1 << 20  # bytes read, moved and written at a time from a file (patch_cdb_file)
_IN_PLACE = 16  # edits up to which positions are moved one edit at a time, in place
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


def _layout(hashes: list[int], positions: list[int]) -> np.ndarray:
    """One hash table of the keys ``hashes`` at ``positions``, in record (position) order:
    ``2n`` (hash, position) slots."""
    import numpy as np

    size = 2 * len(hashes)
    table_h = [0] * size
    table_p = [0] * size
    for h, pos in zip(hashes, positions, strict=True):
        i = (h >> 8) % size
        while table_p[i]:
            i += 1
            if i == size:
                i = 0
        table_h[i] = h
        table_p[i] = pos
    table = np.empty((size, 2), dtype="<u4")
    table[:, 0] = table_h
    table[:, 1] = table_p
    return table


def buffer(
    size: int, spare: memoryview | None = None, old: object = None, fault_in: bool = False
) -> memoryview:
    """A writable buffer of ``size`` bytes for a cdb: ``spare``'s memory (a buffer made here
    that its holder no longer needs) when it has room and is not ``old``'s, else a new one
    with room for the map to grow. The memory is numpy's, which asks the kernel for huge
    pages for it (a fraction of the page faults of a bytes object of that size); a spare
    one has had them already: at 1M accounts, faulting in the two MX cdbs anew cost from
    0.03 s to 0.3 s per change, as the host's memory allowed. ``fault_in``: a new buffer's
    memory is faulted in now (written once), not where it is first used."""
    import numpy as np

    base = spare.obj if spare is not None else None
    if (
        isinstance(base, np.ndarray)
        and base.dtype == np.uint8
        and base.ndim == 1
        and base.flags.writeable
        and base.flags.c_contiguous
        and base.size >= size
        and (old is None or not np.may_share_memory(base, np.frombuffer(old, dtype=np.uint8)))
    ):
        return base.data[:size]
    made = np.empty(size + size // 64 + 4096, dtype=np.uint8)
    if fault_in:
        made.fill(0)
    return made.data[:size]


Read = Callable[[int, int], "bytes | memoryview"]  # (position, length) of the old cdb


def _find(read: Read, header: np.ndarray, key: bytes) -> int:
    """The position of ``key``'s record in the old cdb ``read`` reads; :class:`NotPatchable`
    if none."""
    h = cdb_hash(key)
    tpos, slots = (int(x) for x in header[h & 255])
    if slots:
        start = (h >> 8) % slots
        for k in range(slots):
            hh, pos = _PAIR.unpack(read(tpos + ((start + k) % slots) * 8, 8))
            if pos == 0:
                break
            if hh == h:
                klen, _ = _PAIR.unpack(read(pos, 8))
                if klen == len(key) and read(pos + 8, klen) == key:
                    return int(pos)
    raise NotPatchable(f"key {key[:100]!r} is not in the old cdb")


@dataclass
class _Plan:
    """What ``edits`` do to an old cdb, worked out from a few reads of it: the new records as
    old ranges and changed records (``parts``), the old positions from which records move by
    how much more (``bounds``, ``deltas``), the records removed and added, the tables that
    gain or lose a key, laid out anew (``laid``), and the new header's slot counts."""

    header: np.ndarray
    end: int  # where the old records end
    new_end: int
    parts: list[tuple[int, int] | bytes]
    bounds: list[int]
    deltas: list[int]
    counts: np.ndarray
    laid: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The new cdb's size."""
        return self.new_end + 8 * int(self.counts.sum())

    @functools.cached_property
    def firsts(self) -> np.ndarray:
        """The old tables' first slots (int64), counted from where the records end."""
        import numpy as np

        return (self.header[:, 0].astype(np.int64) - self.end) // 8

    def new_header(self) -> np.ndarray:
        """The new cdb's header: 256 (table position, slots), little-endian uint32."""
        import numpy as np

        made = np.empty((256, 2), dtype="<u4")
        made[:, 0] = self.new_end + 8 * np.concatenate(([0], np.cumsum(self.counts)[:-1]))
        made[:, 1] = self.counts
        return made

    @functools.cached_property
    def shifts(self) -> tuple[np.ndarray, np.ndarray]:
        """(bounds, moves): an old record at or after ``bounds[k]`` (and before the next)
        moves by ``moves[k + 1]`` bytes; one before the first, by ``moves[0]`` (0)."""
        import numpy as np

        moves = np.concatenate(([0], np.cumsum(np.asarray(self.deltas, dtype=np.int64))))
        return np.asarray(self.bounds, dtype=np.int64), moves

    def shift_slots(self, wide: np.ndarray) -> None:
        """Move the positions of old slots in place: ``wide`` holds each slot as one
        little-endian 64-bit number, position << 32 | hash, so "position at or after b" is
        "slot >= b << 32", and adding d << 32 (mod 2**64) adds d to the position; an empty
        slot (0) never moves. Whole-array arithmetic at memory speed; a masked add (where=)
        on the positions alone took four times as long."""
        import numpy as np

        bounds, deltas = self.bounds, self.deltas
        if len(bounds) <= _IN_PLACE and self.end + sum(d for d in deltas if d > 0) < 1 << 32:
            # Last edit first: a position moved by the later edits is still at or after an
            # earlier edit's bound exactly when it was before (the records keep their order).
            for bound, delta in zip(reversed(bounds), reversed(deltas), strict=True):
                if delta:
                    step = np.uint64((delta % (1 << 32)) << 32)  # a negative one wraps
                    wide += (wide >= np.uint64(bound << 32)) * step
        else:
            edges, cum = self.shifts
            shifts = (cum % (1 << 32)).astype(np.uint64) << np.uint64(32)
            wide += shifts[np.searchsorted(edges.astype(np.uint64) << np.uint64(32), wide, "right")]

    def moved(self, positions: np.ndarray) -> np.ndarray:
        """Old records' ``positions`` (int64, none 0) where the records lie after the edits."""
        import numpy as np

        edges, cum = self.shifts
        shifted: np.ndarray = positions + cum[np.searchsorted(edges, positions, side="right")]
        return shifted


def _plan(read: Read, size: int, edits: Sequence[Edit]) -> _Plan:
    """:class:`_Plan` of ``edits`` on the old cdb of ``size`` bytes that ``read`` reads;
    :class:`NotPatchable` when it is not laid out as a cdb writer lays it out, or does not
    hold what the edits take out."""
    import numpy as np  # here: a publish or pull that changes no cdb in place never loads it

    if size < HEADER:
        raise NotPatchable("shorter than a cdb header")
    header = np.frombuffer(bytes(read(0, HEADER)), dtype="<u4").reshape(256, 2)
    end = int(header[0, 0])  # the records end where the first table begins
    sizes = header[:, 1].astype(np.int64) * 8
    expected = end + np.concatenate(([0], np.cumsum(sizes)[:-1]))
    if (header[:, 0].astype(np.int64) != expected).any() or end + int(sizes.sum()) != size:
        raise NotPatchable("tables are not laid out one after the other after the records")

    parts: list[tuple[int, int] | bytes] = []
    done = HEADER  # old bytes taken up to here
    offset = HEADER  # new bytes up to here
    bounds: list[int] = []
    deltas: list[int] = []
    removed: set[int] = set()
    added: list[tuple[int, int]] = []  # (hash, new position)
    touched: set[int] = set()
    for edit in edits:
        if edit.old is not None:
            at = _find(read, header, edit.key)
            klen, vlen = _PAIR.unpack(read(at, 8))
            if read(at + 8 + klen, vlen) != edit.old:
                raise NotPatchable(f"key {edit.key[:100]!r} has another value in the old cdb")
            length = 8 + klen + vlen
        else:
            at = end if edit.before is None else _find(read, header, edit.before)
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
    plan = _Plan(
        header, end, offset + (end - done), parts, bounds, deltas, header[:, 1].astype(np.int64)
    )

    # The touched tables, laid out anew: their keys' new positions, in record order.
    firsts = plan.firsts
    gone = np.fromiter(removed, dtype=np.int64) if removed else None
    for i in sorted(touched):
        first, count = int(firsts[i]), int(header[i, 1])
        own = np.frombuffer(bytes(read(end + 8 * first, 8 * count)), dtype="<u4").reshape(-1, 2)
        positions = own[:, 1].astype(np.int64)
        keep = positions != 0
        if gone is not None:
            keep &= ~np.isin(positions, gone)
        moved = plan.moved(positions[keep])
        new = [(h, p) for h, p in added if h & 255 == i]
        hashes = np.concatenate((own[keep, 0], np.array([h for h, _ in new], dtype=np.int64)))
        where = np.concatenate((moved, np.array([p for _, p in new], dtype=np.int64)))
        order = np.argsort(where, kind="stable")
        plan.laid[i] = _layout(hashes[order].tolist(), where[order].tolist())
        plan.counts[i] = len(plan.laid[i])
    if plan.total >= 1 << 32:
        raise NotPatchable("over 4 GB: not a 32-bit cdb")
    return plan


def patch_cdb(
    old: bytes | memoryview, edits: Sequence[Edit], spare: memoryview | None = None
) -> memoryview:
    """The cdb of ``old``'s pairs with ``edits`` (sorted by key, as the records are) applied:
    byte for byte what a writer adding the new pairs in key order makes.

    Written once into one buffer: the records copied around the changed ones, the tables
    copied as they lie and their positions moved in place (those at or after a changed
    record: whole-array arithmetic over the slots, a few passes per edit), the tables that
    gain or lose a key laid out anew over their place. The buffer is :func:`buffer`'s (``spare``'s
    where it can be), seen as a memoryview: hashed, written or changed again as bytes are."""
    import numpy as np

    view = memoryview(old).cast("B")  # slices without copies; compared as bytes
    plan = _plan(lambda pos, n: view[pos : pos + n], len(old), edits)
    header, end, new_end, total = plan.header, plan.end, plan.new_end, plan.total
    firsts = plan.firsts
    laid = plan.laid

    into = buffer(total, spare, old)  # every byte is written below
    out = np.frombuffer(into, dtype=np.uint8)
    new_header = out[:HEADER].view("<u4").reshape(256, 2)
    new_header[:] = plan.new_header()
    at = HEADER
    for part in plan.parts:
        piece = view[part[0] : part[1]] if isinstance(part, tuple) else part
        into[at : at + len(piece)] = piece
        at += len(piece)
    # The tables: runs of untouched ones copied as they are (their positions moved below),
    # each touched one left for its new layout (written last: what the loop below does to
    # the bytes there does not matter).
    new_firsts = (new_header[:, 0].astype(np.int64) - new_end) // 8
    run = 0  # first old slot of the current run of untouched tables
    for i in sorted(laid):
        src, dst = end + 8 * run, new_end + 8 * (int(new_firsts[i]) - (int(firsts[i]) - run))
        into[dst : dst + 8 * (int(firsts[i]) - run)] = view[src : end + 8 * int(firsts[i])]
        run = int(firsts[i]) + int(header[i, 1])
    tail = len(old) - (end + 8 * run)
    into[total - tail : total] = view[end + 8 * run :]
    plan.shift_slots(out[new_end:total].view("<u8"))
    tables = out[new_end:total].view("<u4").reshape(-1, 2)
    for i, table in laid.items():
        first = int(new_firsts[i])
        tables[first : first + len(table)] = table
    return into


class _Old:
    """An old cdb file, read a range at a time (``os.pread``): an agent changes its cdb
    without holding it in memory."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size

    def read(self, pos: int, n: int) -> bytes:
        if pos + n > self.size:  # a length read from a damaged file: no 4 GB buffer for it
            raise NotPatchable(f"a read past the end of the old cdb ({n} bytes at {pos})")
        got = os.pread(self._fd, n, pos)
        if len(got) != n:
            raise NotPatchable(f"the old cdb changed while read ({len(got)} of {n} bytes at {pos})")
        return got

    def read_into(self, pos: int, n: int) -> bytearray:
        """:meth:`read` into a new, writable buffer."""
        if pos + n > self.size:
            raise NotPatchable(f"a read past the end of the old cdb ({n} bytes at {pos})")
        got = bytearray(n)
        if os.preadv(self._fd, [got], pos) != n:
            raise NotPatchable(f"the old cdb changed while read (fewer than {n} bytes at {pos})")
        return got


def patch_cdb_file(old: Path, edits: Sequence[Edit], new: Path) -> tuple[str, int]:
    """:func:`patch_cdb` from file ``old`` into the existing, empty file ``new``, a megabyte
    at a time (bounded memory: an agent's cdbs are tens of megabytes, its budget 64 MB); the
    sha256 and size of what was written."""
    import numpy as np

    with open(old, "rb") as fin, open(new, "r+b") as fout:
        # The records around the changed ones go from file to file in the kernel.
        sink = HashedOutput(fout)
        sink.watch(fin.fileno())  # before the first read: a write to it from here on is refused
        write = sink.write
        src = _Old(fin.fileno())
        plan = _plan(src.read, src.size, edits)
        end, header = plan.end, plan.header
        write(plan.new_header().tobytes())
        for part in plan.parts:
            if isinstance(part, bytes):
                write(part)
                continue
            for start in range(part[0], part[1], CHUNK):
                sink.copy(fin.fileno(), start, src.read(start, min(CHUNK, part[1] - start)))
        firsts = plan.firsts
        run = 0  # first old slot of the current run of untouched tables

        def untouched(stop: int) -> None:
            """The old slots from ``run`` to ``stop``, positions moved, a megabyte at a time."""
            nonlocal run
            while run < stop:
                n = min(stop - run, CHUNK // 8)
                slots = src.read_into(end + 8 * run, 8 * n)
                plan.shift_slots(np.frombuffer(slots, dtype="<u8"))
                write(slots)
                run += n

        for i in sorted(plan.laid):
            untouched(int(firsts[i]))
            write(plan.laid[i].tobytes())
            run = int(firsts[i]) + int(header[i, 1])
        untouched((src.size - end) // 8)
        return sink.finish()

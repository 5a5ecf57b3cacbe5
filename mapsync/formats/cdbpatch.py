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

Only the publisher's incremental runs use it (:mod:`mapsync.formats.splice`); agents build
their cdb from the text as ever and prove it equal to the hash this gives.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

HEADER = 2048
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


def _find(data: memoryview, header: np.ndarray, key: bytes) -> int:
    """The position of ``key``'s record in ``data``; :class:`NotPatchable` if none."""
    h = cdb_hash(key)
    tpos, slots = (int(x) for x in header[h & 255])
    if slots:
        start = (h >> 8) % slots
        for k in range(slots):
            slot = tpos + ((start + k) % slots) * 8
            hh, pos = _PAIR.unpack_from(data, slot)
            if pos == 0:
                break
            if hh == h:
                klen, _ = _PAIR.unpack_from(data, pos)
                if data[pos + 8 : pos + 8 + klen] == key:
                    return int(pos)
    raise NotPatchable(f"key {key[:100]!r} is not in the old cdb")


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
    import numpy as np  # here: a publish that changes no cdb in place never loads it

    if len(old) < HEADER:
        raise NotPatchable("shorter than a cdb header")
    header = np.frombuffer(old, dtype="<u4", count=512).reshape(256, 2)
    end = int(header[0, 0])  # the records end where the first table begins
    sizes = header[:, 1].astype(np.int64) * 8
    expected = end + np.concatenate(([0], np.cumsum(sizes)[:-1]))
    if (header[:, 0].astype(np.int64) != expected).any() or end + int(sizes.sum()) != len(old):
        raise NotPatchable("tables are not laid out one after the other after the records")

    view = memoryview(old).cast("B")  # slices without copies; compared as bytes
    parts: list[bytes | memoryview] = []  # the new records: runs of old ones, changed ones
    done = HEADER  # old bytes copied up to here
    offset = HEADER  # new bytes written up to here
    bounds: list[int] = []  # old positions from which ...
    deltas: list[int] = []  # ... records move by this much more
    removed: set[int] = set()
    added: list[tuple[int, int]] = []  # (hash, new position)
    touched: set[int] = set()  # tables that gain or lose a key
    for edit in edits:
        if edit.old is not None:
            at = _find(view, header, edit.key)
            klen, vlen = _PAIR.unpack_from(view, at)
            if view[at + 8 + klen : at + 8 + klen + vlen] != edit.old:
                raise NotPatchable(f"key {edit.key[:100]!r} has another value in the old cdb")
            length = 8 + klen + vlen
        else:
            at = end if edit.before is None else _find(view, header, edit.before)
            length = 0
        if at < done:
            raise NotPatchable("edits are not in the records' order")
        parts.append(view[done:at])
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
    parts.append(view[done:end])
    new_end = offset + (end - done)
    cum = np.concatenate(([0], np.cumsum(np.asarray(deltas, dtype=np.int64))))
    edges = np.asarray(bounds, dtype=np.int64)

    # The touched tables, laid out anew: their keys' new positions, in record order.
    slots = np.frombuffer(old, dtype="<u4", offset=end).reshape(-1, 2)
    counts = header[:, 1].astype(np.int64)
    firsts = (header[:, 0].astype(np.int64) - end) // 8
    laid: dict[int, np.ndarray] = {}
    for i in sorted(touched):
        first, count = int(firsts[i]), int(counts[i])
        own = slots[first : first + count]
        positions = own[:, 1].astype(np.int64)
        keep = positions != 0
        if removed:
            keep &= ~np.isin(positions, np.fromiter(removed, dtype=np.int64))
        moved = positions + cum[np.searchsorted(edges, positions, side="right")]
        new = [(h, p) for h, p in added if h & 255 == i]
        hashes = np.concatenate((own[keep, 0], np.array([h for h, _ in new], dtype=np.int64)))
        where = np.concatenate((moved[keep], np.array([p for _, p in new], dtype=np.int64)))
        order = np.argsort(where, kind="stable")
        laid[i] = _layout(hashes[order].tolist(), where[order].tolist())
        counts[i] = len(laid[i])
    total = new_end + 8 * int(counts.sum())
    if total >= 1 << 32:
        raise NotPatchable("over 4 GB: not a 32-bit cdb")

    into = buffer(total, spare, old)  # every byte is written below
    out = np.frombuffer(into, dtype=np.uint8)
    new_header = out[:HEADER].view("<u4").reshape(256, 2)
    new_header[:, 0] = new_end + 8 * np.concatenate(([0], np.cumsum(counts)[:-1]))
    new_header[:, 1] = counts
    at = HEADER
    for part in parts:
        into[at : at + len(part)] = part
        at += len(part)
    # The tables: runs of untouched ones copied as they are (their positions moved below),
    # each touched one left for its new layout (written last: what the loop below does to
    # the bytes there does not matter).
    new_firsts = (new_header[:, 0].astype(np.int64) - new_end) // 8
    run = 0  # first old slot of the current run of untouched tables
    for i in sorted(touched):
        src, dst = end + 8 * run, new_end + 8 * (int(new_firsts[i]) - (int(firsts[i]) - run))
        into[dst : dst + 8 * (int(firsts[i]) - run)] = view[src : end + 8 * int(firsts[i])]
        run = int(firsts[i]) + int(header[i, 1])
    tail = len(old) - (end + 8 * run)
    into[total - tail : total] = view[end + 8 * run :]
    # Each slot as one little-endian 64-bit number, position << 32 | hash: "position at or
    # after b" is "slot >= b << 32", and adding d << 32 (mod 2**64) adds d to the position.
    # Whole-array arithmetic on these runs at memory speed; a masked add (where=) on the
    # positions alone took four times as long.
    wide = out[new_end:total].view("<u8")
    if len(bounds) <= _IN_PLACE and end + int(sum(d for d in deltas if d > 0)) < 1 << 32:
        # Last edit first: a position moved by the later edits is still at or after an
        # earlier edit's bound exactly when it was before (the records keep their order).
        for bound, delta in zip(reversed(bounds), reversed(deltas), strict=True):
            if delta:
                step = np.uint64((delta % (1 << 32)) << 32)  # a negative one wraps
                wide += (wide >= np.uint64(bound << 32)) * step
    else:
        shifts = (cum % (1 << 32)).astype(np.uint64) << np.uint64(32)
        wide += shifts[np.searchsorted(edges.astype(np.uint64) << np.uint64(32), wide, "right")]
    tables = out[new_end:total].view("<u4").reshape(-1, 2)
    for i, table in laid.items():
        first = int(new_firsts[i])
        tables[first : first + len(table)] = table
    return into

"""A text map changed in place of re-rendered: the previous release's text with a few lines
taken out and put in, found by binary search (the lines are sorted by key), written with the
patch that says the same (:mod:`mapsync.release.patch`), and the cdb built from the result.

The incremental publisher (:mod:`mapsync.publish.incremental`) knows which entries changed;
this module turns that into the release's files at the cost of copying the old text once,
never parsing it line by line.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mapsync.formats.cdb import Maker
from mapsync.formats.cdbpatch import Edit, NotPatchable, patch_cdb
from mapsync.formats.mapfile import CdbFile, lines
from mapsync.formats.text import TextInfo, read_whole
from mapsync.release.patch import MAGIC, MAX_LINE


class Mismatch(Exception):
    """The previous text does not hold the lines the change takes out (it is not what the
    incremental state rendered): the publisher renders the whole map instead."""


@dataclass(frozen=True)
class Change:
    """One key's lines: ``old`` (None: the key is new) and ``new`` (None: it goes), each a
    whole text line with its newline, as bytes."""

    key: bytes
    old: bytes | None
    new: bytes | None


def changes(old: dict[str, str], new: dict[str, str], map_name: str, sep: str) -> list[Change]:
    """The :class:`Change` of every key whose entry differs between ``old`` and ``new``
    (key → value), sorted by key; the new lines checked as the renderer checks every line
    (:func:`mapsync.formats.mapfile.lines`: a key that would not parse back is refused)."""
    keys = sorted({k for k in old.keys() | new.keys() if old.get(k) != new.get(k)})
    added = [(k, new[k]) for k in keys if k in new]
    checked = iter(lines(added, map_name, sep))
    out = []
    for key in keys:
        before = f"{key}{sep}{old[key]}\n".encode() if key in old else None
        after = next(checked).encode() if key in new else None
        out.append(Change(key.encode(), before, after))
    return out


def _value(line: bytes | None, key: bytes) -> bytes | None:
    """The value of text line ``line`` (key, separator, value, newline)."""
    return None if line is None else line[len(key) + 1 : -1]


def _read(path: Path, into: bytearray | None) -> bytes | bytearray:
    """The bytes of ``path``; read into ``into`` (resized to the file) where given: memory
    the caller keeps from one change to the next, its pages faulted in already (a new bytes
    object of the text's size, 50 MB at 1M accounts, costs more in page faults than the
    read itself)."""
    if into is None:
        return path.read_bytes()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            if len(into) > size:
                del into[size:]
            elif len(into) < size:
                into.extend(bytes(size - len(into)))
        except BufferError:  # a view of it is still held somewhere: no reuse this time
            return path.read_bytes()
        with memoryview(into) as view:
            read_whole(fh, view, path)
    return into


def _header_end(data: bytes | bytearray) -> int:
    pos = 0
    while data.startswith(b"#", pos):
        pos = data.index(b"\n", pos) + 1
    return pos


def _locate(data: bytes | bytearray, lo: int, key: bytes, sep: bytes) -> int:
    """The offset of the first line at or after ``lo`` (a line start) whose key is not below
    ``key``: a binary search over byte offsets, each probe one line."""
    hi = len(data)
    while lo < hi:
        mid = (lo + hi) // 2
        nl = data.rfind(b"\n", lo, mid)
        start = lo if nl < 0 else nl + 1
        end = data.index(b"\n", start) + 1
        cut = data.find(sep, start, end - 1)
        probe = data[start : cut if cut >= 0 else end - 1]
        if probe < key:
            lo = end
        else:
            hi = start
    return lo


def _copied(
    data: bytes | bytearray, runs: list[tuple[int, int]], total: int, old: Path
) -> list[int]:
    """The lines of each of ``runs`` (offsets of whole lines in ``data``), which hold
    ``total`` lines between them: each counted but the longest, whose lines are what the
    others leave of ``total`` (with one change, at most half the text is counted, a quarter
    on average, where counting it all cost 0.03 s per change at 1M accounts).
    :class:`Mismatch` if that cannot be (the manifest's count is not the text's)."""
    longest = max(range(len(runs)), key=lambda i: runs[i][1] - runs[i][0])
    lines = [0 if i == longest else data.count(b"\n", a, b) for i, (a, b) in enumerate(runs)]
    rest = total - sum(lines)
    start, end = runs[longest]
    if not (0 < rest <= end - start if start < end else rest == 0):
        raise Mismatch(f"{old}: its entries do not add up to the count in its manifest")
    lines[longest] = rest
    return lines


@dataclass(frozen=True)
class Spliced:
    """What :func:`splice` wrote: the text's manifest facts, the cdb's, the patch's size;
    ``cdb_data``: the cdb's bytes, which its sha256 is of (the caller keeps them for the
    next change instead of reading a file back and hashing it again)."""

    text: TextInfo
    cdb: CdbFile | None
    added: int
    removed: int
    changed: int
    cdb_data: memoryview | None = field(default=None, repr=False, compare=False)


def splice(
    old: Path,
    entries_before: int,
    head: str,
    delta: Iterable[Change],
    out: Path,
    sep: str,
    patch: Path | None,
    cdb_path: Path | None,
    old_cdb: bytes | memoryview | None = None,
    spare_cdb: memoryview | None = None,
    text_buffer: bytearray | None = None,
) -> Spliced:
    """Write ``out``: the text map ``old`` (``entries_before`` entries) under the header
    ``head`` instead of its own, with ``delta`` applied; and, given ``patch``, the patch from
    ``old`` to ``out``; given ``cdb_path``, the cdb of ``out``: ``old_cdb`` (the cdb of
    ``old``) changed in place in memory where given and it can be
    (:mod:`mapsync.formats.cdbpatch`, into ``spare_cdb``'s memory where it can be; no file
    is written: its bytes are in :attr:`Spliced.cdb_data`), else built whole at
    ``cdb_path``. ``text_buffer``: memory to read ``old`` into (:func:`_read`).
    :class:`Mismatch` when ``old`` does not hold a line ``delta`` takes out, or holds a key
    it adds."""
    data = _read(old, text_buffer)
    view = memoryview(data)  # the unchanged runs, written and hashed where they lie
    bsep = sep.encode()
    body_at = _header_end(data)
    pieces: list[bytes | memoryview] = []
    # The patch's operations; a run of copied lines as (lines known, the old body's unchanged
    # runs it spans), counted at the end (see _copied).
    ops: list[bytes | tuple[int, list[int]]] = [MAGIC]
    runs: list[tuple[int, int]] = []  # the old body's unchanged runs: (start, end) offsets
    copy = 0  # lines known to be copied since the last operation ...
    spans: list[int] = []  # ... and the runs copied since (each a line or more if not empty)

    def emit(op: bytes) -> None:
        nonlocal copy, spans
        if copy or any(runs[i][0] < runs[i][1] for i in spans):
            ops.append((copy, spans))
            copy, spans = 0, []
        ops.append(op)

    def unchanged(start: int, end: int) -> None:
        runs.append((start, end))
        spans.append(len(runs) - 1)

    old_head = bytes(data[:body_at]).splitlines(keepends=True)
    new_head = head.encode().splitlines(keepends=True)
    for i in range(max(len(old_head), len(new_head))):
        a = old_head[i] if i < len(old_head) else None
        b = new_head[i] if i < len(new_head) else None
        if a == b:
            copy += 1
            continue
        if a is not None:
            emit(b"-" + a)
        if b is not None:
            emit(b"+" + b)
    pieces_head = head.encode()
    pieces.append(pieces_head)
    pos = body_at
    added = removed = changed = 0
    edits: list[Edit] = []  # the same change, as the cdb sees it
    for change in delta:
        at = _locate(data, pos, change.key, bsep)
        before = None
        if change.old is None and at < len(data):  # the key the new one goes before
            cut = data.find(bsep, at, data.find(b"\n", at))
            before = bytes(data[at : cut if cut >= 0 else data.find(b"\n", at)])
        edits.append(
            Edit(change.key, _value(change.old, change.key), _value(change.new, change.key), before)
        )
        unchanged(pos, at)
        pieces.append(view[pos:at])
        pos = at
        end = data.find(b"\n", at) + 1 if at < len(data) else at
        line = bytes(data[at:end])
        present = bool(line) and (line.startswith(change.key + bsep) or line == change.key + b"\n")
        if change.old is not None:
            if line != change.old:
                # Keys only: a value may be a password hash (dovecot_users), and this
                # message goes to the log.
                if not line:
                    found = "the end of the map"
                elif present:
                    found = "another value"
                else:
                    other = line.split(bsep, 1)[0].removesuffix(b"\n")
                    found = f"key {other[:200]!r}"
                raise Mismatch(
                    f"{old}: expected key {change.key[:200]!r} with the value the incremental "
                    f"state holds at {at}, found {found}"
                )
            emit(b"-" + line)
            pos = end
        elif present:
            raise Mismatch(f"{old}: key {change.key[:200]!r} is there already")
        if change.new is not None:
            if len(change.new) > MAX_LINE:
                patch = None  # a patch cannot carry it: the agent takes the text
            pieces.append(change.new)
            emit(b"+" + change.new)
        if change.old is None:
            added += 1
        elif change.new is None:
            removed += 1
        else:
            changed += 1
    unchanged(pos, len(data))
    pieces.append(view[pos:])
    ops.append((copy, spans))
    # The new text is never joined: its pieces (the unchanged runs are views of the old
    # text) are hashed and written as they are: two copies of the text fewer (joined, then
    # the header sliced off for its content hash), and as much less peak memory.
    whole, content = hashlib.sha256(), hashlib.sha256()
    whole.update(pieces_head)
    for piece in pieces[1:]:
        whole.update(piece)
        content.update(piece)
    info = TextInfo(
        entries_before + added - removed,
        whole.hexdigest(),
        sum(len(piece) for piece in pieces),
        content.hexdigest(),
    )
    with open(out, "wb") as fh:
        fh.writelines(pieces)
    if patch is not None:
        lines = _copied(data, runs, entries_before - removed - changed, old)
        patch.write_bytes(
            b"".join(
                op if isinstance(op, bytes) else b"=%d\n" % (op[0] + sum(lines[i] for i in op[1]))
                for op in ops
            )
        )
    built = None
    made = None
    if cdb_path is not None:
        if old_cdb is not None:
            try:
                made = patch_cdb(old_cdb, edits, spare_cdb)
            except NotPatchable:
                made = None  # built whole below
        if made is not None:
            built = CdbFile(cdb_path.name, hashlib.sha256(made).hexdigest(), len(made))
        else:
            body = b"".join(pieces[1:])
            with Maker(cdb_path) as maker:
                start = 0
                while start < len(body):  # a megabyte at a time: bounded memory for the split
                    end = body.find(b"\n", start + (1 << 20)) + 1 or len(body)
                    maker.add_lines(body[start:end], bsep)
                    start = end
                digest, made = maker.commit_held()
            built = CdbFile(cdb_path.name, digest, len(made))
    del pieces, view  # the views first: then the old text can go
    return Spliced(info, built, added, removed, changed, made)

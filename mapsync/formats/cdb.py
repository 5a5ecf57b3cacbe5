"""cdb files, written with cdbx (the only module that imports it).

cdb output is deterministic: the same pairs in the same order give the same bytes (cdbx,
tinycdb ``cdb -c -m``, ``postmap cdb:`` and pure-cdb agree), which is how an agent proves the
cdb it built locally is the publisher's. Keys are lowercase with no trailing NUL, as Postfix's
``postmap`` writes them; 32-bit cdb only (Postfix silently cannot read 64-bit files).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable
from functools import partial
from itertools import starmap
from operator import methodcaller
from pathlib import Path

import cdbx

from mapsync.formats.text import ODD_STARTS, read_whole, sha256_file
from mapsync.progress import track


class Maker:
    """A cdb being built at ``path``: pairs added in order, then :meth:`commit`.

    A context manager: leaving it without a commit closes the maker, and cdbx deletes the
    half-written file. ``path`` must be in a directory nobody reads yet: cdbx truncates it.
    """

    def __init__(self, path: Path) -> None:
        self._maker = cdbx.CDB.make(str(path))
        self.path = path

    def __enter__(self) -> Maker:
        return self

    def __exit__(self, *exc: object) -> None:
        self._maker.close()

    def add(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Add ``pairs`` (key, value) in order."""
        deque(starmap(self._maker.add, pairs), maxlen=0)  # the loop runs in C

    def add_lines(self, block: bytes, sep: bytes = b" ") -> None:
        """Add the pairs of ``block``: text-map lines (``key SEP value``, each ending in a
        newline, keys free of ``SEP``), split at C speed. The publisher hands it the bytes it
        has just written to the text map: one encode serves both files."""
        if block.count(sep) == block.count(b"\n"):
            # Every line has a separator, so this says each has exactly one (no value holds
            # it): the block splits at once into key, value, key, ... (a split per line costs
            # twice as much as everything else of building the cdb).
            parts = block.replace(b"\n", sep).split(sep)
            parts.pop()  # after the last newline
            pairs = iter(parts)
            deque(map(self._maker.add, pairs, pairs), maxlen=0)
            return
        lines = block.split(b"\n")
        lines.pop()  # after the last newline
        deque(starmap(self._maker.add, map(methodcaller("split", sep, 1), lines)), maxlen=0)

    def commit(self) -> tuple[str, int]:
        """Finish the file; its sha256 and size."""
        self._maker.commit().close()
        return sha256_file(self.path)

    def commit_held(self) -> tuple[str, memoryview]:
        """Finish the file; its sha256 and its bytes (:func:`load`), which that hash is of."""
        self._maker.commit().close()
        data = load(self.path)
        return hashlib.sha256(data).hexdigest(), data


def load(path: Path) -> memoryview:
    """The bytes of ``path`` in a buffer of :func:`mapsync.formats.cdbpatch.buffer`'s, for
    the long-running publisher to hold and change in place."""
    from mapsync.formats.cdbpatch import buffer

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = buffer(size)
        read_whole(fh, data, path)
    return data


# A block where no line starts with one of text.ODD_STARTS holds only lines of the form the
# fast path reads.
_ODD_AFTER_NEWLINE = tuple(b"\n" + bytes([c]) for c in ODD_STARTS)
CHUNK = 1 << 20


def _plain(block: bytes) -> bool:
    """Whether no line of ``block`` starts as one :func:`_pairs` skips. A substring search
    per start (memchr speed), not one regular expression: an agent scans every text map it
    builds, and the expression took half the build (0.76 s of 1.5 s for 1M accounts)."""
    if block[:1] and block[:1] in ODD_STARTS:
        return False
    return not any(odd in block for odd in _ODD_AFTER_NEWLINE)


def build_text(
    path: Path, text_map: Path, sep: bytes = b" ", stage: str | None = None
) -> tuple[str, int]:
    """The cdb of the text map ``text_map`` at ``path`` (see :func:`build`): the pairs of
    :func:`mapsync.formats.text.pairs`, read a block at a time and split at C speed where
    every line of the block is a plain ``key SEP value`` (an agent builds millions);
    ``stage``: its progress stage (in blocks)."""
    with Maker(path) as maker, open(text_map, "rb") as fh:
        rest = b""
        first = True
        blocks = iter(partial(fh.read, CHUNK), b"")
        total = os.fstat(fh.fileno()).st_size // CHUNK + 1
        for chunk in track(blocks, stage, total) if stage else blocks:
            block = rest + chunk
            cut = block.rfind(b"\n") + 1
            block, rest = block[:cut], block[cut:]
            if first:  # the header
                while block.startswith(b"#") and b"\n" in block:
                    block = block[block.index(b"\n") + 1 :]
                first = False
            if _plain(block) and block.count(sep) == block.count(b"\n"):
                maker.add_lines(block, sep)
            else:
                maker.add(_pairs(block, sep))
        maker.add(_pairs(rest + b"\n", sep) if rest else ())
        return maker.commit()


def _pairs(block: bytes, sep: bytes) -> Iterable[tuple[bytes, bytes]]:
    """As :func:`mapsync.formats.text.pairs`, of lines in memory."""
    for line in block.split(b"\n")[:-1]:
        if not line.strip() or line.startswith(b"#"):
            continue
        key, _, value = line.partition(sep)
        yield key, value


def build(path: Path, pairs: Iterable[tuple[bytes, bytes]]) -> tuple[str, int]:
    """Stream ``pairs`` into a new cdb at ``path``; return its sha256 and size.

    ``path`` must be in a directory nobody reads yet: cdbx truncates it at once, and deletes it
    if anything fails half-way.
    """
    with Maker(path) as maker:
        maker.add(pairs)
        return maker.commit()

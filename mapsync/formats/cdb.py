"""cdb files, written with cdbx (the only module that imports it).

cdb output is deterministic: the same pairs in the same order give the same bytes (cdbx,
tinycdb ``cdb -c -m``, ``postmap cdb:`` and pure-cdb agree), which is how an agent proves the
cdb it built locally is the publisher's. Keys are lowercase with no trailing NUL, as Postfix's
``postmap`` writes them; 32-bit cdb only (Postfix silently cannot read 64-bit files).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import starmap
from operator import methodcaller
from pathlib import Path

import cdbx

from mapsync.formats.text import sha256_file


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
        lines = block.split(b"\n")
        lines.pop()  # after the last newline
        deque(starmap(self._maker.add, map(methodcaller("split", sep, 1), lines)), maxlen=0)

    def commit(self) -> tuple[str, int]:
        """Finish the file; its sha256 and size."""
        self._maker.commit().close()
        return sha256_file(self.path)


def build(path: Path, pairs: Iterable[tuple[bytes, bytes]]) -> tuple[str, int]:
    """Stream ``pairs`` into a new cdb at ``path``; return its sha256 and size.

    ``path`` must be in a directory nobody reads yet: cdbx truncates it at once, and deletes it
    if anything fails half-way.
    """
    with Maker(path) as maker:
        maker.add(pairs)
        return maker.commit()

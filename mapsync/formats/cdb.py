"""cdb files, written with cdbx (the only module that imports it).

cdb output is deterministic: the same pairs in the same order give the same bytes (cdbx,
tinycdb ``cdb -c -m``, ``postmap cdb:`` and pure-cdb agree), which is how an agent proves the
cdb it built locally is the publisher's. Keys are lowercase with no trailing NUL, as Postfix's
``postmap`` writes them; 32-bit cdb only (Postfix silently cannot read 64-bit files).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cdbx

from mapsync.formats.text import sha256_file


def build(path: Path, pairs: Iterable[tuple[bytes, bytes]]) -> tuple[str, int]:
    """Stream ``pairs`` into a new cdb at ``path``; return its sha256 and size.

    ``path`` must be in a directory nobody reads yet: cdbx truncates it at once, and deletes it
    if anything fails half-way.
    """
    maker = cdbx.CDB.make(str(path))
    try:
        add = maker.add
        for key, value in pairs:
            add(key, value)
        db = maker.commit()
        db.close()
    finally:
        maker.close()
    return sha256_file(path)


def get(path: Path, key: bytes) -> bytes | None:
    """Look ``key`` up in the cdb at ``path`` (used by ``verify`` and tests)."""
    db = cdbx.CDB(str(path))
    try:
        value = db.get(key)
        return value if value is None else bytes(value)
    finally:
        db.close()

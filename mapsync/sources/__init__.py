"""Sources read the central database into a :class:`~mapsync.snapshot.Snapshot`.

SQLAlchemy lives only here (and in ``schema``); nothing downstream imports it.
"""

from __future__ import annotations

from mapsync.sources.base import Source


def open_source(url: str, schema: str = "mapsync", *, hide_password: bool = True) -> Source:
    """The source for ``schema`` ("mapsync" = mapsync's own tables) at SQLAlchemy ``url``."""
    if schema == "mapsync":
        from mapsync.sources.builtin import BuiltinSource

        return BuiltinSource(url)
    raise ValueError(f"unknown schema {schema!r}")


__all__ = ["Source", "open_source"]

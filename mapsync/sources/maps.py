"""Reading the maps of the operator's own (``[publisher.maps.NAME]``).

A map's ``query`` returns exactly two columns, key then value (any names), read as they are;
:mod:`mapsync.maps.custom` checks them. A map without ``database`` is read by the publisher's
source inside its snapshot's read-only, repeatable-read transaction, so it describes the same
instant as the built-in maps; one with ``database`` by a
:class:`~mapsync.sources.mapdatabase.MapDatabase` of that URL, in
a read-only transaction of its own, under the same bounds (``lock_wait``,
``statement_timeout``) and with the URL's passwords redacted wherever it is shown.

What tells a change (the "nothing changed" check): a map's ``fingerprint`` query, whose rows
are hashed, else the map's own query, run and its rows hashed — never a guess that could
miss a change. In the snapshot the same is computed from the same transaction, so what the
publisher records describes the rows it published.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from mapsync.config import MapConfig
from mapsync.errors import SourceError
from mapsync.snapshot import Fingerprint, Snapshot

if TYPE_CHECKING:
    from mapsync.sources.builtin import BuiltinSource


def key(name: str) -> str:
    """The fingerprint entry of map ``name`` (no table of any schema has a ':' in its name)."""
    return f"map:{name}"


def _statement(query: str) -> Any:
    # Not a bind parameter anywhere: a value such as 'lmtp:unix:private/x' is SQL text, and
    # SQLAlchemy would take ':unix' for one. text() still doubles '%' for the drivers that need it.
    return text(query.replace(":", "\\:"))


def rows(conn: Connection, spec: MapConfig) -> list[tuple[Any, ...]]:
    """The rows of ``spec``'s query; SourceError unless it returns exactly two columns."""
    result = conn.execute(_statement(spec.query))
    columns = list(result.keys())
    if len(columns) != 2:
        result.close()
        raise SourceError(
            f"[publisher.maps.{spec.name}] query: returns {len(columns)} column(s) "
            f"({', '.join(map(str, columns)) or 'none'}); a map's query returns exactly two, "
            "the key and then the value"
        )
    return [tuple(row) for row in result]


def digest(found: Iterable[Sequence[Any]]) -> tuple[int, str]:
    """Row count and a hash of ``found``, whatever order the database returned it in."""
    lines = sorted(repr(tuple(row)) for row in found)
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "backslashreplace") + b"\n")
    return len(lines), h.hexdigest()


def fingerprint(
    conn: Connection, spec: MapConfig, read: list[tuple[Any, ...]] | None = None
) -> tuple[int, str]:
    """What tells a change in map ``spec``: its ``fingerprint`` query's rows, hashed; else
    its rows (``read``, when already read in this transaction), hashed."""
    if spec.fingerprint is not None:
        return digest(conn.execute(_statement(spec.fingerprint)))
    return digest(read if read is not None else rows(conn, spec))


def read_all(conn: Connection, source: BuiltinSource, snap: Snapshot) -> None:
    """Read every map of ``source.maps`` into ``snap`` (rows and fingerprint entries)."""
    found = dict(snap.fingerprint.tables)
    for spec in source.maps:
        try:
            got = rows(conn, spec)
            count, h = fingerprint(conn, spec, got)
        except SQLAlchemyError as exc:
            raise source._fail(f"[publisher.maps.{spec.name}] query", exc, hint=False) from None
        snap.map_rows[spec.name] = got
        found[key(spec.name)] = (count, h)
    snap.fingerprint = Fingerprint(found)


def fingerprints(conn: Connection, source: BuiltinSource) -> dict[str, tuple[int, str | None]]:
    """:meth:`Source.maps_fingerprint` of ``source``, in the transaction of ``conn``."""
    out: dict[str, tuple[int, str | None]] = {}
    for spec in source.maps:
        try:
            out[key(spec.name)] = fingerprint(conn, spec)
        except SQLAlchemyError as exc:
            what = f"[publisher.maps.{spec.name}] {'fingerprint' if spec.fingerprint else 'query'}"
            raise source._fail(what, exc, hint=False) from None
    return out

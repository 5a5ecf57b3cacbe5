"""The change fingerprint of mapsync's own schema in a SQLite file, read with the standard
library's ``sqlite3`` instead of SQLAlchemy, whose import is half of a ``mapsync publish``
that finds nothing changed (0.15 s of 0.3 at 1M accounts).

It is :func:`mapsync.sources.builtin._fingerprint` on SQLite: the same one-statement query
(each value one index lookup), the values as SQLAlchemy hands them over (a timestamp parsed
with ``datetime.fromisoformat`` and written back with ``str``), the same time bound for the
passed expiries (SQLAlchemy's SQLite storage format). tests/integration/test_quiet_publish.py
compares the two on one file. Whatever it cannot read exactly so (another URL form, a
database before the deletion log, a locked or missing file, a value that does not parse) is
None: the caller then takes the SQLAlchemy path, which reads it, or says what is wrong.
"""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from mapsync.snapshot import Fingerprint

# The tables of mapsync.sources.schema.TABLES, in its order, and its deletion log (a test
# holds them equal; SQLAlchemy is not imported here to ask it).
TABLES = ("customer", "mailstore", "domain", "account", "alias", "alias_target", "sender_grant")
DELETED = "mapsync_deleted"

_QUERY = "SELECT " + ", ".join(
    [
        *(f"(SELECT max({name}.updated_at) FROM {name})" for name in TABLES),
        "(SELECT max(alias.expires_at) FROM alias WHERE alias.expires_at <= ?)",
        f"(SELECT max({DELETED}.id) FROM {DELETED})",
    ]
)
# How SQLAlchemy's DateTime binds a datetime on SQLite (sqlalchemy.dialects.sqlite.DATETIME):
# the expiries are compared with it as text.
_STORAGE_FORMAT = (
    "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d"
)
# The URLs read here: a file named as SQLAlchemy's pysqlite dialect names it.
_PREFIXES = ("sqlite:///", "sqlite+pysqlite:///")
# At most this long waiting for a writer's lock (a database in rollback-journal mode; in WAL
# mode readers do not wait): then the SQLAlchemy path waits [publisher] lock_wait, as ever.
WAIT = 0.2


def sqlite_file(url: str) -> str | None:
    """The absolute path of the SQLite file a plain ``sqlite:///PATH`` URL names, resolved as
    SQLAlchemy resolves it; None for any other URL (another database or driver, in memory, a
    query string, a ``file:`` URI, a %-escape)."""
    path = next((url[len(p) :] for p in _PREFIXES if url.startswith(p)), "")
    if not path or path == ":memory:" or path.startswith("file:") or "?" in path or "%" in path:
        return None
    return os.path.abspath(path)


def _stamp(value: object) -> str | None:
    """A timestamp as SQLAlchemy's DateTime result on SQLite turns it into a string."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a timestamp: {value!r}")
    return str(datetime.fromisoformat(value))


def read_fingerprint(path: str, now: datetime | None = None) -> Fingerprint | None:
    """The fingerprint of the database in SQLite file ``path`` as :meth:`BuiltinSource.fingerprint`
    reads it (``now``: the time the passed expiries are bounded by, default the current UTC
    time), or None when only that can tell."""
    now = now or datetime.now(UTC).replace(tzinfo=None)
    bound = _STORAGE_FORMAT % {
        "year": now.year,
        "month": now.month,
        "day": now.day,
        "hour": now.hour,
        "minute": now.minute,
        "second": now.second,
        "microsecond": now.microsecond,
    }
    try:
        # mode=rw: opened as SQLAlchemy opens it (read-write, or read-only where the file is),
        # but never created.
        conn = sqlite3.connect(Path(path).as_uri() + "?mode=rw", timeout=WAIT, uri=True)
    except sqlite3.Error:
        return None
    try:
        if not conn.execute(f"PRAGMA main.table_info({DELETED})").fetchall():
            return None  # before the deletion log: counted, by the SQLAlchemy path
        row = conn.execute(_QUERY, (bound,)).fetchone()
        tables: dict[str, tuple[int, str | None]] = {
            name: (0, _stamp(value)) for name, value in zip(TABLES, row[: len(TABLES)], strict=True)
        }
        tables["alias_expired"] = (0, _stamp(row[len(TABLES)]))
        tables[DELETED] = (int(row[-1] or 0), None)
    except (sqlite3.Error, ValueError, TypeError):
        return None
    finally:
        conn.close()
    return Fingerprint(tables)

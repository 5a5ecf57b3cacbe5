"""The fingerprint of mapsync's own schema in a SQLite file, read with the standard library
(mapsync.sources.sqlite_fingerprint): the very values SQLAlchemy reads, or none at all."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine

from mapsync.sources import schema as t
from mapsync.sources.builtin import _fingerprint
from mapsync.sources.seed import init_db
from mapsync.sources.sqlite_fingerprint import (
    DELETED,
    TABLES,
    WAIT,
    read_fingerprint,
    sqlite_file,
)
from tests.helpers import writers
from tests.helpers.own_maps import run_sql

# --- the fingerprint: the standard library reads what SQLAlchemy reads ----------------------


def test_the_sqlite_fingerprint_reads_what_sqlalchemy_reads(sqlite_url: str) -> None:
    """After every kind of write, and at the instant an alias expires, both read the same
    values (a query or a conversion that differed would differ here)."""
    assert tuple(table.name for table in t.TABLES) == TABLES
    assert t.deleted.name == DELETED
    init_db(sqlite_url)
    run_sql(sqlite_url, *writers.BARE_INSERTS)
    path = sqlite_file(sqlite_url)
    assert path is not None
    engine = create_engine(sqlite_url)

    def both(now: datetime | None = None) -> dict[str, tuple[int, str | None]]:
        now = now or datetime.now(UTC).replace(tzinfo=None)
        with engine.connect() as conn:
            full = _fingerprint(conn, now)
        assert read_fingerprint(path, now) == full
        return full.tables

    try:
        first = both()
        assert first["account"][1] is not None  # not vacuous: stamps read
        run_sql(sqlite_url, "UPDATE account SET status = 'disabled'")  # the trigger's stamp
        assert both()["account"] != first["account"]
        run_sql(
            sqlite_url,
            "INSERT INTO alias_target (alias_id, target) SELECT id, 'x@y.example' FROM alias",
        )
        run_sql(sqlite_url, "DELETE FROM sender_grant")
        assert both()[DELETED][0] > first[DELETED][0]
        # Stamps another writer wrote otherwise: SQLAlchemy parses them, and so must this.
        run_sql(
            sqlite_url,
            "UPDATE customer SET updated_at = '2099-01-02T03:04:05'",
            "UPDATE domain SET updated_at = '2099-01-02 03:04:05.000000'",
        )
        stamps = both()
        assert stamps["customer"] == stamps["domain"] == (0, "2099-01-02 03:04:05")
        # An alias expires at the instant its expires_at is reached, not a microsecond later.
        run_sql(sqlite_url, "UPDATE alias SET expires_at = '2030-06-01 12:00:00.000000'")
        assert both(datetime(2030, 6, 1, 11, 59, 59, 999999))["alias_expired"] == (0, None)
        assert both(datetime(2030, 6, 1, 12))["alias_expired"] == (0, "2030-06-01 12:00:00")
        run_sql(sqlite_url, "UPDATE alias SET expires_at = '2030-06-01T12:00:00'")  # as text
        assert both(datetime(2030, 6, 1, 12))["alias_expired"] == (0, None)
        assert both(datetime(2030, 6, 2))["alias_expired"] == (0, "2030-06-01 12:00:00")
        run_sql(sqlite_url, "DELETE FROM alias_target", "DELETE FROM alias")
        gone = both(datetime(2030, 6, 2))
        assert gone["alias"] == gone["alias_expired"] == (0, None)
    finally:
        engine.dispose()


def test_what_the_sqlite_fingerprint_cannot_read_exactly_is_left_to_sqlalchemy(
    tmp_path: Path, sqlite_url: str
) -> None:
    assert sqlite_file("sqlite+pysqlite:////srv/db/central.db") == "/srv/db/central.db"
    assert sqlite_file("sqlite:///relative.db") == str(Path.cwd() / "relative.db")
    for url in (
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file:central.db?mode=ro&uri=true",
        "sqlite:////srv/db/central.db?timeout=5",
        "sqlite:////srv/db/central%20db",
        "sqlite+aiosqlite:////srv/db/central.db",
        "postgresql+psycopg://mapsync@db/mail",
    ):
        assert sqlite_file(url) is None, url

    missing = tmp_path / "missing.db"
    assert read_fingerprint(str(missing)) is None
    assert not missing.exists()  # never created
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    assert read_fingerprint(str(garbage)) is None

    init_db(sqlite_url)
    run_sql(sqlite_url, *writers.BARE_INSERTS)
    path = sqlite_file(sqlite_url)
    assert path is not None and read_fingerprint(path) is not None
    run_sql(sqlite_url, "UPDATE customer SET updated_at = 'yesterday'")
    assert read_fingerprint(path) is None  # not a timestamp SQLAlchemy reads

    # A writer holding the lock of a database in rollback-journal mode: not waited out here.
    run_sql(sqlite_url, "UPDATE customer SET updated_at = '2099-01-01 00:00:00.000000'")
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("PRAGMA journal_mode=DELETE")
        writer.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        assert read_fingerprint(path) is None
        assert time.monotonic() - started < WAIT + 2
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert read_fingerprint(path) is not None

    # A database whose init-db predates the deletion log: counted, by the SQLAlchemy path.
    run_sql(sqlite_url, *(f"DROP TRIGGER IF EXISTS {table}_deleted" for table in TABLES))
    run_sql(sqlite_url, f"DROP TABLE {DELETED}")
    assert read_fingerprint(path) is None

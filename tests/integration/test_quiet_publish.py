"""`mapsync publish` when nothing changed (run by a timer every minute or so) answers without
loading SQLAlchemy: for mapsync's own schema in a SQLite file it reads the fingerprint with the
standard library, and decides as the publisher decides (one decision, mapsync.publish.quiet).
It must read the very values SQLAlchemy reads, say and note what the publisher said and
noted, publish every change, and leave anything it is unsure of to the publisher."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
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
from tests.conftest import Cluster
from tests.helpers import writers
from tests.helpers.agent import add_account, delete_unreferenced_account, renew
from tests.helpers.config import publish_expiring
from tests.helpers.own_maps import run_sql
from tests.helpers.publisher import cli_loading

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


# --- the run: what the publisher said and noted, without SQLAlchemy ---------------------------


def _debug_fingerprint(stderr: str) -> list[str]:
    """The fingerprints of the "database unchanged" debug lines in ``stderr``."""
    return re.findall(r"database unchanged since the last releases .*fingerprint=(\S+)", stderr)


def test_a_nothing_changed_publish_loads_no_sqlalchemy_and_says_what_the_publisher_says(
    cluster: Cluster,
) -> None:
    assert "published serial 1" in cluster.publish().stdout
    note = cluster.repo / ".publisher.json"
    note.unlink()

    quiet, loaded = cli_loading(cluster, "-v", "publish")
    assert "sqlalchemy" not in loaded and "mapsync.publish.publisher" not in loaded
    assert quiet.stdout == "channel mx: unchanged (serial 1)\n"
    assert json.loads(note.read_text())["last_error"] is None  # noted for status --publisher
    assert json.loads(note.read_text())["last_success"]

    # The publisher's own path (a channel named takes it) says the same, with the same digest.
    full, loaded = cli_loading(cluster, "-v", "publish", "--channel", "mx")
    assert "sqlalchemy" in loaded  # premise
    assert full.stdout == quiet.stdout
    assert len(_debug_fingerprint(quiet.stderr)) == 1
    assert _debug_fingerprint(quiet.stderr) == _debug_fingerprint(full.stderr)
    assert "reading snapshot" not in full.stderr + quiet.stderr

    as_json, loaded = cli_loading(cluster, "publish", "--json")
    assert "sqlalchemy" not in loaded
    full_json, _ = cli_loading(cluster, "publish", "--json", "--channel", "mx")
    assert json.loads(as_json.stdout) == json.loads(full_json.stdout)
    assert json.loads(as_json.stdout)["channels"][0]["action"] == "none"


def test_every_change_after_quiet_runs_is_published(cluster: Cluster) -> None:
    cluster.publish()
    assert "sqlalchemy" not in cli_loading(cluster, "publish")[1]
    address = add_account(cluster, "after-quiet")
    proc, loaded = cli_loading(cluster, "publish")
    assert "channel mx: published serial 2" in proc.stdout
    assert "sqlalchemy" in loaded
    assert f"{address} OK" in (cluster.repo / "mx" / "releases" / "2" / "recipients").read_text()

    proc, loaded = cli_loading(cluster, "publish")
    assert proc.stdout == "channel mx: unchanged (serial 2)\n" and "sqlalchemy" not in loaded
    gone = delete_unreferenced_account(cluster)
    proc, _ = cli_loading(cluster, "publish")
    assert "channel mx: published serial 3" in proc.stdout
    assert f"{gone} OK" not in (cluster.repo / "mx" / "releases" / "3" / "recipients").read_text()


def _damage_latest(c: Cluster) -> None:
    (c.repo / "mx" / "LATEST").write_text("garbage")


def _damage_note(c: Cluster) -> None:
    (c.repo / ".private" / "mx" / "checked.json").write_text("garbage")


def _legacy_note(c: Cluster) -> None:
    (c.repo / "mx" / ".push.lock").write_text("")  # where an earlier mapsync kept it


def _full_check_due(c: Cluster) -> None:
    c.write_config(extra_publisher='full_check = "1s"')
    time.sleep(1.1)


def _events(stderr: str) -> list[tuple[str, str]]:
    """(level, event) of each JSON log line in ``stderr``."""
    return [(e["level"], e["event"]) for e in map(json.loads, stderr.splitlines())]


@pytest.mark.parametrize(
    "doubt", [_damage_latest, _damage_note, _legacy_note, _full_check_due], ids=lambda f: f.__name__
)
def test_a_doubt_in_the_repository_is_left_to_the_publisher(
    cluster: Cluster, tmp_path: Path, doubt: Callable[[Cluster], None]
) -> None:
    """The run is the publisher's: it says and logs what the publisher's own path says and
    logs (a channel named takes that path), from the same repository, not a line more."""
    cluster.publish()
    doubt(cluster)
    shutil.copytree(cluster.repo, tmp_path / "before", symlinks=True)
    proc, loaded = cli_loading(cluster, "-v", "--log-format", "json", "publish")
    assert "sqlalchemy" in loaded
    shutil.rmtree(cluster.repo)
    shutil.copytree(tmp_path / "before", cluster.repo, symlinks=True)
    own, _ = cli_loading(cluster, "-v", "--log-format", "json", "publish", "--channel", "mx")
    assert proc.stdout == own.stdout
    assert _events(proc.stderr) == _events(own.stderr)


@pytest.mark.parametrize("option", ["--channel=mx", "--dry-run", "--force", "--skip-invalid"])
def test_an_option_takes_the_publishers_path(cluster: Cluster, option: str) -> None:
    cluster.publish()
    proc, loaded = cli_loading(cluster, "publish", option)
    assert proc.stdout == "channel mx: unchanged (serial 1)\n"
    assert "sqlalchemy" in loaded


def test_a_release_another_key_signed_is_renewed(cluster: Cluster) -> None:
    """After a key rotation the release is renewed with the new key, not found unchanged."""
    cluster.publish()
    renew(cluster, 2)
    proc, loaded = cli_loading(cluster, "publish")
    assert proc.stdout == "channel mx: unchanged (serial 2)\n" and "sqlalchemy" not in loaded


def test_a_release_due_for_renewal_is_renewed(cluster: Cluster) -> None:
    """Half its lifetime gone, a release is renewed, whatever the database did: one that
    expires in a minute is due at once under the default lifetime of a week."""
    assert "published serial 1" in publish_expiring(cluster, "60s").stdout
    proc, loaded = cli_loading(cluster, "publish")
    assert "channel mx: renewed serial 2" in proc.stdout and "sqlalchemy" in loaded
    proc, loaded = cli_loading(cluster, "publish")
    assert proc.stdout == "channel mx: unchanged (serial 2)\n" and "sqlalchemy" not in loaded


@pytest.mark.parametrize("forced", [False, True])
def test_a_run_failing_before_the_database_is_read_is_noted_for_status(
    cluster: Cluster, forced: bool
) -> None:
    """A signing key made readable by others (or gone) fails every run before the database is
    read: `status --publisher` said OK with no error while every run failed. Both ways in: the
    quiet check of an unchanged SQLite database, and the publisher (--force)."""
    cluster.publish()
    key = cluster.root / "keys" / "signing.key"
    key.chmod(0o644)
    p = cluster.cli("publish", *(["--force"] if forced else []))
    assert p.returncode == 2, p.stdout + p.stderr
    status = cluster.cli("status", "--publisher")
    assert status.returncode == 1, status.stdout + status.stderr
    assert status.stdout.startswith("MAPSYNC PUBLISHER WARNING - last run failed "), status.stdout
    assert str(key) in status.stdout
    key.chmod(0o600)
    cluster.publish()
    assert cluster.cli("status", "--publisher").returncode == 0

"""What protects a writer that bypasses SQLAlchemy (docs/howto.md, "What every writer must
do"): `init-db` gives every documented default to the database itself and installs a trigger
that moves `updated_at` on an UPDATE that forgets it, on SQLite, PostgreSQL and MariaDB; and
it brings a database an earlier version made to that state without losing a row."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from mapsync.sources.seed import init_db
from tests.conftest import Cluster, make_cluster
from tests.helpers import writers
from tests.helpers.agent import unreferenced_account
from tests.helpers.own_maps import run_sql
from tests.helpers.publisher import keys


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _check_writers_are_protected(url: str) -> None:
    """Bare INSERTs get the documented defaults; an UPDATE that forgets updated_at moves it;
    one that sets it keeps its own value."""
    before = _now() - timedelta(seconds=5)
    run_sql(url, *writers.BARE_INSERTS)
    after = _now() + timedelta(seconds=5)
    rows = writers.rows(url)
    by_name = {r[1]: r for r in rows["mailstore"]}
    store = by_name["bare-store"]
    assert store[3] == 24 and store[5] == 143 and store[6] is True and store[7] is True, store
    (domain,) = [r for r in rows["domain"] if r[1] == "bare.example"]
    assert domain[4] == "hosted" and domain[8] == "active", domain
    (anna,) = [r for r in rows["account"] if r[2] == "anna"]
    assert anna[8:12] == ("active", True, True, True), anna
    for table, where, change in (
        ("customer", "ext_id = 'BARE-1'", "name = 'renamed'"),
        ("mailstore", "name = 'bare-store'", "imap_port = 993"),
        ("domain", "name = 'bare.example'", "status = 'suspended'"),
        ("account", "local_part = 'anna'", "status = 'login_disabled'"),
        ("alias", "local_part = 'sales'", "active = active"),  # no change at all: moved too
        ("alias_target", "target = 'anna@bare.example'", "target = 'anna@bare.example'"),
        ("sender_grant", "address = '@bare.example'", "address = '@bare.example'"),
    ):
        stamp = writers.updated_at(url, table, where)
        assert before <= stamp <= after, (table, stamp)  # UTC, whatever the session's zone
        time.sleep(0.01)
        run_sql(url, f"UPDATE {table} SET {change} WHERE {where}")  # updated_at forgotten
        moved = writers.updated_at(url, table, where)
        assert stamp < moved <= _now() + timedelta(seconds=5), (table, stamp, moved)
    run_sql(
        url,
        "UPDATE account SET status = 'disabled', updated_at = '2001-01-01 00:00:00' "
        "WHERE local_part = 'anna'",
    )
    assert writers.updated_at(url, "account", "local_part = 'anna'") == datetime(2001, 1, 1)


def test_a_new_database_protects_writers(any_url: str) -> None:
    init_db(any_url)
    init_db(any_url)  # idempotent
    _check_writers_are_protected(any_url)


def test_init_db_upgrades_an_older_database_without_losing_a_row(
    any_url: str, tmp_path: Path
) -> None:
    writers.old_database(any_url)
    before = writers.rows(any_url)
    with pytest.raises(Exception):  # noqa: B017 - the old tables refuse a bare INSERT
        run_sql(any_url, *writers.BARE_INSERTS)
    proc = subprocess.run(
        [sys.executable, "-m", "mapsync", "init-db", "--database", any_url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert writers.rows(any_url) == before  # every row, every value
    _check_writers_are_protected(any_url)


def test_publish_sees_an_update_that_forgets_updated_at_at_once(cluster: Cluster) -> None:
    cluster.publish()
    engine = create_engine(cluster.db_url)
    with engine.connect() as conn:
        account, address = unreferenced_account(conn)
    engine.dispose()
    run_sql(cluster.db_url, f"UPDATE account SET status = 'disabled' WHERE id = {account}")
    out = cluster.publish().stdout  # not "unchanged": the trigger moved updated_at
    assert "published serial 2" in out, out
    assert address not in keys(cluster, "mx", "recipients")


# A session east of UTC, as each engine sets it: its CURRENT_TIMESTAMP is hours ahead.
EAST = {"postgresql": "SET TIME ZONE 'Asia/Tokyo'", "mariadb": "SET time_zone = '+09:00'"}


@pytest.mark.parametrize("engine", sorted(EAST))
def test_a_writer_east_of_utc_hides_no_later_write(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """CURRENT_TIMESTAMP in a session east of UTC is local time in these columns: the row was
    the table's newest for hours, and every later write (the trigger's true UTC stamp) left
    the fingerprint as it was ("unchanged" until the next full check). The trigger now puts
    a stamp in the future at the database's UTC time, on UPDATE and INSERT, and init-db
    does so to rows stamped ahead before it."""
    url = request.getfixturevalue("pg_url" if engine == "postgresql" else "mariadb_url")
    cluster = make_cluster(tmp_path / "c", url, accounts=40, domains=3, aliases=10)
    cluster.publish()
    db = create_engine(url)

    def east(*statements: str) -> None:
        with db.begin() as conn:
            conn.exec_driver_sql(EAST[engine])
            for statement in statements:
                conn.exec_driver_sql(statement)

    def unreferenced() -> tuple[int, str]:
        with db.connect() as conn:
            return unreferenced_account(conn)

    try:
        first, first_address = unreferenced()
        east(
            "UPDATE account SET status = 'disabled', updated_at = CURRENT_TIMESTAMP "
            f"WHERE id = {first}",
            "INSERT INTO customer (ext_id, name, created_at, updated_at) "
            "VALUES ('EAST-1', 'east', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
        )
        cluster.publish()
        assert first_address not in keys(cluster, "mx", "recipients")
        # Another writer, in UTC, forgetting updated_at: the trigger stamps the true time.
        second, second_address = unreferenced()
        run_sql(url, f"UPDATE account SET status = 'disabled' WHERE id = {second}")
        out = cluster.publish().stdout
        assert "unchanged" not in out, out
        assert second_address not in keys(cluster, "mx", "recipients")
        ahead = _now() + timedelta(minutes=5)
        assert writers.updated_at(url, "account", f"id = {first}") < ahead
        assert writers.updated_at(url, "customer", "ext_id = 'EAST-1'") < ahead

        # Rows stamped ahead before the trigger refused it: init-db sets them to its time.
        trigger = "account_updated_at" + (" ON account" if engine == "postgresql" else "")
        run_sql(url, f"DROP TRIGGER {trigger}")
        east(f"UPDATE account SET updated_at = CURRENT_TIMESTAMP WHERE id = {second}")
        assert writers.updated_at(url, "account", f"id = {second}") > ahead
        proc = cluster.cli("init-db", "--database", url)
        assert proc.returncode == 0, proc.stderr
        assert "rows=1 table=account" in proc.stderr, proc.stderr
        assert writers.updated_at(url, "account", f"id = {second}") < ahead
    finally:
        db.dispose()

"""The publisher under database trouble, with the real PostgreSQL, MariaDB and SQLite: a table
lock held by another session ends the publish within ``lock_wait`` (exit 2, the database named
without its password, nothing published); a publisher lock lost mid-publish (its session
killed) publishes nothing; ``status --publisher`` shows the failing runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, text

from mapsync.sources.builtin import ADVISORY_LOCK
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account
from tests.helpers.dbtrouble import repo_tree


@contextmanager
def table_locked(url: str) -> Iterator[Connection]:
    """Another session holds an exclusive lock on ``account`` until the block ends."""
    engine = create_engine(url)
    conn = engine.connect()
    try:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("LOCK TABLE account IN ACCESS EXCLUSIVE MODE")
        elif conn.dialect.name == "sqlite":
            # In WAL mode (what init-db sets) readers never wait; a database in the default
            # rollback-journal mode (made by another tool) makes them wait for a writer.
            conn.exec_driver_sql("PRAGMA journal_mode=DELETE")
            conn.exec_driver_sql("BEGIN EXCLUSIVE")
        else:
            conn.exec_driver_sql("LOCK TABLES account WRITE")
        yield conn
    finally:
        if conn.dialect.name in ("mysql", "mariadb"):
            conn.exec_driver_sql("UNLOCK TABLES")
        conn.rollback()
        conn.close()
        engine.dispose()


def _cluster(root: Path, url: str, publisher: str) -> Cluster:
    c = make_cluster(root, url, accounts=30, domains=3, aliases=5)
    c.publish()
    c.write_config(extra_publisher=publisher)
    add_account(url, "waiting")  # so the next publish has something to publish
    return c


def _no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


def _latest(c: Cluster) -> int:
    return int(json.loads((c.repo / "mx" / "LATEST").read_text())["serial"])


# -- a table lock ends the publish within lock_wait ----------------------------------------------


def _publish_under_table_lock(
    c: Cluster, url: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    before = repo_tree(c.repo)
    with table_locked(url):
        started = time.monotonic()
        proc = c.cli("publish")
        took = time.monotonic() - started
    _no_traceback(proc)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # Nothing published: the tree is as before but for the publisher's run note.
    assert repo_tree(c.repo) == before
    assert _latest(c) == 1
    return proc, took


@pytest.mark.postgresql
def test_postgresql_table_lock_fails_the_publish_within_lock_wait_and_says_so(
    tmp_path: Path, pg_url: str
) -> None:
    url = pg_url.replace("postgres@", "postgres:hidden-pw@")
    c = _cluster(tmp_path / "c", url, 'lock_wait = "7s"')
    proc, took = _publish_under_table_lock(c, pg_url)
    assert took < 30, took  # 7s, plus starting Python on a busy machine
    shown = url.replace("hidden-pw", "***")
    assert (
        f"mapsync: database {shown}: reading the change fingerprint failed: another session "
        "holds a lock longer than [publisher] lock_wait (7s) allows" in proc.stderr
    ), proc.stderr
    assert "hidden-pw" not in proc.stderr + proc.stdout
    # While it waited, the log said so (after 5s).
    assert "still waiting for the database" in proc.stderr, proc.stderr

    status = c.cli("status", "--publisher")
    assert status.returncode == 1, status.stdout + status.stderr
    assert status.stdout.startswith("MAPSYNC PUBLISHER WARNING - last run failed ")
    assert "lock_wait (7s)" in status.stdout
    assert "hidden-pw" not in status.stdout

    assert "published serial 2" in c.publish().stdout  # the lock gone, the next run publishes
    status = c.cli("status", "--publisher")
    assert status.returncode == 0, status.stdout
    assert status.stdout.startswith("MAPSYNC PUBLISHER OK - last successful run ")


@pytest.mark.postgresql
def test_postgresql_statement_timeout_bounds_every_statement(tmp_path: Path, pg_url: str) -> None:
    c = _cluster(tmp_path / "c", pg_url, 'lock_wait = "60s"\nstatement_timeout = "2s"')
    proc, took = _publish_under_table_lock(c, pg_url)
    assert took < 30, took
    assert (
        "reading the change fingerprint failed: a statement ran longer than [publisher] "
        "statement_timeout (2s) allows" in proc.stderr
    ), proc.stderr


@pytest.mark.mariadb
def test_mariadb_table_lock_fails_the_publish_within_lock_wait_and_says_so(
    tmp_path: Path, mariadb_url: str
) -> None:
    c = _cluster(tmp_path / "c", mariadb_url, 'lock_wait = "2s"')
    proc, took = _publish_under_table_lock(c, mariadb_url)
    assert took < 30, took  # MariaDB's own default: a day
    assert (
        f"mapsync: database {mariadb_url}: reading the change fingerprint failed: another "
        "session holds a lock longer than [publisher] lock_wait (2s) allows" in proc.stderr
    ), proc.stderr
    assert "published serial 2" in c.publish().stdout


def test_sqlite_write_lock_fails_the_publish_within_lock_wait_and_says_so(
    tmp_path: Path, sqlite_url: str
) -> None:
    c = _cluster(tmp_path / "c", sqlite_url, 'lock_wait = "1s"')
    proc, _ = _publish_under_table_lock(c, sqlite_url)
    assert (
        f"mapsync: database {sqlite_url}: reading the change fingerprint failed: another "
        "session holds a lock longer than [publisher] lock_wait (1s) allows (database is locked)"
        in proc.stderr
    ), proc.stderr
    assert "published serial 2" in c.publish().stdout


# -- the publisher lock lost mid-publish --------------------------------------------------------


def _pg_lock_holder(admin: Connection) -> int | None:
    return admin.execute(
        text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
            " AND classid::bigint = :hi AND objid::bigint = :lo"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        {"hi": ADVISORY_LOCK >> 32, "lo": ADVISORY_LOCK & 0xFFFFFFFF},
    ).scalar()


def _pg_kill(admin: Connection, pid: int) -> None:
    assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()


def _mariadb_lock_holder(admin: Connection) -> int | None:
    name = f"mapsync:{admin.engine.url.database}"
    return admin.execute(text("SELECT IS_USED_LOCK(:name)"), {"name": name}).scalar()


def _mariadb_kill(admin: Connection, pid: int) -> None:
    admin.exec_driver_sql(f"KILL {int(pid)}")


def _lock_lost_mid_publish(
    c: Cluster,
    url: str,
    holder: Callable[[Connection], int | None],
    kill: Callable[[Connection, int], None],
) -> None:
    """Hold the publish on a table lock once it has its publisher lock, kill the session that
    holds the publisher lock, let the publish go on: it must notice before it commits."""
    before = repo_tree(c.repo)
    admin_engine = create_engine(url, isolation_level="AUTOCOMMIT")
    argv = [sys.executable, "-m", "mapsync", "--config", str(c.config_path), "publish"]
    try:
        with admin_engine.connect() as admin, table_locked(url):
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 60
            pid = None
            while pid is None:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the publisher never took its lock"
                time.sleep(0.05)
                pid = holder(admin)
            kill(admin, pid)
            # pg_terminate_backend only signals: the session takes a moment to go.
            gone = time.monotonic() + 20
            while holder(admin) is not None:
                assert time.monotonic() < gone, "the lock's session did not end"
                time.sleep(0.05)
        out, err = proc.communicate(timeout=120)
    finally:
        admin_engine.dispose()
    assert "Traceback" not in err, err
    assert proc.returncode == 2, out + err
    assert "the publisher lock was lost while publishing" in err, err
    assert "nothing was published" in err
    assert repo_tree(c.repo) == before
    assert _latest(c) == 1
    assert "published serial 2" in c.publish().stdout  # a healthy session: publishes


@pytest.mark.postgresql
def test_postgresql_advisory_lock_lost_mid_publish_publishes_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    c = _cluster(tmp_path / "c", pg_url, 'lock_wait = "60s"')
    _lock_lost_mid_publish(c, pg_url, _pg_lock_holder, _pg_kill)


@pytest.mark.mariadb
def test_mariadb_named_lock_lost_mid_publish_publishes_nothing(
    tmp_path: Path, mariadb_url: str
) -> None:
    c = _cluster(tmp_path / "c", mariadb_url, 'lock_wait = "60s"')
    _lock_lost_mid_publish(c, mariadb_url, _mariadb_lock_holder, _mariadb_kill)


@pytest.mark.mariadb
def test_a_standby_publisher_on_mariadb_respects_the_named_lock(
    tmp_path: Path, mariadb_url: str
) -> None:
    """Two publisher hosts with separate repositories are kept apart by the database."""
    c = make_cluster(tmp_path / "m", mariadb_url, accounts=30, domains=3, aliases=5)
    c.write_config(extra_publisher='lock_wait = "1s"')
    engine = create_engine(mariadb_url)
    name = f"mapsync:{engine.url.database}"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar() == 1
        proc = c.cli("publish")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"another publisher holds lock '{name}'" in proc.stderr
        assert not (c.repo / "mx" / "LATEST").exists()
        conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name})
    engine.dispose()
    assert "published serial 1" in c.publish().stdout


# -- a database server that accepts and never answers -------------------------------------------


def test_a_database_server_that_never_answers_fails_the_publish_within_lock_wait(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A PostgreSQL host behind a dead proxy or a hung server: the TCP connect succeeds, the
    server never says a word. libpq alone would wait forever."""
    c = make_cluster(tmp_path / "c", sqlite_url, accounts=30, domains=3, aliases=5)
    c.publish()
    before = repo_tree(c.repo)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # never accept()ed: the kernel completes the handshake, then nothing
        port = silent.getsockname()[1]
        url = f"postgresql+psycopg://mapsync:db-secret@127.0.0.1:{port}/mail"
        c.config_path.write_text(
            c.config_path.read_text()
            .replace(sqlite_url, url)
            .replace("[publisher]\n", '[publisher]\nlock_wait = "2s"\n', 1)
        )
        started = time.monotonic()
        proc = c.cli("publish")
        took = time.monotonic() - started
    _no_traceback(proc)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert took < 30, took
    assert proc.stderr.startswith(
        f"mapsync: database postgresql+psycopg://mapsync:***@127.0.0.1:{port}/mail: "
    ), proc.stderr
    assert "db-secret" not in proc.stderr
    assert repo_tree(c.repo) == before

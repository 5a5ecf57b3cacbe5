"""The publisher as a database user that may only SELECT (docs/database.md, run as written):
the owner creates the schema with ``init-db --database OWNER_URL``, the page's GRANTs give the
reader SELECT, and the reader publishes real releases, sees "unchanged" the next time, holds
the publisher lock, and cannot change a row or create a table. ``init-db`` run as the reader
says what is wrong and what to run instead."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mapsync.errors import LockBusy
from mapsync.signing import keygen
from mapsync.sources.builtin import BuiltinSource
from mapsync.sources.deletion_log import deletions
from tests.conftest import Cluster, make_cluster
from tests.helpers import postfixadmin as pfa
from tests.helpers.dbusers import DatabaseUsers, owner_and_reader, postfixadmin_reader
from tests.helpers.own_maps import run_sql
from tests.helpers.users import USER, chown, run_as, shared_dir

KINDS = [
    pytest.param("postgresql", marks=pytest.mark.postgresql),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]
SEED = ["--accounts", "30", "--domains", "3", "--aliases", "8"]
# What the reader must not do: write a row, create a table.
WRITES = [
    "INSERT INTO mailstore (name, lmtp_host, lmtp_port, imap_host, imap_port, active, "
    "accepts_new, created_at, updated_at) VALUES ('evil', 'evil.example', 24, "
    "'evil.example', 143, TRUE, TRUE, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
    "UPDATE account SET status = 'disabled'",
    "DELETE FROM alias_target",
    "CREATE TABLE evil (id INTEGER)",
]


def _cluster(root: Path, users: DatabaseUsers) -> Cluster:
    """A publisher whose [publisher].database is the reader's URL; nothing created yet."""
    root.mkdir(parents=True)
    keygen(root / "keys" / "signing.key")
    c = Cluster(root, users.reader_url)
    c.write_config()
    return c


@pytest.fixture(params=KINDS)
def users(request: pytest.FixtureRequest) -> Iterator[DatabaseUsers]:
    with owner_and_reader(request.param) as u:
        yield u


def _as_documented(c: Cluster, users: DatabaseUsers) -> None:
    """The page's order: users (the fixture), init-db as the owner, then the grants."""
    c.cli("init-db", "--database", users.owner_url, check=True)
    c.cli("seed", "--database", users.owner_url, *SEED, check=True)
    if users.kind == "postgresql":
        users.as_superuser(users.documented("postgresql-grants"), database=users.database)


def test_the_publisher_publishes_as_a_user_that_may_only_select(
    tmp_path: Path, users: DatabaseUsers
) -> None:
    c = _cluster(tmp_path / "c", users)
    _as_documented(c, users)

    first = c.publish()
    assert "channel mx: published serial 1 (first release)" in first.stdout
    assert (c.repo / "mx" / "releases" / "1" / "recipients").read_text().count("@") >= 30
    assert "channel mx: unchanged (serial 1)" in c.publish().stdout

    for statement in WRITES:
        refusal = users.refused(users.reader_url, statement)
        assert refusal is not None, f"the reader may run: {statement}"
        assert "denied" in refusal, refusal
    assert users.refused(users.owner_url, "UPDATE account SET home = home") is None

    # A table a later init-db creates (as the owner) is readable without a new GRANT.
    assert users.refused(users.owner_url, "CREATE TABLE later (id INTEGER)") is None
    assert users.refused(users.reader_url, "SELECT * FROM later") is None


def test_the_reader_holds_the_publisher_lock_and_excludes_a_second_publisher(
    tmp_path: Path, users: DatabaseUsers
) -> None:
    c = _cluster(tmp_path / "c", users)
    _as_documented(c, users)
    first, second = BuiltinSource(users.reader_url), BuiltinSource(users.reader_url)
    try:
        with first.lock(wait=0):
            first.check_lock()  # the reader may ask whether it still holds it
            with pytest.raises(LockBusy, match="another publisher holds"), second.lock(wait=0):
                pass
        with second.lock(wait=0):  # released: the next publisher takes it
            second.check_lock()
    finally:
        first.close()
        second.close()


def test_init_db_as_the_reader_names_the_problem_and_the_owner_url(
    tmp_path: Path, users: DatabaseUsers
) -> None:
    c = _cluster(tmp_path / "c", users)
    p = c.cli("init-db")
    assert p.returncode == 2, p.stdout + p.stderr
    refusal = {
        "postgresql": "permission denied for schema public",
        "mariadb": f"CREATE command denied to user '{users.reader}'",
    }[users.kind]
    assert refusal in p.stderr
    assert "init-db --database OWNER_URL" in p.stderr and "docs/database.md" in p.stderr
    assert "Traceback" not in p.stderr and "[SQL:" not in p.stderr
    assert users.password not in p.stderr
    assert p.stderr.count("\n") == 1  # one line


@pytest.mark.postgresql
def test_a_reader_without_the_grants_is_told_what_it_lacks(tmp_path: Path) -> None:
    with owner_and_reader("postgresql") as users:
        c = _cluster(tmp_path / "c", users)
        c.cli("init-db", "--database", users.owner_url, check=True)  # no grants block
        p = c.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "permission denied for table" in p.stderr
    assert "needs SELECT on every table" in p.stderr and "docs/database.md" in p.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_postfixadmin_is_published_by_a_reader_of_its_four_tables(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url" if kind == "postgresql" else "mariadb_url")
    pfa.build(url)
    with postfixadmin_reader(kind, url) as users:
        c = _cluster(tmp_path / "c", users)
        c.write_config(extra_publisher='schema = "postfixadmin"')
        assert "channel mx: published serial 1" in c.publish().stdout
        assert "channel mx: unchanged (serial 1)" in c.publish().stdout
        assert "denied" in (users.refused(users.reader_url, "SELECT * FROM config") or "")
        assert "denied" in (users.refused(users.reader_url, "DELETE FROM mailbox") or "")


def test_sqlite_is_read_by_a_user_who_may_not_write_the_file_given_its_directory() -> None:
    """SQLite has no users: docs/database.md says what the publisher's user needs (read the
    file, write its directory for the WAL's -shm and -wal), and the error says it too."""
    with shared_dir() as d:
        (d / "db").mkdir()
        c = make_cluster(d / "c", f"sqlite:///{d / 'db' / 'central.db'}")  # root's file
        c.repo.mkdir()
        chown(c.repo)
        chown(c.root / "keys")
        database = (d / "db" / "central.db").read_bytes()

        p = run_as(USER, c.config_path, "publish")
        assert p.returncode == 2, p.stdout + p.stderr
        assert "attempt to write a readonly database" in p.stderr
        assert "needs write access to that directory" in p.stderr, p.stderr
        assert not (c.repo / "mx" / "LATEST").exists()

        chown(d / "db", recursive=False)  # the directory, not the file: still root's, 0644
        p = run_as(USER, c.config_path, "publish")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "channel mx: published serial 1" in p.stdout
        assert (d / "db" / "central.db").read_bytes() == database


def test_a_writer_granted_only_the_data_tables_may_still_delete(
    tmp_path: Path, users: DatabaseUsers
) -> None:
    """A panel's role granted DELETE (and UPDATE) on the tables it edits (before an upgrade
    made ``mapsync_deleted``, or per table as docs/database.md says) keeps deleting, and
    moving a target to another alias: the deletion log's triggers write the log with the
    owner's rights, not the writer's."""
    c = _cluster(tmp_path / "c", users)
    _as_documented(c, users)
    writer = users.reader + "w"
    if users.kind == "postgresql":
        sql = [
            f"CREATE ROLE {writer} LOGIN PASSWORD '{users.password}'",
            f"GRANT CONNECT ON DATABASE {users.database} TO {writer}",
            f"GRANT USAGE ON SCHEMA public TO {writer}",
            f"GRANT SELECT, DELETE, UPDATE ON alias_target TO {writer}",
            f"GRANT SELECT, DELETE ON alias TO {writer}",
        ]
        users.as_superuser(sql, database=users.database)
        drop = [f"DROP OWNED BY {writer}", f"DROP ROLE {writer}"]
    else:
        sql = [
            f"CREATE USER '{writer}'@'%' IDENTIFIED BY '{users.password}'",
            f"GRANT SELECT, DELETE, UPDATE ON {users.database}.alias_target TO '{writer}'@'%'",
            f"GRANT SELECT, DELETE ON {users.database}.alias TO '{writer}'@'%'",
        ]
        users.as_superuser(sql)
        drop = [f"DROP USER '{writer}'@'%'"]
    # An alias without targets, for the writer to move an alias's targets to.
    run_sql(
        users.owner_url,
        "INSERT INTO alias (domain_id, local_part) SELECT min(id), 'moved-here' FROM domain",
    )
    owner = BuiltinSource(users.owner_url)
    try:
        with owner.reading("the ids") as conn:
            first = conn.exec_driver_sql("SELECT min(alias_id) FROM alias_target").scalar_one()
            last = conn.exec_driver_sql("SELECT max(id) FROM alias").scalar_one()
    finally:
        owner.close()
    try:
        moved = f"UPDATE alias_target SET alias_id = {last} WHERE alias_id = {first}"
        assert users.refused(users.url(writer), moved) is None
        assert users.refused(users.url(writer), "DELETE FROM alias_target") is None
        # The writer cannot write the log itself: only the trigger does.
        refusal = users.refused(users.url(writer), "DELETE FROM mapsync_deleted")
        assert refusal is not None and "denied" in refusal, refusal
    finally:
        users.as_superuser(drop, database=users.database if users.kind == "postgresql" else None)
    # The reader sees the deletion in the fingerprint's log.
    source = BuiltinSource(users.reader_url)
    try:
        assert source.fingerprint().tables["mapsync_deleted"][0] > 0
        with source.reading("the log") as conn:
            _, found = deletions(conn, 0)
        # The moved target's old alias (all its targets went to another before the DELETE).
        assert found is not None and first in found["alias_target"]
    finally:
        source.close()

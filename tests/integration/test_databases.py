"""The central database for real: SQLite, PostgreSQL and MariaDB give byte-identical maps;
unreachable or failing databases publish nothing and never print a password; the snapshot is
one read-only, repeatable-read transaction."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, event, insert, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError

from mapsync.errors import SourceError
from mapsync.formats import text as textmap
from mapsync.publish.publisher import Publisher
from mapsync.release import Manifest, parse_manifest
from mapsync.signing import keygen
from mapsync.snapshot import Snapshot
from mapsync.sources import open_source
from mapsync.sources import schema as t
from mapsync.sources.builtin import BuiltinSource, _plain_stream
from mapsync.sources.seed import SeedCounts, init_db, seed
from tests.conftest import Cluster
from tests.helpers.transport import free_port

# Enough to have catch-alls (domain 25), alias domains (10, 20, 30), a relay and the IDN domain.
COUNTS = SeedCounts(accounts=400, domains=30, aliases=120, mailstores=3)
SEED = 11


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".publisher.json"  # the run note every run rewrites
    }


def prepare(root: Path, url: str, do_seed: bool = True) -> Cluster:
    root.mkdir(parents=True, exist_ok=True)
    keygen(root / "keys" / "signing.key")
    c = Cluster(root, url)
    c.write_config()
    if do_seed:
        seed(url, COUNTS, seed=SEED)
    return c


def publish(c: Cluster, source: Any = None) -> Manifest:
    pub = c.config().need_publisher()
    Publisher(pub, source or (lambda: open_source(pub.database, pub.schema))).run()
    serial = json.loads((c.repo / "mx" / "LATEST").read_text())["serial"]
    path = c.repo / "mx" / "releases" / str(serial) / "MANIFEST.json"
    return parse_manifest(path.read_bytes(), str(path))


def execute(url: str, *statements: Any) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for s in statements:
                conn.execute(s)
    finally:
        engine.dispose()


def assert_same_maps(a: Manifest, b: Manifest) -> None:
    assert set(a.maps) == set(b.maps) == {"domains", "recipients", "virtual", "transport"}
    for name in a.maps:
        x, y = a.maps[name], b.maps[name]
        assert (x.entries, x.content_sha256, x.sha256, x.size) == (
            y.entries,
            y.content_sha256,
            y.sha256,
            y.size,
        ), name
        assert x.cdb == y.cdb, name


@pytest.fixture
def reference(tmp_path: Path, sqlite_url: str) -> Manifest:
    """The seeded data published from SQLite."""
    return publish(prepare(tmp_path / "sqlite", sqlite_url))


# --- same seed, same bytes -------------------------------------------------------------------------


@pytest.mark.postgresql
def test_postgresql_publishes_the_same_maps_as_sqlite(
    tmp_path: Path, pg_url: str, reference: Manifest
) -> None:
    m = publish(prepare(tmp_path / "pg", pg_url))
    assert m.source["url"] == pg_url
    assert_same_maps(reference, m)
    assert reference.maps["recipients"].entries > 400  # the data set is not trivial


@pytest.mark.mariadb
def test_mariadb_publishes_the_same_maps_as_sqlite(
    tmp_path: Path, mariadb_url: str, reference: Manifest
) -> None:
    m = publish(prepare(tmp_path / "maria", mariadb_url))
    assert m.source["url"] == mariadb_url
    assert_same_maps(reference, m)


@pytest.mark.postgresql
def test_cli_init_db_seed_publish_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    c = prepare(tmp_path / "pg", pg_url, do_seed=False)
    assert c.cli("init-db", check=True).stdout.strip() == f"schema ready in {pg_url}"
    out = c.cli("seed", "--accounts", "50", "--domains", "5", "--aliases", "5", check=True).stdout
    assert out.startswith("seeded ") and "50 account" in out
    assert "published serial 1 (first release)" in c.publish().stdout
    assert "unchanged (serial 1)" in c.publish().stdout


@pytest.mark.postgresql
def test_target_order_does_not_depend_on_the_database_collation(
    tmp_path: Path, sqlite_url: str, pg_url: str
) -> None:
    """Many PostgreSQL databases collate with ICU/glibc rules ('@' before digits, punctuation
    weighed last): the virtual map's comma-separated targets must still come out byte-equal."""
    init_db(pg_url)
    execute(
        pg_url,
        text(
            'ALTER TABLE alias_target ALTER COLUMN target TYPE varchar(320) COLLATE "en-US-x-icu"'
        ),
    )
    maps = []
    for name, url in (("sqlite", sqlite_url), ("pg", pg_url)):
        c = prepare(tmp_path / name, url)
        execute(
            url,
            insert(t.alias).values(id=5000, domain_id=2, local_part="order-test"),
            insert(t.alias_target).values(
                [
                    {"alias_id": 5000, "target": target}
                    # external targets: internal ones would have to exist (a data rule)
                    for target in ("ann@else.example", "ann1@else.example", "ann.b@else.example")
                ]
            ),
        )
        maps.append(publish(c))
        virtual = dict(textmap.pairs(c.repo / "mx" / "releases" / "1" / "virtual"))
        # Bytewise order, as the maps themselves are sorted.
        assert virtual[b"order-test@example-2.org"] == (
            b"ann.b@else.example,ann1@else.example,ann@else.example"
        )
    assert_same_maps(*maps)


# --- unreachable and refusing databases ------------------------------------------------------------


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    return free_port()


@pytest.mark.parametrize(
    ("template", "shown"),
    [
        (
            "postgresql+psycopg://mapsync:s3cret-pw@127.0.0.1:{port}/mail",
            "postgresql+psycopg://mapsync:***@127.0.0.1:{port}/mail",
        ),
        (
            "mysql+pymysql://mapsync:s3cret-pw@127.0.0.1:{port}/mail",
            "mysql+pymysql://mapsync:***@127.0.0.1:{port}/mail",
        ),
    ],
)
@pytest.mark.parametrize("command", ["publish", "init-db", "seed"])
def test_unreachable_server_exits_2_without_the_password(
    tmp_path: Path, template: str, shown: str, command: str
) -> None:
    port = closed_port()
    url = template.format(port=port)
    c = prepare(tmp_path, url, do_seed=False)
    proc = c.cli(command)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "s3cret-pw" not in proc.stdout + proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("mapsync: ")]
    assert len(error) == 1, proc.stderr
    assert error[0].startswith(f"mapsync: database {shown.format(port=port)}: ")
    assert "Traceback" not in proc.stderr
    assert not (c.repo / "mx").exists()


@pytest.mark.parametrize("where", ["central.db", "no-such-dir/central.db"])
def test_a_missing_sqlite_file_is_refused_naming_it_and_init_db(tmp_path: Path, where: str) -> None:
    # SQLite creates a missing file on connect: the publish used to make an empty database
    # and then fail with "no such table".
    path = tmp_path / where
    url = f"sqlite:///{path}"
    c = prepare(tmp_path / "c", url, do_seed=False)
    for command in ("publish", "publish --dry-run"):
        proc = c.cli(*command.split())
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert (
            f"mapsync: database {url}: SQLite file {path} does not exist "
            "(create it with `mapsync init-db`, or fix [publisher].database)"
        ) in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not path.exists()  # nothing created, not even a missing directory
    assert path.parent == tmp_path or not path.parent.exists()
    assert not (c.repo / "mx").exists()
    if where == "central.db":  # the documented commands still create it
        c.cli("init-db", check=True)
        c.cli("seed", check=True)
        c.publish()
        assert (c.repo / "mx" / "LATEST").exists()


def test_sqlite_without_the_schema_exits_2_and_names_init_db(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()  # an empty file, as an earlier mapsync left behind
    url = f"sqlite:///{path}"
    c = prepare(tmp_path / "c", url, do_seed=False)
    proc = c.cli("publish")
    assert proc.returncode == 2
    assert f"mapsync: database {url}: " in proc.stderr and "no such table" in proc.stderr
    assert "`mapsync init-db` creates the schema" in proc.stderr
    assert not (c.repo / "mx").exists()


@pytest.mark.mariadb
def test_wrong_password_is_refused_and_not_printed(tmp_path: Path, mariadb_url: str) -> None:
    url = mariadb_url.replace("root@", "root:wr0ng-pw@")
    c = prepare(tmp_path, url, do_seed=False)
    proc = c.cli("publish")
    assert proc.returncode == 2
    assert "wr0ng-pw" not in proc.stdout + proc.stderr
    assert f"mapsync: database {url.replace('wr0ng-pw', '***')}: " in proc.stderr
    assert "Access denied" in proc.stderr
    assert not (c.repo / "mx").exists()


@pytest.mark.postgresql
def test_password_never_reaches_the_manifest(tmp_path: Path, pg_url: str) -> None:
    # Trust authentication ignores the password, so the URL with one still connects.
    url = pg_url.replace("postgres@", "postgres:n0t-in-manifest@")
    m = publish(prepare(tmp_path, url))
    assert m.source["url"] == pg_url.replace("postgres@", "postgres:***@")
    for p in tmp_path.rglob("*"):
        if p.is_file() and "repo" in p.parts:
            assert b"n0t-in-manifest" not in p.read_bytes(), p


# --- failing in the middle of the read -------------------------------------------------------------


def _on_account_read(source: BuiltinSource, action: Any) -> None:
    """Run ``action(conn)`` once, just before the snapshot reads the accounts."""
    done: list[bool] = []

    @event.listens_for(source.engine, "before_cursor_execute")
    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "account.local_part" in statement and not done:
            done.append(True)
            action(conn)


def _io_error(conn: Any) -> None:
    raise sqlite3.OperationalError("disk I/O error")


def _interrupted_while_fetching(conn: Any) -> None:
    """SQLite interrupted once the first rows came back (its statement bound, a dying disk):
    the error comes from fetching the rows, not from the query."""
    steps: list[int] = []

    def handler() -> int:
        steps.append(1)
        return 1 if len(steps) > 50 else 0

    conn.connection.dbapi_connection.set_progress_handler(handler, 100)


@pytest.mark.parametrize(
    ("action", "reason"),
    [(_io_error, "disk I/O error"), (_interrupted_while_fetching, "interrupted")],
    ids=["at-the-query", "while-fetching"],
)
def test_sqlite_failing_mid_read_publishes_nothing(
    tmp_path: Path, sqlite_url: str, action: Any, reason: str
) -> None:
    c = prepare(tmp_path / "c", sqlite_url)
    publish(c)
    execute(
        sqlite_url, insert(t.account).values(domain_id=2, local_part="pending", status="active")
    )
    before = tree(c.repo)

    def failing() -> BuiltinSource:
        s = BuiltinSource(sqlite_url)
        _on_account_read(s, action)
        return s

    with pytest.raises(SourceError) as info:
        publish(c, failing)
    assert str(info.value) == f"database {sqlite_url}: reading the snapshot failed: {reason}"
    assert tree(c.repo) == before
    assert publish(c).serial == 2  # the next run, with a healthy disk, succeeds
    assert "pending@example-2.org" in (c.repo / "mx" / "releases" / "2" / "recipients").read_text()


@pytest.mark.postgresql
def test_postgresql_connection_killed_mid_read_publishes_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    url = pg_url.replace("postgres@", "postgres:hidden-pw@")
    c = prepare(tmp_path / "c", url)
    publish(c)
    execute(url, insert(t.account).values(domain_id=2, local_part="pending", status="active"))
    before = tree(c.repo)
    admin = create_engine(pg_url)

    def killing() -> BuiltinSource:
        s = BuiltinSource(url)

        def kill(conn: Any) -> None:
            pid = conn.connection.dbapi_connection.info.backend_pid
            with admin.connect() as a:
                assert a.execute(select(text(f"pg_terminate_backend({pid})"))).scalar()

        _on_account_read(s, kill)
        return s

    try:
        with pytest.raises(SourceError) as info:
            publish(c, killing)
    finally:
        admin.dispose()
    message = str(info.value)
    assert message.startswith(
        f"database {url.replace('hidden-pw', '***')}: reading the snapshot failed: "
    )
    assert "hidden-pw" not in message
    assert tree(c.repo) == before
    assert publish(c).serial == 2  # the next run, with a healthy connection, succeeds


# --- one read-only, repeatable-read transaction -------------------------------------------------


class Probe(BuiltinSource):
    """Records what the snapshot's own transaction looks like, then reads as usual."""

    def __init__(self, url: str, queries: dict[str, str]) -> None:
        super().__init__(url)
        self.queries = queries
        self.seen: dict[str, Any] = {}
        self.write_error: str | None = None

    def _read(self, conn: Connection) -> Snapshot:
        for name, sql in self.queries.items():
            self.seen[name] = conn.exec_driver_sql(sql).scalar()
        savepoint = conn.begin_nested()
        try:
            conn.execute(update(t.account).where(t.account.c.id == 1).values(status="disabled"))
        except DBAPIError as exc:
            self.write_error = str(exc.orig)
            savepoint.rollback()
        else:
            savepoint.commit()
        return super()._read(conn)


def _account_status(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(select(t.account.c.status).where(t.account.c.id == 1)).scalar())
    finally:
        engine.dispose()


@pytest.mark.postgresql
def test_postgresql_snapshot_is_read_only_repeatable_read(tmp_path: Path, pg_url: str) -> None:
    seed(pg_url, SeedCounts(accounts=30, domains=3, aliases=3, mailstores=1), seed=2)
    probe = Probe(
        pg_url,
        {"read_only": "SHOW transaction_read_only", "isolation": "SHOW transaction_isolation"},
    )
    try:
        snap = probe.snapshot()
    finally:
        probe.close()
    assert probe.seen == {"read_only": "on", "isolation": "repeatable read"}
    assert probe.write_error is not None
    assert "read-only transaction" in probe.write_error
    assert _account_status(pg_url) == "active"
    assert len(snap.accounts) == 30


@pytest.mark.mariadb
def test_mariadb_snapshot_is_read_only_repeatable_read(tmp_path: Path, mariadb_url: str) -> None:
    seed(mariadb_url, SeedCounts(accounts=30, domains=3, aliases=3, mailstores=1), seed=2)
    probe = Probe(mariadb_url, {"isolation": "SELECT @@session.tx_isolation"})
    try:
        snap = probe.snapshot()
    finally:
        probe.close()
    assert probe.seen == {"isolation": "REPEATABLE-READ"}
    assert probe.write_error is not None
    assert "READ ONLY transaction" in probe.write_error
    assert _account_status(mariadb_url) == "active"
    assert len(snap.accounts) == 30


def test_sqlite_snapshot_is_read_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ro.db'}"
    seed(url, SeedCounts(accounts=30, domains=3, aliases=3, mailstores=1), seed=2)
    probe = Probe(url, {"query_only": "PRAGMA query_only"})
    try:
        snap = probe.snapshot()
    finally:
        probe.close()
    assert probe.seen == {"query_only": 1}
    assert probe.write_error is not None
    assert "readonly" in probe.write_error
    assert _account_status(url) == "active"
    assert len(snap.accounts) == 30


def _concurrent_commit_is_not_seen(url: str, writer_args: dict[str, Any]) -> list[str]:
    """Commit from a second connection between the snapshot's domain and account reads."""
    seed(url, SeedCounts(accounts=30, domains=3, aliases=3, mailstores=1), seed=2)
    other = create_engine(url, **writer_args)
    events: list[str] = []
    source = BuiltinSource(url)

    def commit_elsewhere(conn: Any) -> None:
        try:
            with other.begin() as w:
                w.execute(
                    insert(t.account).values(domain_id=1, local_part="sneaky", status="active")
                )
                w.execute(update(t.domain).where(t.domain.c.id == 2).values(status="disabled"))
            events.append("committed")
        except OperationalError as exc:
            events.append(f"blocked: {exc.orig}")

    before = source.fingerprint()
    _on_account_read(source, commit_elsewhere)
    try:
        snap = source.snapshot()
        assert events, "the concurrent writer never ran"
        assert "sneaky" not in {a.local_part for a in snap.accounts}
        assert {d.id: d.status for d in snap.domains}[2] == "active"
        # The fingerprint was read in the same transaction, so it describes these rows.
        assert snap.fingerprint == before and len(snap.accounts) == 30
        if events == ["committed"]:
            fresh = source.snapshot()
            assert "sneaky" in {a.local_part for a in fresh.accounts}
            assert {d.id: d.status for d in fresh.domains}[2] == "disabled"
            for table in ("account", "domain"):  # the newest updated_at of each moved
                assert fresh.fingerprint.tables[table] != snap.fingerprint.tables[table]
            assert fresh.fingerprint.digest() != snap.fingerprint.digest()
    finally:
        source.close()
        other.dispose()
    return events


@pytest.mark.postgresql
def test_postgresql_snapshot_ignores_rows_committed_after_it_began(pg_url: str) -> None:
    assert _concurrent_commit_is_not_seen(pg_url, {}) == ["committed"]


@pytest.mark.mariadb
def test_mariadb_snapshot_ignores_rows_committed_after_it_began(mariadb_url: str) -> None:
    assert _concurrent_commit_is_not_seen(mariadb_url, {}) == ["committed"]


def test_sqlite_snapshot_ignores_rows_committed_after_it_began(sqlite_url: str) -> None:
    # SQLite has one writer and, in rollback-journal mode, readers block its commit: either
    # way the snapshot must not see the change.
    events = _concurrent_commit_is_not_seen(sqlite_url, {"connect_args": {"timeout": 0.2}})
    assert events in (["committed"], ["blocked: database is locked"])


def test_init_db_and_seed_with_database_need_no_config_file(tmp_path: Path) -> None:
    # docs/database.md: run as the owner before the publisher's mapsync.toml exists, or on
    # the database host; without --database the config is still required.
    url = f"sqlite:///{tmp_path / 'central.db'}"
    env = {**os.environ, "MAPSYNC_CONFIG": str(tmp_path / "absent.toml")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "mapsync", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)

    for args in (("init-db", "--database", url), ("seed", "--accounts", "3", "--database", url)):
        proc = cli(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    with sqlite3.connect(tmp_path / "central.db") as conn:
        assert conn.execute("SELECT count(*) FROM account").fetchone()[0] > 0
    proc = cli("init-db")
    assert proc.returncode == 2
    assert f"{tmp_path / 'absent.toml'}: config file not found" in proc.stderr


# Homes the database may call plain (read as NULL when no channel carries homes) and homes it
# must hand to validation: every kind validate refuses, and doubtful ones it accepts.
PLAIN_HOMES = ["/var/vmail/example.org/anna", "/", "/a/b.c/d..e/~x_y-z+1@2", "/a/%_[]\\'\""]
READ_HOMES = [
    "var/vmail/relative",
    "/var/vmail/with space",
    "/var/vmail/colon:x",
    "/var/vmail/a/../b",
    "/var/vmail/..",
    "/var/vmail/new\nline",
    "/var/vmail/tab\tx",
    "/var/vmail/\u00e9t\u00e9",
    "/var/vmail/nbsp\u00a0x",
    "/var/vmail/line\u2028sep",
    "/var/vmail/zero\u200bwidth",
    "",
]


def test_only_homes_the_database_proves_plain_are_left_unread(any_url: str) -> None:
    init_db(any_url)
    homes = PLAIN_HOMES + READ_HOMES
    engine = create_engine(any_url)
    with engine.begin() as conn:
        conn.execute(
            insert(t.mailstore).values(id=1, name="s1", lmtp_host="10.0.0.1", imap_host="10.0.0.1")
        )
        conn.execute(insert(t.domain).values(id=1, name="example.org", default_mailstore_id=1))
        for i, home in enumerate(homes, start=1):
            conn.execute(insert(t.account).values(id=i, domain_id=1, local_part=f"u{i}", home=home))
        conn.execute(insert(t.account).values(id=99, domain_id=1, local_part="nohome"))
    engine.dispose()
    source = BuiltinSource(any_url)
    try:
        mx = {a.id: a.home for a in source.snapshot().accounts}
        full = {a.id: a.home for a in source.snapshot(secrets=True).accounts}
    finally:
        source.close()
    assert full == {**{i: h for i, h in enumerate(homes, start=1)}, 99: None}
    for i, home in enumerate(homes, start=1):
        expected = None if home in PLAIN_HOMES else home
        assert mx[i] == expected, (home, mx[i])
    assert mx[99] is None


# --- the two largest reads, straight from the driver's cursor --------------------------------------


@pytest.mark.parametrize("secrets", [False, True], ids=["mx", "with-secrets"])
def test_plain_reads_give_the_rows_sqlalchemy_gives(
    tmp_path: Path, any_url: str, secrets: bool
) -> None:
    """The accounts and alias targets are read from the driver's cursor, without SQLAlchemy's
    Row objects (builtin._plain_stream): on each engine the rows must be exactly what the
    Row path gives, hostile homes and quotas included (the home's NULL-if-plain test runs in
    the database)."""
    prepare(tmp_path / "c", any_url)
    homes = [
        "/var/vmail/plain",
        "relative/home",
        "/with space",
        "/a/../b",
        "/tab\there",
        "/ünïcode",
        "/colon:here",
        "/trailing/..",
    ]
    execute(
        any_url,
        *(
            insert(t.account).values(
                domain_id=2,
                local_part=f"home{i}",
                status="active",
                home=home,
                quota_bytes=i * 1000,
                password_hash="{SHA512-CRYPT}$6$x$y",
            )
            for i, home in enumerate(homes)
        ),
    )
    source = BuiltinSource(any_url)
    source._secrets = secrets
    try:
        with source.reading("comparing") as conn:
            queries = [
                select(*source._account_columns(conn)).order_by(t.account.c.id),
                select(t.alias_target.c.alias_id, t.alias_target.c.target).order_by(
                    t.alias_target.c.alias_id, t.alias_target.c.target
                ),
            ]
            for query in queries:
                plain = list(_plain_stream(conn.execute(query)))
                rows = [tuple(row) for row in conn.execute(query)]
                assert len(rows) > 100
                assert plain == rows
                assert [tuple(map(type, r)) for r in plain] == [tuple(map(type, r)) for r in rows]
    finally:
        source.close()
    # And the snapshot read that way keeps the hostile homes (and only those, without the
    # secrets): validation sees them.
    reader = BuiltinSource(any_url)
    try:
        snap = reader.snapshot(secrets=secrets)
    finally:
        reader.close()
    kept = {a.local_part: a.home for a in snap.accounts if a.local_part.startswith("home")}
    if secrets:
        assert kept == {f"home{i}": home for i, home in enumerate(homes)}
    else:
        assert kept == {f"home{i}": (None if i == 0 else home) for i, home in enumerate(homes)}


def test_a_read_left_half_way_closes_its_cursor_without_a_traceback(
    tmp_path: Path, any_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A signal while the accounts stream in ends the transaction and closes the connection
    first; the stream goes later (with the traceback that held it). Closing its cursor then
    logged SQLAlchemy's "Error closing cursor" traceback on SQLite, on the terminal of an
    operator who had only pressed ^C or stopped the service."""
    prepare(tmp_path / "c", any_url)
    source = BuiltinSource(any_url)
    stream = None
    with caplog.at_level("ERROR"):
        try:
            with pytest.raises(SystemExit), source.reading("reading") as conn:
                stream = _plain_stream(conn.execute(select(t.account.c.id)))
                assert next(stream)
                raise SystemExit(143)  # as the signal handler does
        finally:
            source.close()
        del stream
        gc.collect()
    assert not [r for r in caplog.records if r.name.startswith("sqlalchemy")], caplog.text

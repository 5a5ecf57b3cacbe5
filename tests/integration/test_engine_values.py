"""Values particular to one database engine, in the tables the publisher reads: each is read
as the engine means it, or refused naming its table and row, never a failure naming nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from mapsync.config import MapConfig
from mapsync.errors import SourceError
from mapsync.sources.postfixadmin import PostfixAdminSource
from tests.conftest import make_cluster
from tests.helpers import postfixadmin as pfa


def _sql(url: str, *statements: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


@pytest.mark.postgresql
@pytest.mark.parametrize("modified", ["infinity", "-infinity"])
def test_postfixadmins_infinite_modified_on_postgresql_is_read(pg_url: str, modified: str) -> None:
    """PostfixAdmin's `modified` (a timestamptz) set to 'infinity' by hand: every publish
    failed with psycopg's "timestamp too large (after year 10K)", naming nothing. Now read as
    the latest time (an edit under it waits for the full check, as under any stamp ahead)."""
    pfa.build(pg_url, "", 1847)
    _sql(pg_url, f"UPDATE alias SET modified = '{modified}'")
    source = PostfixAdminSource(pg_url)
    try:
        before = source.fingerprint().tables["alias"]
        assert source.snapshot().aliases
        _sql(
            pg_url,
            "UPDATE alias SET modified = now() WHERE address = (SELECT min(address) FROM alias)",
        )
        assert (source.fingerprint().tables["alias"] != before) == (modified == "-infinity")
    finally:
        source.close()


NOT_TEXT = {
    # engine: (the column made another type, the table and column the refusal names)
    "postgresql-array": (
        "ALTER TABLE alias ALTER goto TYPE text[] USING string_to_array(goto, ',')",
        "'alias', row 'postmaster@example.com': goto is list",
    ),
    "postgresql-bytea": (
        "ALTER TABLE domain ALTER transport TYPE bytea USING convert_to(transport, 'UTF8')",
        "'domain', row 'ALL': transport is bytes",
    ),
    "mariadb-blob": (
        "ALTER TABLE mailbox MODIFY maildir BLOB NOT NULL",
        "'mailbox', row 'alice@example.com': maildir is bytes",
    ),
    # Read without a TypeError (bytes have lower() and strip()): the alias domains translated
    # nothing (their mail refused), the domains none of the mailboxes, and no error.
    "mariadb-varbinary-alias-domain": (
        "ALTER TABLE alias_domain MODIFY alias_domain VARBINARY(255) NOT NULL",
        "'alias_domain', row \"b'alias.example'\": alias_domain is bytes",
    ),
    "mariadb-varbinary-domain": (
        "ALTER TABLE domain MODIFY domain VARBINARY(255) NOT NULL",
        "'domain', row \"b'ALL'\": domain is bytes",
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=getattr(pytest.mark, case.partition("-")[0]))
        for case in sorted(NOT_TEXT)
    ],
)
def test_a_postfixadmin_text_column_of_another_type_is_named(
    case: str, request: pytest.FixtureRequest
) -> None:
    """A text column of PostfixAdmin's made an array, bytea or BLOB: every publish failed with
    'unexpected error: TypeError', naming nothing, and a BLOB maildir published the home
    "/var/vmail/b'example.com/alice/'" (mail delivered to a directory nobody reads). Now the
    table, the row and the column are named, and nothing is published."""
    url = request.getfixturevalue("pg_url" if case.startswith("postgresql") else "mariadb_url")
    alter, named = NOT_TEXT[case]
    pfa.build(url, "", 1847 if case.startswith("postgresql") else 1856)
    _sql(url, alter)
    source = PostfixAdminSource(url)
    try:
        with pytest.raises(SourceError, match=re.escape(f"PostfixAdmin table {named}, not text")):
            source.snapshot()
    finally:
        source.close()


@pytest.mark.mariadb
@pytest.mark.parametrize("how", ["?charset=utf8", "?read_default_file={cnf}", "?charset=latin1"])
def test_a_mariadb_session_not_in_utf8mb4_is_refused(
    tmp_path: Path, mariadb_url: str, how: str
) -> None:
    """A session in utf8mb3 (`?charset=utf8`, or `default-character-set = utf8` in the
    read_default_file docs/database.md suggests) reads a 4-byte character as '?': an alias
    target 'pizza🍕@example.net', refused in utf8mb4, was published as 'pizza?@example.net'
    (another address's mail). Now refused, naming the character set; utf8mb4 wins."""
    cnf = tmp_path / "my.cnf"
    cnf.write_text("[client]\ndefault-character-set = utf8\n")
    c = make_cluster(tmp_path / "c", mariadb_url, accounts=20, domains=3, aliases=5)
    _sql(
        mariadb_url,
        "INSERT INTO alias (domain_id, local_part) VALUES (1, 'pasta')",
        "INSERT INTO alias_target (alias_id, target) "
        "SELECT id, 'pizza🍕@example.net' FROM alias WHERE local_part = 'pasta'",
    )
    c.db_url = mariadb_url + how.format(cnf=cnf)
    c.write_config()
    p = c.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "the session's character set is " in p.stderr and "charset=utf8mb4" in p.stderr
    assert not (c.repo / "mx" / "LATEST").exists()
    wins = "&charset=utf8mb4" if "read_default_file" in how else ""
    c.db_url = mariadb_url + (how.format(cnf=cnf) + wins if wins else "?charset=utf8mb4")
    c.write_config()
    p = c.cli("publish")
    assert p.returncode == 2 and "target 'pizza🍕@example.net' has non-ASCII" in p.stderr, p.stderr


@pytest.mark.postgresql
def test_postfixadmins_cheap_fingerprint_is_the_snapshots_on_a_server_east_of_utc(
    pg_url: str,
) -> None:
    """The snapshot's read is in UTC; the cheap fingerprint read `modified` (a timestamptz)
    in the server's zone, never matched it, and every run read everything."""
    pfa.build(pg_url, "", 1847)
    _sql(pg_url, "ALTER DATABASE " + pg_url.rsplit("/", 1)[1] + " SET TimeZone = 'Asia/Tokyo'")
    source = PostfixAdminSource(pg_url)
    try:
        assert source.fingerprint() == source.snapshot().fingerprint
    finally:
        source.close()


@pytest.mark.postgresql
def test_the_operators_own_maps_on_the_main_database_keep_the_servers_zone(pg_url: str) -> None:
    """The publisher's own reads are in UTC (SET LOCAL TimeZone); a [publisher.maps] query
    on the main database ran in UTC with them, so one relying on the session's zone
    (current_date, localtimestamp: a list valid until a local time) changed its rows on
    upgrade, hours early or late. It runs in the server's zone, as it did, in the snapshot
    and in its fingerprint alike."""
    pfa.build(pg_url, "", 1847)
    _sql(pg_url, "ALTER DATABASE " + pg_url.rsplit("/", 1)[1] + " SET TimeZone = 'Asia/Tokyo'")
    source = PostfixAdminSource(pg_url)
    source.maps = (MapConfig("zone", "SELECT 'zone', current_setting('TimeZone')"),)
    try:
        snap = source.snapshot()
        assert snap.map_rows["zone"] == [("zone", "Asia/Tokyo")]
        assert source.maps_fingerprint()["map:zone"] == snap.fingerprint.tables["map:zone"]
        built_in = {k: v for k, v in snap.fingerprint.tables.items() if k != "map:zone"}
        assert source.fingerprint().tables == built_in  # the built-in reads still in UTC
    finally:
        source.close()

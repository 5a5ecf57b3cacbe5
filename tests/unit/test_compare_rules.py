"""The rules `mapsync compare` applies on the live side: Postfix's %-expansion of a table's
query and result_format (mysql_table(5)), SQL quoting as the drivers quote, and passwords
compared by what they are, not how the scheme is spelt."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import make_url

from mapsync.errors import ConfigError
from mapsync.publish.compare import password_key
from mapsync.sources.live import Connections, LiveLookupError, postfix_expand, sql_table

Q = "SELECT x FROM t WHERE a='%s' AND u='%u' AND d='%d'"


def test_a_full_address_expands_every_part() -> None:
    assert postfix_expand(Q, "bob@mail.example.com", "mysql") == (
        "SELECT x FROM t WHERE a='bob@mail.example.com' AND u='bob' AND d='mail.example.com'"
    )
    assert postfix_expand("%1 %2 %3 100%%", "bob@mail.example.com", "pgsql") == (
        "com example mail 100%"
    )


def test_postfix_suppresses_the_query_where_a_part_is_missing() -> None:
    assert postfix_expand(Q, "@example.com", "mysql") is None  # %u of an empty local part
    assert postfix_expand("SELECT '%d'", "example.com", "mysql") is None  # no domain
    assert postfix_expand("SELECT '%u'", "example.com", "mysql") == "SELECT 'example.com'"
    assert postfix_expand("SELECT '%3'", "bob@example.com", "mysql") is None  # too few labels


def test_quotes_in_a_key_cannot_end_the_string() -> None:
    # doubled for MySQL too (one quote in every sql_mode, NO_BACKSLASH_ESCAPES included)
    assert postfix_expand("'%s'", "o'neil@x.org", "mysql") == "'o''neil@x.org'"
    assert postfix_expand("'%s'", "o'neil@x.org", "pgsql") == "'o''neil@x.org'"
    assert postfix_expand("'%s'", "a\\b@x.org", "mysql") == "'a\\\\b@x.org'"


def test_result_format_expands_the_result_and_upper_case_the_key() -> None:
    got = postfix_expand("smtp:[%d] for %U", "bob@ex.org", "mysql", result="relay@host.net")
    assert got == "smtp:[host.net] for bob"


def test_result_format_digits_are_the_key_s_labels_as_in_postfix() -> None:
    # mysql_table(5): "%[SUD1-9] ... interpolate the parts of the input key rather than the
    # result" (db_common_expand splits the key's domain); the result needs no domain at all.
    got = postfix_expand("smtp:[%s.%2.%1]", "bob@mail.ex.org", "mysql", result="relay")
    assert got == "smtp:[relay.ex.org]"
    assert postfix_expand("%3", "bob@ex.org", "mysql", result="relay@a.b.c") is None


def test_an_empty_domain_suppresses_like_a_missing_one() -> None:
    # db_common_expand: "!vdomain || !*vdomain" with %d: a key or result "user@" is skipped.
    assert postfix_expand("SELECT '%d'", "bob@", "mysql") is None
    assert postfix_expand("SELECT '%1'", "bob@", "mysql") is None
    assert postfix_expand("smtp:%d", "bob@ex.org", "mysql", result="relay@") is None


def test_an_unknown_expansion_is_refused_naming_where() -> None:
    with pytest.raises(ConfigError, match=r"x\.cf: query: unsupported expansion %x"):
        postfix_expand("'%x'", "a@b", "mysql", where="x.cf: query")


def test_passwords_compare_by_what_they_are() -> None:
    sha512 = "$6$salt$hash"
    # PostfixAdmin's bare crypt, Dovecot's {SHA512-CRYPT} and {CRYPT}: one password.
    assert password_key(sha512) == password_key("{SHA512-CRYPT}" + sha512)
    assert password_key(sha512) == password_key("{CRYPT}" + sha512)
    assert password_key(sha512) != password_key("$6$salt$other")
    assert password_key("{SSHA}abc") == "{SSHA}abc"
    assert password_key("93e8621c72995dba43c2cff6d64f3e93") == (
        "{PLAIN-MD5}93e8621c72995dba43c2cff6d64f3e93"
    )
    assert password_key("secret") == "{CLEARTEXT}secret"
    assert password_key("") is None


def test_a_sqlite_table_answers_as_postfix_with_domain_result_format_and_legacy_keys(
    tmp_path: Path,
) -> None:
    db = tmp_path / "t.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE alias (address TEXT, goto TEXT, active INT)")
        conn.executemany(
            "INSERT INTO alias VALUES (?, ?, ?)",
            [
                ("a@ex.org", "b@ex.org", 1),
                ("a@ex.org", "c@ex.org", 1),  # several rows: joined by commas
                ("x@other.org", "y@ex.org", 1),
                ("@ex.org", "catch@ex.org", 1),
                ("n@ex.org", "", 1),  # an empty value is no answer
            ],
        )
    cf = tmp_path / "alias.cf"
    cf.write_text(
        f"dbpath = {db}\ndomain = ex.org\nresult_format = smtp:%s\n"
        "# the old form: Postfix builds the query\ntable = alias\nselect_field = goto\n"
        "where_field = address\n"
        "additional_conditions = AND active = 1\n   ORDER BY goto\n"
    )
    table = sql_table("sqlite", cf)
    db_ = Connections()
    try:
        assert table.lookup("A@ex.org", db_) == "smtp:b@ex.org,smtp:c@ex.org"
        assert table.lookup("x@other.org", db_) is None  # not in `domain`
        assert table.lookup("@ex.org", db_) is None  # `domain` allows user@domain keys only
        assert table.lookup("n@ex.org", db_) is None
        assert table.lookup("o'hare@ex.org", db_) is None  # quoted, not an SQL error
    finally:
        db_.close()


def test_compare_only_reads_the_database_whatever_a_query_says(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE alias (address TEXT, goto TEXT)")
    cf = tmp_path / "bad.cf"
    cf.write_text(f"dbpath = {db}\nquery = DELETE FROM alias WHERE address = '%s'\n")
    with pytest.raises(ConfigError, match=rf"{cf}: query: only SELECT queries .* not DELETE"):
        sql_table("sqlite", cf)
    # A write disguised as a WITH query is refused by the read-only session itself.
    cf.write_text(
        f"dbpath = {db}\n"
        "query = WITH x AS (SELECT 1) INSERT INTO alias SELECT '%s', 'evil@x.org' FROM x\n"
    )
    table = sql_table("sqlite", cf)
    connections = Connections()
    try:
        with pytest.raises(LiveLookupError, match=rf"{cf}: query for 'a@ex.org'.*readonly"):
            table.lookup("a@ex.org", connections)
    finally:
        connections.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM alias").fetchone() == (0,)


def test_a_pgsql_table_whose_hosts_is_a_connection_uri_is_read(tmp_path: Path, pg_url: str) -> None:
    # pgsql_table(5): hosts may be a postgresql:// URI, given to libpq whole (no dbname key);
    # compare made the URI a host name and failed with "invalid literal for int()".
    url = make_url(pg_url)
    cf = tmp_path / "uri.cf"
    cf.write_text(
        f"hosts = postgresql://{url.username}@{url.host}:{url.port}/{url.database}\n"
        "query = SELECT 'ok:' || '%s'\n"
    )
    connections = Connections()
    try:
        assert sql_table("pgsql", cf).lookup("o'neil@x.org", connections) == "ok:o'neil@x.org"
    finally:
        connections.close()
    cf.write_text("hosts = postgresql://db.example:notaport/mail\nquery = SELECT 1\n")
    with pytest.raises(ConfigError, match=rf"{cf}: hosts: not a valid postgresql:// URI"):
        sql_table("pgsql", cf)

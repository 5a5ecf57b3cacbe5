"""Any schema, read by the operator's SELECTs (``schema = "sql"``): the PostfixAdmin query
set of docs/sql-schema.md answers as ``schema = "postfixadmin"`` except where the docs name a
difference; mapsync's own schema read through SQL publishes the very bytes
``schema = "mapsync"`` does; and every hostile value a query can return, every missing column
and every config mistake is a clear error naming the query and the row or column.
(tests/daemons/test_sql_schema.py checks the iRedMail set with real Postfix and Dovecot.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text

from mapsync import config
from mapsync.config import SqlConfig
from mapsync.errors import ConfigError, SourceError
from mapsync.formats import text as text_map
from mapsync.sources.sql import SqlSource
from mapsync.validate import check
from tests.conftest import Cluster
from tests.helpers import postfixadmin as pfa
from tests.helpers import sqlschema as sq
from tests.helpers.publisher import keys, lines

# --- PostfixAdmin through SQL --------------------------------------------------------------

# Where the documented PostfixAdmin query set answers differently from schema = "postfixadmin"
# (docs/sql-schema.md lists why), by address: (postfixadmin's answer, the SQL set's answer).
PFA_DIFFERENCES = {
    # Aliases on an alias domain are no rows of mapsync's model: it reaches sales@example.com.
    "sales@alias.example": (
        {"dave@example.com", "dave@elsewhere.example"},
        {
            "alice@example.com",
            "bob@example.com",
            f"bob#example.com@{pfa.VACATION_DOMAIN}",
            "partner@external.example",
        },
    ),
    "nobody@alias2.example": ({"postmaster@example.com"}, None),
    # Domain-wide forwards are left out: the forwarded domain keeps only its own addresses.
    "alice@old.example": ({"alice@example.com"}, None),
    "nobody@old.example": ({"postmaster@example.com"}, None),
    "alice@old2.example": ({"alice@example.com"}, None),
    "sales@old2.example": ({"dave@example.com", "dave@elsewhere.example"}, None),
    "nobody@old2.example": ({"postmaster@example.com"}, None),
    "alice@multi.example": ({"alice@example.com", "archive@external.example"}, None),
    "nobody@multi.example": ({"postmaster@example.com", "archive@external.example"}, None),
    # A target that receives nothing here: schema = "postfixadmin" leaves it out (what
    # PostfixAdmin itself leaves behind); the SQL set refuses the row (skipped here).
    "crew@lmtp.example": ({"erin@lmtp.example"}, None),
    "grp@lmtp.example": ({"erin@lmtp.example"}, None),
}


def _answers(cluster: Cluster) -> dict[str, set[str] | None]:
    """Per address of the PostfixAdmin data set: its final recipients, or None if refused.
    (Both sides are maps mapsync published: read as text, not through postmap, which the
    tests of schema = "postfixadmin" already hold to PostfixAdmin's own lookups.)"""
    mx = cluster.root / "nodes" / "mx"
    recipients, virtual = (
        {k.decode(): v.decode() for k, v in text_map.pairs(mx / name)}.get
        for name in ("recipients", "virtual")
    )
    out: dict[str, set[str] | None] = {}
    for address in pfa.addresses():
        domain = address.rpartition("@")[2]
        accepted = recipients(address) is not None or recipients(f"@{domain}") is not None
        out[address] = pfa.resolve(address, virtual) if accepted else None
    return out


@pytest.mark.parametrize("engine", sq.query_set("postfixadmin")[1])
def test_the_postfixadmin_query_set_answers_as_the_postfixadmin_schema(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    body = sq.query_set("postfixadmin")[0]
    if engine == "SQLite":
        url = f"sqlite:///{tmp_path / 'postfixadmin.db'}"
    else:
        url = request.getfixturevalue(sq.ENGINES[engine])
    pfa.build(url)
    by_sql = sq.write_config(tmp_path / "sql", url, body)
    by_sql.publish("--skip-invalid", "--channel", "mx")
    by_sql.pull("--channel", "mx")
    native = sq.write_config(
        tmp_path / "pfa",
        url,
        f'[publisher.postfixadmin]\nvacation_domain = "{pfa.VACATION_DOMAIN}"\n'
        f'vacation_nexthop = "{pfa.VACATION_NEXTHOP}"\n'
        '[publisher.postfixadmin.mailstores.local]\nlmtp_host = "127.0.0.1"\n'
        '[publisher.postfixadmin.mailstores.store-2]\nlmtp_host = "10.0.1.12"\n'
        'domains = ["lmtp.example", "alias2.*"]\n',
    )
    native.config_path.write_text(
        native.config_path.read_text().replace('schema = "sql"', 'schema = "postfixadmin"')
    )
    native.publish("--skip-invalid", "--channel", "mx")
    native.pull("--channel", "mx")
    got, expected = _answers(by_sql), _answers(native)
    differences = {a: (expected[a], got[a]) for a in expected if expected[a] != got[a]}
    assert differences == PFA_DIFFERENCES
    assert sum(1 for v in got.values() if v) >= 25
    # Same routes and the same sender logins for every address either publishes.
    for name in ("transport", "senders", "domains"):
        ours = dict(text_map.pairs(by_sql.root / "nodes" / "mx" / name))
        theirs = dict(text_map.pairs(native.root / "nodes" / "mx" / name))
        if name == "domains":
            # The SQL set's alias domains stay domains; postfixadmin's too: the same keys.
            assert set(ours) == set(theirs)
        else:
            common = set(ours) & set(theirs)
            assert len(common) >= 3 and all(ours[k] == theirs[k] for k in common), name


def test_a_missing_column_names_the_query_the_column_and_what_the_query_returns(
    tmp_path: Path,
) -> None:
    url = sq.small_db(tmp_path)
    source = sq.small_source(url, accounts="SELECT address AS email, status FROM a")
    with pytest.raises(SourceError) as err:
        source.snapshot()
    assert str(err.value) == (
        "[publisher.sql] accounts: the query returns no column 'address or local_part+domain' "
        "(it returns: email, status; docs/sql-schema.md lists the columns)"
    )
    source = sq.small_source(url, aliases="SELECT address FROM al")
    with pytest.raises(SourceError, match=r"aliases: the query returns no column 'targets'"):
        source.snapshot()
    # dovecot_users needs the hash: said when a channel carries it, not on an MX run.
    source = sq.small_source(url, accounts="SELECT address FROM a")
    assert source.snapshot(secrets=False).accounts
    with pytest.raises(SourceError, match=r"no column 'password_hash', which dovecot_users"):
        source.snapshot(secrets=True)
    source = sq.small_source(url, domains="SELECT name FROM nowhere")
    with pytest.raises(SourceError, match=r"\[publisher.sql\] domains: the query failed on "):
        source.snapshot()


def test_hostile_values_are_invalid_rows_named_by_query_and_key(tmp_path: Path) -> None:
    url = sq.small_db(
        tmp_path,
        "INSERT INTO a VALUES ('new\nline@example.org', 'active', '/m/x', NULL, 1)",
        "INSERT INTO a VALUES ('nul' || char(0) || '@example.org', 'active', '/m/y', NULL, 1)",
        "INSERT INTO a VALUES (NULL, 'active', '/m/z', NULL, 1)",
        "INSERT INTO a VALUES (42, 'active', '/m/w', NULL, 1)",
        "INSERT INTO a VALUES ('kim@example.org', 'gone', '/m/k', NULL, 1)",
        "INSERT INTO a VALUES ('lee@nowhere.example', 'active', '/m/l', NULL, 1)",
        "INSERT INTO a VALUES ('Postmaster@example.org', 'active', '/m/p2', NULL, 1)",
        # U+212A KELVIN SIGN lowercases to an ASCII 'k': kept as it is, and refused.
        "INSERT INTO a VALUES ('\u212aim@example.org', 'active', '/m/k2', NULL, 1)",
        # A row that is off is left out whatever else is wrong with it.
        "INSERT INTO a VALUES (NULL, 'disabled', NULL, NULL, 1)",
        "INSERT INTO al VALUES ('sales@example.org', 'a@example.net,b@example.net\n"
        "evil@example.net extra@x:y')",
        "INSERT INTO al VALUES ('list@example.org', 'a@example.net')",
        "INSERT INTO al VALUES ('list@example.org', 'b@example.net')",
        "INSERT INTO d VALUES ('example.org', 'hosted', NULL)",
        "INSERT INTO d VALUES ('bad.example', 'weird', NULL)",
    )
    problems = sq.small_problems(url)
    expected = [
        "[publisher.sql] domains row 2 (name='example.org', kind='hosted', mailstore=None): "
        "domain 'example.org' is also defined by [publisher.sql] domains 'example.org'",
        "[publisher.sql] domains row 3 (name='bad.example', kind='weird', mailstore=None): "
        "kind 'weird' is not one of hosted, relay, alias",
        "[publisher.sql] accounts row 4 (address=None, status='active', home='/m/z'): "
        "column 'address' is NULL",
        # SQLite's TEXT affinity stored 42 as '42'
        "[publisher.sql] accounts row 5 (address='42', status='active', home='/m/w'): "
        "address '42' has no '@'",
        "[publisher.sql] accounts row 6 (address='kim@example.org', status='gone', "
        "home='/m/k'): status 'gone' is not one of active, login_disabled, disabled, moving",
        "[publisher.sql] accounts row 7 (address='lee@nowhere.example', status='active', "
        "home='/m/l'): domain 'nowhere.example' is no domain of [publisher.sql] domains",
        "[publisher.sql] accounts 'new\\nline@example.org': local part has characters",
        "[publisher.sql] accounts 'nul\\x00@example.org': local part has characters",
        # The row written in lowercase is used whatever the query's order; the other named.
        "[publisher.sql] accounts row 8 (address='Postmaster@example.org', status='active', "
        "home='/m/p2'): address also defined by [publisher.sql] accounts 'postmaster@example.org'",
        "[publisher.sql] accounts '\u212aim@example.org': local part not lowercase",
        "[publisher.sql] aliases 'sales@example.org': target 'extra@x:y'",
    ]
    for want in expected:
        assert any(want in p for p in problems), (want, problems)
    assert len(problems) == len(expected), problems
    # One row per target is merged; a list split on commas and whitespace: each target is
    # checked on its own, so a newline in a list adds a target, never a map line.
    source = sq.small_source(url)
    snap = source.snapshot()
    source.close()
    merged = {al.local_part: al.targets for al in snap.aliases}
    assert merged["list"] == ("a@example.net", "b@example.net")
    assert merged["sales"] == (
        "a@example.net",
        "b@example.net",
        "evil@example.net",
        "extra@x:y",
    )


def test_rows_of_one_address_or_domain_are_chosen_alike_whatever_the_querys_order(
    tmp_path: Path,
) -> None:
    """Two accounts of one address differing in case: the row written in lowercase is used
    and the other named, in either order (the first the query returned was used: an UPDATE
    that moved a row swapped hash and home under --skip-invalid). A disabled domain row beside
    an active one of the same name is left out in either order (first, it refused the active
    one). A negative quota is refused, not published as no limit."""
    rows = [
        "INSERT INTO a VALUES ('Bob@Example.org', 'active', '/m/stale', '{BLF-CRYPT}$2y$s', 1)",
        "INSERT INTO a VALUES ('bob@example.org', 'active', '/m/bob', '{BLF-CRYPT}$2y$b', 1)",
    ]
    for n, order in enumerate((rows, rows[::-1])):
        (tmp_path / f"a{n}").mkdir()
        url = sq.small_db(tmp_path / f"a{n}", *order)
        source = sq.small_source(url)
        snap = source.snapshot()
        source.close()
        bob = [a for a in snap.accounts if a.local_part == "bob"]
        assert [a.home for a in bob] == ["/m/bob"], order
        assert [p.key for p in snap.problems] == ["Bob@Example.org"], order
    # A disabled row takes no part (it won when first: the active one was refused); with
    # local_part and domain columns instead of address the lowercase row is used the same.
    split = (
        "SELECT substr(address, 1, instr(address, '@') - 1) AS local_part, "
        "substr(address, instr(address, '@') + 1) AS domain, status, home FROM a"
    )
    off = [
        "INSERT INTO a VALUES ('Bob@Example.org', 'active', '/m/bob', '{BLF-CRYPT}$2y$b', 1)",
        "INSERT INTO a VALUES ('bob@example.org', 'disabled', '/m/off', '{BLF-CRYPT}$2y$o', 1)",
    ]
    cases = [(off, {}, "/m/bob"), (off[::-1], {}, "/m/bob")]
    cases += [(rows, {"accounts": split}, "/m/bob"), (rows[::-1], {"accounts": split}, "/m/bob")]
    for n, (order, queries, home) in enumerate(cases):
        (tmp_path / f"b{n}").mkdir()
        source = sq.small_source(sq.small_db(tmp_path / f"b{n}", *order), **queries)
        snap = source.snapshot()
        source.close()
        used = [a.home for a in snap.accounts if a.local_part == "bob" and a.status != "disabled"]
        assert used == [home], (order, queries, used)
    domains = [
        "INSERT INTO d VALUES ('Other.EXAMPLE', 'hosted', NULL)",
        "INSERT INTO d VALUES ('other.example', 'hosted', NULL)",
    ]
    queries = {
        "domains": "SELECT name, kind, store AS mailstore, "
        "CASE WHEN name = lower(name) THEN 1 ELSE 0 END AS active FROM d"
    }
    for n, order in enumerate((domains, domains[::-1])):
        (tmp_path / f"d{n}").mkdir()
        url = sq.small_db(tmp_path / f"d{n}", *order)
        assert sq.small_problems(url, **queries) == [], order
    (tmp_path / "quota").mkdir()
    url = sq.small_db(
        tmp_path / "quota",
        "INSERT INTO a VALUES ('neg@example.org', 'active', '/m/n', '{BLF-CRYPT}$2y$n', -5)",
    )
    quota = "SELECT address, status, home, pw AS password_hash, port AS quota_bytes FROM a"
    problems = sq.small_problems(url, secrets=True, accounts=quota)
    assert any("neg@example.org" in p and "negative" in p for p in problems), problems


def test_a_wrong_type_in_a_mailstore_port_is_that_mailstores_problem(tmp_path: Path) -> None:
    url = sq.small_db(
        tmp_path,
        "CREATE TABLE s (name TEXT, host TEXT, port)",
        "INSERT INTO s VALUES ('store-1', '10.0.1.11', '24 host=evil')",
        "INSERT INTO s VALUES ('store-2', '10.0.1.12', 2424)",
        "UPDATE d SET store = 'store-2'",
    )
    problems = sq.small_problems(
        url, mailstores="SELECT name, host AS lmtp_host, port AS lmtp_port FROM s"
    )
    assert problems == [
        "[publisher.sql] mailstores 'store-1': lmtp_port '24 host=evil' is not a number"
    ]
    # A mailstore nobody defines is the domain's problem: its rows are still read (and
    # its accounts, then housed nowhere, are named too).
    problems = sq.small_problems(
        url,
        mailstores="SELECT name, host AS lmtp_host, port AS lmtp_port FROM s",
        domains="SELECT name, kind, 'store-9' AS mailstore FROM d",
    )
    assert problems == [
        "[publisher.sql] domains 'example.org': mailstore 'store-9' is no mailstore "
        "(known: store-1, store-2)",
        "[publisher.sql] mailstores 'store-1': lmtp_port '24 host=evil' is not a number",
        "[publisher.sql] accounts 'postmaster@example.org': resolves to no mailstore",
    ]


def test_an_mx_publish_reads_no_password_hash_and_skip_invalid_leaves_a_bad_row_out(
    tmp_path: Path,
) -> None:
    url = sq.small_db(tmp_path, "INSERT INTO a VALUES ('kim@example.org', 'gone', '/m/k', NULL, 1)")
    source = sq.small_source(url)
    snap = source.snapshot(secrets=False)
    assert all(a.password_hash is None for a in snap.accounts)
    assert source.snapshot(secrets=True).accounts[0].password_hash == "{BLF-CRYPT}$2y$x"
    source.close()
    sql = "[publisher.sql]\n" + "".join(f'{k} = "{v}"\n' for k, v in sq.BASE.items())
    cluster = sq.write_config(tmp_path / "c", url, sql, maps=("domains", "recipients"))
    refused = cluster.cli("publish", "--channel", "mx")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "[publisher.sql] accounts row 2 (address='kim@example.org'" in refused.stderr
    assert "Traceback" not in refused.stderr
    run = cluster.publish("--skip-invalid", "--channel", "mx")
    assert "skipped 1 invalid row(s)" in run.stdout, run.stdout
    cluster.pull("--channel", "mx")
    recipients = {k for k, _ in text_map.pairs(cluster.root / "nodes" / "mx" / "recipients")}
    assert recipients == {b"postmaster@example.org", b"info@example.org"}


def test_a_fingerprint_query_makes_nothing_changed_cheap(tmp_path: Path) -> None:
    url = sq.small_db(tmp_path)
    fingerprint = "SELECT (SELECT COUNT(*) FROM a), (SELECT COUNT(*) FROM al)"
    sql = (
        "[publisher.sql]\n"
        + "".join(f'{k} = "{v}"\n' for k, v in sq.BASE.items())
        + f'fingerprint = "{fingerprint}"\n'
    )
    cluster = sq.write_config(tmp_path / "c", url, sql, maps=("domains", "recipients"))
    cluster.publish("--channel", "mx")
    again = cluster.cli("publish", "--channel", "mx", check=True)
    assert "unchanged (serial 1)" in again.stdout
    assert "reading snapshot" not in again.stderr  # the fingerprint said so: no rows read
    db = create_engine(url)
    with db.begin() as conn:
        conn.execute(text("INSERT INTO al VALUES ('sales@example.org', 'postmaster@example.org')"))
    db.dispose()
    cluster.publish("--channel", "mx")
    assert "sales@example.org" in keys(cluster, "mx", "recipients")
    # A fingerprint returning other than one row is named.
    source = SqlSource(
        url, SqlConfig(dict(sq.BASE), fingerprint="SELECT address FROM a WHERE 1 = 0")
    )
    with pytest.raises(SourceError, match=r"fingerprint: must return exactly one row, returned 0"):
        source.fingerprint()
    source.close()


def test_only_the_contract_columns_are_fetched_and_hashes_only_for_dovecot_users(
    tmp_path: Path,
) -> None:
    url = sq.small_db(tmp_path)
    source = sq.small_source(url, accounts="SELECT *, pw AS password_hash FROM a")
    sent: list[str] = []
    event.listen(source.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: sent.append(sql))
    # Without a fingerprint query the check is a full read, kept for the snapshot after it.
    first = source.fingerprint(secrets=False)
    snap = source.snapshot(secrets=False)
    assert snap.fingerprint == first
    fetched = [s for s in sent if "WHERE 1 = 0" not in s and "FROM (SELECT *, pw" in s]
    assert len(fetched) == 1, sent  # read once for both
    (mx_read,) = fetched
    assert mx_read.startswith("SELECT address, status, home FROM (")  # no hash, no port
    sent.clear()
    assert source.snapshot(secrets=True).accounts[0].password_hash == "{BLF-CRYPT}$2y$x"
    (store_read,) = [s for s in sent if "WHERE 1 = 0" not in s and "FROM (SELECT *, pw" in s]
    assert store_read.startswith("SELECT address, status, home, password_hash FROM (")
    source.close()


def test_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    url = sq.small_db(tmp_path)

    def load(sql: str) -> str:
        cluster = sq.write_config(tmp_path / f"c{len(list(tmp_path.iterdir()))}", url, sql)
        with pytest.raises(ConfigError) as err:
            config.load(cluster.config_path)
        return str(err.value)

    queries = "".join(f'{k} = "{v}"\n' for k, v in sq.BASE.items())
    assert load("[publisher.sql]\n" + queries + 'acounts = "SELECT 1"\n').endswith(
        "[publisher.sql] acounts: unknown key (known: accounts, alias_domains, aliases, "
        "domains, fingerprint, forwards, mailstore, mailstores, sender_grants)"
    )
    missing = queries.replace(f'aliases = "{sq.BASE["aliases"]}"\n', "")
    assert load("[publisher.sql]\n" + missing).endswith(
        "[publisher.sql] aliases: missing (required)"
    )
    assert load("[publisher.sql]\n" + queries + 'forwards = "DELETE FROM al"\n').endswith(
        "[publisher.sql] forwards: must be one SELECT (or WITH ... SELECT)"
    )
    assert load("[publisher.sql]\n" + queries + 'forwards = "SELECT 1; DROP TABLE al"\n').endswith(
        "[publisher.sql] forwards: must be one statement (no ';' inside, not even in a string: "
        "write chr(59))"
    )
    assert load("[publisher.sql]\n" + queries + 'mailstore = "store-9"\n').endswith(
        "[publisher.sql] mailstore: no mailstore 'store-9' in [publisher.sql.mailstores] "
        "(known: local)"
    )
    # A trailing ';' is fine: the query is wrapped without it.
    cluster = sq.write_config(
        tmp_path / "ok", url, "[publisher.sql]\n" + queries.replace('FROM al"', 'FROM al;"')
    )
    assert (
        config.load(cluster.config_path).need_publisher().sql.queries["aliases"]
        == (sq.BASE["aliases"])
    )


def test_rows_link_by_name_across_queries(tmp_path: Path) -> None:
    url = sq.small_db(
        tmp_path,
        "CREATE TABLE g (login TEXT, may TEXT, on_ INTEGER)",
        "INSERT INTO g VALUES ('Postmaster@example.org', 'noreply@example.org', 1)",
        "INSERT INTO g VALUES ('postmaster@example.org', '@example.net', 't')",
        "INSERT INTO g VALUES ('ghost@example.org', 'x@example.org', 1)",
        "INSERT INTO g VALUES ('ghost@example.org', 'y@example.org', 0)",  # off: not checked
        "CREATE TABLE ad (name TEXT, target TEXT, on_ TEXT)",
        "INSERT INTO ad VALUES ('example.net', 'example.org', 'yes')",
        "INSERT INTO ad VALUES ('other.example', 'nowhere.example', 'yes')",
        "INSERT INTO ad VALUES ('maybe.example', 'example.org', 'perhaps')",
    )
    source = sq.small_source(
        url,
        # The two halves of an address instead of the whole: NULL local part = catch-all.
        aliases="SELECT NULL AS local_part, 'example.org' AS domain, 'postmaster@example.org'"
        " AS targets UNION ALL SELECT 'info', 'EXAMPLE.ORG', 'postmaster@example.org'",
        sender_grants="SELECT login AS account, may AS address, on_ AS active FROM g",
        alias_domains="SELECT name, target, on_ AS active FROM ad",
    )
    snap = source.snapshot()
    source.close()
    (postmaster,) = snap.accounts
    assert {(g.account_id, g.address) for g in snap.sender_grants} == {
        (postmaster.id, "noreply@example.org"),
        (postmaster.id, "@example.net"),
    }
    assert sorted(al.local_part for al in snap.aliases) == ["", "info"]
    by_name = {d.name: d for d in snap.domains}
    assert by_name["example.net"].kind == "alias"
    assert by_name["example.net"].target_domain_id == by_name["example.org"].id
    assert [str(p) for p in check(snap)] == [
        "[publisher.sql] alias_domains row 3 (name='maybe.example', target='example.org', "
        "active='perhaps'): column 'active' is 'perhaps', not a boolean (true/false, 1/0)",
        "[publisher.sql] alias_domains 'other.example': target 'nowhere.example' is no domain "
        "of [publisher.sql] domains",
        "[publisher.sql] sender_grants row 3 (account='ghost@example.org', "
        "address='x@example.org', active=1): account 'ghost@example.org' is no account of "
        "[publisher.sql] accounts",
    ]


# --- mapsync's own schema through SQL ------------------------------------------------------

MAPS = ("domains", "recipients", "virtual", "transport", "senders")


@pytest.mark.parametrize("engine", sq.query_set("mapsync")[1])
def test_mapsyncs_own_schema_through_sql_publishes_the_same_bytes(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if engine == "SQLite":
        url = f"sqlite:///{tmp_path / 'central.db'}"
    else:
        url = request.getfixturevalue(sq.ENGINES[engine])
    sq.seed_every_case(url)
    by_sql = sq.write_config(tmp_path / "sql", url, sq.query_set("mapsync")[0])
    native = sq.write_config(tmp_path / "native", url, "")
    native.config_path.write_text(
        native.config_path.read_text().replace('schema = "sql"', 'schema = "mapsync"')
    )
    for cluster in (by_sql, native):
        cluster.publish()
    for channel, maps in (("mx", MAPS), ("store", ("dovecot_users",))):
        for name in maps:
            ours = lines(by_sql, channel, name)
            assert ours == lines(native, channel, name), (engine, channel, name)
            assert ours or name == "senders", (channel, name)
    recipients = keys(by_sql, "mx", "recipients")
    assert "@relay-client.example" in recipients
    assert any(k.startswith("expiring@") for k in recipients)
    assert not any(k.startswith("expired@") for k in recipients)
    # Its fingerprint query: nothing changed is seen without reading a row.
    again = by_sql.cli("publish", check=True)
    assert "reading snapshot" not in again.stderr and "unchanged (serial 1)" in again.stdout
    if engine != "SQLite":
        return
    # Plan, publish, diff and history, as with any schema: a new alias row.
    db = create_engine(url)
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO alias_target (alias_id, target, updated_at)"
                " VALUES (992, 'second@external.example', '2030-01-01 00:00:00')"
            )
        )
    db.dispose()
    plan = by_sql.cli("publish", "--dry-run", "--channel", "mx")
    assert plan.returncode == 1, plan.stdout + plan.stderr  # changes pending
    assert "would publish serial 2" in plan.stdout, plan.stdout
    (virtual_row,) = [line.split() for line in plan.stdout.splitlines() if "virtual" in line]
    before, after, added, removed, changed = virtual_row[1:]
    assert before == after and (added, removed, changed) == ("0", "0", "1"), plan.stdout
    by_sql.publish("--channel", "mx")
    diff = by_sql.cli("diff", "--channel", "mx", "--keys", "1", "2", check=True)
    assert "expiring@" in diff.stdout, diff.stdout
    history = by_sql.cli("history", "--channel", "mx", check=True)
    assert "2" in history.stdout


@pytest.mark.parametrize("engine", ["SQLite", "PostgreSQL"])
def test_a_query_that_writes_is_refused_by_the_read_only_transaction(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # A WITH passes the config's check (it starts no SELECT, but may end in one): the
    # transaction is what refuses the write.
    if engine == "SQLite":
        url = sq.small_db(tmp_path)
        writes = (
            "WITH x AS (SELECT 1) INSERT INTO al SELECT 'x@example.org', 'y@example.org' FROM x"
        )
    else:
        url = request.getfixturevalue("pg_url")
        sq.fill_small(url)
        writes = "WITH d AS (DELETE FROM al RETURNING 1) SELECT COUNT(*) FROM d"
    source = SqlSource(url, SqlConfig(dict(sq.BASE), fingerprint=writes))
    with pytest.raises(SourceError, match=r"fingerprint: the query failed .*(read-only|readonly)"):
        source.fingerprint()
    source.close()
    db = create_engine(url)
    with db.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM al")).scalar() == 1
    db.dispose()


def test_a_column_spelt_in_capitals_is_found_and_read_as_spelt(pg_url: str) -> None:
    # PostgreSQL keeps a quoted alias's case: the column is matched case-insensitively and
    # read back quoted as the query spells it.
    sq.fill_small(pg_url)
    source = sq.small_source(
        pg_url, accounts='SELECT address AS "Address", status AS "STATUS", home FROM a'
    )
    snap = source.snapshot()
    source.close()
    assert [(a.local_part, a.status, a.home) for a in snap.accounts] == [
        ("postmaster", "active", "/m/pm")
    ]


def test_maps_of_the_operators_own_are_read_in_the_same_snapshot(tmp_path: Path) -> None:
    url = sq.small_db(tmp_path)
    sql = (
        "[publisher.sql]\n"
        + "".join(f'{k} = "{v}"\n' for k, v in sq.BASE.items())
        + "[publisher.maps.access]\nquery = \"SELECT address, 'OK' FROM a\"\n"
    )
    cluster = sq.write_config(tmp_path / "c", url, sql, maps=("recipients", "access"))
    cluster.publish("--channel", "mx")
    assert lines(cluster, "mx", "access") == ["postmaster@example.org OK"]
    assert "info@example.org" in keys(cluster, "mx", "recipients")

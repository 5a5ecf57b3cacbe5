"""Maps of the operator's own (``[publisher.maps.NAME]``): a Postfix access list, a per-domain
TLS policy, relay credentials (secret) and a text-only list, read from tables of the operator's
own, published with the built-in maps, pulled by a node over rsync and read by real Postfix."""

from __future__ import annotations

import json
import os
import stat

import pytest
from sqlalchemy import create_engine
from sqlalchemy import text as sql

from mapsync.formats import text
from mapsync.sources import schema as t
from tests.conftest import Cluster
from tests.helpers.agent import postmap, postmap_q
from tests.helpers.own_maps import (
    OWN_MAPS,
    list_own_maps,
    own_tables,
    run_sql,
)
from tests.helpers.publisher import account_on, keys, lines, manifest, set_row
from tests.helpers.transport import RsyncDaemon


def test_own_maps_reach_postfix_through_an_rsync_daemon(cluster: Cluster) -> None:
    own_tables(cluster.db_url)
    daemon = RsyncDaemon(cluster.root / "rsyncd", cluster.repo)
    try:
        list_own_maps(cluster, source=daemon.url())
        cluster.publish()
        proc = cluster.pull()
    finally:
        daemon.stop()
    live = cluster.target
    # check_recipient_access: the key lowercased as Postfix looks it up, whatever its case.
    assert postmap_q("spam-trap@example-1.org", live / "recipient_access") == (
        "REJECT this address takes no mail"
    )
    assert postmap_q("SPAM-TRAP@EXAMPLE-1.ORG", live / "recipient_access") == (
        "REJECT this address takes no mail"
    )
    assert postmap_q("abuse@example-2.org", live / "recipient_access") == "OK"
    assert postmap_q("nobody@example-2.org", live / "recipient_access") is None
    # smtp_tls_policy_maps: the value's spaces and '=' intact.
    assert postmap_q("example.net", live / "tls_policy") == "secure match=.example.net"
    assert postmap_q("bank.example", live / "tls_policy") == "verify match=hostname"
    # smtp_sasl_password_maps: a key with ':' and brackets; secret, so 0640 like dovecot_users.
    assert postmap_q("[smtp.relay.example]:587", live / "sasl_passwords") == (
        "relayuser:s3cret-relay-pass"
    )
    assert stat.S_IMODE(os.stat(live / "sasl_passwords.cdb").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(live / "sasl_passwords").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(live / "tls_policy.cdb").st_mode) == 0o644
    # Pulled from a module anyone may read: the node says so, as for password hashes.
    assert "pulled without authentication" in proc.stderr
    assert "sasl_passwords" in proc.stderr
    # cdb = false: text only, which Postfix reads as texthash:.
    assert not (live / "ticket_addresses.cdb").exists()
    code, value, err = postmap("support@example-1.org", f"texthash:{live / 'ticket_addresses'}")
    assert (code, value, err) == (0, "ticket", "")
    # The manifest carries what the node needed, for these maps only.
    maps = manifest(cluster, "mx")["maps"]
    assert maps["sasl_passwords"]["custom"] == {"separator": " ", "secret": True}
    assert maps["tls_policy"]["custom"] == {"separator": " ", "secret": False}
    assert maps["ticket_addresses"]["cdb"] is None
    assert "custom" not in maps["recipients"]
    # The built-in maps are published as ever beside them.
    assert postmap_q("postmaster@example-1.org", live / "recipients") == "OK"


def test_a_second_separator_and_exact_keys(cluster: Cluster) -> None:
    own_tables(cluster.db_url)
    maps = (
        OWN_MAPS
        + """
[publisher.maps.exim_lists]
query = "SELECT address, 'list:' || address FROM ticket_queue UNION ALL SELECT 'Case@X.example', 'kept'"
separator = ":"
keys = "exact"
"""
    )
    list_own_maps(cluster, ["exim_lists"], maps=maps)
    cluster.publish()
    cluster.pull()
    assert lines(cluster, "mx", "exim_lists") == [
        "Case@X.example:kept",
        "billing@example-1.org:list:billing@example-1.org",
        "support@example-1.org:list:support@example-1.org",
    ]
    # The node built the cdb by splitting at ':' (the first one): its hash is the publisher's.
    pairs = dict(text.pairs(cluster.target / "exim_lists", b":"))
    assert pairs[b"support@example-1.org"] == b"list:support@example-1.org"
    assert postmap_q("support@example-1.org", cluster.target / "exim_lists") == (
        "list:support@example-1.org"
    )
    assert json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"] == 1
    run_sql(cluster.db_url, "DELETE FROM ticket_queue")


HOSTILE = [
    # (key, value, what the refusal says)
    ("evil@example-1.org\nabuse@example-2.org", "OK", "key contains a line break"),
    ("abuse@example-2.org", "OK\nevil@example-1.org OK", "value contains a line break"),
    ("Abuse@Example-2.org", "REJECT", "duplicate key 'abuse@example-2.org' once lowercased"),
    ("nul@example-1.org", "OK\0REJECT", "value contains a NUL byte"),
    ("two words@example-1.org", "OK", "key contains whitespace"),
    ("#comment", "OK", "key starts with '#'"),
    ("empty@example-1.org", "", "value is empty"),
    ("padded@example-1.org", " OK", "value starts or ends with whitespace"),
]


def test_hostile_rows_are_refused_by_name_and_the_old_maps_keep_serving(cluster: Cluster) -> None:
    own_tables(cluster.db_url)
    list_own_maps(cluster)
    cluster.publish()
    cluster.pull()
    table = cluster.target / "recipient_access"
    for key, value, why in HOSTILE:
        run_sql(
            cluster.db_url,
            "INSERT INTO recipient_access VALUES ("
            + ", ".join(
                "'" + v.replace("'", "''").replace("\0", "' || char(0) || '") + "'"
                for v in (key, value)
            )
            + ")",
        )
        proc = cluster.cli("publish")
        assert proc.returncode == 2, (key, proc.stderr)
        assert "[publisher.maps.recipient_access] row 4 key" in proc.stderr, proc.stderr
        assert why in proc.stderr, (why, proc.stderr)
        assert json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"] == 1
        assert postmap_q("abuse@example-2.org", table) == "OK"
        assert postmap_q("evil@example-1.org", table) is None
        run_sql(cluster.db_url, "DELETE FROM recipient_access WHERE rowid = 4")
    # A duplicate names both rows.
    run_sql(cluster.db_url, "INSERT INTO recipient_access VALUES ('ABUSE@example-2.org', 'REJECT')")
    err = cluster.cli("publish").stderr
    assert (
        "row 2 key 'abuse@example-2.org': duplicate key 'abuse@example-2.org' once lowercased: also row 4 key 'ABUSE@example-2.org'"
        in err
    )
    assert "row 4 key 'ABUSE@example-2.org': duplicate key" in err


def test_skip_invalid_leaves_out_only_the_bad_rows_of_the_channels_listing_the_map(
    cluster: Cluster,
) -> None:
    own_tables(cluster.db_url)
    list_own_maps(cluster, maps=OWN_MAPS + '[publisher.channels.relay]\nmaps = ["tls_policy"]\n')
    run_sql(
        cluster.db_url,
        "INSERT INTO recipient_access VALUES ('bad key@example-1.org', 'OK')",
        "INSERT INTO tls_policy VALUES ('Example.NET', 'none')",  # a duplicate of example.net
    )
    account, address = account_on(cluster, "store-1")
    set_row(cluster, t.account, account, home="relative/home")  # a row of the snapshot too
    out = cluster.publish("--skip-invalid").stdout
    assert "skipped 4 invalid row(s)" in out
    assert lines(cluster, "mx", "recipient_access") == [
        "abuse@example-2.org OK",
        "noreply@example-3.org 550 5.1.1 this address is not read",
        "spam-trap@example-1.org REJECT this address takes no mail",
    ]
    # Both rows of the duplicated key: which value is right cannot be told.
    assert lines(cluster, "mx", "tls_policy") == [
        "bank.example verify match=hostname",
        "legacy.example may",
    ]
    assert address not in keys(cluster, "mx", "recipients")
    skipped = manifest(cluster, "mx")["skipped"]
    assert len(skipped) == 4
    assert skipped[0].startswith(f"account id={account} ")
    assert (
        "[publisher.maps.recipient_access] row 4 key 'bad key@example-1.org': key contains "
        "whitespace (a map line ends its key at the first space)"
    ) in skipped
    # A channel records the rows of the maps it lists, and only those.
    relay = manifest(cluster, "relay")["skipped"]
    assert [line.split(":")[0] for line in relay] == [
        "[publisher.maps.tls_policy] row 1 key 'example.net'",
        "[publisher.maps.tls_policy] row 4 key 'Example.NET'",
    ]
    assert lines(cluster, "relay", "tls_policy") == lines(cluster, "mx", "tls_policy")


def test_a_shrinking_own_map_is_refused_by_its_guard_and_plan_diff_history_show_it(
    cluster: Cluster,
) -> None:
    access = [(f"user{i:02}@example-1.org", "REJECT") for i in range(20)]
    own_tables(cluster.db_url, access)
    list_own_maps(cluster, ["recipient_access"])
    cluster.publish()
    run_sql(
        cluster.db_url,
        "DELETE FROM recipient_access WHERE address IN"
        " ('user00@example-1.org', 'user01@example-1.org', 'user02@example-1.org')",
        "UPDATE recipient_access SET action = 'OK' WHERE address = 'user03@example-1.org'",
        "INSERT INTO recipient_access VALUES ('new@example-1.org', 'REJECT')",
    )
    proc = cluster.cli("publish")
    assert proc.returncode == 4
    assert "channel mx, map recipient_access: removes 15.0% of its keys (3 of 20" in proc.stderr
    assert json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"] == 1
    # The plan shows the map like a built-in one.
    plan = cluster.cli("publish", "--dry-run")
    assert plan.returncode == 4  # as the real publish would
    assert "would REFUSE (guards) to publish serial 2" in plan.stdout
    row = next(line.split() for line in plan.stdout.splitlines() if "recipient_access" in line)
    assert row == ["recipient_access", "20", "18", "1", "3", "1"]
    # A guard of its own, like any map's.
    list_own_maps(
        cluster,
        ["recipient_access"],
        extra_publisher='[publisher.guards.recipient_access]\nmax_shrink = "20%"\n',
    )
    assert "published serial 2" in cluster.publish().stdout
    diff = cluster.cli("diff", "--keys", "1", "2", check=True).stdout
    assert "recipient_access: +1 -3 ~1" in diff
    # Each key with its value (the map is not secret): old → new for a changed one.
    assert "  + new@example-1.org REJECT\n" in diff
    assert "  - user00@example-1.org REJECT\n" in diff
    assert "  ~ user03@example-1.org REJECT → OK\n" in diff
    history = cluster.cli("history", check=True).stdout
    last = history.splitlines()[-1]
    assert "recipient_access=18 " in last and "changed: recipient_access <- LATEST" in last
    # Dropping the map from the channel: the dropped-map guard, as for a built-in map.
    list_own_maps(cluster, [])
    proc = cluster.cli("publish")
    assert proc.returncode == 4
    assert "map recipient_access: the map is dropped from the channel" in proc.stderr


def test_one_changed_row_makes_a_release_and_nothing_changed_makes_none(cluster: Cluster) -> None:
    own_tables(cluster.db_url)
    run_sql(
        cluster.db_url,
        "CREATE TABLE policy_changes (at INTEGER)",
        "INSERT INTO policy_changes VALUES (1)",
    )
    maps = OWN_MAPS.replace(
        'query = "SELECT domain, policy FROM tls_policy"',
        'query = "SELECT domain, policy FROM tls_policy"\n'
        'fingerprint = "SELECT max(at) FROM policy_changes"',
    )
    list_own_maps(cluster, maps=maps)
    cluster.publish()
    assert "unchanged (serial 1)" in cluster.publish().stdout
    # No fingerprint query: the rows themselves are hashed, so a changed value is seen.
    run_sql(
        cluster.db_url,
        "UPDATE recipient_access SET action = 'DISCARD' WHERE address = 'abuse@example-2.org'",
    )
    assert "published serial 2" in cluster.publish().stdout
    assert "abuse@example-2.org DISCARD" in lines(cluster, "mx", "recipient_access")
    assert "unchanged (serial 2)" in cluster.publish().stdout
    # A fingerprint query: what it returns decides (the operator bumps it with each change).
    run_sql(
        cluster.db_url, "UPDATE tls_policy SET policy = 'encrypt' WHERE domain = 'legacy.example'"
    )
    assert "unchanged (serial 2)" in cluster.publish().stdout
    run_sql(cluster.db_url, "UPDATE policy_changes SET at = 2")
    assert "published serial 3" in cluster.publish().stdout
    assert "legacy.example encrypt" in lines(cluster, "mx", "tls_policy")
    # A changed definition is a change too, whatever the database says.
    list_own_maps(cluster, maps=maps.replace("cdb = false\n", "cdb = true\n"))
    assert "published serial 4" in cluster.publish().stdout
    assert manifest(cluster, "mx")["maps"]["ticket_addresses"]["cdb"] is not None
    # A new description changes no map: nothing to publish, and the next run is quiet again.
    list_own_maps(
        cluster,
        maps=maps.replace("cdb = false\n", "cdb = true\n").replace(
            "addresses refused or let through", "what RCPT TO refuses"
        ),
    )
    assert "unchanged (serial 4)" in cluster.publish().stdout
    quiet = cluster.cli("-v", "publish", check=True)
    assert "database unchanged since the last releases" in quiet.stderr
    assert "reading snapshot" not in quiet.stderr


def test_a_secret_map_is_never_read_for_a_channel_that_does_not_list_it(cluster: Cluster) -> None:
    own_tables(cluster.db_url)
    vault = """
[publisher.maps.vault]
query = "SELECT nexthop, credentials FROM no_such_table"
secret = true

[publisher.channels.relay]
maps = ["vault"]
"""
    list_own_maps(cluster, ["tls_policy"], maps=OWN_MAPS + vault)
    out = cluster.publish("--channel", "mx").stdout  # the vault's query would fail if it ran
    assert "published serial 1" in out
    proc = cluster.cli("publish", "--channel", "relay")
    assert proc.returncode == 2
    assert "[publisher.maps.vault] query failed" in proc.stderr
    assert "no such table: no_such_table" in proc.stderr
    assert "init-db" not in proc.stderr


SECOND = """
[publisher.maps.ticket_routes]
query = "SELECT address, 'smtp:[tickets.example.net]:25' FROM otrs_address WHERE address LIKE '%@%'"
database = "{url}"
"""


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_an_own_map_read_from_a_second_database(
    cluster: Cluster, kind: str, request: pytest.FixtureRequest
) -> None:
    """Exim at Wikimedia queried the OTRS database for the addresses routed to the ticket
    system: here a transport map of those addresses, read from that database (a second URL,
    its password never shown), with ':' and '%' in the query's own SQL."""
    server = request.getfixturevalue("pg_url" if kind == "postgresql" else "mariadb_url")
    run_sql(
        server,
        "CREATE TABLE otrs_address (address VARCHAR(200))",
        "INSERT INTO otrs_address VALUES ('Support@Example-1.org'), ('sales@example-2.org')",
    )
    # PostgreSQL here trusts local connections: the password is sent, and ignored.
    url = server.replace("postgres@", "postgres:Pw-0f-the-otrs-db@")
    if kind == "mariadb":  # root has no password here: PyMySQL takes the user alone
        url = server
    list_own_maps(cluster, ["ticket_routes"], maps=SECOND.format(url=url))
    out = cluster.publish()
    cluster.pull()
    assert postmap_q("support@example-1.org", cluster.target / "ticket_routes") == (
        "smtp:[tickets.example.net]:25"
    )
    assert postmap_q("sales@example-2.org", cluster.target / "ticket_routes") == (
        "smtp:[tickets.example.net]:25"
    )
    # Nothing changed in either database: no new release; a row added there: a new one.
    assert "unchanged (serial 1)" in cluster.publish().stdout
    run_sql(server, "INSERT INTO otrs_address VALUES ('billing@example-3.org')")
    assert "published serial 2" in cluster.publish().stdout
    assert "billing@example-3.org smtp:[tickets.example.net]:25" in lines(
        cluster, "mx", "ticket_routes"
    )
    # A query gone wrong there is named, the URL without its password.
    run_sql(server, "DROP TABLE otrs_address")
    proc = cluster.cli("publish")
    assert proc.returncode == 2
    assert "[publisher.maps.ticket_routes] query failed" in proc.stderr
    assert "otrs_address" in proc.stderr
    for text_ in (out.stdout, out.stderr, proc.stdout, proc.stderr):
        assert "Pw-0f-the-otrs-db" not in text_
    for path in cluster.repo.rglob("*"):
        if path.is_file():
            assert b"Pw-0f-the-otrs-db" not in path.read_bytes(), path


def test_a_query_must_return_exactly_the_key_and_the_value(cluster: Cluster) -> None:
    own_tables(cluster.db_url)
    three = OWN_MAPS.replace(
        "SELECT domain, policy FROM tls_policy", "SELECT domain, policy, 1 AS extra FROM tls_policy"
    )
    list_own_maps(cluster, ["tls_policy"], maps=three)
    proc = cluster.cli("publish")
    assert proc.returncode == 2
    assert (
        "[publisher.maps.tls_policy] query: returns 3 column(s) (domain, policy, extra); a "
        "map's query returns exactly two, the key and then the value"
    ) in proc.stderr
    assert not (cluster.repo / "mx" / "LATEST").exists()


def test_diff_shows_values_except_in_a_secret_map(cluster: Cluster) -> None:
    own_tables(cluster.db_url)
    list_own_maps(cluster, ["tls_policy", "sasl_passwords"])
    cluster.publish()
    run_sql(
        cluster.db_url,
        "UPDATE sasl_passwords SET credentials = 'relayuser:n3w-relay-pass'",
        "UPDATE tls_policy SET policy = 'dane' WHERE domain = 'bank.example'",
    )
    cluster.publish()
    diff = cluster.cli("diff", "--keys", "1", "2", check=True).stdout
    assert "  ~ bank.example verify match=hostname → dane\n" in diff
    assert "  ~ [smtp.relay.example]:587\n" in diff  # the key alone: the map is secret
    assert "relay-pass" not in diff


@pytest.mark.parametrize("turned", ["off", "on"])
def test_diff_shows_no_value_of_a_release_in_which_the_map_was_secret(
    cluster: Cluster, turned: str
) -> None:
    own_tables(cluster.db_url)
    secret = OWN_MAPS.replace('FROM sasl_passwords"\nsecret = true', 'FROM sasl_passwords"')
    first, then = (OWN_MAPS, secret) if turned == "off" else (secret, OWN_MAPS)
    list_own_maps(cluster, ["sasl_passwords"], maps=first)
    cluster.publish()
    run_sql(cluster.db_url, "UPDATE sasl_passwords SET credentials = 'relayuser:n3w-relay-pass'")
    list_own_maps(cluster, ["sasl_passwords"], maps=then)
    cluster.publish("--force")
    diff = cluster.cli("diff", "--keys", "1", "2", check=True).stdout
    assert "  ~ [smtp.relay.example]:587\n" in diff
    assert "relay-pass" not in diff


def test_rollback_publisher_handles_an_own_map_as_secret_when_it_is_secret_now(
    cluster: Cluster,
) -> None:
    # The credentials were first published without `secret` (installed 0644 on the nodes);
    # the operator marks the map secret. Re-publishing the release from before must not
    # bring back the old handling: the new release is secret, the node installs it 0640.
    own_tables(cluster.db_url)
    public = OWN_MAPS.replace("secret = true\n", "")
    list_own_maps(cluster, ["sasl_passwords"], maps=public)
    cluster.publish()
    cluster.pull()
    assert stat.S_IMODE(os.stat(cluster.target / "sasl_passwords").st_mode) == 0o644
    list_own_maps(cluster, ["sasl_passwords"])
    cluster.publish()
    assert manifest(cluster, "mx", 2)["maps"]["sasl_passwords"]["custom"]["secret"] is True

    cluster.cli("rollback", "--publisher", "1", check=True)

    assert manifest(cluster, "mx", 3)["maps"]["sasl_passwords"]["custom"]["secret"] is True
    cluster.pull()
    for name in ("sasl_passwords", "sasl_passwords.cdb"):
        assert stat.S_IMODE(os.stat(cluster.target / name).st_mode) == 0o640, name


@pytest.mark.parametrize("key", ["query", "fingerprint"])
def test_a_second_statement_in_an_own_query_is_refused_before_anything_runs(
    cluster: Cluster, pg_url: str, key: str
) -> None:
    """psycopg runs a string of several statements: "SELECT ...; COMMIT; DELETE ..." ended the
    snapshot's read-only transaction and deleted rows, even under --dry-run. One SELECT only,
    as [publisher.sql]'s queries; the config names the key and nothing runs."""
    run_sql(
        pg_url,
        "CREATE TABLE victim (x int)",
        "INSERT INTO victim VALUES (1), (2)",
        "CREATE TABLE access (address VARCHAR(200), action VARCHAR(50))",
        "INSERT INTO access VALUES ('spam@example.org', 'REJECT')",
    )
    select = "SELECT address, action FROM access"
    query = f"{select}; COMMIT; DELETE FROM victim" if key == "query" else select
    fingerprint = (
        "SELECT count(*) FROM access; COMMIT; DELETE FROM victim"
        if key == "fingerprint"
        else "SELECT count(*) FROM access"
    )
    maps = (
        f'[publisher.maps.access]\nquery = "{query}"\nfingerprint = "{fingerprint}"\n'
        f'database = "{pg_url}"\n'
    )
    list_own_maps(cluster, ["access"], maps=maps)
    proc = cluster.cli("publish", "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"[publisher.maps.access] {key}: must be one statement (no ';' inside" in proc.stderr
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(sql("SELECT count(*) FROM victim")).scalar() == 2
    engine.dispose()


def test_a_comment_before_an_own_query_is_no_second_statement(cluster: Cluster) -> None:
    """A query that starts with a comment line is one SELECT (it was refused as none)."""
    own_tables(cluster.db_url)
    commented = OWN_MAPS.replace(
        'query = "SELECT domain, policy FROM tls_policy"',
        'query = """-- the TLS policy of each partner\nSELECT domain, policy FROM tls_policy"""',
    )
    assert commented != OWN_MAPS
    list_own_maps(cluster, ["tls_policy"], maps=commented)
    assert "published serial 1" in cluster.publish().stdout

"""Any schema, read by the operator's SELECTs (``schema = "sql"``): the iRedMail query set of
docs/sql-schema.md, exactly as printed there, publishes maps that real ``postmap -q`` and a
real Dovecot answer as iRedMail's own Postfix and Dovecot lookups do, on MariaDB and
PostgreSQL; where mapsync differs on purpose, the difference is named below (and in the docs).
tests/integration/test_sql_source.py holds the other query sets and the error cases."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from mapsync.formats import text as text_map
from tests.conftest import Cluster
from tests.helpers import postfixadmin as pfa
from tests.helpers import sqlschema as sq
from tests.helpers.dovecot import passwd_file_dovecot

pytestmark = pytest.mark.daemons


@pytest.fixture(params=sq.query_set("iredmail")[1])
def iredmail(request: pytest.FixtureRequest) -> Iterator[tuple[str, Cluster]]:
    """(engine, cluster): iRedMail's tables with the sample data on the engine, published with
    the documented query set and pulled by both nodes."""
    url = request.getfixturevalue(sq.ENGINES[request.param])
    sq.build_iredmail(url)
    root = Path(tempfile.mkdtemp(prefix="mapsync-sql-"))
    root.chmod(0o755)  # Dovecot's auth process (user dovecot) reads the node's passwd-file
    try:
        cluster = sq.write_config(root / "c", url, sq.query_set("iredmail")[0])
        cluster.publish()
        cluster.pull()
        yield request.param, cluster
    finally:
        shutil.rmtree(root)


# Where the iRedMail query set answers differently from iRedMail's own lookups, on purpose.
IR_DIFFERENCES = {
    # iRedMail accepts mail for a disabled mailbox that still has forwarding rows (and
    # bounces what was for the mailbox itself); mapsync refuses it at RCPT time.
    "carl@example.com: accepted True vs False",
    # mapsync's senders map lets a login send as its address in every alias domain; iRedMail's
    # sender_login_maps knows only the mailbox's own address.
    "alice@alias.example: sender None vs alice@example.com",
}


def _oracle_delivery(lk: sq.IRedMailLookups, final: str) -> tuple[str, ...]:
    """Where iRedMail's lookups send one final recipient."""
    domain = final.rpartition("@")[2]
    if lk.value("relay_domains", domain):
        return ("relay", (lk.value("transport", domain) or "").partition(":")[2] or domain)
    if lk.value("domains", domain):
        user = lk.user(final)
        return ("mailbox", user[0]) if lk.value("mailbox", final) and user else ("unknown",)
    return ("external",)


def _published_delivery(mx: Path, users: dict[str, list[str]], final: str) -> tuple[str, ...]:
    """Where the published maps send it: transport by postmap, the home by dovecot_users."""
    transport = pfa.postmap_reader(mx / "transport")
    route = transport(final) or transport(final.rpartition("@")[2])
    if route is None:
        return ("external",)
    if route.startswith("relay:"):
        return ("relay", route.removeprefix("relay:"))
    assert route.startswith("lmtp:["), route
    return ("mailbox", users[final][4]) if final in users else ("unknown",)


def test_the_iredmail_query_set_answers_as_iredmails_lookups(
    iredmail: tuple[str, Cluster],
) -> None:
    engine, cluster = iredmail
    mx = cluster.root / "nodes" / "mx"
    store_file = cluster.root / "nodes" / "store" / "dovecot_users"
    domains, recipients, virtual, transport, senders = (
        pfa.postmap_reader(mx / m)
        for m in ("domains", "recipients", "virtual", "transport", "senders")
    )
    users = {k.decode(): v.decode().split(":", 6) for k, v in text_map.pairs(store_file, sep=b":")}
    lk = sq.IRedMailLookups(cluster.db_url)
    mismatches = set()
    checked = 0
    try:
        for address in sq.iredmail_addresses():
            domain = address.rpartition("@")[2]
            relay = lk.value("relay_domains", domain) is not None
            ours = relay or lk.value("domains", domain) is not None
            assert (domains(domain) is not None) == ours, (engine, address)
            found = (lk.virtual(address), lk.virtual(f"@{domain}"), lk.value("mailbox", address))
            accepted = relay or (ours and any(v is not None for v in found))
            published = ours and any(recipients(k) for k in (address, f"@{domain}"))
            if accepted != published:
                mismatches.add(f"{address}: accepted {accepted} vs {published}")
                continue
            if not accepted:
                continue
            checked += 1
            expected = {f: _oracle_delivery(lk, f) for f in pfa.resolve(address, lk.virtual)}
            got = {f: _published_delivery(mx, users, f) for f in pfa.resolve(address, virtual)}
            if expected != got:
                mismatches.add(f"{address}: {expected} vs {got}")
            owner = lk.value("sender_login", address)
            if owner != senders(address):
                mismatches.add(f"{address}: sender {owner} vs {senders(address)}")
        # Dovecot's userdb: home (lowercased, as iRedMail's user_query does) and quota (MB in
        # the database, bytes in the rule) of every mailbox, and no line for any other.
        for username, *_ in sq.IR_MAILBOXES:
            user = lk.user(username)
            line = users.get(username)
            if user is None or line is None:
                assert user is None and line is None, (engine, username, user, line)
                continue
            home, quota = user
            assert line[0] == sq.HASH and line[4] == home, (engine, username, line)
            rule = f"userdb_quota_rule=*:bytes={quota}" if quota else ""
            assert line[6] == rule, (engine, username, line)
    finally:
        lk.close()
    assert mismatches == IR_DIFFERENCES, engine
    assert checked >= 12, checked
    assert virtual("alice@example.com") is None  # the row of a mailbox to itself: no line
    for key, route in sq.IR_TRANSPORT.items():
        assert transport(key) == route, (engine, key)
    if engine == "PostgreSQL":  # a real login once (each Dovecot start costs a second)
        store = passwd_file_dovecot(cluster.root / "dovecot", store_file)
        try:
            assert store.login("alice@example.com", pfa.PASSWORD)
            assert store.user("carl@example.com") is None
        finally:
            store.stop()

    # No fingerprint query in this set: the check is a digest of the full read. Nothing
    # changed: nothing to publish. forwardings has no change time, and an edit of one target
    # (row counts equal) is seen all the same.
    again = cluster.cli("publish", check=True)
    assert "channel mx: unchanged (serial 1)" in again.stdout, again.stdout
    db = create_engine(cluster.db_url)
    with db.begin() as conn:
        conn.execute(
            text(
                "UPDATE forwardings SET forwarding = 'bob@example.com'"
                " WHERE address = 'sales@example.com' AND forwarding = 'alice@example.com'"
            )
        )
    db.dispose()
    cluster.publish()
    cluster.pull()
    assert pfa.resolve("sales@example.com", pfa.postmap_reader(mx / "virtual")) == {
        "bob@example.com",
        "bob@elsewhere.example",
        "partner@external.example",
    }, engine

"""``publish --skip-invalid`` skips a row only in the channels whose maps use what is wrong.

A refused password hash is a mailstore's problem: the account cannot log in there until it
is fixed, but its mail still arrives. So the MX's ``recipients`` keeps the address (else a
permanent 550 for a real mailbox), whichever channels a run publishes, and only the
mailstore channel's manifest records the skip. Same for a mailstore's IMAP host, which only
the IMAP proxy reads, and a sender grant, which only ``senders`` reads.
"""

from __future__ import annotations

from sqlalchemy import create_engine, insert

from mapsync.sources import schema as t
from tests.conftest import Cluster
from tests.helpers.publisher import account_on, add_channels, keys, lines, manifest, set_row

STORE_1 = """\
[publisher.channels.store-1]
maps = ["dovecot_users"]
mailstore = "store-1"
"""


def test_a_refused_password_hash_leaves_the_mx_maps_alone(cluster: Cluster) -> None:
    add_channels(cluster, STORE_1)
    cluster.publish()
    account, address = account_on(cluster, "store-1")
    assert address in keys(cluster, "mx", "recipients")
    assert address in keys(cluster, "store-1", "dovecot_users")
    set_row(cluster, t.account, account, password_hash="{PLAIN}secret")

    # Without --skip-invalid the row fails the run, naming it.
    refused = cluster.cli("publish")
    assert refused.returncode == 2
    assert (
        f"account id={account} '{address}': password scheme PLAIN is not allowed" in refused.stderr
    )

    # A run over every channel: the login goes from the mailstore, the mail still arrives
    # (the userdb line stays, without a hash and with nologin, so LMTP still delivers).
    out = cluster.publish("--skip-invalid").stdout
    assert "channel mx: unchanged (serial 1)" in out
    assert "channel store-1: published serial 2" in out
    assert address in keys(cluster, "mx", "recipients")
    (line,) = [x for x in lines(cluster, "store-1", "dovecot_users") if x.startswith(address + ":")]
    fields = line.split(":", 7)  # extra fields may hold ":" (userdb_quota_rule=*:bytes=N)
    assert fields[1] == "" and "nologin=y" in fields[7] and "secret" not in line
    assert manifest(cluster, "mx")["skipped"] == []
    (skip,) = manifest(cluster, "store-1")["skipped"]
    assert skip.startswith(f"account id={account} '{address}': password scheme PLAIN")

    # And a run of the MX alone agrees: nothing changes back and forth.
    alone = cluster.publish("--skip-invalid", "--channel", "mx").stdout
    assert "channel mx: unchanged (serial 1)" in alone
    assert cluster.publish("--skip-invalid").stdout.count("unchanged") == 2


def test_a_bad_home_is_the_mailstores_problem_too(cluster: Cluster) -> None:
    add_channels(cluster, STORE_1)
    cluster.publish()
    account, address = account_on(cluster, "store-1")
    set_row(cluster, t.account, account, home="relative/home")
    out = cluster.publish("--skip-invalid").stdout
    assert "channel mx: unchanged (serial 1)" in out
    assert address not in keys(cluster, "store-1", "dovecot_users")
    assert manifest(cluster, "mx")["skipped"] == []
    assert [s for s in manifest(cluster, "store-1")["skipped"] if "home 'relative/home'" in s]


def test_an_imap_host_the_proxy_refuses_changes_only_the_proxy(cluster: Cluster) -> None:
    """dovecot_proxy needs an IP in host=; a name is fine for everything else."""
    add_channels(cluster, '[publisher.channels.proxy]\nmaps = ["dovecot_proxy"]\n')
    cluster.publish()
    _account, address = account_on(cluster, "store-1")
    engine = create_engine(cluster.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                t.mailstore.update()
                .where(t.mailstore.c.name == "store-1")
                .values(imap_host="imap1.example.net")
            )
    finally:
        engine.dispose()
    # Half the proxy's logins go (the guard says so; the operator forces it), the MX's
    # routes and recipients stay.
    refused = cluster.cli("publish", "--skip-invalid")
    assert refused.returncode == 4
    assert "channel proxy, map dovecot_proxy: removes" in refused.stderr
    assert "channel mx" not in refused.stderr
    out = cluster.publish("--skip-invalid", "--force").stdout
    assert "channel mx: unchanged (serial 1)" in out
    assert address in keys(cluster, "mx", "recipients")
    assert address not in keys(cluster, "proxy", "dovecot_proxy")
    assert manifest(cluster, "mx")["skipped"] == []
    assert any(
        "imap_host 'imap1.example.net' is not an IP" in s
        for s in manifest(cluster, "proxy")["skipped"]
    )


def test_an_invalid_sender_grant_is_skipped_where_senders_are_published(cluster: Cluster) -> None:
    """Before, a bad grant was never dropped and --skip-invalid validated it again forever."""
    add_channels(cluster, '[publisher.channels.submission]\nmaps = ["senders"]\n')
    account, _address = account_on(cluster, "store-1")
    engine = create_engine(cluster.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(t.sender_grant), {"account_id": account, "address": "no address"})
            conn.execute(
                insert(t.sender_grant), {"account_id": account, "address": "@example-2.org"}
            )
    finally:
        engine.dispose()
    out = cluster.cli("publish", "--skip-invalid")
    assert out.returncode == 0, out.stdout + out.stderr
    senders = keys(cluster, "submission", "senders")
    assert "@example-2.org" in senders and "no address" not in senders
    (skip,) = manifest(cluster, "submission")["skipped"]
    assert skip.startswith(f"sender_grant id={account} 'no address'")
    assert manifest(cluster, "mx")["skipped"] == []

"""``publish --skip-invalid`` skips a row only in the channels whose maps use what is wrong.

A refused password hash is a mailstore's problem: the account cannot log in there until it
is fixed, but its mail still arrives. So the MX's ``recipients`` keeps the address (else a
permanent 550 for a real mailbox), whichever channels a run publishes, and only the
mailstore channel's manifest records the skip. Same for a mailstore's IMAP host, which only
the IMAP proxy reads, and a sender grant, which only ``senders`` reads.
"""

from __future__ import annotations

import json

from sqlalchemy import create_engine, insert

from mapsync.sources import schema as t
from tests.conftest import Cluster
from tests.helpers.publisher import (
    account_on,
    add_channels,
    keys,
    lines,
    mailstore_id,
    manifest,
    set_row,
)

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


def test_a_bad_home_is_refused_at_the_mx_too(cluster: Cluster) -> None:
    """Without its userdb line the mailstore's LMTP answers "user unknown" after the MX took
    the mail (a bounce to a possibly forged sender): the MX must refuse at RCPT instead, so a
    bad home leaves every channel, and a run of the MX alone agrees."""
    add_channels(cluster, STORE_1)
    cluster.publish()
    account, address = account_on(cluster, "store-1")
    set_row(cluster, t.account, account, home="relative/home")
    run = cluster.publish("--skip-invalid")
    out = run.stdout
    assert "channel mx: published serial 2" in out
    assert "channel store-1: published serial 2" in out
    assert address not in keys(cluster, "mx", "recipients")
    assert address not in keys(cluster, "store-1", "dovecot_users")
    # The operator's log names the home; no manifest does: the MX's nodes never get homes.
    assert "home 'relative/home' must be an absolute path" in run.stderr
    for channel in ("mx", "store-1"):
        (skip,) = manifest(cluster, channel)["skipped"]
        assert skip == (
            f"account id={account} '{address}': home must be an absolute path without ':' or "
            "whitespace"
        )
        assert "relative/home" not in json.dumps(manifest(cluster, channel))
    alone = cluster.publish("--skip-invalid", "--channel", "mx").stdout
    assert "channel mx: unchanged (serial 2)" in alone


def test_a_bad_quota_costs_only_the_quota_rule(cluster: Cluster) -> None:
    """The account keeps its mail and its login; Dovecot just gets no quota rule for it."""
    add_channels(cluster, STORE_1)
    account, address = account_on(cluster, "store-1")
    set_row(cluster, t.account, account, quota_bytes=1024)
    cluster.publish()
    (before,) = [
        x for x in lines(cluster, "store-1", "dovecot_users") if x.startswith(address + ":")
    ]
    assert "userdb_quota_rule=*:bytes=1024" in before
    set_row(cluster, t.account, account, quota_bytes=-5)
    out = cluster.publish("--skip-invalid").stdout
    assert "channel mx: unchanged (serial 1)" in out
    assert "channel store-1: published serial 2" in out
    (line,) = [x for x in lines(cluster, "store-1", "dovecot_users") if x.startswith(address + ":")]
    assert line == before.replace("userdb_quota_rule=*:bytes=1024", "").rstrip()
    assert "nologin" not in line and line.split(":")[1].startswith("{")  # still logs in
    assert manifest(cluster, "mx")["skipped"] == []
    (skip,) = manifest(cluster, "store-1")["skipped"]
    assert skip == f"account id={account} '{address}': quota_bytes -5 is negative"


STORES = """[publisher.channels.store-1]
maps = ["dovecot_users"]
mailstore = "store-1"

[publisher.channels.store-2]
maps = ["dovecot_users"]
mailstore = "store-2"
"""


def test_a_skip_is_recorded_only_by_the_mailstore_that_houses_the_account(
    cluster: Cluster,
) -> None:
    """Both mailstores' channels read the same columns; store-1 must still not record (nor
    be kept from its no-change fast path by) a store-2 account's refused password."""
    add_channels(cluster, STORES)
    by_default, default_address = account_on(cluster, "store-2")
    # Housed on store-2 directly, in a domain whose default is store-1.
    direct, direct_address = account_on(cluster, "store-1")
    set_row(cluster, t.account, direct, mailstore_id=mailstore_id(cluster, "store-2"))
    cluster.publish()
    assert direct_address in keys(cluster, "store-2", "dovecot_users")
    assert direct_address not in keys(cluster, "store-1", "dovecot_users")
    for account in (by_default, direct):
        set_row(cluster, t.account, account, password_hash="{PLAIN}secret")
    # And a valid change on store-1 in the same run, so store-1 writes a new manifest.
    changed, _ = account_on(cluster, "store-1")
    set_row(cluster, t.account, changed, quota_bytes=2048)

    run = cluster.cli("-v", "publish", "--skip-invalid")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "channel mx: unchanged (serial 1)" in run.stdout
    assert "channel store-1: published serial 2" in run.stdout
    assert "channel store-2: published serial 2" in run.stdout
    assert manifest(cluster, "mx")["skipped"] == []
    assert manifest(cluster, "store-1")["skipped"] == []
    skipped = manifest(cluster, "store-2")["skipped"]
    assert sorted(s.split(":", 1)[0] for s in skipped) == sorted(
        [f"account id={by_default} '{default_address}'", f"account id={direct} '{direct_address}'"]
    )
    # The log names the channels each row is skipped in.
    skip_logs = [x for x in run.stderr.splitlines() if "skipping invalid row" in x]
    assert len(skip_logs) == 2
    assert all("channels=store-2" in x for x in skip_logs), skip_logs

    # Another mailstore's skips do not keep store-1 (nor the MX) from the cheap path.
    subset = cluster.cli("-v", "publish", "--channel", "store-1", "--channel", "mx", check=True)
    assert "database unchanged since the last releases" in subset.stderr
    assert "reading snapshot" not in subset.stderr
    # Once the rows are fixed, every channel takes the cheap path again (before, store-1's
    # manifest kept listing store-2's rows, and a channel with skips is always read again).
    for account in (by_default, direct):
        set_row(cluster, t.account, account, password_hash="{SHA512-CRYPT}$6$salt$hash")
    fixed = cluster.publish().stdout
    assert "channel store-1: unchanged (serial 2)" in fixed
    assert "channel store-2: published serial 3" in fixed
    assert manifest(cluster, "store-2")["skipped"] == []
    quiet = cluster.cli("-v", "publish", check=True)
    assert "database unchanged since the last releases" in quiet.stderr
    assert "reading snapshot" not in quiet.stderr


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
    assert skip.startswith(f"sender_grant of account id={account} 'no address'")
    assert manifest(cluster, "mx")["skipped"] == []


def test_disabling_a_domain_with_an_alias_domain_is_refused_until_the_alias_goes(
    cluster: Cluster,
) -> None:
    # docs/maps.md: the alias domain would still accept mail that leads nowhere.
    cluster.publish()
    alias = "bücher-1.example".encode("idna").decode()
    assert {"example-1.org", alias} <= keys(cluster, "mx", "domains")
    set_row(cluster, t.domain, 1, status="disabled")
    p = cluster.cli("publish")
    assert p.returncode != 0, p.stdout
    assert f"'{alias}': target domain 'example-1.org' is disabled" in p.stderr
    assert manifest(cluster, "mx")["serial"] == 1  # refused: serial 1 keeps serving

    # (A whole domain is a big share of this small test database: --force past the guards.)
    p = cluster.cli("publish", "--skip-invalid", "--force")
    assert p.returncode == 0, p.stderr
    domains = keys(cluster, "mx", "domains")
    assert "example-1.org" not in domains and alias not in domains
    assert "example-2.org" in domains

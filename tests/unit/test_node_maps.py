"""The maps for the other node roles — senders, exim_routes, dovecot_users, dovecot_proxy —
and the data rules behind them, over hand-built snapshots (pure logic)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from mapsync.config import PublisherChannel
from mapsync.maps import CATALOGUE, Directory
from mapsync.snapshot import Account, Alias, Fingerprint, SenderGrant, Snapshot
from mapsync.validate import check
from tests.helpers.maps import ACCOUNTS, ALIASES, DOMAINS, STORES

HASH = "{SHA512-CRYPT}$6$saltsalt$" + "h" * 86
SECRET_ACCOUNTS = [
    a._replace(password_hash=HASH, home=f"/var/vmail/{a.id}", quota_bytes=1024) for a in ACCOUNTS
]
GRANTS = [SenderGrant(2, "@example.org"), SenderGrant(6, "info@example.org")]


def snap(
    accounts: list[Account] | None = None, aliases: list[Alias] | None = None, **kw: object
) -> Snapshot:
    s = Snapshot(
        STORES,
        DOMAINS,
        SECRET_ACCOUNTS if accounts is None else accounts,
        ALIASES if aliases is None else aliases,
        Fingerprint({}),
        datetime.now(UTC),
        sender_grants=GRANTS,
        secrets=True,
    )
    return replace(s, **kw) if kw else s


def render(name: str, channel: PublisherChannel, s: Snapshot | None = None) -> dict[str, str]:
    s = s or snap()
    assert check(s, proxy=True) == []
    rows = list(CATALOGUE[name].entries(Directory(s), channel))
    assert len(rows) == len({k for k, _ in rows}), f"duplicate keys in {name}"
    return dict(rows)


STORE1 = PublisherChannel("store-1", ("dovecot_users",), mailstore="store-1", uid=5000, gid=5000)
PROXY = PublisherChannel("imap", ("dovecot_proxy",))
MX = PublisherChannel("mx", ("senders", "exim_routes"))


def test_dovecot_users_holds_only_the_mailstores_own_accounts_with_all_seven_colons() -> None:
    users = render("dovecot_users", STORE1)
    assert "erin@example.org" not in users  # housed on store-2
    assert "anna@xn--bcher-kva.example" not in users  # its domain lives on store-2
    assert "bob@example.org" not in users  # disabled: in no map
    line = "alice@example.org:" + users["alice@example.org"]
    assert line.count(":") - "userdb_quota_rule=*:bytes".count(":") == 7
    assert (
        line == f"alice@example.org:{HASH}:5000:5000::/var/vmail/2::userdb_quota_rule=*:bytes=1024"
    )
    assert users["carol@example.org"].endswith(" nologin=y")  # login_disabled
    assert users["s@suspended.org"].endswith(" nologin=y")  # a suspended domain cascades


def test_dovecot_proxy_points_at_the_mailstore_and_carries_no_hash() -> None:
    proxy = render("dovecot_proxy", PROXY)
    assert proxy["erin@example.org"] == "::::::proxy=y nopassword=y host=10.0.1.12 port=143"
    assert proxy["alice@example.org"] == "::::::proxy=y nopassword=y host=10.0.1.11 port=143"
    assert proxy["dave@example.org"] == "::::::nologin=y"  # moving
    assert proxy["carol@example.org"] == "::::::nologin=y"  # login_disabled
    assert not any("$6$" in v or "{" in v for v in proxy.values())


def test_senders_gives_each_login_its_addresses_and_its_grants() -> None:
    senders = render("senders", MX)
    assert senders["alice@example.org"] == "alice@example.org"
    assert senders["alice@example.net"] == "alice@example.org"  # alias domain
    assert senders["@example.org"] == "alice@example.org"  # a domain-wide grant
    assert senders["info@example.org"] == "erin@example.org"
    assert "carol@example.org" not in senders  # login_disabled may not send
    assert "s@suspended.org" not in senders


def test_exim_routes_are_host_lists_with_ports_and_a_transport() -> None:
    routes = render("exim_routes", MX)
    assert routes["example.org"] == "<+[10.0.1.11]:24 mapsync_lmtp"
    assert routes["erin@example.org"] == "<+[10.0.1.12]:2424 mapsync_lmtp"
    assert routes["relay.example.com"] == "<+mx.relay.example.com:25 mapsync_relay"
    assert routes["dave@example.org"] == ":defer:"  # moving: routers.conf mapsync_moving defers


def _reasons(s: Snapshot, proxy: bool = False) -> list[str]:
    return [p.reason for p in check(s, proxy)]


@pytest.mark.parametrize(
    ("password_hash", "reason"),
    [
        (None, "no password hash"),
        ("{PLAIN}secret", "PLAIN is not allowed"),
        ("{CLEARTEXT}secret", "CLEARTEXT is not allowed"),
        ("plainpassword", "no {SCHEME} prefix"),
        ("{SHA512-CRYPT}$6$a:b", "contains ':'"),
        ("{SHA512-CRYPT}$6$a b", "whitespace"),
    ],
)
def test_password_hashes_must_be_a_strong_known_scheme(
    password_hash: str | None, reason: str
) -> None:
    accounts = [SECRET_ACCOUNTS[0], SECRET_ACCOUNTS[1]._replace(password_hash=password_hash)]
    assert any(reason in r for r in _reasons(snap(accounts=accounts, aliases=[])))


@pytest.mark.parametrize(
    "good", ["$6$salt$hash", "{BLF-CRYPT}$2y$05$x", "{ARGON2ID}$argon2id$v=19$x"]
)
def test_good_hashes_pass(good: str) -> None:
    accounts = [SECRET_ACCOUNTS[0], SECRET_ACCOUNTS[1]._replace(password_hash=good)]
    assert _reasons(snap(accounts=accounts, aliases=[])) == []


@pytest.mark.parametrize(
    ("home", "reason"), [("relative/x", "absolute"), ("/a/../etc", "'..'"), ("/a:b", "without ':'")]
)
def test_home_paths_cannot_escape_or_split_fields(home: str, reason: str) -> None:
    accounts = [SECRET_ACCOUNTS[0], SECRET_ACCOUNTS[1]._replace(home=home)]
    assert any(reason in r for r in _reasons(snap(accounts=accounts, aliases=[])))


def test_hashes_are_not_checked_when_they_were_not_read() -> None:
    assert _reasons(snap(accounts=list(ACCOUNTS), aliases=[], secrets=False)) == []


def test_a_proxy_host_must_be_an_ip() -> None:
    stores = [STORES[0]._replace(imap_host="imap1.example.net"), STORES[1]]
    s = snap(mailstores=stores)
    assert _reasons(s, proxy=False) == []
    assert any("imap_host 'imap1.example.net' is not an IP" in r for r in _reasons(s, proxy=True))


def test_alias_cycles_are_refused_with_the_whole_loop_named() -> None:
    aliases = [
        Alias(20, 1, "a", ("b@example.org",)),
        Alias(21, 1, "b", ("c@example.net",)),  # via the alias domain
        Alias(22, 1, "c", ("a@example.org", "alice@example.org")),
    ]
    reasons = _reasons(snap(aliases=aliases))
    assert any(r.startswith("alias cycle: ") and "c@example.org" in r for r in reasons)


def test_a_target_inside_our_domains_must_exist() -> None:
    aliases = [Alias(20, 1, "sales", ("nobody@example.org", "ext@else.example", "x@catch.org"))]
    problems = check(snap(aliases=aliases))
    assert [(p.row, p.reason) for p in problems] == [
        (20, "target 'nobody@example.org' is in a hosted domain but is no account or alias there")
    ]  # external targets and catch-all domains are fine


def test_fan_out_is_limited_to_1000() -> None:
    targets = tuple(f"t{i}@else.example" for i in range(1001))
    assert any(
        "1001 targets, more than 1000" in r
        for r in _reasons(snap(aliases=[Alias(20, 1, "all", targets)]))
    )


def test_sender_grants_must_be_addresses() -> None:
    s = snap(aliases=[], sender_grants=[SenderGrant(2, "not an address")])
    assert [(p.table, p.row) for p in check(s)] == [("sender_grant", 2)]

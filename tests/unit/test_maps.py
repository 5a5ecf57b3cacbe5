"""The MX maps (mapsync.maps.CATALOGUE) over a Directory of a hand-built snapshot, and the
customer → domain status cascade of the builtin source."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, update

from mapsync.config import PublisherChannel
from mapsync.maps import CATALOGUE, Directory
from mapsync.maps.postfix import MOVING
from mapsync.snapshot import Fingerprint, Snapshot
from mapsync.sources import schema as t
from mapsync.sources.builtin import BuiltinSource, cascade_status
from mapsync.sources.seed import SeedCounts, seed
from mapsync.validate import check
from tests.helpers.maps import ACCOUNTS, ALIASES, DOMAINS, IDN, IDN_U, STORES
from tests.helpers.publisher import drop_aliases_into

MX = PublisherChannel("mx", ("domains", "recipients", "virtual", "transport"))


@pytest.fixture(scope="module")
def maps() -> dict[str, dict[str, str]]:
    snap = Snapshot(STORES, DOMAINS, ACCOUNTS, ALIASES, Fingerprint({}), datetime.now(UTC))
    assert check(snap) == []  # the fixture itself is publishable
    d = Directory(snap)
    out = {}
    for name in MX.maps:
        rows = list(CATALOGUE[name].entries(d, MX))
        keys = [k for k, _ in rows]
        assert len(keys) == len(set(keys)), f"duplicate keys in {name}"
        out[name] = dict(rows)
    return out


def test_catalogue_names_every_map_and_only_the_two_passdbs_carry_secrets() -> None:
    assert set(CATALOGUE) == {
        "domains", "recipients", "virtual", "transport",
        "senders", "exim_routes", "dovecot_users", "dovecot_proxy",
        "dovecot_deny", "dovecot_submission",
    }  # fmt: skip
    for name, m in CATALOGUE.items():
        assert m.name == name
        assert m.secrets == (name in ("dovecot_users", "dovecot_submission"))
        assert m.cdb == (not name.startswith("dovecot_"))


def test_every_key_is_lowercase(maps: dict[str, dict[str, str]]) -> None:
    for name, entries in maps.items():
        for key in entries:
            assert key == key.lower(), (name, key)
            assert " " not in key and not key.startswith("#")


def test_domains_map(maps: dict[str, dict[str, str]]) -> None:
    assert maps["domains"] == {
        "example.org": "OK",
        "example.net": "OK",
        IDN: "OK",
        IDN_U: "OK",
        "catch.org": "OK",
        "relay.example.com": "OK",
        "suspended.org": "OK",
        "catch-alias.org": "OK",
    }


def test_alias_domain_is_expanded_per_address(maps: dict[str, dict[str, str]]) -> None:
    r, v = maps["recipients"], maps["virtual"]
    live_locals = ["postmaster", "alice", "carol", "dave", "erin", "frank", "info"]
    for local in live_locals:
        assert r[f"{local}@example.net"] == "OK"
        assert v[f"{local}@example.net"] == f"{local}@example.org"
    # Never a wildcard for the alias domain: its target has no catch-all (backscatter).
    assert "@example.net" not in r and "@example.net" not in v
    assert "bob@example.net" not in r and "bob@example.net" not in v
    assert sorted(k for k in r if k.endswith("@example.net")) == sorted(
        f"{local}@example.net" for local in live_locals
    )


def test_alias_domain_of_a_catchall_domain_gets_the_catchall(
    maps: dict[str, dict[str, str]],
) -> None:
    r, v = maps["recipients"], maps["virtual"]
    assert r["@catch-alias.org"] == "OK"
    assert v["@catch-alias.org"] == "x@catch.org"
    assert v["x@catch-alias.org"] == "x@catch.org"
    assert v["mover@catch-alias.org"] == "mover@catch.org"


def test_catchall_has_identity_lines_for_every_real_account(
    maps: dict[str, dict[str, str]],
) -> None:
    v, r = maps["virtual"], maps["recipients"]
    assert v["@catch.org"] == "x@catch.org"
    assert r["@catch.org"] == "OK"
    # Without these, the catch-all would swallow the real mailboxes.
    assert v["x@catch.org"] == "x@catch.org"
    assert v["mover@catch.org"] == "mover@catch.org"
    assert "y@catch.org" not in v  # disabled: no mailbox to protect
    identity = {k for k, val in v.items() if k.endswith("@catch.org") and k == val}
    assert identity == {"x@catch.org", "mover@catch.org"}


def test_domains_without_catchall_have_no_identity_lines(
    maps: dict[str, dict[str, str]],
) -> None:
    v = maps["virtual"]
    assert not [k for k, val in v.items() if k == val and not k.endswith("@catch.org")]
    assert "@example.org" not in v and "@example.org" not in maps["recipients"]


def test_idn_domain_has_u_label_keys(maps: dict[str, dict[str, str]]) -> None:
    r, v = maps["recipients"], maps["virtual"]
    assert r[f"anna@{IDN}"] == "OK" and r[f"anna@{IDN_U}"] == "OK"
    assert r[f"team@{IDN}"] == "OK" and r[f"team@{IDN_U}"] == "OK"
    # The U-label address rewrites to the canonical A-label one, which the transport knows.
    assert v[f"anna@{IDN_U}"] == f"anna@{IDN}"
    assert v[f"team@{IDN_U}"] == v[f"team@{IDN}"] == f"anna@{IDN}"
    assert f"anna@{IDN}" not in v  # the A-label address is the mailbox itself
    assert maps["transport"][IDN] == "lmtp:[10.0.1.12]:2424"


def test_disabled_accounts_are_in_no_map(maps: dict[str, dict[str, str]]) -> None:
    for name, entries in maps.items():
        for key, value in entries.items():
            assert not key.startswith(("bob@", "y@")), (name, key)
            assert "bob@" not in value, (name, key, value)


def test_login_disabled_account_still_receives_mail(maps: dict[str, dict[str, str]]) -> None:
    assert maps["recipients"]["carol@example.org"] == "OK"
    assert "carol@example.org" not in maps["transport"]  # default store, ordinary delivery


def test_moving_account_is_held_in_the_mx_queue(maps: dict[str, dict[str, str]]) -> None:
    t_ = maps["transport"]
    assert t_["dave@example.org"] == MOVING
    # Not "retry:": smtpd answers 450 at RCPT for a transport named retry, and the
    # mail would wait in the sender's queue. agents/postfix-mx/master.cf's mapsync-moving
    # service defers each delivery with this reason instead (tests/daemons/test_moving_mailbox).
    assert MOVING == "mapsync-moving:4.2.0 mailbox is being moved"
    assert t_["mover@catch.org"] == MOVING  # even when housed off the default store
    assert maps["recipients"]["dave@example.org"] == "OK"


def test_transport_routes_domains_and_off_store_accounts(
    maps: dict[str, dict[str, str]],
) -> None:
    assert maps["transport"] == {
        "example.org": "lmtp:[10.0.1.11]:24",
        "erin@example.org": "lmtp:[10.0.1.12]:2424",
        "dave@example.org": MOVING,
        IDN: "lmtp:[10.0.1.12]:2424",
        "catch.org": "lmtp:[10.0.1.11]:24",
        "mover@catch.org": MOVING,
        "relay.example.com": "relay:[mx.relay.example.com]:25",
        "suspended.org": "lmtp:[10.0.1.11]:24",
    }


def test_relay_domain(maps: dict[str, dict[str, str]]) -> None:
    assert maps["recipients"]["@relay.example.com"] == "OK"
    assert maps["transport"]["relay.example.com"] == "relay:[mx.relay.example.com]:25"
    assert not [k for k in maps["virtual"] if k.endswith("relay.example.com")]


def test_suspended_domain_is_still_served(maps: dict[str, dict[str, str]]) -> None:
    assert maps["domains"]["suspended.org"] == "OK"
    assert maps["recipients"]["s@suspended.org"] == "OK"
    assert maps["transport"]["suspended.org"] == "lmtp:[10.0.1.11]:24"


def test_disabled_domain_is_in_no_map(maps: dict[str, dict[str, str]]) -> None:
    for name, entries in maps.items():
        for key, value in entries.items():
            assert "disabled.org" not in key and "off-alias.org" not in key, (name, key)
            assert "disabled.org" not in value


def test_recipients_is_exactly_the_deliverable_addresses(
    maps: dict[str, dict[str, str]],
) -> None:
    example = ["postmaster", "alice", "carol", "dave", "erin", "frank", "info"]
    expected = {f"{x}@example.org" for x in example} | {f"{x}@example.net" for x in example}
    expected |= {f"{x}@{n}" for x in ("anna", "team") for n in (IDN, IDN_U)}
    expected |= {f"{x}@{n}" for x in ("x", "mover") for n in ("catch.org", "catch-alias.org")}
    expected |= {"@catch.org", "@catch-alias.org", "@relay.example.com", "s@suspended.org"}
    assert set(maps["recipients"]) == expected
    assert set(maps["recipients"].values()) == {"OK"}


def test_virtual_alias_values_join_targets_with_commas(maps: dict[str, dict[str, str]]) -> None:
    assert maps["virtual"]["info@example.org"] == "alice@example.org,ext@other.example"


# --- the cascade of customer status into domain status ----------------------------------------


@pytest.mark.parametrize(
    ("domain", "customer", "result"),
    [
        ("active", None, "active"),
        ("active", "active", "active"),
        ("active", "suspended", "suspended"),
        ("suspended", "active", "suspended"),
        ("active", "closed", "disabled"),
        ("suspended", "closed", "disabled"),
        ("disabled", "active", "disabled"),
        ("disabled", "suspended", "disabled"),
    ],
)
def test_cascade(domain: str, customer: str | None, result: str) -> None:
    assert cascade_status(domain, customer) == result


def test_closed_customer_drops_its_domains_from_the_maps(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    seed(url, SeedCounts(accounts=60, domains=10, aliases=10, mailstores=2), seed=5)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(update(t.customer).where(t.customer.c.id == 1).values(status="closed"))
            conn.execute(update(t.customer).where(t.customer.c.id == 2).values(status="suspended"))
            rows = conn.execute(select(t.domain.c.name, t.domain.c.customer_id)).all()
            owned = {cid: {name for name, c in rows if c == cid} for cid in (1, 2)}
            drop_aliases_into(conn, owned[1])  # a target there is refused: nothing receives it
    finally:
        engine.dispose()
    assert owned[1] and owned[2]
    source = BuiltinSource(url)
    try:
        snap = source.snapshot()
    finally:
        source.close()
    status = {d.name: d.status for d in snap.domains}
    assert {status[n] for n in owned[1]} == {"disabled"}
    assert {status[n] for n in owned[2]} == {"suspended"}
    assert check(snap) == []
    directory = Directory(snap)
    domains = dict(CATALOGUE["domains"].entries(directory, MX))
    recipients = dict(CATALOGUE["recipients"].entries(directory, MX))
    assert not owned[1] & set(domains)
    assert not [k for k in recipients if k.rpartition("@")[2] in owned[1]]
    assert owned[2] <= set(domains)  # suspended: still served
    assert [k for k in recipients if k.rpartition("@")[2] in owned[2]]

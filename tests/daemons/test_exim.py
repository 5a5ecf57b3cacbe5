"""Exim (unpacked beside Postfix by ``scripts/install --test``) reads the Exim MX channel
through the ``exim-mx`` snippet: its domain list, its lookups and its routers, run with
``exim -bt`` (routing only, no daemon, no delivery) and ``exim -be`` (expansions)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, update

from mapsync.sources import schema as t
from tests.daemons.roles import Nodes, entries, make_nodes

pytestmark = pytest.mark.daemons

EXIM = Path(os.environ.get("MAPSYNC_TEST_EXIM", "/var/cache/mapsync-test/exim/root/usr/sbin/exim4"))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Nodes:
    if not EXIM.exists():
        pytest.fail(f"{EXIM} missing: run scripts/install --test (unpacks Exim beside Postfix)")
    root = tmp_path_factory.mktemp("exim")
    n = make_nodes(root, ("exim-mx",))
    # A relay next hop given as an IP, so that -bt can route it without DNS.
    engine = create_engine(n.cluster.db_url)
    with engine.begin() as conn:
        conn.execute(
            update(t.domain)
            .where(t.domain.c.name == "relay-1.example.com")
            .values(relay_nexthop="[192.0.2.25]:25")
        )
        # A moving account in a domain with an alias domain (example-10.net → example-10.org).
        dom = select(t.domain.c.id).where(t.domain.c.name == "example-10.org").scalar_subquery()
        first = (
            select(t.account.c.id)
            .where(t.account.c.domain_id == dom, t.account.c.status == "active")
            .where(t.account.c.local_part != "postmaster")
            .order_by(t.account.c.id)
            .limit(1)
            .scalar_subquery()
        )
        conn.execute(update(t.account).where(t.account.c.id == first).values(status="moving"))
    engine.dispose()
    n.publish_and_pull()
    return n


@pytest.fixture(scope="module")
def conf(nodes: Nodes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal Exim configuration around the exim-mx snippet's three files."""
    work = tmp_path_factory.mktemp("exim-run")
    (work / "spool").mkdir()
    role, target = nodes.roles["exim-mx"], nodes.target("exim-mx")
    path = work / "exim.conf"
    path.write_text(
        "keep_environment = MAPSYNC_KEY\n"
        f"spool_directory = {work / 'spool'}\n"
        f"log_file_path = {work}/%slog\n"
        "primary_hostname = test.invalid\n"
        + role.snippet("main.conf", target)
        + "\nbegin routers\n"
        + role.file("routers.conf")  # reads MAPSYNC_DIR, set in main.conf
        + "\nbegin transports\n"
        + role.file("transports.conf")
    )
    return path


def be(conf: Path, expression: str, key: str = "") -> str:
    """``exim -be``: always exits 0, so failures are read from the output."""
    p = subprocess.run(
        [str(EXIM), "-C", str(conf), "-be", expression],
        capture_output=True,
        text=True,
        env={**os.environ, "MAPSYNC_KEY": key},
    )
    out = p.stdout.strip()
    assert p.returncode == 0 and not p.stderr and not out.startswith(("Failed", "DEFER")), (
        p.stdout + p.stderr
    )
    return out


def bt(conf: Path, address: str) -> str:
    """``exim -bt``: route an address through the snippet's routers."""
    p = subprocess.run([str(EXIM), "-C", str(conf), "-bt", address], capture_output=True, text=True)
    return p.stdout + p.stderr


def lookup(conf: Path, target: Path, name: str, key: str) -> str:
    return be(
        conf,
        f"${{lookup{{${{lc:${{env{{MAPSYNC_KEY}}}}}}}}cdb{{{target}/{name}.cdb}}"
        "{$value}{NOTFOUND}}",
        key,
    )


def test_routes_for_a_domain_and_an_off_store_account(nodes: Nodes, conf: Path) -> None:
    target = nodes.target("exim-mx")
    routes = entries(target / "exim_routes")
    user = next(k for k, v in routes.items() if "@" in k and v != ":defer:")
    domain = user.split("@")[1]
    assert routes[user] != routes[domain]
    assert lookup(conf, target, "exim_routes", "Example-1.ORG") == "<+[10.0.1.11]:24 mapsync_lmtp"
    assert lookup(conf, target, "exim_routes", user.upper()) == routes[user]
    assert lookup(conf, target, "exim_routes", "relay-1.example.com") == (
        "<+[192.0.2.25]:25 mapsync_relay"
    )
    assert lookup(conf, target, "exim_routes", "nobody.example") == "NOTFOUND"


def test_virtual_resolves_an_alias_and_an_alias_domain_address(nodes: Nodes, conf: Path) -> None:
    target = nodes.target("exim-mx")
    virtual = entries(target / "virtual")
    alias, targets = next((k, v) for k, v in virtual.items() if k.endswith("@example-1.org"))
    assert lookup(conf, target, "virtual", alias.upper()) == targets
    assert lookup(conf, target, "virtual", "PostMaster@example-10.net") == (
        "postmaster@example-10.org"
    )


def test_the_domain_list_accepts_hosted_alias_idn_and_relay_domains(conf: Path) -> None:
    check = "${if match_domain{${env{MAPSYNC_KEY}}}{+mapsync_domains}{yes}{no}}"
    for domain in (
        "example-1.org",
        "example-10.net",
        "xn--bcher-1-n2a.example",
        "bücher-1.example",
        "relay-1.example.com",
    ):
        assert be(conf, check, domain) == "yes", domain
    assert be(conf, check, "example.invalid") == "no"


def test_routers_send_accounts_to_their_mailstore_over_lmtp(nodes: Nodes, conf: Path) -> None:
    out = bt(conf, "postmaster@example-1.org")
    assert "router = mapsync_route, transport = mapsync_lmtp" in out, out
    assert "host 10.0.1.11 [10.0.1.11] port=24" in out, out
    # An account housed off its domain's mailstore, as user+tag: its own route wins.
    routes = entries(nodes.target("exim-mx") / "exim_routes")
    user = next(k for k, v in routes.items() if "@" in k and v != ":defer:")
    own = routes[user].split("]")[0].removeprefix("<+[")
    assert own not in routes[user.split("@")[1]]
    out = bt(conf, user.replace("@", "+tag@").upper())
    assert f"transport = mapsync_lmtp\n  host {own} [{own}] port=24" in out, out


def test_routers_expand_aliases_alias_domains_and_catch_alls(nodes: Nodes, conf: Path) -> None:
    out = bt(conf, "Postmaster+Tag@Example-10.net")  # alias domain, +tag, mixed case
    assert "postmaster@example-10.org\n    <-- Postmaster+Tag@Example-10.net" in out, out
    assert "transport = mapsync_lmtp" in out, out
    out = bt(conf, "no-such-user@example-25.org")  # catch-all
    assert "postmaster@example-25.org\n    <-- no-such-user@example-25.org" in out, out
    virtual = entries(nodes.target("exim-mx") / "virtual")
    account = next(k for k, v in virtual.items() if k == v and k.endswith("@example-25.org"))
    # The identity line keeps a real account from being swallowed by the catch-all: Exim
    # redirects it to itself, skips the redirect router for that child, and delivers it.
    out = bt(conf, account)
    assert out.startswith(f"{account}\n    <-- {account}\n  router = mapsync_route"), out
    assert "postmaster" not in out, out


def test_routers_send_relay_domains_over_smtp_and_refuse_unknown_users(conf: Path) -> None:
    out = bt(conf, "anyone@relay-1.example.com")
    assert "router = mapsync_route, transport = mapsync_relay" in out, out
    assert "host 192.0.2.25 [192.0.2.25] port=25" in out, out
    out = bt(conf, "nobody@example-1.org")
    assert "nobody@example-1.org is undeliverable: Unknown user" in out, out


def test_routers_defer_a_moving_account_until_it_lands(nodes: Nodes, conf: Path) -> None:
    # Postfix's transport gives it "retry:"; Exim's route is ":defer:", which mapsync_moving
    # (a redirect router before mapsync_route) turns into a temporary failure.
    routes = entries(nodes.target("exim-mx") / "exim_routes")
    moving = next(k for k, v in routes.items() if v == ":defer:" and k.endswith("@example-10.org"))
    deferred = "cannot be resolved at this time: mailbox is being moved"
    for address in (moving, moving.replace("@", "+tag@").upper()):
        out = bt(conf, address)
        assert out == f"{address} {deferred}\n", out
    # Its alias-domain address is rewritten by mapsync_virtual, then deferred the same way.
    alias = moving.replace("@example-10.org", "@example-10.net")
    out = bt(conf, alias)
    assert out == f"{moving} {deferred}\n    <-- {alias}\n", out
    # Its domain's other accounts still route to their mailstore.
    out = bt(conf, "postmaster@example-10.org")
    assert "router = mapsync_route, transport = mapsync_lmtp" in out, out

"""Exim (unpacked beside Postfix by ``scripts/install --test``) reads the Exim MX channel
through the ``exim-mx`` snippet: its domain list, its lookups and its routers, run with
``exim -bt`` (routing only, no daemon, no delivery) and ``exim -be`` (expansions)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, update

from mapsync.sources import schema as t
from tests.daemons.roles import EXIM, Nodes, entries, make_nodes
from tests.helpers.agent import add_account
from tests.helpers.mailstore import STORE_ROLE, LmtpMailstore, set_lmtp
from tests.helpers.publisher import account_on

pytestmark = pytest.mark.daemons


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    if not EXIM.exists():
        pytest.fail(f"{EXIM} missing: run scripts/install --test (unpacks Exim beside Postfix)")
    # Not pytest's 0700 tmp_path: for -bv, -bh and -bs Exim runs as its own user
    # (Debian-exim), which must read the maps and write the spool.
    root = Path(tempfile.mkdtemp(prefix="mapsync-exim-"))
    root.chmod(0o755)
    try:
        yield _seeded_nodes(root)
    finally:
        shutil.rmtree(root)


def _seeded_nodes(root: Path) -> Nodes:
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
    # An account whose own local part holds a '+', housed off its domain's mailstore, beside
    # the account the part before it names (postmaster, on the domain's default).
    add_account(n.cluster.db_url, "postmaster+eu", "example-1.org", mailstore="store-2")
    n.publish_and_pull()
    return n


@pytest.fixture(scope="module")
def conf(nodes: Nodes) -> Path:
    return exim_conf(nodes, nodes.cluster.root / "exim-run")


def exim_conf(nodes: Nodes, work: Path, main: str = "") -> Path:
    """A minimal Exim configuration around the exim-mx snippet's three files; ``main``: more
    main-section lines of the test's own."""
    (work / "spool").mkdir(parents=True)
    exim_user = pwd.getpwnam("Debian-exim")  # the user Exim's own processes run as
    for d in (work, work / "spool"):
        os.chown(d, exim_user.pw_uid, exim_user.pw_gid)
    role, target = nodes.roles["exim-mx"], nodes.target("exim-mx")
    path = work / "exim.conf"
    path.write_text(
        "keep_environment = MAPSYNC_KEY\n"
        f"spool_directory = {work / 'spool'}\n"
        f"log_file_path = {work}/%slog\n"
        "primary_hostname = test.invalid\n"
        "acl_smtp_rcpt = check_rcpt\n"
        + main
        + role.snippet("main.conf", target)
        + "\nbegin acl\n"
        + RCPT_ACL
        + "\nbegin routers\n"
        + role.file("routers.conf")  # reads MAPSYNC_DIR, set in main.conf
        + "\nbegin transports\n"
        + role.file("transports.conf")
        + "\nbegin retry\n"
        + "* * F,2h,15m; G,16h,1h,1.5; F,4d,6h\n"  # the retry rule of Exim's default configuration
    )
    return path


# An MX's RCPT ACL as Debian's Exim configuration has it: our domains only, and every
# recipient verified (the routers refuse unknown users).
RCPT_ACL = """\
check_rcpt:
  deny    message = relay not permitted
          !domains = +mapsync_domains
  require verify = recipient
  accept
"""


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


def smtp_session(conf: Path, *commands: str, mode: str = "-bh") -> list[str]:
    """An SMTP conversation with Exim on stdin: ``-bh IP`` (a test session, nothing is
    queued) or ``-bs`` (real reception into the spool, queued only: ``-odq``). Each command's
    reply lines (the greeting first)."""
    argv = [
        str(EXIM),
        "-C",
        str(conf),
        *(("-bh", "192.0.2.7") if mode == "-bh" else ("-bs", "-odq")),
    ]
    p = subprocess.run(
        argv,
        input="".join(f"{c}\r\n" for c in ("EHLO client.test.invalid", *commands, "QUIT")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # -bh prints its debugging lines with a leading ">>>" or "LOG:"; replies start with a code.
    return [line for line in p.stdout.splitlines() if line[:3].isdigit()]


def exim(conf: Path, *args: str) -> str:
    p = subprocess.run(
        [str(EXIM), "-C", str(conf), *args], capture_output=True, text=True, timeout=60
    )
    return p.stdout + p.stderr


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


def test_a_local_part_holding_a_plus_is_its_own_address_not_the_part_before_it(
    nodes: Nodes, conf: Path
) -> None:
    """The routers stripped every +suffix before the lookups: mail to the account
    'postmaster+eu@' went to 'postmaster@' (another mailbox, on another mailstore). As
    Postfix does, the whole address is looked up first; a +tag of anyone else still goes to
    the part before it."""
    routes = entries(nodes.target("exim-mx") / "exim_routes")
    own = routes["postmaster+eu@example-1.org"].split("]")[0].removeprefix("<+[")
    default = routes["example-1.org"].split("]")[0].removeprefix("<+[")
    assert own != default
    out = bt(conf, "Postmaster+EU@example-1.org")
    assert f"transport = mapsync_lmtp\n  host {own} [{own}] port=24" in out, out
    out = bt(conf, "postmaster+other@example-1.org")  # a tag of postmaster's
    assert f"transport = mapsync_lmtp\n  host {default} [{default}] port=24" in out, out
    assert exim(conf, "-bv", "postmaster+eu@example-1.org", "postmaster+eu+x@example-1.org") == (
        "postmaster+eu@example-1.org verified\npostmaster+eu+x@example-1.org verified\n"
    )


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
    # Exim's route is ":defer:", which mapsync_moving (a redirect router before mapsync_route)
    # turns into a temporary failure when delivering (-bt routes as a delivery does).
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


def test_a_moving_account_is_accepted_at_rcpt_and_its_mail_waits_in_our_queue(
    nodes: Nodes, conf: Path
) -> None:
    routes = entries(nodes.target("exim-mx") / "exim_routes")
    moving = next(k for k, v in routes.items() if v == ":defer:" and k.endswith("@example-10.org"))
    alias = moving.replace("@example-10.org", "@example-10.net")
    # Verification skips mapsync_moving (no_verify) and mapsync_moving_verify accepts: RCPT
    # answers 250, where a deferring router answered "451 mailbox is being moved" and left
    # the mail in the sender's queue. Unknown users and foreign domains are refused as ever.
    assert exim(conf, "-bv", moving, alias, "nobody@example-10.org") == (
        f"{moving} verified\n{alias} verified\nnobody@example-10.org failed to verify: Unknown user\n"
    )
    mail = "MAIL FROM:<probe@client.test.invalid>"
    replies = smtp_session(
        conf,
        mail,
        f"RCPT TO:<{moving}>",
        f"RCPT TO:<{alias.upper()}>",
        "RCPT TO:<nobody@example-10.org>",
        "RCPT TO:<someone@example.invalid>",
    )
    assert replies[-6:] == [
        "250 OK",
        "250 Accepted",
        "250 Accepted",
        "550 Unknown user",
        "550 relay not permitted",
        "221 test.invalid closing connection",
    ], replies
    # Received for real (-bs, queued only), then a delivery attempt (-M): the router defers
    # it, the message stays in our spool with the reason in its log.
    replies = smtp_session(
        conf, mail, f"RCPT TO:<{moving}>", "DATA", "Subject: held\r\n\r\nhello\r\n.", mode="-bs"
    )
    assert replies[-4:-2] == [
        "250 Accepted",
        '354 Enter message, ending with "." on a line by itself',
    ]
    m = re.fullmatch(r"250 OK id=(\S+)", replies[-2])
    assert m, replies
    queued = m.group(1)
    exim(conf, "-M", queued)
    assert re.search(
        rf" {queued} <probe@client\.test\.invalid>\n +{re.escape(moving)}\n", exim(conf, "-bp")
    )
    assert f"{moving} R=mapsync_moving defer (-1): mailbox is being moved" in exim(
        conf, "-Mvl", queued
    )
    exim(conf, "-Mrm", queued)  # the module's other tests route only


def test_the_lmtp_transport_delivers_to_the_mailstore_on_the_port_of_its_route() -> None:
    """A message received for real (-bs) and delivered (-M) through mapsync_route and
    mapsync_lmtp into a real Dovecot LMTP service (the dovecot-store role). Without a
    ``port`` of its own the LMTP transport's default port is the service name "lmtp", which
    Debian 12's /etc/services lacks: every delivery to a mailstore deferred with 'TCP port
    "lmtp" is not defined for mapsync_lmtp transport', whatever port the route named."""
    root = Path(tempfile.mkdtemp(prefix="mapsync-exim-lmtp-"))
    root.chmod(0o755)
    try:
        nodes = make_nodes(root / "c", ("exim-mx", STORE_ROLE), accounts=12, domains=2, aliases=2)
        store = LmtpMailstore(nodes, root / "store")
        try:
            assert store.lmtp_port is not None and store.lmtp_port != 24
            set_lmtp(nodes.cluster.db_url, "store-1", "127.0.0.1", store.lmtp_port)
            nodes.cluster.publish("--force")  # every route of store-1 changes: the guards
            nodes.cluster.pull()
            _, address = account_on(nodes.cluster, "store-1")
            # Exim routes to none of its own interfaces (self = defer): the mailstore on
            # 127.0.0.1 is another host as far as this MX is concerned.
            conf = exim_conf(nodes, root / "exim", main="local_interfaces = 192.0.2.1\n")
            replies = smtp_session(
                conf,
                "MAIL FROM:<probe@client.test.invalid>",
                f"RCPT TO:<{address}>",
                "DATA",
                "Subject: over lmtp\r\n\r\nhello\r\n.",
                mode="-bs",
            )
            m = re.fullmatch(r"250 OK id=(\S+)", replies[-2])
            assert m, replies
            out = exim(conf, "-M", m.group(1))
            log = (root / "exim" / "mainlog").read_text()
            assert f"=> {address} R=mapsync_route T=mapsync_lmtp" in log, out + log
            assert store.subjects(address) == ["over lmtp"]
        finally:
            store.stop()
    finally:
        shutil.rmtree(root)

"""Postfix reads the maps exactly as the ``postfix-mx`` and ``scanner`` snippets name them:
``postconf`` accepts each snippet, and ``postmap -q`` on each table it names answers the
lookups Postfix makes — catch-alls, alias domains, IDN, relays, ``user+tag`` addresses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, select

from mapsync.sources import schema as t
from tests.conftest import Cluster
from tests.daemons.roles import EXIM, Nodes, entries, make_nodes
from tests.helpers.agent import postmap_q

pytestmark = pytest.mark.daemons


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Nodes:
    return make_nodes(tmp_path_factory.mktemp("postfix"), ("postfix-mx", "scanner"))


def main_cf(nodes: Nodes, name: str, tmp_path: Path) -> dict[str, str]:
    """The role's main.cf lines as Postfix reads them (``postconf -c DIR -xh PARAM``)."""
    conf = tmp_path / name
    conf.mkdir()
    (conf / "main.cf").write_text(nodes.roles[name].snippet("main.cf", nodes.target(name)))
    (conf / "master.cf").write_text("")
    check = subprocess.run(["postconf", "-c", str(conf), "-n"], capture_output=True, text=True)
    assert check.returncode == 0 and "warning" not in check.stderr, check.stderr
    names = [line.split("=")[0].strip() for line in check.stdout.splitlines()]
    out = subprocess.run(
        ["postconf", "-c", str(conf), "-xh", *names], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return dict(zip(names, out, strict=True))


def split(address: str) -> tuple[str, str, str]:
    """``user+tag@domain`` → (user, +tag, domain), with ``recipient_delimiter = +``."""
    local, _, domain = address.rpartition("@")
    user, plus, tag = local.partition("+")
    return user, plus + tag, domain


def address_lookup(address: str, table: str) -> str | None:
    """What Postfix does for relay_recipient_maps and virtual_alias_maps (postmap -q tries
    only the literal key): ``user+tag@domain``, then ``user@domain``, then ``@domain``."""
    user, tag, domain = split(address.lower())
    keys = [f"{user}{tag}@{domain}"] if tag else []
    for key in [*keys, f"{user}@{domain}", f"@{domain}"]:
        value = postmap_q(key, table)
        if value is not None:
            return value
    return None


def transport_lookup(address: str, table: str) -> str | None:
    """trivial-rewrite's transport_maps search: ``user+tag@domain``, ``user@domain``,
    ``domain`` (``.domain`` only with parent_domain_matches_subdomains, unused here)."""
    user, tag, domain = split(address.lower())
    keys = [f"{user}{tag}@{domain}"] if tag else []
    for key in [*keys, f"{user}@{domain}", domain]:
        value = postmap_q(key, table)
        if value is not None:
            return value
    return None


def test_the_mx_snippet_reads_every_map_of_its_channel_as_cdb(nodes: Nodes, tmp_path: Path) -> None:
    cf = main_cf(nodes, "postfix-mx", tmp_path)
    target = nodes.target("postfix-mx")
    assert cf["relay_domains"] == f"cdb:{target}/domains"
    assert cf["relay_recipient_maps"] == f"cdb:{target}/recipients"
    assert cf["virtual_alias_maps"] == f"cdb:{target}/virtual"
    assert cf["transport_maps"] == f"cdb:{target}/transport"
    assert cf["smtpd_sender_login_maps"] == f"cdb:{target}/senders"
    assert cf["recipient_delimiter"] == "+"
    read = {v.removeprefix("cdb:").rsplit("/", 1)[1] for v in cf.values() if v.startswith("cdb:")}
    assert read == set(nodes.roles["postfix-mx"].maps)


def test_every_key_of_every_mx_map_is_found_through_the_snippet(
    nodes: Nodes, tmp_path: Path
) -> None:
    cf = main_cf(nodes, "postfix-mx", tmp_path)
    for table in (v for v in cf.values() if v.startswith("cdb:")):
        text = Path(table.removeprefix("cdb:"))
        want = entries(text)
        keys = "\n".join(want).encode()
        # One postmap process for all keys (postmap -q - reads keys from stdin).
        p = subprocess.run(["postmap", "-q", "-", table], input=keys, capture_output=True)
        assert p.returncode == 0 and not p.stderr, (table, p.stderr)
        got = dict(line.split(b"\t", 1) for line in p.stdout.splitlines())
        assert {k.decode(): v.decode() for k, v in got.items()} == want, table


def test_domains_accepts_hosted_alias_idn_and_relay_domains(nodes: Nodes, tmp_path: Path) -> None:
    domains = main_cf(nodes, "postfix-mx", tmp_path)["relay_domains"]
    for name in (
        "example-1.org",
        "EXAMPLE-1.ORG",
        "example-10.net",  # alias domain
        "xn--bcher-1-n2a.example",  # IDN alias domain, A-label
        "bücher-1.example",  # and its U-label (SMTPUTF8)
        "relay-1.example.com",
    ):
        assert postmap_q(name, domains) == "OK", name
    assert postmap_q("example.invalid", domains) is None


def test_recipients_know_accounts_aliases_alias_domains_catch_alls_and_relays(
    nodes: Nodes, tmp_path: Path
) -> None:
    recipients = main_cf(nodes, "postfix-mx", tmp_path)["relay_recipient_maps"]
    assert address_lookup("postmaster@example-1.org", recipients) == "OK"
    assert address_lookup("Postmaster+Tag@Example-1.org", recipients) == "OK"  # via user@domain
    assert address_lookup("postmaster@example-10.net", recipients) == "OK"  # alias domain
    assert address_lookup("postmaster@bücher-1.example", recipients) == "OK"  # IDN, U-label
    assert address_lookup("anything@example-25.org", recipients) == "OK"  # catch-all
    assert address_lookup("anyone@relay-1.example.com", recipients) == "OK"  # relay domain
    assert address_lookup("nobody@example-1.org", recipients) is None
    assert address_lookup("postmaster+x@example-2.org", recipients) == "OK"


def test_virtual_rewrites_aliases_alias_domains_and_catch_alls_but_keeps_accounts(
    nodes: Nodes, tmp_path: Path
) -> None:
    virtual = main_cf(nodes, "postfix-mx", tmp_path)["virtual_alias_maps"]
    text = entries(nodes.target("postfix-mx") / "virtual")
    alias, targets = next((k, v) for k, v in text.items() if k.endswith("@example-1.org"))
    assert address_lookup(alias, virtual) == targets
    assert address_lookup(alias.replace("@", "+news@"), virtual) == targets
    assert address_lookup("postmaster@example-10.net", virtual) == "postmaster@example-10.org"
    assert address_lookup("postmaster@xn--bcher-1-n2a.example", virtual) == (
        "postmaster@example-1.org"
    )
    catchall = postmap_q("@example-25.org", virtual)
    assert catchall == "postmaster@example-25.org"
    assert address_lookup("no-such-user@example-25.org", virtual) == catchall
    # The identity line keeps a real account of a catch-all domain from being swallowed.
    account = next(
        k
        for k in entries(nodes.target("postfix-mx") / "senders")
        if k.endswith("@example-25.org") and not k.startswith("postmaster")
    )
    assert address_lookup(account, virtual) == account
    assert address_lookup("postmaster@example-1.org", virtual) is None  # no rewrite


def test_transport_routes_domains_off_store_accounts_tags_moves_and_relays(
    nodes: Nodes, tmp_path: Path
) -> None:
    for name in ("postfix-mx", "scanner"):
        transport = main_cf(nodes, name, tmp_path)["transport_maps"]
        text = entries(Path(transport.removeprefix("cdb:")))
        user, route = next((k, v) for k, v in text.items() if "@" in k and v.startswith("lmtp:"))
        domain = user.split("@")[1]
        assert text[domain] != route  # housed off its domain's default mailstore
        assert transport_lookup(user, transport) == route
        # user+tag@domain: no key of its own, so Postfix's next key (user@domain) decides,
        # not the domain's route.
        assert postmap_q(user.replace("@", "+tag@"), transport) is None
        assert transport_lookup(user.replace("@", "+tag@"), transport) == route
        assert transport_lookup(f"someone@{domain}", transport) == text[domain]
        assert transport_lookup("x@example-1.org", transport) == "lmtp:[10.0.1.11]:24"
        assert transport_lookup("x@relay-1.example.com", transport) == (
            "relay:[mx.relay-1.example.com]:25"
        )
        moving = [k for k, v in text.items() if v.startswith("mapsync-moving:")]
        assert moving  # the seed has moving accounts
        for address in moving:
            assert transport_lookup(address, transport) == (
                "mapsync-moving:4.2.0 mailbox is being moved"
            )


def test_the_scanner_snippet_reads_only_its_channel(nodes: Nodes, tmp_path: Path) -> None:
    cf = main_cf(nodes, "scanner", tmp_path)
    target = nodes.target("scanner")
    assert cf["relay_domains"] == f"cdb:{target}/domains"
    assert cf["transport_maps"] == f"cdb:{target}/transport"
    assert cf["relay_recipient_maps"] == ""  # the MX verified recipients already
    read = {v.removeprefix("cdb:").rsplit("/", 1)[1] for v in cf.values() if v.startswith("cdb:")}
    assert read == set(nodes.roles["scanner"].maps)


def test_senders_give_each_address_its_login(nodes: Nodes, tmp_path: Path) -> None:
    senders = main_cf(nodes, "postfix-mx", tmp_path)["smtpd_sender_login_maps"]
    assert postmap_q("postmaster@example-1.org", senders) == "postmaster@example-1.org"
    assert postmap_q("Postmaster@Example-10.NET", senders) == "postmaster@example-10.org"
    disabled = [
        k
        for k, v in entries(nodes.target("postfix-mx") / "recipients").items()
        if k not in entries(nodes.target("postfix-mx") / "senders") and not k.startswith("@")
    ]
    assert disabled  # login-disabled accounts and aliases own no sender address
    assert postmap_q(disabled[0], senders) is None


def test_a_u_label_postfix_folds_to_other_letters_is_found(cluster: Cluster) -> None:
    """Postfix folds a key's case fully as it builds a map and as it looks one up ('ß' →
    'ss', final sigma → sigma): the U-label is also keyed folded, or SMTPUTF8 mail to
    `straße.example` was refused. Exim lowercases only, and finds the U-label as it is. A
    U-label that folds to another domain's name is refused, naming both."""
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(
            insert(t.domain).values(
                id=9100,
                name="xn--strae-oqa.example",
                name_unicode="straße.example",
                kind="hosted",
                default_mailstore_id=1,
            )
        )
        conn.execute(insert(t.account).values(domain_id=9100, local_part="postmaster"))
    cluster.publish()
    cluster.pull()
    for key in ("straße.example", "STRASSE.example", "xn--strae-oqa.example"):
        assert postmap_q(key, f"cdb:{cluster.target / 'domains'}") == "OK", key
    assert postmap_q("postmaster@straße.example", f"cdb:{cluster.target / 'recipients'}") == "OK"
    # Exim reads the same maps with ${lc:...}, which leaves 'ß' as it is: the U-label is a
    # key too.
    conf = cluster.root / "exim.conf"
    conf.write_text(f"primary_hostname = test.invalid\nspool_directory = {cluster.root}\n")
    for key in ("straße.example", "postmaster@straße.example"):
        table = cluster.target / ("domains.cdb" if "@" not in key else "recipients.cdb")
        p = subprocess.run(
            [str(EXIM), "-C", str(conf), "-be", f"${{lookup{{${{lc:{key}}}}}cdb{{{table}}}}}"],
            capture_output=True,
            text=True,
        )
        assert p.stdout.strip() == "OK", (key, p.stdout, p.stderr)

    with engine.begin() as conn:
        conn.execute(
            insert(t.domain).values(
                id=9101, name="strasse.example", kind="hosted", default_mailstore_id=1
            )
        )
    engine.dispose()
    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        "domain id=9100 'xn--strae-oqa.example': name_unicode 'straße.example' is looked up by "
        "Postfix as 'strasse.example'"
    ) in p.stderr


def test_an_account_with_the_delimiter_in_its_local_part_keeps_its_mail(cluster: Cluster) -> None:
    """With recipient_delimiter = +, Postfix looks up 'events+x@d' and then 'events@d': an
    account 'events+x' beside an alias 'events' had its mail go to the alias's target
    (another customer). Its identity line is found first."""
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        domain = conn.execute(
            select(t.domain.c.id, t.domain.c.name).where(t.domain.c.kind == "hosted").limit(1)
        ).one()
        conn.execute(insert(t.account).values(domain_id=domain.id, local_part="events+x"))
        alias = conn.execute(
            insert(t.alias).values(domain_id=domain.id, local_part="events")
        ).inserted_primary_key[0]
        conn.execute(insert(t.alias_target).values(alias_id=alias, target="zoe@elsewhere.test"))
    engine.dispose()
    cluster.publish()
    cluster.pull()
    virtual = f"cdb:{cluster.target / 'virtual'}"
    assert address_lookup(f"events+x@{domain.name}", virtual) == f"events+x@{domain.name}"
    assert address_lookup(f"events+y@{domain.name}", virtual) == "zoe@elsewhere.test"
    assert address_lookup(f"events@{domain.name}", virtual) == "zoe@elsewhere.test"

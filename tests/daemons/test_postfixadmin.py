"""An existing PostfixAdmin database, read as it is: for every address in it and every probe,
real Postfix (``postmap -q`` on the published maps) and a real Dovecot (on the published
passwd-file) give the answers PostfixAdmin's own documented SQL lookups give on the same
database — on SQLite, the running MariaDB and the running PostgreSQL. Where mapsync differs on
purpose, the difference is named below (and in docs/postfixadmin.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from mapsync.formats import text as text_map
from tests.conftest import Cluster
from tests.daemons.roles import entries, role
from tests.helpers import postfixadmin as pfa
from tests.helpers.config import mx_and_store
from tests.helpers.dovecot import Dovecot, passwd_file_dovecot

pytestmark = pytest.mark.daemons

# The deliberate differences, by address (docs/postfixadmin.md, "Where mapsync differs").
# A mailbox of an inactive domain: PostfixAdmin's Dovecot queries ignore domain.active and
# would still let it log in; mapsync treats the domain's mailboxes as disabled with it.
INACTIVE_DOMAIN_MAILBOXES = {"carol@inactive.example"}
# Cleartext passwords are never published: with --skip-invalid the mailbox keeps its mail
# and loses its login (PostfixAdmin's Dovecot would accept the cleartext).
CLEARTEXT = set(pfa.CLEARTEXT)
# ARGON2ID as Dovecot writes it by default needs 1 GiB per check: compared by its line only.
NOT_LOGGED_IN_HERE = {"jan@example.com"}


def mx_channel_maps() -> list[str]:
    return ["domains", "recipients", "virtual", "transport", "senders"]


def write_config(root: Path, url: str, prefix: str, minimal: bool = False) -> Cluster:
    """A publisher reading PostfixAdmin at ``url``, an MX node and a mailstore node."""
    settings = ""
    if not minimal:
        settings = f"""
[publisher.postfixadmin]
prefix = "{prefix}"
vacation_domain = "{pfa.VACATION_DOMAIN}"
vacation_nexthop = "{pfa.VACATION_NEXTHOP}"

[publisher.postfixadmin.mailstores.local]
lmtp_host = "127.0.0.1"

[publisher.postfixadmin.mailstores.store-2]
lmtp_host = "10.0.1.12"
domains = ["lmtp.example", "alias2.*"]
"""
    return mx_and_store(
        root,
        url,
        f'schema = "postfixadmin"\n{settings}',
        mx_channel_maps(),
        ("dovecot_users", "dovecot_deny"),
    )


ENGINES = {
    # engine → (table prefix, PostfixAdmin schema version): the late columns differ by version.
    "sqlite": ("", 1856),
    "mariadb": ("pfa_", 1856),
    "postgresql": ("", 1847),
}


@pytest.fixture(params=sorted(ENGINES))
def installation(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str]]:
    """(engine, url, prefix) of a freshly built PostfixAdmin database."""
    engine = request.param
    prefix, version = ENGINES[engine]
    if engine == "sqlite":
        root = Path(tempfile.mkdtemp(prefix="mapsync-pfa-db-"))
        url = f"sqlite:///{root / 'postfixadmin.db'}"
        pfa.build(url, prefix, version)
        yield engine, url, prefix
        shutil.rmtree(root)
        return
    url = request.getfixturevalue("pg_url" if engine == "postgresql" else "mariadb_url")
    pfa.build(url, prefix, version)
    yield engine, url, prefix


@pytest.fixture
def published(installation: tuple[str, str, str]) -> Iterator[tuple[str, Cluster, pfa.Lookups]]:
    engine, url, prefix = installation
    # Dovecot's auth process runs as user dovecot: the node must be a directory it may enter.
    root = Path(tempfile.mkdtemp(prefix="mapsync-pfa-"))
    root.chmod(0o755)
    lookups = pfa.Lookups(url, prefix)
    try:
        cluster = write_config(root / "c", url, prefix)
        cluster.publish("--skip-invalid")
        cluster.pull()
        yield engine, cluster, lookups
    finally:
        lookups.close()
        shutil.rmtree(root)


def nexthop(transport: str, domain: str) -> str:
    """``smtp:[h]:25`` → ``[h]:25``; a bare ``relay`` → the domain (Postfix looks up its MX)."""
    return transport.partition(":")[2] or domain


def oracle_delivery(lk: pfa.Lookups, final: str) -> tuple[str, ...]:
    """Where PostfixAdmin's lookups send one final recipient."""
    domain = final.rpartition("@")[2]
    if domain == pfa.VACATION_DOMAIN:
        return ("vacation",)  # the transport entry PostfixAdmin's VIRTUAL_VACATION docs add
    if lk.value("relay_domains", domain):
        return ("relay", nexthop(lk.value("transport", domain) or "", domain))
    if lk.value("domains", domain):
        maildir = lk.mailbox(final)
        return ("mailbox", f"{pfa.MAIL_BASE}/{maildir}") if maildir else ("unknown",)
    return ("external",)


def published_delivery(mx: Path, store: pfa.Dovecot, final: str) -> tuple[str, ...]:
    """Where the published maps (transport by postmap, mailbox by Dovecot) send it."""
    domain = final.rpartition("@")[2]
    transport = pfa.postmap_reader(mx / "transport")
    route = transport(final) or transport(domain)
    if route is None:
        return ("external",)
    if route.startswith("relay:"):
        if domain == pfa.VACATION_DOMAIN:
            assert route == f"relay:{pfa.VACATION_NEXTHOP}"
            return ("vacation",)
        return ("relay", route.removeprefix("relay:"))
    assert route.startswith("lmtp:["), route
    user = store.user(final)
    return ("mailbox", user["home"]) if user else ("unknown",)


def test_the_published_maps_answer_as_postfixadmins_own_lookups(
    published: tuple[str, Cluster, pfa.Lookups],
) -> None:
    engine, cluster, lk = published
    mx = cluster.root / "nodes" / "mx"
    store_dir = cluster.root / "nodes" / "store"
    domains, recipients, virtual = (
        pfa.postmap_reader(mx / m) for m in ("domains", "recipients", "virtual")
    )
    senders = pfa.postmap_reader(mx / "senders")
    store = passwd_file_dovecot(cluster.root / "dovecot", store_dir / "dovecot_users")
    try:
        mismatches = []
        checked = 0
        for address in pfa.addresses():
            domain = address.rpartition("@")[2]
            # Is the domain ours (relayed or delivered), and is the recipient accepted?
            relay = lk.value("relay_domains", domain) is not None
            ours = relay or lk.value("domains", domain) is not None
            if domain == "all" and ours:
                # MariaDB's case-insensitive collation makes 'all' find PostfixAdmin's 'ALL'
                # row; it is no mail domain, and mapsync never publishes it.
                assert engine == "mariadb" and domains(domain) is None
                ours = False
            assert (domains(domain) is not None) == ours, (engine, address)
            if relay:
                accepted = True
            elif ours:
                accepted = address not in pfa.ONLY_STALE_TARGETS and any(
                    v is not None
                    for v in (lk.virtual(address), lk.virtual(f"@{domain}"), lk.mailbox(address))
                )
            else:
                accepted = False
            published_accepts = ours and (
                recipients(address) is not None or recipients(f"@{domain}") is not None
            )
            if accepted != published_accepts:
                mismatches.append(f"{address}: accepted {accepted} vs {published_accepts}")
                continue
            if not accepted:
                continue
            # Where does its mail end up, recipient by recipient?
            expected = {
                final: oracle_delivery(lk, final)
                for final in pfa.resolve(address, lk.virtual)
                if final == address or final not in pfa.STALE_TARGETS
            }
            got = {
                final: published_delivery(mx, store, final)
                for final in pfa.resolve(address, virtual)
            }
            checked += 1
            if expected != got:
                mismatches.append(f"{address}: {expected} vs {got}")
            # smtpd_sender_login_maps: who may send as this address.
            owner = lk.value("sender_login", address)
            if owner != senders(address) and address not in CLEARTEXT:
                mismatches.append(f"{address}: sender login {owner} vs {senders(address)}")

        # Dovecot: every mailbox, and a few that must not exist.
        for m in [*pfa.MAILBOXES, pfa.MailboxRow("nobody@example.com", "md5")]:
            user = m.username
            row = lk.query("user", user)
            expect_user = row is not None and user not in INACTIVE_DOMAIN_MAILBOXES
            got_user = store.user(user)
            if expect_user != (got_user is not None):
                mismatches.append(f"{user}: userdb {expect_user} vs {got_user}")
            elif row and got_user:
                home, quota = row[0]
                if got_user["home"] != home:
                    mismatches.append(f"{user}: home {home} vs {got_user['home']}")
                rule = got_user.get("quota_rule")
                if (f"*:bytes={quota}" if quota else None) != rule:
                    mismatches.append(f"{user}: quota {quota} vs {rule}")
            if user in NOT_LOGGED_IN_HERE:
                line = dict(text_map.pairs(store_dir / "dovecot_users", sep=b":"))
                assert line[user.encode()].startswith(pfa.HASHES[m.hash].encode())
                continue
            expect_login = (
                lk.value("password", user) is not None
                and user not in INACTIVE_DOMAIN_MAILBOXES
                and user not in CLEARTEXT
            )
            if store.login(user, pfa.PASSWORD) != expect_login:
                mismatches.append(f"{user}: login {not expect_login} vs {expect_login}")
        # Last: a failed login delays the next ones.
        assert not store.login("postmaster@example.com", "not the password")
        assert not mismatches, f"{engine}:\n" + "\n".join(mismatches)
        assert checked >= 25, checked
    finally:
        store.stop()


def test_smtp_active_off_refuses_smtp_auth_in_a_real_dovecot_where_the_column_exists(
    published: tuple[str, Cluster, pfa.Lookups],
) -> None:
    """PostfixAdmin's documented Dovecot variant: ``smtp_active = 0`` refuses SMTP AUTH (and
    Dovecot's submission service), IMAP and POP3 still log in. Before schema 1850 there is
    no such column, and nobody is refused (the PostgreSQL installation here is 1847)."""
    engine, cluster, _ = published
    store_dir = cluster.root / "nodes" / "store"
    has_column = ENGINES[engine][1] >= 1850
    denied = {"smtp/gus@example.com", "submission/gus@example.com"} if has_column else set()
    assert set(entries(store_dir / "dovecot_deny", ":")) == denied
    snippet = role("dovecot-store").snippet("dovecot.conf", store_dir)
    store = Dovecot(cluster.root / "dovecot-deny", "pfa-deny", snippet)
    try:
        for user in ("gus@example.com", "postmaster@example.com"):
            for service in ("imap", "pop3", "smtp", "submission"):
                refused = f"{service}/{user}" in denied
                got = store.auth(service, user, pfa.PASSWORD)
                assert got == (77 if refused else 0), (engine, user, service)
    finally:
        store.stop()


def test_the_pseudo_domain_and_inactive_rows_are_not_published(
    published: tuple[str, Cluster, pfa.Lookups],
) -> None:
    _, cluster, _ = published
    mx = cluster.root / "nodes" / "mx"
    domains = {k.decode() for k, _ in text_map.pairs(mx / "domains")}
    assert "all" not in domains and "inactive.example" not in domains
    assert {"example.com", "backup.example", "relay.example", pfa.VACATION_DOMAIN} <= domains
    transport = {k.decode(): v.decode() for k, v in text_map.pairs(mx / "transport")}
    # Per-domain mailstore rules: PostfixAdmin has no per-mailbox server.
    assert transport["lmtp.example"] == "lmtp:[10.0.1.12]:24"
    assert transport["alias2.example"] == "lmtp:[10.0.1.12]:24"
    assert transport["example.com"] == "lmtp:[127.0.0.1]:24"
    users = {
        k.decode()
        for k, _ in text_map.pairs(cluster.root / "nodes" / "store" / "dovecot_users", sep=b":")
    }
    assert "carl@example.com" not in users  # inactive mailbox
    assert "carol@inactive.example" not in users  # inactive domain


def test_only_database_and_schema_publish_and_cleartext_costs_the_login_not_the_mail(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'postfixadmin.db'}"
    pfa.build(url)
    cluster = write_config(tmp_path / "c", url, "", minimal=True)
    # Cleartext passwords are refused, naming PostfixAdmin's table and key; nothing published.
    refused = cluster.cli("publish")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    for user in pfa.CLEARTEXT:
        assert f"mailbox '{user}': password scheme CLEARTEXT is not allowed" in refused.stderr
    assert pfa.PASSWORD not in refused.stdout + refused.stderr
    assert not (cluster.repo / "mx" / "LATEST").exists()
    # --skip-invalid drops just those logins: the mail still arrives.
    run = cluster.publish("--skip-invalid")
    assert "skipped 2 invalid row(s)" in run.stdout
    # The log names each row as PostfixAdmin does, and where it is left out.
    for user in pfa.CLEARTEXT:
        (logged,) = [x for x in run.stderr.splitlines() if f"key={user}" in x]
        assert "skipping invalid row" in logged and "channels=store" in logged
        assert f"where=\"mailbox '{user}'\"" in logged, logged
    cluster.pull()
    mx = cluster.root / "nodes" / "mx"
    recipients = {k.decode() for k, _ in text_map.pairs(mx / "recipients")}
    assert {"kim@example.com", "lee@example.com"} <= recipients
    assert dict(text_map.pairs(mx / "transport"))[b"example.com"] == b"lmtp:[127.0.0.1]:24"
    users = {
        k.decode(): v.decode()
        for k, v in text_map.pairs(cluster.root / "nodes" / "store" / "dovecot_users", sep=b":")
    }
    for user in pfa.CLEARTEXT:
        assert users[user].startswith(":5000:5000::/var/vmail/example.com/")
        assert users[user].endswith("nologin=y")
    assert (
        pfa.PASSWORD.encode()
        not in (cluster.root / "nodes" / "store" / "dovecot_users").read_bytes()
    )


def test_the_fingerprint_sees_postfixadmin_edits_and_nothing_else(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'postfixadmin.db'}"
    pfa.build(url)
    engine = create_engine(url)
    # An installation without cleartext rows publishes quietly. (Their alias rows stay behind,
    # pointing at themselves: an orphaned self-alias leads nowhere and is left out.)
    with engine.begin() as conn:
        conn.execute(
            text(
                "DELETE FROM mailbox WHERE password NOT LIKE '$%' AND password NOT LIKE '{%' AND length(password) < 13"
            )
        )
        conn.execute(text("DELETE FROM mailbox WHERE password LIKE '{CLEARTEXT}%'"))
    cluster = write_config(tmp_path / "c", url, "", minimal=True)
    cluster.publish()
    # Nothing changed: the fingerprint (counts, newest `modified`) says so, no rows are read
    # (once a full read came two seconds after the fingerprint was first seen: whole seconds).
    time.sleep(2.1)
    cluster.publish()
    again = cluster.cli("publish", check=True)
    assert "channel mx: unchanged (serial 1)" in again.stdout, again.stdout
    assert "reading snapshot" not in again.stderr
    # PostfixAdmin sets `modified` on every edit: an edited goto is seen and published.
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE alias SET goto = 'alice@example.com,hal@example.com',"
                " modified = '2026-11-30 11:00:00' WHERE address = 'sales@example.com'"
            )
        )
    engine.dispose()
    cluster.publish()
    cluster.pull()
    virtual = dict(text_map.pairs(cluster.root / "nodes" / "mx" / "virtual"))
    assert virtual[b"sales@example.com"] == b"alice@example.com,hal@example.com"
    # A changed mailstore setting is a change too, though no row changed.
    cluster.config_path.write_text(
        cluster.config_path.read_text()
        + '\n[publisher.postfixadmin.mailstores.store-9]\nlmtp_host = "10.0.1.19"\n'
    )
    cluster.publish("--force")  # most domains move: more than the guard's share
    cluster.pull()
    transport = dict(text_map.pairs(cluster.root / "nodes" / "mx" / "transport"))
    assert transport[b"example.com"] == b"lmtp:[10.0.1.19]:24"


def test_a_problem_names_the_postfixadmin_table_and_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'postfixadmin.db'}"
    pfa.build(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE alias SET goto = 'alice@example.com,broken@' WHERE address = 'sales@example.com'"
            )
        )
    engine.dispose()
    cluster = write_config(tmp_path / "c", url, "", minimal=True)
    p = cluster.cli("publish", "--channel", "mx")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "alias 'sales@example.com': target 'broken@'" in p.stderr, p.stderr


def test_a_quota_that_is_not_a_number_is_one_invalid_row(tmp_path: Path) -> None:
    # SQLite keeps '10M' in an INTEGER column: one mailbox's problem, named, never a crash of
    # every run (and --channel mx, which carries no quota, is not touched by it).
    url = f"sqlite:///{tmp_path / 'postfixadmin.db'}"
    pfa.build(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE mailbox SET quota = '10M' WHERE username = 'kim@example.com'"))
    engine.dispose()
    cluster = write_config(tmp_path / "c", url, "", minimal=True)
    p = cluster.cli("publish", "--channel", "store")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "mailbox 'kim@example.com': quota_bytes '10M' is not a number" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "unexpected error" not in p.stderr
    mx = cluster.cli("publish", "--skip-invalid", "--channel", "mx")
    assert mx.returncode == 0, mx.stdout + mx.stderr


def test_a_missing_table_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'postfixadmin.db'}"
    pfa.build(url, prefix="pfa_")
    cluster = write_config(tmp_path / "c", url, "", minimal=True)  # prefix not configured
    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "PostfixAdmin table 'domain' not found" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_the_postfixadmin_demo_runs_the_cluster_on_a_postfixadmin_database() -> None:
    """`mapsync demo --schema postfixadmin`, as a newcomer with a PostfixAdmin runs it."""
    root = Path(tempfile.mkdtemp(prefix="mapsync-pfa-demo-"))
    root.chmod(0o755)  # the Dovecot below reads the store's passwd-file as user dovecot
    d = root / "demo"
    try:
        first = subprocess.run(
            [sys.executable, "-m", "mapsync", "demo", "--schema", "postfixadmin", "--dir", str(d)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert first.returncode == 0, first.stdout + first.stderr
        assert "PostfixAdmin database (SQLite), as PostfixAdmin fills it" in first.stdout
        assert first.stdout.count("installed serial 1") == 7  # the submission relay too
        assert 'schema = "postfixadmin"' in (d / "mapsync.toml").read_text()
        mx = d / "nodes" / "mx" / "postfix"
        virtual, transport = (
            pfa.postmap_reader(mx / "virtual"),
            pfa.postmap_reader(mx / "transport"),
        )
        assert virtual("user003@alias-1.org") == "user003@example-1.org"  # alias domain
        assert virtual("user003@example-1.org") == (
            "someone@elsewhere.example,user003@example-1.org"  # forward, keeping a copy
        )
        assert transport("example-2.org") == "lmtp:[10.0.1.12]:24"  # per-domain mailstore
        assert transport("backup-1.org") == "relay:backup-1.org"  # backup MX
        assert pfa.postmap_reader(mx / "domains")("all") is None
        store = passwd_file_dovecot(
            root / "dovecot", d / "nodes" / "store-1" / "dovecot" / "dovecot_users"
        )
        try:
            assert store.login("user001@example-1.org", "demo-password")
        finally:
            store.stop()
        again = subprocess.run(
            [sys.executable, "-m", "mapsync", "demo", "--dir", str(d)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("unchanged (serial 1)") == 7
    finally:
        shutil.rmtree(root)


def test_the_fingerprint_on_every_engine(installation: tuple[str, str, str]) -> None:
    """Counts and newest `modified` per table, read the same way on SQLite, MariaDB and
    PostgreSQL: equal while nothing changes, different after an edit or a deletion."""
    from mapsync.config import PostfixAdminConfig
    from mapsync.sources.postfixadmin import PostfixAdminSource

    engine_name, url, prefix = installation
    source = PostfixAdminSource(url, PostfixAdminConfig(prefix=prefix))
    try:
        first = source.fingerprint()
        assert source.fingerprint() == first
        assert source.snapshot().fingerprint == first  # read inside the snapshot's transaction
        assert first.tables["mailbox"][0] == len(pfa.MAILBOXES)
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"UPDATE {prefix}alias SET goto = 'alice@example.com',"
                    " modified = '2026-11-30 12:00:00' WHERE address = 'sales@example.com'"
                )
            )
        edited = source.fingerprint()
        assert edited != first and edited.tables["alias"][0] == first.tables["alias"][0]
        with engine.begin() as conn:
            conn.execute(text(f"DELETE FROM {prefix}alias WHERE address = 'sales@example.com'"))
        engine.dispose()
        assert source.fingerprint().tables["alias"][0] == first.tables["alias"][0] - 1
    finally:
        source.close()
    assert engine_name in ENGINES


def test_a_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'postfixadmin.db'}"
    pfa.build(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE domain DROP COLUMN backupmx"))
    engine.dispose()
    cluster = write_config(tmp_path / "c", url, "", minimal=True)
    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "PostfixAdmin table 'domain' has no column 'backupmx'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_two_edits_in_one_second_are_both_published(
    installation: tuple[str, str, str], tmp_path: Path
) -> None:
    """PostfixAdmin's `modified` has whole seconds: a second edit in the second of the first
    leaves count and newest `modified` as the first made them. The publisher trusts such a
    fingerprint only after a full read two seconds after it first saw it, so the second edit
    is published by the next run (it waited for the full check, 15 minutes)."""
    engine_name, url, prefix = installation
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"DELETE FROM {prefix}mailbox WHERE password NOT LIKE '$%'"))
    cluster = write_config(tmp_path / "c", url, prefix)
    cluster.publish()

    def edit(address: str, goto: str) -> None:
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"UPDATE {prefix}alias SET goto = :g, modified = '2026-11-30 12:00:00'"
                    " WHERE address = :a"
                ),
                {"g": goto, "a": address},
            )

    edit("sales@example.com", "alice@example.com")
    assert "published serial 2" in cluster.publish().stdout
    edit("team@lmtp.example", "partner@external.example")
    p = cluster.publish()
    assert "published serial 3" in p.stdout, (engine_name, p.stdout, p.stderr)
    cluster.pull()
    virtual = dict(text_map.pairs(cluster.root / "nodes" / "mx" / "virtual"))
    assert virtual[b"team@lmtp.example"] == b"partner@external.example"
    assert virtual[b"sales@example.com"] == b"alice@example.com"
    # Once a full read came two seconds after the fingerprint was first seen, it is trusted.
    time.sleep(2.1)
    assert "unchanged (serial 3)" in cluster.publish().stdout
    again = cluster.publish()
    assert "channel mx: unchanged (serial 3)" in again.stdout
    assert "reading snapshot" not in again.stderr, again.stderr
    engine.dispose()

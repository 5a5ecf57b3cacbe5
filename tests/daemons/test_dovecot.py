"""Throwaway Dovecot instances started from the ``dovecot-store`` and ``dovecot-proxy``
snippets read what the agent installed: a seeded account logs in on its mailstore, userdb
gives home, uid, gid and quota, a login-disabled account is refused by a real IMAP login, a
password changed in the database works after publish and pull without restarting Dovecot,
and the proxy sends each user to its mailstore without ever seeing a hash."""

from __future__ import annotations

import grp
import imaplib
import pwd
import random
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, update

from mapsync.config import FileMode
from mapsync.sources import schema as t
from mapsync.sources.seed import sha512_crypt
from tests.daemons.roles import PASSWORD, Nodes, entries, make_nodes
from tests.helpers.dovecot import Dovecot
from tests.helpers.publisher import account_on, set_row

pytestmark = pytest.mark.daemons


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    # Dovecot's auth process runs as user dovecot: pytest's tmp_path (0700 root) is out of its
    # reach, so the nodes live in a directory it may traverse. The agent installs
    # dovecot_users 0640 root:dovecot, which is what makes it readable here.
    root = Path(tempfile.mkdtemp(prefix="mapsync-dovecot-"))
    root.chmod(0o755)
    try:
        yield make_nodes(root / "c", ("dovecot-store", "dovecot-proxy"))
    finally:
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def store(nodes: Nodes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    role = nodes.roles["dovecot-store"]
    d = Dovecot(
        tmp_path_factory.mktemp("store") / "d",
        "store",
        role.snippet("dovecot.conf", nodes.target("dovecot-store")),
    )
    yield d
    d.stop()


@pytest.fixture(scope="module")
def proxy(nodes: Nodes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    role = nodes.roles["dovecot-proxy"]
    d = Dovecot(
        tmp_path_factory.mktemp("proxy") / "d",
        "proxy",
        role.snippet("dovecot.conf", nodes.target("dovecot-proxy")),
    )
    yield d
    d.stop()


def users(nodes: Nodes) -> dict[str, list[str]]:
    """dovecot_users as installed: user → [password, uid, gid, gecos, home, shell, extra]."""
    return {
        k: v.split(":", 6)
        for k, v in entries(nodes.target("dovecot-store") / "dovecot_users", ":").items()
    }


def fields(out: str) -> dict[str, str]:
    """``doveadm user`` output: a ``field<TAB>value`` table."""
    return dict(line.split("\t", 1) for line in out.splitlines()[1:] if "\t" in line)


def test_the_password_file_is_installed_as_the_roles_agent_toml_says(nodes: Nodes) -> None:
    files = nodes.roles["dovecot-store"].files
    assert files["dovecot_users"] == FileMode(0o640, "root", "dovecot")  # from agents/
    st = (nodes.target("dovecot-store") / "dovecot_users").stat()  # through the symlink
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name) == (
        "root",
        "dovecot",
    )


def test_a_seeded_account_of_this_mailstore_logs_in(nodes: Nodes, store: Dovecot) -> None:
    assert "postmaster@example-1.org" in users(nodes)  # example-1.org lives on store-1
    p = store.doveadm("auth", "test", "postmaster@example-1.org", PASSWORD)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "auth succeeded" in p.stdout
    p = store.doveadm("auth", "test", "PostMaster@Example-1.ORG", PASSWORD)  # %Lu
    assert p.returncode == 0, p.stdout + p.stderr


def test_an_account_of_another_mailstore_is_unknown_here(nodes: Nodes, store: Dovecot) -> None:
    assert "postmaster@example-2.org" not in users(nodes)  # housed on store-2
    p = store.doveadm("user", "postmaster@example-2.org")
    assert p.returncode == 67, p.stdout + p.stderr  # unknown user, no password tried


def test_userdb_gives_home_uid_gid_and_quota(nodes: Nodes, store: Dovecot) -> None:
    p = store.doveadm("user", "postmaster@example-1.org")
    assert p.returncode == 0, p.stdout + p.stderr
    f = fields(p.stdout)
    assert f["uid"] == "5000" and f["gid"] == "5000"
    assert f["home"] == "/var/vmail/example-1.org/postmaster"
    assert f["quota_rule"] == "*:bytes=2147483648"


def test_a_login_disabled_account_is_refused_at_imap_login(nodes: Nodes, store: Dovecot) -> None:
    disabled = next(u for u, f in users(nodes).items() if "nologin=y" in f[6])
    # The passdb answers (mail is still delivered to it) but marks the login refused ...
    p = store.doveadm("auth", "test", disabled, PASSWORD)
    assert "nologin" in p.stdout, p.stdout + p.stderr
    # ... and a real IMAP login is refused by imap-login.
    imap = imaplib.IMAP4("127.0.0.1", store.port)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="Login disabled"):
            imap.login(disabled, PASSWORD)
    finally:
        imap.shutdown()


def test_a_changed_password_works_after_pull_without_restarting_dovecot(
    nodes: Nodes, store: Dovecot
) -> None:
    user = "postmaster@example-1.org"
    assert store.doveadm("auth", "test", user, PASSWORD).returncode == 0
    new = "a new password, set in the database"
    engine = create_engine(nodes.cluster.db_url)
    with engine.begin() as conn:
        conn.execute(
            update(t.account)
            .where(t.account.c.local_part == "postmaster", t.account.c.domain_id == 1)
            .values(password_hash=sha512_crypt(new, random.Random(1)))
        )
    engine.dispose()
    old_hash = users(nodes)[user][0]
    nodes.publish_and_pull()
    assert users(nodes)[user][0] != old_hash
    assert len(users(nodes)[user][0]) == len(old_hash)  # same size: only the mtime tells
    # Dovecot stats the passwd-file at most once a second: allow it a few seconds.
    deadline = time.monotonic() + 5
    while (p := store.doveadm("auth", "test", user, new)).returncode != 0:
        assert time.monotonic() < deadline, p.stdout + p.stderr
        time.sleep(0.25)
    assert store.proc.poll() is None  # the same Dovecot, never restarted
    # Wrong passwords last: a failed login delays later logins by 2-4 s.
    assert store.doveadm("auth", "test", user, PASSWORD).returncode == 77


def test_a_wrong_password_fails(store: Dovecot) -> None:
    p = store.doveadm("auth", "test", "postmaster@example-1.org", "not the password")
    assert p.returncode == 77, p.stdout + p.stderr


def test_the_proxy_sends_each_user_to_its_mailstore(nodes: Nodes, proxy: Dovecot) -> None:
    p = proxy.doveadm("auth", "lookup", "postmaster@example-1.org")
    assert p.returncode == 0, p.stdout + p.stderr
    got = {
        k.strip(): v.strip() for k, _, v in (line.partition(":") for line in p.stdout.splitlines())
    }
    assert got["proxy"] == "y" and got["host"] == "10.0.1.11" and got["port"] == "143"
    # nopassword=y: any password is passed on, the mailstore checks it.
    p = proxy.doveadm("auth", "test", "postmaster@example-1.org", "whatever the user typed")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "proxy" in p.stdout and "host=10.0.1.11" in p.stdout and "port=143" in p.stdout
    p = proxy.doveadm("auth", "test", "postmaster@example-2.org", "x")
    assert p.returncode == 0 and "host=10.0.1.12" in p.stdout, p.stdout + p.stderr


def test_the_proxy_refuses_users_that_may_not_log_in(nodes: Nodes, proxy: Dovecot) -> None:
    text = entries(nodes.target("dovecot-proxy") / "dovecot_proxy", ":")
    assert not any("$6$" in v or "{" in v for v in text.values())  # no hash on a proxy
    refused = next(u for u, v in text.items() if v.endswith("nologin=y"))
    p = proxy.doveadm("auth", "test", refused, PASSWORD)
    assert p.returncode == 77, p.stdout + p.stderr


HOSTILE_HOST = "fe80::1%d host=10.9.9.9 destuser=victim@example-1.org pass=secret"


@pytest.mark.parametrize("column", ["imap_host", "lmtp_host"])
def test_a_host_with_injected_fields_never_reaches_the_proxy(
    nodes: Nodes, proxy: Dovecot, column: str
) -> None:
    # An IPv6 "scope id" may hold any text for Python's ipaddress; in a proxy line each
    # space-separated word after it would be a field Dovecot obeys.
    engine = create_engine(nodes.cluster.db_url)
    with engine.begin() as conn:
        conn.execute(
            update(t.mailstore).where(t.mailstore.c.id == 1).values({column: HOSTILE_HOST})
        )
    try:
        p = nodes.cluster.cli("publish")
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"mailstore id=1 'store-1': {column}: host {HOSTILE_HOST!r}" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
        nodes.cluster.pull()
        look = proxy.doveadm("auth", "lookup", "postmaster@example-1.org")
        assert look.returncode == 0, look.stdout + look.stderr
        got = {
            k.strip(): v.strip()
            for k, _, v in (line.partition(":") for line in look.stdout.splitlines())
        }
        assert got["host"] == "10.0.1.11" and "destuser" not in got and "pass" not in got
    finally:
        with engine.begin() as conn:
            conn.execute(
                update(t.mailstore).where(t.mailstore.c.id == 1).values({column: "10.0.1.11"})
            )
        engine.dispose()


def test_skip_invalid_a_bad_quota_keeps_the_user_a_bad_home_makes_it_unknown(
    nodes: Nodes, store: Dovecot
) -> None:
    """``publish --skip-invalid`` as the real userdb sees it (LMTP looks the recipient up the
    same way at RCPT): a bad quota leaves the user known, logging in, without the quota rule;
    a bad home leaves it unknown on the mailstore, as it is on the MX (refused at RCPT)."""
    quota_id, quota_user = account_on(nodes.cluster, "store-1")
    home_id, home_user = account_on(nodes.cluster, "store-1", skip=1)
    before = {u: fields(store.doveadm("user", u).stdout) for u in (quota_user, home_user)}
    assert before[quota_user]["quota_rule"].startswith("*:bytes=")
    assert store.doveadm("auth", "test", quota_user, PASSWORD).returncode == 0
    set_row(nodes.cluster, t.account, quota_id, quota_bytes=-1)
    set_row(nodes.cluster, t.account, home_id, home="var/vmail/relative")
    try:
        nodes.cluster.publish("--skip-invalid")
        nodes.cluster.pull()
        deadline = time.monotonic() + 5  # Dovecot stats the passwd-file at most once a second
        while (gone := store.doveadm("user", home_user)).returncode != 67:
            assert time.monotonic() < deadline, gone.stdout + gone.stderr
            time.sleep(0.25)
        kept = store.doveadm("user", quota_user)
        assert kept.returncode == 0, kept.stdout + kept.stderr
        f = fields(kept.stdout)
        assert f["home"] == before[quota_user]["home"]
        assert f.get("quota_rule") != before[quota_user]["quota_rule"]
        assert store.doveadm("auth", "test", quota_user, PASSWORD).returncode == 0
    finally:
        quota = int(before[quota_user]["quota_rule"].removeprefix("*:bytes="))
        set_row(nodes.cluster, t.account, quota_id, quota_bytes=quota)
        set_row(nodes.cluster, t.account, home_id, home=before[home_user]["home"])
        nodes.publish_and_pull()


def _until(check: Callable[[], bool], what: str) -> None:
    """Dovecot stats a passwd-file at most once a second: allow it a few seconds."""
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


def test_a_denied_service_is_refused_with_the_right_password_on_the_mailstore_and_the_proxy(
    nodes: Nodes, store: Dovecot, proxy: Dovecot
) -> None:
    no_imap_id, no_imap = account_on(nodes.cluster, "store-1", skip=2)
    no_pop_id, no_pop = account_on(nodes.cluster, "store-1", skip=3)
    seeded = {  # seed: one account in 25 IMAP-only, one in 50 may not send
        target: entries(nodes.target(target) / "dovecot_deny", ":")
        for target in ("dovecot-store", "dovecot-proxy")
    }
    assert any(k.startswith("pop3/") for k in seeded["dovecot-store"])
    assert set(seeded["dovecot-store"]) < set(seeded["dovecot-proxy"])  # only store-1's
    set_row(nodes.cluster, t.account, no_imap_id, allow_imap=False)
    set_row(nodes.cluster, t.account, no_pop_id, allow_pop3=False, allow_submission=False)
    try:
        nodes.publish_and_pull()
        for target in ("dovecot-store", "dovecot-proxy"):
            deny = entries(nodes.target(target) / "dovecot_deny", ":")
            assert deny == {
                **seeded[target],
                f"imap/{no_imap}": "",
                f"pop3/{no_pop}": "",
                f"smtp/{no_pop}": "",
                f"submission/{no_pop}": "",
            }
            assert set(deny.values()) == {""}  # keys only: a deny list holds no hashes
        _until(
            lambda: store.auth("imap", no_imap, PASSWORD) == 77, "IMAP still allowed on the store"
        )
        assert store.auth("pop3", no_imap, PASSWORD) == 0  # the other services still work
        assert store.auth("smtp", no_imap, PASSWORD) == 0
        assert store.auth("imap", no_pop, PASSWORD) == 0
        for service in ("pop3", "smtp", "submission"):
            assert store.auth(service, no_pop, PASSWORD) == 77, service
        # A real IMAP login: refused for the one, accepted for the other.
        imap = imaplib.IMAP4("127.0.0.1", store.port)
        try:
            assert imap.login(no_pop, PASSWORD)[0] == "OK"
        finally:
            imap.logout()
        imap = imaplib.IMAP4("127.0.0.1", store.port)
        try:
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                imap.login(no_imap.upper(), PASSWORD)  # %Lu: any case
        finally:
            imap.shutdown()
        # The proxy refuses before proxying (nopassword=y: any password would pass on).
        _until(lambda: proxy.auth("imap", no_imap, PASSWORD) == 77, "IMAP still proxied")
        assert proxy.auth("pop3", no_imap, PASSWORD) == 0
        assert (
            proxy.auth("pop3", no_pop, PASSWORD) == 77 and proxy.auth("imap", no_pop, PASSWORD) == 0
        )
    finally:
        set_row(nodes.cluster, t.account, no_imap_id, allow_imap=True)
        set_row(nodes.cluster, t.account, no_pop_id, allow_pop3=True, allow_submission=True)
        nodes.publish_and_pull()
    assert entries(nodes.target("dovecot-store") / "dovecot_deny", ":") == seeded["dovecot-store"]
    _until(
        lambda: store.auth("imap", no_imap, PASSWORD) == 0, "IMAP still refused after allowing it"
    )


def test_doveadm_user_shows_the_customer_id(nodes: Nodes, store: Dovecot) -> None:
    """The dovecot-store role's channel sets customer_field = "customer_id": the account's
    customer.ext_id (its own customer, else its domain's) is a userdb field."""
    assert nodes.roles["dovecot-store"].customer_field == "customer_id"
    account_id, user = account_on(nodes.cluster, "store-1", skip=4)
    engine = create_engine(nodes.cluster.db_url)
    with engine.connect() as conn:
        ext = dict(conn.execute(select(t.customer.c.id, t.customer.c.ext_id)).all())
        own = conn.execute(
            select(t.account.c.customer_id).where(t.account.c.id == account_id)
        ).scalar_one()
    engine.dispose()
    assert fields(store.doveadm("user", user).stdout)["customer_id"] == ext[own]
    other = next(c for c in ext if c != own)
    set_row(nodes.cluster, t.account, account_id, customer_id=other)
    try:
        nodes.publish_and_pull()
        _until(
            lambda: fields(store.doveadm("user", user).stdout).get("customer_id") == ext[other],
            "doveadm user does not show the new customer",
        )
        f = fields(store.doveadm("user", user).stdout)
        assert f["home"].endswith("/" + user.split("@")[0]) and f["uid"] == "5000"
    finally:
        set_row(nodes.cluster, t.account, account_id, customer_id=own)
        nodes.publish_and_pull()

"""The ``submission`` role as an operator would run it: a real Postfix with the role's
``main.cf`` and the ``-o`` options of its ``master.cf`` submission service, an auth-only
Dovecot with the role's ``dovecot.conf`` serving Postfix's SASL socket, both reading what
the agent installed from the ``submission`` channel. Over STARTTLS, AUTH PLAIN succeeds for
an account that may send, fails for a wrong password and for an account with
``allow_submission`` off, and a MAIL FROM the login does not own is refused."""

from __future__ import annotations

import base64
import shutil
import smtplib
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mapsync.sources import schema as t
from tests.daemons.postfix_instance import CLIENT_HELO, PostfixInstance
from tests.daemons.roles import PASSWORD, Nodes, entries, make_nodes
from tests.helpers.dovecot import Dovecot
from tests.helpers.publisher import account_on, set_row

pytestmark = pytest.mark.daemons

ROLE = "submission"
SOCKET = "/var/spool/postfix/private/auth"  # in the role's dovecot.conf


@dataclass
class Relay:
    nodes: Nodes
    postfix: PostfixInstance
    dovecot: Dovecot

    def session(self) -> smtplib.SMTP:
        """A client on the submission port, after STARTTLS (AUTH is offered only then)."""
        s = smtplib.SMTP("127.0.0.1", self.postfix.port, local_hostname=CLIENT_HELO, timeout=10)
        s.ehlo()
        assert not s.has_extn("auth"), "AUTH offered before STARTTLS"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the test's own self-signed certificate
        s.starttls(context=context)
        s.ehlo()
        return s


def auth_plain(s: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return s.docmd("AUTH", f"PLAIN {token}")


def _options(master_cf: str) -> tuple[str, ...]:
    """The ``-o name=value`` lines of the role's submission service."""
    return tuple(
        line.split("-o", 1)[1].strip()
        for line in master_cf.splitlines()
        if line.strip().startswith("-o ")
    )


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    # Postfix's socket paths must be short and its daemons (and Dovecot's auth, user dovecot)
    # must reach the maps: one short directory, not pytest's 0700 tmp_path.
    root = Path(tempfile.mkdtemp(prefix="mapsync-sub-"))
    root.chmod(0o755)
    try:
        nodes = make_nodes(root / "c", (ROLE,), accounts=80, domains=6, aliases=10)
        role = nodes.roles[ROLE]
        target = nodes.target(ROLE)
        tls = root / "tls"
        tls.mkdir()
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=submission.test.invalid",
             "-keyout", str(tls / "key.pem"), "-out", str(tls / "cert.pem")],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        main_cf = (
            role.snippet("main.cf", target)
            .replace("/etc/ssl/certs/submission.pem", str(tls / "cert.pem"))
            .replace("/etc/ssl/private/submission.key", str(tls / "key.pem"))
        )
        postfix = PostfixInstance(root / "pf", main_cf, options=_options(role.file("master.cf")))
        try:
            postfix.start()  # creates the queue's private/ directory the socket goes into
            conf = role.snippet("dovecot.conf", target)
            assert SOCKET in conf
            dovecot = Dovecot(
                root / "dv", "sub", conf.replace(SOCKET, str(postfix.queue / "private" / "auth"))
            )
            try:
                yield Relay(nodes, postfix, dovecot)
            finally:
                dovecot.stop()
        finally:
            postfix.stop()
    finally:
        shutil.rmtree(root)


def test_the_relay_gets_every_sender_login_but_no_home_or_quota(relay: Relay) -> None:
    logins = entries(relay.nodes.target(ROLE) / "dovecot_submission", ":")
    assert {"postmaster@example-1.org", "postmaster@example-2.org"} <= set(logins)  # both stores
    assert all(v.startswith("{SHA512-CRYPT}$6$") and v.endswith("::::::") for v in logins.values())
    assert not any("/var/vmail" in v or "quota" in v for v in logins.values())


def test_an_allowed_account_authenticates_and_sends_only_as_itself(relay: Relay) -> None:
    user = "postmaster@example-1.org"
    with relay.session() as s:
        code, text = auth_plain(s, user, PASSWORD)
        assert code == 235, (code, text, relay.postfix.tail())
        code, text = s.mail(user)
        assert code == 250, (code, text)
        code, text = s.rcpt("someone@elsewhere.test.invalid")  # relayed: the login may send
        assert code == 250, (code, text)
        s.rset()
        code, text = s.mail("postmaster@example-2.org")  # another account's address
        if code == 250:  # reject_sender_login_mismatch acts at RCPT unless smtpd_delay_reject=no
            code, text = s.rcpt("someone@elsewhere.test.invalid")
        assert code == 553, (code, text)
        assert b"not owned by user postmaster@example-1.org" in text


def test_a_login_sends_as_a_tag_of_its_own_address_but_not_of_anothers(relay: Relay) -> None:
    """``user+tag@domain`` belongs to the owner of ``user@domain`` (the role's
    ``recipient_delimiter = +``, as on the MX): without it every +tag sender was refused
    ("not owned by user")."""
    user = "postmaster@example-1.org"
    with relay.session() as s:
        assert auth_plain(s, user, PASSWORD)[0] == 235
        replies = {}
        for sender in ("postmaster+news@example-1.org", "postmaster+news@example-2.org"):
            code, _ = s.mail(sender)
            if code == 250:
                code, _ = s.rcpt("someone@elsewhere.test.invalid")
            replies[sender] = code
            s.rset()
    assert replies == {
        "postmaster+news@example-1.org": 250,
        "postmaster+news@example-2.org": 553,
    }, (replies, relay.postfix.tail())


def test_a_wrong_password_is_refused(relay: Relay) -> None:
    with relay.session() as s:
        code, text = auth_plain(s, "postmaster@example-3.org", "not the password")
        assert code == 535, (code, text)


def test_an_account_with_allow_submission_off_is_refused_with_the_right_password(
    relay: Relay,
) -> None:
    cluster = relay.nodes.cluster
    account_id, user = account_on(cluster, "store-2", skip=1)
    with relay.session() as s:
        assert auth_plain(s, user, PASSWORD)[0] == 235
    set_row(cluster, t.account, account_id, allow_submission=False)
    try:
        relay.nodes.publish_and_pull()
        assert user not in entries(relay.nodes.target(ROLE) / "dovecot_submission", ":")
        deadline = time.monotonic() + 10  # Dovecot re-reads the file within a second or two
        while True:
            with relay.session() as s:
                code, text = auth_plain(s, user, PASSWORD)
            if code == 535:
                break
            assert code == 235 and time.monotonic() < deadline, (code, text)
            time.sleep(0.5)
    finally:
        set_row(cluster, t.account, account_id, allow_submission=True)
        relay.nodes.publish_and_pull()

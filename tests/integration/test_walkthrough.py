"""docs/walkthrough.md, run as written: a publisher on the running PostgreSQL as a read-only
user, a real rsync daemon with one authenticated module per channel, and the Postfix MX,
Dovecot proxy and mailstore nodes made from agents/; then a change, monitoring as an
unprivileged user and a rollback. Each step's block runs unchanged with only the page's
variables set (and PATH); what the mail daemons see is checked along the way: ``postmap -q``
(the page's own output blocks), ``mapsync status`` exit codes, ``doveadm`` and an IMAP login
through the proxy on two Dovecots started with the roles' shipped ``dovecot.conf`` on the
installed maps, and RCPT TO on a Postfix started with ``agents/postfix-mx/main.cf``."""

from __future__ import annotations

import imaplib
import json
import os
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import make_url

from tests.conftest import PG_URL
from tests.daemons.postfix_instance import PostfixInstance
from tests.daemons.roles import role
from tests.helpers.dbusers import DATABASE_MD, DatabaseUsers
from tests.helpers.dovecot import Dovecot
from tests.helpers.howto import statements
from tests.helpers.migrating import doc_blocks
from tests.helpers.rsyncd import documented_rsyncd_conf, documented_secrets, modules
from tests.helpers.transport import free_port
from tests.helpers.users import CHECKOUT, USER, shared_dir, uid
from tests.helpers.walkthrough import Step, mapsync_wrapper, outputs, run, steps, variables

MONITOR = "daemon"  # another unprivileged user than the publisher's (nobody)
PAGE_NAMES = {"DB_NAME": "mapsync", "DB_OWNER": "mapsync_owner", "DB_READER": "mapsync_reader"}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runuser and root-owned agents")


def _heredocs(step: Step) -> list[str]:
    return re.findall(r"<<'?SQL'?\n(.*?)^SQL$", step.script, re.S | re.M)


def test_the_walkthrough_grants_exactly_what_docs_database_md_grants() -> None:
    """The page's SQL is docs/database.md's, with its names as variables."""
    (database,) = [s for s in steps() if s.name == "database"]
    users_sql, grants_sql = _heredocs(database)
    documented = doc_blocks(DATABASE_MD, "-- sql: ")
    for ours, theirs in ((users_sql, "postgresql-users"), (grants_sql, "postgresql-grants")):
        for variable, name in PAGE_NAMES.items():
            ours = ours.replace(f"${variable}", name)
        assert statements(ours) == statements(documented[theirs])


def test_the_walkthrough_serves_the_modules_docs_security_md_documents() -> None:
    """Its rsyncd.conf is docs/security.md's, less the channels this cluster lacks, with the
    host's paths under ``$ROOT/publisher`` (and a pid and log file of its own)."""
    (step,) = [s for s in steps() if s.name == "rsync-daemon"]
    conf, secrets = (
        body.replace("$ROOT/publisher", "")
        for body in re.findall(r"<<EOF\n(.*?)^EOF$", step.script, re.S | re.M)
    )
    ours, documented = modules(conf), modules(documented_rsyncd_conf())
    glob, documented_glob = ours.pop(""), documented.pop("")
    assert documented_glob.items() <= glob.items()
    assert glob.items() - documented_glob.items() == {
        ("pid file", "/run/rsyncd.pid"),
        ("log file", "/run/rsyncd.log"),
    }
    assert set(ours) == {"mx", "imap", "store-1"}
    assert ours == {name: documented[name] for name in ours}
    pairs = dict(line.split(":", 1) for line in secrets.splitlines())
    assert pairs == {user: documented_secrets()[user] for user in pairs}
    assert {m["auth users"] for m in ours.values()} == set(pairs)


def _wait_for_port(port: int, log: Path) -> None:
    """The daemon forks before it listens; systemd would have started it long before."""
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.05)


def _check_dovecot(root: Path, work: Path, imap_port: int, password: str) -> None:
    """Dovecot on the mailstore's and the proxy's installed maps, with the roles' own
    dovecot.conf: the mailstore authenticates anna, the proxy sends her to store-1, and an
    IMAP login at the proxy reaches the mailstore, which checks the password."""
    store_role, proxy_role = role("dovecot-store"), role("dovecot-proxy")
    mail = work / "mail"  # the mails themselves are not mapsync's: any place uid 5000 may write
    mail.mkdir(parents=True)
    mail.chmod(0o1777)
    store = Dovecot(
        work / "store",
        "walk-store",
        store_role.snippet("dovecot.conf", root / "store-1" / store_role.target.relative_to("/"))
        + f"mail_location = maildir:{mail}/%u\n",
        port=imap_port,
    )
    try:
        assert store.login("anna@example.org", password)
        assert not store.login("anna@example.org", password + "x")
        fields = store.user("anna@example.org")
        assert fields is not None and fields["home"] == "/var/vmail/example.org/anna", fields
        assert store.user("sales@example.org") is None  # an alias has no mailbox
        proxy = Dovecot(
            work / "proxy",
            "walk-proxy",
            proxy_role.snippet("dovecot.conf", root / "imap" / proxy_role.target.relative_to("/")),
        )
        try:
            p = proxy.doveadm("auth", "test", "anna@example.org", "anything")
            assert p.returncode == 0, p.stdout + p.stderr
            fields = {line.strip() for line in p.stdout.splitlines()}
            assert {"proxy", "host=127.0.0.1", f"port={imap_port}"} <= fields, p.stdout
            assert proxy.doveadm("auth", "test", "nobody@example.org", "x").returncode != 0
            imap = imaplib.IMAP4("127.0.0.1", proxy.port)
            try:
                with pytest.raises(imaplib.IMAP4.error):
                    imap.login("anna@example.org", password + "x")  # the mailstore says no
                assert imap.login("anna@example.org", password)[0] == "OK"
                assert imap.select("INBOX")[0] == "OK"
            finally:
                imap.logout()
        finally:
            proxy.stop()
    finally:
        store.stop()


def _check_smtp(root: Path, work: Path) -> None:
    """A running Postfix with agents/postfix-mx/main.cf on the MX's installed maps answers
    RCPT TO as the page says postmap's answers mean."""
    mx = role("postfix-mx")
    postfix = PostfixInstance(work, mx.snippet("main.cf", root / "mx" / mx.target.relative_to("/")))
    try:
        postfix.start()
        replies = postfix.rcpt(
            "anna@example.org", "postmaster@example.org", "sales@example.org",
            "nosuch@example.org", "someone@example.net",
        )  # fmt: skip
    finally:
        postfix.stop()
    for accepted in ("anna@example.org", "postmaster@example.org", "sales@example.org"):
        assert replies[accepted][0] == 250, replies
    assert replies["nosuch@example.org"][0] == 550, replies
    assert "User unknown in relay recipient table" in replies["nosuch@example.org"][1]
    assert replies["someone@example.net"] == (
        554,
        "5.7.1 <someone@example.net>: Relay access denied",
    )


@needs_root
@pytest.mark.postgresql
@pytest.mark.daemons
@pytest.mark.slow  # about 20 s: a dozen mapsync runs, psql, rsync, two Dovecots
def test_the_walkthrough_runs_as_written() -> None:
    page = steps()
    expected_output = outputs()
    names = [s.name for s in page]
    assert set(expected_output) <= set(names), "an output block for a step that does not exist"
    assert names[-1] == "cleanup"
    (first_rows,) = [s for s in page if s.name == "first-rows"]
    password = re.search(r"doveadm pw -s SHA512-CRYPT -p '([^']+)'", first_rows.script)
    assert password, "the first-rows step makes anna's hash with doveadm pw"

    tag = uuid.uuid4().hex[:10]
    admin = make_url(PG_URL.format(db="postgres"))
    db = DatabaseUsers(
        "postgresql", f"mapsync_w_{tag}", f"msw_o_{tag}", f"msw_r_{tag}", password="unused"
    )
    with shared_dir() as d:
        root = d / "walk"
        values = {
            "ROOT": str(root),
            "AGENTS": str(CHECKOUT / "agents"),
            "DB_HOST": str(admin.host),
            "DB_PORT": str(admin.port or 5432),
            "DB_ADMIN": str(admin.username),
            "DB_NAME": db.database,
            "DB_OWNER": db.owner,
            "DB_READER": db.reader,
            "RSYNC_PORT": str(free_port()),
            "STORE_IMAP_PORT": str(free_port()),
            "PUBLISHER_USER": USER,
            "MONITOR_USER": MONITOR,
        }
        assert set(values) == set(variables()), "the page's variables changed: update the test"
        mapsync_wrapper(d / "bin")
        env = {**values, "PATH": f"{d / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"}
        pid_file = root / "publisher" / "run" / "rsyncd.pid"
        out: dict[str, str] = {}
        try:
            for step in page[:-1]:
                p = run(step, env)
                out[step.name] = p.stdout
                assert p.returncode == step.exits, (
                    f"step {step.name} exited {p.returncode}, the page says {step.exits}:\n"
                    f"{p.stdout}{p.stderr}"
                )
                if step.name in expected_output:
                    assert p.stdout.endswith(expected_output[step.name]), (step.name, p.stdout)
                if step.name == "database":  # the publisher's user may only read
                    refused = db.refused(
                        db.reader_url, "DELETE FROM customer WHERE ext_id = 'nothing'"
                    )
                    assert refused and "permission denied" in refused, refused
                if step.name == "publisher":
                    repo = root / "publisher" / "srv" / "mapsync"
                    assert repo.stat().st_uid == uid(USER)  # as docs/install.md says
                    for channel in ("mx", "imap", "store-1"):
                        latest = json.loads((repo / channel / "LATEST").read_text())
                        assert latest["serial"] == 1, (channel, latest)
                if step.name == "rsync-daemon":
                    _wait_for_port(int(values["RSYNC_PORT"]), pid_file.with_name("rsyncd.log"))
                if step.name == "mailstore":
                    _check_dovecot(
                        root, d / "dovecot", int(values["STORE_IMAP_PORT"]), password.group(1)
                    )
            mx_live = root / "mx" / "etc" / "postfix" / "mapsync"
            assert not list(mx_live.glob("dovecot_users*")), "an MX received password hashes"
            assert out["monitoring"].count("MAPSYNC OK") == 3, out["monitoring"]
            assert "MAPSYNC PUBLISHER OK" in out["monitoring"], out["monitoring"]
            assert "pinned to serial 1 by rollback" in out["pinned"], out["pinned"]
            _check_smtp(root, d / "pf")  # the state the last step left: sales is back
            p = run(page[-1], env)
            assert p.returncode == 0, p.stdout + p.stderr
            assert not root.exists()
        finally:  # whatever the cleanup step managed
            if pid_file.exists():
                subprocess.run(["kill", pid_file.read_text().strip()], check=False)
            db.drop()

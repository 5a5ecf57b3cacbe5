"""A throwaway Dovecot for the tests: ``dovecot -F`` with its own base_dir on a loopback port,
configured by a snippet (a role's ``dovecot.conf``, or a passwd-file passdb and userdb), and
``doveadm`` talking to it."""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path

from tests.helpers.transport import free_port

_CLIENTS = itertools.count(1)  # client addresses for Dovecot.auth


class Dovecot:
    """``dovecot -F -c CONF`` with its own base_dir, listening on 127.0.0.1 only; ``snippet``
    is the rest of its configuration; ``port``: its IMAP port (default: a free one). With
    ``lmtp``, a mailstore: LMTP on ``lmtp_port`` too."""

    def __init__(
        self, work: Path, name: str, snippet: str, lmtp: bool = False, port: int | None = None
    ) -> None:
        work.mkdir(parents=True)
        self.conf = work / "dovecot.conf"
        self.log = work / "dovecot.log"
        self.port = port or free_port()
        self.lmtp_port = free_port() if lmtp else None
        lmtp_service = (
            f"service lmtp {{\n  inet_listener lmtp {{\n    port = {self.lmtp_port}\n  }}\n}}\n"
            if lmtp
            else ""
        )
        self.conf.write_text(
            f"base_dir = {work / 'run'}\n"
            f"instance_name = mapsync-test-{name}-{self.port}\n"
            "listen = 127.0.0.1\n"
            f"protocols = imap{' lmtp' if lmtp else ''}\n"
            "ssl = no\n"
            # A refused login answers at once (default: after 2 s), so tests of refusals
            # stay fast; nothing else changes.
            "auth_failure_delay = 0\n"
            f"log_path = {self.log}\n"
            # Failed logins answered at once, and no auth penalty (anvil's delay of the next
            # logins, 2 s doubling to 15 s): they only slow the tests down; what Dovecot
            # accepts and refuses is the same.
            "auth_failure_delay = 0\n"
            "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
            f"service imap-login {{\n  inet_listener imap {{\n    port = {self.port}\n  }}\n}}\n"
            + lmtp_service
            + snippet
        )
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.conf)])
        deadline = time.monotonic() + 20  # generous: the machine may be busy
        while not (work / "run" / "auth-client").exists():
            assert self.proc.poll() is None, self.log.read_text() if self.log.exists() else ""
            assert time.monotonic() < deadline, "dovecot did not start"
            time.sleep(0.05)

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``doveadm -c CONF ARGS``, output captured."""
        return subprocess.run(
            ["doveadm", "-c", str(self.conf), *args], capture_output=True, text=True, timeout=60
        )

    def user(self, name: str) -> dict[str, str] | None:
        """``doveadm user``: the userdb fields, or None for an unknown user."""
        p = self.doveadm("user", name)
        if p.returncode == 67:
            return None
        assert p.returncode == 0, p.stdout + p.stderr
        return dict(line.split("\t", 1) for line in p.stdout.splitlines()[1:] if "\t" in line)

    def auth(self, service: str, name: str, password: str) -> int:
        """``doveadm auth test`` as service ``service`` (imap, pop3, smtp, submission) asks:
        0 allowed, 77 refused. Each from another client address: Dovecot delays the next
        login from an address that just failed (4 s here), which would only slow a test."""
        rip = f"rip=192.0.2.{next(_CLIENTS) % 250 + 1}"
        return self.doveadm(
            "auth", "test", "-x", f"service={service}", "-x", rip, name, password
        ).returncode

    def login(self, name: str, password: str) -> bool:
        """``doveadm auth test``: whether the password is accepted and the login allowed."""
        p = self.doveadm("auth", "test", name, password)
        return p.returncode == 0 and "nologin" not in p.stdout

    def stop(self) -> None:
        """Stop Dovecot and wait for it."""
        self.proc.terminate()
        self.proc.wait(timeout=10)


def passwd_file_dovecot(work: Path, users: Path) -> Dovecot:
    """A Dovecot whose passdb and userdb are one passwd-file, ``users`` (the
    ``agents/dovecot-store`` way)."""
    args = f"args = username_format=%Lu {users}"
    return Dovecot(
        work,
        "pfa",
        "auth_username_format = %Lu\n"
        f"passdb {{\n  driver = passwd-file\n  {args}\n}}\n"
        f"userdb {{\n  driver = passwd-file\n  {args}\n}}\n",
    )

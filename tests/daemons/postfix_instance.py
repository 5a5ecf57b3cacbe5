"""A throwaway, running Postfix for the daemon tests, isolated from the system's instance.

Everything lives under one short directory (Postfix's UNIX sockets must fit in ``sun_path``)::

    ROOT/etc/main.cf      Postfix defaults + the role's snippet + the settings below
    ROOT/etc/master.cf    smtpd on 127.0.0.1:PORT only, every daemon unchrooted, then the
                          role's own services (agents/postfix-mx/master.cf)
    ROOT/queue/           queue_directory (``postfix check`` creates its subdirectories)
    ROOT/data/            data_directory, owned by user postfix
    ROOT/maillog          maillog_file (Postfix >= 3.4): there is no syslog in the test

Started with ``postfix -c ROOT/etc start`` and stopped with ``postfix -c ROOT/etc stop``; the
``postfix`` command prints its errors only to a terminal, so failures quote the maillog.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.helpers.transport import free_port

# (code, text) of one SMTP reply, as smtplib gives it, the text decoded.
Reply = tuple[int, str]

CLIENT_HELO = "client.test.invalid"
SENDER = "probe@client.test.invalid"

# Postfix defaults, then only what isolates the instance and makes it an MX for the snippet's
# relay_domains. Parameter name → value, set with ``postconf -c DIR -e``.
SETTINGS: dict[str, str] = {
    "compatibility_level": "3.6",  # today's defaults, no "backwards-compatible" log noise
    "myhostname": "mx.test.invalid",  # never guessed from the host's name or DNS
    "inet_interfaces": "127.0.0.1",
    "inet_protocols": "ipv4",
    # No local delivery at all: every accepted domain comes from the snippet's maps.
    "mydestination": "",
    "local_recipient_maps": "",
    "alias_maps": "",  # the default includes nis:mail.aliases (a warning per smtpd)
    "alias_database": "",
    # The test client connects from 127.0.0.1, which permit_mynetworks would let relay
    # anywhere: treat it as a client from the Internet. Relay domains pass
    # reject_unauth_destination; unknown recipients in them are refused by
    # smtpd_reject_unlisted_recipient (relay_recipient_maps).
    "smtpd_client_restrictions": "",
    "smtpd_relay_restrictions": "reject_unauth_destination",
    "smtpd_recipient_restrictions": "",
    "smtpd_reject_unlisted_recipient": "yes",
    # Nothing may wait for DNS.
    "smtpd_peername_lookup": "no",
    "smtp_dns_support_level": "disabled",
}

_MASTER_CF = """\
# service  type  private unpriv  chroot  wakeup  maxproc command
{listen}   inet  n       -       n       -       -       smtpd{options}
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
lmtp       unix  -       -       n       -       -       lmtp
"""


class PostfixFailed(AssertionError):
    """Postfix could not be configured, started or stopped; the message quotes the maillog."""


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for init to reap it is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (the master leads its own group)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            pids.append(int(entry))
    return pids


class PostfixInstance:
    """One Postfix under ``root`` whose main.cf is the defaults plus ``snippet``, and whose
    master.cf is the services Postfix needs plus ``services``."""

    def __init__(
        self, root: Path, snippet: str, services: str = "", options: tuple[str, ...] = ()
    ) -> None:
        """``services``: more master.cf lines; ``options``: ``name=value`` overrides of the
        smtpd service (master.cf ``-o``)."""
        self.root = root
        self.options = options
        self.conf = root / "etc"
        self.queue = root / "queue"
        self.data = root / "data"
        self.maillog = root / "maillog"
        self.port = free_port()
        self.started_at: float | None = None  # time.monotonic() just before ``postfix start``
        self._configure(snippet, services)

    # -- setup and teardown ---------------------------------------------------------------

    def _configure(self, snippet: str, services: str) -> None:
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True)
        os.chown(self.data, pwd.getpwnam("postfix").pw_uid, -1)
        (self.conf / "main.cf").write_text(snippet)
        (self.conf / "master.cf").write_text(
            _MASTER_CF.format(
                listen=f"127.0.0.1:{self.port}",
                options="".join(f"\n  -o {o}" for o in self.options),
            )
            + services
        )
        settings = {
            **SETTINGS,
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
        }
        p = self._run(
            "postconf", "-c", str(self.conf), "-e", *(f"{k}={v}" for k, v in settings.items())
        )
        if p.returncode != 0 or p.stderr:
            raise PostfixFailed(f"postconf -e failed ({p.returncode}): {p.stderr}")

    def start(self) -> None:
        """``postfix check`` then ``postfix start``; raise PostfixFailed with the log tail."""
        for command in ("check", "start"):
            if command == "start":
                self.started_at = time.monotonic()
            p = self.postfix(command)
            if p.returncode != 0:
                raise PostfixFailed(
                    f"postfix -c {self.conf} {command} exited {p.returncode}\n"
                    f"{p.stdout}{p.stderr}\n--- maillog ---\n{self.tail()}"
                )
        # ``postfix start`` waits for the master's initialisation (master -w), so the port is
        # bound now; the greeting proves an smtpd answers on it.
        try:
            with self.smtp() as s:
                code, _ = s.noop()
        except (OSError, smtplib.SMTPException) as exc:
            raise PostfixFailed(
                f"no SMTP service on 127.0.0.1:{self.port}: {exc!r}\n--- maillog ---\n{self.tail()}"
            ) from None
        if code != 250:
            raise PostfixFailed(f"NOOP answered {code}\n--- maillog ---\n{self.tail()}")

    def stop(self) -> None:
        """``postfix stop``, then make sure the master and all its children are gone."""
        pid = self.master_pid()
        if pid is None:
            return  # never started
        self.postfix("stop")  # signals the master; waits up to 5 s, then kills its group
        if self._wait_gone(pid, 10):
            return
        os.killpg(pid, signal.SIGKILL)  # the master leads its own process group (setsid)
        if not self._wait_gone(pid, 5):
            raise PostfixFailed(f"Postfix master {pid} (group {_group(pid)}) survived SIGKILL")
        raise PostfixFailed(f"postfix stop left master {pid} running; killed\n{self.tail()}")

    @staticmethod
    def _wait_gone(pid: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while _running(pid) or _group(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # -- inspection ------------------------------------------------------------------------

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run("postfix", "-c", str(self.conf), *args)

    def postqueue(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``postqueue -c CONF ARGS`` (``-s DOMAIN``, ``-f``, ``-j``), output captured."""
        return self._run("postqueue", "-c", str(self.conf), *args)

    def messages(self) -> list[dict[str, Any]]:
        """The messages in this instance's queue, as ``postqueue -j`` describes them."""
        p = self.postqueue("-j")
        assert p.returncode == 0 and not p.stderr, p.stdout + p.stderr
        return [json.loads(line) for line in p.stdout.splitlines()]

    @staticmethod
    def _run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def log(self, since: int = 0) -> str:
        """The maillog from byte offset ``since`` (see :meth:`log_size`)."""
        try:
            with self.maillog.open("rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.maillog.stat().st_size
        except FileNotFoundError:
            return 0

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(maillog is empty)"

    def wait_for_log(self, pattern: str, since: int, seconds: float = 2.0) -> str:
        """The first line after ``since`` matching ``pattern``. Daemons log through postlogd
        (a datagram socket), so a line can reach the file a moment after the event."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + seconds
        while True:
            for line in self.log(since).splitlines():
                if regex.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no maillog line matches {pattern!r}:\n{self.log(since)}")
            time.sleep(0.05)

    # -- SMTP ------------------------------------------------------------------------------

    def smtp(self) -> smtplib.SMTP:
        """A new SMTP connection (explicit HELO name: no DNS lookup on the client side)."""
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname=CLIENT_HELO, timeout=10)

    def rcpt(self, *addresses: str) -> dict[str, Reply]:
        """Each address's reply to RCPT TO, in one transaction on a new connection."""
        with self.smtp() as s:
            code, text = s.ehlo()
            assert code == 250, (code, text)
            code, text = s.mail(SENDER)
            assert code == 250, (code, text)
            replies = {}
            for address in addresses:
                code, text = s.rcpt(address)
                replies[address] = (code, text.decode("utf-8", "replace"))
            s.rset()  # no DATA: nothing is queued
        return replies

    def send(self, recipient: str, subject: str) -> tuple[Reply, Reply]:
        """A one-recipient message: the replies to RCPT TO and to the end of DATA."""
        with self.smtp() as s:
            s.ehlo()
            s.mail(SENDER)
            code, text = s.rcpt(recipient)
            rcpt = (code, text.decode("utf-8", "replace"))
            if code != 250:
                return rcpt, (0, "no DATA")
            code, text = s.data(f"From: <{SENDER}>\r\nSubject: {subject}\r\n\r\nhello\r\n")
        return rcpt, (code, text.decode("utf-8", "replace"))

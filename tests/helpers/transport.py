"""Real servers for transport tests: a throwaway sshd (optionally on ::1, optionally with a
forced command such as rrsync in ``authorized_keys``) and an ssh command for it, rsync
daemons (read-only modules, or a node's writable push inbox) and a listener that accepts
connections and never answers."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def ssh_command(key: Path) -> list[str]:
    """An ssh command that authenticates with ``key`` and trusts any host key (a test sshd's
    host key is new every time)."""
    return [
        "ssh",
        "-i",
        str(key),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
    ]


def wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Return once ``proc`` accepts connections on ``host``:``port``; fail the test (with its
    ``log``) if it exits or is not there within 10 seconds."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError(f"{proc.args[0]} did not start: {log.read_text() if log.exists() else ''}")


@dataclass(frozen=True)
class Sshd:
    """A running sshd: ``host`` and ``port`` to reach it, ``key`` the client's private key,
    ``ssh`` an ssh command that uses that key and trusts any host key."""

    host: str
    port: int
    key: Path
    authorized_keys: Path

    @property
    def ssh(self) -> list[str]:
        return ssh_command(self.key)

    def url(self, path: str, user: str = "root") -> str:
        """``ssh://user@host:port/path``, the host in brackets when it is an IPv6 literal."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{user}@{host}:{self.port}{path}"

    def authorize(self, options: str = "") -> None:
        """Let the client key in, with these ``authorized_keys`` options before it (e.g.
        ``command="rrsync /inbox",restrict``)."""
        line = self.key.with_name(self.key.name + ".pub").read_text()
        self.authorized_keys.write_text(f"{options} {line}" if options else line)


@contextmanager
def sshd(where: Path, host: str = "127.0.0.1") -> Iterator[Sshd]:
    """An sshd on ``host`` (e.g. ``::1``) accepting one client key for root, no options."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    where.mkdir(parents=True)
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(where / name)], check=True
        )
    port = free_port(host)
    server = Sshd(host, port, where / "client", where / "authorized_keys")
    server.authorize()
    (where / "sshd_config").write_text(
        f"Port {port}\nListenAddress {host}\nHostKey {where / 'host'}\n"
        f"AuthorizedKeysFile {server.authorized_keys}\nPidFile {where / 'pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    with open(where / "log", "wb") as log:
        proc = subprocess.Popen(
            [sshd_bin, "-D", "-e", "-f", str(where / "sshd_config")], stderr=log
        )
        try:
            wait_for_port(host, port, proc, where / "log")
            yield server
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@contextmanager
def rsync_daemon(where: Path, modules: dict[str, Path], host: str = "127.0.0.1") -> Iterator[str]:
    """An ``rsync --daemon`` on ``host`` serving ``modules`` (name → path, read-only);
    yields its ``rsync://host:port`` URL prefix."""
    where.mkdir(parents=True)
    port = free_port(host)
    conf = where / "rsyncd.conf"
    conf.write_text(
        f"pid file = {where / 'pid'}\nuse chroot = no\nsocket options = TCP_NODELAY\n"
        + "".join(f"[{name}]\npath = {path}\nread only = yes\n" for name, path in modules.items())
    )
    argv = ["rsync", "--daemon", "--no-detach", f"--address={host}", f"--port={port}"]
    with open(where / "log", "wb") as log:
        proc = subprocess.Popen([*argv, f"--config={conf}"], stderr=log)
        try:
            wait_for_port(host, port, proc, where / "log")
            bracketed = f"[{host}]" if ":" in host else host
            yield f"rsync://{bracketed}:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


class SilentListener:
    """A loopback port that accepts every connection and never says a word (a source that
    hangs); ``connections`` counts them. Use as a context manager."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self._accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self._accepted.append(conn)

    @property
    def connections(self) -> int:
        return len(self._accepted)

    def __enter__(self) -> SilentListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._accepted:
            conn.close()
        self.sock.close()


class RsyncDaemon:
    """``rsync --daemon`` on 127.0.0.1 with one module ``module`` at ``path`` (read-only, or
    writable as a node's push inbox)."""

    def __init__(
        self,
        root: Path,
        path: Path,
        *,
        module: str = "mapsync",
        writable: bool = False,
        port: int | None = None,
    ) -> None:
        self.root = root
        self.module = module
        self.port = port or free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "rsyncd.conf"
        self.log = root / "rsyncd.log"
        # uid/gid root: pytest's tmp directories are 0700, so "nobody" could not use them.
        self.conf.write_text(
            f"pid file = {root / 'rsyncd.pid'}\n"
            f"log file = {self.log}\n"
            "use chroot = no\n"
            "socket options = TCP_NODELAY\n"
            "transfer logging = yes\n"  # each file sent: what a node fetched from where
            "uid = root\n"
            "gid = root\n"
            f"[{module}]\n"
            f"    path = {path}\n"
            f"    read only = {'no' if writable else 'yes'}\n"
            "    use chroot = no\n"
        )
        self.proc = subprocess.Popen(
            [
                "rsync",
                "--daemon",
                "--no-detach",
                f"--config={self.conf}",
                f"--port={self.port}",
                "--address=127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.log.read_text() if self.log.exists() else ""
                    pytest.fail(f"rsync daemon did not start: {log}")
                time.sleep(0.05)

    def url(self, channel: str = "mx") -> str:
        return f"rsync://127.0.0.1:{self.port}/{self.module}/{channel}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


_WIRE = re.compile(r"installed serial (\d+)(?: \(was \d+\))?, ([\d,]+) bytes on the wire")


def wire(out: str) -> int:
    m = _WIRE.search(out)
    assert m, out
    return int(m.group(2).replace(",", ""))


def spaced_ssh(key: Path, where: Path) -> tuple[list[str], Path]:
    """An ssh command with a copy of ``key`` and a known-hosts file in ``where``, a directory
    whose name has a space (as ``/etc/mapsync/ssh keys/``); returns it and the known-hosts file,
    which ssh fills on its first connection."""
    where.mkdir(parents=True, exist_ok=True)
    copy = where / "client key"
    shutil.copyfile(key, copy)
    os.chmod(copy, 0o600)
    known = where / "known hosts"
    # ssh itself splits a UserKnownHostsFile value at spaces unless it is quoted.
    ssh = ["ssh", "-i", str(copy), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new"]
    ssh += ["-o", f'UserKnownHostsFile="{known}"', "-o", "LogLevel=ERROR"]
    return ssh, known

"""The rsync daemon setup docs/security.md documents, read from the doc itself, and a real
``rsync --daemon`` on loopback to serve it: the tests run exactly what operators copy."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.transport import free_port

SECURITY_MD = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def _blocks() -> list[str]:
    return re.findall(r"^```\n(.*?)^```$", SECURITY_MD.read_text(), re.S | re.M)


def documented_rsyncd_conf() -> str:
    """The ``/etc/rsyncd.conf`` of docs/security.md, as written."""
    (conf,) = [b for b in _blocks() if b.startswith("uid = ")]
    return conf


def documented_secrets() -> dict[str, str]:
    """``/etc/rsyncd.secrets`` of docs/security.md: user → password."""
    (text,) = [b for b in _blocks() if re.match(r"^[a-z0-9-]+-agent:", b)]
    return dict(line.split(":", 1) for line in text.splitlines() if line)


def modules(conf: str) -> dict[str, dict[str, str]]:
    """An rsyncd.conf's modules: name → parameters (the global section is ``""``)."""
    out: dict[str, dict[str, str]] = {"": {}}
    current = out[""]
    for raw in conf.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.fullmatch(r"\[([^\]]+)\]", line):
            current = out.setdefault(m.group(1), {})
        else:
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    return out


@contextmanager
def serving(conf: str, root: Path) -> Iterator[int]:
    """Run ``rsync --daemon`` on loopback with ``conf`` (plus a pid and log file in ``root``)
    until the block ends; yields the port."""
    path = root / "rsyncd.conf"
    path.write_text(f"pid file = {root / 'rsyncd.pid'}\nlog file = {root / 'rsyncd.log'}\n{conf}")
    port = free_port()
    argv = ["rsync", "--daemon", "--no-detach", f"--config={path}", f"--port={port}"]
    proc = subprocess.Popen(
        [*argv, "--address=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                log = root / "rsyncd.log"
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"rsync daemon did not start: {log.read_text() if log.exists() else ''}"
                    ) from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)

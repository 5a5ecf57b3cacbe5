"""`mapsync demo`, as a new user runs it from the README."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _demo(d: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mapsync", "demo", "--dir", str(d)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_demo_builds_a_whole_cluster_and_a_rerun_publishes_nothing(tmp_path: Path) -> None:
    first = _demo(tmp_path / "demo")
    assert first.returncode == 0, first.stderr
    for node, channel in (("mx", "mx"), ("exim-mx", "exim"), ("scanner", "scanner"),
                          ("imap-proxy", "imap"), ("store-1", "store-1"), ("store-2", "store-2")):  # fmt: skip
        assert f"node {node:<10} pull {channel:<8} installed serial 1" in first.stdout
        assert f"   {node:<10} {channel:<8} OK serial 1" in first.stdout
    # the printed postmap command works, and found the seeded address
    assert "$ postmap -q postmaster@example-1.org cdb:" in first.stdout
    lines = first.stdout.splitlines()
    i = next(n for n, line in enumerate(lines) if "postmap -q postmaster@example-1.org" in line)
    assert lines[i + 1].strip() == "OK"
    store = (tmp_path / "demo/nodes/store-1/dovecot/dovecot_users").read_text()
    proxy = (tmp_path / "demo/nodes/imap-proxy/dovecot/dovecot_proxy").read_text()
    assert "{SHA512-CRYPT}$6$" in store and "$6$" not in proxy

    again = _demo(tmp_path / "demo")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("unchanged (serial 1)") == 6
    assert again.stdout.count("current serial 1") == 6

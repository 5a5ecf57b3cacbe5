"""`mapsync demo`, as a new user runs it from the README."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mapsync.cli.demo import NODES, node_config

ROOT = Path(__file__).resolve().parents[2]


def _demo(d: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mapsync", "demo", "--dir", str(d)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_demo_builds_a_whole_cluster_and_a_rerun_publishes_nothing(tmp_path: Path) -> None:
    first = _demo(tmp_path / "demo")
    assert first.returncode == 0, first.stderr
    for node, channel in (("mx", "mx"), ("exim-mx", "exim"), ("scanner", "scanner"),
                          ("imap-proxy", "imap"), ("store-1", "store-1"), ("store-2", "store-2"),
                          ("submission", "submission")):  # fmt: skip
        # one column for the channels, as wide as the widest name ("submission")
        assert f"node {node:<10} pull {channel:<10} installed serial 1" in first.stdout
        assert f"   {node:<10} {channel:<10} OK serial 1" in first.stdout
    # the printed postmap command works, and found the seeded address
    assert "$ postmap -q postmaster@example-1.org cdb:" in first.stdout
    lines = first.stdout.splitlines()
    i = next(n for n, line in enumerate(lines) if "postmap -q postmaster@example-1.org" in line)
    assert lines[i + 1].strip() == "OK"
    store = (tmp_path / "demo/nodes/store-1/dovecot/dovecot_users").read_text()
    proxy = (tmp_path / "demo/nodes/imap-proxy/dovecot/dovecot_proxy").read_text()
    assert "{SHA512-CRYPT}$6$" in store and "$6$" not in proxy
    assert "userdb_customer_id=C000001" in store  # example-1.org's customer
    assert "both refuse the services an account may not use, from dovecot_deny (" in first.stdout
    deny = (tmp_path / "demo/nodes/store-1/dovecot/dovecot_deny").read_text()
    assert "\npop3/" in deny and "$6$" not in deny
    relay = (tmp_path / "demo/nodes/submission/postfix/dovecot_submission").read_text()
    assert "postmaster@example-2.org:{SHA512-CRYPT}$6$" in relay  # every mailstore's senders
    assert "/var/vmail" not in relay and "quota" not in relay
    assert (tmp_path / "demo/nodes/submission/postfix/senders.cdb").exists()

    again = _demo(tmp_path / "demo")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("unchanged (serial 1)") == 7
    assert again.stdout.count("current serial 1") == 7

    # The demo's report is the whole output: no INFO log lines (`removed=None`) woven into it.
    for run in (first, again):
        assert run.stderr == "", run.stderr
        assert "removed=None" not in run.stdout and "[info" not in run.stdout

    # Each node's config is where the report (and `demo --help`, and the README) says.
    d = (tmp_path / "demo").resolve()
    printed = dict(
        line.strip().split(": ", 1)
        for line in first.stdout.split("== configs", 1)[1].splitlines()[1:]
        if line.startswith("   ") and ": " in line and not line.strip().startswith("(")
    )
    assert printed == {
        "publisher and node mx": str(d / "mapsync.toml"),
        **{f"node {n}": str(d / "nodes" / n / "mapsync.toml") for n in NODES if n != "mx"},
    }
    for node in NODES:
        p = subprocess.run(
            [sys.executable, "-m", "mapsync", "--config", str(node_config(d, node)), "status"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert p.returncode == 0, (node, p.stdout, p.stderr)
        assert p.stdout.startswith("MAPSYNC OK"), p.stdout
    assert (d / "nodes" / "mx" / "postfix" / "recipients.cdb").exists()


def test_demo_help_readme_and_the_demo_name_the_same_nodes_and_configs() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "mapsync", "demo", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    flat = " ".join(help_text.split())
    readme = " ".join((ROOT / "README.md").read_text().split("## What `mapsync demo` shows")[1]
                      .split("\n## ")[0].split())  # fmt: skip
    for node in NODES:
        assert node in flat, node
        assert f"`{node}`" in readme, node
    assert "one MX" not in flat and "an MX node in DIR" not in flat
    for text in (flat, readme.replace("`", "")):
        assert "DIR/mapsync.toml holds the publisher and" in text, text
        assert "DIR/nodes/<node>/mapsync.toml" in text, text


def test_the_demo_in_a_directory_whose_name_is_not_utf8_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/x\xff"))
    p = _demo(bad)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.splitlines() == [
        f"mapsync: demo --dir {tmp_path}/x\\xff: not valid UTF-8; the demo writes this path "
        "into its configs and hands it to rsync (choose a directory whose name is UTF-8)"
    ]
    assert not os.path.exists(bad)

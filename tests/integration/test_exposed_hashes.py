"""A node that does not list its ``maps`` learns what a channel carries only from the release:
when password hashes arrive from an rsync module anyone may read, the pull says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import Cluster
from tests.helpers.rsyncd import serving

WARNING = "channel carries password hashes but is pulled without authentication"


def test_hashes_from_an_open_rsync_module_are_warned_about_at_pull(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.write_config(
        extra_publisher='[publisher.channels.store]\nmaps = ["dovecot_users"]\n',
    )
    cluster.publish("--channel", "store")
    conf = f"uid = root\ngid = root\nuse chroot = no\n[store]\npath = {cluster.repo / 'store'}\nread only = yes\n"
    rsyncd = tmp_path / "rsyncd"
    rsyncd.mkdir()
    node = tmp_path / "node.toml"  # the node's own file: no publisher part to learn from
    with serving(conf, rsyncd) as port:
        node.write_text(
            f'[agent]\nstate = "{cluster.state}"\n'
            f'trusted_keys = ["{cluster.root / "keys" / "signing.pub"}"]\n'
            f'[agent.channels.store]\nsource = "rsync://127.0.0.1:{port}/store"\n'
            f'target = "{cluster.target}"\n'
        )
        p = subprocess.run(
            [sys.executable, "-m", "mapsync", "--config", str(node), "--log-format", "json", "pull"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    events = [json.loads(line) for line in p.stderr.splitlines() if line.startswith("{")]
    warned = [e for e in events if e["event"] == WARNING]
    assert len(warned) == 1, p.stderr  # once, from the pull: config load cannot know
    (w,) = warned
    assert (w["channel"], w["maps"]) == ("store", "dovecot_users")
    assert w["source"] == f"rsync://127.0.0.1:{port}/store"

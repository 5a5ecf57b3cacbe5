"""Config helpers: running a command with a setting below the config's minimum."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from mapsync.signing import keygen
from tests.conftest import Cluster

# `python -m mapsync`, with the minimum release lifetime lowered in that one process.
_SHORT_EXPIRES = (
    "import sys; from mapsync import config; config.MIN_EXPIRES = 1; "
    "from mapsync.cli.main import main; sys.exit(main())"
)


def publish_expiring(
    cluster: Cluster, expires: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """``mapsync publish`` signing releases that expire after ``expires`` (e.g. ``"8s"``), for
    tests that wait for a real expiry. A config refuses lifetimes under an hour, so this one
    run writes the short ``expires`` into the cluster's config, lowers the minimum in its own
    process only, and leaves the cluster's default config behind for every later command."""
    cluster.write_config(extra_publisher=f'expires = "{expires}"')
    argv = [sys.executable, "-c", _SHORT_EXPIRES, "--config", str(cluster.config_path)]
    try:
        proc = subprocess.run(
            [*argv, "publish", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        cluster.write_config()
    if proc.returncode != 0:
        raise AssertionError(
            f"mapsync publish exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


MX_MAPS = ("domains", "recipients", "virtual", "transport", "senders")


def mx_and_store(
    root: Path,
    url: str,
    publisher: str,
    mx_maps: Sequence[str] = MX_MAPS,
    store_maps: Sequence[str] = ("dovecot_users",),
) -> Cluster:
    """A publisher reading ``url`` (``publisher``: its schema's keys and sections, TOML),
    channels ``mx`` and ``store`` (every mailstore's accounts), and an agent pulling both
    into ``root/nodes``; a fresh key pair. The config is checked as TOML at once."""
    keygen(root / "keys" / "signing.key")
    cluster = Cluster(root, url)
    agent = "".join(
        f"""
[agent.channels.{name}]
source = "{root / "repo" / name}"
target = "{root / "nodes" / name}"
timeout = "30s"
"""
        for name in ("mx", "store")
    )
    cluster.config_path.write_text(
        f"""[publisher]
database = "{url}"
repository = "{root / "repo"}"
signing_key = "{root / "keys" / "signing.key"}"
{publisher}
[publisher.channels.mx]
maps = {json.dumps(list(mx_maps))}

[publisher.channels.store]
maps = {json.dumps(list(store_maps))}

[agent]
state = "{root / "nodes" / "state"}"
trusted_keys = ["{root / "keys" / "signing.pub"}"]
{agent}"""
    )
    tomllib.loads(cluster.config_path.read_text())  # a broken block fails here, not later
    return cluster

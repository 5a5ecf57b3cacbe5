"""Config helpers: running a command with a setting below the config's minimum."""

from __future__ import annotations

import subprocess
import sys

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

"""Pulling over ssh:// for real: a throwaway sshd on a loopback port, key authentication."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.helpers.transport import spaced_ssh
from tests.helpers.transport import sshd as ssh_server


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An sshd on 127.0.0.1 accepting one client key for root; yields (port, client key)."""
    with ssh_server(tmp_path / "sshd") as server:
        yield server.port, server.key


def use_ssh(cluster: Cluster, port: int, key: Path, ssh: list[str] | None = None) -> None:
    """Point the cluster's agent at its repository through the test sshd, with ``key`` (or
    the whole ``ssh`` command)."""
    if ssh is None:
        ssh = ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"]
        ssh += ["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    cluster.write_config(
        source=f"ssh://root@127.0.0.1:{port}{cluster.repo}/mx",
        extra_agent=f"ssh = {json.dumps(ssh)}",
    )


def test_an_agent_pulls_over_ssh_and_postfix_reads_the_result(
    cluster: Cluster, sshd: tuple[int, Path]
) -> None:
    port, key = sshd
    use_ssh(cluster, port, key)
    cluster.publish()
    out = cluster.pull().stdout
    assert "installed serial 1" in out
    lookup = subprocess.run(
        ["postmap", "-q", "postmaster@example-2.org", f"cdb:{cluster.target / 'recipients'}"],
        capture_output=True,
        text=True,
    )
    assert lookup.stdout.strip() == "OK"


def test_an_ssh_key_the_server_refuses_fails_cleanly_and_installs_nothing(
    cluster: Cluster, sshd: tuple[int, Path], tmp_path: Path
) -> None:
    port, _ = sshd
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    use_ssh(cluster, port, stranger)
    cluster.publish()
    proc = cluster.cli("pull")
    assert proc.returncode == 2
    assert "rsync failed" in proc.stderr and "Permission denied" in proc.stderr
    assert not cluster.target.exists() or not any(cluster.target.iterdir())


def test_ssh_arguments_with_a_space_reach_ssh_whole(
    cluster: Cluster, sshd: tuple[int, Path], tmp_path: Path
) -> None:
    """rsync splits its -e command itself, honouring quotes: a key path with a space must
    arrive as one argument, not as three that make ssh take a word of it for the host."""
    port, key = sshd
    ssh, known_hosts = spaced_ssh(key, tmp_path / "ssh keys")
    use_ssh(cluster, port, key, ssh)
    cluster.publish()
    p = cluster.cli("pull")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "installed serial 1" in p.stdout
    assert "ssh-ed25519" in known_hosts.read_text()  # the quoted option reached ssh whole


def test_an_rsync_killed_by_a_signal_is_reported_by_the_signal(cluster: Cluster) -> None:
    """The remote shell kills the rsync that started it (as the OOM killer would)."""
    cluster.publish()
    use_ssh(cluster, 22, Path("/nonexistent"), ["sh", "-c", "kill -KILL $PPID", "ssh"])
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "rsync failed (killed by signal 9 (SIGKILL))" in p.stderr
    assert "exit -9" not in p.stderr

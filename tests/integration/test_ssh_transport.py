"""Pulling over ssh:// for real: a throwaway sshd on a loopback port, key authentication."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An sshd on 127.0.0.1 accepting one client key for root; yields (port, client key)."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    d = tmp_path / "sshd"
    d.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host")], check=True
    )
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client")], check=True
    )
    shutil.copy(d / "client.pub", d / "authorized_keys")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    log = open(d / "log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        proc.wait()
        log.close()
        pytest.fail(f"sshd did not start: {(d / 'log').read_text()}")
    try:
        yield port, d / "client"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


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

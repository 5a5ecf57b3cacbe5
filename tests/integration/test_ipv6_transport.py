"""Sources and push destinations with an IPv6 literal (``ssh://u@[2001:db8::10]/path``,
``rsync://[::1]:873/module``) reach a real sshd and rsync daemon listening on ::1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.helpers.transport import Sshd, has_ipv6_loopback, rsync_daemon, sshd

pytestmark = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1)")

MX_MAPS = 'maps = ["domains", "recipients", "virtual", "transport"]\n'


@pytest.fixture
def sshd6(tmp_path: Path) -> Iterator[Sshd]:
    with sshd(tmp_path / "sshd", host="::1") as server:
        yield server


def test_an_agent_pulls_over_ssh_from_an_ipv6_literal(cluster: Cluster, sshd6: Sshd) -> None:
    source = sshd6.url(f"{cluster.repo}/mx")
    assert "[::1]" in source
    cluster.write_config(source=source, extra_agent=f"ssh = {json.dumps(sshd6.ssh)}")
    cluster.publish()
    p = cluster.cli("pull")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "installed serial 1" in p.stdout


def test_the_publisher_pushes_over_ssh_to_an_ipv6_literal(cluster: Cluster, sshd6: Sshd) -> None:
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.mkdir(parents=True, mode=0o700)
    cluster.write_config(source=str(inbox), extra_publisher=f"ssh = {json.dumps(sshd6.ssh)}")
    text = cluster.config_path.read_text()
    push = f"push = [{json.dumps(sshd6.url(str(inbox)))}]\n"
    cluster.config_path.write_text(text.replace(MX_MAPS, MX_MAPS + push, 1))
    p = cluster.cli("publish")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "pushed serial 1" in p.stdout
    assert json.loads((inbox / "LATEST").read_text())["serial"] == 1
    assert "installed serial 1" in cluster.pull().stdout


def test_an_agent_pulls_from_an_rsync_daemon_on_an_ipv6_literal(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.publish()
    with rsync_daemon(tmp_path / "rsyncd", {"mapsync": cluster.repo}, host="::1") as url:
        assert url.startswith("rsync://[::1]:")
        cluster.write_config(source=f"{url}/mapsync/mx")
        p = cluster.cli("pull")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "installed serial 1" in p.stdout


def test_a_malformed_ipv6_source_is_a_clear_error_not_a_traceback(cluster: Cluster) -> None:
    cluster.publish()
    cluster.write_config(source="ssh://root@[::1/srv/mapsync/mx")
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert "'ssh://root@[::1/srv/mapsync/mx': not a valid URL (Invalid IPv6 URL)" in p.stderr

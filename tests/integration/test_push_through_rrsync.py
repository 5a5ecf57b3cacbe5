"""The publisher pushes through the documented ssh setup on the node: a key whose
``authorized_keys`` line is ``command="rrsync INBOX",restrict`` (docs/security.md), a real
sshd, the real rrsync. Every release arrives, unchanged maps as hard links of the release
before (a delta, not a full copy), and the agent installs it from the inbox."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.helpers.agent import add_account, lookup
from tests.helpers.publisher import push_to
from tests.helpers.transport import Sshd, sshd

RRSYNC = "/usr/bin/rrsync"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Sshd]:
    if not Path(RRSYNC).is_file():
        pytest.fail(f"{RRSYNC} is missing (Debian ships it in the rsync package)")
    with sshd(tmp_path / "sshd") as server:
        yield server


def push_through(cluster: Cluster, server: Sshd, destination: str, inbox: Path) -> None:
    """The publisher pushes channel mx to ``destination`` with the sshd's key; the agent
    reads only ``inbox``."""
    push_to(cluster, destination, source=str(inbox), publisher=f"ssh = {json.dumps(server.ssh)}")


def test_pushes_through_the_documented_rrsync_line_arrive_as_deltas_and_install(
    cluster: Cluster, node: Sshd
) -> None:
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.mkdir(parents=True, mode=0o700)
    # Exactly the line docs/security.md gives for a push key, with this test's inbox.
    node.authorize(f'command="rrsync {inbox}",restrict')
    # rrsync makes the inbox the root: the destination's path is "/".
    push_through(cluster, node, node.url("/"), inbox)

    p = cluster.cli("publish")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "pushed serial 1" in p.stdout
    assert json.loads((inbox / "LATEST").read_text())["serial"] == 1
    assert "mx: installed serial 1" in cluster.pull().stdout

    new = add_account(cluster, "zz-rrsync")
    p = cluster.cli("publish")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "pushed serial 2" in p.stdout
    one, two = inbox / "releases" / "1", inbox / "releases" / "2"
    # A delta against serial 1: maps the new account does not touch are hard links of it.
    assert (two / "domains").stat().st_ino == (one / "domains").stat().st_ino
    assert (two / "recipients").stat().st_ino != (one / "recipients").stat().st_ino
    repo = cluster.repo / "mx" / "releases" / "2"
    for f in repo.iterdir():
        assert (two / f.name).read_bytes() == f.read_bytes(), f.name
    assert "mx: installed serial 2" in cluster.pull().stdout
    assert lookup(cluster, new) == "OK"

    # The third push keeps serial 2 as its basis and prunes serial 1.
    add_account(cluster, "zz-rrsync-2")
    p = cluster.cli("publish")
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(os.listdir(inbox / "releases")) == ["2", "3"]
    assert "mx: installed serial 3" in cluster.pull().stdout

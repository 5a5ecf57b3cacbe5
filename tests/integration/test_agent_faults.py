"""Faults the agent must report with the channel named, recorded for status, old set kept."""

from __future__ import annotations

import json
import shutil

import pytest

from mapsync import config
from mapsync.errors import ConfigError
from tests.conftest import Cluster


def test_a_latest_that_is_not_a_file_is_reported_for_the_channel_and_recorded(
    cluster: Cluster,
) -> None:
    cluster.publish()
    cluster.pull()
    latest = cluster.repo / "mx" / "LATEST"
    latest.unlink()
    latest.mkdir()  # a broken repository: a directory where a file belongs, never copied
    proc = cluster.cli("pull")
    assert proc.returncode == 5  # the source's fault, as an oversized LATEST (not the node's: 2)
    assert "LATEST: missing, not a regular file, or larger than 4096 bytes" in proc.stderr
    assert "channel mx" in proc.stderr and str(cluster.repo / "mx") in proc.stderr
    state = json.loads((cluster.state / "mx" / "state.json").read_text())
    assert state["last_error"] and "LATEST" in state["last_error"]
    status = cluster.cli("status")
    assert status.returncode == 1
    assert "last run failed" in status.stdout
    shutil.rmtree(latest)


def test_two_channels_may_not_share_a_target(cluster: Cluster) -> None:
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(
        text
        + f'\n[agent.channels.mx2]\nsource = "{cluster.repo}/mx"\ntarget = "{cluster.target}/sub"\n'
    )
    with pytest.raises(
        ConfigError, match=r"\[agent.channels.mx2\] target: .* overlaps the target of channel mx"
    ):
        config.load(cluster.config_path)


def test_a_damaged_local_rsync_basis_is_discarded_not_blamed_on_the_publisher(
    cluster: Cluster,
) -> None:
    """rsync trusts size and mtime of its basis; a basis damaged on the node (same size, same
    mtime) would be linked into every later fetch and fail verification forever."""
    import os

    from sqlalchemy import create_engine, insert

    from mapsync.sources import schema as t

    cluster.publish()
    cluster.pull()
    basis = cluster.state / "mx" / "basis" / "domains"
    st = basis.stat()
    data = bytearray(basis.read_bytes())
    data[-2] = ord("X") if data[-2] != ord("X") else ord("Y")  # same size, different bytes
    basis.write_bytes(bytes(data))
    os.utime(basis, ns=(st.st_atime_ns, st.st_mtime_ns))

    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:  # a change elsewhere: `domains` ships unchanged in serial 2
        conn.execute(insert(t.account).values(domain_id=2, local_part="fresh", status="active"))
    engine.dispose()
    cluster.publish()
    proc = cluster.pull()
    assert "installed serial 2" in proc.stdout
    assert "discarding the local rsync basis" in proc.stderr
    assert cluster.cli("verify").returncode == 0


def test_a_hostile_repository_cannot_fill_the_node_before_verification(cluster: Cluster) -> None:
    """Junk beside a release, or a map bigger than its manifest says, is refused from the
    listing: the agent never asks rsync for it."""
    cluster.publish()
    release = cluster.repo / "mx" / "releases" / "1"
    (release / "junk").write_bytes(b"\0" * (8 << 20))
    proc = cluster.cli("-v", "pull")
    assert proc.returncode == 5
    assert "unexpected file(s) not named by the manifest: junk" in proc.stderr
    argv_lines = [line for line in proc.stderr.splitlines() if "argv=" in line]
    assert argv_lines and not any("junk" in line for line in argv_lines)
    (release / "junk").unlink()

    with open(release / "recipients", "ab") as fh:
        fh.write(b"x" * (8 << 20))  # a map grown far past its manifest's size
    proc = cluster.cli("-v", "pull")
    assert proc.returncode == 5
    assert "recipients: size" in proc.stderr and "does not match the manifest" in proc.stderr
    assert not any(
        "releases/1/recipients" in line for line in proc.stderr.splitlines() if "argv=" in line
    )
    assert not cluster.target.exists() or not any(cluster.target.iterdir())

"""Paths a config names are checked when it is loaded: a directory with two owners, or one
that cannot exist, is an error naming the file and key (exit 2), before anything is fetched,
installed or pruned — not an ``[Errno 20]``/``[Errno 21]`` halfway through a pull."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import Cluster


def _one_line_error(cluster: Cluster, *args: str) -> str:
    p = cluster.cli(*args)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "Errno" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"mapsync: {cluster.config_path}: "), lines[0]
    return lines[0]


def test_an_inbox_that_is_the_source_is_refused_and_the_history_kept(cluster: Cluster) -> None:
    cluster.publish()
    releases = sorted(p.name for p in (cluster.repo / "mx" / "releases").iterdir())
    cluster.write_config(extra_agent=f'inbox = "{cluster.repo / "mx"}/"')
    for command in ("pull", "agent", "status"):
        line = _one_line_error(cluster, command)
        assert f"[agent.channels.mx] inbox: {cluster.repo / 'mx'} overlaps" in line, line
        assert "pruning the inbox" in line
    assert sorted(p.name for p in (cluster.repo / "mx" / "releases").iterdir()) == releases
    assert not cluster.target.exists()


def test_state_and_target_under_a_file_are_refused_naming_the_key(cluster: Cluster) -> None:
    blocker = cluster.root / "node"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "file").write_text("not a directory\n")
    cluster.publish()
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(text.replace(str(cluster.target), str(blocker / "file" / "pf")))
    line = _one_line_error(cluster, "pull")
    assert f"[agent.channels.mx] target: {blocker / 'file' / 'pf'} lies under" in line
    cluster.config_path.write_text(text.replace(str(cluster.state), str(blocker / "file" / "st")))
    line = _one_line_error(cluster, "status")
    assert f"[agent] state: {blocker / 'file' / 'st'} lies under {blocker / 'file'}" in line


def test_a_trusted_key_that_is_a_directory_is_refused(cluster: Cluster) -> None:
    cluster.publish()
    keys = cluster.root / "keys"
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(text.replace(f'"{keys / "signing.pub"}"', f'"{keys}"'))
    line = _one_line_error(cluster, "pull")
    assert f"[agent] trusted_keys: {keys} is a directory, not a file" in line
    assert not cluster.target.exists()


def test_a_zero_expiry_is_refused_before_anything_is_published(cluster: Cluster) -> None:
    cluster.write_config(extra_publisher='expires = "0s"')
    line = _one_line_error(cluster, "publish")
    assert "[publisher] expires: must be at least 1h, not '0s'" in line
    assert not (cluster.repo / "mx").exists()


def test_a_source_spelled_twice_is_one_source(cluster: Cluster) -> None:
    mx = cluster.repo / "mx"
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(
        text.replace(f'source = "{mx}"', f'source = ["{mx}", "{mx}/./", "{mx}/"]')
    )
    line = _one_line_error(cluster, "pull")
    assert f"[agent.channels.mx] source: a source is listed twice ({mx})" in line


def test_a_config_in_a_directory_whose_name_is_not_utf8_is_refused_in_one_line(
    cluster: Cluster,
) -> None:
    """rsync's argv, state.json and the logs are UTF-8: such a path used to end a pull in a
    traceback with exit 1, which monitoring reads as WARNING."""
    cluster.publish()
    d = os.fsdecode(bytes(cluster.root) + b"/node\xff")
    os.mkdir(d)
    cfg = os.path.join(d, "mapsync.toml")
    with open(cfg, "w") as f:
        f.write(
            f'[agent]\nstate = "state"\ntrusted_keys = ["{cluster.root}/keys/signing.pub"]\n'
            f'[agent.channels.mx]\nsource = "{cluster.repo}/mx"\ntarget = "postfix"\n'
        )
    for command in ("pull", "status", "verify"):
        p = subprocess.run(
            [sys.executable, "-m", "mapsync", "--config", cfg, command],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert p.returncode == 2, (command, p.stdout, p.stderr)
        shown = f"{cluster.root}/node\\xff"
        assert p.stderr.splitlines() == [
            f"mapsync: {shown}/mapsync.toml: [agent.channels.mx] target: {shown}/postfix is not "
            "valid UTF-8; "
            "mapsync needs paths it can pass to rsync and record (rename the directory)"
        ], p.stderr
    assert not os.path.exists(os.path.join(d, "postfix"))

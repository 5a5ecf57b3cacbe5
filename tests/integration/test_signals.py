"""SIGTERM or SIGHUP at any moment of a one-shot publish or pull: exit 128+n, no traceback,
nothing half-written visible (the old release and the old maps keep serving)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mapsync.release import parse_latest
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    root = tmp_path_factory.mktemp("signals")
    return make_cluster(root, f"sqlite:///{root / 'central.db'}", accounts=20_000, aliases=5_000)


def _interrupted(cluster: Cluster, command: str, after: float, sig: int) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mapsync", "--config", str(cluster.config_path), command, "--force"]
        if command == "publish"
        else [sys.executable, "-m", "mapsync", "--config", str(cluster.config_path), command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(after)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out + err


def _release_dirs(cluster: Cluster) -> list[Path]:
    return sorted((cluster.repo / "mx" / "releases").iterdir())


@pytest.mark.slow
def test_a_publish_ended_by_a_signal_leaves_no_trace(big: Cluster) -> None:
    started = time.monotonic()
    big.publish("--force")
    took = time.monotonic() - started
    exits = []
    for i, fraction in enumerate((0.25, 0.4, 0.55, 0.7, 0.85)):
        sig = signal.SIGHUP if i % 2 else signal.SIGTERM
        code, output = _interrupted(big, "publish", took * fraction, sig)
        exits.append(code)
        if code in (0, -sig):
            # Finished before the signal came (a whole release, also fine), or it came during
            # interpreter shutdown, after the work, when Python has put back the default action.
            continue
        assert code == 128 + sig, output
        assert "Traceback" not in output, output
        assert not (big.repo / "mx" / ".staging").exists()
        latest = parse_latest((big.repo / "mx" / "LATEST").read_bytes(), "LATEST")
        assert (big.repo / "mx" / "releases" / str(latest.serial) / "MANIFEST.json").is_file()
        for release in _release_dirs(big):
            assert (release / "MANIFEST.json.sig").is_file(), release  # none half-made
    print(f"\n[signal] publish takes {took:.2f}s; exits when signalled at 25..85%: {exits}")
    assert any(code > 128 for code in exits)  # at least one signal landed mid-run
    # and the repository still serves: a node installs what LATEST names
    assert big.cli("pull").returncode == 0


def _live_serial(cluster: Cluster) -> int:
    serial = json.loads((cluster.target / ".mapsync" / "current" / "MANIFEST.json").read_bytes())
    return int(serial["serial"])


@pytest.mark.slow
def test_a_pull_ended_by_a_signal_leaves_one_whole_set(big: Cluster) -> None:
    big.publish("--force")
    big.pull()
    add_account(big, "timing")
    big.publish()
    started = time.monotonic()
    big.pull()
    took = time.monotonic() - started
    exits = []
    for i, fraction in enumerate((0.3, 0.5, 0.7, 0.85)):
        before = _live_serial(big)
        add_account(big, f"signalled{i}")
        big.publish()
        code, output = _interrupted(big, "pull", took * fraction, signal.SIGTERM)
        exits.append(code)
        assert code in (0, 143, -signal.SIGTERM), output
        assert "Traceback" not in output, output
        # One whole set serves: the old serial or the new one, every file as its manifest says.
        assert _live_serial(big) in (before, before + 1)
        assert big.cli("verify").returncode == 0
        assert big.cli("pull").returncode == 0  # and the next run finishes the job
        assert _live_serial(big) == before + 1
    print(f"\n[signal] pull takes {took:.2f}s; exits when signalled at 30..85%: {exits}")
    assert 143 in exits  # at least one signal landed mid-pull

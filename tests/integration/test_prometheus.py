"""`mapsync status --prometheus FILE`: node_exporter textfile-collector metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Cluster

SAMPLE = re.compile(r'^(mapsync_[a-z_]+)\{channel="([a-z0-9_-]+)"(?:,map="([a-z_]+)")?\} (-?\d+)$')


def _metrics(path: Path) -> dict[tuple[str, str, str | None], int]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            assert line.split()[2].startswith("mapsync_")
            continue
        m = SAMPLE.match(line)
        assert m, f"not an exposition-format sample: {line!r}"
        out[(m.group(1), m.group(2), m.group(3))] = int(m.group(4))
    return out


def test_metrics_describe_what_is_installed(cluster: Cluster) -> None:
    prom = cluster.root / "textfile" / "mapsync.prom"
    prom.parent.mkdir()
    proc = cluster.cli("status", "--prometheus", str(prom))
    assert proc.returncode == 2  # nothing installed yet: CRITICAL, and the metrics say so
    assert _metrics(prom)[("mapsync_status", "mx", None)] == 2

    cluster.publish()
    cluster.pull()
    proc = cluster.cli("status", "--json", "--prometheus", str(prom))
    assert proc.returncode == 0
    status = json.loads(proc.stdout)["channels"][0]
    metrics = _metrics(prom)
    assert metrics[("mapsync_status", "mx", None)] == 0
    assert metrics[("mapsync_release_serial", "mx", None)] == 1
    assert metrics[("mapsync_pinned", "mx", None)] == 0
    assert 0 <= metrics[("mapsync_release_age_seconds", "mx", None)] < 120
    for name, entries in status["entries"].items():
        assert metrics[("mapsync_map_entries", "mx", name)] == entries
    assert (
        metrics[("mapsync_expiry_timestamp_seconds", "mx", None)]
        > metrics[("mapsync_last_success_timestamp_seconds", "mx", None)]
    )
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644  # node_exporter runs as another user
    assert not [p for p in prom.parent.iterdir() if p != prom]  # no temp file left behind


ROOT = Path(__file__).parents[2]
RULES = ROOT / "docs" / "examples" / "prometheus-alerts.yml"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing (Debian package prometheus; scripts/install --test)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_the_shipped_alert_rules_are_valid_and_fire_as_documented(tmp_path: Path) -> None:
    check = _promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 14 rules found" in check.stdout
    cases = (ROOT / "tests" / "fixtures" / "prometheus" / "alerts.test.yml").read_text()
    test_file = tmp_path / "alerts.test.yml"
    test_file.write_text(cases.replace("RULES", str(RULES)))
    run = _promtool("test", "rules", str(test_file))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_the_alert_rules_use_only_metrics_mapsync_writes(cluster: Cluster) -> None:
    prom, publisher = cluster.root / "mapsync.prom", cluster.root / "publisher.prom"
    cluster.publish()
    cluster.pull()
    cluster.cli("status", "--prometheus", str(prom))
    cluster.cli("status", "--publisher", "--prometheus", str(publisher))
    mirror = cluster.root / "mirror.prom"
    assert cluster.cli("mirror", str(cluster.repo), str(cluster.root / "mirror")).returncode == 0
    cluster.cli("status", "--mirror", str(cluster.root / "mirror"), "--prometheus", str(mirror))
    written = {name for name, _, _ in _metrics(prom)} | set(_publisher_metrics(publisher))
    written |= set(_mirror_metrics(mirror))
    assert "mapsync_mirror_serial" in written
    assert "mapsync_last_run_failed" in written
    used = set(re.findall(r"\bmapsync_[a-z_]+\b", RULES.read_text()))
    assert used and used <= written, used - written


def test_last_run_failed_is_a_metric(cluster: Cluster) -> None:
    cluster.publish()
    cluster.pull()
    prom = cluster.root / "mapsync.prom"
    (cluster.repo / "mx" / "LATEST").write_text("garbage\n")  # the next pull fails
    assert cluster.cli("pull").returncode != 0
    cluster.cli("status", "--prometheus", str(prom))
    assert _metrics(prom)[("mapsync_last_run_failed", "mx", None)] == 1


def test_a_stray_file_is_no_live_damage_for_the_alert_rules(cluster: Cluster) -> None:
    """An editor's swap file in the live set is a WARNING in status (no map changed; the next
    pull removes it), but mapsync_live_damaged said 1, and MapsyncLiveSetDamaged paged at once
    as critical. Only a changed or missing map is damage there."""
    cluster.publish()
    cluster.pull()
    prom = cluster.root / "mapsync.prom"
    live = cluster.target / ".mapsync" / "current"
    (live / ".virtual.swp").write_text("swap\n")
    assert cluster.cli("status", "--prometheus", str(prom)).returncode == 1
    metrics = _metrics(prom)
    assert metrics[("mapsync_status", "mx", None)] == 1
    assert metrics[("mapsync_live_damaged", "mx", None)] == 0
    (live / "transport.cdb").unlink()
    assert cluster.cli("status", "--prometheus", str(prom)).returncode == 2
    assert _metrics(prom)[("mapsync_live_damaged", "mx", None)] == 1


def _publisher_metrics(path: Path) -> dict[str, dict[str, int]]:
    """metric → {channel label or "": value} of a publisher's textfile."""
    out: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            assert line.split()[2].startswith("mapsync_publisher_")
            continue
        m = re.match(r'^(mapsync_publisher_[a-z_]+)(?:\{channel="([a-z0-9_-]+)"\})? (\d+)$', line)
        assert m, f"not an exposition-format sample: {line!r}"
        out.setdefault(m.group(1), {})[m.group(2) or ""] = int(m.group(3))
    return out


def test_the_publisher_writes_its_status_and_each_channels_serial(cluster: Cluster) -> None:
    prom = cluster.root / "publisher.prom"
    p = cluster.cli("status", "--publisher", "--prometheus", str(prom))
    assert p.returncode == 3, p.stdout  # no run yet: UNKNOWN
    assert _publisher_metrics(prom) == {"mapsync_publisher_status": {"": 3}}
    cluster.publish()
    p = cluster.cli("status", "--publisher", "--prometheus", str(prom))
    assert p.returncode == 0, p.stdout + p.stderr
    metrics = _publisher_metrics(prom)
    assert metrics["mapsync_publisher_status"] == {"": 0}
    assert metrics["mapsync_publisher_serial"] == {"mx": 1}
    last = metrics["mapsync_publisher_last_success_timestamp_seconds"][""]
    assert last == metrics["mapsync_publisher_last_run_timestamp_seconds"][""]
    assert abs(last - time.time()) < 120
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644


def _mirror_metrics(path: Path) -> dict[str, dict[str, int]]:
    """metric → {channel label or "": value} of a mirror's textfile, each sample labelled
    with its DEST."""
    out: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            assert line.split()[2].startswith("mapsync_mirror_")
            continue
        m = re.match(
            r'^(mapsync_mirror_[a-z_]+)\{(?:channel="([a-z0-9_-]+)",)?dest="([^"]+)"\} (\d+)$',
            line,
        )
        assert m, f"not an exposition-format sample: {line!r}"
        out.setdefault(m.group(1), {})[m.group(2) or ""] = int(m.group(4))
    return out


def test_the_mirror_writes_its_status_and_each_channels_serial_and_expiry(
    cluster: Cluster,
) -> None:
    """`mapsync status --mirror DEST --prometheus FILE`, after a real mirror run from a
    repository the publisher built; no config is read."""
    dest, prom = cluster.root / "mirror", cluster.root / "mirror.prom"
    p = cluster.cli("status", "--mirror", str(dest), "--prometheus", str(prom))
    assert p.returncode == 3, p.stdout  # no run yet: UNKNOWN
    assert _mirror_metrics(prom) == {"mapsync_mirror_status": {"": 3}}
    cluster.publish()
    assert cluster.cli("mirror", str(cluster.repo), str(dest)).returncode == 0
    p = subprocess.run(
        [sys.executable, "-m", "mapsync", "status", "--mirror", str(dest), "--prometheus",
         str(prom)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "MAPSYNC_CONFIG": "/nonexistent"},
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("MAPSYNC MIRROR OK - serving mx 1; first to expire: mx, ")
    metrics = _mirror_metrics(prom)
    assert metrics["mapsync_mirror_status"] == {"": 0}
    assert metrics["mapsync_mirror_serial"] == {"mx": 1}
    manifest = json.loads((cluster.repo / "mx" / "releases" / "1" / "MANIFEST.json").read_text())
    expires = metrics["mapsync_mirror_expiry_timestamp_seconds"]["mx"]
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)) == manifest["expires"]
    last = metrics["mapsync_mirror_last_success_timestamp_seconds"][""]
    assert last == metrics["mapsync_mirror_last_run_timestamp_seconds"][""]
    assert abs(last - time.time()) < 120
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644

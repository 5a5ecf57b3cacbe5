"""Long operations show progress on a terminal, and only there (not in cron mail or the journal)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import Cluster


def _on_terminal(cluster: Cluster, *args: str) -> tuple[int, str]:
    """Run ``mapsync ARGS`` with standard error on a pseudo-terminal; (exit code, what it drew)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mapsync", "--config", str(cluster.config_path), *args],
            stdout=subprocess.DEVNULL,
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        return proc.wait(timeout=120), drawn.decode()
    finally:
        os.close(master)


def _final_lines(drawn: str) -> list[str]:
    """Each terminal line as it was last drawn (after its last carriage return)."""
    return [line.split("\r")[-1].strip() for line in drawn.replace("\r\n", "\n").split("\n")]


def test_publish_and_pull_draw_progress_on_a_terminal(cluster: Cluster) -> None:
    code, drawn = _on_terminal(cluster, "publish")
    assert code == 0, drawn
    lines = _final_lines(drawn)
    accounts = next(line for line in lines if line.startswith("read accounts:"))
    assert accounts == "read accounts: 120/120 (100%)"
    recipients = next(line for line in lines if line.startswith("cdb mx/recipients:"))
    assert re.fullmatch(r"cdb mx/recipients: (\d+)/\1 \(100%\)", recipients), recipients
    assert any(re.fullmatch(r"render mx/virtual: \d+/\d+ \(100%\)", line) for line in lines)

    code, drawn = _on_terminal(cluster, "pull")
    assert code == 0, drawn
    built = [line for line in _final_lines(drawn) if line.startswith("build ")]
    assert {line.split(":")[0] for line in built} == {
        "build domains.cdb",
        "build recipients.cdb",
        "build virtual.cdb",
        "build transport.cdb",
    }
    assert all(line.endswith("(100%)") for line in built), built


def test_nothing_is_drawn_when_standard_error_is_not_a_terminal(cluster: Cluster) -> None:
    p = cluster.publish()
    assert "\r" not in p.stderr and "read accounts" not in p.stderr
    p = cluster.pull()
    assert "\r" not in p.stderr and "build recipients.cdb" not in p.stderr


def test_quiet_and_json_logs_draw_nothing(cluster: Cluster) -> None:
    for flags in (("-q",), ("--log-format", "json")):
        code, drawn = _on_terminal(cluster, *flags, "publish", "--force")
        assert code == 0, drawn
        assert "read accounts" not in drawn, flags


def test_seed_draws_each_table(tmp_path: Path) -> None:
    cfg = tmp_path / "mapsync.toml"
    cfg.write_text(
        f'[publisher]\ndatabase = "sqlite:///{tmp_path / "db.sqlite"}"\n'
        'repository = "repo"\nsigning_key = "k"\n[publisher.channels.mx]\nmaps = ["domains"]\n'
    )
    cluster = Cluster(tmp_path, "")
    assert cluster.config_path == cfg
    assert cluster.cli("init-db").returncode == 0
    code, drawn = _on_terminal(cluster, "seed", "--accounts", "300")
    assert code == 0, drawn
    assert "insert account: 300/300 (100%)" in _final_lines(drawn)

"""The shipped systemd units are valid for systemd itself, and run commands that exist."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[2] / "systemd"


def _installed(tmp_path: Path) -> list[Path]:
    """The units as an operator installs them, ExecStart pointed at this mapsync."""
    mapsync = Path(sys.executable).parent / "mapsync"
    assert mapsync.exists(), f"{mapsync}: the mapsync console script is not installed"
    out = []
    for unit in sorted(UNITS.iterdir()):
        target = tmp_path / unit.name
        target.write_text(unit.read_text().replace("/usr/local/bin/mapsync", str(mapsync)))
        out.append(target)
    return out


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd)")
    units = _installed(tmp_path)
    assert {u.name for u in units} >= {
        "mapsync-publish.service",
        "mapsync-publish.timer",
        "mapsync-pull.service",
        "mapsync-pull.timer",
    }
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_units_are_hardened() -> None:
    for name in ("mapsync-publish.service", "mapsync-pull.service"):
        text = (UNITS / name).read_text()
        for setting in (
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "ReadWritePaths=",
        ):
            assert setting in text, f"{name} lacks {setting}"

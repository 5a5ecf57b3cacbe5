"""The shipped systemd units are valid for systemd itself, and run commands that exist."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[2] / "systemd"


def _installed(tmp_path: Path) -> list[Path]:
    """The units as the package installs them, ExecStart pointed at this checkout's mapsync."""
    mapsync = Path(sys.executable).parent / "mapsync"
    assert mapsync.exists(), f"{mapsync}: the mapsync console script is not installed"
    out = []
    for unit in sorted(UNITS.iterdir()):
        target = tmp_path / unit.name
        target.write_text(unit.read_text().replace("/usr/bin/mapsync", str(mapsync)))
        out.append(target)
    return out


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd)")
    units = _installed(tmp_path)
    assert {u.name for u in units} >= {
        "mapsync-agent.service",
        "mapsync-mirror.service",
        "mapsync-publish.service",
        "mapsync-publish.timer",
        "mapsync-publisher.service",
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


def test_units_run_the_packaged_mapsync_as_the_user_the_package_creates() -> None:
    # The .deb installs /usr/bin/mapsync and creates the system user `mapsync` (postinst);
    # the publisher runs as it, the agent as root (it writes the mail daemons' maps and runs
    # `postfix reload`: docs/security.md). tests/package/test_deb.py runs them installed.
    for unit in sorted(UNITS.glob("*.service")):
        service = _settings(unit.read_text(), "Service")
        words = service["ExecStart"].split()
        if "mirror" in words:  # SOURCE, DEST and options on its command line; no config file
            assert service["ExecStart"].startswith("/usr/bin/mapsync mirror "), unit
        else:
            assert service["ExecStart"].startswith("/usr/bin/mapsync --config /etc/mapsync/"), unit
        assert "Documentation=file:///usr/share/doc/mapsync/operator-guide.md" in (
            unit.read_text().splitlines()
        ), unit
        unprivileged = "publish" in words or "mirror" in words  # only the agent needs root
        expected = {"User": "mapsync", "Group": "mapsync"} if unprivileged else {}
        assert {k: service[k] for k in ("User", "Group") if k in service} == expected, unit
    postinst = (UNITS.parent / "packaging" / "deb" / "postinst").read_text()
    assert "adduser --system" in postinst and " mapsync\n" in postinst


def test_units_are_hardened() -> None:
    for name in (
        "mapsync-agent.service",
        "mapsync-mirror.service",
        "mapsync-publish.service",
        "mapsync-pull.service",
    ):
        text = (UNITS / name).read_text()
        for setting in (
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "ReadWritePaths=",
        ):
            assert setting in text, f"{name} lacks {setting}"


def _settings(text: str, section: str) -> dict[str, str]:
    """``Key=value`` lines of one ``[section]`` (comments dropped)."""
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def test_the_long_running_agent_replaces_the_pull_timer_and_is_hardened_like_it() -> None:
    agent_text = (UNITS / "mapsync-agent.service").read_text()
    unit = _settings(agent_text, "Unit")
    service = _settings(agent_text, "Service")
    # An operator runs one or the other: starting the agent stops the timer (and vice versa).
    assert "mapsync-pull.timer" in unit["Conflicts"].split()
    assert any(
        line.startswith("#") and "mapsync-pull.timer" in line for line in agent_text.splitlines()
    ), "the agent unit should say why it conflicts with the pull timer"
    assert service["ExecStart"].endswith(" agent --watch")
    assert service["Type"] == "exec"  # long-running; start fails if mapsync cannot be run
    assert service["Restart"] == "on-failure"
    assert "143" in service["SuccessExitStatus"].split()  # SIGTERM (128+15) is a clean stop
    assert _settings(agent_text, "Install")["WantedBy"] == "multi-user.target"
    pull = _settings((UNITS / "mapsync-pull.service").read_text(), "Service")
    hardening = {k: v for k, v in pull.items() if k not in ("Type", "ExecStart", "TimeoutStartSec")}
    assert {k: service.get(k) for k in hardening} == hardening


def test_the_long_running_publisher_replaces_the_publish_timer_hardened_exactly_like_it() -> None:
    def hardening(name: str) -> str:
        text = (UNITS / name).read_text()
        block = text[text.index("# Hardening") :]
        return block.split("\n[", 1)[0].strip()

    assert hardening("mapsync-publisher.service") == hardening("mapsync-publish.service")
    text = (UNITS / "mapsync-publisher.service").read_text()
    lines = text.splitlines()
    # One or the other: starting the long-running publisher stops the timer, and vice versa.
    assert "Conflicts=mapsync-publish.timer mapsync-publish.service" in lines
    assert any(line.startswith("#") and "mapsync-publish.timer" in line for line in lines)
    exec_start = [line for line in lines if line.startswith("ExecStart=")]
    assert len(exec_start) == 1 and exec_start[0].endswith(" publish --interval 10")
    for setting in ("Restart=on-failure", "SuccessExitStatus=143", "WantedBy=multi-user.target"):
        assert setting in lines, setting


def test_both_publisher_units_push_alike() -> None:
    # Every `publish` pushes, from the timer's oneshot as from the long-running unit: the push
    # password and the writable paths must not depend on which one the operator enabled.
    def push_settings(name: str) -> dict[str, str | None]:
        service = _settings((UNITS / name).read_text(), "Service")
        return {k: service.get(k) for k in ("EnvironmentFile", "ReadWritePaths", "User")}

    timer = push_settings("mapsync-publish.service")
    assert timer == push_settings("mapsync-publisher.service")
    assert timer["EnvironmentFile"] == "-/etc/mapsync/push.env"


def test_the_mirror_unit_is_hardened_exactly_like_the_long_running_publisher() -> None:
    def hardening(name: str) -> str:
        text = (UNITS / name).read_text()
        block = text[text.index("# Hardening") :].split("\n", 1)[1]  # its comment differs
        return block.split("\n[", 1)[0].strip()

    assert hardening("mapsync-mirror.service") == hardening("mapsync-publisher.service")
    service = _settings((UNITS / "mapsync-mirror.service").read_text(), "Service")
    assert service["ExecStart"].endswith(" ${MIRROR_SOURCE} /srv/mapsync")
    assert " --interval " in service["ExecStart"] and service["SuccessExitStatus"] == "143"
    assert service["EnvironmentFile"] == "/etc/mapsync/mirror.env"


def test_reload_checks_the_config_before_the_sighup_of_each_long_running_unit() -> None:
    """`systemctl reload` must not turn a broken config into a dead service: the config is
    checked first (a failed ExecReload= fails the reload; the process runs on), then SIGHUP,
    which the process checks again itself (mapsync.signals.on_hangup)."""
    for name, section in (
        ("mapsync-agent.service", "--agent --watch"),  # as its ExecStart: `agent --watch`
        ("mapsync-publisher.service", "--publisher"),
        ("mapsync-mirror.service", None),
    ):
        lines = [
            line.split("=", 1)[1]
            for line in (UNITS / name).read_text().splitlines()
            if line.startswith("ExecReload=")
        ]
        check = [f"/usr/bin/mapsync --config /etc/mapsync/mapsync.toml check-config {section}"]
        assert lines == [*(check if section else []), "/bin/kill -HUP $MAINPID"], name

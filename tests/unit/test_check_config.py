"""``mapsync check-config``: the config file loaded as every command loads it, and nothing
else; what an operator runs after an edit (and the units' ExecReload= runs) before the
long-running processes are told to read it again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mapsync.signing import keygen

AGENT = """\
[agent]
state = "{root}/state"
trusted_keys = ["{root}/signing.pub"]

[agent.channels.mx]
source = "{root}/repo/mx"
target = "{root}/live"
"""


def agent_config(root: Path, extra: str = "") -> Path:
    """``root/mapsync.toml`` of :data:`AGENT` (and ``extra``), with its trusted key made."""
    keygen(root / "signing.key")
    config = root / "mapsync.toml"
    config.write_text(AGENT.format(root=root) + extra)
    return config


def check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mapsync", "--config", str(config), "check-config", *args],
        capture_output=True,
        text=True,
    )


def test_a_config_that_loads_is_said_to_and_nothing_is_made(tmp_path: Path) -> None:
    config = agent_config(tmp_path)
    p = check(config, "--agent")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == f"{config}: the config loads"
    assert "[agent]: 1 channel(s) (mx)" in p.stdout
    assert "`agent --watch` would not start" in p.stdout  # no inbox
    made = ["mapsync.toml", "signing.key", "signing.pub"]
    assert sorted(x.name for x in tmp_path.iterdir()) == made


@pytest.mark.parametrize("fault", ["missing", "writable by others", "not a key"])
def test_the_agent_s_trusted_keys_are_read_as_a_pull_reads_them(tmp_path: Path, fault: str) -> None:
    """A trusted key a pull would refuse (a failed copy, a file others may replace) fails
    the check, naming the file: before, only the next release's pull said so."""
    config = agent_config(tmp_path)
    public = tmp_path / "signing.pub"
    if fault == "missing":
        public.unlink()
    elif fault == "writable by others":
        public.chmod(0o666)
    else:
        public.write_text("")
    p = check(config, "--agent")
    assert p.returncode == 2 and p.stdout == "", p.stdout
    assert p.stderr.startswith(f"mapsync: {public}: "), p.stderr


@pytest.mark.parametrize("fault", ["missing", "readable by others"])
def test_the_agent_s_password_file_is_checked_as_a_pull_checks_it(
    tmp_path: Path, fault: str
) -> None:
    """A password_file every pull would refuse (0644 after a copy, not there yet) fails the
    check, naming the file: before, the check and the reload passed and every pull failed."""
    password = tmp_path / "mx.password"
    config = agent_config(tmp_path)
    config.write_text(
        config.read_text().replace(
            f'source = "{tmp_path}/repo/mx"',
            f'source = "rsync://mx-agent@127.0.0.1/mx"\npassword_file = "{password}"',
        )
    )
    assert check(config).returncode == 0  # loading alone reads no file
    if fault == "readable by others":
        password.write_text("mx-Secret-1\n")
        password.chmod(0o644)
    p = check(config, "--agent")
    assert p.returncode == 2 and p.stdout == "", p.stdout
    assert p.stderr.startswith(f"mapsync: password_file {password}: "), p.stderr
    password.write_text("mx-Secret-1\n")
    password.chmod(0o600)
    assert check(config, "--agent").returncode == 0


def test_the_publisher_s_signing_key_is_read_as_a_publish_reads_it(tmp_path: Path) -> None:
    keygen(tmp_path / "signing.key")
    config = tmp_path / "mapsync.toml"
    config.write_text(
        f'[publisher]\ndatabase = "sqlite:///{tmp_path}/db"\nrepository = "{tmp_path}/repo"\n'
        f'signing_key = "{tmp_path}/signing.key"\n[publisher.channels.mx]\nmaps = ["domains"]\n'
    )
    assert check(config, "--publisher").returncode == 0
    (tmp_path / "signing.key").chmod(0o644)
    p = check(config, "--publisher")
    assert p.returncode == 2 and "signing key has mode 0644" in p.stderr, p.stderr


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda t: t.replace("[agent]\n", "[agent\n"), "not valid TOML"),
        (lambda t: t.replace("[agent]\n", '[agent]\nintervall = "5m"\n'), "[agent] intervall"),
        (lambda t: t.replace("[agent]\n", "[agent]\ninterval = 300\n"), "[agent] interval"),
    ],
)
def test_a_broken_config_is_exit_2_naming_file_and_line_or_key(
    tmp_path: Path, edit: object, said: str
) -> None:
    config = tmp_path / "mapsync.toml"
    config.write_text(edit(AGENT.format(root=tmp_path)))  # type: ignore[operator]
    p = check(config)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.startswith(f"mapsync: {config}: ") and said in p.stderr, p.stderr
    if said == "not valid TOML":
        assert "line 1" in p.stderr


def test_a_section_asked_for_must_be_there(tmp_path: Path) -> None:
    config = tmp_path / "mapsync.toml"
    config.write_text(AGENT.format(root=tmp_path))
    p = check(config, "--publisher")
    assert p.returncode == 2
    assert f"{config}: this command needs a [publisher] section" in p.stderr


def test_it_is_in_the_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mapsync", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "    check-config " in out


def test_watch_checks_what_agent_watch_needs_as_the_agent_unit_reload_does(
    tmp_path: Path,
) -> None:
    """mapsync-agent.service runs `agent --watch`: its reload must fail, on the operator's
    terminal, for a config that agent would refuse (no inbox left), not pass and leave the
    agent to log 'config not reloaded' where no one looks."""
    config = agent_config(tmp_path)
    assert check(config, "--agent").returncode == 0
    p = check(config, "--agent", "--watch")
    assert p.returncode == 2 and p.stdout == ""
    assert f"{config}: agent --watch needs a push inbox" in p.stderr, p.stderr
    config.write_text(AGENT.format(root=tmp_path) + f'inbox = "{tmp_path}/inbox/mx"\n')
    p = check(config, "--watch")
    assert p.returncode == 0, p.stderr
    assert "inbox watched by `agent --watch`: mx" in p.stdout
    assert not (tmp_path / "inbox").exists()  # looked at, not made

"""The public CLI of DESIGN.md: every command and flag exists, and each has its help text."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from mapsync.cli.main import build_parser

# DESIGN.md "Public interface": command → the options and positionals it must accept.
PUBLIC = {
    "init-db": set(),
    "seed": {"--accounts", "--domains", "--aliases", "--mailstores", "--seed", "--password"},
    "publish": {"--dry-run", "--force", "--skip-invalid", "--channel"},
    "pull": {"--channel"},
    "agent": {"--interval", "--watch"},
    "status": {"--json", "--prometheus"},
    "history": {"--channel"},
    "diff": {"--channel", "a", "b"},
    "rollback": {"--channel", "serial"},
    "verify": set(),
    "keygen": {"path"},
    "demo": {"--dir", "--schema"},
    "compare": {"--postfix", "--table", "--dovecot", "--database", "--channel", "--json"},
    "mirror": {"source", "dest", "--channel", "--keep", "--trusted-key", "--interval"},
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _names(parser: argparse.ArgumentParser) -> set[str]:
    names: set[str] = set()
    for action in parser._actions:
        names.update(action.option_strings or [action.dest])
    return names


def test_every_public_command_and_flag_exists() -> None:
    commands = _commands()
    assert set(PUBLIC) <= set(commands)
    for name, flags in PUBLIC.items():
        missing = flags - _names(commands[name])
        assert not missing, f"mapsync {name}: {sorted(missing)} missing"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_option_of_every_command_is_explained(name: str) -> None:
    parser = _commands()[name]
    assert parser.description and len(parser.description) > 20, name
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 5, f"mapsync {name} {action.dest}: no help"


def test_help_runs_and_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mapsync", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in PUBLIC:
        assert f"    {name} " in out, name
    assert "exit codes:" in out


def test_mirror_help_gives_the_order_of_docs_scaling_md() -> None:
    """LATEST's release, then LATEST, then the older ones (docs/scaling.md, README): not
    every new release before LATEST, as the help said before the order changed."""
    text = " ".join((_commands()["mirror"].description or "").split())
    assert "LATEST names" in text
    assert text.index("then LATEST") < text.index("then the older releases") < text.index("prune")


@pytest.mark.parametrize("columns", [60, 80, 200])
def test_every_help_fits_the_terminal_and_prose_stays_readable(
    columns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A description written as one long line (three commands' were, 321 to 427 characters)
    ran off an 80-column terminal and the man page's unfilled blocks; a hand-wrapped one
    came out ragged on a narrower terminal. Every line now fits, and prose never runs wider
    than 88 columns however wide the terminal."""
    monkeypatch.setenv("COLUMNS", str(columns))
    for name, parser in [("mapsync", build_parser()), *_commands().items()]:
        text = parser.format_help()
        for line in text.splitlines():
            assert len(line) <= columns - 2 or " " not in line.strip(), (name, line)
        description = parser.format_help().split("\n\n")[1]
        assert all(len(line) <= min(columns - 2, 88) for line in description.splitlines()), (
            name,
            description,
        )
    assert "  1  warning: status WARNING" in build_parser().format_help()

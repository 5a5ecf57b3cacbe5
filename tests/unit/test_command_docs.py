"""Every `mapsync` command line in a ```sh block of the docs is one the CLI accepts: its
subcommand, options and arguments as `mapsync <cmd> --help` has them (an operator pastes these)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mapsync.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
PREFIXES = {"sudo", "runuser", "env"}  # what may run mapsync as another user
DOCS = [ROOT / "README.md", ROOT / "agents" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        for block in re.findall(r"```sh\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"&&|;|\|\|", line.split(" #")[0]):
                    words = shlex.split(part)
                    # the command `mapsync`, not sudo's `-u mapsync` before it
                    starts = [
                        i
                        for i, w in enumerate(words)
                        if w == "mapsync"
                        and (i == 0 or words[i - 1] != "-u")
                        and (i == 0 or words[0] in PREFIXES or "=" in words[0])
                    ]
                    if not starts:
                        continue
                    words = words[starts[0] :]
                    if any(re.search(r"\.\.\.|…|[<\[$]", w) or w.isupper() for w in words):
                        continue  # a pattern (SERIAL, [41], <ch>, $VAR): not a line to paste
                    found.append((f"{doc.relative_to(ROOT)}: {part.strip()}", " ".join(words)))
    return found


@pytest.mark.parametrize(("where", "command"), _commands(), ids=lambda v: v[:60])
def test_every_documented_command_line_parses(where: str, command: str) -> None:
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as e:
        pytest.fail(f"{where}: mapsync refuses it (exit {e.code})")


def test_the_mirror_runbook_command_is_checked() -> None:
    assert any("mirror --keep 5" in c for _, c in _commands())

"""docs/walkthrough.md, run: its ```sh blocks starting ``# step: NAME`` (optionally
``(exits N)``), in page order, each by ``bash -euo pipefail`` with only the variables of its
``# set these first`` block in the environment (the test's values, pointing into a temporary
directory) and ``PATH``; its ``# output of NAME`` blocks are how each step's output must end.

``mapsync`` on that ``PATH`` is a small wrapper that every user can run (``runuser -u nobody
-- mapsync ...``, as the page does for the publisher and the monitoring user): the test
virtualenv's interpreter is under /root, so it runs the system Python with the virtualenv's
packages, as tests/helpers/users.py does.
"""

from __future__ import annotations

import re
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.users import CHECKOUT, SYSTEM_PYTHON

WALKTHROUGH = CHECKOUT / "docs" / "walkthrough.md"

_BLOCK = re.compile(r"^```([a-z]*)\n(.*?)^```$", re.S | re.M)
_STEP = re.compile(r"# step: ([a-z0-9-]+)(?: \(exits (\d+)\))?")
_VARIABLE = re.compile(r"([A-Z_]+)=(\S+)\s*(?:#.*)?")


@dataclass(frozen=True)
class Step:
    name: str
    exits: int  # the exit code the page expects
    script: str  # the block, marker line included (a comment to bash)


def _blocks(path: Path) -> list[tuple[str, str, str]]:
    """(language, first line, whole body) of every fenced block."""
    return [
        (m.group(1), m.group(2).partition("\n")[0].strip(), m.group(2))
        for m in _BLOCK.finditer(path.read_text())
    ]


def steps(path: Path = WALKTHROUGH) -> list[Step]:
    """The runnable blocks, in page order; every ```sh block must be one (or the variables)."""
    out = []
    for lang, first, body in _blocks(path):
        if lang != "sh" or first == "# set these first":
            continue
        m = _STEP.fullmatch(first)
        assert m, f"{path.name}: a ```sh block that is not a step: {first!r}"
        out.append(Step(m.group(1), int(m.group(2) or 0), body))
    return out


def variables(path: Path = WALKTHROUGH) -> dict[str, str]:
    """The ``# set these first`` block: name → the page's (production) value."""
    (body,) = [b for lang, first, b in _blocks(path) if first == "# set these first"]
    out = {}
    for line in body.splitlines()[1:]:
        m = _VARIABLE.fullmatch(line.strip())
        assert m, f"{path.name}: not a NAME=value line in the variables block: {line!r}"
        out[m.group(1)] = m.group(2)
    return out


def outputs(path: Path = WALKTHROUGH) -> dict[str, str]:
    """``# output of NAME`` blocks: step name → the text its output must end with."""
    out = {}
    for lang, first, body in _blocks(path):
        if lang == "text" and first.startswith("# output of "):
            out[first.removeprefix("# output of ")] = body.partition("\n")[2]
    return out


def mapsync_wrapper(bin_dir: Path) -> Path:
    """``bin_dir/mapsync``: runs this checkout's mapsync for any user (mode 0755)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "mapsync"
    packages = f"{sysconfig.get_paths()['purelib']}:{CHECKOUT}"
    path.write_text(f'#!/bin/sh\nPYTHONPATH={packages} exec {SYSTEM_PYTHON} -m mapsync "$@"\n')
    path.chmod(0o755)
    return path


def run(step: Step, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The step's block, as written, by ``bash -euo pipefail`` with exactly ``env``."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", step.script],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )

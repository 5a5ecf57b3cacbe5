"""An error nobody foresaw still exits 2 (error) with one line, never 1: monitoring reads a
traceback's exit 1 as WARNING. The traceback is there for ``-v``."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

# `python -m mapsync`, with `status` replaced by a bug. A fake on purpose: no real input is
# known to reach this path (that is the point). Its own process, so the logging and signal
# handlers main() installs do not outlive the test.
_BROKEN = """\
import sys
from mapsync.cli import commands
from mapsync.cli.main import main

def cmd_status(args):
    raise RuntimeError("surprise\\nsecond line of a long message")

commands.cmd_status = cmd_status
sys.exit(main())
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BROKEN, *args, "--config", "/nonexistent.toml", "status"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_an_unexpected_error_exits_2_with_one_line() -> None:
    p = _run()
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.splitlines() == [
        "mapsync: unexpected error: RuntimeError: surprise (run with -v for the traceback)"
    ]


def test_verbose_shows_the_traceback_too() -> None:
    p = _run("-v")
    assert p.returncode == 2
    assert p.stderr.startswith("Traceback (most recent call last):"), p.stderr
    assert "in cmd_status" in p.stderr
    assert p.stderr.splitlines()[-1] == "mapsync: unexpected error: RuntimeError: surprise"


def test_json_logs_get_one_event() -> None:
    p = _run("--log-format", "json")
    assert p.returncode == 2
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert '"unexpected error: RuntimeError: surprise"' in p.stderr and '"exit": 2' in p.stderr


def test_a_reader_gone_from_the_output_ends_the_command_as_sigpipe_does(tmp_path: Path) -> None:
    """`mapsync status --json | head -1`: the reader leaves; the command said `mapsync:
    [Errno 32] Broken pipe` and exited 2 (an error) for a healthy node. Now it ends as a
    command killed by SIGPIPE (141), without a word. Its output goes to a pipe with no reader."""
    script = (
        "import os, sys\n"
        "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
        "from mapsync.cli.main import main\n"
        f"sys.exit(main(['keygen', {str(tmp_path / 'k.key')!r}]))\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 128 + signal.SIGPIPE, p.stderr
    assert p.stderr == ""
    assert (tmp_path / "k.key").is_file()  # the work itself was done

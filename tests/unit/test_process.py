"""The one process runner: a child and everything it starts end with the run that started
it (timeout, SIGTERM/SIGHUP, ^C, a stopped job), output is read back only to its tail, and the
result says how the child ended in the words the operator reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from mapsync import process
from tests.helpers.processes import alive, gone_within, read_pids

# A hung check: the child (sh) starts a shell that starts a sleep, writes the pids of both
# (sleep first) to $1, and waits. Killing only the child would leave both running.
TREE = """\
sh -c 'sleep 60 & echo $! >> "$1"; echo $$ >> "$1"; wait' inner "$1" &
wait
"""


@pytest.fixture
def tree(tmp_path: Path) -> tuple[list[str], Path]:
    """(argv of a command whose grandchildren hang, the file they write their pids to)."""
    script = tmp_path / "tree.sh"
    script.write_text(TREE)
    pidfile = tmp_path / "pids"
    return ["sh", str(script), str(pidfile)], pidfile


@pytest.mark.parametrize(
    ("argv", "code", "how"),
    [
        (["true"], 0, "exit 0"),
        (["sh", "-c", "exit 3"], 3, "exit 3"),
        (["sh", "-c", "kill -KILL $$"], -9, "killed by signal 9 (SIGKILL)"),
        (["sh", "-c", "kill -TERM $$"], -15, "killed by signal 15 (SIGTERM)"),
        # Its own default restored first: under nohup (a CI runner's, an operator's) the
        # child would inherit SIGHUP ignored, and a shell cannot undo that.
        (
            [
                sys.executable,
                "-c",
                "import os, signal; signal.signal(signal.SIGHUP, "
                "signal.SIG_DFL); os.kill(os.getpid(), signal.SIGHUP)",
            ],
            -1,
            "killed by signal 1 (SIGHUP)",
        ),
    ],
)
def test_the_result_says_how_the_child_ended(argv: list[str], code: int, how: str) -> None:
    done = process.run(argv, 10)
    assert done.returncode == code
    assert done.how == how
    assert done.ok is (code == 0)
    assert not done.timed_out and not done.stopped
    assert done.argv == tuple(argv)


def test_a_timeout_kills_the_whole_group_grandchildren_too(tree: tuple[list[str], Path]) -> None:
    argv, pidfile = tree
    started = time.monotonic()
    done = process.run(argv, 0.5)
    took = time.monotonic() - started
    assert done.timed_out and not done.ok
    assert done.how == "timed out after 0.5s"
    assert done.returncode == -signal.SIGKILL
    assert 0.5 <= took < 3
    pids = read_pids(pidfile, 2)
    assert gone_within(pids, 5) == [], "a grandchild outlived the timeout"


# The agent as systemd or an operator ends it: mapsync.signals' handlers, a child that hangs.
RUNNER = """\
import signal, sys
from mapsync import process, signals
signal.signal(signal.SIGINT, signal.default_int_handler)  # ^C, also where it is ignored
signals.install()  # and then mapsync's, which hold it while the child starts
process.run(sys.argv[2:], 60, grace=float(sys.argv[1]))
"""


@pytest.mark.parametrize(
    ("sig", "status"),
    [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, -signal.SIGINT)],
)
def test_a_signal_during_the_run_ends_the_whole_group(
    tree: tuple[list[str], Path], sig: signal.Signals, status: int
) -> None:
    argv, pidfile = tree
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, "0", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = read_pids(pidfile, 2)
        runner.send_signal(sig)
        _, err = runner.communicate(timeout=10)
    finally:
        runner.kill()
        runner.wait()
    assert runner.returncode == status, err
    assert gone_within(pids, 5) == [], "a grandchild outlived the run"


@pytest.mark.parametrize(
    ("ignores_sigterm", "least", "most"),
    [(False, 0.0, 1.5), (True, 0.5, 5.0)],
)
def test_an_interrupted_child_gets_sigterm_then_sigkill_after_its_grace(
    tmp_path: Path, ignores_sigterm: bool, least: float, most: float
) -> None:
    """rsync's way: SIGTERM lets it remove its temporary file; one that ignores SIGTERM is
    killed when the grace (0.5 s here) is over."""
    pidfile = tmp_path / "pids"
    trap = "trap '' TERM; " if ignores_sigterm else ""
    script = f'{trap}sleep 60 & echo $! >> "$1"; echo $$ >> "$1"; wait'
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, "0.5", "sh", "-c", script, "sh", str(pidfile)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = read_pids(pidfile, 2)
        signalled = time.monotonic()
        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=10)
        took = time.monotonic() - signalled
    finally:
        runner.kill()
        runner.wait()
    assert runner.returncode == 143, err
    assert least <= took < most
    assert gone_within(pids, 5) == []


def test_a_stopped_job_ends_its_running_children_and_any_started_after(
    tree: tuple[list[str], Path],
) -> None:
    """The agent stopping a poll (or a push's main thread on SIGTERM) from another thread."""
    argv, pidfile = tree
    job = process.Job()
    results: list[process.Finished] = []
    worker = threading.Thread(target=lambda: results.append(process.run(argv, 60, job=job)))
    worker.start()
    pids = read_pids(pidfile, 2)
    job.stop(grace=2.0, reason="the agent is stopping")
    worker.join(10)
    assert not worker.is_alive()
    [done] = results
    assert done.stopped and not done.timed_out
    assert done.how == "killed by signal 15 (SIGTERM)"
    assert gone_within(pids, 5) == []
    assert job.reason == "the agent is stopping"

    started = time.monotonic()
    late = process.run(["sleep", "60"], 60, job=job)
    assert late.stopped and late.returncode == -signal.SIGTERM
    assert time.monotonic() - started < 2


def test_a_chatty_command_is_read_back_only_to_its_tail() -> None:
    """20 MB of output cost the runner no memory: it goes to a file, the last ``keep`` bytes
    are read back, and the result says how much there was."""
    script = "head -c 20000000 /dev/zero | tr '\\0' x; echo; echo the end; echo oops >&2"
    tracemalloc.start()
    try:
        done = process.run(["sh", "-c", script], 30, keep=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert done.ok
    assert done.stdout_size == 20_000_000 + len("\nthe end\n")
    assert len(done.stdout) == 1000
    assert done.stdout.endswith("xxx\nthe end\n")
    assert (done.stderr, done.stderr_size) == ("oops\n", 5)
    assert peak < 200_000


def test_what_a_command_leaves_running_in_the_background_is_left_alone(tmp_path: Path) -> None:
    """A reload may start a daemon, which keeps the output file open: the run ends when the
    command does, and the daemon goes on."""
    pidfile = tmp_path / "daemon"
    started = time.monotonic()
    done = process.run(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; echo started"], 10)
    took = time.monotonic() - started
    [daemon] = read_pids(pidfile, 1)
    try:
        assert done.ok and done.stdout == "started\n"
        assert took < 2
        assert alive(daemon)
    finally:
        os.kill(daemon, signal.SIGKILL)


def test_the_child_gets_its_environment_directory_and_an_empty_stdin(tmp_path: Path) -> None:
    script = "echo $GREETING; pwd; cat"  # cat: stdin is empty, not the terminal
    done = process.run(
        ["sh", "-c", script], 5, env={"GREETING": "hello", "PATH": os.defpath}, cwd=tmp_path
    )
    assert done.ok
    assert done.stdout == f"hello\n{tmp_path}\n"


def test_a_program_that_cannot_be_started_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        process.run([str(tmp_path / "no-such-program")], 5)
    text = tmp_path / "not-executable"
    text.write_text(textwrap.dedent("#!/bin/sh\ntrue\n"))
    with pytest.raises(PermissionError):
        process.run([str(text)], 5)

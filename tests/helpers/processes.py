"""Helpers for tests that watch processes: ``mapsync`` started in the background in a process
group of its own, and its children (rsync, ssh, hooks) as /proc shows them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Cluster


@dataclass(frozen=True)
class Process:
    """A process seen in /proc; ``started`` (clock ticks after boot) tells a reused pid apart."""

    pid: int
    name: str
    started: str

    def running(self) -> bool:
        st = _proc_stat(self.pid)
        return st is not None and st[20] == self.started and st[1] != "Z"


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 2 on: [comm, state, ppid, pgrp, ...]; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    close = text.rindex(")")
    return [text[text.index("(") + 1 : close], *text[close + 2 :].split()]


def processes(*, parent: int | None = None, group: int | None = None) -> list[Process]:
    """The live processes whose parent is ``parent`` and/or whose process group is ``group``."""
    found = []
    for entry in os.listdir("/proc"):
        st = _proc_stat(int(entry)) if entry.isdigit() else None
        if st is None or st[1] == "Z":
            continue
        if (parent is None or int(st[2]) == parent) and (group is None or int(st[3]) == group):
            found.append(Process(int(entry), st[0], st[20]))
    return found


@contextmanager
def started(cluster: Cluster, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``mapsync ARGS`` running in the background, in a process group of its own: what is left
    of it when the test ends (a test that failed) is killed, the rsyncs it started with it."""
    argv = [sys.executable, "-m", "mapsync", "--config", str(cluster.config_path), *args]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def wait_for_children(
    proc: subprocess.Popen[str], name: str, count: int, timeout: float = 30
) -> list[Process]:
    """The children named ``name`` of ``proc``, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in processes(parent=proc.pid) if p.name == name]
        if len(found) >= count:
            return found
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"{len(found)} {name} processes, not {count}:\n{out}\n{err}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    st = _proc_stat(pid)
    return st is not None and st[1] != "Z"


def gone_within(pids: list[int], seconds: float) -> list[int]:
    """The processes of ``pids`` still alive after waiting up to ``seconds`` for them to end
    (killing is immediate, but the kernel reaps a killed process's children a moment later)."""
    deadline = time.monotonic() + seconds
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def read_pids(path: Path, count: int, timeout: float = 10) -> list[int]:
    """The ``count`` pids a test's shell script writes to ``path``, one a line, once it has."""
    deadline = time.monotonic() + timeout
    while True:
        with suppress(FileNotFoundError):
            text = path.read_text()
            if len(text.split()) >= count and text.endswith("\n"):
                return [int(n) for n in text.split()[:count]]
        if time.monotonic() > deadline:
            pytest.fail(f"{path}: no {count} pids after {timeout}s")
        time.sleep(0.01)


@dataclass
class Ended:
    """How a process ended on SIGTERM: its output, the seconds it took, the children of
    ``children`` still running once it had exited."""

    out: str
    err: str
    took: float
    left: list[Process]


def terminated(proc: subprocess.Popen[str], children: list[Process]) -> Ended:
    """SIGTERM to ``proc``; wait for it (at most 30 s) and tell how it ended."""
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - signalled
    return Ended(out, err, took, [p for p in children if p.running()])

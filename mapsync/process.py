"""The one way mapsync runs a child process: rsync, a channel's ``check`` and ``reload`` hook.

:func:`run` starts ``argv`` (no shell, stdin empty) in a session of its own, so the child and
everything it starts (an ``sh -c``'s children, rsync's ssh) form one process group, and ends
it by one of three ways:

- it exits by itself: the result says how (``exit 3``, ``killed by signal 9 (SIGKILL)``);
  whatever it left running in the background is left alone (a reload may start a daemon);
- it outlives ``timeout`` seconds: the whole group is killed (SIGKILL) and the result says
  ``timed out``;
- SIGTERM/SIGHUP (the SystemExit of :mod:`mapsync.signals`) or ^C ends the run while it
  waits, or the :class:`Job` it belongs to is stopped from another thread: the whole group is
  ended (SIGTERM, then SIGKILL after ``grace`` seconds; at once when ``grace`` is 0) before
  the exception goes on, so no child outlives the run that let go of its lock.

Output goes to unlinked temporary files, not pipes: a chatty command cannot grow memory, a
background daemon holding the descriptor cannot hang the run, and only the last ``keep``
bytes of each stream are read back.

The wait is exact, not a poll: the waiting thread blocks in ``waitid(WNOWAIT)`` (a signal
interrupts it) and a timer thread kills the group at the timeout. The child is signalled only
before it is reaped (its pid, the group's id, cannot be reused until then), so a group signal
never reaches a stranger.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mapsync import signals

KEEP = 64 * 1024  # bytes of each stream read back by default (the tail)


@dataclass(frozen=True)
class Finished:
    """How a child ended: its return code (negative: the signal that ended it), whether it was
    killed at its timeout, and the tail of what it wrote (``*_size``: all it wrote)."""

    argv: tuple[str, ...]
    returncode: int
    timeout: float
    timed_out: bool = False
    stopped: bool = False  # its Job was stopped while it ran
    stdout: str = ""
    stderr: str = ""
    stdout_size: int = 0
    stderr_size: int = 0

    @property
    def ok(self) -> bool:
        """It exited 0 in time."""
        return self.returncode == 0 and not self.timed_out

    @property
    def how(self) -> str:
        """``exit 1``, ``killed by signal 9 (SIGKILL)``, or ``timed out after 60s``."""
        if self.timed_out:
            return f"timed out after {seconds(self.timeout)}s"
        return signals.describe_exit(self.returncode)


def seconds(value: float) -> str:
    """``60`` for 60 or 60.0, ``0.5`` for 0.5: a timeout as a person writes it."""
    return str(int(value)) if float(value).is_integer() else str(value)


class Job:
    """The children of one job that runs several at once (a channel's push to its nodes, one
    thread each; a poll the agent may have to end), so that another thread can end them all:
    :meth:`stop` ends the running ones, and any started after it is ended at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[_Child] = set()
        self.stopped = False
        self.reason = "the run was interrupted"  # what a stopped child's caller may say

    def _add(self, child: _Child) -> bool:
        with self._lock:
            if not self.stopped:
                self._running.add(child)
            return not self.stopped

    def _discard(self, child: _Child) -> None:
        with self._lock:
            self._running.discard(child)

    def stop(self, grace: float = 2.0, reason: str | None = None) -> None:
        """End every running child with its process group: SIGTERM (rsync removes its
        temporary file), then SIGKILL for any still running after ``grace`` seconds.
        ``reason``: why, for the callers of the children it ends."""
        with self._lock:
            self.stopped = True
            if reason is not None:
                self.reason = reason
            children = list(self._running)
        for child in children:
            child.stopped = True
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            child.exited.wait(max(0.0, deadline - time.monotonic()))
        for child in children:
            child.signal(signal.SIGKILL)


def run(
    argv: list[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    keep: int = KEEP,
    grace: float = 0.0,
    job: Job | None = None,
) -> Finished:
    """Run ``argv`` (no shell, stdin empty) for at most ``timeout`` seconds; see the module.

    ``keep``: bytes of each stream's tail in the result. ``grace``: how long an interrupted
    child gets between SIGTERM and SIGKILL (0: SIGKILL at once). ``job``: the Job whose
    :meth:`Job.stop` may end it. Raises OSError (FileNotFoundError: no such program) when
    the child cannot be started."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = _start(argv, out, err, env, cwd, grace)
        if job is not None and not job._add(child):
            child.stopped = True
            child.signal(signal.SIGTERM)  # the job was stopped while this one started
        try:
            child.wait(timeout)
        except BaseException:
            # SIGTERM/SIGHUP (the SystemExit of mapsync.signals) or ^C: the child and what it
            # started must not outlive the run (rsync writing into a staging area let go of,
            # a check judging a set no longer there).
            child.end(grace)
            raise
        finally:
            if job is not None:
                job._discard(child)
        stdout, stdout_size = _tail(out, keep)
        stderr, stderr_size = _tail(err, keep)
    return Finished(
        tuple(argv),
        child.proc.returncode,
        timeout,
        timed_out=child.timed_out,
        stopped=child.stopped,
        stdout=stdout,
        stderr=stderr,
        stdout_size=stdout_size,
        stderr_size=stderr_size,
    )


def _start(
    argv: list[str],
    out: IO[bytes],
    err: IO[bytes],
    env: Mapping[str, str] | None,
    cwd: Path | None,
    grace: float,
) -> _Child:
    proc: subprocess.Popen[bytes] | None = None
    try:
        with signals.held():  # a signal now would leave the child running without a handle
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group, ended as a whole
            )
    except BaseException:
        if proc is not None:  # started, and a signal that came meanwhile ends the run
            _Child(proc).end(grace)
        raise
    return _Child(proc)


class _Child:
    """A started child: its process group is signalled only while it has not been seen to
    exit (it is reaped after that), so a signal never reaches a reused process group."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.exited = threading.Event()
        self.timed_out = False
        self.stopped = False
        self._lock = threading.Lock()

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to the whole group unless the child has exited; whether it was sent."""
        with self._lock:
            if self.exited.is_set():
                return False
            _killpg(self.proc.pid, sig)
            return True

    def _expire(self) -> None:
        with self._lock:
            if self.exited.is_set():
                return
            self.timed_out = True
            _killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> None:
        """Wait until the child exits, killing its group at ``timeout``; then reap it."""
        timer = threading.Timer(timeout, self._expire)
        timer.daemon = True
        timer.start()
        try:
            _wait_exited(self.proc.pid)
        finally:
            timer.cancel()
        with self._lock:
            self.exited.set()
        self.proc.wait()

    def end(self, grace: float) -> None:
        """End the child and its group (SIGTERM, SIGKILL after ``grace``; SIGKILL at once if
        ``grace`` is 0) and reap it, whatever comes meanwhile (a second signal)."""
        try:
            if grace > 0 and self.signal(signal.SIGTERM):
                deadline = time.monotonic() + grace
                while not _has_exited(self.proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.01)
        finally:
            # Whatever of the group is left (rsync's ssh, an sh's children) goes too; the
            # child is not reaped yet, so the group is still this one.
            with self._lock:
                if not self.exited.is_set():
                    _killpg(self.proc.pid, signal.SIGKILL)
                self.exited.set()
            self.proc.wait()


def _wait_exited(pid: int) -> None:
    """Block until child ``pid`` has exited, leaving it unreaped (its pid stays ours)."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _has_exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, leaving it unreaped."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(f: IO[bytes], keep: int) -> tuple[str, int]:
    """The last ``keep`` bytes written to ``f`` (decoded, undecodable bytes replaced), and how
    many bytes were written in all."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - keep))
    return f.read().decode("utf-8", "replace"), size

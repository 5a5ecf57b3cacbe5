"""The commands a channel runs around a swap: the ``check`` of a built set before it goes live,
and the ``reload`` hook once after (``postfix reload``).

Both are argv lists run without a shell, stdin empty, with a timeout from the channel's
config. A command that outlives its timeout, or is still running when a signal (or ^C) ends
the agent, is killed with everything it started (it runs in its own process group), so a
``sh -c`` does not leave its children running. One that exits in time is left alone, with
whatever it started in the background (a reload may start a daemon).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mapsync import log, signals
from mapsync.config import AgentChannel
from mapsync.errors import InstallError

_log = log.get("agent")
DIR = "{dir}"  # in a check's arguments: the directory of the built set
_TAIL = 500  # characters of a failed command's output kept for the log and the error
# What a failed command that printed nothing said: daemons such as `postfix reload` log their
# reasons to syslog, not to the terminal.
SILENT = "no output; it may have logged the reason to syslog (journalctl, /var/log/mail.log)"


@dataclass(frozen=True)
class Ran:
    """How a command ended. ``failure`` is None when it exited 0, else what went wrong."""

    failure: str | None
    exit: int | None = None
    output: str = ""  # the tail of stderr, else of stdout


def run_command(argv: list[str], timeout: int) -> Ran:
    """Run ``argv`` (no shell, stdin empty) for at most ``timeout`` seconds.

    Output goes to unlinked temporary files, not pipes: a chatty command cannot grow the
    agent's memory, and only the tail is read back."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc: subprocess.Popen[bytes] | None = None
        try:
            with signals.held():  # a signal now would leave the command running without a handle
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # its own process group: killed whole on a timeout
                )
        except FileNotFoundError:
            return Ran("not found")
        except OSError as exc:  # not executable, not a program
            return Ran(f"could not be started ({exc.strerror or exc})")
        except BaseException:
            if proc is not None:  # started, and a signal that came meanwhile ends the run
                _kill_group(proc)
            raise
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Ran(f"timed out after {timeout}s", None, _tail(err) or _tail(out))
        except BaseException:
            # SIGTERM/SIGHUP (the SystemExit of mapsync.signals) or ^C: the command and what
            # it started must not outlive the run (a check would judge a set no longer there).
            _kill_group(proc)
            raise
        tail = _tail(err) or _tail(out)
    if proc.returncode != 0:
        return Ran(signals.describe_exit(proc.returncode), proc.returncode, tail)
    return Ran(None, 0, tail)


def _exited(ran: Ran) -> bool:
    """It ran and exited non-zero by itself (not killed by a signal, not timed out)."""
    return ran.exit is not None and ran.exit > 0


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(f: IO[bytes]) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 4 * _TAIL))
    return f.read().decode("utf-8", "replace").strip()[-_TAIL:]


def reload_failure(ch: AgentChannel) -> str | None:
    """Run ``ch.reload``; None when it succeeded or there is none, else what went wrong
    (``"exit 1: ..."``, ``"killed by signal 9 (SIGKILL)"``, ``"timed out after 60s"``,
    ``"not found"``)."""
    if not ch.reload:
        return None
    command = list(ch.reload)
    ran = run_command(command, ch.reload_timeout)
    if ran.failure is None:
        _log.info("reload hook ran", channel=ch.name, command=command)
        return None
    said = ran.output or (SILENT if _exited(ran) else "")
    _log.error(
        "reload hook failed",
        reason=ran.failure,
        channel=ch.name,
        command=command,
        timeout=ch.reload_timeout,
        stderr=said,
    )
    return f"{ran.failure}: {said}" if said else ran.failure


def run_check(ch: AgentChannel, directory: Path, serial: int) -> None:
    """Run ``ch.check`` against the built set in ``directory`` (every ``{dir}`` in its
    arguments becomes that path) before it is swapped in; raise InstallError unless it exits 0.
    """
    if not ch.check:
        return
    argv = [arg.replace(DIR, str(directory)) for arg in ch.check]
    ran = run_command(argv, ch.check_timeout)
    if ran.failure is None:
        _log.info("check passed", channel=ch.name, serial=serial, command=argv)
        return
    _log.error(
        "check failed; not installing",
        reason=ran.failure,
        channel=ch.name,
        serial=serial,
        command=argv,
        timeout=ch.check_timeout,
        stderr=ran.output or (SILENT if _exited(ran) else ""),
    )
    said = ""
    if ran.output:
        said = f": {' '.join(ran.output.split())}"
    elif _exited(ran):
        said = f" ({SILENT})"
    elif ran.exit is not None:
        said = " (no output)"
    raise InstallError(
        f"channel {ch.name}: serial {serial} refused by the check command "
        f"`{shlex.join(ch.check)}`: {ran.failure}{said}; not installed, the old set keeps serving"
    )

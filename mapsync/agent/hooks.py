"""The commands a channel runs around a swap: the ``check`` of a built set before it goes live,
and the ``reload`` hook once after (``postfix reload``).

Both are argv lists run by :func:`mapsync.process.run` (no shell, stdin empty) with a timeout
from the channel's config. A command that outlives its timeout, or is still running when a
signal (or ^C) ends the agent, is killed with everything it started (it runs in its own
process group), so a ``sh -c`` does not leave its children running. One that exits in time
is left alone, with whatever it started in the background (a reload may start a daemon).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from mapsync import log, process
from mapsync.agent.state import SAID
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
    """Run ``argv`` (no shell, stdin empty) for at most ``timeout`` seconds with
    :func:`mapsync.process.run`: only the tail of its output is read back."""
    try:
        done = process.run(argv, timeout, keep=4 * _TAIL)
    except FileNotFoundError:
        return Ran("not found")
    except OSError as exc:  # not executable, not a program
        return Ran(f"could not be started ({exc.strerror or exc})")
    tail = done.stderr.strip()[-_TAIL:] or done.stdout.strip()[-_TAIL:]
    if done.timed_out:
        return Ran(done.how, None, tail)
    if done.returncode != 0:
        return Ran(done.how, done.returncode, tail)
    return Ran(None, 0, tail)


def _exited(ran: Ran) -> bool:
    """It ran and exited non-zero by itself (not killed by a signal, not timed out)."""
    return ran.exit is not None and ran.exit > 0


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
    said = output = ""
    if ran.output:
        output = f"{SAID}{' '.join(ran.output.split())}"
    elif _exited(ran):
        said = f" ({SILENT})"
    elif ran.exit is not None:
        said = " (no output)"
    raise InstallError(
        f"channel {ch.name}: serial {serial} refused by the check command "
        f"`{shlex.join(ch.check)}`: {ran.failure}{said}; not installed, the old set keeps "
        f"serving{output}"
    )

"""Reload hooks: the command a channel runs once after each swap (``postfix reload``)."""

from __future__ import annotations

import subprocess

from mapsync import log
from mapsync.config import AgentChannel

_log = log.get("agent")
HOOK_TIMEOUT = 60


def run_reload(ch: AgentChannel) -> bool:
    """Run ``ch.reload`` (argv, no shell); True when it succeeded or there is none."""
    if not ch.reload:
        return True
    try:
        proc = subprocess.run(
            list(ch.reload), capture_output=True, text=True, timeout=HOOK_TIMEOUT, check=False
        )
    except FileNotFoundError:
        _log.error("reload hook not found", channel=ch.name, command=list(ch.reload))
        return False
    except subprocess.TimeoutExpired:
        _log.error(
            "reload hook timed out", channel=ch.name, command=list(ch.reload), timeout=HOOK_TIMEOUT
        )
        return False
    if proc.returncode != 0:
        _log.error(
            "reload hook failed",
            channel=ch.name,
            command=list(ch.reload),
            exit=proc.returncode,
            stderr=proc.stderr.strip()[-500:],
        )
        return False
    _log.info("reload hook ran", channel=ch.name, command=list(ch.reload))
    return True

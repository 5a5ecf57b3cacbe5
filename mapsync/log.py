"""Logging through structlog: a console renderer for people, JSON lines for machines.

structlog is imported on the first log line that passes the level, not at start: its import
brings asyncio and ssl (50 ms), a sixth of a publish or a pull that finds nothing changed and
logs nothing.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

# (level, format) given to configure() and not yet applied to structlog, which is not yet
# imported; applied by _apply() on the first log line at or above ``level``.
_pending: tuple[int, str] | None = None
# The format configure() was given: whether log lines are JSON (see is_json).
_json = False
# Method → level, for dropping a line below the pending level without importing structlog.
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure(level: int = logging.INFO, fmt: str = "console") -> None:
    """Send structured log events to stderr at ``level`` as ``console`` or ``json`` (applied
    to structlog at once if it is imported already, else with the first line logged)."""
    global _pending, _json
    _pending = (level, fmt)
    _json = fmt == "json"
    if "structlog" in sys.modules:
        ensure()


def is_json() -> bool:
    """Whether log lines go out as JSON (``--log-format json``, the default under systemd):
    then whatever a command tells on standard error must be a log line too."""
    return _json


def ensure() -> None:
    """Apply the configuration :func:`configure` deferred, if any (before touching structlog's
    configuration directly)."""
    global _pending
    if _pending is None:
        return
    level, fmt = _pending
    _pending = None
    import structlog

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _drop(*args: Any, **kw: Any) -> None:
    return None


class _Logger:
    """A structlog logger bound to ``component``, made on first use (see the module's note)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._real: Any = None

    def __getattr__(self, method: str) -> Any:
        if _pending is not None and _LEVELS.get(method, logging.CRITICAL) < _pending[0]:
            return _drop  # below the level: structlog would drop it too
        if self._real is None:
            ensure()
            import structlog

            self._real = structlog.get_logger(component=self._name)
        return getattr(self._real, method)


def get(name: str) -> Any:
    """A logger bound to the component ``name`` (publisher, agent, transport, ...)."""
    return _Logger(name)

"""Logging through structlog: a console renderer for people, JSON lines for machines."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(level: int = logging.INFO, fmt: str = "console") -> None:
    """Send structured log events to stderr at ``level`` as ``console`` or ``json``."""
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


def get(name: str) -> Any:
    """A logger bound to the component ``name`` (publisher, agent, transport, ...)."""
    return structlog.get_logger(component=name)

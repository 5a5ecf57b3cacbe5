"""Progress of long operations: seeding, a full publish, a first pull at scale.

Core code reports through :func:`track` and :func:`report` and prints nothing; the CLI installs
a reporter that draws on a terminal (:mod:`mapsync.cli.progress`). Without a reporter (cron,
systemd, tests) :func:`track` hands the iterable back untouched, so it costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
Reporter = Callable[[str, int, int | None], None]
"""``reporter(stage, done, total)``; ``total`` is None when it is not known in advance."""

EVERY = 50_000  # items between two reports: cheap against rows that cost microseconds each
_reporter: Reporter | None = None


def install(reporter: Reporter | None) -> None:
    """Send progress to ``reporter`` from now on (None: stop reporting)."""
    global _reporter
    _reporter = reporter


def reporting() -> bool:
    """Whether a reporter is installed (a total worth a query to know, say)."""
    return _reporter is not None


def report(stage: str, done: int, total: int | None = None) -> None:
    """Tell the installed reporter (if any) that ``stage`` has done ``done`` of ``total``."""
    if _reporter is not None:
        _reporter(stage, done, total)


def track(items: Iterable[T], stage: str, total: int | None = None) -> Iterable[T]:
    """``items``, reporting every :data:`EVERY` items and once at the end under ``stage``."""
    if _reporter is None:
        return items
    return _tracked(items, stage, total, _reporter)


def _tracked(items: Iterable[T], stage: str, total: int | None, reporter: Reporter) -> Iterator[T]:
    done = 0
    reporter(stage, 0, total)
    for item in items:
        yield item
        done += 1
        if done % EVERY == 0:
            reporter(stage, done, total)
    reporter(stage, done, done)  # finished: the total is now known

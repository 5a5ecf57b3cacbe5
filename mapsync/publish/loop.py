"""The long-running publisher (``publish --interval``): one run, then sleep, then again."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NoReturn

from mapsync import interval
from mapsync.publish.watch import DatabaseWatch


def run_every(seconds: float, run: Callable[[], object], database: str | None = None) -> NoReturn:
    """Call ``run`` every ``seconds``, logging any error, until SIGTERM/SIGHUP ends it with
    exit 128+n (:func:`mapsync.interval.run_every`): a release appears whole or not at all.
    A commit to the SQLite file ``database`` (a URL) starts the next run at once
    (:mod:`mapsync.publish.watch`)."""
    wake = threading.Event()
    watch = DatabaseWatch(database or "", wake)
    if not watch.check() and watch.path is None:  # not a SQLite file: polled
        interval.run_every(seconds, run, logger="publisher", what="publish")

    def watched_run() -> object:
        watch.check()  # the directory replaced, or not watchable until now: watched again
        return run()

    interval.run_every(seconds, watched_run, logger="publisher", what="publish", wake=wake)

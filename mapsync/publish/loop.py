"""The long-running publisher (``publish --interval``): one run, then sleep, then again."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from mapsync import interval


def run_every(seconds: float, run: Callable[[], object]) -> NoReturn:
    """Call ``run`` every ``seconds``, logging any error, until SIGTERM/SIGHUP ends it with
    exit 128+n (:func:`mapsync.interval.run_every`): a release appears whole or not at all."""
    interval.run_every(seconds, run, logger="publisher", what="publish")

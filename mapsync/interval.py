"""Long-running loops (``publish --interval``, ``mirror --interval``): one run, sleep, again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NoReturn

from mapsync import log, signals
from mapsync.errors import EXIT_ERROR, MapsyncError

# Sleep in slices this long when a watch may wake the loop: a signal that another thread
# takes (the watch's) is handled in the main thread only once it runs again.
SIGNAL_CHECK = 0.2
# After a run the watch woke, run once more this much later: the event may come before what
# it announces can be read (a SQLite commit in WAL mode writes its log, then syncs it, then
# makes it visible; mapsync.publish.watch).
RECHECK = 0.25


def run_every(
    interval: float,
    run: Callable[[], object],
    *,
    logger: str,
    what: str,
    wake: threading.Event | None = None,
) -> NoReturn:
    """Call ``run`` every ``interval`` seconds, logging any error, until SIGTERM/SIGHUP ends
    it with exit 128+n: at once between runs; inside a run by SystemExit, whose staging and
    temp files are removed on the way out. ``logger``: the log's name; ``what``: the run in
    the log's words (``publish``, ``mirror``). ``wake``: set by another thread (a watch of
    the database) to start the next run before the interval is up; set during a run, it
    starts the next one as soon as that run ends; a run it woke is followed by one more,
    :data:`RECHECK` seconds later."""
    _log = log.get(logger)
    _log.info(f"{what}ing on an interval", seconds=interval)
    woken = False
    while True:
        if wake is not None:
            wake.clear()  # what comes during the run wakes the next one
        started = time.monotonic()
        try:
            run()
        except (MapsyncError, OSError) as exc:
            signals.stop_if_received()  # the run was ended by a signal; the error is a symptom
            _log.error(
                str(exc),
                error=type(exc).__name__,
                exit=getattr(exc, "exit_code", EXIT_ERROR),
                next_run_in=interval,
            )
        except Exception:
            signals.stop_if_received()  # SystemExit turned into another error by a C extension
            # A bug or an unforeseen damaged file: this run failed (exit 2), the next may not;
            # a long-running process that died here would leave every node to expire.
            _log.exception(f"{what} run crashed", exit=EXIT_ERROR, next_run_in=interval)
        signals.stop_if_received()  # a SystemExit swallowed in a gc callback
        took = time.monotonic() - started
        _log.debug(f"{what} run done", seconds=round(took, 3))
        if wake is None:
            time.sleep(max(0.0, interval - took))
            continue
        deadline = started + interval
        if woken:
            deadline = min(deadline, time.monotonic() + RECHECK)
        woken = False
        while (left := deadline - time.monotonic()) > 0:
            if wake.wait(min(left, SIGNAL_CHECK)):
                woken = True
                break

"""Progress on a terminal: one line per stage, redrawn in place at most ten times a second.

Only when standard error is a terminal: under cron or systemd the structured log says what
happened, and carriage-return lines would only clutter the journal.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from mapsync import progress


class TerminalProgress:
    """A :data:`mapsync.progress.Reporter` that draws ``stage: done/total (pct%)`` lines."""

    def __init__(self, stream: TextIO, interval: float = 0.1) -> None:
        self.stream = stream
        self.interval = interval
        self._stage: str | None = None
        self._drawn = 0.0
        self._width = 0

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        finished = total is not None and done >= total
        now = time.monotonic()
        if stage == self._stage and not finished and now - self._drawn < self.interval:
            return
        if self._stage is not None and stage != self._stage:
            self.stream.write("\n")  # the previous stage ended without saying so
        line = f"  {stage}: {done:,}"
        if total is not None:
            line += f"/{total:,}" + (f" ({100 * done // total}%)" if total else "")
        self.stream.write("\r" + line.ljust(self._width))
        self._width = len(line)
        if finished:
            self.stream.write("\n")
            self._stage, self._width = None, 0
        else:
            self._stage = stage
        self._drawn = now
        self.stream.flush()

    def close(self) -> None:
        """End the progress line in progress, if one is drawn."""
        if self._stage is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._stage = None


def on_terminal(stream: TextIO | None = None) -> TerminalProgress | None:
    """Install a terminal reporter when ``stream`` (standard error) is a terminal."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return None
    reporter = TerminalProgress(stream)
    progress.install(reporter)
    return reporter

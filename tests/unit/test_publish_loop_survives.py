"""``publish --interval`` survives any single failed run, as the agent loop does."""

from __future__ import annotations

import logging

import pytest
import structlog

from mapsync import log
from mapsync.publish.loop import run_every


def test_a_run_that_crashes_is_logged_and_the_next_run_comes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runs: list[int] = []

    def run() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise ValueError("time data 'yesterday' does not match format")  # an unforeseen bug
        raise SystemExit(143)  # as SIGTERM ends the loop

    log.configure(logging.INFO)  # as main() does
    try:
        with pytest.raises(SystemExit) as stopped:
            run_every(1, run)
    finally:
        structlog.reset_defaults()
    assert stopped.value.code == 143
    assert runs == [0, 1]
    err = capsys.readouterr().err
    assert "publish run crashed" in err and "exit=2" in err and "ValueError" in err

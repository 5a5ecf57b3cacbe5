"""``publish --interval`` survives any single failed run, as the agent loop does."""

from __future__ import annotations

import argparse
import logging

import pytest
import structlog

from mapsync import log
from mapsync.cli import commands
from mapsync.cli.main import _parser
from tests.conftest import Cluster


def test_a_run_that_crashes_is_logged_and_the_next_run_comes(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs: list[int] = []

    def run(args: argparse.Namespace, *, loop: bool = False) -> int:
        runs.append(len(runs))
        if len(runs) == 1:
            raise ValueError("time data 'yesterday' does not match format")  # an unforeseen bug
        raise SystemExit(143)  # as SIGTERM ends the loop

    monkeypatch.setattr(commands, "_publish_once", run)
    args = _parser().parse_args(
        ["--config", str(cluster.config_path), "publish", "--interval", "1"]
    )
    log.configure(logging.INFO)  # as main() does
    try:
        with pytest.raises(SystemExit) as stopped:
            commands._publish_every(args)
    finally:
        structlog.reset_defaults()
    assert stopped.value.code == 143
    assert runs == [0, 1]
    err = capsys.readouterr().err
    assert "publish run crashed" in err and "exit=2" in err and "ValueError" in err

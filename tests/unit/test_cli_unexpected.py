"""An error nobody foresaw still exits 2 (error) with one line, never 1: monitoring reads a
traceback's exit 1 as WARNING. The traceback is there for ``-v``."""

from __future__ import annotations

import argparse

import pytest

from mapsync.cli import commands
from mapsync.cli.main import main


def _boom(args: argparse.Namespace) -> int:
    raise RuntimeError("surprise\nsecond line of a long message")


@pytest.fixture
def broken_status(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake on purpose: no real input is known to reach this path (that is the point).
    monkeypatch.setattr(commands, "cmd_status", _boom)


@pytest.mark.usefixtures("broken_status")
def test_an_unexpected_error_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "/nonexistent.toml", "status"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "mapsync: unexpected error: RuntimeError: surprise (run with -v for the traceback)"
    ]


@pytest.mark.usefixtures("broken_status")
def test_verbose_shows_the_traceback_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "--config", "/nonexistent.toml", "status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):"), err
    assert "in _boom" in err
    assert err.splitlines()[-1] == "mapsync: unexpected error: RuntimeError: surprise"


@pytest.mark.usefixtures("broken_status")
def test_json_logs_get_one_event(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--log-format", "json", "--config", "/nonexistent.toml", "status"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert '"unexpected error: RuntimeError: surprise"' in err and '"exit": 2' in err

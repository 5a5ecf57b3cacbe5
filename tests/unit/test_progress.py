"""Progress reporting: free without a reporter, periodic with one, tidy on a terminal."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from mapsync import progress
from mapsync.cli.progress import TerminalProgress


@pytest.fixture
def seen() -> Iterator[list[tuple[str, int, int | None]]]:
    calls: list[tuple[str, int, int | None]] = []
    progress.install(lambda stage, done, total: calls.append((stage, done, total)))
    yield calls
    progress.install(None)


def test_without_a_reporter_the_iterable_is_handed_back_untouched() -> None:
    items = [1, 2, 3]
    assert progress.track(items, "x", 3) is items


def test_reports_at_start_every_chunk_and_at_the_end(
    seen: list[tuple[str, int, int | None]],
) -> None:
    n = progress.EVERY * 2 + 7
    assert sum(progress.track(range(n), "cdb recipients", n)) == sum(range(n))
    assert seen == [
        ("cdb recipients", 0, n),
        ("cdb recipients", progress.EVERY, n),
        ("cdb recipients", 2 * progress.EVERY, n),
        ("cdb recipients", n, n),
    ]


def test_an_unknown_total_becomes_known_at_the_end(seen: list[tuple[str, int, int | None]]) -> None:
    list(progress.track(iter("abc"), "rows"))
    assert seen == [("rows", 0, None), ("rows", 3, 3)]


def test_terminal_lines_end_per_stage_and_show_percent() -> None:
    out = io.StringIO()
    tp = TerminalProgress(out, interval=0)
    tp("render recipients", 0, 200)
    tp("render recipients", 100, 200)
    tp("render recipients", 200, 200)
    tp("rows", 5, None)
    tp("cdb virtual", 1, 4)  # a new stage ends the unfinished line before it
    tp.close()
    lines = out.getvalue().split("\n")
    assert lines[0].split("\r")[-1].strip() == "render recipients: 200/200 (100%)"
    assert "render recipients: 100/200 (50%)" in lines[0]
    assert lines[1].split("\r")[-1].strip() == "rows: 5"
    assert lines[2].split("\r")[-1].strip() == "cdb virtual: 1/4 (25%)"
    assert lines[3] == ""


def test_terminal_redraws_are_throttled() -> None:
    out = io.StringIO()
    tp = TerminalProgress(out, interval=3600)
    for done in range(1000):
        tp("rows", done, 10_000)
    tp("rows", 10_000, 10_000)
    assert out.getvalue().count("\r") == 2  # the first draw and the finish

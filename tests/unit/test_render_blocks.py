"""The publisher's last line of defence, checked a block at a time, refuses exactly what the
row-by-row check refuses, with the same message, and writes the same bytes."""

from __future__ import annotations

import sys

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import mapsync.publish.publisher as publisher
from mapsync.errors import InvalidData

BREAKERS = " \t\r\n\0\x0b\x0c\x1c\x1f\x85\xa0\u2028,:#é"
TEXT = st.one_of(
    st.text(alphabet="ab.@-é", min_size=1, max_size=4),  # mostly valid, some U-labels
    st.text(alphabet="ab.@-" + BREAKERS, max_size=4),
)
ROWS = st.lists(st.tuples(TEXT, TEXT), max_size=40)


def _outcome(render: object) -> tuple[str, str]:
    try:
        return "ok", "".join(render())  # type: ignore[operator]
    except InvalidData as exc:
        return "refused", str(exc)


@pytest.mark.parametrize("sep", [" ", ":"])
@settings(max_examples=400, deadline=None)
@given(rows=ROWS, block=st.integers(min_value=1, max_value=7))
def test_block_checks_refuse_what_line_checks_refuse(
    sep: str, rows: list[tuple[str, str]], block: int
) -> None:
    rows = sorted(rows)
    publisher._BLOCK, saved = block, publisher._BLOCK
    try:
        by_block = _outcome(lambda: (body for _, body in publisher._blocks(rows, "m", sep)))
    finally:
        publisher._BLOCK = saved
    assert by_block == _outcome(lambda: publisher._lines(rows, "m", sep))
    event(by_block[0])


def test_the_key_breakers_are_what_the_line_check_refuses() -> None:
    refused = {c for c in map(chr, range(sys.maxunicode + 1)) if publisher._BAD_KEY.search(c)}
    assert refused == set(publisher._KEY_BREAKERS) | {"\n", "#"}

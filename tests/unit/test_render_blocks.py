"""The publisher's last line of defence, checked a block at a time, refuses exactly what the
row-by-row check refuses, with the same message, and writes the same bytes."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mapsync.errors import InvalidData
from mapsync.formats import mapfile

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
    by_block = _outcome(lambda: (body for _, body in mapfile.blocks(rows, "m", sep, block)))
    assert by_block == _outcome(lambda: mapfile.lines(rows, "m", sep))
    event(by_block[0])


def test_the_key_breakers_are_what_the_line_check_refuses() -> None:
    refused = {c for c in map(chr, range(sys.maxunicode + 1)) if mapfile.BAD_KEY.search(c)}
    assert refused == set(mapfile.KEY_BREAKERS) | {"\n", "#"}


@pytest.mark.parametrize("sep", [" ", ":"])
@settings(max_examples=200, deadline=None)
@given(rows=ROWS)
def test_a_written_map_is_the_sorted_lines_or_the_same_refusal(
    sep: str, rows: list[tuple[str, str]]
) -> None:
    expected = _outcome(lambda: mapfile.lines(sorted(rows), "m", sep))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m"
        try:
            info, cdb_info = mapfile.write_map(iter(rows), path, "# m\n", sep, "cdb m")
        except InvalidData as exc:
            assert expected == ("refused", str(exc))
            return
        assert expected == ("ok", path.read_text()[len("# m\n") :])
        assert info.entries == len(rows)
        assert cdb_info is not None and not path.with_name("m.cdb").exists()


def test_pairs_of_a_duplicated_key_are_refused_naming_the_first_offender(
    tmp_path: Path,
) -> None:
    # Sorted whole, ("k", "a\n") comes first and is refused for its value, not as a duplicate.
    rows = [("k", "b"), ("k", "a\n")]
    with pytest.raises(InvalidData) as info:
        mapfile.write_map(rows, tmp_path / "m", "# m\n", " ", None)
    assert info.value.problems == ["map m: value of 'k' contains a line break or NUL"]


@pytest.mark.parametrize("sep", [" ", ":"])
@settings(max_examples=100, deadline=None)
@given(keys=st.lists(TEXT, max_size=40), value=TEXT, block=st.integers(min_value=1, max_value=7))
def test_a_map_of_one_value_written_from_its_keys_is_the_same_map(
    sep: str, keys: list[str], value: str, block: int
) -> None:
    """write_map(keys, value=v) (recipients: every value "OK") writes the bytes, the cdb and
    the refusals of write_map over the (key, v) pairs."""
    pairs = [(k, value) for k in keys]
    assert _outcome(
        lambda: (b for _, b in mapfile.key_blocks(sorted(keys), value, "m", sep, block))
    ) == _outcome(lambda: (b for _, b in mapfile.blocks(sorted(pairs), "m", sep, block)))
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows, one in ((iter(pairs), None), (iter(keys), value)):
            path = Path(tmp) / "m"
            try:
                info, cdb_info = mapfile.write_map(rows, path, "# m\n", sep, "cdb m", one)
            except InvalidData as exc:
                outcomes.append(("refused", str(exc)))
                continue
            outcomes.append(("ok", path.read_bytes(), info, cdb_info))
    assert outcomes[0] == outcomes[1]
    event(outcomes[0][0])

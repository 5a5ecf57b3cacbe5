"""formats.cdb: the cdb of a text map built a block at a time is the cdb of its pairs as
text.pairs reads them, byte for byte, whatever the lines hold and wherever blocks end."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapsync.formats import cdb, text

ODD = (
    b"# header\n# second\n"
    b"a@x OK\n"
    b"b@x <+[10.0.1.1]:24 mapsync_lmtp\n"  # a value with the separator in it
    b"\n"  # blank
    b"   \n"  # whitespace only
    b"# a comment in the middle\n"
    b"nosep\n"  # no separator: key with an empty value
    b"c@x \n"  # empty value
    b"d@x v\r\n"  # a CR kept in the value
    b"e@x last"  # no final newline
)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize(
    "body",
    [ODD, b"# h\n" + b"".join(b"k%d@example.org OK\n" % i for i in range(5000)), b"", b"# only\n"],
)
def test_build_text_is_build_of_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: bytes, chunk: int
) -> None:
    src = tmp_path / "map"
    src.write_bytes(body)
    expected = cdb.build(tmp_path / "a.cdb", text.pairs(src))
    monkeypatch.setattr(cdb, "CHUNK", chunk)
    assert cdb.build_text(tmp_path / "b.cdb", src) == expected
    assert (tmp_path / "a.cdb").read_bytes() == (tmp_path / "b.cdb").read_bytes()


def test_add_lines_with_a_separator_in_a_value_splits_each_line_once(tmp_path: Path) -> None:
    lines = b"a@x <+[10.0.1.1]:24 mapsync_lmtp\nb@x OK\n"
    with cdb.Maker(tmp_path / "m.cdb") as maker:
        maker.add_lines(lines)
        made = maker.commit()
    assert made == cdb.build(
        tmp_path / "n.cdb", [(b"a@x", b"<+[10.0.1.1]:24 mapsync_lmtp"), (b"b@x", b"OK")]
    )


@pytest.mark.parametrize("odd", [b" ", b"\t", b"\r", b"\x0b", b"\x0c", b"\n", b"#"])
@pytest.mark.parametrize("where", ["first", "middle"])
def test_a_line_starting_as_pairs_skips_it_is_read_as_pairs_reads_it(
    tmp_path: Path, odd: bytes, where: str
) -> None:
    # Every other line is plain: only the odd line's start can send the block the slow way.
    line = odd + b"x y\n"
    plain = b"".join(b"k%d@example.org OK\n" % i for i in range(100))
    body = line + plain if where == "first" else plain + line + plain
    src = tmp_path / "map"
    src.write_bytes(body)
    assert cdb.build_text(tmp_path / "b.cdb", src) == cdb.build(tmp_path / "a.cdb", text.pairs(src))

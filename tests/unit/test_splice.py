"""formats.splice: a few lines changed in a sorted text map give the bytes a full render
gives, a patch that turns the old file into the new, and the same cdb."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from mapsync.formats import text
from mapsync.formats.mapfile import write_map
from mapsync.formats.splice import Mismatch, changes, splice
from mapsync.release.patch import apply_patch


def _render(
    entries: dict[str, str], path: Path, serial: int, sep: str
) -> tuple[text.TextInfo, str]:
    info, built = write_map(
        entries.items(), path, text.header(path.name, "mx", serial), sep, "cdb", None, path.parent
    )
    assert built is not None
    return info, built.sha256


def _render_hash(directory: Path) -> str:
    (kept,) = directory.glob("*.cdb")
    return kept.stem


@pytest.mark.parametrize("buffer", [False, True], ids=["read", "into-buffer"])
@pytest.mark.parametrize("patched", [False, True], ids=["cdb-built", "cdb-patched"])
@pytest.mark.parametrize("sep", [" ", ":"])
@pytest.mark.parametrize("seed", range(12))
def test_a_spliced_map_is_the_full_render_byte_for_byte(
    tmp_path: Path, seed: int, sep: str, patched: bool, buffer: bool
) -> None:
    rnd = random.Random(seed)
    keys = [
        f"u{rnd.randrange(10**6)}@d{rnd.randrange(50)}.example"
        for _ in range(rnd.randrange(0, 400))
    ]
    before = {k: f"v{rnd.randrange(9)}" for k in keys}
    after = dict(before)
    for _ in range(rnd.randrange(1, 30)):
        roll = rnd.random()
        if roll < 0.4 or not after:
            after[f"n{rnd.randrange(10**6)}@d{rnd.randrange(50)}.example"] = "new"
        elif roll < 0.7:
            after.pop(rnd.choice(sorted(after)))
        else:
            after[rnd.choice(sorted(after))] = f"w{rnd.randrange(9)}"
    old_dir, full_dir, new_dir = (tmp_path / n for n in ("old", "full", "new"))
    for d in (old_dir, full_dir, new_dir):
        d.mkdir()
    old_info, _ = _render(before, old_dir / "virtual", 1, sep)
    full_info, full_cdb = _render(after, full_dir / "virtual", 2, sep)

    delta = changes(before, after, "virtual", sep)
    old_cdb = (old_dir / f"{_render_hash(old_dir)}.cdb").read_bytes() if patched else None
    done = splice(
        old_dir / "virtual",
        old_info.entries,
        text.header("virtual", "mx", 2),
        delta,
        new_dir / "virtual",
        sep,
        new_dir / "virtual.patch",
        new_dir / "virtual.cdb",
        old_cdb,
        None,
        # Memory from an earlier change, larger or smaller than this text (junk in it).
        bytearray(b"junk" * rnd.randrange(0, 6000)) if buffer else None,
    )
    assert (new_dir / "virtual").read_bytes() == (full_dir / "virtual").read_bytes()
    assert done.text == full_info
    assert done.cdb is not None and done.cdb.sha256 == full_cdb
    assert done.cdb_data is not None
    assert bytes(done.cdb_data) == (full_dir / f"{full_cdb}.cdb").read_bytes()
    assert done.cdb.size == len(done.cdb_data)
    # Changed in place, the cdb is only in memory; built whole, it is written as well.
    assert (new_dir / "virtual.cdb").exists() != patched
    if not patched:
        assert (new_dir / "virtual.cdb").read_bytes() == bytes(done.cdb_data)
    assert done.added - done.removed == len(after) - len(before)
    assert done.added + done.removed + done.changed == len(delta)
    patched = io.BytesIO()
    apply_patch(old_dir / "virtual", new_dir / "virtual.patch", patched, "p", sep.encode())
    assert patched.getvalue() == (full_dir / "virtual").read_bytes()


def test_a_line_the_old_file_does_not_hold_is_a_mismatch(tmp_path: Path) -> None:
    _render({"a@x": "1", "b@x": "2"}, tmp_path / "m", 1, " ")
    out = tmp_path / "out"
    with pytest.raises(Mismatch, match="expected"):
        splice(
            tmp_path / "m", 2, "# h\n", changes({"a@x": "9"}, {}, "m", " "), out, " ", None, None
        )
    with pytest.raises(Mismatch, match="there already"):
        splice(
            tmp_path / "m", 2, "# h\n", changes({}, {"b@x": "2"}, "m", " "), out, " ", None, None
        )


@pytest.mark.parametrize(
    ("found", "said"),
    [
        ({"a@x": "{SHA512-CRYPT}$6$found$hash:5000:5000::/home/a::"}, "another value"),
        ({"b@x": "{SHA512-CRYPT}$6$found$hash:5000:5000::/home/b::"}, "key b'b@x'"),
        ({}, "the end of the map"),
    ],
)
def test_a_mismatch_names_keys_never_a_value(
    tmp_path: Path, found: dict[str, str], said: str
) -> None:
    # The message is logged (publish --interval): a dovecot_users line's value holds the
    # password hash, of the line expected and of the one found.
    _render(found, tmp_path / "m", 1, ":")
    expected = {"a@x": "{SHA512-CRYPT}$6$expected$hash:5000:5000::/home/a::"}
    delta = changes(expected, {}, "m", ":")
    with pytest.raises(Mismatch) as caught:
        splice(tmp_path / "m", len(found), "# h\n", delta, tmp_path / "out", ":", None, None)
    message = str(caught.value)
    assert "a@x" in message and said in message
    assert "$6$" not in message and "/home/" not in message


def test_a_manifest_count_the_text_cannot_hold_is_a_mismatch(tmp_path: Path) -> None:
    # The patch's copied lines come from the manifest's count less the lines counted: a count
    # the text cannot hold is refused, not written into a patch.
    info, _ = _render({f"u{i}@x": "1" for i in range(50)}, tmp_path / "m", 1, " ")
    delta = changes({}, {"u25x@x": "2"}, "m", " ")
    args = (text.header("m", "mx", 2), delta, tmp_path / "out", " ", tmp_path / "p", None)
    with pytest.raises(Mismatch, match="do not add up"):
        splice(tmp_path / "m", 5000, *args)
    with pytest.raises(Mismatch, match="do not add up"):
        splice(tmp_path / "m", 1, *args)
    done = splice(tmp_path / "m", info.entries, *args)
    assert done.text.entries == 51


def test_a_text_buffer_still_viewed_is_not_resized_but_read_around(tmp_path: Path) -> None:
    info, _ = _render({f"u{i}@x": "1" for i in range(50)}, tmp_path / "m", 1, " ")
    held = bytearray(b"x" * 10)
    view = memoryview(held)  # an export: the bytearray cannot be resized
    done = splice(
        tmp_path / "m",
        info.entries,
        text.header("m", "mx", 2),
        changes({}, {"u25x@x": "2"}, "m", " "),
        tmp_path / "out",
        " ",
        None,
        None,
        None,
        None,
        held,
    )
    assert done.text.entries == 51
    assert bytes(view) == b"x" * 10

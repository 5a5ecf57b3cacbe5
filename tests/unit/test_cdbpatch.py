"""formats.cdbpatch: a cdb changed in place is, byte for byte, the cdb built whole from the
changed pairs (cdbx, which tinycdb and postmap agree with)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mapsync.formats import cdb, cdbpatch
from mapsync.formats.cdbpatch import Edit, NotPatchable, edits_from_changes, patch_cdb_file
from mapsync.formats.cdbpatch import patch_cdb as patch
from mapsync.release.patch import Change, apply_patch, make_patch


def _built(tmp_path: Path, pairs: dict[bytes, bytes], name: str) -> bytes:
    path = tmp_path / name
    cdb.build(path, sorted(pairs.items()))
    return path.read_bytes()


def _edits(before: dict[bytes, bytes], after: dict[bytes, bytes]) -> list[Edit]:
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    old_keys = sorted(before)
    edits = []
    for key in keys:
        successor = None
        if key not in before:
            later = [k for k in old_keys if k > key]
            successor = later[0] if later else None
        edits.append(Edit(key, before.get(key), after.get(key), successor))
    return edits


@pytest.mark.parametrize("in_place", [0, 1000], ids=["searchsorted", "edit-by-edit"])
@pytest.mark.parametrize("seed", range(40))
def test_a_patched_cdb_is_the_cdb_built_whole(
    tmp_path: Path, seed: int, in_place: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both ways of moving the positions: all edits at once, and one edit at a time in place.
    monkeypatch.setattr(cdbpatch, "_IN_PLACE", in_place)
    rnd = random.Random(seed)
    size = rnd.choice([0, 1, 5, 300, 3000])
    before = {
        f"u{rnd.randrange(10**7)}@d{rnd.randrange(30)}.example".encode(): b"v%d" % rnd.randrange(99)
        for _ in range(size)
    }
    after = dict(before)
    for _ in range(rnd.randrange(1, 40)):
        roll = rnd.random()
        if roll < 0.4 or not after:
            after[f"n{rnd.randrange(10**7)}@d{rnd.randrange(30)}.example".encode()] = (
                b"new" * rnd.randrange(1, 4)
            )
        elif roll < 0.7:
            after.pop(rnd.choice(sorted(after)))
        else:
            after[rnd.choice(sorted(after))] = b"w" * rnd.randrange(0, 30)
    old = _built(tmp_path, before, "old.cdb")
    assert patch(old, _edits(before, after)) == _built(tmp_path, after, "new.cdb")


def test_a_record_the_old_cdb_does_not_hold_is_refused(tmp_path: Path) -> None:
    old = _built(tmp_path, {b"a": b"1", b"b": b"2"}, "old.cdb")
    with pytest.raises(NotPatchable, match="not in the old cdb"):
        patch(old, [Edit(b"c", b"3", None)])
    with pytest.raises(NotPatchable, match="another value"):
        patch(old, [Edit(b"a", b"9", b"1")])
    with pytest.raises(NotPatchable, match="header"):
        patch(b"short", [])


def _text(path: Path, pairs: dict[bytes, bytes], serial: int) -> Path:
    path.write_bytes(
        b"# mapsync serial %d\n" % serial
        + b"".join(k + b" " + v + b"\n" for k, v in sorted(pairs.items()))
    )
    return path


@pytest.mark.parametrize("in_place", [0, 1000], ids=["searchsorted", "edit-by-edit"])
@pytest.mark.parametrize("chunk", [64, 1 << 20])
@pytest.mark.parametrize("seed", range(30))
def test_the_edits_a_text_patch_makes_change_the_cdb_file_into_the_new_one(
    tmp_path: Path, seed: int, chunk: int, in_place: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an agent does: the text patch applied, the changed lines it met turned into
    edits, the old cdb file changed by them (read and written ``chunk`` bytes at a time, the
    records around the changed ones copied in the kernel, both ways of moving the positions)
    — byte for byte the cdb of the new text."""
    monkeypatch.setattr(cdbpatch, "CHUNK", chunk)
    monkeypatch.setattr(cdbpatch, "_IN_PLACE", in_place)
    rnd = random.Random(seed)
    before = {
        b"k%05d@d.example" % rnd.randrange(10**5): b"v%d" % rnd.randrange(9)
        for _ in range(rnd.choice([0, 1, 50, 2000]))
    }
    after = dict(before)
    for _ in range(rnd.randrange(1, 30)):
        roll = rnd.random()
        if roll < 0.4 or not after:
            after[b"k%05d@d.example" % rnd.randrange(10**5)] = b"new%d" % rnd.randrange(9)
        elif roll < 0.7:
            after.pop(rnd.choice(sorted(after)))
        else:
            after[rnd.choice(sorted(after))] = b"w" * rnd.randrange(0, 30)
    old, new = _text(tmp_path / "old", before, 1), _text(tmp_path / "new", after, 2)
    with open(tmp_path / "patch", "wb") as fh:
        make_patch(old, new, fh)
    changes: list[Change] = []
    with open(tmp_path / "applied", "wb") as fh:
        apply_patch(old, tmp_path / "patch", fh, "patch", b" ", changes)
    assert (tmp_path / "applied").read_bytes() == new.read_bytes()
    old_cdb = tmp_path / "old.cdb"
    cdb.build_text(old_cdb, old)
    want = cdb.build_text(tmp_path / "want.cdb", new)
    made = tmp_path / "made.cdb"
    made.touch()
    assert patch_cdb_file(old_cdb, edits_from_changes(changes, b" "), made) == want
    assert made.read_bytes() == (tmp_path / "want.cdb").read_bytes()


def test_a_changed_line_the_cdb_does_not_hold_is_not_patchable() -> None:
    for line in (b"# a comment\n", b" x y\n", b"\n", b"no newline"):
        with pytest.raises(NotPatchable, match="not a pair"):
            edits_from_changes([Change(line)], b" ")


def test_a_chain_of_patches_reuses_the_spare_buffer_and_never_the_old_one(tmp_path: Path) -> None:
    rnd = random.Random(7)
    pairs = {f"u{i:05d}@d.example".encode(): b"v%d" % rnd.randrange(9) for i in range(2000)}
    first = _built(tmp_path, pairs, "0.cdb")
    current = cdb.load(tmp_path / "0.cdb")  # as the publisher holds a cdb it built whole
    assert current == first
    spare = None
    reused = 0
    for step in range(30):
        after = dict(pairs)
        key = f"u{rnd.randrange(3000):05d}x@d.example".encode()
        after[key] = b"new"
        made = patch(current, _edits(pairs, after), spare)
        assert made == _built(tmp_path, after, f"{step + 1}.cdb")
        reused += spare is not None and made.obj is spare.obj  # written into its memory
        spare, current, pairs = current, made, after
    assert reused == 29  # each time but the first (no spare yet)
    # The buffer being read is never the one written: given as the spare, a new one is made.
    again = dict(pairs)
    again[b"zzz@d.example"] = b"1"
    made = patch(current, _edits(pairs, again), current)
    assert made.obj is not current.obj
    assert made == _built(tmp_path, again, "again.cdb")


def test_the_changes_kept_stop_one_past_keep_and_the_text_is_whole(tmp_path: Path) -> None:
    """An agent keeps the changed lines only as far as it would change a cdb with them: past
    ``keep``, one more (it then builds the cdb whole) and no others, the text still patched
    whole."""
    before = {b"k%05d@d.example" % i: b"v" for i in range(0, 400, 2)}
    after = {**before, **{b"k%05d@d.example" % i: b"w" for i in range(1, 400, 2)}}
    old, new = _text(tmp_path / "old", before, 1), _text(tmp_path / "new", after, 2)
    with open(tmp_path / "patch", "wb") as fh:
        make_patch(old, new, fh)
    for keep, kept in ((None, 200), (500, 200), (50, 51), (0, 1)):
        changes: list[Change] = []
        with open(tmp_path / "applied", "wb") as fh:
            apply_patch(old, tmp_path / "patch", fh, "patch", b" ", changes, keep)
        assert (tmp_path / "applied").read_bytes() == new.read_bytes()
        assert len(changes) == kept, keep
        assert [c.added for c in changes] == [k + b" w\n" for k in sorted(after)[1::2]][:kept]


def test_a_damaged_length_in_the_live_cdb_is_not_patchable(tmp_path: Path) -> None:
    """A length field of the old cdb (not hashed again before it is changed) that says
    gigabytes: no read of that size, the cdb is built whole instead."""
    old = tmp_path / "old.cdb"
    old.write_bytes(_built(tmp_path, {b"a": b"1", b"b": b"2"}, "built.cdb"))
    data = bytearray(old.read_bytes())
    b_record = 2048 + 8 + 2  # after the header and a's record (lengths, "a", "1")
    data[b_record + 4 : b_record + 8] = (0xFFFFFFF0).to_bytes(4, "little")  # b's value length
    old.write_bytes(bytes(data))
    made = tmp_path / "made.cdb"
    made.touch()
    with pytest.raises(NotPatchable, match="past the end"):
        patch_cdb_file(old, [Edit(b"b", b"2", b"3")], made)

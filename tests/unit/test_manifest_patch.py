"""The manifest patch: exact round trips, strict and bounded parsing."""

from __future__ import annotations

import random
import re

import pytest

from mapsync.errors import VerificationError
from mapsync.release import MAX_MANIFEST_BYTES
from mapsync.release.manifest_patch import (
    MAX_PATCHED,
    apply_manifest_patch,
    diff,
    make_manifest_patch,
    patch_base,
)

OLD = b'{\n  "a": 1,\n  "b": "x",\n  "c": [\n    1\n  ]\n}\n'


def _lines(rng: random.Random) -> list[bytes]:
    return [rng.choice([b"", b"  x", b"  y", b'  "z": 1,', b"}"]) for _ in range(rng.randrange(12))]


@pytest.mark.parametrize("seed", range(200))
def test_random_edits_round_trip_byte_for_byte(seed: int) -> None:
    rng = random.Random(seed)
    old, new = b"\n".join(_lines(rng)), b"\n".join(_lines(rng))
    if rng.random() < 0.5:
        new += b"\n"  # with and without the final newline
    patch = diff(old, new, 41)
    assert patch_base(patch) == 41
    assert apply_manifest_patch(old, patch, "p") == new


def test_a_changed_line_costs_that_line_only() -> None:
    new = OLD.replace(b'"x"', b'"y"')
    patch = diff(OLD, new, 1)
    assert patch == b'mapsync-manifest-patch 1 from 1\n=2\n-1\n+  "b": "y",\n=5\n'
    assert apply_manifest_patch(OLD, patch, "p") == new
    assert make_manifest_patch(OLD, OLD, 1) == b"mapsync-manifest-patch 1 from 1\n=8\n"


def test_none_where_it_would_not_pay() -> None:
    """A patch no smaller than the manifest, or a manifest over MAX_PATCHED: none (the
    manifest travels whole)."""
    assert make_manifest_patch(OLD, b"{}\n", 1) is None  # the patch is longer than 3 bytes
    assert diff(OLD, b"{}\n", 1) == b"mapsync-manifest-patch 1 from 1\n-7\n+{}\n=1\n"
    big = b"\n".join(b'  "m%d": %d,' % (i, i) for i in range(MAX_PATCHED // 10))
    assert len(big) > MAX_PATCHED
    assert make_manifest_patch(big, big + b"\n", 1) is None
    edge = big[: MAX_PATCHED - 1]
    assert make_manifest_patch(edge, edge + b"\n", 1) is not None  # at the bound: made


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (b"mapsync-patch 1\n=8\n", "line 1: not a manifest patch"),
        (b"mapsync-manifest-patch 1 from 01\n=8\n", "line 1: not a manifest patch"),
        (b"mapsync-manifest-patch 1 from 1\n=8", "does not end with a newline"),
        (b"mapsync-manifest-patch 1 from 1\n=9\n", "line 2: '=9' goes past the end"),
        (b"mapsync-manifest-patch 1 from 1\n=2\n-7\n", "line 3: '-7' goes past the end"),
        (b"mapsync-manifest-patch 1 from 1\n=7\n", "ends at line 7 of the previous manifest's 8"),
        (b"mapsync-manifest-patch 1 from 1\n=0\n=8\n", "line 2: not '=N', '-N' or '+LINE'"),
        (b"mapsync-manifest-patch 1 from 1\n=08\n", "line 2: not '=N', '-N' or '+LINE'"),
        (b"mapsync-manifest-patch 1 from 1\n= 8\n", "line 2: not '=N', '-N' or '+LINE'"),
        (b"mapsync-manifest-patch 1 from 1\n=8\n\n", "line 3: not '=N', '-N' or '+LINE'"),
    ],
)
def test_a_faulty_patch_is_refused_naming_its_line(patch: bytes, message: str) -> None:
    with pytest.raises(VerificationError, match="^" + re.escape(f"p: {message}")):
        apply_manifest_patch(OLD, patch, "p")


def test_size_is_bounded_in_and_out() -> None:
    header = b"mapsync-manifest-patch 1 from 1\n"
    big = b"+" + b"x" * MAX_MANIFEST_BYTES + b"\n"
    with pytest.raises(VerificationError, match="larger than"):
        apply_manifest_patch(OLD, header + big + b"=8\n", "p")
    half = b"+" + b"x" * (MAX_MANIFEST_BYTES // 2) + b"\n"
    old = b"y" * (MAX_MANIFEST_BYTES // 2 + 10)
    with pytest.raises(VerificationError, match="gives more than"):
        apply_manifest_patch(old, header + half + b"=1\n", "p")

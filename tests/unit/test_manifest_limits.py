"""The publisher never signs a manifest larger than agents accept."""

from __future__ import annotations

import pytest

from mapsync.errors import MapsyncError
from mapsync.publish.publisher import MAX_SKIPPED_CHARS, MAX_SKIPPED_LISTED, skipped_note
from mapsync.release import MAX_MANIFEST_BYTES, check_manifest_size
from mapsync.validate import Problem


def test_a_manifest_over_the_agents_limit_is_refused_before_signing() -> None:
    check_manifest_size(b"x" * MAX_MANIFEST_BYTES, "channel mx")
    with pytest.raises(MapsyncError) as exc:
        check_manifest_size(b"x" * (MAX_MANIFEST_BYTES + 1), "channel mx")
    assert str(exc.value) == (
        f"channel mx: the manifest would be {MAX_MANIFEST_BYTES + 1} bytes, more than the "
        f"{MAX_MANIFEST_BYTES} bytes agents accept; nothing was published"
    )


def test_the_skipped_list_is_bounded_whatever_the_rows() -> None:
    cycle = " → ".join(f"a{i}@example.org" for i in range(1000))
    message = "alias cycle: " + cycle  # ~20 kB, one string: not 50,000 copies (a gigabyte)
    problems = [Problem("alias", i, f"a{i}@example.org", message) for i in range(50_000)]
    note = skipped_note(problems)
    assert len(note) == MAX_SKIPPED_LISTED + 1
    assert all(len(line) <= MAX_SKIPPED_CHARS for line in note[:-1])
    assert note[0].startswith("alias id=0 'a0@example.org': alias cycle: a0@example.org → ")
    assert note[0].endswith("…")
    assert note[-1].startswith(f"... and {50_000 - MAX_SKIPPED_LISTED} more: 50000 invalid row(s)")
    few = [Problem("account", 1, "a@example.org", "no password hash", "password_hash")]
    assert skipped_note(few) == ["account id=1 'a@example.org': no password hash"]

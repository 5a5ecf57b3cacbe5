"""``state.json`` is read strictly: anything that is not a channel state is StateDamaged,
naming the file, never a TypeError or AttributeError deep inside a pull."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mapsync.agent.state import ChannelState, LiveFile, StateDamaged


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "not valid JSON"),
        (b"[]", "holds a JSON list, not an object"),
        (b"null", "holds a JSON NoneType, not an object"),
        (b'{"pinned": "4"}', "key 'pinned'"),
        (b'{"pinned": true}', "key 'pinned'"),
        (b'{"reload_pending": 1}', "key 'reload_pending'"),
        (b'{"last_error_origin": "mars"}', "key 'last_error_origin'"),
        (b'{"failed_sources": {"a": 1}}', "key 'failed_sources'"),
        (b'{"last_success": "yesterday"}', "key 'last_success' holds 'yesterday', not a time"),
        (b'{"live_files": {"recipients": [1]}}', "key 'live_files'"),
    ],
)
def test_a_damaged_state_file_is_named(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StateDamaged) as exc:
        ChannelState.load(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert why in str(exc.value)


def test_a_state_round_trips_0600_and_ignores_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = ChannelState(pinned=3, failed_sources={"a": "down"})
    state.note_installed(4, "4", {"recipients": LiveFile(10, 20)}, "2026-11-30T12:00:00Z")
    state.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text(path.read_text().replace('"pinned"', '"from_the_future": 1, "pinned"'))
    again = ChannelState.load(path)
    assert again == state
    assert again.highest_serial == 4 and again.recorded_live() == (
        "4",
        {"recipients": LiveFile(10, 20)},
    )


def test_saving_in_place_overwrites_a_longer_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("x" * 5000)
    ChannelState(pinned=2).save_in_place(path)
    assert ChannelState.load(path).pinned == 2
    assert stat.S_IMODE(path.stat().st_mode) in (0o600, 0o644)  # an existing file keeps its mode


def test_the_public_copy_is_0644_and_a_status_dir_that_is_a_file_is_named(
    tmp_path: Path,
) -> None:
    state = ChannelState(last_success="2026-11-30T00:00:00Z")
    public = tmp_path / "status" / "mx.json"
    state.save(tmp_path / "state.json", public)
    assert ChannelState.load(public) == state
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600
    # An operator's mistake: a file where the directory belongs. The run goes on; the warning
    # says what is wrong, not a bare "File exists".
    bad = tmp_path / "not-a-dir"
    bad.write_text("")
    with capture_logs() as logs:
        state.save(tmp_path / "state.json", bad / "mx.json")
    assert [e["error"] for e in logs] == [f"{bad} is not a directory ([agent] status_dir)"]

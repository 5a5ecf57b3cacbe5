"""`mapsync status --mirror DEST`: a mirror's health from ``DEST/.mirror.json`` (its runs)
and from what DEST serves (each channel's LATEST and the manifest it names)."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from mapsync.errors import EXIT_ERROR, EXIT_OK, EXIT_UNKNOWN, EXIT_WARNING
from mapsync.mirrorlog import (
    NOTE,
    ChannelRun,
    loop_running,
    looping,
    mirror_metrics,
    mirror_status,
    record_mirror_run,
)
from mapsync.release import Latest, Manifest, iso, manifest_sha256, utcnow

DAY = 86400


def serve(dest: Path, channel: str, serial: int, created: datetime, life: int = 7 * DAY) -> None:
    """DEST serves ``serial`` of ``channel``: its manifest (no maps) and the LATEST naming it."""
    m = Manifest(
        channel=channel,
        serial=serial,
        previous=None,
        created=iso(created),
        expires=iso(created + timedelta(seconds=life)),
        generator="mapsync test",
        source={},
        maps={},
    )
    release = dest / channel / "releases" / str(serial)
    release.mkdir(parents=True, exist_ok=True)
    data = m.to_bytes()
    (release / "MANIFEST.json").write_bytes(data)
    (dest / channel / "LATEST").write_bytes(Latest(serial, manifest_sha256(data)).to_bytes())


def run(dest: Path, error: str | None = None, **channels: ChannelRun) -> None:
    record_mirror_run(dest, "rsync://up/mapsync-all", error, channels, interval=10, timeout=60)


def test_no_note_is_unknown_and_a_run_makes_it_ok(tmp_path: Path) -> None:
    st = mirror_status(tmp_path)
    assert st.code == EXIT_UNKNOWN
    assert f"no mirror run recorded in {tmp_path / NOTE}" in st.message
    serve(tmp_path, "mx", 4, utcnow() - timedelta(hours=1))
    run(tmp_path, mx=ChannelRun(mirrored=True))
    st = mirror_status(tmp_path)
    assert st.code == EXIT_OK, st.message
    assert st.message.startswith("serving mx 4; first to expire: mx, expires in 6d")
    assert [(c.channel, c.serial) for c in st.channels] == [("mx", 4)]
    assert st.last_run == st.last_success and st.interval == 10


def test_a_failed_run_is_a_warning_until_one_succeeds(tmp_path: Path) -> None:
    serve(tmp_path, "mx", 4, utcnow())
    run(tmp_path, mx=ChannelRun(mirrored=True))
    run(tmp_path, "rsync://up/mapsync-all: listing its channels: connection refused")
    st = mirror_status(tmp_path)
    assert st.code == EXIT_WARNING
    assert "last run failed 0s ago: rsync://up/mapsync-all: listing its channels" in st.message
    assert st.last_error and st.last_success
    run(tmp_path, mx=ChannelRun(error="refusing to go backwards\nnothing changed"))
    st = mirror_status(tmp_path)
    assert st.code == EXIT_WARNING
    assert "channel mx: refusing to go backwards nothing changed" in st.message  # one line
    run(tmp_path, mx=ChannelRun())
    assert mirror_status(tmp_path).code == EXIT_OK


@pytest.mark.parametrize(
    ("age", "code", "says"),
    [
        # A minute inside each day: "expires in Nd" counts whole days, and a manifest's
        # created has whole seconds, so exactly N days left read as N-1 some runs.
        (3 * DAY - 60, EXIT_OK, "expires in 4d"),
        (5 * DAY - 60, EXIT_OK, "expires in 2d"),  # more than a quarter of 7 days left
        (5 * DAY + 6 * 3600, EXIT_ERROR, "which expires in 1d"),  # less
        (8 * DAY, EXIT_ERROR, "which expired 1d ago"),
    ],
)
def test_critical_when_a_release_served_expires_within_a_quarter_of_its_lifetime(
    tmp_path: Path, age: int, code: int, says: str
) -> None:
    serve(tmp_path, "mx", 4, utcnow() - timedelta(seconds=age))
    serve(tmp_path, "edge", 9, utcnow())
    run(tmp_path, mx=ChannelRun(), edge=ChannelRun())
    st = mirror_status(tmp_path)
    assert (st.code, says in st.message) == (code, True), st.message
    if code == EXIT_ERROR:
        assert st.message.startswith("channel mx: serves serial 4, which ")
        assert "edge" not in st.message.split(";")[0]


def test_a_served_release_nodes_would_refuse_is_critical(tmp_path: Path) -> None:
    serve(tmp_path, "mx", 4, utcnow())
    run(tmp_path, mx=ChannelRun())
    (tmp_path / "mx" / "releases" / "4" / "MANIFEST.json").write_text("{}")
    st = mirror_status(tmp_path)
    assert st.code == EXIT_ERROR
    assert "channel mx: the release its LATEST names is damaged" in st.message
    (tmp_path / "mx" / "LATEST").write_text("garbage")
    assert "channel mx: its LATEST is damaged" in mirror_status(tmp_path).message


def test_a_channel_never_copied_whole_is_critical_naming_why(tmp_path: Path) -> None:
    (tmp_path / "mx").mkdir()
    run(tmp_path, mx=ChannelRun(error="rsync://up/mx/LATEST: missing"))
    st = mirror_status(tmp_path)
    assert st.code == EXIT_ERROR
    assert st.message.startswith(
        "channel mx: serves no release (never copied whole: rsync://up/mx/LATEST: missing)"
    )


def test_a_channel_removed_from_dest_is_no_longer_reported(tmp_path: Path) -> None:
    """The runbook for a channel SOURCE no longer has: remove DEST/<channel>. Status then
    stops naming it at once, not after the next run."""
    serve(tmp_path, "mx", 4, utcnow())
    serve(tmp_path, "old", 2, utcnow())
    run(tmp_path, mx=ChannelRun(), old=ChannelRun(warning="rsync://up no longer has it"))
    st = mirror_status(tmp_path)
    assert st.code == EXIT_WARNING
    assert st.message.startswith("channel old: rsync://up no longer has it; last successful run")
    for p in sorted((tmp_path / "old").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (tmp_path / "old").rmdir()
    assert mirror_status(tmp_path).code == EXIT_OK
    run(tmp_path, mx=ChannelRun())
    assert "old" not in json.loads((tmp_path / NOTE).read_text())["channels"]


def test_older_releases_not_copied_stay_a_warning_until_latest_moves(tmp_path: Path) -> None:
    serve(tmp_path, "mx", 4, utcnow())
    run(tmp_path, mx=ChannelRun(mirrored=True, skipped={3: "No space left on device"}))
    st = mirror_status(tmp_path)
    assert st.code == EXIT_WARNING
    assert "channel mx: older release(s) 3 not copied (No space left on device)" in st.message
    run(tmp_path, mx=ChannelRun())  # LATEST current: not tried again, still missing
    assert mirror_status(tmp_path).code == EXIT_WARNING
    (tmp_path / "mx" / "releases" / "3").mkdir()  # there after all
    run(tmp_path, mx=ChannelRun())
    assert mirror_status(tmp_path).code == EXIT_OK
    run(tmp_path, mx=ChannelRun(mirrored=True, skipped={2: "gone"}))
    serve(tmp_path, "mx", 5, utcnow())
    run(tmp_path, mx=ChannelRun(mirrored=True))  # LATEST moved: tried again, copied
    assert mirror_status(tmp_path).code == EXIT_OK


def test_no_run_for_three_intervals_and_the_timeout_is_a_warning(tmp_path: Path) -> None:
    serve(tmp_path, "mx", 4, utcnow())
    run(tmp_path, mx=ChannelRun())
    later = utcnow() + timedelta(seconds=3 * 10 + 60 - 5)
    assert mirror_status(tmp_path, later).code == EXIT_OK
    later = utcnow() + timedelta(seconds=3 * 10 + 60 + 5)
    st = mirror_status(tmp_path, later)
    assert st.code == EXIT_WARNING
    assert "no mirror run for 1m (it runs every 10s: stopped, or stuck?)" in st.message
    # A one-shot run (from a timer) records no interval: only failures and expiry count.
    record_mirror_run(tmp_path, "src", None, {"mx": ChannelRun()})
    assert mirror_status(tmp_path, utcnow() + timedelta(days=1)).code == EXIT_OK


def test_a_one_shot_run_beside_a_running_loop_keeps_the_loops_interval(tmp_path: Path) -> None:
    """An operator's one-shot run (`mirror --verify`) while the `--interval` loop runs: the
    note still describes the loop, so a loop that stops or hangs afterwards is still a
    WARNING after 3 intervals and its timeout. Once no loop runs, a one-shot run notes its
    own (no interval)."""
    serve(tmp_path, "mx", 4, utcnow())
    later = utcnow() + timedelta(seconds=3 * 10 + 60 + 5)
    with loop_running(tmp_path) as mark:
        (tmp_path / ".mirror.loop").unlink()  # DEST recreated by hand: the loop's next pass
        assert not looping(tmp_path)
        mark.hold()  # marks it again
        assert looping(tmp_path)
        run(tmp_path, mx=ChannelRun())
        record_mirror_run(tmp_path, "src", None, {"mx": ChannelRun()}, timeout=300)
        note = json.loads((tmp_path / NOTE).read_bytes())
        assert (note["interval"], note["timeout"]) == (10, 60)
        st = mirror_status(tmp_path, later)
        assert st.code == EXIT_WARNING, st.message
        assert "(it runs every 10s: stopped, or stuck?)" in st.message
    record_mirror_run(tmp_path, "src", None, {"mx": ChannelRun()}, timeout=300)
    note = json.loads((tmp_path / NOTE).read_bytes())
    assert (note["interval"], note["timeout"]) == (None, 300)
    assert mirror_status(tmp_path, later).code == EXIT_OK


def test_a_time_recorded_in_the_future_is_a_warning(tmp_path: Path) -> None:
    serve(tmp_path, "mx", 4, utcnow())
    run(tmp_path, mx=ChannelRun())
    st = mirror_status(tmp_path, utcnow() - timedelta(hours=2))
    assert st.code == EXIT_WARNING
    assert "the last run is recorded 2h in the future: this host's clock" in st.message


def test_a_release_created_in_the_future_is_a_warning(tmp_path: Path) -> None:
    """This host's clock behind the publisher's: the release served looks days from expiry
    (a mirror that stopped following would look fresh); said, as a node's status does."""
    serve(tmp_path, "mx", 4, utcnow())
    run(tmp_path, mx=ChannelRun())
    behind = utcnow() - timedelta(days=4)
    with open(tmp_path / NOTE, "r+") as fh:  # the run, too, noted on the clock behind
        note = json.load(fh)
        note["last_run"] = note["last_success"] = iso(behind)
        fh.seek(0), fh.truncate(), json.dump(note, fh)
    st = mirror_status(tmp_path, behind)
    assert st.code == EXIT_WARNING, st.message
    assert "channel mx: serves serial 4, created 4d in the future" in st.message
    assert "this host's clock is behind the publisher's" in st.message
    run(tmp_path, mx=ChannelRun())  # the clock set right
    assert mirror_status(tmp_path).code == EXIT_OK


@pytest.mark.parametrize("content", [b"", b"[]", b"{", b"\xff\xfe", b'{"last_run": 5}'])
def test_a_damaged_note_is_unknown_and_the_next_run_rewrites_it(
    tmp_path: Path, content: bytes
) -> None:
    serve(tmp_path, "mx", 4, utcnow())
    (tmp_path / NOTE).write_bytes(content)
    assert mirror_status(tmp_path).code == EXIT_UNKNOWN
    run(tmp_path, mx=ChannelRun())
    assert mirror_status(tmp_path).code == EXIT_OK


def test_a_fifo_in_place_of_the_note_does_not_hang_status(tmp_path: Path) -> None:
    serve(tmp_path, "mx", 4, utcnow())
    os.mkfifo(tmp_path / NOTE)
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(mirror_status(tmp_path).code), daemon=True)
    t.start()
    t.join(10)
    assert got == [EXIT_UNKNOWN]
    run(tmp_path, mx=ChannelRun())  # the next run replaces it
    assert mirror_status(tmp_path).code == EXIT_OK


def test_a_fifo_named_latest_does_not_hang_status(tmp_path: Path) -> None:
    serve(tmp_path, "mx", 4, utcnow())
    run(tmp_path, mx=ChannelRun())
    (tmp_path / "mx" / "LATEST").unlink()
    os.mkfifo(tmp_path / "mx" / "LATEST")
    st = mirror_status(tmp_path)
    assert st.code == EXIT_ERROR and "not a regular file" in st.message


def test_damage_repaired_is_mentioned_for_a_day_not_a_problem(tmp_path: Path) -> None:
    serve(tmp_path, "mx", 4, utcnow())
    run(tmp_path, mx=ChannelRun(damaged={"release 3": "sha256 differs; copied again"}))
    st = mirror_status(tmp_path)
    assert st.code == EXIT_OK
    assert "channel mx: repaired 0s ago (release 3: sha256 differs; copied again)" in st.message
    later = mirror_status(tmp_path, utcnow() + timedelta(days=1, seconds=1))
    assert "repaired" not in later.message


def test_metrics_label_each_sample_with_dest_escaped(tmp_path: Path) -> None:
    dest = tmp_path / 'odd "dir"\\x'
    dest.mkdir()
    serve(dest, "mx", 4, utcnow())
    run(dest, mx=ChannelRun())
    text = mirror_metrics(mirror_status(dest))
    escaped = str(dest).replace("\\", "\\\\").replace('"', '\\"')
    assert f'mapsync_mirror_status{{dest="{escaped}"}} 0' in text
    assert f'mapsync_mirror_serial{{channel="mx",dest="{escaped}"}} 4' in text
    assert "mapsync_mirror_expiry_timestamp_seconds{" in text
    assert "mapsync_mirror_last_success_timestamp_seconds{" in text

"""`mapsync status --publisher`: the publisher's own health from ``REPO/.publisher.json``."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from mapsync.config import PublisherChannel, PublisherConfig
from mapsync.errors import EXIT_ERROR, EXIT_OK, EXIT_UNKNOWN, EXIT_WARNING
from mapsync.publish.runlog import RUNLOG, publisher_status, record_pushes, record_run
from mapsync.release import iso, parse_iso, utcnow


def _cfg(repo: Path) -> PublisherConfig:
    return PublisherConfig(
        database="sqlite://",
        repository=repo,
        signing_key=repo / "k",
        channels={
            name: PublisherChannel(name, ("domains",), push=(f"/inbox/{name}",))
            for name in ("mx", "store")
        },
    )


def _note(repo: Path, run_ago: int, success_ago: int | None, error: str | None) -> None:
    now = utcnow()
    note = {
        "last_run": iso(now - timedelta(seconds=run_ago)),
        "last_success": iso(now - timedelta(seconds=success_ago)) if success_ago else None,
        "last_error": error,
    }
    (repo / RUNLOG).write_text(json.dumps(note))


def test_runs_are_recorded_and_a_success_clears_the_error(tmp_path: Path) -> None:
    assert publisher_status(_cfg(tmp_path)).code == EXIT_UNKNOWN
    record_run(tmp_path, "database sqlite:///x: reading the snapshot failed: boom\nmore")
    st = publisher_status(_cfg(tmp_path))
    assert st.code == EXIT_ERROR  # never succeeded
    assert st.last_error == "database sqlite:///x: reading the snapshot failed: boom more"
    record_run(tmp_path, None)
    st = publisher_status(_cfg(tmp_path))
    assert (st.code, st.last_error) == (EXIT_OK, None)
    assert st.message.startswith("last successful run ")
    record_run(tmp_path, "locked")
    st = publisher_status(_cfg(tmp_path))
    assert st.code == EXIT_WARNING
    assert (
        st.message.startswith("last run failed ") and ": locked; last successful run " in st.message
    )


@pytest.mark.parametrize(
    ("run_ago", "success_ago", "error", "code", "says"),
    [
        (60, 60, None, EXIT_OK, "last successful run 1m ago"),
        (20 * 60, 20 * 60, None, EXIT_WARNING, "no publish run for 20m"),  # > full_check
        (60, 2 * 3600, "locked", EXIT_WARNING, "last run failed 1m ago: locked"),
        (
            60,
            4 * 86400,
            "down",
            EXIT_ERROR,
            "releases are not being renewed; last run failed: down",
        ),
        # The clock stepped back since the runs (or it was ahead then): not "0s ago", OK.
        (-365 * 86400, -365 * 86400, None, EXIT_WARNING, "run is recorded 365d in the future"),
        (60, -3 * 3600, "down", EXIT_WARNING, "3h in the future: this host's clock was stepped"),
        (60, -3 * 3600, "down", EXIT_WARNING, "; last run failed: down"),
        (-2 * 3600, 60, None, EXIT_WARNING, "the last run is recorded 2h in the future"),
        (-30, -30, None, EXIT_OK, "last successful run 30s in the future"),  # within the skew
    ],
)
def test_levels(
    tmp_path: Path, run_ago: int, success_ago: int, error: str | None, code: int, says: str
) -> None:
    _note(tmp_path, run_ago, success_ago, error)
    st = publisher_status(_cfg(tmp_path))
    assert st.code == code, st
    assert says in st.message


@pytest.mark.parametrize("content", [b"", b"[]", b"{", b'{"last_run": 5}', b"\xff"])
def test_a_damaged_note_is_unknown_not_a_crash(tmp_path: Path, content: bytes) -> None:
    (tmp_path / RUNLOG).write_bytes(content)
    assert publisher_status(_cfg(tmp_path)).code == EXIT_UNKNOWN
    record_run(tmp_path, None)  # and the next run writes a good one
    assert publisher_status(_cfg(tmp_path)).code == EXIT_OK


def test_failed_pushes_warn_per_channel_until_that_channel_pushes_again(tmp_path: Path) -> None:
    record_run(tmp_path, None)
    record_pushes(tmp_path, {"mx": "published, but the push failed for 1 destination(s) (mx)"})
    record_pushes(tmp_path, {"store": None})  # a run of another channel: mx's note stays
    st = publisher_status(_cfg(tmp_path))
    assert st.code == EXIT_WARNING
    assert st.message.startswith("published, but the push failed for 1 destination(s) (mx); ")
    assert st.push_failed == "published, but the push failed for 1 destination(s) (mx)"
    record_pushes(tmp_path, {"mx": None, "store": None})  # pushed again, or push removed
    st = publisher_status(_cfg(tmp_path))
    assert (st.code, st.push_failed) == (EXIT_OK, None)
    record_pushes(tmp_path, {"gone": "push failed"})  # a channel since removed from the config
    assert publisher_status(_cfg(tmp_path)).code == EXIT_OK
    # A stopped publisher is told as such, not as its last pushes.
    record_pushes(tmp_path, {"mx": "push failed"})
    note = json.loads((tmp_path / RUNLOG).read_text())
    note["last_run"] = note["last_success"] = iso(utcnow() - timedelta(days=1))
    (tmp_path / RUNLOG).write_text(json.dumps(note))
    assert publisher_status(_cfg(tmp_path)).message.startswith("no publish run for ")


def test_a_channel_that_no_longer_pushes_is_not_warned_about(tmp_path: Path) -> None:
    record_run(tmp_path, None)
    record_pushes(tmp_path, {"mx": "published, but the push failed for 1 destination(s) (mx)"})
    assert publisher_status(_cfg(tmp_path)).code == EXIT_WARNING
    cfg = _cfg(tmp_path)
    cfg.channels["mx"] = PublisherChannel("mx", ("domains",))  # its push taken out
    assert (publisher_status(cfg).code, publisher_status(cfg).push_failed) == (EXIT_OK, None)


def test_a_run_ended_by_an_os_error_is_noted_with_its_path() -> None:
    """A full disk ended every run with an OSError that was never noted (status said OK)."""
    from mapsync.errors import described as _described

    full = OSError(28, "No space left on device", "/srv/mapsync/mx/.staging/7/virtual")
    assert _described(full) == "/srv/mapsync/mx/.staging/7/virtual: No space left on device"
    assert _described(OSError(5, "Input/output error")) == "Input/output error"


def test_each_channel_is_judged_by_its_own_runs(tmp_path: Path) -> None:
    """A run of one channel (``publish --channel``) said the publisher was fine whatever the
    others' last runs said."""
    record_run(tmp_path, None, ["mx", "store"], every=True)
    record_run(tmp_path, "refused by guards", ["mx", "store"], every=True)
    record_run(tmp_path, None, ["mx"], every=False)
    st = publisher_status(_cfg(tmp_path))
    assert st.code == EXIT_WARNING
    assert st.message.startswith("channel(s) store: last run failed "), st.message
    assert st.last_error == "store: refused by guards"
    # Old enough, it is CRITICAL for that channel alone.
    note = json.loads((tmp_path / RUNLOG).read_text())
    note["channels"]["store"]["last_success"] = iso(utcnow() - timedelta(days=4))
    (tmp_path / RUNLOG).write_text(json.dumps(note))
    st = publisher_status(_cfg(tmp_path))
    assert st.code == EXIT_ERROR
    assert st.message.startswith("channel(s) store: last successful run 4d ago, releases are")
    record_run(tmp_path, None, ["store"], every=False)
    assert publisher_status(_cfg(tmp_path)).code == EXIT_OK


def test_a_channel_run_alone_never_is_critical_and_a_partial_run_leaves_the_old_fields(
    tmp_path: Path,
) -> None:
    record_run(tmp_path, None, ["mx"], every=False)
    note = json.loads((tmp_path / RUNLOG).read_text())
    # What a version before the per-channel notes reads: no run of every channel succeeded.
    assert note.get("last_success") is None and note["last_run"]
    st = publisher_status(_cfg(tmp_path))
    assert st.code == EXIT_ERROR and st.message.startswith(
        "channel(s) store: last successful run never"
    )
    record_run(tmp_path, None, ["mx", "store"])
    assert publisher_status(_cfg(tmp_path)).code == EXIT_OK


def _run_of_an_earlier_version(repo: Path, error: str | None) -> None:
    """What record_run of a version before the per-channel notes writes (a ``publish
    --interval`` loop not restarted since the upgrade): the top-level fields, the rest of the
    note kept as read."""
    note = json.loads((repo / RUNLOG).read_text())
    now = iso(utcnow())
    note["last_run"], note["last_error"] = now, error
    if error is None:
        note["last_success"] = now
    (repo / RUNLOG).write_text(json.dumps(note))


def _age_note(repo: Path, days: int) -> None:
    """The note of one run as if written ``days`` ago (every time in it: that run's)."""
    text = (repo / RUNLOG).read_text()
    run = json.loads(text)["last_run"]
    (repo / RUNLOG).write_text(text.replace(run, iso(parse_iso(run) - timedelta(days=days))))


def test_runs_an_earlier_version_notes_after_this_one_count_for_every_channel(
    tmp_path: Path,
) -> None:
    """Upgraded, one `publish` by hand, the old loop still running: its runs updated only the
    top-level fields, and status read the per-channel notes of that one run: "no publish run
    for 4d", then CRITICAL "releases are not being renewed", of a publisher that ran every
    10 seconds; and its failures were not seen at all."""
    record_run(tmp_path, None, ["mx", "store"])
    _age_note(tmp_path, 4)
    _run_of_an_earlier_version(tmp_path, None)
    st = publisher_status(_cfg(tmp_path))
    assert (st.code, st.message[:23]) == (EXIT_OK, "last successful run 0s "), st.message
    _run_of_an_earlier_version(tmp_path, "database down")
    st = publisher_status(_cfg(tmp_path))
    assert st.code == EXIT_WARNING and st.message.startswith("last run failed "), st.message
    assert st.last_error == "database down"
    # This version runs one channel again: the other keeps what the earlier one noted.
    _run_of_an_earlier_version(tmp_path, None)
    record_run(tmp_path, None, ["mx"], every=False)
    st = publisher_status(_cfg(tmp_path))
    assert st.code == EXIT_OK, st.message


def test_a_fifo_or_directory_in_place_of_the_note_is_no_note_and_never_hangs(
    tmp_path: Path,
) -> None:
    """Status runs every minute as root: a FIFO where the note should be (made by the
    repository's user) would hang each run for good, and they would pile up."""
    import os
    import threading

    os.mkfifo(tmp_path / RUNLOG)
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(publisher_status(_cfg(tmp_path)).code))
    t.daemon = True
    t.start()
    t.join(10)
    assert got == [EXIT_UNKNOWN]
    (tmp_path / RUNLOG).unlink()
    (tmp_path / RUNLOG).mkdir()
    assert publisher_status(_cfg(tmp_path)).code == EXIT_UNKNOWN
    (tmp_path / RUNLOG).rmdir()
    record_run(tmp_path, None)
    assert publisher_status(_cfg(tmp_path)).code == EXIT_OK


def test_a_run_of_one_channel_is_noted_for_that_channel_alone(tmp_path: Path) -> None:
    """record_run changed the top-level fields before it read the per-channel notes, took its
    own run for one of an earlier version and noted it for every channel: a failed
    ``publish --channel store`` marked mx failed too (status WARNING naming mx), and a run
    of store alone said mx had run now (no 'no publish run' for an mx never run again)."""
    record_run(tmp_path, None, ["mx", "store"])
    _age_note(tmp_path, 1)
    record_run(tmp_path, "refused by guards", ["store"], every=False)
    note = json.loads((tmp_path / RUNLOG).read_text())
    assert note["channels"]["mx"]["last_error"] is None
    assert parse_iso(note["channels"]["mx"]["last_run"]) < utcnow() - timedelta(hours=23)
    st = publisher_status(_cfg(tmp_path))
    assert st.code == EXIT_WARNING and st.message.startswith("channel(s) store: "), st.message
    assert st.last_error == "store: refused by guards"
    # And an earlier version's run after it still counts for every channel.
    _run_of_an_earlier_version(tmp_path, None)
    record_run(tmp_path, None, ["mx"], every=False)
    assert publisher_status(_cfg(tmp_path)).code == EXIT_OK

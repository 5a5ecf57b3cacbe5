"""The publisher's own files, damaged by hand, a crash or config management: a stray entry in
``REPO/<channel>/releases/``, a garbage ``LATEST``, a damaged ``checked.json``. Each is repaired
or named in a clear message; none is a traceback, and ``publish --interval`` goes on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.helpers.agent import add_account


def latest(cluster: Cluster) -> int:
    return int(json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"])


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


# -- checked.json --------------------------------------------------------------------------------


def test_notes_an_earlier_mapsync_kept_in_the_channel_directory_are_moved_out(
    cluster: Cluster,
) -> None:
    # Before 0.x the notes lived beside LATEST, where a node's credential could reach them.
    cluster.publish()
    private = cluster.repo / ".private" / "mx"
    channel = cluster.repo / "mx"
    (private / "checked.json").rename(channel / ".checked")
    record = '{"destinations": {"/nowhere/inbox": {"serial": 1}}}\n'
    (channel / ".pushed.json").write_text(record)
    (channel / ".push.lock").write_text("")

    proc = cluster.cli("publish")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "channel mx: unchanged (serial 1)" in proc.stdout  # the moved note was read
    assert "publisher note moved out of the served channel directory" in proc.stderr
    assert [p.name for p in channel.iterdir() if p.name.startswith(".")] == []
    assert json.loads((private / "checked.json").read_text())["serial"] == 1
    assert (private / "pushed.json").read_text() == record  # no push configured: kept as is


def _at_yesterday(note: dict[str, object]) -> bytes:
    return json.dumps({**note, "at": "yesterday"}).encode()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_at_yesterday, id="at-garbage"),
        pytest.param(lambda note: b"\xff\xfe garbage", id="not-json"),
        pytest.param(lambda note: b"[]", id="a-list"),
        pytest.param(lambda note: json.dumps({**note, "serial": "1"}).encode(), id="serial-str"),
        pytest.param(None, id="a-directory"),
    ],
)
def test_a_damaged_checked_note_means_no_full_check_recorded(cluster: Cluster, damage) -> None:  # type: ignore[no-untyped-def]
    cluster.publish()
    path = cluster.repo / ".private" / "mx" / "checked.json"
    note = json.loads(path.read_text())
    if damage is None:
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(damage(note))

    proc = cluster.cli("publish")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "channel mx: unchanged (serial 1)" in proc.stdout
    assert "damaged note of the last full check ignored" in proc.stderr
    assert str(path) in proc.stderr
    if damage is None:
        assert "note of the full check not written" in proc.stderr
    else:  # rewritten whole by the full check
        assert json.loads(path.read_text())["serial"] == 1
        assert "damaged" not in cluster.cli("publish", check=True).stderr


def test_publish_interval_survives_a_damaged_checked_note(cluster: Cluster) -> None:
    cluster.publish()
    path = cluster.repo / ".private" / "mx" / "checked.json"
    # The field the quiet path reads last: fingerprint and serial still match.
    path.write_bytes(_at_yesterday(json.loads(path.read_text())))
    err = cluster.root / "loop.err"
    argv = [sys.executable, "-m", "mapsync", "--config", str(cluster.config_path)]
    with open(err, "wb") as fh:
        proc = subprocess.Popen(
            [*argv, "publish", "--interval", "1"], stdout=subprocess.DEVNULL, stderr=fh
        )
    try:
        deadline = time.monotonic() + 20
        while "damaged note" not in err.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.05)
        add_account(cluster, "after-the-damage", "example-2.org")
        while latest(cluster) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.05)
        assert latest(cluster) == 2, err.read_text()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    assert code == 128 + signal.SIGTERM
    assert "Traceback" not in err.read_text()


# -- stray entries in releases/ -------------------------------------------------------------------


def test_stray_entries_in_releases_are_named_and_left_alone(cluster: Cluster) -> None:
    cluster.write_config(extra_publisher="keep = 2")
    cluster.publish()
    releases = cluster.repo / "mx" / "releases"
    (releases / "notes.txt").write_text("an operator's note\n")
    (releases / "2").write_text("a stray file with a serial's name\n")
    for name in ("7.tmp", "\u0663", "\u00b2", "007"):  # a temp dir, '٣', '²', a padded name
        (releases / name).mkdir()
        (releases / name / "MANIFEST.json").write_text("{}")
    strays = sorted(p.name for p in releases.iterdir() if p.name != "1")

    add_account(cluster, "first", "example-2.org")
    proc = cluster.cli("publish")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "published serial 3 (previous 1)" in proc.stdout  # 2 is taken by the stray file
    for name in strays:
        assert f"path={releases / name}" in proc.stderr or str(releases / name) in proc.stderr
    assert "not a release, ignored" in proc.stderr

    history = cluster.cli("history")
    no_traceback(history)
    assert history.returncode == 0, history.stderr
    assert [line.split()[0] for line in history.stdout.splitlines()[1:]] == ["1", "3"]
    diff = cluster.cli("diff", "1", "3")
    assert diff.returncode == 0, diff.stderr
    assert "recipients: +" in diff.stdout

    back = cluster.cli("rollback", "--publisher", "1")
    no_traceback(back)
    assert back.returncode == 0, back.stderr
    assert latest(cluster) == 4
    # Garbage collection (keep = 2) removed release 1, and nothing it did not make.
    assert sorted(p.name for p in releases.iterdir()) == sorted([*strays, "3", "4"])


# -- a garbage LATEST ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"garbage\n", id="not-json"),
        pytest.param(b'{"serial": 9, "manifest_sha256": "' + b"0" * 64 + b'"}', id="gone"),
        pytest.param(b'{"serial": 1, "manifest_sha256": "' + b"0" * 64 + b'"}', id="wrong-hash"),
    ],
)
def test_a_garbage_latest_is_repaired_by_the_next_publish(cluster: Cluster, content: bytes) -> None:
    cluster.publish()
    cluster.pull()
    path = cluster.repo / "mx" / "LATEST"
    path.write_bytes(content)

    history = cluster.cli("history")
    no_traceback(history)
    assert history.returncode == 0, history.stderr
    if b"garbage" in content:  # nothing to mark (a wrong hash still names serial 1)
        assert "LATEST" not in history.stdout.splitlines()[1]

    proc = cluster.cli("publish")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "LATEST is damaged" in proc.stderr and str(path) in proc.stderr
    assert proc.stderr.count("LATEST is damaged") == 1  # said once, not by each step
    assert "channel mx: renewed serial 2 (previous 1)" in proc.stdout
    assert latest(cluster) == 2
    pulled = cluster.cli("pull")
    assert pulled.returncode == 0, pulled.stderr
    assert "serial 2 renews 1" in pulled.stdout
    assert "damaged" not in cluster.cli("publish", check=True).stderr


def test_rollback_publisher_repairs_a_garbage_latest_too(cluster: Cluster) -> None:
    cluster.publish()
    add_account(cluster, "second", "example-2.org")
    cluster.publish()
    (cluster.repo / "mx" / "LATEST").write_bytes(b"\0\0\0")
    proc = cluster.cli("rollback", "--publisher", "1")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert latest(cluster) == 3


def test_latest_that_is_a_directory_is_named(cluster: Cluster) -> None:
    cluster.publish()
    path: Path = cluster.repo / "mx" / "LATEST"
    path.unlink()
    path.mkdir()
    proc = cluster.cli("history")
    no_traceback(proc)
    assert proc.returncode == 0 and str(path) in proc.stderr

"""The agent's own files, damaged or left behind: ``state.json`` empty, truncated or of the
wrong shape, a lock path that is a directory, temporary files of a killed run, wrong modes,
a full disk under STATE. Never a traceback, never exit 1 for an error; the node recovers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mapsync.agent.status import channel_status
from tests.conftest import Cluster
from tests.helpers.agent import add_account, read_state, state_file
from tests.helpers.agent_damage import fill, lookup

KNOWN = "postmaster@example-1.org"


@pytest.fixture
def node(cluster: Cluster) -> Cluster:
    cluster.publish()
    cluster.pull()
    return cluster


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"[]",
        b'{"last_success": "2026-',
        b'{"last_success": 5}',
        b'{"live_files": []}',
        b"\xff",
    ],
    ids=["empty", "list", "truncated", "wrong-type", "wrong-shape", "not-utf8"],
)
def test_a_damaged_state_file_is_named_and_rebuilt(node: Cluster, content: bytes) -> None:
    path = state_file(node)
    path.write_bytes(content)
    st = node.cli("status")
    assert st.returncode == 2, st.stdout + st.stderr
    assert f"state file damaged, the next pull rebuilds it: {path}:" in st.stdout
    assert "Traceback" not in st.stderr

    p = node.cli("pull")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert "the state file is damaged; rebuilt" in p.stderr and str(path) in p.stderr
    assert (path.parent / "state.json.damaged").read_bytes() == content
    assert read_state(node)["highest_serial"] == 1
    assert node.cli("status").returncode == 0


def test_the_long_running_agent_rebuilds_a_damaged_state_file_without_a_traceback(
    node: Cluster,
) -> None:
    state_file(node).write_text("[]")
    agent = subprocess.Popen(
        [sys.executable, "-m", "mapsync", "--config", str(node.config_path), "agent"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (state_file(node).parent / "state.json.damaged").exists() and isinstance(
                _json_or_none(state_file(node)), dict
            ):
                break
            time.sleep(0.5)
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert "the state file is damaged; rebuilt" in err
    assert read_state(node)["highest_serial"] == 1
    assert node.cli("status").returncode == 0


def _json_or_none(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_a_rollback_pin_survives_a_damaged_state_file(node: Cluster) -> None:
    add_account(node, "zz-new")
    node.publish()
    node.pull()
    assert node.cli("rollback", "1").returncode == 0
    state_file(node).write_text("{")
    p = node.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "pinned to serial 1 by rollback" in p.stdout  # rebuilt from live set + kept releases
    assert lookup(node, "zz-new@example-1.org")[0] == 1


def test_a_lock_path_that_is_a_directory_is_replaced(node: Cluster) -> None:
    lock = node.state / "mx" / "lock"
    lock.unlink()
    (lock / "sub").mkdir(parents=True)
    p = node.cli("pull")
    assert p.returncode == 0, p.stderr
    assert lock.is_file()


def test_temporary_files_left_by_a_killed_run_are_removed(node: Cluster) -> None:
    root = node.state / "mx"
    strays = [
        root / ".state.json.k3j2h1.tmp",
        root / "releases" / ".7.tmp",
    ]
    strays[0].write_text("{")
    strays[1].mkdir()
    links = [
        node.target / ".recipients.cdb.99999.tmp",
        node.target / ".mapsync" / ".current.99999.tmp",
    ]
    os.symlink(".mapsync/current/recipients.cdb", links[0])
    os.symlink("1", links[1])
    mine = node.target / ".notes.1.tmp"  # not a link into the live set: not mapsync's
    mine.write_text("operator's")
    p = node.cli("pull")
    assert p.returncode == 0, p.stderr
    for path in [*strays, *links]:
        assert not os.path.lexists(path), path
    assert mine.read_text() == "operator's"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_modes_match_the_security_model_and_are_repaired(node: Cluster) -> None:
    assert (_mode(node.state), _mode(node.state / "mx"), _mode(state_file(node))) == (
        0o700,
        0o700,
        0o600,
    )
    kept = node.state / "mx" / "releases" / "1"
    assert {_mode(f) for f in kept.iterdir()} == {0o600}  # private, like all of STATE
    os.chmod(node.state, 0o755)
    os.chmod(node.state / "mx", 0o755)
    os.chmod(state_file(node), 0o644)
    assert node.cli("pull").returncode == 0
    assert (_mode(node.state), _mode(node.state / "mx"), _mode(state_file(node))) == (
        0o700,
        0o700,
        0o600,
    )


# -- status --prometheus PATH -----------------------------------------------------------------


def test_prometheus_never_replaces_a_symlink_or_a_device(node: Cluster, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    link = tmp_path / "mapsync.prom"
    link.symlink_to(victim)
    st = node.cli("status", "--prometheus", str(link))
    assert st.returncode == 0, st.stdout + st.stderr
    assert st.stdout.startswith("MAPSYNC OK - mx OK")
    assert f"--prometheus {link}: is a symlink, not a regular file" in st.stderr
    assert link.is_symlink() and victim.read_text() == "keep me\n"

    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = node.cli("status", "--prometheus", str(dev))
    assert st.returncode == 0 and "is a device, FIFO or socket" in st.stderr, st.stderr
    assert stat.S_ISCHR(dev.lstat().st_mode)

    regular = tmp_path / "ok.prom"
    regular.write_text("old\n")
    assert node.cli("status", "--prometheus", str(regular)).returncode == 0
    assert 'mapsync_status{channel="mx"} 0' in regular.read_text()


@pytest.mark.parametrize("where", ["missing-dir", "under-a-file", "unwritable"])
def test_prometheus_that_cannot_be_written_keeps_the_nagios_result(
    node: Cluster, tmp_path: Path, where: str
) -> None:
    (tmp_path / "file").write_text("x")
    path = {
        "missing-dir": tmp_path / "nope" / "mapsync.prom",
        "under-a-file": tmp_path / "file" / "mapsync.prom",
        "unwritable": Path("/proc/self/mapsync.prom"),
    }[where]
    st = node.cli("status", "--prometheus", str(path))
    assert st.returncode == 0, st.stdout + st.stderr  # still OK: the channel is fine
    assert st.stdout.startswith("MAPSYNC OK - mx OK")
    assert f"mapsync: --prometheus {path}:" in st.stderr
    assert "the metrics were not written" in st.stderr
    assert "Traceback" not in st.stderr and "[Errno" not in st.stderr


# -- the time of a check ---------------------------------------------------------------------

OLD = "2001-01-01T00:00:00Z"


def _checked(path: Path) -> Path:
    return path.with_name(f".{path.name}.checked")


def test_a_nothing_changed_pull_leaves_the_state_file_and_writes_only_its_check_time(
    node: Cluster,
) -> None:
    """Every minute on every node: nothing that protects the node is rewritten (no fsync);
    the time of the check goes beside the state file and its public copy, and status (root
    or not) sees it."""
    cfg = node.config().need_agent()
    path, public = state_file(node), cfg.public_status / "mx.json"
    node.pull()  # the cloned-or-not live set recorded as it is now
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "last_attempt": OLD, "last_success": OLD}))
    before = path.read_bytes()
    public_before = public.read_bytes()

    assert "mx: serial 1 is current" in node.pull().stdout
    assert path.read_bytes() == before  # not rewritten
    assert public.read_bytes() == public_before
    for where, mode in ((path, 0o600), (public, 0o644)):
        times = json.loads(_checked(where).read_text())
        assert times["last_success"] > OLD and times["last_attempt"] > OLD, where
        assert stat.S_IMODE(_checked(where).stat().st_mode) == mode
    st = channel_status(cfg, cfg.channels["mx"])
    assert st.level == "OK", st.message
    assert st.last_success is not None and st.last_success > OLD
    assert read_state(node)["highest_serial"] == 1


def test_a_lost_check_time_costs_nothing(node: Cluster) -> None:
    """What a crash may leave of the unsynced file of check times (nothing, or an empty or
    torn file): ignored; the state file is whole, and the next pull writes the times again."""
    path = state_file(node)
    node.pull()
    assert _checked(path).exists(), "premise: a nothing-changed pull wrote the check time"
    before = path.read_bytes()
    for leftover in (b"", b'{"last_success": "20', b"\x00" * 64):
        _checked(path).write_bytes(leftover)
        out = node.cli("status")
        assert "damaged" not in out.stdout and "Traceback" not in out.stderr, out.stdout
        assert path.read_bytes() == before
        assert "mx: serial 1 is current" in node.pull().stdout
        assert json.loads(_checked(path).read_text())["last_success"] is not None
        assert node.cli("status").returncode == 0


def test_a_run_that_changes_the_state_writes_it_whole_and_drops_the_check_times(
    node: Cluster,
) -> None:
    """A failed check is worth keeping: it goes into the state file, durably, and the file of
    check times beside it (older now) goes."""
    path = state_file(node)
    node.pull()
    assert _checked(path).exists()
    shutil.move(node.repo / "mx" / "LATEST", node.root / "LATEST.away")
    assert node.cli("pull").returncode != 0
    assert not _checked(path).exists()
    assert json.loads(path.read_text())["last_error"]
    shutil.move(node.root / "LATEST.away", node.repo / "mx" / "LATEST")
    node.pull()  # the error cleared: written whole again
    assert json.loads(path.read_text())["last_error"] is None
    assert not _checked(path).exists()


# -- clocks ------------------------------------------------------------------------------------


def test_times_in_the_future_are_a_warning_never_a_negative_age(node: Cluster) -> None:
    """A backward clock step of an hour, seen by status: the release and the last check lie
    in the future."""
    cfg = node.config().need_agent()
    behind = datetime.now(UTC) - timedelta(hours=1)
    st = channel_status(cfg, cfg.channels["mx"], now=behind)
    assert st.level == "WARNING", st.message
    assert "released 1h in the future" in st.message or "released 59m in the future" in st.message
    assert "this node's clock was stepped back" in st.message
    assert "-" not in st.message.split("expires")[0]  # no negative age anywhere

    state = read_state(node)
    state["last_success"] = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    state_file(node).write_text(json.dumps(state))
    out = node.cli("status")
    assert out.returncode == 1, out.stdout
    assert (
        "the last good check is 2h in the future" in out.stdout or "1h in the future" in out.stdout
    )
    assert " -" not in out.stdout.splitlines()[1]


# -- a full disk under STATE ---------------------------------------------------------------------


@pytest.fixture
def small_state(cluster: Cluster) -> Iterator[Cluster]:
    """The node's STATE on a 256k tmpfs of its own (skipped where mounting is not allowed)."""
    cluster.state.mkdir(parents=True)
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(cluster.state)],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()})")
    try:
        yield cluster
    finally:
        if subprocess.run(["umount", str(cluster.state)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(cluster.state)], check=False)


def test_a_full_disk_under_state_is_named_and_recorded_for_status(small_state: Cluster) -> None:
    c = small_state
    c.publish()
    c.pull()
    fill(c.state / "filler")
    add_account(c, "zz-full")
    c.publish()
    p = c.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "channel mx:" in p.stderr and str(c.state / "mx") in p.stderr
    assert "No space left on device" in p.stderr
    assert "Traceback" not in p.stderr
    st = c.cli("status")
    assert st.returncode == 1, st.stdout  # recorded: the last run failed, and why
    assert "last run failed" in st.stdout and "No space left on device" in st.stdout
    assert lookup(c, KNOWN) == (0, "OK")
    (c.state / "filler").unlink()
    p = c.cli("pull")
    assert p.returncode == 0, p.stderr
    assert lookup(c, "zz-full@example-1.org") == (0, "OK")

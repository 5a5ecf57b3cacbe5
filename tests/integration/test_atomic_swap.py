"""A reader never sees a missing, partial or mixed set: not while releases are swapped in
back to back, not when the agent is killed at any instant, not when the disk fills."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mapsync.agent.pull import pull
from mapsync.agent.verify import verify_installed
from mapsync.publish.publisher import Publisher
from mapsync.sources import open_source
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import (
    add_account,
    lookup,
    read_state,
    set_dirs,
    tree_snapshot,
)
from tests.helpers.disk import fill, tmpfs_mounts

MAPS = ("domains", "recipients", "virtual", "transport")

# A reader in its own process, like a Postfix or Exim process next to the agent.
# Pass 1 opens every map by its path in the target, as the daemons do: that must never fail,
# and every file read must be, byte for byte, the text or cdb of one published release.
# Pass 2 resolves .mapsync/current once and reads the whole set through that one directory:
# all files must belong to the manifest found there (no mixed set). If that directory is
# retired (deleted) between resolving and reading, the pass is counted, not failed: a
# daemon never reads through .mapsync, and the retired inodes are the point of the swap.
_READER = r"""
import hashlib, json, os, sys
import cdblib, cdbx

target, releases, stop, out = sys.argv[1:5]
maps = ["domains", "recipients", "virtual", "transport"]
known = {}          # file name -> {sha256: serial}
manifests = {}      # serial -> manifest dict

def rescan():
    for name in os.listdir(releases):
        if not name.isdigit() or int(name) in manifests:
            continue
        try:
            with open(os.path.join(releases, name, "MANIFEST.json"), "rb") as fh:
                m = json.load(fh)
        except (FileNotFoundError, ValueError):
            continue   # being published right now
        manifests[m["serial"]] = m
        for entry in m["maps"].values():
            known.setdefault(entry["file"], {})[entry["sha256"]] = m["serial"]
            known.setdefault(entry["cdb"]["file"], {})[entry["cdb"]["sha256"]] = m["serial"]

def which(name, data):
    digest = hashlib.sha256(data).hexdigest()
    if digest not in known.get(name, {}):
        rescan()
    return known.get(name, {}).get(digest)

errors, serials_by_path, serials_by_set = [], set(), set()
passes = set_passes = retired = 0
while not os.path.exists(stop):
    passes += 1
    for m in maps:
        for f in (m, m + ".cdb"):
            path = os.path.join(target, f)
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError as exc:
                errors.append(f"open {f}: {exc}")
                continue
            serial = which(f, data)
            if serial is None:
                errors.append(f"{f}: {len(data)} bytes match no published release")
                continue
            serials_by_path.add(serial)
            if f == "recipients.cdb":
                if cdblib.Reader(data).get(b"postmaster@example-1.org") != b"OK":
                    errors.append("pure-cdb: postmaster@example-1.org not found")
                try:
                    db = cdbx.CDB(path)
                except OSError as exc:
                    errors.append(f"cdbx open {f}: {exc}")
                    continue
                try:
                    if db.get(b"postmaster@example-1.org") != b"OK":
                        errors.append("cdbx: postmaster@example-1.org not found")
                finally:
                    db.close()
    try:
        fd = os.open(os.path.join(target, ".mapsync", "current"), os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        errors.append(f"resolve current: {exc}")
        continue
    try:
        def read(name):
            g = os.open(name, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(g, "rb") as fh:
                return fh.read()
        m = json.loads(read("MANIFEST.json"))
        for entry in m["maps"].values():
            for f, want in ((entry["file"], entry["sha256"]), (entry["cdb"]["file"], entry["cdb"]["sha256"])):
                if hashlib.sha256(read(f)).hexdigest() != want:
                    errors.append(f"mixed set: {f} is not the one of serial {m['serial']}")
        serials_by_set.add(m["serial"])
        set_passes += 1
    except FileNotFoundError:
        retired += 1
    finally:
        os.close(fd)

with open(out, "w") as fh:
    json.dump({"errors": errors[:50], "n_errors": len(errors), "passes": passes,
               "set_passes": set_passes, "retired": retired,
               "serials_by_path": sorted(serials_by_path),
               "serials_by_set": sorted(serials_by_set)}, fh)
"""


def _publish(c: Cluster) -> None:
    pub = c.config().need_publisher()
    Publisher(pub, lambda: open_source(pub.database, pub.schema)).run()


def _pull(c: Cluster) -> str:
    agent = c.config().need_agent()
    return pull(agent, agent.channels["mx"]).action


def _installed_serial(c: Cluster) -> int:
    agent = c.config().need_agent()
    return verify_installed(agent, agent.channels["mx"])


def test_readers_never_see_a_missing_or_mixed_set_during_ten_swaps(
    cluster: Cluster, tmp_path: Path
) -> None:
    _publish(cluster)
    _pull(cluster)
    stop, out, err = tmp_path / "stop", tmp_path / "reader.json", tmp_path / "reader.err"
    with open(err, "wb") as err_fh:
        reader = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _READER,
                str(cluster.target),
                str(cluster.repo / "mx" / "releases"),
                str(stop),
                str(out),
            ],
            stderr=err_fh,
        )
    try:
        time.sleep(0.2)
        for i in range(10):
            add_account(cluster, f"zz-swap-{i}")
            _publish(cluster)
            assert _pull(cluster) == "installed"
            time.sleep(0.02)
    finally:
        stop.touch()
        reader.wait(timeout=30)
    assert reader.returncode == 0, err.read_text()
    result = json.loads(out.read_text())
    print(f"\n[reader] {result}")
    assert result["n_errors"] == 0, result["errors"]
    assert result["passes"] > 50, result
    assert result["set_passes"] > 50, result
    # The reader really ran across the swaps: it saw the first, the last and releases between.
    assert 1 in result["serials_by_set"] and 11 in result["serials_by_set"], result
    assert len(result["serials_by_path"]) >= 4, result
    assert _installed_serial(cluster) == 11
    assert set_dirs(cluster) == ["11", "current"]


def _latest(c: Cluster) -> int:
    return int(json.loads((c.repo / "mx" / "LATEST").read_text())["serial"])


def _check_complete(c: Cluster, allowed: set[int]) -> int:
    """The target holds a complete, verified set of one of ``allowed``; return its serial."""
    serial = _installed_serial(c)  # signature + every file hash, through the target's links
    assert serial in allowed, (serial, allowed)
    for name in MAPS:
        assert (c.target / name).is_file() and (c.target / f"{name}.cdb").is_file()
    assert lookup(c, "postmaster@example-1.org") == "OK"
    return serial


def test_killing_the_agent_at_any_instant_leaves_a_complete_set(
    tmp_path: Path, sqlite_url: str
) -> None:
    c = make_cluster(tmp_path / "c", sqlite_url, accounts=3000, domains=20, aliases=300)
    _publish(c)
    _pull(c)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "mapsync", "-v", "--config", str(c.config_path), "pull"]

    # How long an uncontended pull takes, to spread the kills over all of it.
    add_account(c, "zz-kill-timing")
    _publish(c)
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    span = time.monotonic() - started

    rng = random.Random(20240611)
    installed = _check_complete(c, {2})
    outcomes = []
    for i in range(10):
        add_account(c, f"zz-kill-{i}")
        _publish(c)
        latest = _latest(c)
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
        )
        if i % 2 == 0:
            # Anywhere in the run: start-up, rsync, verification, build, swap, state.
            time.sleep(rng.uniform(0, span))
        else:
            # Aimed at the install: right after verification, a little later each time.
            assert proc.stdout is not None
            for line in proc.stdout:
                if "release verified" in line:
                    break
            time.sleep(rng.uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        serial = _check_complete(c, set(range(installed, latest + 1)))
        outcomes.append(f"{installed}->{serial}" if serial != installed else f"kept {serial}")
        installed = serial
    print(f"\n[kill] an uncontended pull takes {span:.2f}s; after each kill: {outcomes}")

    add_account(c, "zz-after-kills")
    _publish(c)
    p = c.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "installed serial" in p.stdout
    final = _check_complete(c, {_latest(c)})
    assert set_dirs(c) == [str(final), "current"]  # half-built and retired sets are gone
    assert not (c.state / "mx" / "incoming").exists()
    assert read_state(c)["last_error"] is None
    assert lookup(c, "zz-after-kills@example-1.org") == "OK"


def test_a_killed_run_still_owes_its_reload_hook(cluster: Cluster) -> None:
    log = cluster.root / "reloads"
    slow = f"echo start >> {log}; sleep 30; echo done >> {log}"
    cluster.write_config(extra_agent=f"reload = {json.dumps(['sh', '-c', slow])}")
    cluster.publish()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mapsync", "--config", str(cluster.config_path), "pull"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the hook's sleep dies with it
    )
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and log.read_text()):
            assert time.monotonic() < deadline, "the reload hook never started"
            assert proc.poll() is None, "pull ended before its reload hook ran"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert log.read_text() == "start\n"  # killed half-way through the reload
    assert _installed_serial(cluster) == 1  # the swap itself was done

    cluster.write_config(extra_agent=f"reload = {json.dumps(['sh', '-c', f'echo again >> {log}'])}")
    p = cluster.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "serial 1 is current" in p.stdout
    assert log.read_text() == "start\nagain\n", "the owed reload was not run"
    assert read_state(cluster)["reload_pending"] is False
    cluster.pull()
    assert log.read_text() == "start\nagain\n"


# -- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], None]]:
    with tmpfs_mounts() as mount:
        yield mount


@pytest.mark.parametrize("headroom", [0, 8, 20], ids=lambda k: f"{k}k-free")
def test_a_full_disk_keeps_the_old_set_serving(
    tmp_path: Path, sqlite_url: str, tmpfs: Callable[[Path, str], None], headroom: int
) -> None:
    c = make_cluster(tmp_path / "c", sqlite_url)
    tmpfs(c.target, "512k")  # the live maps on their own small file system
    c.publish()
    c.pull()
    assert lookup(c, "postmaster@example-1.org") == "OK"

    filler = c.target / "filler"
    written = fill(filler)
    os.truncate(filler, written - headroom * 1024)  # room for a few files of the new set
    print(f"\n[disk] filled the 512k tmpfs with {written:,} bytes, then freed {headroom}k")
    add_account(c, "zz-full")
    c.publish()
    before = tree_snapshot(c.target)
    p = c.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    print(f"[disk] {p.stderr.strip()}")
    assert "installing serial 2 failed" in p.stderr
    assert "No space left on device" in p.stderr
    assert "the old set keeps serving" in p.stderr
    assert tree_snapshot(c.target) == before  # no half-built set left behind either
    assert lookup(c, "postmaster@example-1.org") == "OK"
    assert lookup(c, "zz-full@example-1.org") is None
    assert _installed_serial(c) == 1
    st = c.cli("status")
    assert st.returncode == 1 and "No space left on device" in st.stdout, st.stdout

    filler.unlink()
    p = c.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "installed serial 2 (was 1)" in p.stdout
    assert lookup(c, "zz-full@example-1.org") == "OK"
    assert set_dirs(c) == ["2", "current"]


def test_a_set_left_behind_by_a_kill_after_the_swap_is_deleted_by_the_next_pull(
    cluster: Cluster,
) -> None:
    """If the agent dies between switching `current` and deleting the old set, the old inodes
    would live on and a running Postfix would never notice; the next run, even one with
    nothing new to install, must finish the job."""
    cluster.publish()
    cluster.pull()
    sets = cluster.target / ".mapsync"
    live = sets / os.readlink(sets / "current")
    stale = sets / "0"
    shutil.copytree(live, stale)  # what the killed run would have left: a full old set
    (sets / "7.new").mkdir()  # and a half-built one
    (cluster.target / "transport.cdb").unlink()  # and a link it never made
    out = cluster.pull().stdout
    assert "is current" in out
    assert sorted(os.listdir(sets)) == sorted([live.name, "current"])
    assert os.readlink(cluster.target / "transport.cdb") == ".mapsync/current/transport.cdb"
    assert cluster.cli("verify").returncode == 0

"""``mapsync mirror SOURCE DEST``: a repository copy kept in step for nodes to pull from.

Real parts only: a publisher's repository served by a real ``rsync --daemon`` on loopback,
the mirror copying from it into a directory that a second daemon serves, and an agent
installing from that second daemon. What must hold: a release appears in DEST whole before
the LATEST that names it, LATEST never names missing files nor moves backwards, old releases
go only after LATEST moved, and a run with nothing new changes nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mapsync.release import MANIFEST, MANIFEST_PATCH, SIGNATURE
from mapsync.signing import keygen, load_private, sign
from tests.conftest import Cluster
from tests.helpers.agent import add_account, lookup, tree_snapshot
from tests.helpers.agent_damage import flip_byte_keep_stat
from tests.helpers.disk import fill, tmpfs_mounts
from tests.helpers.processes import started, terminated, wait_for_children
from tests.helpers.publisher import add_channels
from tests.helpers.rsyncd import documented_rsyncd_conf, serving
from tests.helpers.transport import RsyncDaemon, SilentListener, sshd


@pytest.fixture
def upstream(cluster: Cluster, tmp_path: Path) -> Iterator[RsyncDaemon]:
    """The publisher's whole repository as an rsync daemon module (what a mirror copies)."""
    d = RsyncDaemon(tmp_path / "rsyncd-upstream", cluster.repo)
    try:
        yield d
    finally:
        d.stop()


def repo_url(d: RsyncDaemon) -> str:
    return f"rsync://127.0.0.1:{d.port}/{d.module}"


def mirror(
    cluster: Cluster, source: str | Path, dest: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return cluster.cli("mirror", str(source), str(dest), *args)


def latest(channel: Path) -> dict[str, object]:
    data = json.loads((channel / "LATEST").read_bytes())
    assert isinstance(data, dict)
    return data


def releases(channel: Path) -> list[int]:
    return sorted(int(p.name) for p in (channel / "releases").iterdir())


def mirrored(cluster: Cluster, upstream: RsyncDaemon, tmp_path: Path) -> Path:
    """Serial 1 published and mirrored into ``tmp_path/mirror``; that directory."""
    cluster.publish()
    dest = tmp_path / "mirror"
    assert mirror(cluster, repo_url(upstream), dest).returncode == 0
    return dest


def served(dest: Path) -> dict[str, tuple[object, ...]]:
    """What DEST serves: every entry under it but the run note every run rewrites."""
    return {k: v for k, v in tree_snapshot(dest).items() if k != ".mirror.json"}


def status(cluster: Cluster, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cluster.cli("status", "--mirror", str(dest), *args)


def publish_new(cluster: Cluster, n: int) -> None:
    for i in range(n):
        add_account(cluster, f"zz-mirror-{time.monotonic_ns()}-{i}")
        cluster.publish()


def test_an_agent_installs_from_a_mirror_kept_in_step(
    cluster: Cluster, upstream: RsyncDaemon, tmp_path: Path
) -> None:
    cluster.publish()
    dest = tmp_path / "mirror"
    p = mirror(
        cluster,
        repo_url(upstream),
        dest,
        "--trusted-key",
        str(cluster.root / "keys" / "signing.pub"),
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("mx: serial 1 mirrored, copied release 1; "), p.stdout
    served = RsyncDaemon(tmp_path / "rsyncd-mirror", dest)
    try:
        cluster.write_config(source=served.url())
        assert "mx: installed serial 1" in cluster.pull().stdout
        assert lookup(cluster, "postmaster@example-1.org") == "OK"

        new = add_account(cluster, "zz-via-mirror")
        cluster.publish()
        p = mirror(cluster, repo_url(upstream), dest)
        assert p.returncode == 0, p.stderr
        assert "mx: serial 2 mirrored (was 1), copied release 2; " in p.stdout
        asked = len(served.log.read_text())
        pulled = cluster.pull()
        assert "installed serial 2 (was 1)" in pulled.stdout
        assert lookup(cluster, new) == "OK"
        # The mirror served it: one rsync for LATEST, the signature and the patches, the
        # manifest's among them (the mirror proved it on release 1's manifest).
        assert re.findall(r"rsync on (\S+)", served.log.read_text()[asked:]) == ["mapsync/mx/"]
        assert (dest / "mx" / "patches" / "2" / MANIFEST_PATCH).read_bytes() == (
            cluster.repo / "mx" / "patches" / "2" / MANIFEST_PATCH
        ).read_bytes()
        assert cluster.cli("verify").returncode == 0
    finally:
        served.stop()
    # The copy is the publisher's, byte for byte and to the nanosecond (the nodes' rsync quick
    # check and delta basis work whichever of the two served them), readable by the daemon's
    # user, and an unchanged map is one file shared by both releases.
    for serial in (1, 2):
        for f in (cluster.repo / "mx" / "releases" / str(serial)).iterdir():
            copy = dest / "mx" / "releases" / str(serial) / f.name
            assert copy.read_bytes() == f.read_bytes()
            assert copy.stat().st_mtime_ns == f.stat().st_mtime_ns
            assert copy.stat().st_mode & 0o777 == 0o644
    r1, r2 = (dest / "mx" / "releases" / s for s in ("1", "2"))
    assert (r1 / "transport").stat().st_ino == (r2 / "transport").stat().st_ino
    assert (dest / "mx" / "LATEST").read_bytes() == (cluster.repo / "mx" / "LATEST").read_bytes()
    assert not (dest / "mx" / ".staging").exists()


def test_a_manifest_patch_that_does_not_give_the_manifest_is_not_mirrored(
    cluster: Cluster, upstream: RsyncDaemon, tmp_path: Path
) -> None:
    dest = mirrored(cluster, upstream, tmp_path)
    publish_new(cluster, 1)
    patch = cluster.repo / "mx" / "patches" / "2" / MANIFEST_PATCH
    patch.write_bytes(patch.read_bytes().replace(b'"serial": 2', b'"serial": 9'))
    p = mirror(cluster, repo_url(upstream), dest)
    assert p.returncode == 0, p.stderr
    assert "manifest patch not mirrored" in p.stderr
    assert f"mx/patches/2/{MANIFEST_PATCH}" in p.stderr
    assert "does not give the release's manifest" in p.stderr
    assert not (dest / "mx" / "patches" / "2" / MANIFEST_PATCH).exists()
    assert (dest / "mx" / "patches" / "2" / "recipients.patch").is_file()  # the maps' are


def test_a_mirror_catching_up_several_releases_serves_each_ones_manifest_patch(
    cluster: Cluster, upstream: RsyncDaemon, tmp_path: Path
) -> None:
    """A mirror that was down while the publisher made serials 2-4 copies 4 first, then 3
    and 2: when each was copied, the manifest it follows was not here to prove its patch on.
    A node that pulled 3 from the publisher meanwhile must still get 4 from the mirror as
    from the publisher: one connection, the manifest from its patch."""
    dest = mirrored(cluster, upstream, tmp_path)
    cluster.write_config(source=upstream.url())
    publish_new(cluster, 2)
    assert "installed serial 3" in cluster.pull().stdout
    publish_new(cluster, 1)
    p = mirror(cluster, repo_url(upstream), dest)
    assert p.returncode == 0, p.stderr
    assert "copied releases 4, 3, 2;" in p.stdout
    assert "not mirrored" not in p.stderr
    for serial in (2, 3, 4):
        patches = cluster.repo / "mx" / "patches" / str(serial)
        assert sorted(os.listdir(dest / "mx" / "patches" / str(serial))) == sorted(
            os.listdir(patches)
        )
        assert (dest / "mx" / "patches" / str(serial) / MANIFEST_PATCH).read_bytes() == (
            patches / MANIFEST_PATCH
        ).read_bytes()
    served = RsyncDaemon(tmp_path / "rsyncd-mirror", dest)
    try:
        cluster.write_config(source=served.url())
        pulled = cluster.pull()
        assert "installed serial 4 (was 3)" in pulled.stdout, pulled.stdout + pulled.stderr
        assert re.findall(r"rsync on (\S+)", served.log.read_text()) == ["mapsync/mx/"]
    finally:
        served.stop()
    before = tree_snapshot(dest / "mx")
    p = mirror(cluster, repo_url(upstream), dest, "--verify")
    assert p.returncode == 0, p.stderr
    assert "damaged" not in p.stdout and tree_snapshot(dest / "mx") == before


@pytest.mark.parametrize("rollback", [False, True], ids=["map-patches", "rollback"])
def test_a_source_without_the_releases_patches_is_mirrored_without_them(
    cluster: Cluster, upstream: RsyncDaemon, tmp_path: Path, rollback: bool
) -> None:
    """A publisher or mirror of an earlier version has no ``patches/<serial>/`` (for a
    release whose manifest names map patches, or a rollback's, which names none): the
    release is served without them, its nodes fetch the text and the manifest."""
    dest = mirrored(cluster, upstream, tmp_path)
    publish_new(cluster, 1)
    serial = 2
    if rollback:
        assert mirror(cluster, repo_url(upstream), dest).returncode == 0
        r = cluster.cli("rollback", "--publisher", "--channel", "mx", "1")
        assert r.returncode == 0, r.stderr
        serial = 3
    shutil.rmtree(cluster.repo / "mx" / "patches" / str(serial))
    p = mirror(cluster, repo_url(upstream), dest)
    assert p.returncode == 0, p.stderr
    assert f"mx: serial {serial} mirrored" in p.stdout
    assert ("patches not mirrored" in p.stderr) is not rollback  # a rollback names none
    assert "manifest patch not mirrored" not in p.stderr
    assert not (dest / "mx" / "patches" / str(serial)).exists()
    assert latest(dest / "mx")["serial"] == serial


def test_a_second_run_with_nothing_new_changes_nothing(
    cluster: Cluster, upstream: RsyncDaemon, tmp_path: Path
) -> None:
    dest = mirrored(cluster, upstream, tmp_path)
    before = served(dest)
    log_before = upstream.log.read_text()
    p = mirror(cluster, repo_url(upstream), dest)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "mx: serial 1 is current\n"
    assert served(dest) == before  # no file written, replaced or touched, but the run's note
    asked = upstream.log.read_text()[len(log_before) :]
    assert "mapsync/mx/LATEST" in asked and "releases" not in asked  # one small fetch, no more


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_a_release_that_cannot_be_copied_whole_never_gets_a_latest(
    cluster: Cluster, upstream: RsyncDaemon, tmp_path: Path, damage: str
) -> None:
    """A map of the new release is gone from (or altered at) the source: the mirror exits
    non-zero, its LATEST still names the old release, which still serves, and nothing of the
    new one is visible. Once the source is whole again, the next run copies it."""
    dest = mirrored(cluster, upstream, tmp_path)
    publish_new(cluster, 1)
    recipients = cluster.repo / "mx" / "releases" / "2" / "recipients"
    good = recipients.read_bytes()
    stat = recipients.stat()
    if damage == "missing":
        recipients.unlink()
    else:
        data = bytearray(good)
        data[-2] ^= 0x01  # same size: only the sha256 can tell
        recipients.write_bytes(bytes(data))
        os.utime(recipients, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = (dest / "mx" / "LATEST").read_bytes()

    p = mirror(cluster, repo_url(upstream), dest)
    assert p.returncode == 5, p.stdout + p.stderr
    why = "missing or not a regular file" if damage == "missing" else "does not match the manifest"
    assert "mapsync: channel mx: " in p.stderr and "releases/2/recipients" in p.stderr, p.stderr
    assert why in p.stderr and "nothing of release 2 is served" in p.stderr
    assert (dest / "mx" / "LATEST").read_bytes() == before
    assert releases(dest / "mx") == [1]
    assert not (dest / "mx" / ".staging").exists()
    served = RsyncDaemon(tmp_path / "rsyncd-mirror", dest)
    try:
        cluster.write_config(source=served.url())
        assert "mx: installed serial 1" in cluster.pull().stdout  # the old release still serves

        recipients.write_bytes(good)
        os.utime(recipients, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        p = mirror(cluster, repo_url(upstream), dest)
        assert p.returncode == 0, p.stderr
        assert "mx: serial 2 mirrored (was 1), copied release 2" in p.stdout
        assert "installed serial 2 (was 1)" in cluster.pull().stdout
    finally:
        served.stop()


def test_a_mirror_never_goes_backwards(cluster: Cluster, tmp_path: Path) -> None:
    cluster.publish()
    stale = tmp_path / "stale"  # a copy of the repository at serial 1, as a stale upstream
    subprocess.run(["rsync", "-a", f"{cluster.repo}/", f"{stale}/"], check=True)
    publish_new(cluster, 1)
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    before = served(dest)

    p = mirror(cluster, stale, dest)
    assert p.returncode == 5, p.stdout + p.stderr
    assert f"{stale}/mx/LATEST: serial 1 is lower than 2" in p.stderr
    assert "refusing to go backwards, nothing changed" in p.stderr
    # The way back, where the mirror's own serial is the wrong one, is named.
    assert f"remove {dest}/mx/LATEST and run again" in p.stderr
    assert served(dest) == before
    # The refusal is the mirror's last run, for monitoring: WARNING, naming it.
    st = status(cluster, dest)
    assert st.returncode == 1, st.stdout
    assert st.stdout.startswith("MAPSYNC MIRROR WARNING - last run failed "), st.stdout
    assert "channel mx: " in st.stdout and "serial 1 is lower than 2" in st.stdout

    # The same serial with another manifest (a publisher restored and republished): refused too.
    forged = json.loads((stale / "mx" / "LATEST").read_bytes())
    forged["serial"] = 2
    (stale / "mx" / "LATEST").write_text(json.dumps(forged))
    p = mirror(cluster, stale, dest)
    assert p.returncode == 5, p.stdout + p.stderr
    assert "serial 2 names another manifest than the one this mirror serves" in p.stderr
    assert served(dest) == before


def test_a_publisher_restored_from_an_older_backup_gets_its_releases_back_from_a_mirror(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The refusal said what to do only when the mirror's own serial was wrong; for a
    publisher restored from a backup the way back (nodes refuse anything lower than what they
    installed) is to bring its lost releases back from a mirror before it publishes again."""
    trusted = str(cluster.root / "keys" / "signing.pub")
    cluster.publish()
    backup = tmp_path / "backup"
    subprocess.run(["rsync", "-a", f"{cluster.repo}/", f"{backup}/"], check=True)
    publish_new(cluster, 2)
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    shutil.rmtree(cluster.repo)
    subprocess.run(["rsync", "-a", f"{backup}/", f"{cluster.repo}/"], check=True)

    p = mirror(cluster, cluster.repo, dest)
    assert p.returncode == 5, p.stdout + p.stderr
    assert "A publisher restored from an older backup gets back what it had published" in (
        " ".join(p.stderr.split())
    )
    p = mirror(cluster, dest, cluster.repo, "--trusted-key", trusted)  # as the message says
    assert p.returncode == 0, p.stdout + p.stderr
    assert latest(cluster.repo / "mx")["serial"] == 3
    publish_new(cluster, 1)
    p = mirror(cluster, cluster.repo, dest)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mx: serial 4 mirrored (was 3)" in p.stdout
    assert "mx: installed serial 4" in cluster.pull().stdout


def test_old_releases_are_pruned_after_latest_moves(cluster: Cluster, tmp_path: Path) -> None:
    cluster.publish()
    publish_new(cluster, 3)  # serials 1..4 at the publisher
    dest = tmp_path / "mirror"
    p = mirror(cluster, cluster.repo, dest, "--keep", "2")
    assert p.returncode == 0, p.stderr
    assert "mx: serial 4 mirrored, copied releases 4, 3; " in p.stdout  # only what is kept
    assert releases(dest / "mx") == [3, 4]

    publish_new(cluster, 1)
    p = cluster.cli("--log-format", "json", "mirror", str(cluster.repo), str(dest), "--keep", "2")
    assert p.returncode == 0, p.stderr
    assert "mx: serial 5 mirrored (was 4), copied release 5, pruned release 3; " in p.stdout
    assert releases(dest / "mx") == [4, 5] and latest(dest / "mx")["serial"] == 5
    # The log shows the order: the new release copied, then LATEST, and only then the prune.
    events = [json.loads(line)["event"] for line in p.stderr.splitlines() if line.startswith("{")]
    assert events == ["release copied", "LATEST moved", "old releases pruned"], p.stderr

    # Without --keep the mirror keeps what the source keeps: the publisher keeps 2 releases.
    cluster.write_config(extra_publisher="keep = 2")
    publish_new(cluster, 1)
    assert releases(cluster.repo / "mx") == [5, 6]
    assert mirror(cluster, cluster.repo, dest, "--keep", "5").returncode == 0
    assert releases(dest / "mx") == [4, 5, 6]
    p = mirror(cluster, cluster.repo, dest)
    assert p.stdout == "mx: serial 6 is current\n"  # LATEST did not move: nothing pruned yet
    publish_new(cluster, 1)
    p = mirror(cluster, cluster.repo, dest)
    assert p.returncode == 0, p.stderr
    assert "mx: serial 7 mirrored (was 6), copied release 7, pruned releases 4, 5; " in p.stdout
    assert releases(dest / "mx") == releases(cluster.repo / "mx") == [6, 7]


def test_channel_mirrors_only_the_channels_named(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_config(extra_publisher='[publisher.channels.relay]\nmaps = ["domains"]\n')
    cluster.publish()
    assert (cluster.repo / "relay" / "LATEST").exists()
    dest = tmp_path / "mirror"
    p = mirror(cluster, cluster.repo, dest, "--channel", "relay")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("relay: serial 1 mirrored, copied release 1; "), p.stdout
    assert sorted(x.name for x in dest.iterdir() if not x.name.startswith(".")) == ["relay"]

    p = mirror(cluster, cluster.repo, dest)  # every channel the source has; never .private
    assert p.returncode == 0, p.stderr
    assert "mx: serial 1 mirrored" in p.stdout and "relay: serial 1 is current" in p.stdout
    assert sorted(x.name for x in dest.iterdir()) == [".lock", ".mirror.json", "mx", "relay"]

    p = mirror(cluster, cluster.repo / "mx", tmp_path / "wrong")  # a channel, not a repository
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"{cluster.repo / 'mx'}: holds a LATEST, so it is one channel's directory" in p.stderr

    p = mirror(cluster, cluster.repo, dest, "--channel", "nope")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "mapsync: channel nope: rsync failed" in p.stderr


def test_dest_inside_source_is_refused(cluster: Cluster) -> None:
    cluster.publish()
    p = mirror(cluster, cluster.repo, cluster.repo / "copy")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "is (inside) SOURCE" in p.stderr
    assert not (cluster.repo / "copy").exists()


def test_a_timeout_below_one_second_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    cluster.publish()
    p = mirror(cluster, cluster.repo, tmp_path / "mirror", "--timeout", "-5")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "mirror --timeout: must be at least 1 (seconds), not -5" in p.stderr
    assert not (tmp_path / "mirror").exists()


def test_a_dest_that_is_a_file_is_refused_naming_it(cluster: Cluster, tmp_path: Path) -> None:
    cluster.publish()
    dest = tmp_path / "mirror"
    dest.write_text("the operator's file\n")
    p = mirror(cluster, cluster.repo, dest)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"DEST {dest} is not a directory" in p.stderr
    assert dest.read_text() == "the operator's file\n"


def test_mirror_interval_follows_the_publisher_and_stops_cleanly_on_sigterm(
    cluster: Cluster, upstream: RsyncDaemon, tmp_path: Path
) -> None:
    cluster.publish()
    dest = tmp_path / "mirror"
    argv = [sys.executable, "-m", "mapsync", "mirror", repo_url(upstream), str(dest)]
    # Unbuffered, read as it comes: SIGTERM goes once the run that mirrored serial 2 has said
    # so (LATEST is written before the run prints, so LATEST alone would race the print).
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*argv, "--interval", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    errors: list[str] = []
    readers = [
        threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, ""))),  # type: ignore[union-attr]
        threading.Thread(target=lambda: errors.extend(iter(proc.stderr.readline, ""))),  # type: ignore[union-attr]
    ]
    for reader in readers:
        reader.start()
    try:
        publish_new(cluster, 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("mx: serial 2 mirrored" in x for x in lines):
            time.sleep(0.1)
        assert latest(dest / "mx")["serial"] == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for reader in readers:
            reader.join(10)
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()  # type: ignore[union-attr]
    out = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(errors)
    assert "mx: serial 2 mirrored" in out
    assert "mx: serial 2 is current" not in out  # the loop prints only what changed
    assert not (dest / "mx" / ".staging").exists()
    assert releases(dest / "mx") == [1, 2]


def test_sighup_with_a_broken_trusted_key_logs_it_and_mirrors_on_and_a_good_one_restarts(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The mirror has no config file, but reads its --trusted-key files at start: SIGHUP
    (`systemctl reload`) with one that no longer loads must not end it (systemd would
    restart it into the same error every 10 s, and DEST would go stale)."""
    cluster.publish()
    key = tmp_path / "trusted.pub"
    good = (cluster.root / "keys" / "signing.pub").read_bytes()
    key.write_bytes(good)
    dest = tmp_path / "mirror"
    argv = [sys.executable, "-m", "mapsync", "--log-format", "json", "mirror"]
    argv += [str(cluster.repo), str(dest), "--trusted-key", str(key), "--interval", "1"]
    err = tmp_path / "mirror.err"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while not (dest / "mx" / "LATEST").exists():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        key.write_text("not a key\n")  # an operator's botched key rotation
        proc.send_signal(signal.SIGHUP)
        while "config not reloaded" not in err.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        refused = [json.loads(x) for x in err.read_text().splitlines() if "not reloaded" in x]
        assert refused[0]["level"] == "error"
        assert f"{key}: not a PEM public key" in refused[0]["event"]
        assert refused[0]["event"].endswith("; running on with the config loaded before")
        publish_new(cluster, 1)  # still mirroring, with the key it read at start
        while latest(dest / "mx")["serial"] != 2:
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        key.write_bytes(good)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=5) == 128 + signal.SIGHUP, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err.read_text()
    assert not (dest / "mx" / ".staging").exists()


SCALING_MD = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"


def _listed(url: str, password: Path) -> list[str]:
    """The names an rsync daemon module serves (``rsync -r --list-only``)."""
    listing = subprocess.run(
        ["rsync", "-r", "--list-only", f"--password-file={password}", f"{url}/"],
        capture_output=True,
        text=True,
    )
    assert listing.returncode == 0, listing.stderr
    return [line.split()[-1] for line in listing.stdout.splitlines() if line.strip()]


def test_the_documented_mirror_module_serves_the_repository_without_its_private_notes(
    cluster: Cluster, tmp_path: Path
) -> None:
    """docs/scaling.md's ``[mapsync-all]`` module under docs/security.md's global section,
    with a password: the mirror copies every channel through it, and nothing of ``.private``
    nor any other dot-file is served."""
    cluster.publish()
    assert (cluster.repo / ".private").is_dir()
    blocks = re.findall(r"^```\n(.*?)^```$", SCALING_MD.read_text(), re.S | re.M)
    (module,) = [b for b in blocks if b.startswith("[mapsync-all]")]
    conf = documented_rsyncd_conf().split("\n[", 1)[0] + "\n" + module
    daemon = tmp_path / "rsyncd"
    daemon.mkdir()
    (daemon / "secrets").write_text("mirror:mirror-secret\n")
    (daemon / "secrets").chmod(0o600)
    # Root and no chroot only because pytest's temporary directories are 0700 (as in
    # test_documented_rsyncd); loopback stands in for the mirrors' addresses.
    for doc, here in (("uid = nobody", "uid = root"), ("gid = nogroup", "gid = root"),
                      ("use chroot = yes", "use chroot = no"),
                      ("path = /srv/mapsync", f"path = {cluster.repo}"),
                      ("/etc/rsyncd.secrets", str(daemon / "secrets")),
                      ("hosts allow = 192.0.2.21 192.0.2.22 192.0.2.23 192.0.2.24",
                       "hosts allow = 127.0.0.1")):  # fmt: skip
        assert doc in conf, doc
        conf = conf.replace(doc, here)
    password = tmp_path / "mirror.password"
    password.write_text("mirror-secret\n")
    password.chmod(0o600)
    dest = tmp_path / "mirror"
    with serving(conf, daemon) as port:
        url = f"rsync://mirror@127.0.0.1:{port}/mapsync-all"
        p = mirror(cluster, url, dest, "--password-file", str(password))
        assert p.returncode == 0, p.stderr
        assert "mx: serial 1 mirrored, copied release 1" in p.stdout
        names = _listed(url, password)
        assert "mx/releases/1/recipients" in names and "mx/LATEST" in names
        hidden = [n for n in names if n != "." and any(p.startswith(".") for p in n.split("/"))]
        assert hidden == [], hidden  # .private/, .lock, .publisher.json: never served
        no_password = mirror(cluster, url, tmp_path / "other")
        assert no_password.returncode == 2
        assert "asks for a password" in no_password.stderr, no_password.stderr
    assert sorted(x.name for x in dest.iterdir()) == [".lock", ".mirror.json", "mx"]
    # The mirror's own copy, served with the same module (a mirror of this mirror, or a
    # publisher restored from it): its run note is not served either.
    with serving(conf.replace(f"path = {cluster.repo}", f"path = {dest}"), daemon) as port:
        url = f"rsync://mirror@127.0.0.1:{port}/mapsync-all"
        names = _listed(url, password)
        assert "mx/LATEST" in names
        assert [n for n in names if n != "." and n.startswith(".")] == []  # .mirror.json, .lock
        # and a mirror of the mirror copies channels only: no note of another mirror's
        second = tmp_path / "second"
        p = mirror(cluster, url, second, "--password-file", str(password))
        assert p.returncode == 0, p.stderr
        note = json.loads((second / ".mirror.json").read_text())
        assert note["source"] == url and list(note["channels"]) == ["mx"]


def test_a_mirror_copies_over_ssh(cluster: Cluster, tmp_path: Path) -> None:
    cluster.publish()
    dest = tmp_path / "mirror"
    with sshd(tmp_path / "sshd") as server:
        p = mirror(cluster, server.url(str(cluster.repo)), dest, "--ssh", shlex.join(server.ssh))
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("mx: serial 1 mirrored, copied release 1; "), p.stdout
        again = mirror(
            cluster, server.url(str(cluster.repo)), dest, "--ssh", shlex.join(server.ssh)
        )
        assert again.stdout == "mx: serial 1 is current\n", again.stdout + again.stderr
    assert (dest / "mx" / "LATEST").read_bytes() == (cluster.repo / "mx" / "LATEST").read_bytes()


def test_trusted_key_refuses_a_foreign_signature_that_a_plain_mirror_copies(
    cluster: Cluster, tmp_path: Path
) -> None:
    """With --trusted-key the mirror refuses what the nodes would refuse; without it, it
    copies it (the mirror is untrusted; the nodes verify)."""
    cluster.publish()
    forged = tmp_path / "forged"
    subprocess.run(["rsync", "-a", f"{cluster.repo}/", f"{forged}/"], check=True)
    keygen(tmp_path / "intruder.key")
    release = forged / "mx" / "releases" / "1"
    (release / SIGNATURE).write_bytes(
        sign(load_private(tmp_path / "intruder.key"), (release / MANIFEST).read_bytes())
    )
    trusted = str(cluster.root / "keys" / "signing.pub")
    p = mirror(cluster, forged, tmp_path / "checked", "--trusted-key", trusted)
    assert p.returncode == 5, p.stdout + p.stderr
    assert "MANIFEST.json.sig" in p.stderr, p.stderr
    assert not (tmp_path / "checked" / "mx" / "LATEST").exists()
    assert not (tmp_path / "checked" / "mx" / "releases" / "1").exists()
    assert mirror(cluster, forged, tmp_path / "plain").returncode == 0


def test_a_damaged_copy_of_the_served_release_is_copied_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.publish()
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    served = dest / "mx" / "releases" / "1" / "recipients"
    served.write_bytes(served.read_bytes()[:-10])  # truncated on the mirror's disk
    p = mirror(cluster, cluster.repo, dest)
    assert p.returncode == 0, p.stderr
    assert "mx: serial 1 mirrored (was 1), copied release 1" in p.stdout
    assert "the copy here was damaged and is replaced" in p.stdout
    original = cluster.repo / "mx" / "releases" / "1" / "recipients"
    assert served.read_bytes() == original.read_bytes()
    assert mirror(cluster, cluster.repo, dest).stdout == "mx: serial 1 is current\n"


@pytest.mark.parametrize("damage", ["stray file", "edited in place, same size"])
def test_a_served_release_a_node_would_refuse_is_copied_again(
    cluster: Cluster, tmp_path: Path, damage: str
) -> None:
    """The quick check of the served release looked at sizes only: a file left beside the
    maps (an editor's, a README) or a map edited in place kept "serial 1 is current" while
    every node refused the release."""
    cluster.publish()
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    release = dest / "mx" / "releases" / "1"
    if damage == "stray file":
        (release / "README").write_text("note\n")
    else:
        served = release / "domains"
        data = bytearray(served.read_bytes())
        data[-2] ^= 0x01
        served.write_bytes(bytes(data))
    p = mirror(cluster, cluster.repo, dest)
    assert p.returncode == 0, p.stderr
    assert "mx: serial 1 mirrored (was 1), copied release 1" in p.stdout
    assert "the copy here was damaged and is replaced" in p.stdout
    assert sorted(os.listdir(release)) == sorted(os.listdir(cluster.repo / "mx" / "releases" / "1"))
    for f in os.listdir(release):
        assert (release / f).read_bytes() == (
            cluster.repo / "mx" / "releases" / "1" / f
        ).read_bytes()
    assert mirror(cluster, cluster.repo, dest).stdout == "mx: serial 1 is current\n"


def test_with_trusted_keys_a_signature_damaged_on_the_mirror_is_copied_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The quick check of the served release only looked for the signature file: one damaged
    on the mirror's disk kept "serial 1 is current" while every node refused the release
    ("signature file is not base64") and went to the next source."""
    trusted = str(cluster.root / "keys" / "signing.pub")
    cluster.publish()
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest, "--trusted-key", trusted).returncode == 0
    sig = dest / "mx" / "releases" / "1" / SIGNATURE
    data = bytearray(sig.read_bytes())
    data[10] ^= 0x01
    sig.write_bytes(bytes(data))
    p = mirror(cluster, cluster.repo, dest, "--trusted-key", trusted)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mx: serial 1 mirrored (was 1), copied release 1" in p.stdout, p.stdout
    assert "the copy here was damaged and is replaced" in p.stdout
    assert sig.read_bytes() == (cluster.repo / "mx" / "releases" / "1" / SIGNATURE).read_bytes()
    p = mirror(cluster, cluster.repo, dest, "--trusted-key", trusted)
    assert p.stdout == "mx: serial 1 is current\n"


def test_a_map_older_releases_left_newer_than_the_manifest_is_hashed_not_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    """An unchanged map keeps its first release's time in every later one (the publisher
    copies it with its time), and a clock ahead then makes it newer than a later manifest:
    the quick check hashes it, finds the release whole, and serves it."""
    cluster.publish()
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    for root in (cluster.repo, dest):
        served = root / "mx" / "releases" / "1" / "domains"
        ahead = served.stat().st_mtime_ns + 3600 * 10**9
        os.utime(served, ns=(ahead, ahead))
    assert mirror(cluster, cluster.repo, dest).stdout == "mx: serial 1 is current\n"


def test_a_file_damaged_on_the_mirror_is_not_linked_into_the_next_release(
    cluster: Cluster, tmp_path: Path
) -> None:
    """rsync's quick check trusts the delta basis (size and mtime): a map damaged on the
    mirror's disk, same size and time, would be hard-linked into the next release. The copy is
    checked, found altered, and fetched again without the basis."""
    cluster.publish()
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    damaged = dest / "mx" / "releases" / "1" / "transport"
    st = damaged.stat()
    data = bytearray(damaged.read_bytes())
    data[-2] ^= 0x01
    damaged.write_bytes(bytes(data))
    os.utime(damaged, ns=(st.st_atime_ns, st.st_mtime_ns))
    publish_new(cluster, 1)  # a new account: transport is unchanged
    assert (cluster.repo / "mx" / "releases" / "2" / "transport").stat().st_mtime_ns == (
        st.st_mtime_ns
    )
    p = mirror(cluster, cluster.repo, dest)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "copying again without the local delta basis" in p.stderr
    copy = dest / "mx" / "releases" / "2" / "transport"
    assert copy.read_bytes() == (cluster.repo / "mx" / "releases" / "2" / "transport").read_bytes()
    assert copy.stat().st_ino != damaged.stat().st_ino


def test_keep_below_two_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    cluster.publish()
    p = mirror(cluster, cluster.repo, tmp_path / "mirror", "--keep", "1")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "mapsync: mirror --keep: must be at least 2, not 1" in p.stderr
    assert not (tmp_path / "mirror").exists()


def test_a_dest_another_user_owns_is_refused_before_anything_is_written(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.publish()
    dest = tmp_path / "mirror"
    dest.mkdir()
    os.chown(dest, 65534, 65534)  # the mirror's user, say; mapsync runs as root here
    p = mirror(cluster, cluster.repo, dest)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"{dest}: the mirror's copy belongs to" in p.stderr and "nothing was written" in p.stderr
    assert list(dest.iterdir()) == []


def test_sigterm_while_rsync_waits_on_the_source_ends_it_and_leaves_dest_as_it_was(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.publish()
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    before = tree_snapshot(dest)  # the note too: a run ended by a signal did not fail
    with SilentListener() as silent:
        url = f"rsync://127.0.0.1:{silent.port}/mapsync"
        with started(cluster, "mirror", "--channel", "mx", url, str(dest)) as proc:
            end = terminated(proc, wait_for_children(proc, "rsync", 1))
    assert proc.returncode == 143, end.out + end.err
    assert "Traceback" not in end.err
    assert not end.left, f"rsync still running after mapsync exited: {end.left}"
    assert end.took < 5
    assert not (dest / "mx" / ".staging").exists()
    assert tree_snapshot(dest) == before


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], None]]:
    with tmpfs_mounts() as mount:
        yield mount


@pytest.mark.parametrize("headroom", [40, 64], ids=lambda k: f"{k}k-free")
def test_a_disk_nearly_full_still_moves_latest_to_the_release_copied(
    cluster: Cluster, tmp_path: Path, tmpfs: Callable[[Path, str], None], headroom: int
) -> None:
    """Room for the new release, not for the older ones SOURCE also has: the older copies
    came before LATEST and each failed one left its partial files in staging, so LATEST
    could not be written (ENOSPC) and the mirror never served the release it had copied,
    run after run, each adding one more."""
    cluster.publish()
    dest = tmp_path / "mirror"
    tmpfs(dest, "512k")
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    publish_new(cluster, 5)  # serials 2..6: the mirror lacks five
    filler = dest / "filler"
    os.truncate(filler, fill(filler) - headroom * 1024)
    p = mirror(cluster, cluster.repo, dest)
    assert "mx: serial 6 mirrored (was 1)" in p.stdout, p.stdout + p.stderr
    assert p.returncode == 0, p.stdout + p.stderr
    assert latest(dest / "mx")["serial"] == 6
    assert "older release 2 not copied" in p.stdout and "No space left on device" in p.stdout
    assert not (dest / "mx" / ".staging").exists()
    # Exit 0 (nodes fetch what LATEST names), but monitoring sees what is missing, also after
    # a run that found LATEST current (it does not try again).
    (dest / "filler").unlink()
    assert mirror(cluster, cluster.repo, dest).stdout == "mx: serial 6 is current\n"
    st = status(cluster, dest)
    assert st.returncode == 1, st.stdout
    assert "channel mx: older release(s) " in st.stdout, st.stdout
    # The line and the note cut the message short (its path's length decides where); the
    # note names each release not copied, with why (the run's output above had it whole).
    skipped = json.loads((dest / ".mirror.json").read_text())["channels"]["mx"]["skipped"]
    assert skipped.get("2"), skipped
    publish_new(cluster, 1)  # the older ones are copied when LATEST next moves
    p = mirror(cluster, cluster.repo, dest)
    assert p.returncode == 0, p.stdout + p.stderr
    assert releases(dest / "mx") == [1, 2, 3, 4, 5, 6, 7]
    assert status(cluster, dest).returncode == 0


def test_verify_finds_the_bit_rot_the_quick_check_misses_and_copies_it_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A bit flipped on the mirror's disk (size and time kept) passed every run's quick check:
    every node refused the release and went to the next source, and the mirror said
    "current" for good. ``--verify`` hashes every file of every release served (a map
    hard-linked into several releases is damaged in each) and the patches."""
    trusted = str(cluster.root / "keys" / "signing.pub")
    cluster.publish()
    publish_new(cluster, 1)
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    mx = dest / "mx"
    shared = mx / "releases" / "2" / "domains"  # unchanged since release 1: one inode in both
    assert shared.stat().st_ino == (mx / "releases" / "1" / "domains").stat().st_ino
    flip_byte_keep_stat(shared)
    flip_byte_keep_stat(mx / "patches" / "2" / "recipients.patch")
    assert mirror(cluster, cluster.repo, dest).stdout == "mx: serial 2 is current\n"

    p = mirror(cluster, cluster.repo, dest, "--verify", "--trusted-key", trusted)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mx: serial 2 mirrored (was 2), copied releases 2, 1;" in p.stdout, p.stdout
    assert "2 release(s) checked, every file hashed" in p.stdout
    assert f"the copy here was damaged and is replaced: {shared}: sha256" in p.stdout
    assert "release 1 was damaged here: " in p.stdout and "; copied again" in p.stdout
    for serial in ("1", "2"):
        for f in (cluster.repo / "mx" / "releases" / serial).iterdir():
            assert (mx / "releases" / serial / f.name).read_bytes() == f.read_bytes()
    for f in (mx / "patches" / "2").iterdir():
        assert f.read_bytes() == (cluster.repo / "mx" / "patches" / "2" / f.name).read_bytes()
    assert not (mx / ".staging").exists()
    p = mirror(cluster, cluster.repo, dest, "--verify")
    assert p.stdout == "mx: serial 2 is current; 2 release(s) checked, every file hashed\n"
    # A full check is a run as any other: noted, with the damage it repaired (not a problem).
    st = status(cluster, dest, "--json")
    assert st.returncode == 0, st.stdout
    got = json.loads(st.stdout)
    assert got["last_full_check"] == got["last_run"]
    (mx_status,) = got["channels"]
    assert "release 1: " in mx_status["last_damage"] and mx_status["last_repair"]
    assert "; channel mx: repaired " in status(cluster, dest).stdout

    # Only the patches damaged: they are copied again, the releases left as they are.
    flip_byte_keep_stat(mx / "patches" / "2" / "virtual.patch")
    p = mirror(cluster, cluster.repo, dest, "--verify")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "  patches 2 was damaged here: " in p.stdout and "; copied again" in p.stdout
    for f in (mx / "patches" / "2").iterdir():
        assert f.read_bytes() == (cluster.repo / "mx" / "patches" / "2" / f.name).read_bytes()


def test_full_check_is_a_loop_option(cluster: Cluster, tmp_path: Path) -> None:
    cluster.publish()
    p = mirror(cluster, cluster.repo, tmp_path / "mirror", "--full-check", "60")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "mirror --full-check: only with --interval (one run: --verify)" in p.stderr
    # and --verify is one run's: in the loop it hashed every release on every pass.
    p = mirror(cluster, cluster.repo, tmp_path / "mirror", "--interval", "10", "--verify")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "mirror --verify: one run only; with --interval, --full-check SECONDS" in p.stderr


def test_a_channel_the_source_no_longer_has_is_a_warning_not_a_removal(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A channel removed at the publisher (out of the config, its directory removed) was kept
    and served by the mirror without a word, unrenewed until its nodes went CRITICAL."""
    add_channels(cluster, '[publisher.channels.edge]\nmaps = ["domains", "transport"]\n')
    cluster.publish()
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    shutil.rmtree(cluster.repo / "edge")
    before = tree_snapshot(dest / "edge")
    p = mirror(cluster, cluster.repo, dest)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stdout == "mx: serial 1 is current\n"
    assert (
        f"mapsync: channel edge: {cluster.repo} no longer has it; {dest / 'edge'} still serves "
        "serial 1, which nobody renews" in p.stderr
    ), p.stderr
    assert tree_snapshot(dest / "edge") == before
    st = status(cluster, dest)  # and monitoring says so, until it is removed
    assert st.returncode == 1, st.stdout
    assert st.stdout.startswith(
        f"MAPSYNC MIRROR WARNING - channel edge: {cluster.repo} no longer has it; what it "
        "serves is not renewed"
    ), st.stdout
    # Named with --channel, only those are looked at.
    assert mirror(cluster, cluster.repo, dest, "--channel", "mx").returncode == 0
    assert status(cluster, dest).returncode == 1  # edge not looked at: still its warning
    shutil.rmtree(dest / "edge")
    assert status(cluster, dest).returncode == 0  # removed: no longer served, nor reported
    assert mirror(cluster, cluster.repo, dest).returncode == 0


def test_every_run_is_noted_and_status_tells_a_mirror_that_stopped_following(
    cluster: Cluster, upstream: RsyncDaemon, tmp_path: Path
) -> None:
    """`mapsync status --mirror DEST`: UNKNOWN before any run; OK while the --interval loop
    follows; WARNING with the error when its runs fail (the upstream daemon gone), and when
    the loop stopped (no run for 3 intervals plus its --timeout)."""
    cluster.publish()
    dest = tmp_path / "mirror"
    st = status(cluster, dest)
    assert st.returncode == 3, st.stdout
    assert st.stdout.startswith(f"MAPSYNC MIRROR UNKNOWN - no mirror run recorded in {dest}")
    note = dest / ".mirror.json"
    argv = [sys.executable, "-m", "mapsync", "-q", "mirror", repo_url(upstream), str(dest)]
    loop = subprocess.Popen(
        [*argv, "--interval", "1", "--timeout", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def noted(key: str, test: Callable[[object], bool]) -> dict[str, object]:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    got = json.loads(note.read_text())
                    if test(got.get(key)):
                        return dict(got)
                except (FileNotFoundError, ValueError):
                    pass
                time.sleep(0.1)
            raise AssertionError(f"{note}: no {key} as expected")

        first = noted("last_success", bool)
        assert first["interval"] == 1 and first["timeout"] == 1
        assert first["source"] == repo_url(upstream)
        assert first["last_full_check"] == first["last_success"]  # the loop's first: --verify
        st = status(cluster, dest, "--json")
        assert st.returncode == 0, st.stdout
        got = json.loads(st.stdout)
        assert got["status"] == "OK" and got["interval"] == 1
        assert [(c["channel"], c["serial"]) for c in got["channels"]] == [("mx", 1)]

        publish_new(cluster, 1)
        noted("channels", lambda c: isinstance(c, dict) and c["mx"]["serial"] == 2)
        assert "serving mx 2" in status(cluster, dest).stdout

        upstream.stop()  # the publisher's daemon gone: every run fails
        failed = noted("last_error", bool)
        assert "rsync" in str(failed["last_error"])
        st = status(cluster, dest)
        assert st.returncode == 1, st.stdout
        assert st.stdout.startswith("MAPSYNC MIRROR WARNING - last run failed "), st.stdout
        assert "; last successful run " in st.stdout
    finally:
        loop.send_signal(signal.SIGTERM)
        loop.wait(timeout=30)
    assert loop.returncode == 128 + signal.SIGTERM
    # The loop stopped: after 3 intervals and the timeout (5 s), status says so.
    time.sleep(6)
    st = status(cluster, dest)
    assert st.returncode == 1, st.stdout
    assert (
        "no mirror run for " in st.stdout and "(it runs every 1s: stopped, or stuck?)" in st.stdout
    )


def test_a_run_that_never_gets_the_lock_leaves_the_note_to_the_run_holding_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A run that never gets DEST's lock (another run holds it) leaves the note to that run,
    and reads no config: status --mirror needs none either."""
    cluster.publish()
    dest = tmp_path / "mirror"
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    before = (dest / ".mirror.json").read_bytes()
    with open(dest / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = mirror(cluster, cluster.repo, dest)
        assert p.returncode != 0, p.stdout + p.stderr
        assert "another mirror run holds" in p.stderr
    assert (dest / ".mirror.json").read_bytes() == before
    st = subprocess.run(
        [sys.executable, "-m", "mapsync", "--config", str(tmp_path / "none.toml"), "status",
         "--mirror", str(dest)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert st.returncode == 0, st.stdout + st.stderr
    assert st.stdout.startswith("MAPSYNC MIRROR OK - serving mx 1; first to expire: mx, ")


def test_a_one_shot_run_beside_the_loop_leaves_the_loops_interval_noted(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`mapsync mirror --verify` run by hand while the `--interval` loop runs: the note still
    names the loop's interval (status tells when it stops); once the loop ended, a one-shot
    run notes none."""
    cluster.publish()
    dest = tmp_path / "mirror"
    note = dest / ".mirror.json"
    argv = [sys.executable, "-m", "mapsync", "-q", "mirror", str(cluster.repo), str(dest)]
    loop = subprocess.Popen(
        [*argv, "--interval", "3600", "--timeout", "7"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not note.exists():
            assert time.monotonic() < deadline and loop.poll() is None
            time.sleep(0.1)
        p = mirror(cluster, cluster.repo, dest, "--verify")
        assert p.returncode == 0, p.stderr
        got = json.loads(note.read_text())
        assert (got["interval"], got["timeout"]) == (3600, 7)
        assert got["last_full_check"] == got["last_run"]
        st = json.loads(status(cluster, dest, "--json").stdout)
        assert st["status"] == "OK" and st["interval"] == 3600
    finally:
        loop.send_signal(signal.SIGTERM)
        loop.wait(timeout=30)
    assert mirror(cluster, cluster.repo, dest).returncode == 0
    got = json.loads(note.read_text())
    assert (got["interval"], got["timeout"]) == (None, 300)

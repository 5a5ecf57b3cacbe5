"""The agent's pull, for real: a second release after a database change, the swap, the
reload hook, state and status, verify, the lock, and how a source becomes an rsync command.

Everything runs the real CLI in a subprocess against real rsync and real ``postmap -q``;
only the rsync argv tests at the bottom replace :func:`mapsync.transport.rsync.run`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mapsync.errors import ConfigError
from mapsync.transport import rsync as rsync_mod
from mapsync.transport.rsync import Remote, parse_source, wire_bytes
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import (
    MAPS,
    add_account,
    clone,
    delete_unreferenced_account,
    header_serial,
    lookup,
    read_state,
    set_dirs,
    tree_snapshot,
)
from tests.helpers.publisher import add_channels
from tests.helpers.transport import RsyncDaemon


@pytest.fixture(scope="module")
def _published(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    root = tmp_path_factory.mktemp("published")
    c = make_cluster(root / "c", f"sqlite:///{root / 'central.db'}")
    c.publish()
    return c


@pytest.fixture(scope="module")
def _installed(_published: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    c = clone(_published, tmp_path_factory.mktemp("installed"))
    c.pull()
    return c


@pytest.fixture
def published(_published: Cluster, tmp_path: Path) -> Cluster:
    """Serial 1 published, nothing pulled yet."""
    return clone(_published, tmp_path)


@pytest.fixture
def installed(_installed: Cluster, tmp_path: Path) -> Cluster:
    """Serial 1 published and installed on the node."""
    return clone(_installed, tmp_path)


# -- a second release ---------------------------------------------------------------------------


def test_second_release_adds_and_removes_addresses_and_kills_old_inodes(installed: Cluster) -> None:
    assert set_dirs(installed) == ["1", "current"]

    # Open every live file the way a running Postfix holds its tables.
    held = {}
    for name in MAPS:
        for f in (name, f"{name}.cdb"):
            held[f] = os.open(installed.target / f, os.O_RDONLY)
    try:
        assert all(os.fstat(fd).st_nlink == 1 for fd in held.values())
        new = add_account(installed, "zz-new-user")
        gone = delete_unreferenced_account(installed)
        assert lookup(installed, new) is None
        assert lookup(installed, gone) == "OK"

        assert "published serial 2 (previous 1)" in installed.publish().stdout
        out = installed.pull().stdout
        assert "installed serial 2 (was 1)" in out

        assert lookup(installed, new) == "OK"
        assert lookup(installed, gone) is None
        assert lookup(installed, "postmaster@example-1.org") == "OK"
        # A changed map carries the new serial; an unchanged one is shipped byte for byte.
        assert header_serial(installed.target / "recipients") == 2
        assert header_serial(installed.target / "domains") == 1
        # The old set directory is gone, and with it every inode of a changed map a daemon
        # had open (Postfix restarts when one of its tables has st_nlink 0: MAIL-FACTS.md).
        # The map the release did not change keeps its inodes: nothing of it to notice.
        assert set_dirs(installed) == ["2", "current"]
        assert os.readlink(installed.target / ".mapsync" / "current") == "2"
        for f, fd in held.items():
            if header_serial(installed.target / f.removesuffix(".cdb")) == 1:  # unchanged
                assert os.fstat(fd).st_ino == (installed.target / f).stat().st_ino, f
                assert os.fstat(fd).st_nlink == 1, f
            else:
                assert os.fstat(fd).st_nlink == 0, f"{f}: old live inode still linked"
    finally:
        for fd in held.values():
            os.close(fd)
    # The target holds exactly one symlink per map file, all through .mapsync/current.
    links = {p.name: os.readlink(p) for p in installed.target.iterdir() if p.is_symlink()}
    assert links == {f: f".mapsync/current/{f}" for name in MAPS for f in (name, f"{name}.cdb")}


def test_installed_files_get_a_fresh_increasing_mtime_not_the_publishers(
    published: Cluster,
) -> None:
    old_stamp = 1_000_000_000  # 2001: what rsync -t would carry over from the repository
    for f in (published.repo / "mx" / "releases" / "1").iterdir():
        os.utime(f, (old_stamp, old_stamp))
    before = int(time.time())
    published.pull()
    first = {}
    for name in MAPS:
        for f in (name, f"{name}.cdb"):
            m = int((published.target / f).stat().st_mtime)
            assert m >= before, f"{f}: mtime {m} is older than the install"
            first[f] = m

    add_account(published, "zz-mtime")
    published.publish()
    published.pull()
    for f, m in first.items():
        if f.startswith(("domains", "transport")):  # unchanged by the account: kept as it was
            assert int((published.target / f).stat().st_mtime) == m, f
            continue
        # Strictly later, even within the same second: Dovecot compares whole seconds.
        assert int((published.target / f).stat().st_mtime) > m, f


def test_pull_when_nothing_changed_is_current_and_touches_nothing(installed: Cluster) -> None:
    state_file = installed.state / "mx" / "state.json"
    state1 = read_state(installed)
    state_file.write_text(json.dumps({**state1, "last_success": "2001-01-01T00:00:00Z"}))
    before = tree_snapshot(installed.target)
    p = installed.pull()
    assert "mx: serial 1 is current" in p.stdout
    assert tree_snapshot(installed.target) == before
    state2 = read_state(installed)
    assert state2["last_install"] == state1["last_install"]
    assert state2["last_bytes"] == state1["last_bytes"]
    assert str(state2["last_success"]) >= str(state1["last_success"])  # this check is recorded


def test_state_json_records_success_install_and_bytes(published: Cluster) -> None:
    out = published.pull().stdout
    state = read_state(published)
    assert state["last_success"] is not None
    assert state["last_install"] is not None
    assert state["last_error"] is None
    assert state["reload_pending"] is False
    assert isinstance(state["last_bytes"], int) and state["last_bytes"] > 0
    assert f"{state['last_bytes']:,} bytes on the wire" in out


def test_two_releases_within_one_second_are_both_fetched(installed: Cluster) -> None:
    """rsync's quick check compares size and mtime; the signature file always has the same
    size, and a fast publisher writes two releases in the same second. Only the nanoseconds
    tell the files apart: the agent must not keep serial 1's signature for serial 2."""
    add_account(installed, "zz-same-second")
    installed.publish()
    one, two = (installed.repo / "mx" / "releases" / str(s) for s in (1, 2))
    basis_sig = installed.state / "mx" / "basis" / "MANIFEST.json.sig"
    assert basis_sig.stat().st_size == (two / "MANIFEST.json.sig").stat().st_size
    second = int(basis_sig.stat().st_mtime) * 10**9
    for i, f in enumerate(sorted(two.iterdir())):
        if (one / f.name).exists() and (one / f.name).read_bytes() == f.read_bytes():
            continue  # an unchanged map keeps its mtime on purpose (rsync skips it)
        os.utime(f, ns=(second + 123_456_789 + i, second + 123_456_789 + i))
    p = installed.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "installed serial 2 (was 1)" in p.stdout
    assert lookup(installed, "zz-same-second@example-1.org") == "OK"


# -- status -------------------------------------------------------------------------------------


def test_status_is_critical_when_nothing_is_installed(published: Cluster) -> None:
    p = published.cli("status")
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout.startswith("MAPSYNC CRITICAL")
    assert "nothing installed" in p.stdout
    # No performance data yet: no '|' with nothing after it.
    assert "|" not in p.stdout.splitlines()[0], p.stdout
    j = published.cli("status", "--json")
    assert j.returncode == 2
    data = json.loads(j.stdout)
    assert data["status"] == "CRITICAL"
    assert data["channels"][0]["serial"] is None


def test_status_ok_after_a_pull_names_the_serial(installed: Cluster) -> None:
    p = installed.cli("status")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("MAPSYNC OK - mx OK | mx_serial=1 ")
    assert "mx: OK serial 1 " in p.stdout
    j = installed.cli("status", "--json")
    assert j.returncode == 0
    data = json.loads(j.stdout)
    assert data["status"] == "OK" and data["exit"] == 0
    (ch,) = data["channels"]
    assert ch["channel"] == "mx" and ch["serial"] == 1 and ch["status"] == "OK"
    assert ch["entries"]["recipients"] > 100
    assert ch["last_error"] is None


# -- reload hook --------------------------------------------------------------------------------


def _hook_config(cluster: Cluster, script: str) -> None:
    cluster.write_config(extra_agent=f"reload = {json.dumps(['sh', '-c', script])}")


def test_reload_runs_once_per_swap_and_not_on_a_current_pull(published: Cluster) -> None:
    log = published.root / "reloads"
    _hook_config(published, f"echo x >> {log}")
    published.publish()
    published.pull()
    assert log.read_text() == "x\n"
    assert "is current" in published.pull().stdout
    assert log.read_text() == "x\n"
    add_account(published, "zz-reload")
    published.publish()
    published.pull()
    assert log.read_text() == "x\nx\n"


def test_failing_reload_hook_is_reported_and_retried(published: Cluster) -> None:
    log = published.root / "reloads"
    _hook_config(published, f"echo try >> {log}; exit 3")
    published.publish()
    p = published.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "serial 1 is installed but the reload hook failed" in p.stderr
    # `postfix reload` logs its reasons to syslog: a silent failure says where to look.
    assert "exit 3: no output; it may have logged the reason to syslog (journalctl" in p.stderr
    assert lookup(published, "postmaster@example-1.org") == "OK"  # the maps are live anyway
    st = published.cli("status")
    assert st.returncode == 1, st.stdout
    # Nagios notifications carry only the first line: the reason is on it.
    assert st.stdout.startswith(
        "MAPSYNC WARNING - mx WARNING (reload hook failed; retried on the next run) | mx_serial=1 "
    ), st.stdout
    assert read_state(published)["reload_pending"] is True

    p = published.cli("pull")  # nothing new, but the hook is owed
    assert p.returncode == 2
    assert log.read_text() == "try\ntry\n"

    _hook_config(published, f"echo ok >> {log}")
    p = published.cli("pull")
    assert p.returncode == 0, p.stderr
    assert log.read_text() == "try\ntry\nok\n"
    assert published.cli("status").returncode == 0
    assert published.cli("pull").returncode == 0
    assert log.read_text() == "try\ntry\nok\n"  # paid once; not run again


# -- verify -------------------------------------------------------------------------------------


def test_verify_passes_on_an_intact_install(installed: Cluster) -> None:
    p = installed.cli("verify")
    assert p.returncode == 0, p.stderr
    assert "mx: serial 1 verified" in p.stdout


@pytest.mark.parametrize("victim", ["recipients", "virtual.cdb"])
def test_verify_fails_after_a_live_file_is_tampered(installed: Cluster, victim: str) -> None:
    live = installed.target / victim
    data = bytearray(live.read_bytes())
    data[-2] ^= 0x01  # same size, one bit different
    live.write_bytes(bytes(data))
    p = installed.cli("verify")
    assert p.returncode == 5, p.stdout + p.stderr
    assert f"{live}: sha256/size do not match the installed manifest" in p.stderr


def test_verify_beside_a_pull_that_swaps_meanwhile_verifies_the_new_set(
    installed: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify` from cron beside the pull timer takes no lock: a pull that swaps a new set in
    between its reading the manifest and hashing the live files is no failure (it paged an
    operator for nothing), and the set it then verifies is the new one."""
    from mapsync.agent import verify as verify_mod

    add_account(installed, "swapped-meanwhile")
    installed.publish()
    real = verify_mod.text.sha256_file
    pulled: list[int] = []

    def sha256_file(path: Path) -> tuple[str, int]:
        if not pulled:
            pulled.append(installed.pull().returncode)  # serial 2 swapped in, now
        return real(path)

    monkeypatch.setattr(verify_mod.text, "sha256_file", sha256_file)
    cfg = installed.config()
    assert cfg.agent is not None
    assert verify_mod.verify_installed(cfg.agent, cfg.agent.channels["mx"]) == 2
    assert pulled == [0]


def test_verify_without_an_install_fails(published: Cluster) -> None:
    p = published.cli("verify")
    assert p.returncode == 5
    assert "nothing installed" in p.stderr


# -- the lock -----------------------------------------------------------------------------------

_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_held_lock_refuses_a_pull_and_a_killed_holder_does_not_block(published: Cluster) -> None:
    lock = published.state / "mx" / "lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        p = published.cli("pull")
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"another agent run (pid {holder.pid}) holds this channel" in p.stderr
        assert str(lock) in p.stderr
        assert not (published.target / ".mapsync").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    # The lock file still names the dead holder; the kernel dropped its flock.
    assert lock.read_text().strip() == str(holder.pid)
    p = published.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "installed serial 1" in p.stdout
    assert lookup(published, "postmaster@example-1.org") == "OK"


# -- sources and the rsync command line (unit) --------------------------------------------------


def test_parse_source_local_path_and_file_url() -> None:
    assert parse_source("/srv/mapsync/mx/").base == "/srv/mapsync/mx"
    e = parse_source("file:///srv/mapsync/mx")
    assert (e.base, e.ssh, e.daemon) == ("/srv/mapsync/mx", None, False)


def test_parse_source_rsync_daemon() -> None:
    e = parse_source("rsync://publisher.example.net/mapsync/mx/")
    assert e.base == "rsync://publisher.example.net/mapsync/mx"
    assert e.daemon and e.ssh is None


def test_parse_source_ssh_with_user_and_port() -> None:
    e = parse_source("ssh://user@host:2222/srv/mapsync/mx")
    assert e.base == "user@host:/srv/mapsync/mx"
    assert e.ssh == ("ssh", "-o", "BatchMode=yes", "-p", "2222")
    assert not e.daemon


@pytest.mark.parametrize(
    "source",
    [
        "http://host/mapsync/mx",
        "ftp://host/x",
        "relative/path",
        "rsync:///mapsync/mx",
        "ssh://host",
    ],
)
def test_parse_source_refuses_what_it_cannot_fetch(source: str) -> None:
    with pytest.raises(ConfigError, match="source"):
        parse_source(source)


class _FakeRun:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, argv: list[str], timeout: int, *, partial: bool = False) -> str:
        self.calls.append((argv, timeout))
        return "Number of files: 1\nTotal bytes sent: 1,234\nTotal bytes received: 56,789\n"


def test_rsync_argv_for_ssh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _FakeRun()
    monkeypatch.setattr(rsync_mod, "run", fake)
    remote = Remote("ssh://user@host:2222/srv/mapsync/mx", timeout=42)
    assert remote.fetch_file("LATEST", tmp_path / "LATEST") == 1234 + 56789
    argv, timeout = fake.calls[0]
    assert timeout == 42
    i = argv.index("-e")
    assert argv[i + 1] == "ssh -o BatchMode=yes -p 2222"
    assert argv[-2:] == ["user@host:/srv/mapsync/mx/LATEST", str(tmp_path / "LATEST")]
    assert "--timeout=42" in argv
    assert "--contimeout=42" not in argv and "--no-motd" not in argv  # daemon-only options
    assert not any(a.startswith("--sockopts") for a in argv)
    # Only regular files and directories: never symlinks, devices, owners, or -a (which implies -l).
    for banned in ("-a", "--archive", "-l", "--links", "-D", "--devices", "-o", "-g"):
        assert banned not in argv
    assert "--chmod=D700,F600" in argv
    assert "--modify-window=-1" in argv  # quick check in nanoseconds, see the one-second test


def test_rsync_argv_for_daemon_files_with_basis(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = _FakeRun()
    monkeypatch.setattr(rsync_mod, "run", fake)
    basis = tmp_path / "basis"
    basis.mkdir()
    remote = Remote("rsync://127.0.0.1:8873/mapsync/mx", timeout=300)
    remote.fetch_files("releases/7", ["domains", "recipients"], tmp_path / "staging", basis, 5000)
    argv, _ = fake.calls[0]
    assert "--contimeout=60" in argv and "--no-motd" in argv and "-e" not in argv
    assert "--sockopts=TCP_NODELAY" in argv  # no 40 ms delayed-ACK waits in the handshake
    assert f"--link-dest={basis.resolve()}" in argv
    assert "--max-size=5000" in argv and "--ignore-missing-args" in argv
    assert argv[-3:] == [
        "rsync://127.0.0.1:8873/mapsync/mx/releases/7/domains",
        "rsync://127.0.0.1:8873/mapsync/mx/releases/7/recipients",
        f"{tmp_path / 'staging'}/",
    ]


def test_rsync_argv_without_basis_has_no_link_dest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = _FakeRun()
    monkeypatch.setattr(rsync_mod, "run", fake)
    Remote(str(tmp_path / "repo")).fetch_files(
        "releases/1", ["domains"], tmp_path / "s", tmp_path / "no", 10
    )
    argv, _ = fake.calls[0]
    assert not any(a.startswith("--link-dest") for a in argv)
    assert argv[-2] == f"{tmp_path / 'repo'}/releases/1/domains"


def test_wire_bytes_sums_both_directions_of_rsync_stats() -> None:
    stats = (
        "Literal data: 1,000 bytes\nMatched data: 777,000 bytes\n"
        "Total bytes sent: 2,345\nTotal bytes received: 1,001\n\n"
        "sent 2,345 bytes  received 1,001 bytes  6,692.00 bytes/sec\n"
    )
    assert wire_bytes(stats) == 3346
    assert wire_bytes("") == 0


@pytest.mark.parametrize("daemon", [False, True], ids=["path", "rsyncd"])
def test_fetch_files_never_copies_a_directory_served_under_a_file_name(
    tmp_path: Path, daemon: bool
) -> None:
    """A hostile source serving a directory where a release file or a patch should be (real
    rsync, as a path and through a daemon): nothing of it lands, so no tree of files, each
    under the size limit, can fill the node's or the mirror's disk before anything is checked."""
    repo = tmp_path / "repo"
    channel = repo / "mx"
    trap = channel / "patches" / "2" / "recipients.patch"
    trap.mkdir(parents=True)
    for i in range(50):
        (trap / f"f{i}").write_bytes(os.urandom(900))
    (channel / "patches" / "2" / "domains.patch").write_bytes(b"mapsync-patch 1\n=0\n")
    dest = tmp_path / "area"
    dest.mkdir()
    files = ["domains.patch", "recipients.patch"]
    if daemon:
        d = RsyncDaemon(tmp_path / "rsyncd", repo)
        try:
            moved = Remote(d.url()).fetch_files("patches/2", files, dest, None, 1000)
        finally:
            d.stop()
    else:
        moved = Remote(str(channel)).fetch_files("patches/2", files, dest, None, 1000)
    assert sorted(os.listdir(dest)) == ["domains.patch"]
    assert moved < 50 * 900


def test_a_node_moved_to_another_channel_installs_it_over_the_other_channels_set(
    installed: Cluster,
) -> None:
    """The node's channel renamed, or the node given another role, with the same target: the
    live set is another channel's. Its serials say nothing of this channel's (the old one's
    serial 3 is no floor for the new one's serial 1), and its maps (another mailstore's
    logins) must not keep serving: the pull installs this channel's release over it, and
    `verify` names the other channel until it has."""
    for local in ("moved-a", "moved-b"):
        add_account(installed, local)
        installed.publish()
    installed.pull()  # mx serial 3 live
    add_channels(installed, '[publisher.channels.edge]\nmaps = ["domains", "recipients"]\n')
    installed.publish()  # edge serial 1
    config = installed.config_path.read_text()
    installed.config_path.write_text(
        config.replace("[agent.channels.mx]", "[agent.channels.edge]").replace(
            f'source = "{installed.repo / "mx"}"', f'source = "{installed.repo / "edge"}"'
        )
    )
    v = installed.cli("verify")
    assert v.returncode == 5, v.stdout + v.stderr
    assert "is for channel 'mx', not 'edge'" in v.stderr
    # status says so as well, and shows nothing of mx as edge's (serial 3, its perfdata);
    # rollback compares no serials of mx with edge's.
    s = installed.cli("status")
    assert s.returncode == 2, s.stdout
    assert "edge CRITICAL (the live set in" in s.stdout
    assert (
        f"the live set in {installed.target} is channel mx's (serial 3), not this channel's"
        in s.stdout
    )
    assert "edge_serial" not in s.stdout and "serial 3 (released" not in s.stdout
    r = installed.cli("rollback", "--channel", "edge", "3")
    assert r.returncode == 2 and "is channel mx's (serial 3)" in r.stderr, r.stderr
    p = installed.cli("pull")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "edge: installed serial 1" in p.stdout
    assert "the live set is another channel's" in p.stderr
    live = json.loads((installed.target / ".mapsync" / "current" / "MANIFEST.json").read_text())
    assert (live["channel"], live["serial"]) == ("edge", 1)
    assert lookup(installed, "moved-a@example-1.org") == "OK"
    assert sorted(p.name for p in installed.target.iterdir()) == [
        ".mapsync",
        "domains",
        "domains.cdb",
        "recipients",
        "recipients.cdb",
    ]
    assert installed.cli("verify").returncode == 0
    assert "edge: serial 1 is current" in installed.pull().stdout

"""What a channel runs around the swap, and what the installed files look like.

The ``check`` command tests the built set in its own directory before it goes live: when it
fails, times out or is missing, nothing is swapped and the old set keeps serving, byte, inode
and mtime. The reload hook has its own timeout and is retried until it succeeds. The
``files`` settings give a map's text and cdb the owner, group and mode the operator chose.

Everything runs the real CLI, real rsync, real ``postmap -q`` and real processes.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import (
    MAPS,
    add_account,
    clone,
    delete_unreferenced_account,
    lookup,
    read_state,
    renew,
    set_dirs,
    tree_snapshot,
)

POSTMASTER = "postmaster@example-1.org"


def configure(
    cluster: Cluster,
    *,
    check: list[str] | None = None,
    reload: list[str] | None = None,
    files: dict[str, dict[str, str]] | None = None,
    **durations: str,
) -> None:
    """Rewrite the node's channel with these settings (``check_timeout="1s"``, ...)."""
    lines = []
    if check is not None:
        lines.append(f"check = {json.dumps(check)}")
    if reload is not None:
        lines.append(f"reload = {json.dumps(reload)}")
    lines += [f'{key} = "{value}"' for key, value in durations.items()]
    cluster.write_config()
    # [agent.channels.mx] is the config's last table: what follows belongs to it.
    text = cluster.config_path.read_text() + "".join(f"{line}\n" for line in lines)
    for name, settings in (files or {}).items():
        text += f"[agent.channels.mx.files.{name}]\n"
        text += "".join(f'{key} = "{value}"\n' for key, value in settings.items())
    cluster.config_path.write_text(text)


@pytest.fixture(scope="module")
def _installed(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    root = tmp_path_factory.mktemp("hooks")
    c = make_cluster(root / "c", f"sqlite:///{root / 'central.db'}")
    c.publish()
    c.pull()
    return c


@pytest.fixture
def installed(_installed: Cluster, tmp_path: Path) -> Cluster:
    """Serial 1 published and installed on the node, no check, no hook."""
    return clone(_installed, tmp_path)


def _refused_serial_2(cluster: Cluster, check: list[str], **durations: str) -> str:
    """Publish serial 2 (one account deleted), pull it with ``check``; assert that nothing
    changed on the node and return the pull's stderr."""
    gone = delete_unreferenced_account(cluster)
    cluster.publish()
    configure(cluster, check=check, **durations)
    before = tree_snapshot(cluster.target)
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert tree_snapshot(cluster.target) == before  # no half-built set left behind either
    assert set_dirs(cluster) == ["1", "current"]
    assert lookup(cluster, gone) == "OK"  # serial 1 keeps serving
    assert "serial 2 refused by the check command" in p.stderr
    assert "not installed, the old set keeps serving" in p.stderr
    return p.stderr


# -- check --------------------------------------------------------------------------------------


def test_a_passing_check_sees_the_new_set_before_it_goes_live(installed: Cluster) -> None:
    """The check runs against the built set, not the live one: it finds an account that only
    the new release carries, while Postfix still answers from the old set."""
    new = add_account(installed, "zz-checked")
    installed.publish()
    seen = installed.root / "check-saw"
    configure(
        installed,
        check=[
            "sh",
            "-c",
            'postmap -q "$2" "cdb:$1/recipients" && test -s "$1/recipients.cdb" '
            '&& readlink "$3" >> "$4" && echo "$1" >> "$4"',
            "sh",
            "{dir}",
            new,
            str(installed.target / ".mapsync" / "current"),
            str(seen),
        ],
    )
    assert lookup(installed, new) is None
    p = installed.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "installed serial 2 (was 1)" in p.stdout
    assert lookup(installed, new) == "OK"
    live_then, checked_dir = seen.read_text().splitlines()
    assert live_then == "1"  # serial 1 was still live while the check ran
    assert checked_dir == str(installed.target / ".mapsync" / "2.new")
    assert not Path(checked_dir).exists()  # it became the live set 2
    assert set_dirs(installed) == ["2", "current"]
    assert installed.cli("status").returncode == 0


def test_the_documented_postmap_check_installs_a_good_release(installed: Cluster) -> None:
    add_account(installed, "zz-fine")
    installed.publish()
    configure(installed, check=["postmap", "-q", POSTMASTER, "cdb:{dir}/recipients"])
    assert "installed serial 2 (was 1)" in installed.pull().stdout
    assert installed.cli("verify").returncode == 0


def test_a_failing_check_keeps_the_old_set_and_the_next_run_installs_once_fixed(
    installed: Cluster,
) -> None:
    log = installed.root / "reloads"
    # The operator's rule: this address must always resolve. Serial 2 drops it.
    gone = delete_unreferenced_account(installed)
    installed.publish()
    check = ["postmap", "-q", gone, "cdb:{dir}/recipients"]
    configure(installed, check=check, reload=["sh", "-c", f"echo r >> {log}"])
    before = tree_snapshot(installed.target)
    p = installed.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        f"mapsync: channel mx: serial 2 refused by the check command `postmap -q {gone} "
        "'cdb:{dir}/recipients'`: exit 1 (no output; it may have logged the reason to syslog "
        "(journalctl, /var/log/mail.log)); not installed, the old set keeps serving"
    ) in p.stderr
    assert tree_snapshot(installed.target) == before
    assert lookup(installed, gone) == "OK"
    assert not log.exists()  # nothing was swapped, so nothing to reload
    assert "2" not in os.listdir(installed.state / "mx" / "releases")  # not kept for rollback

    state = read_state(installed)
    assert "serial 2 refused by the check command" in str(state["last_error"])
    st = installed.cli("status")
    assert st.returncode == 1, st.stdout
    assert "mx: WARNING serial 1 " in st.stdout
    assert "last run failed: channel mx: serial 2 refused by the check command" in st.stdout
    j = json.loads(installed.cli("status", "--json").stdout)["channels"][0]
    assert "exit 1" in j["last_error"] and j["serial"] == 1

    # Tried again on every run, refused again while the release is bad.
    assert installed.cli("pull").returncode == 2
    assert set_dirs(installed) == ["1", "current"]

    configure(
        installed,
        check=["postmap", "-q", POSTMASTER, "cdb:{dir}/recipients"],
        reload=["sh", "-c", f"echo r >> {log}"],
    )
    p = installed.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "installed serial 2 (was 1)" in p.stdout
    assert lookup(installed, gone) is None
    assert log.read_text() == "r\n"
    assert read_state(installed)["last_error"] is None
    assert installed.cli("status").returncode == 0


def test_a_failing_check_reports_the_tail_of_its_stderr(installed: Cluster) -> None:
    err = _refused_serial_2(
        installed,
        ["sh", "-c", "echo starting; echo 'recipients lacks the abuse address' >&2; exit 3"],
    )
    assert (
        "exit 3; not installed, the old set keeps serving; it said: recipients lacks the abuse "
        "address"
    ) in err
    assert "`sh -c 'echo starting; " in err  # the command, as configured


def test_a_failing_checks_output_stays_out_of_the_world_readable_status(
    installed: Cluster,
) -> None:
    """A check may print what it read of the maps (`doveadm auth test`, a `head` of
    dovecot_users): password hashes. The state file (0600) and root's `status` keep its
    output; the copy every user may read (status_dir, 0644) does not."""
    secret = "{SHA512-CRYPT}$6$salt$not-for-everyone"
    users = installed.root / "users"  # what the check reads and prints
    users.write_text(f"kim@example.org:{secret}\n")
    _refused_serial_2(installed, ["sh", "-c", f"cat {users}; exit 1"])
    private = read_state(installed)
    assert secret in str(private["last_error"])
    public = installed.state.with_name("state-status") / "mx.json"
    assert public.stat().st_mode & 0o004
    copy = json.loads(public.read_text())
    assert secret not in public.read_text()
    assert copy["last_error"].startswith("channel mx: serial 2 refused by the check command")
    assert copy["last_error"].endswith(
        "; it said: (not in this copy: the agent's log and its state file have it)"
    )
    assert {k: v for k, v in copy.items() if k != "last_error"} == {
        k: v for k, v in private.items() if k != "last_error"
    }


def test_a_check_killed_by_a_signal_is_reported_by_the_signal_not_a_negative_exit(
    installed: Cluster,
) -> None:
    """The OOM killer or an operator's ``kill -9`` ends a check: say so, not "exit -9"."""
    err = _refused_serial_2(installed, ["sh", "-c", "kill -KILL $$"])
    assert "killed by signal 9 (SIGKILL)" in err
    assert "exit -9" not in err


def test_a_check_that_is_not_installed_refuses_the_release(installed: Cluster) -> None:
    err = _refused_serial_2(installed, ["/usr/local/bin/no-such-check", "{dir}"])
    assert "`/usr/local/bin/no-such-check '{dir}'`: not found;" in err


def test_a_hung_check_is_killed_at_its_timeout_with_everything_it_started(
    installed: Cluster,
) -> None:
    """Killing only ``sh`` would leave its ``sleep`` running: the whole process group goes."""
    pidfile = installed.root / "check-child"
    start = time.monotonic()
    err = _refused_serial_2(
        installed,
        ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"],
        check_timeout="1s",
    )
    assert time.monotonic() - start < 30
    assert "timed out after 1s" in err
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _running(pid):
        assert time.monotonic() < deadline, "the check's child outlived its timeout"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        return ") Z " not in Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False


def test_a_renewal_runs_no_check_and_keeps_the_inodes_of_maps_whose_settings_are_unchanged(
    installed: Cluster,
) -> None:
    """A renewal (re-signed, same maps) keeps the live inodes: there is nothing new to check,
    and nothing for a daemon to reload. A changed ``files`` setting reaches the new set in a
    new file built from the verified text; the live inode is never touched, so nothing
    changes for a reader before the swap, nor at all if the swap does not happen."""
    ran = installed.root / "check-ran"
    configure(
        installed,
        check=["sh", "-c", f"echo x >> {ran}; exit 1"],
        files={"recipients": {"mode": "0600"}},
    )
    renew(installed, serial=2)
    live, kept = installed.target / "recipients.cdb", installed.target / "virtual.cdb"
    content = live.read_bytes()
    before, kept_before = live.stat(), kept.stat()
    assert _owner(live)[0] == 0o644
    held = os.open(live, os.O_RDONLY)  # the live inode, as a running Postfix holds it
    try:
        p = installed.cli("pull")
        assert p.returncode == 0, p.stderr
        assert "serial 2 renews 1 (same maps, no swap)" in p.stdout
        old = os.fstat(held)
        assert stat.S_IMODE(old.st_mode) == 0o644  # the live inode was never chmod-ed
        assert old.st_nlink == 0  # ... and is gone with the old set: Postfix reopens
    finally:
        os.close(held)
    assert not ran.exists()
    after = live.stat()
    assert after.st_ino != before.st_ino and after.st_mtime_ns > before.st_mtime_ns
    assert live.read_bytes() == content
    assert _owner(live) == (0o600, 0, 0) and _owner(installed.target / "recipients")[0] == 0o600
    # Maps whose settings did not change keep their inodes and mtimes: no daemon notices.
    kept_after = kept.stat()
    assert (kept_after.st_ino, kept_after.st_mtime_ns) == (
        kept_before.st_ino,
        kept_before.st_mtime_ns,
    )
    assert _owner(kept)[0] == 0o644
    assert installed.cli("verify").returncode == 0


def test_a_renewal_rebuilds_a_map_its_owner_made_writable_from_the_verified_text(
    installed: Cluster,
) -> None:
    """A non-root owner can chmod its file and rewrite it. A renewal finds the mode changed
    and builds the file again from the verified release, not from the live copy."""
    configure(installed, files={"recipients": {"mode": "0640", "owner": "nobody"}})
    add_account(installed, "zz-owned")
    installed.publish()
    assert installed.cli("pull").returncode == 0
    live = installed.target / "recipients"
    assert _owner(live) == (0o440, 65534, 0)
    # What the owner (nobody) may do to its own file: make it writable and rewrite it.
    os.chmod(live, 0o640)
    data = bytearray(live.read_bytes())
    data[-2] ^= 0x01
    live.write_bytes(bytes(data))
    assert installed.cli("verify").returncode == 5

    renew(installed, serial=3)
    p = installed.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "serial 3 renews 2" in p.stdout
    assert _owner(live) == (0o440, 65534, 0)
    assert installed.cli("verify").returncode == 0  # the verified text, not the owner's


def test_a_pull_with_nothing_new_gives_live_files_their_configured_mode_again(
    installed: Cluster,
) -> None:
    """Owner, group and mode were given only when a release was installed: a live map made
    world-writable by hand, or a ``files`` setting changed (a hash map's ``dovecot`` group
    made after the set), stayed so until the next release, days on a quiet channel, with
    pull, `verify --repair` and `status` all OK. Each pull now compares them and builds the
    files that differ again from the verified copy (new inodes: the live one is never
    chmod-ed) and swaps, as a renewal with a changed setting does."""
    configure(installed, files={"recipients": {"mode": "0640"}})
    live, other = installed.target / "recipients.cdb", installed.target / "domains.cdb"
    os.chmod(installed.target / "virtual", 0o666)  # by hand
    st = installed.cli("status")  # said OK until the next pull
    assert st.returncode == 1, st.stdout
    assert (
        "live file(s) recipients, recipients.cdb, virtual: owner, group or mode not as" in st.stdout
    )
    before, other_before = live.stat(), other.stat()
    p = installed.cli("pull")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "serial 1 is current" in p.stdout
    assert "owner, group or mode differed from the files settings" in p.stderr
    assert _owner(live) == (0o640, 0, 0) and _owner(installed.target / "recipients")[0] == 0o640
    assert _owner(installed.target / "virtual")[0] == 0o644
    assert live.stat().st_ino != before.st_ino
    assert stat.S_IMODE(before.st_mode) == 0o644  # that inode was never chmod-ed
    assert other.stat().st_ino == other_before.st_ino  # as configured: kept, linked
    assert installed.cli("verify").returncode == 0
    assert installed.cli("status").returncode == 0
    repaired = live.stat().st_ino
    assert "differed" not in installed.cli("pull").stderr  # once: then as configured
    assert live.stat().st_ino == repaired


def test_settings_a_filesystem_will_not_keep_are_not_rebuilt_on_every_pull(
    installed: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that forces modes (an NFS export, a mount option): the rebuilt files
    still differ, so the set is not built again for them until the next release."""
    from mapsync.agent import install as install_mod
    from mapsync.agent.pull import pull

    configure(installed, files={"recipients": {"mode": "0640"}})
    monkeypatch.setattr(install_mod, "_protect", lambda *args: None)  # the mode is not kept
    cfg = installed.config().agent
    assert cfg is not None
    live = installed.target / "recipients.cdb"
    assert pull(cfg, cfg.channels["mx"]).repaired  # tried once
    tried = live.stat().st_ino
    assert _owner(live)[0] != 0o640  # the settings not met
    assert not pull(cfg, cfg.channels["mx"]).repaired  # and not again
    assert live.stat().st_ino == tried
    unmet = str(read_state(installed)["ownership_unmet"])
    assert unmet.startswith(os.readlink(installed.target / ".mapsync" / "current") + " ")
    # status says so, not "the next pull restores them": no pull tries before the next release.
    st = installed.cli("status")
    assert st.returncode == 1, st.stdout
    assert "live file(s) recipients, recipients.cdb: owner, group or mode not as" in st.stdout
    assert "no pull tries again before the next release" in st.stdout, st.stdout
    assert "the next pull restores them" not in st.stdout
    # Asked for (verify --repair: a full check), it is tried again all the same.
    assert installed.cli("verify", "--repair").returncode == 0
    assert live.stat().st_ino != tried


def test_a_set_group_id_target_gets_no_swap_on_every_pull(installed: Cluster) -> None:
    """Files built under a set-group-ID target take its group, not the agent's: the owner
    check of every pull must not see that as drift (it swapped the set on every pull)."""
    shutil.rmtree(installed.target)
    installed.target.mkdir()
    mail = grp.getgrnam("mail").gr_gid
    os.chown(installed.target, 0, mail)
    os.chmod(installed.target, 0o2755)
    assert installed.cli("pull").returncode == 0
    live = installed.target / "recipients.cdb"
    assert live.stat().st_gid == mail
    before = live.stat().st_ino
    p = installed.cli("pull")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "serial 1 is current" in p.stdout and "differed" not in p.stderr
    assert live.stat().st_ino == before


def test_rollback_runs_the_check_too(installed: Cluster) -> None:
    new = add_account(installed, "zz-second")
    installed.publish()
    installed.pull()
    # Serial 1 lacks the new account; a check demanding it refuses the rollback.
    configure(installed, check=["postmap", "-q", new, "cdb:{dir}/recipients"])
    before = tree_snapshot(installed.target)
    p = installed.cli("rollback")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "serial 1 refused by the check command" in p.stderr
    assert tree_snapshot(installed.target) == before
    assert read_state(installed)["pinned"] is None  # no pin for a rollback that did not happen
    assert lookup(installed, new) == "OK"

    configure(installed, check=["postmap", "-q", POSTMASTER, "cdb:{dir}/recipients"])
    p = installed.cli("rollback")
    assert p.returncode == 0, p.stderr
    assert "rolled back to serial 1 (was 2)" in p.stdout
    assert lookup(installed, new) is None
    assert read_state(installed)["pinned"] == 1


# -- reload timeout -----------------------------------------------------------------------------


def test_a_hung_reload_hook_times_out_is_reported_and_retried(installed: Cluster) -> None:
    log = installed.root / "reloads"
    add_account(installed, "zz-reload")
    installed.publish()
    configure(installed, reload=["sh", "-c", f"echo try >> {log}; sleep 5"], reload_timeout="1s")
    start = time.monotonic()
    p = installed.cli("pull")
    assert time.monotonic() - start < 5  # the hook's sleep was killed at one second
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        "serial 2 is installed but the reload hook failed (timed out after 1s); "
        "it is retried on the next run"
    ) in p.stderr
    assert "reload hook failed" in p.stderr and "reason='timed out after 1s'" in p.stderr
    assert lookup(installed, "zz-reload@example-1.org") == "OK"  # the maps are live anyway
    assert read_state(installed)["reload_pending"] is True
    st = installed.cli("status")
    assert st.returncode == 1, st.stdout
    assert "reload hook failed; retried on the next run" in st.stdout

    assert installed.cli("pull").returncode == 2  # nothing new, but the hook is owed
    assert log.read_text() == "try\ntry\n"

    configure(installed, reload=["sh", "-c", f"echo ok >> {log}"], reload_timeout="1s")
    assert installed.cli("pull").returncode == 0
    assert log.read_text() == "try\ntry\nok\n"
    assert installed.cli("status").returncode == 0


def test_a_reload_hook_killed_by_a_signal_is_reported_by_the_signal(installed: Cluster) -> None:
    add_account(installed, "zz-killed")
    installed.publish()
    configure(installed, reload=["sh", "-c", "kill -TERM $$"])
    p = installed.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "the reload hook failed (killed by signal 15 (SIGTERM))" in p.stderr
    assert "exit -15" not in p.stderr


# -- files: owner, group, mode ------------------------------------------------------------------


def _owner(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


@pytest.fixture
def maps_group() -> Iterator[str]:
    """A group made for the test, so the ownership cannot pass by accident."""
    name = f"mapsync-t{os.getpid() % 100000}"
    subprocess.run(["groupadd", "--force", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False)


def test_files_settings_give_text_and_cdb_their_owner_group_and_mode(
    installed: Cluster, maps_group: str
) -> None:
    gid = grp.getgrnam(maps_group).gr_gid
    nobody = 65534
    configure(
        installed,
        files={
            "recipients": {"mode": "0600", "owner": "root", "group": maps_group},
            "virtual": {"mode": "0640", "owner": "nobody"},
            "transport": {"group": "mail"},
        },
    )
    first = {f: int((installed.target / f).stat().st_mtime) for f in os.listdir(installed.target)}
    inodes = {f: (installed.target / f).stat().st_ino for f in os.listdir(installed.target)}
    add_account(installed, "zz-files")
    installed.publish()
    p = installed.cli("pull")
    assert p.returncode == 0, p.stderr
    for f in ("recipients", "recipients.cdb"):
        assert _owner(installed.target / f) == (0o600, 0, gid), f
    for f in ("virtual", "virtual.cdb"):
        # Owned by a user other than root: never writable by it (0640 → 0440).
        assert _owner(installed.target / f) == (0o440, nobody, 0), f
    for f in ("transport", "transport.cdb"):
        assert _owner(installed.target / f) == (0o644, 0, grp.getgrnam("mail").gr_gid), f
    for f in ("domains", "domains.cdb"):  # not configured: mapsync's default
        assert _owner(installed.target / f) == (0o644, 0, 0), f
    # Every new file gets a fresh mtime, later than the one it replaced; domains, which the
    # release did not change and whose settings did not either, keeps its live inodes.
    for f in (m for name in MAPS for m in (name, f"{name}.cdb")):
        now = (installed.target / f).stat()
        if f.startswith("domains"):
            assert (now.st_ino, int(now.st_mtime)) == (inodes[f], first[f]), f
        else:
            assert int(now.st_mtime) > first[f], f
    assert lookup(installed, "zz-files@example-1.org") == "OK"
    assert installed.cli("verify").returncode == 0


def test_a_map_owned_by_another_user_than_root_is_never_writable_by_it(
    installed: Cluster,
) -> None:
    """``owner = "dovecot"`` must not let Dovecot rewrite the users it authenticates: the
    owner-write bit is cleared, and the operator is warned once per map that the owner can
    still chmod its file (a group is the safe way to grant read access)."""
    configure(
        installed,
        files={
            "recipients": {"mode": "0644", "owner": "nobody"},
            "virtual": {"mode": "0600", "owner": "nobody"},
            "transport": {"mode": "0644", "owner": "root"},
        },
    )
    add_account(installed, "zz-owner")
    installed.publish()
    p = installed.cli("pull")
    assert p.returncode == 0, p.stderr
    for f in ("recipients", "recipients.cdb"):
        assert _owner(installed.target / f) == (0o444, 65534, 0), f
    for f in ("virtual", "virtual.cdb"):
        assert _owner(installed.target / f) == (0o400, 65534, 0), f
    for f in ("transport", "transport.cdb", "domains", "domains.cdb"):  # root: as configured
        assert _owner(installed.target / f) == (0o644, 0, 0), f
    warnings = [line for line in p.stderr.splitlines() if "owner is not root" in line]
    assert len(warnings) == 2, p.stderr  # once per map, not per file
    assert any("map=recipients" in w for w in warnings)
    assert any("map=virtual" in w for w in warnings)
    assert all("owner=nobody" in w for w in warnings)
    assert lookup(installed, "zz-owner@example-1.org") == "OK"
    assert installed.cli("verify").returncode == 0


def test_an_unknown_group_is_refused_before_the_swap_naming_the_map(installed: Cluster) -> None:
    add_account(installed, "zz-nogroup")
    installed.publish()
    configure(installed, files={"virtual": {"mode": "0640", "group": "no-such-group-x"}})
    before = tree_snapshot(installed.target)
    p = installed.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        "channel mx: [agent.channels.mx.files.virtual] group: no group 'no-such-group-x' on this "
        "node (map virtual); serial 2 not installed, the old set keeps serving"
    ) in p.stderr
    assert tree_snapshot(installed.target) == before
    assert set_dirs(installed) == ["1", "current"]
    assert lookup(installed, "zz-nogroup@example-1.org") is None
    assert "no group 'no-such-group-x'" in str(read_state(installed)["last_error"])


def test_an_unknown_group_with_nothing_new_to_install_is_said_by_the_pull(
    installed: Cluster,
) -> None:
    """A ``files`` group this node lacks, set while nothing new is published: the pull that
    compares the live files with the settings said nothing at all (status OK); it now warns,
    naming the key, and leaves the live files as they are."""
    configure(installed, files={"virtual": {"mode": "0640", "group": "no-such-group-x"}})
    before = tree_snapshot(installed.target)
    p = installed.cli("pull")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "the files settings cannot be given to the live set" in p.stderr
    assert (
        "[agent.channels.mx.files.virtual] group: no group 'no-such-group-x' on this node "
        "(map virtual); the live files of serial 1 are left as they are"
    ) in p.stderr
    assert tree_snapshot(installed.target) == before


def test_an_unknown_owner_is_refused_naming_the_key(installed: Cluster) -> None:
    add_account(installed, "zz-nouser")
    installed.publish()
    configure(installed, files={"recipients": {"owner": "no-such-user-x"}})
    p = installed.cli("pull")
    assert p.returncode == 2
    assert "[agent.channels.mx.files.recipients] owner: no user 'no-such-user-x'" in p.stderr
    assert set_dirs(installed) == ["1", "current"]

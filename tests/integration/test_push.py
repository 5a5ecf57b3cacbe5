"""The publisher pushes each new release into node inboxes, for real: a local path, a
write-enabled ``rsync --daemon`` module on a loopback port and ssh through a throwaway sshd.

The inbox is a contract with the agent's watcher: ``INBOX/releases/<serial>/`` complete
first, ``INBOX/LATEST`` last; and an agent pointed at the inbox installs from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from mapsync.publish import push
from mapsync.release import iso, parse_iso
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account, lookup
from tests.helpers.processes import processes, started, terminated, wait_for_children
from tests.helpers.publisher import push_to, record, serial_of
from tests.helpers.transport import RsyncDaemon, SilentListener, Sshd, free_port, spaced_ssh, sshd


def files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def age_failure(cluster: Cluster, destination: str, seconds: float) -> None:
    """Move the recorded failure of ``destination`` ``seconds`` into the past (as if that much
    time had gone by since)."""
    path = cluster.repo / ".private" / "mx" / "pushed.json"
    data = json.loads(path.read_text())
    entry = data["destinations"][destination]
    entry["failed_at"] = iso(parse_iso(entry["failed_at"]) - timedelta(seconds=seconds))
    path.write_text(json.dumps(data))


_PUSHED = re.compile(r"pushed serial (\d+) to (\S+), ([\d,]+) bytes on the wire")


def pushed(out: str) -> dict[str, tuple[int, int]]:
    """``publish`` output → destination: (serial, bytes on the wire)."""
    return {
        m.group(2): (int(m.group(1)), int(m.group(3).replace(",", "")))
        for m in _PUSHED.finditer(out)
    }


def assert_inbox_holds(
    cluster: Cluster, inbox: Path, serial: int, kept: set[int], pruned: bool = False
) -> None:
    """The inbox holds release ``serial`` exactly as the repository does, LATEST naming it,
    written after every file of the release; and only the releases ``kept``.

    ``pruned``: this push removed an older release, after LATEST (as it must: an agent may be
    fetching it). That unlinks the hard links the old release shared with this one (unchanged
    maps, ``--link-dest``), which changes their ctime: only this release's own files (one
    link) are then compared with LATEST."""
    repo = cluster.repo / "mx"
    assert sorted(os.listdir(inbox)) == ["LATEST", "patches", "releases"]
    assert {int(n) for n in os.listdir(inbox / "releases")} == kept
    release = inbox / "releases" / str(serial)
    assert files(release) == files(repo / "releases" / str(serial))
    assert (inbox / "LATEST").read_bytes() == (repo / "LATEST").read_bytes()
    # LATEST last: its inode changed (rename into place) no earlier than anything of the release.
    latest_ctime = (inbox / "LATEST").stat().st_ctime_ns
    own = [p for p in release.iterdir() if not pruned or p.stat().st_nlink == 1]
    assert own, "no file of the release to compare LATEST with"
    newest = max(p.stat().st_ctime_ns for p in [release, *own])
    assert latest_ctime >= newest
    # No temporary file of rsync's is left behind.
    assert not [p for p in inbox.rglob(".*")], list(inbox.rglob(".*"))


# -- a local inbox -------------------------------------------------------------------------------


def test_a_local_inbox_gets_each_release_then_latest_and_the_agent_installs_from_it(
    cluster: Cluster,
) -> None:
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.parent.mkdir(parents=True)
    push_to(cluster, str(inbox), source=str(inbox))  # the agent reads only its inbox

    out = cluster.publish().stdout
    assert "published serial 1" in out
    assert pushed(out) == {str(inbox): (1, pushed(out)[str(inbox)][1])}
    assert_inbox_holds(cluster, inbox, 1, {1})
    assert record(cluster)[str(inbox)]["serial"] == 1
    assert "installed serial 1" in cluster.pull().stdout
    assert lookup(cluster, "postmaster@example-1.org") == "OK"

    new = add_account(cluster, "pushed-one")
    out = cluster.publish().stdout
    assert "published serial 2" in out and pushed(out)[str(inbox)][0] == 2
    assert_inbox_holds(cluster, inbox, 2, {1, 2})  # the previous one stays for a mid-fetch agent
    # Unchanged maps are hard links to the previous release's copies, not second copies.
    assert (inbox / "releases/2/domains").stat().st_ino == (
        inbox / "releases/1/domains"
    ).stat().st_ino
    assert "installed serial 2 (was 1)" in cluster.pull().stdout
    assert lookup(cluster, new) == "OK"

    newer = add_account(cluster, "pushed-two")
    cluster.publish()
    assert_inbox_holds(cluster, inbox, 3, {2, 3}, pruned=True)  # serial 1 pruned by the push
    assert "installed serial 3 (was 2)" in cluster.pull().stdout
    assert lookup(cluster, newer) == "OK"

    # Nothing new: no push, the destination is reported as having serial 3.
    before = files(inbox)
    again = cluster.publish().stdout
    assert pushed(again) == {}
    assert f"channel mx: {inbox} has serial 3" in again
    assert files(inbox) == before


def test_the_first_push_into_an_inbox_made_anew_goes_through(cluster: Cluster) -> None:
    """Config management replaced the inbox (rm -rf; mkdir) after serial 1 was delivered:
    serial 2 still arrives on the first try, not after a failure and a back-off."""
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.parent.mkdir(parents=True)
    push_to(cluster, str(inbox), source=str(inbox))
    cluster.publish()
    assert_inbox_holds(cluster, inbox, 1, {1})
    shutil.rmtree(inbox)
    inbox.mkdir(mode=0o700)

    new = add_account(cluster, "after-mkdir")
    p = cluster.cli("publish")
    assert p.returncode == 0, p.stdout + p.stderr
    assert pushed(p.stdout)[str(inbox)][0] == 2
    assert_inbox_holds(cluster, inbox, 2, {2})
    assert "error" not in record(cluster)[str(inbox)]
    assert "installed serial 2" in cluster.pull().stdout
    assert lookup(cluster, new) == "OK"


# -- an rsync daemon module with write access ----------------------------------------------------


class InboxDaemon(RsyncDaemon):
    """``rsync --daemon`` on 127.0.0.1 with one writable module ``inbox`` at ``path``."""

    def __init__(self, root: Path, path: Path, port: int | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        super().__init__(root, path, module="inbox", writable=True, port=port)


@pytest.fixture
def node_daemon(tmp_path: Path) -> Iterator[tuple[InboxDaemon, Path]]:
    """A node's rsync daemon; yields it and the directory its module writes to."""
    module = tmp_path / "node-inbox"
    d = InboxDaemon(tmp_path / "rsyncd", module)
    try:
        yield d, module
    finally:
        d.stop()


def test_one_new_account_pushed_through_an_rsync_daemon_costs_a_few_kilobytes(
    tmp_path: Path, sqlite_url: str, node_daemon: tuple[InboxDaemon, Path]
) -> None:
    d, module = node_daemon
    big = make_cluster(tmp_path / "big", sqlite_url, accounts=20000, domains=50, aliases=2000)
    inbox = module / "mx"
    push_to(big, d.url(), source=str(inbox))

    first = pushed(big.publish().stdout)[d.url()]
    assert first[0] == 1
    assert_inbox_holds(big, inbox, 1, {1})
    assert "installed serial 1" in big.pull().stdout

    new = add_account(big, "zz-push-probe", "example-7.org")
    p = big.publish("--json")
    doc = json.loads(p.stdout)
    assert [c["serial"] for c in doc["channels"]] == [2]
    [push] = doc["push"]
    assert (push["destination"], push["serial"], push["action"]) == (d.url(), 2, "pushed")
    delta = int(push["bytes"])
    assert_inbox_holds(big, inbox, 2, {1, 2})
    assert record(big)[d.url()]["serial"] == 2
    assert record(big)[d.url()]["bytes"] == delta
    # The daemon really wrote it, release first, LATEST (into the inbox itself) last.
    writes = re.findall(r"rsync to (\S+) from", d.log.read_text())
    assert writes == [
        "inbox/mx/",  # first delivery: make the inbox
        "inbox/mx/releases/1/",
        "inbox/mx/",  # LATEST
        "inbox/mx/releases/2/",
        "inbox/mx/",  # LATEST
    ]
    assert "installed serial 2 (was 1)" in big.pull().stdout
    assert lookup(big, new) == "OK"

    recipients = (big.repo / "mx/releases/2/recipients").stat().st_size
    print(
        f"\n[push] first push {first[1]:,} B on the wire; one new account: {delta:,} B "
        f"(both directions, release + LATEST); recipients text {recipients:,} B"
    )
    assert recipients > 500_000
    assert first[1] > recipients / 10  # the first push really moved the data (compressed)
    # Measured: 4,652 B (rsync's default block size gave 7,547 B).
    assert delta < 6_500, f"{delta} bytes for one new account"


def test_an_unreachable_destination_fails_the_run_not_the_release_and_is_retried(
    cluster: Cluster, tmp_path: Path
) -> None:
    local = cluster.root / "node" / "inbox"
    local.mkdir(parents=True)
    port = free_port()  # nothing listens here yet
    remote = f"rsync://127.0.0.1:{port}/inbox/mx"
    push_to(cluster, str(local / "mx"), remote)

    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    # The release is published, and the reachable node has it.
    assert "published serial 1" in p.stdout
    assert serial_of(cluster.repo / "mx" / "LATEST") == 1
    assert serial_of(local / "mx" / "LATEST") == 1
    assert f"channel mx: push serial 1 to {remote} FAILED (next try at " in p.stdout
    # The error log names channel, destination and rsync's message; the last line says what
    # happened and what happens next.
    assert "push failed" in p.stderr and "channel=mx" in p.stderr and remote in p.stderr
    assert "Connection refused" in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last == (
        f"mapsync: published, but the push failed for 1 destination(s) (channel mx serial 1 → "
        f"{remote}); agents still poll the repository, and the push is retried by a later "
        "publish run"
    )
    rec = record(cluster)
    assert rec[remote]["serial"] is None and rec[remote]["failed_serial"] == 1
    assert rec[remote]["failures"] == 1
    # The publisher's own status says so (under `publish --interval` nobody sees the exit).
    st = cluster.cli("status", "--publisher")
    assert st.returncode == 1, st.stdout
    assert st.stdout.startswith(
        f"MAPSYNC PUBLISHER WARNING - published, but the push failed for 1 destination(s) "
        f"(channel mx serial 1 → {remote});"
    )
    assert "Connection refused" in str(rec[remote]["error"])
    assert rec[str(local / "mx")]["serial"] == 1

    # Still down, and the next run comes at once: it does not try (the node gets 30 s), yet it
    # still exits 2, naming the last error.
    p = cluster.cli("publish")
    assert p.returncode == 2
    assert (
        f"push serial 1 to {remote} NOT TRIED (backing off)" in p.stdout and "not tried" in p.stdout
    )
    assert record(cluster) == rec

    # The node comes back; once its 30 s have passed, a run delivers, and only to that node.
    module = tmp_path / "late-node"
    d = InboxDaemon(tmp_path / "late-rsyncd", module, port=port)
    age_failure(cluster, remote, 30)
    try:
        out = cluster.publish().stdout
    finally:
        d.stop()
    assert "unchanged (serial 1)" in out
    assert pushed(out).keys() == {remote}
    assert f"{local / 'mx'} has serial 1" in out
    assert_inbox_holds(cluster, module / "mx", 1, {1})
    assert "error" not in record(cluster)[remote] and "failures" not in record(cluster)[remote]
    st = cluster.cli("status", "--publisher")
    assert st.returncode == 0 and st.stdout.startswith("MAPSYNC PUBLISHER OK - "), st.stdout


def test_a_dead_node_is_retried_with_a_growing_delay_and_costs_the_runs_between_nothing(
    cluster: Cluster,
) -> None:
    """A node that accepts the connection and never answers costs a run its push_timeout;
    the runs until its next try skip it, so `publish --interval` does not pay that every time."""
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.parent.mkdir(parents=True)
    with SilentListener() as dead:
        remote = f"rsync://127.0.0.1:{dead.port}/inbox/mx"
        push_to(cluster, str(inbox), remote, publisher='push_timeout = "4s"')

        def run() -> tuple[subprocess.CompletedProcess[str], float]:
            started = time.monotonic()
            p = cluster.cli("publish", "--json")
            assert p.returncode == 2, p.stdout + p.stderr  # a node lacks the release: exit 2
            return p, time.monotonic() - started

        def outcome(p: subprocess.CompletedProcess[str]) -> dict[str, object]:
            return next(x for x in json.loads(p.stdout)["push"] if x["destination"] == remote)

        first, tried = run()
        assert dead.connections == 1
        assert outcome(first)["deferred"] is False
        rec = record(cluster)[remote]
        assert rec["failures"] == 1
        assert outcome(first)["retry_at"] == iso(parse_iso(str(rec["failed_at"])) + push.backoff(1))

        second, skipped = run()
        assert dead.connections == 1  # not tried
        doc = outcome(second)
        assert (doc["action"], doc["deferred"], doc["serial"]) == ("failed", True, 1)
        assert doc["retry_at"] == outcome(first)["retry_at"]
        assert "not tried: 1 failure(s) in a row, next try at" in str(doc["error"])
        assert "rsync" in str(doc["error"])  # the last error, as recorded
        assert record(cluster)[remote] == rec  # the record is left alone
        assert serial_of(inbox / "LATEST") == 1  # the live node is current anyway

        age_failure(cluster, remote, 30)  # the first 30 s are over: tried again, and fails
        _, retried = run()
        assert dead.connections == 2
        rec = record(cluster)[remote]
        assert rec["failures"] == 2  # next try 60 s after this failure
        when = push.retry_at(rec)
        assert when is not None and when - parse_iso(str(rec["failed_at"])) == timedelta(seconds=60)
        age_failure(cluster, remote, 50)
        run()
        assert dead.connections == 2  # 50 s (and this run's few) are not 60
    print(
        f"\n[push backoff] a run that tries the dead node: {tried:.2f}s (push_timeout 4s), "
        f"one that defers it: {skipped:.2f}s, the retry after the backoff: {retried:.2f}s"
    )
    # Against the same run's own cost, with room for a loaded machine (a CLI run took up to
    # 2.7 s with the suite on 2 busy cores): the deferred run does not wait for the timeout.
    assert tried >= 4 and retried >= 4
    assert skipped < tried - 2.5
    assert [push.backoff(n).total_seconds() for n in (1, 2, 3, 5, 6, 40)] == [
        30,
        60,
        120,
        480,
        900,
        900,
    ]


def test_a_slow_node_delays_none_of_the_other_nodes_of_its_channel(cluster: Cluster) -> None:
    fast = cluster.root / "node" / "inbox" / "mx"
    fast.parent.mkdir(parents=True)
    with SilentListener() as slow:
        remote = f"rsync://127.0.0.1:{slow.port}/inbox/mx"
        push_to(cluster, remote, str(fast), publisher='push_timeout = "4s"')
        begun = time.monotonic()
        with started(cluster, "publish") as proc:
            while not (fast / "LATEST").exists():
                assert proc.poll() is None and time.monotonic() - begun < 30, proc.communicate()
                time.sleep(0.01)
            fast_at = time.monotonic() - begun
            still_running = proc.poll() is None
            out, err = proc.communicate(timeout=60)
            took = time.monotonic() - begun
    print(
        f"\n[push] the reachable node had the release {fast_at:.2f}s after the start; "
        f"the run ended after {took:.2f}s (the silent one's push_timeout: 4s)"
    )
    assert proc.returncode == 2, out + err
    assert still_running  # the slow node was still being waited for
    assert took - fast_at > 2.5
    assert_inbox_holds(cluster, fast, 1, {1})
    assert record(cluster)[str(fast)]["serial"] == 1


@contextmanager
def _loop_beside_a_hung_node(
    cluster: Cluster, timeout: str
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """``publish --interval 0.5`` pushing to a node that never answers (``push_timeout``
    ``timeout``) and to a reachable inbox, once the inbox has its first LATEST."""
    fast = cluster.root / "node" / "inbox" / "mx"
    fast.parent.mkdir(parents=True)
    with SilentListener() as slow:
        remote = f"rsync://127.0.0.1:{slow.port}/inbox/mx"
        push_to(cluster, remote, str(fast), publisher=f'push_timeout = "{timeout}"')
        with started(cluster, "publish", "--interval", "0.5") as proc:
            begun = time.monotonic()
            while not (fast / "LATEST").exists():
                assert proc.poll() is None and time.monotonic() - begun < 30
                time.sleep(0.05)
            yield proc, fast


def test_a_hung_node_does_not_hold_the_next_release_back_from_the_others_in_the_loop(
    cluster: Cluster,
) -> None:
    """``publish --interval``: a commit made while a hung node's push is still waiting out its
    ``push_timeout`` reaches the reachable node's inbox within seconds, not after the timeout
    (and again at every retry of the hung node: 30 s, 1, 2, 4, 8 min, then every 15 min)."""
    with _loop_beside_a_hung_node(cluster, "20s") as (proc, fast):
        time.sleep(0.5)  # the hung node's push is under way
        add_account(cluster, "pushed-while-hung")
        committed = time.monotonic()
        while serial_of(fast / "LATEST") < 2:
            assert proc.poll() is None and time.monotonic() - committed < 60
            time.sleep(0.05)
        took = time.monotonic() - committed
    print(f"\n[push] commit → the reachable node's inbox, a hung node beside it: {took:.2f}s")
    assert took < 5


def test_the_loop_ended_while_a_hung_node_is_pushed_leaves_no_rsync_behind(
    cluster: Cluster,
) -> None:
    """``publish --interval`` goes on while a hung node's delivery runs on its own thread;
    SIGTERM then ends that delivery's rsync too, at once, and the reachable node's record and
    the hung node's lock are as they should be for the next start."""
    with _loop_beside_a_hung_node(cluster, "60s") as (proc, fast):
        rsyncs = wait_for_children(proc, "rsync", 1)
        time.sleep(1.5)  # runs of the loop meanwhile: the hung node is "in flight"
        assert proc.poll() is None
        end = terminated(proc, rsyncs)
    assert proc.returncode == 143, end.out + end.err
    assert end.took < 5, end.took
    assert not end.left, f"rsync still running after mapsync exited: {end.left}"
    assert "Traceback" not in end.err, end.err
    assert "FAILED" not in end.out, end.out  # in flight is no failure
    assert record(cluster)[str(fast)]["serial"] == 1


def test_sigterm_during_a_push_starts_no_more_rsyncs_and_ends_the_running_ones(
    cluster: Cluster,
) -> None:
    """50 nodes that hang, 16 pushed at a time: SIGTERM ends the run with 143 at once; none of
    the 34 waiting deliveries starts, and none of the 16 rsyncs outlives the run."""
    with SilentListener() as dead:
        urls = [f"rsync://127.0.0.1:{dead.port}/inbox/n{i}" for i in range(50)]
        push_to(cluster, *urls, publisher='push_timeout = "60s"')
        with started(cluster, "publish") as proc:
            rsyncs = wait_for_children(proc, "rsync", push.MAX_PARALLEL)
            time.sleep(0.3)  # no 17th
            assert len([p for p in processes(parent=proc.pid) if p.name == "rsync"]) == 16
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
            took = time.monotonic() - signalled
            left = [p for p in rsyncs if p.running()]
            time.sleep(0.5)  # a delivery started late would have connected by now
            connections = dead.connections
    print(
        f"\n[signal] publish pushing to 50 hung nodes: exit {proc.returncode} {took:.2f}s after SIGTERM"
    )
    assert proc.returncode == 143, out + err
    assert "Traceback" not in err
    assert not left, f"rsync still running after mapsync exited: {left}"
    assert connections == 16
    assert took < 5
    assert serial_of(cluster.repo / "mx" / "LATEST") == 1  # the release itself is whole


def test_a_dry_run_pushes_nothing_and_says_what_it_would_push(cluster: Cluster) -> None:
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.parent.mkdir(parents=True)
    push_to(cluster, str(inbox))
    p = cluster.cli("publish", "--dry-run")
    assert p.returncode == 1, p.stderr
    assert f"channel mx: would push serial 1 to {inbox}" in p.stdout
    assert not inbox.exists()
    assert not (cluster.repo / ".private" / "mx" / "pushed.json").exists()

    cluster.publish()
    before = files(inbox)
    add_account(cluster, "dry-run-probe")
    p = cluster.cli("publish", "--dry-run", "--json")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert doc["push"] == [
        {
            "channel": "mx",
            "destination": str(inbox),
            "serial": 2,
            "action": "would push",
            "bytes": 0,
            "error": None,
            "deferred": False,
            "retry_at": None,
        }
    ]
    assert files(inbox) == before
    assert record(cluster)[str(inbox)]["serial"] == 1


def test_a_database_outage_does_not_stop_a_pending_push(cluster: Cluster) -> None:
    """The push only needs the repository: a node that missed a release gets it even while
    the database is down; the run still exits 2 for the database."""
    inbox = cluster.root / "node" / "inbox" / "mx"
    push_to(cluster, str(inbox))  # its parent is missing: this push fails
    assert cluster.cli("publish").returncode == 2
    inbox.parent.mkdir(parents=True)
    age_failure(cluster, str(inbox), 30)  # its first retry is due
    good_url = cluster.db_url
    cluster.db_url = f"sqlite:///{cluster.root / 'gone' / 'central.db'}"
    push_to(cluster, str(inbox))
    p = cluster.cli("publish")
    cluster.db_url = good_url
    assert p.returncode == 2, p.stdout + p.stderr
    assert "database" in p.stderr.strip().splitlines()[-1]
    assert pushed(p.stdout).keys() == {str(inbox)}
    assert serial_of(inbox / "LATEST") == 1


# -- over ssh ----------------------------------------------------------------------------------


@pytest.fixture
def node_sshd(tmp_path: Path) -> Iterator[Sshd]:
    with sshd(tmp_path / "sshd") as server:
        yield server


def test_push_over_ssh_with_the_publishers_ssh_command(cluster: Cluster, node_sshd: Sshd) -> None:
    port, key = node_sshd.port, node_sshd.key
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.parent.mkdir(parents=True)
    # Key and known-hosts file in a directory with a space: each stays one argument of ssh's.
    ssh, known_hosts = spaced_ssh(key, cluster.root / "publisher keys")
    url = f"ssh://root@127.0.0.1:{port}{inbox}"
    push_to(cluster, url, source=str(inbox), publisher=f"ssh = {json.dumps(ssh)}")
    out = cluster.publish().stdout
    assert pushed(out)[url][0] == 1
    assert_inbox_holds(cluster, inbox, 1, {1})
    assert "ssh-ed25519" in known_hosts.read_text()  # the quoted option reached ssh whole
    new = add_account(cluster, "over-ssh")
    assert pushed(cluster.publish().stdout)[url][0] == 2
    assert_inbox_holds(cluster, inbox, 2, {1, 2})
    assert "installed serial 2" in cluster.pull().stdout
    assert lookup(cluster, new) == "OK"

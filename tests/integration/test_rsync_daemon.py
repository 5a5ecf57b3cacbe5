"""Pulling from a real ``rsync --daemon`` on a loopback port: the ``rsync://`` source an
operator normally configures, the delta transfer that makes a one-entry change cheap,
and what happens when the daemon is not there, does not answer, or the pull is ended by a
signal while rsync waits for it."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account, lookup, read_state, tree_snapshot
from tests.helpers.processes import started, wait_for_children
from tests.helpers.transport import RsyncDaemon, SilentListener, free_port, wire


@pytest.fixture
def daemon_cluster(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Cluster, RsyncDaemon]]:
    d = RsyncDaemon(tmp_path / "rsyncd", cluster.repo)
    cluster.write_config(source=d.url())
    try:
        yield cluster, d
    finally:
        d.stop()


def test_pull_from_an_rsync_daemon_module(daemon_cluster: tuple[Cluster, RsyncDaemon]) -> None:
    cluster, d = daemon_cluster
    cluster.publish()
    p = cluster.pull()
    assert "mx: installed serial 1" in p.stdout
    assert lookup(cluster, "postmaster@example-1.org") == "OK"
    assert lookup(cluster, "example-1.org", "transport") == "lmtp:[10.0.1.11]:24"
    assert lookup(cluster, "nobody@example-1.org") is None
    # The daemon really served it: its log names the module and the release directory.
    assert "rsync on mapsync/mx/releases/1/" in d.log.read_text()
    assert cluster.cli("verify").returncode == 0
    assert "is current" in cluster.pull().stdout


def test_one_new_account_costs_little_on_the_wire(tmp_path: Path, sqlite_url: str) -> None:
    big = make_cluster(tmp_path / "big", sqlite_url, accounts=20000, domains=50, aliases=2000)
    d = RsyncDaemon(tmp_path / "rsyncd", big.repo)
    try:
        big.write_config(source=d.url())
        big.publish()
        first = big.pull().stdout
        full = wire(first)

        new = add_account(big, "zz-delta-probe", "example-7.org")
        out = big.publish().stdout
        assert "published serial 2" in out
        p = big.pull()
        assert "installed serial 2 (was 1)" in p.stdout
        delta = wire(p.stdout)
        state = read_state(big)
        assert state["last_bytes"] == delta
        assert lookup(big, new) == "OK"
    finally:
        d.stop()

    release = big.repo / "mx" / "releases" / "2"
    sizes = {f.name: f.stat().st_size for f in release.iterdir()}
    text_total = sum(v for k, v in sizes.items() if not k.startswith("MANIFEST"))
    print(
        f"\n[delta] first pull {full:,} B on the wire; one new account: {delta:,} B on the wire "
        f"(sent+received, LATEST + release); recipients text {sizes['recipients']:,} B, "
        f"all text maps {text_total:,} B, release files {sizes}"
    )
    assert sizes["recipients"] > 500_000
    assert delta < 10_000, f"{delta} bytes for one new account"
    assert delta * 50 < sizes["recipients"]
    assert full > sizes["recipients"] / 10  # the first pull really moved the data (compressed)


def test_unreachable_daemon_fails_cleanly_and_the_old_set_keeps_serving(cluster: Cluster) -> None:
    cluster.publish()
    cluster.pull()
    before = tree_snapshot(cluster.target)
    port = free_port()  # nothing listens here
    cluster.write_config(source=f"rsync://127.0.0.1:{port}/mapsync/mx")
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "mapsync: channel mx: rsync failed (exit" in p.stderr
    assert "failed to connect to 127.0.0.1" in p.stderr and "Connection refused" in p.stderr
    assert tree_snapshot(cluster.target) == before
    assert lookup(cluster, "postmaster@example-1.org") == "OK"
    state = read_state(cluster)
    assert "rsync failed" in str(state["last_error"])
    st = cluster.cli("status")
    assert st.returncode == 1, st.stdout  # WARNING: still fresh, but the last run failed
    assert "last run failed: rsync failed" in st.stdout


def test_a_daemon_that_never_answers_times_out(cluster: Cluster) -> None:
    cluster.publish()
    cluster.pull()
    before = tree_snapshot(cluster.target)
    with socket.socket() as silent:  # accepts connections (backlog), never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        cluster.write_config(source=f"rsync://127.0.0.1:{port}/mapsync/mx")
        text = cluster.config_path.read_text()
        cluster.config_path.write_text(text.replace('timeout = "30s"', 'timeout = "1s"'))
        started = time.monotonic()
        p = cluster.cli("pull")
        took = time.monotonic() - started
    assert p.returncode == 2, p.stdout + p.stderr
    assert re.search(r"rsync (timed out after 1s|failed \(exit 30\))", p.stderr), p.stderr
    assert took < 15
    print(f"\n[timeout] {took:.1f}s: {p.stderr.strip()}")
    assert tree_snapshot(cluster.target) == before
    assert lookup(cluster, "postmaster@example-1.org") == "OK"
    assert json.loads((cluster.state / "mx" / "state.json").read_text())["last_error"]


def test_the_overall_timeout_kills_an_rsync_that_hangs(tmp_path: Path) -> None:
    from mapsync.errors import TransportError
    from mapsync.transport.rsync import run

    with socket.socket() as silent:  # no --contimeout/--timeout here: only run()'s own limit
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(TransportError, match="rsync timed out after 1s"):
            run([f"rsync://127.0.0.1:{port}/mapsync/mx/LATEST", str(tmp_path)], 1)
        took = time.monotonic() - started
    assert 1 <= took < 3
    assert not list(tmp_path.iterdir())


def test_sigterm_during_a_pull_ends_the_rsync_it_waits_for(cluster: Cluster) -> None:
    """The signal ends mapsync with 143, and its rsync with it: an rsync left running would go
    on writing into the staging area after the run has removed it and let go of the lock."""
    cluster.publish()
    cluster.pull()
    before = tree_snapshot(cluster.target)
    with SilentListener() as silent:
        cluster.write_config(source=f"rsync://127.0.0.1:{silent.port}/mapsync/mx")
        with started(cluster, "pull") as proc:
            rsyncs = wait_for_children(proc, "rsync", 1)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
            took = time.monotonic() - signalled
            left = [p for p in rsyncs if p.running()]
    print(f"\n[signal] pull waiting on rsync: exit {proc.returncode} {took:.2f}s after SIGTERM")
    assert proc.returncode == 143, out + err
    assert "Traceback" not in err
    assert not left, f"rsync still running after mapsync exited: {left}"
    assert took < 5
    assert not (cluster.state / "mx" / "incoming").exists()
    assert tree_snapshot(cluster.target) == before
    assert lookup(cluster, "postmaster@example-1.org") == "OK"


def test_polls_leave_no_failures_in_the_daemons_log(
    daemon_cluster: tuple[Cluster, RsyncDaemon],
) -> None:
    """With a basis the agent asks for LATEST and the next release's manifest and patches in
    one rsync. A poll that finds nothing new must not make the daemon log a failure for each
    of those not there yet (``change_dir ... failed``: for every node, every minute); a pull
    of a new release takes that one connection alone: it builds the changed map from its
    patch and the others from its basis, and has nothing else to list or fetch."""
    cluster, d = daemon_cluster
    cluster.publish()
    assert "installed serial 1" in cluster.pull().stdout
    for _ in range(2):
        assert "is current" in cluster.pull().stdout
    log = d.log.read_text()
    assert "failed" not in log and "error" not in log.lower(), log
    add_account(cluster, "prefetched", "example-2.org")
    cluster.publish()
    before = d.log.read_text().count("connect from")
    p = cluster.cli("-v", "pull")
    assert "installed serial 2 (was 1)" in p.stdout
    assert "text rebuilt from patches" in p.stderr
    assert d.log.read_text().count("connect from") - before == 1
    assert lookup(cluster, "prefetched@example-2.org") == "OK"
    assert "failed" not in d.log.read_text()

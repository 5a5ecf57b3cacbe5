"""Pulling from a real ``rsync --daemon`` on a loopback port: the ``rsync://`` source an
operator normally configures, the delta transfer that makes a one-entry change cheap,
and what happens when the daemon is not there, does not answer, or the pull is ended by a
signal while rsync waits for it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account, lookup, read_state, tree_snapshot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SilentServer:
    """A loopback port that accepts every connection and never says a word (a node or a
    publisher that hangs); ``connections`` counts them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self._accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self._accepted.append(conn)

    @property
    def connections(self) -> int:
        return len(self._accepted)

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._accepted:
            conn.close()
        self.sock.close()


@dataclass(frozen=True)
class Process:
    """A process seen in /proc; ``started`` (clock ticks after boot) tells a reused pid apart."""

    pid: int
    name: str
    started: str

    def running(self) -> bool:
        st = _proc_stat(self.pid)
        return st is not None and st[20] == self.started and st[1] != "Z"


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 2 on: [comm, state, ppid, pgrp, ...]; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    close = text.rindex(")")
    return [text[text.index("(") + 1 : close], *text[close + 2 :].split()]


def processes(*, parent: int | None = None, group: int | None = None) -> list[Process]:
    """The live processes whose parent is ``parent`` and/or whose process group is ``group``."""
    found = []
    for entry in os.listdir("/proc"):
        st = _proc_stat(int(entry)) if entry.isdigit() else None
        if st is None or st[1] == "Z":
            continue
        if (parent is None or int(st[2]) == parent) and (group is None or int(st[3]) == group):
            found.append(Process(int(entry), st[0], st[20]))
    return found


@contextmanager
def started(cluster: Cluster, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``mapsync ARGS`` running in the background, in a process group of its own: what is left
    of it when the test ends (a test that failed) is killed, the rsyncs it started with it."""
    argv = [sys.executable, "-m", "mapsync", "--config", str(cluster.config_path), *args]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def wait_for_children(
    proc: subprocess.Popen[str], name: str, count: int, timeout: float = 30
) -> list[Process]:
    """The children named ``name`` of ``proc``, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in processes(parent=proc.pid) if p.name == name]
        if len(found) >= count:
            return found
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"{len(found)} {name} processes, not {count}:\n{out}\n{err}")
        time.sleep(0.02)


class RsyncDaemon:
    """``rsync --daemon`` on 127.0.0.1 with one module ``module`` at ``path`` (read-only, or
    writable as a node's push inbox)."""

    def __init__(
        self,
        root: Path,
        path: Path,
        *,
        module: str = "mapsync",
        writable: bool = False,
        port: int | None = None,
    ) -> None:
        self.root = root
        self.module = module
        self.port = port or _free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "rsyncd.conf"
        self.log = root / "rsyncd.log"
        # uid/gid root: pytest's tmp directories are 0700, so "nobody" could not use them.
        self.conf.write_text(
            f"pid file = {root / 'rsyncd.pid'}\n"
            f"log file = {self.log}\n"
            "use chroot = no\n"
            "uid = root\n"
            "gid = root\n"
            f"[{module}]\n"
            f"    path = {path}\n"
            f"    read only = {'no' if writable else 'yes'}\n"
            "    use chroot = no\n"
        )
        self.proc = subprocess.Popen(
            [
                "rsync",
                "--daemon",
                "--no-detach",
                f"--config={self.conf}",
                f"--port={self.port}",
                "--address=127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.log.read_text() if self.log.exists() else ""
                    pytest.fail(f"rsync daemon did not start: {log}")
                time.sleep(0.05)

    def url(self, channel: str = "mx") -> str:
        return f"rsync://127.0.0.1:{self.port}/{self.module}/{channel}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def daemon_cluster(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Cluster, RsyncDaemon]]:
    d = RsyncDaemon(tmp_path / "rsyncd", cluster.repo)
    cluster.write_config(source=d.url())
    try:
        yield cluster, d
    finally:
        d.stop()


_WIRE = re.compile(r"installed serial (\d+)(?: \(was \d+\))?, ([\d,]+) bytes on the wire")


def wire(out: str) -> int:
    m = _WIRE.search(out)
    assert m, out
    return int(m.group(2).replace(",", ""))


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
    port = _free_port()  # nothing listens here
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
    with SilentServer() as silent:
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

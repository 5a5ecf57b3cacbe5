"""Benchmark: what one node's poll and one node's pull cost an rsync daemon, and fan-out.

    python benchmarks/mirror.py                              # 20,000 accounts, 200 polls, 50/100/200
    python benchmarks/mirror.py --fanout 50,100 --polls 100
    python benchmarks/mirror.py --json /tmp/mirror.json      # also write every number as JSON

The numbers behind docs/scaling.md. Everything is real and on this machine: a seeded SQLite
publisher (channel ``mx``, the four MX maps), its repository served by an ``rsync --daemon``
on loopback (the upstream), ``mapsync mirror`` copying it into a second directory served by
a second daemon (the mirror), and nodes pulling from the mirror:

1. ``mapsync mirror``: the first copy, a run with nothing new, and a run copying one changed
   release (wall time, bytes on the wire, CPU of the mirror process and its rsyncs); then
   ``mirror --interval 2`` for 10 runs with nothing new (CPU per run without Python's start).
2. A node's "nothing changed" poll: what ``mapsync pull`` asks the daemon when LATEST has not
   moved (one rsync of ``LATEST``), repeated --polls times one after another: the daemon's CPU
   per connection (its forked children, read from /proc as the daemon reaps them), the
   client's wall time and rsync's bytes. Then five whole ``mapsync pull`` runs (Python start
   included) for the node's view.
3. A node's pull of one changed release (one account added): a real ``mapsync pull`` against
   the mirror's daemon: the daemon's CPU, wall time, bytes on the wire.
4. Fan-out: N simulated nodes at once against the mirror's daemon. Each does exactly the
   agent's wire steps (``mapsync.transport.Remote``: LATEST; manifest and signature; the
   listing; the maps, delta-encoded against the previous release with the agent's block
   size) in a thread of this process, each rsync its own process; first all N poll with
   nothing changed, then a new release is published and mirrored and all N pull it. Per N:
   wall time until the last node is done, per-node p50/p99/max, the daemon's CPU, bytes.
   Verification, cdb build and swap are the node's own CPU, not the daemon's, and are left out.
5. Push: ``mapsync publish`` pushing one changed release to K inboxes on a writable rsync
   daemon, against the same publish pushing to none: the publisher's CPU per push.

Not part of the test suite (benchmarks/ is not run by CI). Run as root on an idle machine
if you can; the numbers in docs/scaling.md came from a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fanout import commit_account, cpu_seconds, nearest_rank

from mapsync import log
from mapsync.release import LATEST, MANIFEST, SIGNATURE, parse_latest, parse_manifest, release_dir
from mapsync.transport import Remote
from mapsync.transport.rsync import block_size

MX_MAPS = '["domains", "recipients", "virtual", "transport"]'
CONFIG = """\
[publisher]
database = "sqlite:///{d}/central.db"
repository = "{d}/repo"
signing_key = "{d}/keys/signing.key"
keep = 5
[publisher.channels.mx]
maps = {maps}
push = [{push}]

[agent]
state = "{d}/node/state"
trusted_keys = ["{d}/keys/signing.pub"]
[agent.channels.mx]
source = "{source}"
target = "{d}/node/postfix"
maps = {maps}
"""
Numbers = dict[str, Any]


def note(msg: str) -> None:
    sys.stderr.write(f"mirror-bench: {msg}\n")
    sys.stderr.flush()


def mapsync(config: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the mapsync CLI; fail the benchmark if it fails."""
    head = [sys.executable, "-m", "mapsync", "-q"]
    if config is not None:
        head += ["--config", str(config)]
    proc = subprocess.run([*head, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mapsync {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (and theirs) so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Daemon:
    """``rsync --daemon`` on 127.0.0.1 with one module ``m`` at ``path``."""

    def __init__(self, root: Path, path: Path, port: int, writable: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        conf = root / "rsyncd.conf"
        conf.write_text(
            f"pid file = {root / 'pid'}\nlog file = {root / 'log'}\nuse chroot = no\nsocket options = TCP_NODELAY\n"
            f"uid = root\ngid = root\nmax connections = 0\n"
            f"[m]\n    path = {path}\n    read only = {'no' if writable else 'yes'}\n"
        )
        self.port = port
        self.proc = subprocess.Popen(
            [
                "rsync",
                "--daemon",
                "--no-detach",
                f"--config={conf}",
                f"--port={port}",
                "--address=127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not (root / "pid").exists() or not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"rsync daemon on port {port} did not start")
            time.sleep(0.05)

    def _listening(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        time.sleep(0.05)  # the probe's child is reaped before anything is measured
        return True

    def url(self, path: str = "") -> str:
        return f"rsync://127.0.0.1:{self.port}/m{path}"

    def cpu(self) -> float:
        """CPU seconds of the daemon and every connection child it has reaped."""
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def settle(daemon: Daemon) -> float:
    """The daemon's CPU once its last child has been reaped (CPU is counted at reaping)."""
    time.sleep(0.3)
    return daemon.cpu()


def mirror_run(d: Path, upstream: Daemon, dest: Path) -> Numbers:
    before = children_cpu()
    up = upstream.cpu()
    t0 = time.monotonic()
    out = mapsync(None, "mirror", upstream.url(), str(dest)).stdout
    wall = time.monotonic() - t0
    wire = sum(int(w.replace(",", "")) for w in _words_before(out, "bytes on the wire"))
    return {
        "output": out.strip(),
        "wall_s": round(wall, 3),
        "cpu_s": round(children_cpu() - before, 3),
        "upstream_cpu_s": round(settle(upstream) - up, 3),
        "bytes": wire,
    }


def _words_before(text: str, phrase: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if phrase in line:
            out.append(line.split(phrase)[0].split()[-1])
    return out


def mirror_loop(upstream: Daemon, dest: Path, interval: int = 2, runs: int = 10) -> Numbers:
    """``mapsync mirror --interval`` with nothing new: CPU per run once Python has started
    (the mirror's, its rsyncs included; the upstream daemon's)."""
    argv = [sys.executable, "-m", "mapsync", "-q", "mirror", "--interval", str(interval)]
    proc = subprocess.Popen([*argv, upstream.url(), str(dest)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(interval * 1.5)  # started, and its first run done
        cpu0, up0 = cpu_seconds(proc.pid), settle(upstream)
        time.sleep(interval * runs - 0.3)
        cpu, up = cpu_seconds(proc.pid) - cpu0, settle(upstream) - up0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "interval_s": interval,
        "runs": runs,
        "mirror_cpu_ms_per_run": round(1000 * cpu / runs, 1),
        "upstream_cpu_ms_per_run": round(1000 * up / runs, 1),
        "exit_on_sigterm": proc.returncode,
    }


# -- a node's poll, and a node's pull -----------------------------------------------------------


def polls(mirror: Daemon, n: int, work: Path) -> Numbers:
    """``n`` nothing-changed polls one after another: rsync of LATEST, as the agent does."""
    remote = Remote(mirror.url("/mx"), timeout=60)
    walls, wire = [], 0
    cpu0, daemon0 = children_cpu(), settle(mirror)
    for i in range(n):
        target = work / f"LATEST.{i}"
        t0 = time.monotonic()
        wire += remote.fetch_file(LATEST, target, max_size=4096)
        walls.append(time.monotonic() - t0)
        target.unlink()
    daemon = settle(mirror) - daemon0
    return {
        "polls": n,
        "daemon_cpu_ms_per_poll": round(1000 * daemon / n, 2),
        "client_cpu_ms_per_poll": round(1000 * (children_cpu() - cpu0) / n, 2),
        "wall_ms_p50": round(1000 * nearest_rank(walls, 0.5), 1),
        "wall_ms_p99": round(1000 * nearest_rank(walls, 0.99), 1),
        "bytes_per_poll": round(wire / n),
    }


def whole_pulls(config: Path, mirror: Daemon, n: int = 5) -> Numbers:
    """``n`` whole ``mapsync pull`` runs with nothing new (Python start included)."""
    walls = []
    cpu0, daemon0 = children_cpu(), settle(mirror)
    for _ in range(n):
        t0 = time.monotonic()
        out = mapsync(config, "pull").stdout
        walls.append(time.monotonic() - t0)
        assert "is current" in out, out
    return {
        "runs": n,
        "wall_ms_p50": round(1000 * nearest_rank(walls, 0.5)),
        "node_cpu_ms": round(1000 * (children_cpu() - cpu0) / n),
        "daemon_cpu_ms": round(1000 * (settle(mirror) - daemon0) / n, 1),
    }


def one_pull(config: Path, mirror: Daemon) -> Numbers:
    cpu0, daemon0 = children_cpu(), settle(mirror)
    t0 = time.monotonic()
    out = mapsync(config, "pull").stdout
    wall = time.monotonic() - t0
    assert "installed serial" in out, out
    return {
        "output": out.strip(),
        "wall_ms": round(1000 * wall),
        "node_cpu_ms": round(1000 * (children_cpu() - cpu0)),
        "daemon_cpu_ms": round(1000 * (settle(mirror) - daemon0), 1),
        "bytes": int(_words_before(out, "bytes on the wire")[0].replace(",", "")),
    }


# -- fan-out ------------------------------------------------------------------------------------


def node_poll(remote: Remote, where: Path) -> tuple[float, int]:
    t0 = time.monotonic()
    wire = remote.fetch_file(LATEST, where / LATEST, max_size=4096)
    return time.monotonic() - t0, wire


def node_pull(remote: Remote, where: Path, basis: Path) -> tuple[float, int]:
    """The agent's wire steps for a new release (see mapsync/agent/pull.py fetch_release)."""
    t0 = time.monotonic()
    wire = remote.fetch_file(LATEST, where / LATEST, max_size=4096)
    latest = parse_latest((where / LATEST).read_bytes(), "LATEST")
    name = release_dir(latest.serial)
    staging = where / "release"
    staging.mkdir()
    wire += remote.fetch_files(name, [MANIFEST, SIGNATURE], staging, None, 1 << 20)
    manifest = parse_manifest((staging / MANIFEST).read_bytes(), MANIFEST)
    listing = remote.list_dir(name)
    assert set(listing) >= manifest.files(), listing
    largest = max(m.size for m in manifest.maps.values())
    files = sorted(manifest.files())
    wire += remote.fetch_files(name, files, staging, basis, largest + 1, block_size(largest))
    for m in manifest.maps.values():
        assert (staging / m.file).stat().st_size == m.size
    return time.monotonic() - t0, wire


class Children:
    """Samples the daemon's connection children every 50 ms while running: the most at once,
    and their RSS summed then (shared pages counted in each, so an upper bound)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.most = 0
        self.rss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            count, rss = 0, 0
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    if ppid != self.pid:
                        continue
                    with open(f"/proc/{entry.name}/status") as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                rss += int(line.split()[1])
                    count += 1
                except (OSError, ValueError, IndexError):
                    continue
            if count > self.most:
                self.most, self.rss_kib = count, rss

    def __enter__(self) -> Children:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fan(mirror: Daemon, n: int, work: Path, job: str, basis: Path | None) -> Numbers:
    """``n`` simulated nodes at once; ``job``: poll (nothing changed) or pull (new release)."""
    nodes = []
    for i in range(n):
        where = work / f"{job}-{n}-{i}"
        where.mkdir(parents=True)
        nodes.append(where)
    remote = Remote(mirror.url("/mx"), timeout=300)
    gate = threading.Barrier(n)

    def one(where: Path) -> tuple[float, int]:
        gate.wait()
        if job == "poll":
            return node_poll(remote, where)
        assert basis is not None
        return node_pull(remote, where, basis)

    cpu0, daemon0 = children_cpu(), settle(mirror)
    t0 = time.monotonic()
    with Children(mirror.proc.pid) as children, ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, nodes))
    wall = time.monotonic() - t0
    daemon = settle(mirror) - daemon0
    for where in nodes:
        shutil.rmtree(where)
    each = [r[0] for r in results]
    return {
        "nodes": n,
        "job": job,
        "wall_s": round(wall, 2),
        "node_p50_s": round(nearest_rank(each, 0.5), 2),
        "node_p99_s": round(nearest_rank(each, 0.99), 2),
        "node_max_s": round(max(each), 2),
        "daemon_cpu_s": round(daemon, 2),
        "daemon_cpu_ms_per_node": round(1000 * daemon / n, 1),
        "clients_cpu_s": round(children_cpu() - cpu0, 2),
        "bytes_per_node": round(sum(r[1] for r in results) / n),
        "daemon_children_at_once": children.most,
        "daemon_children_rss_mib": round(children.rss_kib / 1024, 1),
    }


# -- push ---------------------------------------------------------------------------------------


def push_cost(d: Path, inbox: Daemon, k: int, source: str) -> Numbers:
    """Publish one changed release pushing to none, then to ``k`` inboxes: CPU per push."""
    out: Numbers = {"inboxes": k}
    for label, count in (("no_push", 0), ("push", k)):
        push = ", ".join(f'"{inbox.url(f"/n{i:04d}/mx")}"' for i in range(count))
        config = d / f"push-{count}.toml"
        config.write_text(CONFIG.format(d=d, maps=MX_MAPS, push=push, source=source))
        if count:  # every inbox already has the current release: the push moves a delta
            mapsync(config, "publish")
        commit_account(d, f"zz-push-{label}-{time.monotonic_ns()}")
        cpu0 = children_cpu()
        t0 = time.monotonic()
        mapsync(config, "publish")
        out[f"{label}_wall_s"] = round(time.monotonic() - t0, 2)
        out[f"{label}_cpu_s"] = round(children_cpu() - cpu0, 2)
    out["cpu_ms_per_push"] = round(1000 * (out["push_cpu_s"] - out["no_push_cpu_s"]) / k, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accounts", type=int, default=20_000, help="seeded accounts (20,000)")
    ap.add_argument("--polls", type=int, default=200, help="sequential polls measured (200)")
    ap.add_argument("--fanout", default="50,100,200", help="simultaneous nodes (50,100,200)")
    ap.add_argument("--push", type=int, default=50, help="inboxes pushed to (50; 0: skip)")
    ap.add_argument("--dir", type=Path, help="work here and keep it (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="also write every number to this file")
    args = ap.parse_args()
    log.configure(logging.WARNING)  # the transport's debug lines are not the benchmark's output
    d = args.dir or Path(tempfile.mkdtemp(prefix="mapsync-mirror-bench."))
    d.mkdir(parents=True, exist_ok=True)
    results: Numbers = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "rsync": subprocess.run(
            ["rsync", "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0],
        "accounts": args.accounts,
    }
    daemons: list[Daemon] = []
    try:
        run_all(d, args, results, daemons)
    finally:
        for daemon in daemons:
            daemon.stop()
        if args.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def run_all(d: Path, args: argparse.Namespace, results: Numbers, daemons: list[Daemon]) -> None:
    up_port, mirror_port, inbox_port = free_ports(3)
    source = f"rsync://127.0.0.1:{mirror_port}/m/mx"
    config = d / "mapsync.toml"
    config.write_text(CONFIG.format(d=d, maps=MX_MAPS, push="", source=source))
    mapsync(config, "keygen", str(d / "keys" / "signing.key"))
    note(f"seeding {args.accounts:,} accounts")
    mapsync(
        config,
        "seed",
        "--accounts",
        str(args.accounts),
        "--domains",
        str(max(10, args.accounts // 100)),
        "--aliases",
        str(args.accounts // 2),
    )
    mapsync(config, "publish")
    sizes = {f.name: f.stat().st_size for f in (d / "repo" / "mx" / "releases" / "1").iterdir()}
    results["release_bytes"] = sizes
    dest = d / "mirror"
    upstream = Daemon(d / "rsyncd-upstream", d / "repo", up_port)
    daemons.append(upstream)

    note("mirror: first copy, nothing new")
    results["mirror_first_copy"] = mirror_run(d, upstream, dest)
    results["mirror_nothing_new"] = mirror_run(d, upstream, dest)
    note("mirror --interval 2, nothing new, 10 runs")
    results["mirror_interval_nothing_new"] = mirror_loop(upstream, dest)
    mirror = Daemon(d / "rsyncd-mirror", dest, mirror_port)
    daemons.append(mirror)
    mapsync(config, "pull")  # the node has serial 1

    note(f"{args.polls} nothing-changed polls, one after another")
    work = d / "work"
    work.mkdir()
    results["poll"] = polls(mirror, args.polls, work)
    results["poll_whole_mapsync_pull"] = whole_pulls(config, mirror)

    note("one account added: mirror it, pull it")
    commit_account(d, f"zz-one-{time.monotonic_ns()}")
    mapsync(config, "publish")
    results["mirror_one_change"] = mirror_run(d, upstream, dest)
    results["pull_one_change"] = one_pull(config, mirror)

    results["fanout"] = []
    for n in (int(x) for x in args.fanout.split(",") if x):
        note(f"fan-out: {n} nodes poll at once")
        results["fanout"].append(fan(mirror, n, work, "poll", None))
        commit_account(d, f"zz-fan-{n}-{time.monotonic_ns()}")
        mapsync(config, "publish")
        mirror_run(d, upstream, dest)
        serial = parse_latest((dest / "mx" / LATEST).read_bytes(), "LATEST").serial
        basis = dest / "mx" / release_dir(serial - 1)
        note(f"fan-out: {n} nodes pull serial {serial} at once")
        results["fanout"].append(fan(mirror, n, work, "pull", basis))

    if args.push:
        note(f"push: one release to {args.push} inboxes")
        inboxes = d / "inboxes"
        for i in range(args.push):
            (inboxes / f"n{i:04d}").mkdir(parents=True)
        inbox = Daemon(d / "rsyncd-inbox", inboxes, inbox_port, writable=True)
        daemons.append(inbox)
        results["push"] = push_cost(d, inbox, args.push, source)


if __name__ == "__main__":
    main()

"""Benchmarks: mapsync against the reference tools, as ratios measured in the same run.

    python benchmarks/run.py --accounts 1000000      # the reference dataset (takes minutes)
    python benchmarks/run.py --accounts 100000       # quicker

Builds (and caches under --dir) a seeded SQLite database, then measures each step as a
subprocess — the way cron runs it, process start included — and prints a table:
full publish vs `postmap cdb:` building the same maps from the same text; nothing-changed
publish and pull; a one-account change: rsync bytes on the wire and agent apply time; agent
peak RSS. Not part of the test suite (too heavy for CI).

Then the long-running side, in the same run: ``mapsync publish --interval 1`` (incremental:
docs/incremental.md) pushing into a node's inbox (a writable module of the same loopback
rsync daemon) where ``mapsync agent --watch`` installs each release. After the loop's first
(full) publish, 20 accounts are committed one at a time, each by a separate process; per
change: the publish's own seconds (its log), commit → LATEST, commit → live on the node (the
new address in its live recipients map), and the publisher's peak PSS while it keeps its
state. The load average is printed beside the numbers: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

CONFIG = """\
[publisher]
database = "sqlite:///{d}/central.db"
repository = "{d}/repo"
signing_key = "{d}/keys/signing.key"
[publisher.guards]
max_growth = "1000%"
[publisher.channels.mx]
maps = ["domains", "recipients", "virtual", "transport"]
[agent]
state = "{d}/state"
trusted_keys = ["{d}/keys/signing.pub"]
[agent.channels.mx]
source = "rsync://127.0.0.1:{port}/mapsync/mx"
target = "{d}/postfix"
"""

# The long-running side: the same publisher, its channel pushing into the node's inbox (a
# writable module "inbox" of the benchmark's rsync daemon), and that node's agent, which
# polls the read-only module and watches the inbox (mapsync agent --watch).
LIVE_CONFIG = CONFIG.split("[agent]")[0].replace(
    "[publisher.channels.mx]\n",
    '[publisher.channels.mx]\npush = ["rsync://127.0.0.1:{port}/inbox/mx"]\n',
)
NODE_CONFIG = """\
[agent]
state = "{d}/node/state"
trusted_keys = ["{d}/keys/signing.pub"]
jitter = "0s"
[agent.channels.mx]
source = "rsync://127.0.0.1:{port}/mapsync/mx"
target = "{d}/node/postfix"
inbox = "{d}/node/inbox/mx"
"""
ROUNDS = 20  # changes committed to the long-running publisher


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (Linux)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += map(int, fh.read().split())
        except OSError:
            continue
    return found


def _pss(pid: int) -> int:
    """Proportional set size (KiB) of ``pid``: its share of pages shared with a forked child
    counted once across both, where RSS would count them twice."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of a process and its children every ``interval`` seconds (its cost,
    a walk of the page tables, is taken from the shared cores): the
    peak memory of a run that forks, which wait4's ru_maxrss (the largest single process's
    peak, children included but not added) understates."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, sum(map(_pss, _tree(self.pid))))


LAST_TREE_PEAK = 0  # KiB: the TreeMemory peak of the last timed() run


# As installed: Python reads its compiled bytecode (a package compiles it at install time), so
# a developer's PYTHONDONTWRITEBYTECODE would add mapsync's compilation (~0.1 s) to every start.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak memory (KiB: the larger of wait4's ru_maxrss and the sampled PSS sum
    of the process tree, see TreeMemory), stdout."""
    global LAST_TREE_PEAK
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    sampler = TreeMemory(proc.pid)
    sampler.start()
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    sampler.done.set()
    sampler.join()
    LAST_TREE_PEAK = sampler.peak
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    elapsed = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.decode()}")
    return elapsed, max(usage.ru_maxrss, sampler.peak), out.decode()


def rsync_daemon(d: Path) -> subprocess.Popen[bytes]:
    """A read-only rsync daemon on loopback serving the repository: what nodes pull from."""
    # The inbox module writes as the user running the benchmark (a daemon run by root would
    # otherwise write as "nobody").
    (d / "node/inbox/mx").mkdir(mode=0o700, parents=True, exist_ok=True)
    (d / "rsyncd.conf").write_text(
        f"use chroot = no\nsocket options = TCP_NODELAY\n[mapsync]\n    path = {d}/repo\n    read only = yes\n"
        f"[inbox]\n    path = {d}/node/inbox\n    read only = no\n"
        f"    uid = {os.getuid()}\n    gid = {os.getgid()}\n"
    )
    proc = subprocess.Popen(
        [
            "rsync",
            "--daemon",
            "--no-detach",
            f"--config={d}/rsyncd.conf",
            f"--port={PORT}",
            "--address=127.0.0.1",
        ]
    )
    time.sleep(0.5)
    return proc


PORT = 18873


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--accounts", type=int, default=100_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mapsync-bench"))
    ap.add_argument(
        "--live-interval",
        type=float,
        default=1.0,
        help="the long-running publisher's --interval (default 1 s)",
    )
    ap.add_argument(
        "--live-only",
        action="store_true",
        help="only the long-running rows (publish --interval, push, agent --watch)",
    )
    args = ap.parse_args()
    n = args.accounts
    d = args.dir / str(n)
    ms = [sys.executable, "-m", "mapsync", "-q", "--config", str(d / "mapsync.toml")]
    rows: list[tuple[str, str, str]] = []
    seeded = 0.0  # when this run seeded the database (0: cached)
    if not (d / "central.db").exists():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "mapsync.toml").write_text(CONFIG.format(d=d, port=PORT))
        subprocess.run(
            [*ms, "keygen", str(d / "keys/signing.key")], check=True, capture_output=True
        )
        secs, _, _ = timed(
            [
                *ms,
                "seed",
                "--accounts",
                str(n),
                "--domains",
                str(max(10, n // 100)),
                "--aliases",
                str(n // 2),
                "--mailstores",
                "20",
            ]
        )
        rows.append(("seed", f"{secs:.1f} s", f"{n / secs:,.0f} accounts/s"))
        seeded = time.time()
    # A cached database made by an older mapsync gets this version's schema (the deletion
    # log the fingerprint reads): what `init-db` does on an upgrade.
    subprocess.run(
        [*ms, "init-db", "--database", f"sqlite:///{d}/central.db"], check=True, capture_output=True
    )
    for p in ("repo", "state", "postfix", "node", "live"):
        shutil.rmtree(d / p, ignore_errors=True)
    (d / "live").mkdir()
    (d / "live.toml").write_text(LIVE_CONFIG.format(d=d, port=PORT))
    (d / "node.toml").write_text(NODE_CONFIG.format(d=d, port=PORT))

    daemon = rsync_daemon(d)
    try:
        if not args.live_only:
            rows += measure(d, ms)
        rows += measure_live(d, seeded, args.live_interval)
    finally:
        daemon.terminate()
        daemon.wait()
    width = max(len(r[0]) for r in rows)
    print(f"mapsync benchmarks, {n:,} accounts, {os.cpu_count()} CPUs ({parallel()})")
    for what, value, note in rows:
        print(f"  {what:<{width}}  {value:<22}  {note}")


def add_account(d: Path) -> str:
    """Commit one new account in a separate process (as a panel would); its address."""
    return commit_account(d)[0]


def commit_account(d: Path) -> tuple[str, float]:
    """Commit one new account in a separate process (as a panel would); its address and the
    wall-clock time (time.time()) at which the commit returned in that process."""
    local = f"bench.{time.time_ns()}"
    script = (
        "import time\n"
        "from sqlalchemy import create_engine, insert, select\n"
        "from mapsync.sources import schema as t\n"
        f"e = create_engine('sqlite:///{d}/central.db')\n"
        "with e.begin() as c:\n"
        f"    c.execute(insert(t.account).values(domain_id=1, local_part={local!r}, status='active'))\n"
        "    domain = c.execute(select(t.domain.c.name).where(t.domain.c.id == 1)).scalar_one()\n"
        "print(domain, repr(time.time()))\n"
    )
    domain, committed = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout.split()
    return f"{local}@{domain}", float(committed)


def measure(d: Path, ms: list[str]) -> list[tuple[str, str, str]]:
    """Every row of the performance table (docs/benchmarks.md), in one run."""
    rows = []
    secs, rss, _ = timed([*ms, "publish"])
    release = d / "repo/mx/releases/1"
    manifest = json.loads((release / "MANIFEST.json").read_text())
    ref = 0.0
    scratch = d / "postmap"
    scratch.mkdir(exist_ok=True)
    for name in manifest["maps"]:
        shutil.copyfile(release / name, scratch / name)
        t, _, _ = timed(["postmap", f"cdb:{scratch / name}"])
        ref += t
    entries = sum(m["entries"] for m in manifest["maps"].values())
    rows.append(
        (
            "full publish, 4 MX maps",
            f"{secs:.2f} s, {rss / 1024:.0f} MB",
            f"{secs / ref:.2f}x postmap cdb: ({ref:.2f} s for {entries:,} entries); "
            "target ≤ 1.0x, ≤ 500 MB",
        )
    )
    secs, _, _ = timed([*ms, "publish"])
    rows.append(("publish, nothing changed", f"{secs:.2f} s", "target ≤ 0.3 s"))
    secs, rss, _ = timed([*ms, "pull"])
    rows.append(
        (
            "first pull (rsync, verify, build cdb, swap)",
            f"{secs:.2f} s, {rss / 1024:.0f} MB",
            "target ≤ 64 MB",
        )
    )
    secs, _, _ = timed([*ms, "pull"])
    rows.append(("pull, nothing changed (rsync daemon)", f"{secs:.2f} s", "target ≤ 0.2 s"))

    add_account(d)
    secs, _, _ = timed([*ms, "publish"])
    rows.append(
        ("publish, one account added", f"{secs:.2f} s", "target: only what changed is re-rendered")
    )
    secs, rss, _ = timed([*ms, "pull"])
    state = json.loads((d / "state/mx/state.json").read_text())
    rows.append(
        (
            "pull, one account added",
            f"{secs:.2f} s, {rss / 1024:.0f} MB",
            f"{state['last_bytes']:,} bytes on the wire, both ways "
            "(target ≤ 2 KB per one-entry change, apply ≤ 1 s, ≤ 64 MB)",
        )
    )

    # Commit -> live on one node, as cron or a timer would do it with no wait between:
    # from the commit of the insert to the new address in the node's live recipients map.
    t0 = time.perf_counter()
    address = add_account(d)
    committed = time.perf_counter()
    publish, _, _ = timed([*ms, "publish"])
    pull, _, _ = timed([*ms, "pull"])
    live = time.perf_counter() - committed
    with open(d / "postfix/recipients", encoding="utf-8") as fh:
        if not any(line.startswith(address + " ") for line in fh):
            sys.exit(f"commit -> live: {address} is not in the live recipients map")
    rows.append(
        (
            "commit → live (one account, one node)",
            f"{live:.2f} s",
            f"publish {publish:.2f} s + pull {pull:.2f} s, after the insert's own process "
            f"({committed - t0:.2f} s); target ≤ 2 s",
        )
    )
    return rows


# -- the long-running publisher, its pushes and a watching agent --------------------------------


SPIN = "import time\nt = time.perf_counter()\nfor _ in range(20_000_000): pass\nprint(time.perf_counter() - t)"


def parallel() -> str:
    """What a second busy process costs the first here: a pure-Python loop timed alone, then
    two at once. Two vCPUs may give far less than twice one (seen 2026-12-01: each ran at
    ~60 %), which decides whether rendering on both cores can pay (docs/benchmarks.md)."""

    def spin(n: int) -> list[float]:
        procs = [
            subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
            for _ in range(n)
        ]
        return [float(proc.communicate()[0]) for proc in procs]

    (alone,) = spin(1)
    both = spin(2)
    return f"two busy processes run at {alone / max(both):.0%} of one alone each"


def load() -> str:
    """The load average now (the machine may be shared: numbers mean little without it)."""
    return "load {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


def log_records(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a mapsync process (anything else skipped)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def latest(path: Path) -> tuple[int, float] | None:
    """The serial a LATEST file names and when it was written (mtime); None if there is none
    (yet)."""
    try:
        with open(path, "rb") as fh:
            mtime = os.fstat(fh.fileno()).st_mtime
            return int(json.loads(fh.read())["serial"]), mtime
    except (OSError, ValueError, KeyError):
        return None


def live(target: Path) -> tuple[int, float] | None:
    """The serial of a node's live set (the name ``.mapsync/current`` points to) and when the
    link was put in place (its own mtime); None before the first install."""
    link = target / ".mapsync" / "current"
    try:
        name, mtime = os.readlink(link), os.lstat(link).st_mtime
    except OSError:
        return None
    head = name.split(".", 1)[0]
    return (int(head), mtime) if head.isdigit() else None


def newer(path: Path, than: int) -> tuple[int, float] | None:
    """:func:`latest` once it names a serial above ``than``."""
    found = latest(path)
    return found if found is not None and found[0] > than else None


def live_at(target: Path, serial: int) -> tuple[int, float] | None:
    """:func:`live` once the node's live serial is at least ``serial``."""
    found = live(target)
    return found if found is not None and found[0] >= serial else None


def holds(path: Path, key: str) -> bool:
    """Whether the text map at ``path`` has a line for ``key``."""
    needle = ("\n" + key + " ").encode()
    with open(path, "rb") as fh:
        return needle in b"\n" + fh.read()


def nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (of 20 values, p99 is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {nearest_rank(values, 0.5):.2f} s, p99 {nearest_rank(values, 0.99):.2f} s"


def wait_for(
    what: str,
    check: Callable[[], Any],
    procs: list[subprocess.Popen[bytes]],
    timeout: float,
    poll: float = 0.01,
) -> Any:
    """Poll ``check`` until it returns something true; exit naming ``what`` on a timeout or
    if one of ``procs`` has ended."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        for proc in procs:
            if proc.poll() is not None:
                sys.exit(f"{what}: {proc.args!r} exited {proc.returncode}")
        if time.monotonic() > deadline:
            sys.exit(f"{what}: not after {timeout:.0f} s")
        time.sleep(poll)


def measure_live(d: Path, seeded: float, interval: float = 1.0) -> list[tuple[str, str, str]]:
    """The long-running rows: ``publish --interval 1`` pushing to a node whose ``agent
    --watch`` installs from its inbox; ROUNDS accounts committed one at a time."""
    rows: list[tuple[str, str, str]] = []
    # An incremental run reads the rows stamped since its last read less a minute of clock
    # skew (docs/incremental.md): a database seeded less than a minute ago is a bulk change,
    # read in full, on every run until the seed is a minute old.
    time.sleep(max(0.0, seeded + 61 - time.time()))
    ms = [sys.executable, "-m", "mapsync", "--log-format", "json"]
    repo_latest, target = d / "repo/mx/LATEST", d / "node/postfix"
    if not repo_latest.exists():  # --live-only: no earlier row published
        subprocess.run([*ms, "-q", "--config", str(d / "mapsync.toml"), "publish"], check=True)
    # The node first installs the current release by a pull, as a new node does (which also
    # leaves the inbox its basis for patches), then its agent starts watching.
    subprocess.run([*ms, "-q", "--config", str(d / "node.toml"), "pull"], check=True, env=ENV)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(d / "live/agent.log", "wb") as log:
            agent = subprocess.Popen(
                # -v: the steps of each install are debug lines (agent_steps below).
                [
                    *ms,
                    "-v",
                    "--config",
                    str(d / "node.toml"),
                    "agent",
                    "--watch",
                    "--interval",
                    "3600",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=ENV,
            )
        procs.append(agent)
        wait_for(
            "agent --watch start",
            lambda: any(
                r.get("event") == "agent started" for r in log_records(d / "live/agent.log")
            ),
            procs,
            300,
            0.2,
        )
        # -v: the loop's "publish run done" (the seconds of every run, a nothing-changed one
        # included) is a debug line.
        with open(d / "live/publish.log", "wb") as log, open(d / "live/publish.out", "wb") as out:
            publisher = subprocess.Popen(
                [
                    *ms,
                    "-v",
                    "--config",
                    str(d / "live.toml"),
                    "publish",
                    "--interval",
                    f"{interval:g}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                env=ENV,
            )
        procs.append(publisher)
        memory = TreeMemory(publisher.pid)
        memory.start()
        pub_log = d / "live/publish.log"

        def pushed(serial: int) -> bool:
            return any(
                r.get("event") == "pushed release" and r.get("serial") == serial
                for r in log_records(pub_log)
            )

        # Its first run finds the database as the one-shot runs left it (nothing to read, no
        # state kept) and pushes the current release to the inbox. The first change is then
        # read in full: the state the following runs change.
        first = latest(repo_latest)
        assert first is not None
        wait_for("first push", lambda: pushed(first[0]), procs, 600, 0.1)
        load_before = load()
        _, committed = commit_account(d)
        now = wait_for(
            "the loop's full publish",
            partial(newer, repo_latest, first[0]),
            procs,
            600,
        )
        wait_for("its push", lambda: pushed(now[0]), procs, 600, 0.1)
        full_secs, full_peak = now[1] - committed, memory.peak
        time.sleep(2)
        held = sum(map(_pss, _tree(publisher.pid)))
        memory.peak = 0
        rows.append(
            (
                "publish --interval: first change (full read, state kept)",
                f"{full_secs:.2f} s, {full_peak / 1024:.0f} MB",
                f"commit → LATEST; holds {held / 1024:.0f} MB (PSS) after it; {load_before}",
            )
        )

        # ROUNDS changes, each committed at a random moment of the loop's period.
        rng = random.Random(14)
        rounds: list[dict[str, Any]] = []
        loads = [os.getloadavg()[0]]
        for _ in range(ROUNDS):
            time.sleep(rng.uniform(0.5, 0.5 + interval))
            before = latest(repo_latest)
            assert before is not None
            address, committed = commit_account(d)
            serial, published = wait_for(
                "commit → LATEST",
                partial(newer, repo_latest, before[0]),
                procs,
                120,
            )
            serial_live, installed = wait_for(
                "commit → live on the node",
                partial(live_at, target, serial),
                procs,
                120,
            )
            if not holds(d / f"repo/mx/releases/{serial}/recipients", address):
                sys.exit(f"serial {serial} was published without {address} (a change before it?)")
            if not holds(target / "recipients", address):
                sys.exit(f"{address} is not in the node's live recipients map")
            rounds.append(
                {
                    "serial": serial,
                    "latest": published - committed,
                    "live": installed - committed,
                    "live_serial": serial_live,
                    "committed": committed,
                }
            )
            loads.append(os.getloadavg()[0])
        time.sleep(1.5)
        inc_peak = memory.peak
        memory.done.set()
        memory.join()

        # What the logs say about each serial: the publish's own seconds, the push's.
        records = log_records(pub_log)
        own: dict[int, float] = {}
        push: dict[int, tuple[float, int]] = {}
        pushed_at: dict[int, float] = {}  # when the push had put LATEST in the inbox
        full: list[int] = []
        quiet: list[float] = []
        serial = None
        changed = reading = False
        for rec in records:
            event = rec.get("event")
            if event == "published release":
                serial, changed = rec.get("serial"), True
                if reading and serial is not None and serial > now[0]:
                    full.append(serial)
                reading = False
            elif event == "published incrementally" and serial is not None:
                own[serial] = float(rec["seconds"])
            elif event == "reading snapshot":
                reading = True
            elif event == "pushed release":
                push[rec["serial"]] = (float(rec.get("seconds", 0)), int(rec.get("bytes", 0)))
                pushed_at[rec["serial"]] = datetime.fromisoformat(rec["timestamp"]).timestamp()
            elif event == "publish run done":
                if not changed and serial is not None and serial > now[0]:
                    quiet.append(float(rec["seconds"]))
                changed = False
        serials = [r["serial"] for r in rounds]
        missing = [s for s in serials if s not in own]
        spans = f"load {min(loads):.1f} to {max(loads):.1f} during the {ROUNDS} changes"
        rows.append(
            (
                f"publish, one account added (publish --interval, {ROUNDS} changes)",
                spread([own[s] for s in serials if s in own]),
                "the publish's own seconds (its log); target ≤ 1.0 s; "
                + (f"NOT incremental: serials {missing}; " if missing else "")
                + spans,
            )
        )
        rows.append(
            (
                f"  commit → LATEST (publish --interval {interval:g})",
                spread([r["latest"] for r in rounds]),
                "the commit wakes the loop (it watches the SQLite file; with another "
                f"engine, add the wait for its next run, ≤ {interval:g} s)",
            )
        )
        rows.append(
            (
                "  publisher memory while it keeps its state",
                f"{inc_peak / 1024:.0f} MB peak",
                f"PSS, its rsyncs included, over the {ROUNDS} changes "
                f"(the full read before: {full_peak / 1024:.0f} MB)",
            )
        )
        if quiet:
            rows.append(
                (
                    "publish, nothing changed (publish --interval: a run of the loop)",
                    spread(quiet),
                    f"{len(quiet)} runs between the changes; target ≤ 0.3 s",
                )
            )
        pushes = [push[s] for s in serials if s in push]
        rows.append(
            (
                "commit → live (publish --interval + push + agent --watch)",
                spread([r["live"] for r in rounds]),
                f"new address in the node's live recipients map, {ROUNDS} changes; target ≤ 2 s "
                f"(p99); push {spread([p[0] for p in pushes])}, "
                f"{nearest_rank([p[1] for p in pushes], 0.5):,} B on the wire (median); "
                "agent --watch, LATEST in the inbox → live: "
                + spread(
                    [
                        r["live"] - (pushed_at[r["serial"]] - r["committed"])
                        for r in rounds
                        if r["serial"] in pushed_at
                    ]
                )
                + (f"; read in full at serials {full}" if full else ""),
            )
        )
        steps = agent_steps(d / "live/agent.log", set(serials))
        if steps:
            rows.append(
                (
                    "  agent --watch, its steps (medians from LATEST in the inbox)",
                    ", ".join(f"{what} +{secs:.2f} s" for what, secs in steps),
                    "its debug log: the text made from the patches, the cdbs changed, the "
                    "release installed (swapped in, kept, the inbox completed)",
                )
            )
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return rows


AGENT_STEPS = (
    ("text rebuilt from patches", "text"),
    ("cdb changed in place", "cdbs"),
    ("installed release", "installed"),
)


def agent_steps(log: Path, serials: set[int]) -> list[tuple[str, float]]:
    """The median seconds from "LATEST arrived in the inbox" to each of AGENT_STEPS (the
    last of its kind) in the installs of ``serials``, from the agent's JSON debug log."""
    seen: dict[str, list[float]] = {}
    start: float | None = None
    at: dict[str, float] = {}
    for rec in log_records(log):
        event = rec.get("event")
        stamp = datetime.fromisoformat(rec["timestamp"]).timestamp()
        if event == "LATEST arrived in the inbox":
            start, at = stamp, {}
        elif start is not None and event in dict(AGENT_STEPS):
            at[event] = stamp - start
            if event == "installed release":
                if rec.get("serial") in serials:
                    for name, secs in at.items():
                        seen.setdefault(name, []).append(secs)
                start = None
    return [
        (short, nearest_rank(seen[event], 0.5)) for event, short in AGENT_STEPS if event in seen
    ]


if __name__ == "__main__":
    main()

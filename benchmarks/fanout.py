"""Benchmark: push + watch fan-out, commit → live on N nodes (DESIGN.md: 50 nodes, p99 ≤ 3 s).

    python benchmarks/fanout.py                       # 50 nodes, 20,000 accounts, 5 rounds
    python benchmarks/fanout.py --nodes 10 --rounds 3
    python benchmarks/fanout.py --keep --dir /tmp/fanout   # keep configs, logs and trees

Everything runs on this machine, as real processes: a seeded SQLite publisher whose channel
``mx`` pushes to the inbox of every node (local paths), and one ``mapsync agent --watch
--interval 3600`` per node, each with its own config, state, target and inbox, pulling from
the publisher's repository as a local path. Every node installs serial 1 first (``mapsync
pull``); then the agents start. Each round commits one new account to the database
(t0 = when the commit returned), runs a one-shot ``mapsync publish`` (render, sign, push to
all N inboxes), and polls every node's live set (``TARGET/.mapsync/current``) every 10 ms
until it names the new serial: commit → live per node.

The table shows per round: publish+push wall time, commit → live p50 / p99 / max across the
nodes (p99 by nearest rank: with 50 nodes it is the slowest node), when the push had
delivered LATEST to the last inbox, and CPU seconds spent by the publish (its rsync children
included) and by all agents together (theirs included) — on a small machine, that sum over
the round's wall time says whether the fan-out is CPU-bound, and whose CPU it is. Then the
overall p99 against the target and the agents' memory (VmHWM, VmRSS from /proc). Not part of
the test suite (too heavy for CI).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

TARGET_P99 = 3.0  # seconds, DESIGN.md "Performance targets"
MX_MAPS = '["domains", "recipients", "virtual", "transport"]'

PUBLISHER = """\
[publisher]
database = "sqlite:///{d}/central.db"
repository = "{d}/repo"
signing_key = "{d}/keys/signing.key"
[publisher.channels.mx]
maps = {maps}
push = [{push}]
"""

AGENT = """\
[agent]
state = "{n}/state"
trusted_keys = ["{d}/keys/signing.pub"]
jitter = "0s"
[agent.channels.mx]
source = "{d}/repo/mx"
target = "{n}/postfix"
inbox = "{n}/inbox/mx"
maps = {maps}
"""

Record = dict[str, Any]


def note(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    sys.stderr.write(f"fanout: {msg}\n")
    sys.stderr.flush()


def mapsync(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mapsync", "--config", str(config), "--log-format", "json", *args]


def run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")


def log_records(path: Path) -> list[Record]:
    """The JSON log lines of a mapsync process (anything else as a 'raw' record)."""
    records = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rec = {"event": line, "level": "raw"}
        records.append(rec if isinstance(rec, dict) else {"event": line, "level": "raw"})
    return records


def stamp(rec: Record) -> float:
    """A log record's time (structlog ISO, UTC) as a Unix timestamp."""
    return datetime.fromisoformat(str(rec["timestamp"])).timestamp()


def problems(records: list[Record]) -> list[Record]:
    return [r for r in records if r.get("level") in ("warning", "error", "critical", "raw")]


def nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (never interpolated below an observed value)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS (KiB) of a live process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of a live process (its waited-for children included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Node:
    index: int
    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox" / "mx"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    def live_serial(self) -> int | None:
        """The serial of the live set, from the name the ``current`` link points to."""
        try:
            name = os.readlink(self.root / "postfix" / ".mapsync" / "current")
        except OSError:
            return None
        head = name.split(".", 1)[0]
        return int(head) if head.isdigit() else None


@dataclass
class Round:
    number: int
    serial: int
    publish_secs: float = 0.0
    publish_exit: int = 0
    publish_cpu: float = 0.0
    agents_cpu: float = 0.0
    wall: float = 0.0
    latencies: dict[int, float] = field(default_factory=dict)  # node → commit → live, s
    pushed: dict[int, float] = field(default_factory=dict)  # node → commit → LATEST pushed, s
    agent_phase: dict[int, float] = field(default_factory=dict)  # node → LATEST pushed → live
    rendered: float | None = None  # commit → release written (before the push), s
    problems: list[str] = field(default_factory=list)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=50, help="agents (default 50)")
    ap.add_argument("--accounts", type=int, default=20_000, help="seeded accounts (20,000)")
    ap.add_argument("--rounds", type=int, default=5, help="commit → publish → live rounds (5)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per round, seconds (60)")
    ap.add_argument("--poll", type=float, default=0.01, help="live-set poll period (0.01 s)")
    ap.add_argument("--pause", type=float, default=2.0, help="quiet time between rounds (2 s)")
    ap.add_argument("--dir", type=Path, help="work directory (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if args.nodes < 1 or args.rounds < 1 or args.accounts < 1:
        ap.error("--nodes, --rounds and --accounts must be at least 1")

    if args.dir is not None:
        if args.dir.exists() and any(args.dir.iterdir()):
            ap.error(f"--dir {args.dir}: not empty")
        args.dir.mkdir(parents=True, exist_ok=True)
        d = args.dir.resolve()
    else:
        d = Path(tempfile.mkdtemp(prefix="mapsync-fanout-"))
    nodes = [Node(i, d / "nodes" / f"node-{i:03d}") for i in range(1, args.nodes + 1)]
    try:
        setup(d, nodes, args.accounts)
        start_agents(nodes)
        rounds = [measure_round(d, nodes, r, args) for r in range(1, args.rounds + 1)]
        memory = {n.index: proc_status(n.proc.pid) for n in nodes if n.proc is not None}
        exits = stop_agents(nodes)
        report(args, rounds, memory, exits, nodes)
    finally:
        for n in nodes:  # only if something above failed: the agents we started, by pid
            if n.proc is not None and n.proc.poll() is None:
                n.proc.kill()
                n.proc.wait(10)
        if args.keep:
            note(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


# -- setup --------------------------------------------------------------------------------------


def setup(d: Path, nodes: list[Node], accounts: int) -> None:
    pub = d / "publisher.toml"
    push = ", ".join(f'"{n.inbox}"' for n in nodes)
    pub.write_text(PUBLISHER.format(d=d, maps=MX_MAPS, push=push))
    for n in nodes:
        (n.root / "inbox").mkdir(parents=True)  # the inbox's parent must exist (the push)
        n.config.write_text(AGENT.format(d=d, n=n.root, maps=MX_MAPS))
    run(mapsync(pub, "keygen", str(d / "keys" / "signing.key")))
    note(f"seeding {accounts:,} accounts")
    run(
        mapsync(
            pub,
            "seed",
            "--accounts",
            str(accounts),
            "--domains",
            str(max(10, accounts // 100)),
            "--aliases",
            str(accounts // 2),
            "--mailstores",
            "20",
        )
    )
    note(f"publishing serial 1 (and pushing it to {len(nodes)} inboxes)")
    run(mapsync(pub, "publish"))
    note(f"installing serial 1 on {len(nodes)} nodes (mapsync pull)")
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(lambda n: run(mapsync(n.config, "pull")), nodes))
    missing = [n.index for n in nodes if n.live_serial() != 1]
    if missing:
        raise SystemExit(f"serial 1 not live on nodes {missing}")


def start_agents(nodes: list[Node], timeout: float = 300.0) -> None:
    note(f"starting {len(nodes)} agents (agent --watch --interval 3600)")
    started = time.monotonic()
    for n in nodes:
        with open(n.log, "wb") as log:
            n.proc = subprocess.Popen(
                mapsync(n.config, "agent", "--watch", "--interval", "3600"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
    waiting = set(range(len(nodes)))
    while waiting:
        for i in list(waiting):
            n = nodes[i]
            assert n.proc is not None
            if n.proc.poll() is not None:
                raise SystemExit(
                    f"agent of node {n.index} exited {n.proc.returncode}:\n{n.log.read_text()}"
                )
            if any(r.get("event") == "agent started" for r in log_records(n.log)):
                waiting.discard(i)
        if time.monotonic() - started > timeout:
            raise SystemExit(f"{len(waiting)} agents not started after {timeout:.0f} s")
        time.sleep(0.2)
    time.sleep(2.0)  # let the startup pulls' stragglers (rsync children, logging) finish
    note(f"all {len(nodes)} agents started in {time.monotonic() - started:.1f} s")


def stop_agents(nodes: list[Node]) -> dict[int, int]:
    for n in nodes:
        if n.proc is not None and n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    exits = {}
    for n in nodes:
        if n.proc is not None:
            try:
                exits[n.index] = n.proc.wait(30)
            except subprocess.TimeoutExpired:
                exits[n.index] = -1  # killed in main()'s finally
    return exits


# -- one round ----------------------------------------------------------------------------------


def commit_account(d: Path, tag: str) -> float:
    """Insert one account into a hosted domain; the wall time the commit returned."""
    from sqlalchemy import create_engine, insert, select

    from mapsync.sources import schema as t

    engine = create_engine(f"sqlite:///{d}/central.db")
    try:
        with engine.connect() as conn:
            dom = conn.execute(
                select(t.domain.c.id, t.domain.c.customer_id)
                .where(t.domain.c.kind == "hosted")
                .order_by(t.domain.c.id)
                .limit(1)
            ).one()
        with engine.begin() as conn:
            conn.execute(
                insert(t.account).values(
                    domain_id=dom.id,
                    customer_id=dom.customer_id,
                    local_part=tag,
                    status="active",
                )
            )
        return time.time()
    finally:
        engine.dispose()


def measure_round(d: Path, nodes: list[Node], number: int, args: argparse.Namespace) -> Round:
    serial = number + 1
    rnd = Round(number, serial)
    cpu_before = {n.index: cpu_seconds(n.proc.pid) for n in nodes if n.proc is not None}
    publish_log = d / f"publish-{serial}.log"

    t0_wall = commit_account(d, f"fanout-{number}-{time.time_ns()}")
    t0 = time.monotonic()  # commit → live: monotonic from here (the commit returned just now)
    with open(publish_log, "wb") as err, open(d / f"publish-{serial}.out", "wb") as out:
        proc = subprocess.Popen(
            mapsync(d / "publisher.toml", "publish"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    publish_done = False
    pending = {n.index: n for n in nodes}
    while pending or not publish_done:
        now = time.monotonic()
        for i, n in list(pending.items()):
            live = n.live_serial()
            if live is not None and live >= serial:
                rnd.latencies[i] = now - t0
                del pending[i]
        if not publish_done:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                publish_done = True
                proc.returncode = rnd.publish_exit = os.waitstatus_to_exitcode(status)
                rnd.publish_secs = time.monotonic() - t0
                rnd.publish_cpu = usage.ru_utime + usage.ru_stime
        if now - t0 > args.timeout:
            if not publish_done:
                proc.kill()
                proc.wait()
            rnd.problems.append(
                f"timeout after {args.timeout:.0f} s: {len(pending)} node(s) not live "
                f"({sorted(pending)[:10]})"
            )
            break
        time.sleep(args.poll)
    rnd.wall = time.monotonic() - t0
    # A node's set is live a moment before its agent logs it (and prunes its inbox): let the
    # round settle before reading the logs and the CPU counters.
    time.sleep(args.pause)

    # Where the time went, from the logs: the publisher's "published release" and its
    # "pushed release" per destination (logged once LATEST is in that inbox), and each
    # agent's "pushed release installed".
    inbox_of = {str(n.inbox): n.index for n in nodes}
    pub_records = log_records(publish_log)
    for rec in pub_records:
        if rec.get("event") == "published release" and rec.get("serial") == serial:
            rnd.rendered = stamp(rec) - t0_wall
        if rec.get("event") == "pushed release" and rec.get("serial") == serial:
            node = inbox_of.get(str(rec.get("destination")))
            if node is not None:
                rnd.pushed[node] = stamp(rec) - t0_wall
    rnd.problems += [
        f"publish: {r.get('event')} {r.get('error', '')}" for r in problems(pub_records)
    ]
    if rnd.publish_exit != 0:
        rnd.problems.append(f"publish exit {rnd.publish_exit}: {publish_log}")
    for n in nodes:
        for rec in log_records(n.log):
            if (
                rec.get("event") == "pushed release installed"
                and rec.get("serial") == serial
                and n.index in rnd.pushed
            ):
                rnd.agent_phase[n.index] = stamp(rec) - t0_wall - rnd.pushed[n.index]
        if n.proc is not None and n.proc.poll() is not None:
            rnd.problems.append(f"agent of node {n.index} exited {n.proc.returncode}")
    missing = [i for i in rnd.latencies if i not in rnd.agent_phase]
    if missing:
        rnd.problems.append(f"not installed from the inbox (by the log): nodes {missing[:10]}")

    rnd.agents_cpu = sum(
        cpu_seconds(n.proc.pid) - cpu_before[n.index]
        for n in nodes
        if n.proc is not None and n.proc.poll() is None
    )
    lat = list(rnd.latencies.values())
    note(
        f"round {number}: serial {serial} live on {len(lat)}/{len(nodes)} nodes, "
        f"max {max(lat, default=math.nan):.2f} s"
    )
    return rnd


# -- the table ----------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    rounds: list[Round],
    memory: dict[int, dict[str, int]],
    exits: dict[int, int],
    nodes: list[Node],
) -> None:
    n = len(nodes)
    cores = os.cpu_count() or 0
    head = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout.strip()
    print(
        f"mapsync push + watch fan-out: {n} nodes, {args.accounts:,} accounts, "
        f"{len(rounds)} rounds, {cores} CPUs, mapsync {head or '?'}"
    )
    print(
        "  commit → live per node; p99 by nearest rank; 'pushed' = commit → push logged "
        "LATEST in the inbox; 'agent' = that → installed (logs)"
    )
    cols = (
        f"  {'round':<5}  {'publish+push':>12}  {'live':>7}  {'p50':>6}  {'p99':>6}  "
        f"{'max':>6}  {'rendered':>8}  {'pushed p50/max':>14}  {'agent p50/max':>13}  "
        f"{'CPU pub/agents':>14}"
    )
    print(cols)
    everything: list[float] = []
    for r in rounds:
        lat = list(r.latencies.values())
        everything += lat
        print(
            f"  {r.number:<5}  {r.publish_secs:>10.2f} s  {len(lat):>3}/{n:<3}  "
            f"{secs(lat, 0.5):>6}  {secs(lat, 0.99):>6}  {secs(lat, 1.0):>6}  "
            f"{fmt(r.rendered):>8}  {pair(list(r.pushed.values())):>14}  "
            f"{pair(list(r.agent_phase.values())):>13}  "
            f"{f'{r.publish_cpu:.1f} / {r.agents_cpu:.1f} s':>14}"
        )
    total = n * len(rounds)
    verdict = (
        "met"
        if len(everything) == total and nearest_rank(everything, 0.99) <= TARGET_P99
        else "NOT met"
    )
    print(
        f"  {'all':<5}  {statistics.mean(r.publish_secs for r in rounds):>6.2f} s mean  "
        f"{len(everything):>3}/{total:<3}  {secs(everything, 0.5):>6}  "
        f"{secs(everything, 0.99):>6}  {secs(everything, 1.0):>6}  "
        f"target p99 ≤ {TARGET_P99:.0f} s: {verdict}"
    )
    cpu = [(r.publish_cpu + r.agents_cpu) / r.wall for r in rounds if r.wall > 0]
    if cpu:
        print(
            f"  CPU busy during a round: {statistics.mean(cpu):.2f} of {cores} cores on average "
            f"(publish incl. its rsyncs: {statistics.mean(r.publish_cpu for r in rounds):.1f} s, "
            f"all agents incl. theirs: {statistics.mean(r.agents_cpu for r in rounds):.1f} s "
            f"= {statistics.mean(r.agents_cpu for r in rounds) / n:.2f} s per node)"
        )
    if memory:
        hwm = [m["VmHWM"] / 1024 for m in memory.values()]
        rss = [m["VmRSS"] / 1024 for m in memory.values()]
        print(
            f"  agent memory: peak RSS (VmHWM) of one agent {max(hwm):.0f} MB max, "
            f"{statistics.median(hwm):.0f} MB median; all {len(memory)} agents "
            f"{sum(rss):.0f} MB resident now (sum of peaks {sum(hwm):.0f} MB)"
        )
    odd = {i: c for i, c in exits.items() if c != 128 + signal.SIGTERM}
    print(
        f"  SIGTERM: {len(exits) - len(odd)}/{len(exits)} agents exited 143"
        + (f"; others: {odd}" if odd else "")
    )
    for r in rounds:
        for p in r.problems[:5]:
            print(f"  round {r.number}: {p}")
    agent_problems = [(nd.index, p) for nd in nodes for p in problems(log_records(nd.log))]
    for idx, rec in agent_problems[:5]:
        print(f"  node {idx}: {rec.get('level')}: {rec.get('event')} {rec.get('error', '')}")
    if len(agent_problems) > 5:
        print(f"  ... {len(agent_problems) - 5} more warnings/errors in the agents' logs")


def secs(values: list[float], q: float) -> str:
    return f"{nearest_rank(values, q):.2f}" if values else "-"


def fmt(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def pair(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}/{max(values):.2f}"


if __name__ == "__main__":
    main()

"""Benchmarks: mapsync against the reference tools, as ratios measured in the same run.

    python benchmarks/run.py --accounts 1000000      # the reference dataset (takes minutes)
    python benchmarks/run.py --accounts 100000       # quicker

Builds (and caches under --dir) a seeded SQLite database, then measures each step as a
subprocess — the way cron runs it, process start included — and prints a table:
full publish vs `postmap cdb:` building the same maps from the same text; nothing-changed
publish and pull; a one-account change: rsync bytes on the wire and agent apply time; agent
peak RSS. Not part of the test suite (too heavy for CI).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    (d / "rsyncd.conf").write_text(
        f"use chroot = no\n[mapsync]\n    path = {d}/repo\n    read only = yes\n"
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
    args = ap.parse_args()
    n = args.accounts
    d = args.dir / str(n)
    ms = [sys.executable, "-m", "mapsync", "-q", "--config", str(d / "mapsync.toml")]
    rows: list[tuple[str, str, str]] = []
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
    # A cached database made by an older mapsync gets this version's schema (the deletion
    # log the fingerprint reads): what `init-db` does on an upgrade.
    subprocess.run(
        [*ms, "init-db", "--database", f"sqlite:///{d}/central.db"], check=True, capture_output=True
    )
    for p in ("repo", "state", "postfix"):
        shutil.rmtree(d / p, ignore_errors=True)

    daemon = rsync_daemon(d)
    try:
        rows += measure(d, ms)
    finally:
        daemon.terminate()
        daemon.wait()
    width = max(len(r[0]) for r in rows)
    print(f"mapsync benchmarks, {n:,} accounts")
    for what, value, note in rows:
        print(f"  {what:<{width}}  {value:<22}  {note}")


def add_account(d: Path) -> str:
    """Commit one new account in a separate process (as a panel would); its address."""
    local = f"bench.{time.time_ns()}"
    script = (
        "from sqlalchemy import create_engine, insert, select\n"
        "from mapsync.sources import schema as t\n"
        f"e = create_engine('sqlite:///{d}/central.db')\n"
        "with e.begin() as c:\n"
        f"    c.execute(insert(t.account).values(domain_id=1, local_part={local!r}, status='active'))\n"
        "    print(c.execute(select(t.domain.c.name).where(t.domain.c.id == 1)).scalar_one())\n"
    )
    domain = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout.strip()
    return f"{local}@{domain}"


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


if __name__ == "__main__":
    main()

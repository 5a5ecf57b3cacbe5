"""The long fault run of docs/reliability.md: faults injected into a publisher and an MX node
while a reader loops real ``postmap -q`` on the live maps.

    python benchmarks/faults.py --iterations 200            # the documented run
    python benchmarks/faults.py --iterations 30 --seed 1    # a quick check of the harness

Every iteration changes the central database (so there is always a release to make and to
install), injects one fault kind chosen at random, runs the commands an operator's timers
would run, and judges the outcome. Then it settles: a clean publish, pull and verify, which
must leave the node on the repository's LATEST with every file matching its manifest
(otherwise: data lost). Meanwhile a reader thread runs ``postmap -q`` against the live cdb
maps for keys that never change; every lookup must answer. Faults that damage the live set
itself (a deleted or corrupted cdb, `current` replaced by a directory, the target removed)
break lookups by their very nature, so the reader pauses
for them and the outcome is whether mapsync repairs the damage on its own.

Prints per fault kind: iterations, outcomes (ok / broken with the first reason), lookups made
and failed, data lost; ``--json FILE`` writes the same as JSON. Exit 0 when every kind was ok,
no lookup failed and no data was lost, else 1. Not part of the test suite (it runs minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MAPS = ["domains", "recipients", "virtual", "transport"]
# Keys the run never changes, looked up in every map the reader reads.
PROBES = {
    "recipients": ("postmaster@example-1.org", "OK"),
    "domains": ("example-1.org", "OK"),
}

CONFIG = """\
[publisher]
database = "sqlite:///{d}/central.db"
repository = "{d}/repo"
signing_key = "{d}/keys/signing.key"
lock_wait = "5s"
{publisher_extra}
[publisher.guards]
max_growth = "1000%"
max_shrink = "50%"
[publisher.channels.mx]
maps = {maps}
push = ["{d}/inbox/mx"]

[agent]
state = "{d}/state"
trusted_keys = ["{d}/keys/signing.pub"]

[agent.channels.mx]
source = "{d}/repo/mx"
target = "{d}/postfix"
inbox = "{d}/inbox/mx"
timeout = "30s"
"""


@dataclass
class Run:
    """One CLI run: exit code, output, whether it was killed."""

    argv: list[str]
    code: int
    out: str
    err: str
    killed: bool = False

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.err


@dataclass
class KindResult:
    iterations: int = 0
    ok: int = 0
    broken: int = 0
    lookups: int = 0
    lookups_failed: int = 0
    data_lost: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


class Reader(threading.Thread):
    """Loops ``postmap -q KEY cdb:TARGET/MAP`` over the probe keys, as Postfix would read."""

    def __init__(self, target: Path, pause: float) -> None:
        super().__init__(name="reader", daemon=True)
        self.target = target
        self.between = pause  # seconds between lookups: leave the CPU to mapsync
        self.kind = "setup"
        self.lookups: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.failures: list[str] = []
        self.active = threading.Event()
        self.idle = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.active.is_set():
                self.idle.set()
                self.active.wait(0.1)
                continue
            self.idle.clear()
            time.sleep(self.between)
            for name, (key, want) in PROBES.items():
                kind = self.kind
                proc = subprocess.run(
                    ["postmap", "-q", key, f"cdb:{self.target / name}"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                self.lookups[kind] += 1
                if proc.returncode != 0 or proc.stdout.strip() != want:
                    self.failed[kind] += 1
                    if len(self.failures) < 20:
                        self.failures.append(
                            f"[{kind}] postmap -q {key} {name}: exit {proc.returncode} "
                            f"{(proc.stdout + proc.stderr).strip()[:200]}"
                        )
        self.idle.set()

    def pause(self) -> None:
        self.active.clear()
        self.idle.wait(30)

    def resume(self) -> None:
        self.active.set()


class Harness:
    def __init__(self, d: Path, rng: random.Random) -> None:
        self.d = d
        self.rng = rng
        self.config = d / "mapsync.toml"
        self.target = d / "postfix"
        self.state = d / "state" / "mx"
        self.repo = d / "repo" / "mx"
        self.inbox = d / "inbox" / "mx"
        self.durations: dict[str, float] = {}
        self.added = 0

    # -- running mapsync ------------------------------------------------------------------

    def write_config(self, maps: list[str] = MAPS, publisher_extra: str = "") -> None:
        self.config.write_text(
            CONFIG.format(d=self.d, maps=json.dumps(maps), publisher_extra=publisher_extra)
        )

    def cli(
        self,
        *args: str,
        kill_after: float | None = None,
        file_limit: int | None = None,
    ) -> Run:
        argv = [sys.executable, "-m", "mapsync", "--config", str(self.config), *args]

        def limit() -> None:  # a full disk, as the child sees it: writes past N bytes fail
            if file_limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit if file_limit is not None else None,
        )
        killed = False
        if kill_after is not None:
            try:
                proc.wait(kill_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                killed = True
        out, err = proc.communicate(timeout=300)
        return Run(argv, proc.returncode, out, err, killed)

    def timed(self, *args: str) -> Run:
        started = time.monotonic()
        run = self.cli(*args)
        self.durations[args[0]] = time.monotonic() - started
        return run

    # -- the central database ---------------------------------------------------------------

    def change_database(self) -> None:
        """One account more (and now and then one fewer): every iteration has work to do."""
        from sqlalchemy import create_engine, delete, insert

        from mapsync.sources import schema as t

        self.added += 1
        engine = create_engine(f"sqlite:///{self.d / 'central.db'}")
        try:
            with engine.begin() as conn:
                conn.execute(
                    insert(t.account).values(
                        domain_id=2, local_part=f"fault{self.added}", status="active"
                    )
                )
                if self.added > 5 and self.rng.random() < 0.3:
                    conn.execute(
                        delete(t.account).where(
                            t.account.c.domain_id == 2,
                            t.account.c.local_part == f"fault{self.added - 5}",
                        )
                    )
        finally:
            engine.dispose()

    # -- settling and judging --------------------------------------------------------------

    def latest_serial(self) -> int | None:
        try:
            return int(json.loads((self.repo / "LATEST").read_text())["serial"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def installed_serial(self) -> int | None:
        """The live manifest's serial (a repaired set's directory may be named ``N.PID``)."""
        try:
            live = self.target / ".mapsync" / "current" / "MANIFEST.json"
            return int(json.loads(live.read_text())["serial"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def settle(self) -> tuple[list[str], bool]:
        """A clean publish, pull and verify. Returns (problems, data lost)."""
        problems = []
        runs = [self.cli("publish"), self.cli("pull"), self.cli("verify"), self.cli("status")]
        for r in runs:
            if r.traceback:
                problems.append(f"{r.argv[5]}: traceback")
        publish, pull, verify, status = runs
        if publish.code not in (0,):
            problems.append(f"settle publish exit {publish.code}: {_last(publish.err)}")
        if pull.code != 0:
            problems.append(f"settle pull exit {pull.code}: {_last(pull.err)}")
        # Data lost: the installed set no longer matches its signed manifest, or the
        # release LATEST names is gone. A node merely behind is a problem, not a loss.
        latest = self.latest_serial()
        lost = verify.code == 5 or (
            latest is not None and not (self.repo / "releases" / str(latest)).is_dir()
        )
        if verify.code != 0:
            problems.append(f"settle verify exit {verify.code}: {_last(verify.err)}")
        if latest is None or self.installed_serial() != latest:
            problems.append(f"node on serial {self.installed_serial()}, LATEST {latest}")
        if status.code != 0:
            problems.append(f"status exit {status.code}: {_last(status.out)}")
        return problems, lost

    def restore_by_hand(self) -> None:
        """What an operator would do when mapsync did not recover: a fresh node."""
        for p in (self.target, self.state):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists() or p.is_symlink():
                p.unlink()
        self.write_config()
        (self.repo / "LATEST").unlink(missing_ok=True)
        self.cli("publish", "--force")
        self.cli("pull")


def _last(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _clean(*runs: Run) -> str | None:
    """None if every run ended cleanly (no traceback; exit code one of the documented)."""
    for r in runs:
        if r.traceback:
            return f"{' '.join(r.argv[5:])}: traceback: {_last(r.err)}"
        if not r.killed and r.code not in (0, 1, 2, 3, 4, 5):
            return f"{' '.join(r.argv[5:])}: exit {r.code}"
    return None


# -- the fault kinds ----------------------------------------------------------------------------
# Each injects one fault, runs what the timers would run, and returns None (handled) or why not.
# ``live`` kinds damage the live set itself: the reader pauses until the node is repaired.


def kill_at_random(h: Harness, *args: str) -> str | None:
    took = h.durations.get(args[0], 1.0)
    r = h.cli(*args, kill_after=h.rng.uniform(0.0, took * 1.2))
    return _clean(r)


def f_kill_publish(h: Harness) -> str | None:
    return kill_at_random(h, "publish")


def f_kill_push(h: Harness) -> str | None:
    # The push follows the publish in one run: a kill late in the run lands in the push.
    took = h.durations.get("publish", 1.0)
    r = h.cli("publish", kill_after=h.rng.uniform(took * 0.5, took * 1.3))
    return _clean(r)


def f_kill_pull(h: Harness) -> str | None:
    h.cli("publish")
    return kill_at_random(h, "pull")


def f_kill_install(h: Harness) -> str | None:
    # A pull with a new release: the second half of its run is verifying and installing.
    h.cli("publish")
    took = h.durations.get("pull", 1.0)
    r = h.cli("pull", kill_after=h.rng.uniform(took * 0.4, took * 1.1))
    return _clean(r)


def f_state_damaged(h: Harness) -> str | None:
    path = h.state / "state.json"
    if path.exists():
        data = path.read_bytes()
        path.write_bytes(h.rng.choice([b"", b"[]", data[: len(data) // 2], b"\0\0\0"]))
    runs = [h.cli("pull"), h.cli("status")]
    bad = _clean(*runs)
    if bad:
        return bad
    if h.cli("pull").code != 0:
        return "a second pull after a damaged state.json still fails"
    return None


def f_stray_temp_files(h: Harness) -> str | None:
    pid = 999_999
    for p in (
        h.target / f".recipients.{pid}.tmp",
        h.state / f".state.json.{pid}.tmp",
        h.repo.parent / ".private" / "mx" / f".checked.json.{pid}.tmp",
        h.repo / "releases" / "stray-file",
    ):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"left by a kill\n")
    runs = [h.cli("publish"), h.cli("pull"), h.cli("status")]
    bad = _clean(*runs)
    if bad:
        return bad
    failed = [r for r in runs[:2] if r.code != 0]
    if failed:
        return f"{failed[0].argv[5]} exit {failed[0].code}: {_last(failed[0].err)}"
    return None


def _live_cdb(h: Harness) -> Path:
    return (h.target / f"{h.rng.choice(list(PROBES))}.cdb").resolve()


def f_live_cdb_deleted(h: Harness) -> str | None:
    _live_cdb(h).unlink(missing_ok=True)
    return _repaired(h)


def f_live_cdb_corrupted(h: Harness) -> str | None:
    path = _live_cdb(h)
    data = bytearray(path.read_bytes())
    for _ in range(16):
        i = h.rng.randrange(len(data))
        data[i] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    return _repaired(h)


def _repaired(h: Harness) -> str | None:
    """The next pull (nothing new published) must notice and rebuild the live set."""
    pull = h.cli("pull")
    bad = _clean(pull)
    if bad:
        return bad
    for name, (key, want) in PROBES.items():
        q = subprocess.run(
            ["postmap", "-q", key, f"cdb:{h.target / name}"], capture_output=True, text=True
        )
        if q.returncode != 0 or q.stdout.strip() != want:
            return f"not repaired by the next pull: postmap -q on {name} exit {q.returncode}"
    if h.cli("verify").code != 0:
        return "not repaired by the next pull: verify fails"
    return None


def f_current_is_directory(h: Harness) -> str | None:
    # Config management "restoring" the target: the ``current`` link becomes a directory.
    current = h.target / ".mapsync" / "current"
    current.unlink(missing_ok=True)
    current.mkdir(exist_ok=True)
    return _repaired(h)


def f_live_manifest_garbage(h: Harness) -> str | None:
    manifest = (h.target / ".mapsync" / "current" / "MANIFEST.json").resolve()
    manifest.write_bytes(h.rng.choice([b"", b"{", b"garbage\n", b'{"serial": "x"}']))
    return _repaired(h)


def f_target_removed(h: Harness) -> str | None:
    # ``rm -rf target`` (config management recreating it): the next pull restores the set
    # from the copy kept in STATE, never a lower serial than the node had.
    serial = h.installed_serial()
    shutil.rmtree(h.target)
    h.target.mkdir()
    bad = _repaired(h)
    if bad:
        return bad
    after = h.installed_serial()
    if serial is not None and (after is None or after < serial):
        return f"serial went down from {serial} to {after} after the target was removed"
    return None


def f_foreign_file_in_target(h: Harness) -> str | None:
    link = h.target / "transport"
    link.unlink(missing_ok=True)
    link.write_text("example.net smtp:[hand.example.net]\n")  # the operator's own file
    h.cli("publish")
    pull = h.cli("pull")
    bad = _clean(pull)
    kept = link.is_file() and not link.is_symlink() and "hand.example.net" in link.read_text()
    link.unlink(missing_ok=True)
    os.symlink(f"{'.mapsync'}/current/transport", link)  # give mapsync its link back
    if bad:
        return bad
    if not kept:
        return "the operator's file in target was replaced"
    return None


def f_garbage_latest(h: Harness) -> str | None:
    latest = h.repo / "LATEST"
    saved = latest.read_bytes()
    latest.write_bytes(h.rng.choice([b"", b"{", b"garbage\n", b'{"serial": "x"}']))
    pull, publish, pull2 = h.cli("pull"), h.cli("publish"), h.cli("pull")
    bad = _clean(pull, publish, pull2)
    if h.latest_serial() is None:  # not repaired: put it back for the next iteration
        latest.write_bytes(saved)
        if bad:
            return bad
        if publish.code in (2, 5) and str(latest) in publish.err:
            return None  # refused with a clear error naming the file: fine
        return (
            f"garbage LATEST neither repaired nor refused naming it: publish exit "
            f"{publish.code}: {_last(publish.err)}"
        )
    return bad


def f_lock_is_directory(h: Harness) -> str | None:
    lock = h.state / "lock"
    lock.unlink(missing_ok=True)
    lock.mkdir(parents=True, exist_ok=True)
    h.cli("publish")
    runs = [h.cli("pull"), h.cli("status")]
    bad = _clean(*runs)
    if lock.is_dir():
        shutil.rmtree(lock)
        if not bad and runs[0].code == 0:
            return None  # pulled anyway, the directory untouched: fine
        if not bad and runs[0].code == 2 and str(lock) in runs[0].err:
            return None  # refused, naming the path: fine
        return bad or f"pull exit {runs[0].code} without naming {lock}: {_last(runs[0].err)}"
    return bad


def f_disk_full(h: Harness) -> str | None:
    # RLIMIT_FSIZE: every write past 16 KiB fails (EFBIG), as on a full disk.
    h.change_database()
    publish = h.cli("publish", file_limit=16 << 10)
    pull = h.cli("pull", file_limit=16 << 10)
    return _clean(publish, pull)


def f_map_dropped(h: Harness) -> str | None:
    h.write_config(maps=[m for m in MAPS if m != "recipients"])
    try:
        publish = h.cli("publish")
        pull = h.cli("pull")
        bad = _clean(publish, pull)
        if bad:
            return bad
        if not (h.target / "recipients.cdb").exists():
            return f"the dropped map was deleted on the node (publish exit {publish.code})"
        return None
    finally:
        h.write_config()


FAULTS: dict[str, tuple[Callable[[Harness], str | None], bool]] = {
    # kind: (inject and run, damages the live set)
    "kill_publish": (f_kill_publish, False),
    "kill_push": (f_kill_push, False),
    "kill_pull": (f_kill_pull, False),
    "kill_install": (f_kill_install, False),
    "state_damaged": (f_state_damaged, False),
    "stray_temp_files": (f_stray_temp_files, False),
    "live_cdb_deleted": (f_live_cdb_deleted, True),
    "live_cdb_corrupted": (f_live_cdb_corrupted, True),
    "current_is_directory": (f_current_is_directory, True),
    "live_manifest_garbage": (f_live_manifest_garbage, False),
    "target_removed": (f_target_removed, True),
    "foreign_file_in_target": (f_foreign_file_in_target, False),
    "garbage_latest": (f_garbage_latest, False),
    "lock_is_directory": (f_lock_is_directory, False),
    "disk_full": (f_disk_full, False),
    "map_dropped": (f_map_dropped, False),
}


def setup(d: Path, accounts: int) -> Harness:
    h = Harness(d, random.Random())
    h.write_config()
    for args in (
        ("keygen", str(d / "keys" / "signing.key")),
        ("init-db",),
        ("seed", "--accounts", str(accounts), "--domains", "10", "--aliases", str(accounts // 5)),
    ):
        r = h.cli(*args)
        if r.code != 0:
            sys.exit(f"setup: mapsync {' '.join(args)} failed ({r.code}):\n{r.err}")
    (d / "inbox").mkdir()
    for args in (("publish",), ("pull",)):
        r = h.timed(*args)
        if r.code != 0:
            sys.exit(f"setup: mapsync {args[0]} failed ({r.code}):\n{r.err}")
    h.change_database()
    h.timed("publish")
    h.timed("pull")
    return h


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--accounts", type=int, default=500, help="seeded accounts (default 500)")
    p.add_argument(
        "--reader-pause",
        type=float,
        default=0.01,
        help="seconds the reader waits between rounds of lookups (default 0.01)",
    )
    p.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    p.add_argument("--kinds", help="comma-separated fault kinds (default: all)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    kinds = args.kinds.split(",") if args.kinds else list(FAULTS)
    unknown = [k for k in kinds if k not in FAULTS]
    if unknown:
        p.error(f"unknown fault kind(s) {', '.join(unknown)} (known: {', '.join(FAULTS)})")
    if shutil.which("postmap") is None:
        p.error("postmap (Postfix) is needed: the reader uses it")

    d = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mapsync-faults-"))
    d.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    h = setup(d, args.accounts)
    h.rng = random.Random(seed)
    reader = Reader(h.target, args.reader_pause)
    reader.start()
    reader.resume()
    results = {k: KindResult() for k in kinds}
    try:
        for i in range(args.iterations):
            kind = h.rng.choice(kinds)
            inject, live = FAULTS[kind]
            res = results[kind]
            res.iterations += 1
            h.change_database()
            reader.kind = kind
            if live:
                reader.pause()
            try:
                why = inject(h)
            except Exception as exc:  # the harness must report, not stop: a fault's own crash
                why = f"harness: {type(exc).__name__}: {exc}"
            problems, lost = h.settle()
            if (live and why) or problems:
                # Leave the next iteration a working node (the reader does not watch the
                # harness rebuild it); this iteration counts as broken.
                reader.pause()
                h.restore_by_hand()
                problems2, _ = h.settle()
                problems += [f"after restoring by hand: {x}" for x in problems2]
            reader.resume()
            if lost:
                res.data_lost += 1
            if why or problems:
                res.broken += 1
                res.reasons[why or problems[0]] += 1
            else:
                res.ok += 1
            print(
                f"{i + 1:>4}/{args.iterations} {kind:<24} "
                + ("ok" if not (why or problems) else f"BROKEN: {why or problems[0]}"),
                flush=True,
            )
    finally:
        reader.stop.set()
        reader.resume()
        reader.join(30)
    took = time.monotonic() - started

    for k, res in results.items():
        res.lookups = reader.lookups[k]
        res.lookups_failed = reader.failed[k]
    total_lookups = sum(reader.lookups.values())
    total_failed = sum(reader.failed.values())
    lost_total = sum(r.data_lost for r in results.values())
    print()
    print(f"fault run: {args.iterations} iterations, seed {seed}, {took:.0f}s, in {d}")
    print(f"{'kind':<24}{'runs':>6}{'ok':>6}{'broken':>8}{'lookups':>9}{'failed':>8}{'lost':>6}")
    for k, res in results.items():
        print(
            f"{k:<24}{res.iterations:>6}{res.ok:>6}{res.broken:>8}{res.lookups:>9}"
            f"{res.lookups_failed:>8}{res.data_lost:>6}"
        )
    print(
        f"{'total':<24}{args.iterations:>6}{'':>14}{total_lookups:>9}{total_failed:>8}{lost_total:>6}"
    )
    for k, res in results.items():
        for reason, n in res.reasons.most_common(3):
            print(f"  {k}: {n}x {reason}")
    for line in reader.failures:
        print(f"  lookup failed: {line}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "iterations": args.iterations,
                    "seed": seed,
                    "seconds": round(took),
                    "lookups": total_lookups,
                    "lookups_failed": total_failed,
                    "data_lost": lost_total,
                    "kinds": {
                        k: {
                            **{n: v for n, v in vars(r).items() if n != "reasons"},
                            "reasons": dict(r.reasons),
                        }
                        for k, r in results.items()
                    },
                    "failed_lookups": reader.failures,
                },
                indent=2,
            )
            + "\n"
        )
    if not args.dir:
        shutil.rmtree(d, ignore_errors=True)
    broken = sum(r.broken for r in results.values())
    return 0 if broken == 0 and total_failed == 0 and lost_total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

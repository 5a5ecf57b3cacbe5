"""``mapsync publish --interval``: the long-running publisher, as systemd runs it.

A real subprocess against a real SQLite database: a change in the database becomes a new
serial within seconds and reaches the push inbox; errors (database gone, a guard refusing)
are logged and the loop goes on; SIGTERM/SIGHUP end it promptly, between runs or in the
middle of one, and never leave a half-written release or a staging directory behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import pytest
import structlog

from mapsync import log
from mapsync.cli import commands
from mapsync.cli.main import build_parser
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account, add_accounts
from tests.helpers.publisher import assert_complete, push_to, record, serial_of
from tests.helpers.transport import SilentListener


class Loop:
    """``mapsync publish --interval N`` running in the background; output to files."""

    def __init__(
        self, cluster: Cluster, *args: str, log_format: str = "console", verbose: bool = False
    ) -> None:
        self.out = cluster.root / "loop.out"
        self.err = cluster.root / "loop.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            argv = [sys.executable, "-m", "mapsync", "--config", str(cluster.config_path)]
            argv += ["-v"] if verbose else []
            self.proc = subprocess.Popen(
                [*argv, "--log-format", log_format, "publish", *args],
                stdout=out,
                stderr=err,
            )

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = 10) -> float:
        """Seconds until ``cond()`` holds; fail (with the loop's output) after ``timeout``."""
        started = time.monotonic()
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"the loop exited {self.proc.returncode}:\n{self.stderr()}")
            if time.monotonic() - started > timeout:
                pytest.fail(f"no {what} after {timeout}s:\n{self.stdout()}\n{self.stderr()}")
            time.sleep(0.02)
        return time.monotonic() - started

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """Send ``sig``; return the exit code and how long the loop took to exit."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=10)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def loops() -> Iterator[list[Loop]]:
    """Loops a test starts; killed afterwards if the test did not stop them."""
    started: list[Loop] = []
    yield started
    for loop in started:
        loop.kill()


def latest_serial(cluster: Cluster) -> int:
    path = cluster.repo / "mx" / "LATEST"
    return serial_of(path) if path.exists() else 0


def assert_repository_clean(cluster: Cluster) -> None:
    """No staging directory, no temp file; every release complete and LATEST names one."""
    channel = cluster.repo / "mx"
    leftovers = [p.name for p in channel.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # the publisher's notes live in REPO/.private
    for release in (channel / "releases").iterdir():
        assert_complete(cluster, int(release.name))
    assert (channel / "releases" / str(latest_serial(cluster))).is_dir()


def test_a_new_account_is_published_and_pushed_within_seconds_and_sigterm_ends_the_loop(
    cluster: Cluster, loops: list[Loop]
) -> None:
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.parent.mkdir(parents=True)
    push_to(cluster, str(inbox))
    loop = Loop(cluster, "--interval", "1")
    loops.append(loop)
    loop.wait_for("first release in the inbox", lambda: (inbox / "LATEST").exists())
    assert latest_serial(cluster) == 1

    add_account(cluster, "looped")
    took = loop.wait_for("serial 2 in the inbox", lambda: serial_of(inbox / "LATEST") == 2, 5)
    print(f"\n[loop] commit → serial 2 in the inbox: {took:.2f}s")
    assert latest_serial(cluster) == 2
    # The record follows the delivery (the inbox's LATEST is the delivery's last step).
    loop.wait_for("the record", lambda: record(cluster)[str(inbox)]["serial"] == 2, 2)

    time.sleep(1.5)  # a run or two with nothing to do: nothing is printed for them
    code, exit_took = loop.stop(signal.SIGTERM)
    assert code == 143, loop.stderr()
    assert exit_took < 3
    out = loop.stdout()
    assert "published serial 1" in out and "published serial 2" in out
    assert f"pushed serial 2 to {inbox}" in out
    assert "unchanged" not in out and "has serial" not in out
    assert "Traceback" not in loop.stderr()
    # The loop kept its first snapshot: serial 2 read and rendered only the new account.
    assert "published incrementally" in loop.stderr(), loop.stderr()
    assert latest_serial(cluster) == 2
    assert_repository_clean(cluster)


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_a_commit_to_a_sqlite_file_is_published_at_once_not_at_the_interval(
    cluster: Cluster, loops: list[Loop], journal: str
) -> None:
    """The loop watches the SQLite file: a commit (into the write-ahead log, or the file
    itself in rollback-journal mode) starts the next run before the interval is up; its own
    reads, which create and delete the log in WAL mode, do not."""
    db = cluster.db_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        assert conn.execute(f"PRAGMA journal_mode={journal}").fetchone() == (journal,)
    loop = Loop(cluster, "--interval", "60", log_format="json", verbose=True)
    loops.append(loop)
    loop.wait_for("serial 1", lambda: latest_serial(cluster) == 1, 30)

    def runs() -> int:
        return loop.stderr().count('"event": "publish run done"')

    loop.wait_for("the first run's end", lambda: runs() == 1)
    time.sleep(2)
    assert runs() == 1, loop.stderr()  # no run woken by its own reads
    assert "watching the database: a commit is published at once" in loop.stderr()

    add_account(cluster, "woken")
    took = loop.wait_for("serial 2", lambda: latest_serial(cluster) == 2, 10)
    print(f"\n[loop] {journal}: commit → serial 2 with --interval 60: {took:.2f}s")
    time.sleep(1)
    assert runs() <= 4, loop.stderr()  # the commit's run, a checkpoint's at most: then asleep
    code, _ = loop.stop(signal.SIGTERM)
    assert code == 143, loop.stderr()
    assert "Traceback" not in loop.stderr()


def test_a_dead_node_does_not_slow_the_loop_down(cluster: Cluster, loops: list[Loop]) -> None:
    """A node that accepts the connection and never answers costs the first run its
    push_timeout; the runs after it skip the node (backing off) and stay quick, so a change
    still reaches the live nodes within a second or two."""
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.parent.mkdir(parents=True)
    with SilentListener() as dead:
        remote = f"rsync://127.0.0.1:{dead.port}/inbox/mx"
        push_to(cluster, str(inbox), remote, publisher='push_timeout = "5s"')
        loop = Loop(cluster, "--interval", "1")
        loops.append(loop)
        loop.wait_for("the first release in the live inbox", lambda: (inbox / "LATEST").exists())
        loop.wait_for(
            "the dead node's failure on record",
            lambda: (
                (cluster.repo / ".private" / "mx" / "pushed.json").exists()
                and record(cluster).get(remote, {}).get("failures") == 1
            ),
            15,
        )
        time.sleep(2)  # runs that skip the dead node

        add_account(cluster, "despite-a-dead-node")
        took = loop.wait_for("serial 2 in the live inbox", lambda: serial_of(inbox / "LATEST") == 2)
        loop.wait_for("the run's report", lambda: f"push serial 2 to {remote}" in loop.stdout(), 2)
        connections = dead.connections
        code, _ = loop.stop(signal.SIGTERM)
    print(
        f"\n[loop] with a dead node (push_timeout 5s): commit → serial 2 in the inbox {took:.2f}s"
    )
    assert code == 143, loop.stderr()
    assert connections == 1  # tried once; the 30 s until the next try are not over
    assert took < 3
    assert f"push serial 2 to {remote} NOT TRIED (backing off) (next try at " in loop.stdout()


def test_errors_are_logged_and_the_loop_goes_on_until_sighup(
    cluster: Cluster, loops: list[Loop]
) -> None:
    db = Path(cluster.db_url.removeprefix("sqlite:///"))
    with open(cluster.config_path, "a") as fh:
        fh.write('\n[publisher.guards]\nmax_growth = "5%"\n')
    loop = Loop(cluster, "--interval", "1", log_format="json")
    loops.append(loop)
    loop.wait_for("first release", lambda: latest_serial(cluster) == 1)

    # The database goes away: each run logs the error, and the loop keeps running.
    hidden = db.with_name("central.db.away")
    db.rename(hidden)
    loop.wait_for("a database error", lambda: '"error": "SourceError"' in loop.stderr())
    db.unlink(missing_ok=True)  # SQLite may have created an empty file in its place
    hidden.rename(db)
    add_account(cluster, "after-the-outage")
    loop.wait_for("serial 2", lambda: latest_serial(cluster) == 2, 5)

    # A guard refuses: logged with the guard's message, nothing published, still running.
    # Recipients grows by more than 5 % in one commit (one by one, the loop, woken by each
    # commit, would publish the first few).
    add_accounts(cluster, [f"bulk-{i}" for i in range(20)])
    loop.wait_for("a guard refusal", lambda: "publish refused by guards" in loop.stderr())
    errors = [json.loads(line) for line in loop.stderr().splitlines() if '"level": "error"' in line]
    refusal = next(e for e in errors if "refused by guards" in e["event"])
    assert (
        refusal["exit"] == 4
        and "adds" in refusal["event"]
        and "max_growth = 5%" in refusal["event"]
    )
    assert loop.proc.poll() is None
    assert latest_serial(cluster) == 2

    code, took = loop.stop(signal.SIGHUP)
    assert code == 129 and took < 3, loop.stderr()
    assert_repository_clean(cluster)


def test_a_config_edit_takes_effect_at_the_next_run_and_a_broken_one_keeps_the_last(
    cluster: Cluster, loops: list[Loop]
) -> None:
    """The loop reads the config anew each run. An edit that does not load (a TOML syntax
    error, an unknown key) is logged naming file and line or key, and the loop publishes on
    with the config last read: a typo must not stop new addresses and renewals. Once the
    file loads again, its edit takes effect."""
    text = cluster.config_path.read_text()
    loop = Loop(cluster, "--interval", "1", log_format="json")
    loops.append(loop)
    loop.wait_for("first release", lambda: latest_serial(cluster) == 1)

    cluster.config_path.write_text(text.replace("[publisher]\n", "[publisher]\nkeep = \n", 1))
    loop.wait_for("the syntax error", lambda: "not valid TOML" in loop.stderr())
    add_account(cluster, "during-the-typo")
    loop.wait_for("serial 2", lambda: latest_serial(cluster) == 2, 5)
    errors = [json.loads(line) for line in loop.stderr().splitlines() if '"level": "error"' in line]
    assert any(
        "no longer loads" in e["event"]
        and f"{cluster.config_path}: not valid TOML" in e["error"]
        and "line 2" in e["error"]
        for e in errors
    ), errors

    cluster.config_path.write_text(text.replace("[publisher]\n", "[publisher]\nkep = 3\n", 1))
    loop.wait_for("the unknown key", lambda: "[publisher] kep: unknown key" in loop.stderr())
    add_account(cluster, "during-the-unknown-key")
    loop.wait_for("serial 3", lambda: latest_serial(cluster) == 3, 5)

    # Fixed, with a channel added: the next run publishes it.
    cluster.config_path.write_text(
        text.replace("[agent]", '[publisher.channels.edge]\nmaps = ["domains"]\n\n[agent]', 1)
    )
    loop.wait_for("the new channel", lambda: (cluster.repo / "edge" / "LATEST").exists(), 5)
    assert loop.proc.poll() is None
    assert "Traceback" not in loop.stderr()
    code, _ = loop.stop(signal.SIGTERM)
    assert code == 143
    assert_repository_clean(cluster)


def test_sighup_with_a_broken_config_logs_it_and_publishes_on_and_a_fixed_one_restarts(
    cluster: Cluster, loops: list[Loop]
) -> None:
    """`systemctl reload` (SIGHUP) after an edit that does not load must not end the loop:
    systemd would restart it into the broken file every 10 s and nothing would publish.
    Once the file loads, SIGHUP ends it with 129 as before (systemd starts it again)."""
    text = cluster.config_path.read_text()
    loop = Loop(cluster, "--interval", "1", log_format="json")
    loops.append(loop)
    loop.wait_for("first release", lambda: latest_serial(cluster) == 1)

    cluster.config_path.write_text(text.replace("[publisher]\n", "[publisher]\nkep = 3\n", 1))
    loop.proc.send_signal(signal.SIGHUP)
    loop.wait_for("the refused reload", lambda: "config not reloaded" in loop.stderr())
    errors = [json.loads(line) for line in loop.stderr().splitlines() if "not reloaded" in line]
    assert errors[0]["level"] == "error"
    assert errors[0]["event"] == (
        f"config not reloaded: {cluster.config_path}: [publisher] kep: unknown key "
        "(known: " + errors[0]["event"].split("(known: ", 1)[1]
    )
    assert errors[0]["event"].endswith("; running on with the config loaded before")
    add_account(cluster, "after-the-refused-reload")
    loop.wait_for("serial 2", lambda: latest_serial(cluster) == 2, 5)
    assert loop.proc.poll() is None

    cluster.config_path.write_text(text)
    code, took = loop.stop(signal.SIGHUP)
    assert code == 129 and took < 3, loop.stderr()
    assert "Traceback" not in loop.stderr()
    assert_repository_clean(cluster)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_in_the_middle_of_a_publish_leaves_no_half_written_release(
    tmp_path: Path, sqlite_url: str, loops: list[Loop], sig: int
) -> None:
    """SIGHUP too, the config loading (checked on a thread of its own, the run going on
    meanwhile), ends the run at once: the restart need not wait for a long run to end."""
    big = make_cluster(tmp_path / "big", sqlite_url, accounts=30000, domains=50, aliases=3000)
    staging = big.repo / "mx" / ".staging"
    loop = Loop(big, "--interval", "1")
    loops.append(loop)
    loop.wait_for("the first run's staging directory", staging.exists, 20)
    code, took = loop.stop(sig)
    assert code == 128 + sig and took < 3, loop.stderr()
    assert not staging.exists()
    # Killed before LATEST was written (no release), or just after (a complete one).
    if (big.repo / "mx" / "LATEST").exists():
        assert_repository_clean(big)
    else:
        assert not any((big.repo / "mx" / "releases").glob("*"))
    # The next run publishes normally.
    assert "published serial" in big.publish().stdout
    assert_repository_clean(big)


def test_a_fraction_of_a_second_is_an_interval_and_too_short_a_one_is_refused(
    cluster: Cluster, loops: list[Loop]
) -> None:
    for bad in ("0", "0.05", "-1", "nan"):
        p = cluster.cli("publish", "--interval", bad)
        assert p.returncode == 2, p.stderr
        assert "publish --interval: must be at least 0.1 (seconds)" in p.stderr, p.stderr
    for bad in ("inf", "1e300", "604801"):  # inf crashed time.sleep (OverflowError)
        p = cluster.cli("publish", "--interval", bad)
        assert p.returncode == 2, p.stderr
        assert "publish --interval: must be at most 604800 (seconds, a week)" in p.stderr
    assert not (cluster.repo / "mx" / "LATEST").exists()
    loop = Loop(cluster, "--interval", "0.2", log_format="json", verbose=True)
    loops.append(loop)
    loop.wait_for("serial 1", lambda: latest_serial(cluster) == 1)
    add_account(cluster, "quarter")
    loop.wait_for("serial 2", lambda: latest_serial(cluster) == 2, 5)

    def runs() -> list[datetime]:
        return [
            datetime.fromisoformat(json.loads(line)["timestamp"].replace("Z", "+00:00"))
            for line in loop.stderr().splitlines()
            if '"publish run done"' in line
        ]

    seen = len(runs())
    loop.wait_for("five more runs", lambda: len(runs()) >= seen + 5, 5)
    code, _ = loop.stop(signal.SIGTERM)
    assert code == 143, loop.stderr()
    done = runs()[seen:]
    gaps = [(b - a).total_seconds() for a, b in pairwise(done)]
    assert gaps and all(gap < 0.9 for gap in gaps), gaps  # every 0.2 s and the run, not 1 s


def test_the_loop_refuses_dry_run_and_force(cluster: Cluster) -> None:
    for flag in ("--dry-run", "--force"):
        p = cluster.cli("publish", "--interval", "5", flag)
        assert p.returncode == 2
        assert "not with --dry-run or --force" in p.stderr
    assert not (cluster.repo / "mx" / "LATEST").exists()


def test_an_unchanged_database_costs_little_per_run(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """What each quiet iteration of the loop costs, in-process (no interpreter start)."""
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.parent.mkdir(parents=True)
    push_to(cluster, str(inbox))
    args = build_parser().parse_args(["--config", str(cluster.config_path), "publish"])
    log.configure(logging.WARNING)  # as `-q`; the info lines would count against the run
    try:
        assert commands.publish_once(args, loop=True) == 0
        capsys.readouterr()
        times = []
        for _ in range(20):
            started = time.perf_counter()
            assert commands.publish_once(args, loop=True) == 0
            times.append(time.perf_counter() - started)
    finally:
        structlog.reset_defaults()
    assert capsys.readouterr().out == ""  # nothing to report, nothing printed
    median = statistics.median(times)
    with capsys.disabled():
        print(
            f"\n[loop] unchanged database, in-process: median {median * 1000:.1f} ms, "
            f"max {max(times) * 1000:.1f} ms per run"
        )
    assert median < 0.25, times
    assert os.listdir(inbox / "releases") == ["1"]

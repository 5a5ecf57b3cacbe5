"""``mapsync agent --watch``, the long-running agent, for real.

Every test starts the real CLI as a background process, the way systemd runs
mapsync-agent.service, against a real repository and node. Releases reach the node's inbox
the way the publisher's push delivers them: real rsync, ``releases/<serial>/`` first and
``LATEST`` last (rsync writes a temporary file and renames it). The outcome is read back
from the node: the live manifest's serial, ``postmap -q`` on the live cdb, state.json, and
``mapsync status``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mapsync.agent.loop import prune_inbox
from mapsync.agent.state import channel_lock
from mapsync.release import LATEST, MANIFEST, Latest, manifest_sha256
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account, clone, lookup, read_state, set_dirs
from tests.helpers.transport import SilentListener

Record = dict[str, Any]


class AgentProcess:
    """``mapsync agent`` in the background; its JSON log lines collected as they come."""

    def __init__(self, cluster: Cluster, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mapsync",
                "--config",
                str(cluster.config_path),
                "--log-format",
                "json",
                "-v",
                "agent",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": line.rstrip("\n"), "level": "raw"}
            with self._lock:
                self.records.append(record)

    def logged(self, event: str, **fields: object) -> list[Record]:
        with self._lock:
            return [
                r
                for r in self.records
                if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
            ]

    def problems(self) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.get("level") in ("warning", "error", "raw")]

    def wait_for(
        self, event: str, timeout: float = 10.0, count: int = 1, **fields: object
    ) -> Record:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.logged(event, **fields)
            if len(found) >= count:
                return found[count - 1]
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(
            f"no {event!r} {fields} (exit {self.proc.poll()}); log:\n"
            + "\n".join(json.dumps(r) for r in self.records)
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> tuple[int, float]:
        """Send ``sig``; (exit code, seconds until the process was gone)."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the agent still runs {timeout}s after signal {sig}; log:\n"
                + "\n".join(json.dumps(r) for r in self.records)
            ) from None
        took = time.monotonic() - started
        self._reader.join(5)
        return code, took

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def start_agent() -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(cluster: Cluster, *args: str, ready: bool = True) -> AgentProcess:
        agent = AgentProcess(cluster, *args)
        started.append(agent)
        if ready:  # the first round of pulls is done and the inboxes are watched
            agent.wait_for("agent started", timeout=20)
        return agent

    yield start
    for agent in started:
        agent.close()


# -- a node with an inbox -----------------------------------------------------------------------


def inbox(cluster: Cluster) -> Path:
    return cluster.root / "node" / "inbox" / "mx"


def configure(cluster: Cluster, *, with_inbox: bool = True) -> None:
    """The cluster's config with a push inbox for channel mx and no poll jitter."""
    cluster.write_config(extra_agent=f'inbox = "{inbox(cluster)}"' if with_inbox else "")
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(text.replace("[agent]\n", '[agent]\njitter = "0s"\n', 1))


def latest_bytes(cluster: Cluster, serial: int) -> bytes:
    """The LATEST the publisher wrote when ``serial`` was its newest release."""
    manifest = (cluster.repo / "mx" / "releases" / str(serial) / MANIFEST).read_bytes()
    return Latest(serial, manifest_sha256(manifest)).to_bytes()


def rsync(*args: str) -> None:
    subprocess.run(["rsync", "--recursive", "--times", *args], check=True, capture_output=True)


def push_release(cluster: Cluster, serial: int) -> None:
    """Step 1 and 2 of a push: the release directory into ``INBOX/releases/<serial>/``."""
    (inbox(cluster) / "releases").mkdir(parents=True, exist_ok=True)
    rsync(
        "--chmod=D700,F600",
        f"{cluster.repo / 'mx' / 'releases' / str(serial)}/",
        f"{inbox(cluster) / 'releases' / str(serial)}/",
    )


def push_latest(cluster: Cluster, serial: int) -> None:
    """Step 3 of a push: LATEST, last (rsync writes ``.LATEST.XXXXXX`` and renames it)."""
    outbox = cluster.root / "outbox"
    outbox.mkdir(exist_ok=True)
    (outbox / LATEST).write_bytes(latest_bytes(cluster, serial))
    # --ignore-times: always written (temporary file, rename), even when the same LATEST
    # is delivered again within the same second.
    rsync("--ignore-times", str(outbox / LATEST), str(inbox(cluster) / LATEST))


def live_serial(cluster: Cluster) -> int | None:
    try:
        data = (cluster.target / ".mapsync" / "current" / MANIFEST).read_bytes()
    except FileNotFoundError:
        return None
    serial = json.loads(data)["serial"]
    assert isinstance(serial, int)
    return serial


def _wall(record: Record) -> float:
    """A log record's time (structlog's ISO timestamp, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


def wait_live(cluster: Cluster, serial: int, timeout: float) -> float:
    """Seconds until ``serial`` is the live set; fails after ``timeout``."""
    started = time.monotonic()
    while live_serial(cluster) != serial:
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"serial {serial} not live after {timeout}s (live: {live_serial(cluster)})"
            )
        time.sleep(0.002)
    return time.monotonic() - started


def eventually(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not true within {timeout}s"
        time.sleep(0.01)


def status(cluster: Cluster) -> subprocess.CompletedProcess[str]:
    return cluster.cli("status")


@pytest.fixture(scope="module")
def _installed(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    root = tmp_path_factory.mktemp("loop")
    c = make_cluster(root / "c", f"sqlite:///{root / 'central.db'}")
    c.publish()
    c.pull()
    return c


@pytest.fixture
def node(_installed: Cluster, tmp_path: Path) -> Cluster:
    """Serial 1 published and installed; the node has a push inbox; no poll jitter."""
    c = clone(_installed, tmp_path)
    configure(c)
    return c


# -- push → live --------------------------------------------------------------------------------


def test_a_pushed_release_is_live_within_a_second_of_its_latest(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    # A poll every 5 minutes: within this test only the push can bring a release in.
    agent = start_agent(node, "--watch", "--interval", "300")
    assert live_serial(node) == 1
    latencies, reactions = [], []
    for serial in (2, 3, 4):
        new = add_account(node, f"zz-pushed-{serial}")
        assert f"published serial {serial}" in node.publish().stdout
        push_release(node, serial)
        time.sleep(0.2)  # the release alone is nothing: LATEST has not come
        assert live_serial(node) == serial - 1

        seen_before = len(agent.logged("LATEST arrived in the inbox", channel="mx"))
        arrived, arrived_wall = time.monotonic(), time.time()  # before LATEST's rsync starts
        push_latest(node, serial)
        wait_live(node, serial, timeout=5)
        latencies.append(time.monotonic() - arrived)
        assert lookup(node, new) == "OK"
        installed = agent.wait_for(
            "pushed release installed", serial=serial, inbox=str(inbox(node))
        )
        # The agent's own clock: when its watch saw LATEST (nothing polls the inbox).
        seen = agent.wait_for("LATEST arrived in the inbox", count=seen_before + 1, channel="mx")
        assert seen["timestamp"] <= installed["timestamp"]
        reactions.append(_wall(seen) - arrived_wall)
    # Idle, the whole push → live takes about 0.4 s, most of it the inbox pull's rsync and
    # verification, which slow down with the machine's load (other tests run beside this one).
    # The watch itself must react at once, whatever the load: no timer, no poll of the inbox.
    assert max(reactions) < 1.0, f"LATEST seen {reactions} s after it was written"
    assert max(latencies) < 3.0, f"push → live took {latencies} s"
    # Each came from the inbox (logged above), none by a poll; older releases were pruned.
    assert len(agent.logged("installed release")) == len(agent.logged("pushed release installed"))
    assert sorted(os.listdir(inbox(node) / "releases")) == ["4"]
    assert set_dirs(node) == ["4", "current"]
    assert agent.problems() == []
    assert read_state(node)["last_error"] is None
    assert agent.proc.poll() is None


def test_an_older_latest_in_the_inbox_is_ignored_without_an_error(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    # Serial 1 sits in the inbox (pushed long ago); the node already runs serial 2.
    push_release(node, 1)
    push_latest(node, 1)
    add_account(node, "zz-newer")
    node.publish()
    node.pull()
    assert live_serial(node) == 2

    agent = start_agent(node, "--watch", "--interval", "300")
    # At start: looked at, found not newer, ignored quietly (debug), no rollback alarm.
    agent.wait_for("inbox holds nothing newer", offered=1, installed=2)
    # The same old LATEST delivered again while the agent runs: the same.
    push_latest(node, 1)
    agent.wait_for("inbox holds nothing newer", count=2, offered=1, installed=2)

    assert live_serial(node) == 2
    assert agent.problems() == []
    assert read_state(node)["last_error"] is None
    st = status(node)
    assert st.returncode == 0, st.stdout + st.stderr
    assert agent.proc.poll() is None


def test_a_tampered_push_is_refused_the_old_set_serves_and_the_agent_goes_on(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(node, "--watch", "--interval", "300")
    new = add_account(node, "zz-tampered")
    node.publish()
    push_release(node, 2)
    recipients = inbox(node) / "releases" / "2" / "recipients"
    lines = recipients.read_bytes().splitlines(keepends=True)
    # Same size, one address changed: only the sha256 can tell.
    lines[-1] = lines[-1].replace(b"@", b"#", 1)
    recipients.write_bytes(b"".join(lines))
    push_latest(node, 2)

    failed = agent.wait_for("pull failed", origin="push", channel="mx")
    assert "recipients" in failed["error"] and "altered" in failed["error"], failed
    assert failed["exit"] == 5
    assert live_serial(node) == 1
    assert lookup(node, new) is None
    assert lookup(node, "postmaster@example-1.org") == "OK"
    state = read_state(node)
    assert "recipients" in str(state["last_error"])
    st = status(node)
    assert st.returncode == 1, st.stdout + st.stderr  # WARNING: the maps serve, a run failed
    assert "last run failed" in st.stdout and "recipients" in st.stdout

    # The agent is still there: the genuine release, pushed again, goes in at once.
    assert agent.proc.poll() is None
    rsync("--checksum", f"{node.repo / 'mx' / 'releases' / '2'}/", f"{recipients.parent}/")
    push_latest(node, 2)
    wait_live(node, 2, timeout=3)
    assert lookup(node, new) == "OK"
    agent.wait_for("pushed release installed", serial=2)  # logged once the state is saved
    assert read_state(node)["last_error"] is None


def test_a_release_pushed_while_the_agent_was_down_goes_in_at_start_without_the_source(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    new = add_account(node, "zz-while-down")
    node.publish()
    push_release(node, 2)
    push_latest(node, 2)
    os.rename(node.repo, node.root / "repo-away")  # and the publisher cannot be reached
    agent = start_agent(node, "--watch", "--interval", "300")
    assert live_serial(node) == 2
    assert lookup(node, new) == "OK"
    agent.wait_for("pull failed", origin="poll")  # the source: logged, the loop went on
    agent.wait_for("pushed release installed", serial=2)


def test_a_latest_that_is_not_a_file_is_refused_without_reading_it(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    """A FIFO would block a reader forever; the agent must neither hang nor install."""
    agent = start_agent(node, "--watch", "--interval", "300")
    add_account(node, "zz-after-fifo")
    node.publish()
    push_release(node, 2)
    os.mkfifo(inbox(node) / LATEST)
    failed = agent.wait_for("pull failed", origin="push")
    assert LATEST in failed["error"], failed
    assert failed["exit"] == 5, failed  # a refusal, not an error of the node
    assert live_serial(node) == 1
    assert "last run failed" in status(node).stdout
    # Still listening: a real LATEST replaces it and goes in.
    push_latest(node, 2)
    wait_live(node, 2, timeout=3)


def test_a_symlinked_latest_in_the_inbox_is_refused_not_followed(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    """The push account owns the inbox: a LATEST pointing elsewhere (here at a genuine one)
    is a refusal (exit 5) naming the inbox's LATEST, not a failure of the node (exit 2)."""
    agent = start_agent(node, "--watch", "--interval", "300")
    add_account(node, "zz-after-symlink")
    node.publish()
    push_release(node, 2)
    elsewhere = node.root / "elsewhere-LATEST"
    elsewhere.write_bytes(latest_bytes(node, 2))
    (inbox(node) / LATEST).symlink_to(elsewhere)
    failed = agent.wait_for("pull failed", origin="push")
    assert failed["exit"] == 5, failed
    assert failed["error"] == (
        f"{inbox(node)}/{LATEST}: missing, not a regular file, or larger than 4096 bytes"
    ), failed
    assert live_serial(node) == 1
    st = status(node)
    assert st.returncode == 1 and f"last run failed: {inbox(node)}/{LATEST}: " in st.stdout
    # A real LATEST replaces the symlink and goes in; the refusal is cleared.
    (inbox(node) / LATEST).unlink()
    push_latest(node, 2)
    wait_live(node, 2, timeout=3)
    agent.wait_for("pushed release installed", serial=2)
    assert read_state(node)["last_error"] is None


def test_the_poll_installs_from_the_source_without_any_push_and_survives_a_failure(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(node, "--watch", "--interval", "1")
    # The publisher's repository goes away: each poll fails, is logged and recorded.
    hidden = node.root / "repo-away"
    os.rename(node.repo, hidden)
    failed = agent.wait_for("pull failed", origin="poll", timeout=5)
    assert failed["channel"] == "mx"
    assert read_state(node)["last_error"]
    assert agent.proc.poll() is None
    assert live_serial(node) == 1

    os.rename(hidden, node.repo)
    new = add_account(node, "zz-polled")
    node.publish()
    wait_live(node, 2, timeout=5)  # the next poll, 1 s apart (no jitter)
    assert lookup(node, new) == "OK"
    assert not (inbox(node) / LATEST).exists()  # nothing was pushed
    # The state is saved just after the swap: the failure is cleared by that good run.
    eventually(lambda: read_state(node)["last_error"] is None, timeout=2)
    assert agent.logged("pushed release installed") == []


@pytest.mark.parametrize("outage", ["primary down, mirror serves", "every source down"])
def test_a_push_does_not_hide_a_broken_source_from_status(
    node: Cluster, start_agent: Callable[..., AgentProcess], outage: str
) -> None:
    """Pushes keep the maps fresh while the primary (or the whole repository) is down; status
    must keep saying so until a poll of the sources succeeds again, not flip to OK."""
    primary, repo = node.root / "primary" / "mx", node.repo / "mx"
    sources = [primary, repo] if outage.startswith("primary") else [primary]
    text = node.config_path.read_text()
    line = f'source = "{repo}"'
    assert line in text
    node.config_path.write_text(
        text.replace(line, f"source = {json.dumps(list(map(str, sources)))}")
    )
    agent = start_agent(node, "--watch", "--interval", "300")  # polls once, at start
    why = f"{primary}" if outage.startswith("primary") else "last run failed"
    before = status(node)
    assert before.returncode == 1 and why in before.stdout, before.stdout
    state = read_state(node)
    checked = state["last_success"]

    new = add_account(node, "zz-pushed-while-down")
    node.publish()
    push_release(node, 2)
    pushed_at = math.floor(time.time())  # the push is recorded in whole seconds
    push_latest(node, 2)
    agent.wait_for("pushed release installed", serial=2)
    assert lookup(node, new) == "OK"
    after = status(node)
    asked = time.time()
    assert after.returncode == 1, after.stdout  # still WARNING: the source is still broken
    assert why in after.stdout and str(primary) in after.stdout, after.stdout
    age = re.search(r"last push (\d+)s ago", after.stdout)
    assert age and int(age[1]) <= asked - pushed_at, after.stdout  # this push, not an older
    pushed = read_state(node)
    assert pushed["last_success"] == checked  # a push is not a check of the source
    assert pushed["last_source"] == state["last_source"]
    assert pushed["failed_sources"] == state["failed_sources"]
    assert pushed["last_error"] == state["last_error"]
    assert pushed["last_push"] is not None and pushed["last_install"] == pushed["last_push"]
    channel = json.loads(node.cli("status", "--json").stdout)["channels"][0]
    assert channel["serial"] == 2 and channel["last_push"] == pushed["last_push"]
    prom = node.root / "mapsync.prom"
    node.cli("status", "--prometheus", str(prom))
    stamp = int(datetime.fromisoformat(pushed["last_push"].replace("Z", "+00:00")).timestamp())
    assert f'mapsync_last_push_timestamp_seconds{{channel="mx"}} {stamp}' in prom.read_text()

    # The primary is back: the next poll of the sources clears it all.
    primary.parent.mkdir()
    primary.symlink_to(repo)
    assert "serial 2 is current" in node.pull().stdout
    ok = status(node)
    assert ok.returncode == 0, ok.stdout
    final = read_state(node)
    assert final["last_source"] == str(primary) and final["failed_sources"] == {}
    assert final["last_error"] is None and final["last_push"] == pushed["last_push"]


def test_a_busy_channel_defers_the_inbox_pull_until_the_lock_is_free(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(node, "--watch", "--interval", "300")
    add_account(node, "zz-busy")
    node.publish()
    push_release(node, 2)
    # A `mapsync pull` from a timer holds the channel while the push lands.
    with channel_lock(node.state / "mx" / "lock"):
        push_latest(node, 2)
        agent.wait_for("inbox pull deferred: the channel is busy", channel="mx")
        assert live_serial(node) == 1
    wait_live(node, 2, timeout=3)
    assert agent.problems() == []
    assert agent.proc.poll() is None


# -- stopping and refusing to start -------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_ends_the_idle_agent_promptly_with_128_plus_n(
    node: Cluster, start_agent: Callable[..., AgentProcess], sig: int, code: int
) -> None:
    agent = start_agent(node, "--watch", "--interval", "300")
    time.sleep(0.3)  # idle: waiting for the next poll or a push
    before = sorted(os.listdir(node.target))
    exit_code, took = agent.stop(sig)
    assert exit_code == code
    assert took < 1.0, f"took {took:.2f}s to stop"
    assert agent.logged("agent stopping", exit=code)
    assert sorted(os.listdir(node.target)) == before
    assert set_dirs(node) == ["1", "current"]
    assert lookup(node, "postmaster@example-1.org") == "OK"


# How an operator breaks the config between two SIGHUPs, and what the log must name.
BROKEN_EDITS = {
    "toml syntax": (lambda t: t.replace("[agent]\n", "[agent\n", 1), "line "),
    "unknown key": (
        lambda t: t.replace("[agent]\n", '[agent]\nintervall = "5m"\n', 1),
        "intervall",
    ),
    "wrong type": (lambda t: t.replace("[agent]\n", "[agent]\ninterval = 300\n", 1), "interval"),
    "no inbox left for --watch": (
        lambda t: "\n".join(line for line in t.splitlines() if not line.startswith("inbox =")),
        "inbox",
    ),
}


@pytest.mark.parametrize("edit", sorted(BROKEN_EDITS))
def test_sighup_with_a_broken_config_logs_it_and_runs_on_and_a_fixed_one_restarts(
    node: Cluster, start_agent: Callable[..., AgentProcess], edit: str
) -> None:
    """A SIGHUP (`systemctl reload`) after an edit that does not load must not end the
    agent: restarted, it would fail at every start and no map would be updated until
    someone fixed the file. Once the file is fixed, SIGHUP restarts it (exit 129)."""
    agent = start_agent(node, "--watch", "--interval", "300")
    add_account(node, "zz-after-a-broken-reload")
    node.publish()  # (the publisher reads the same file)
    push_release(node, 2)
    good = node.config_path.read_text()
    breaking, named = BROKEN_EDITS[edit]
    node.config_path.write_text(breaking(good))
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not (
        errors := [r for r in agent.problems() if "config not reloaded" in str(r.get("event"))]
    ):
        assert agent.proc.poll() is None, f"the agent ended: exit {agent.proc.returncode}"
        assert time.monotonic() < deadline, agent.records
        time.sleep(0.01)
    error = errors[0]
    assert error["level"] == "error"
    assert str(node.config_path) in error["event"] and named in error["event"]
    assert error["event"].endswith("; running on with the config loaded before")
    # Still at work, with the config it started with: a push goes live.
    push_latest(node, 2)
    wait_live(node, 2, timeout=5)
    assert agent.proc.poll() is None
    assert not agent.logged("agent stopping")
    # Fixed: the next SIGHUP restarts it (systemd's Restart=on-failure), as any SIGHUP did.
    node.config_path.write_text(good)
    exit_code, took = agent.stop(signal.SIGHUP)
    assert exit_code == 129
    assert took < 2.0, f"took {took:.2f}s to stop"
    assert agent.logged("agent stopping", exit=129)
    assert [r for r in agent.problems() if r is not error] == []


@pytest.mark.parametrize("after", [0.2, 0.4])
def test_sigterm_during_an_inbox_pull_leaves_a_whole_set_serving(
    node: Cluster, start_agent: Callable[..., AgentProcess], after: float
) -> None:
    """A pull from the inbox takes about half a second here, most of it in rsync: the
    signal lands inside it. The old set or the new one serves, whole, never a mix."""
    agent = start_agent(node, "--watch", "--interval", "300")
    add_account(node, "zz-interrupted")
    node.publish()
    push_release(node, 2)
    push_latest(node, 2)
    time.sleep(after)
    exit_code, took = agent.stop(signal.SIGTERM)
    assert exit_code == 143
    # Not held up by the rsync it interrupted (its 30 s timeout timer is not waited for).
    assert took < 2.0, f"took {took:.2f}s to stop"
    serial = live_serial(node)
    assert serial in (1, 2)
    assert set_dirs(node) == [str(serial), "current"]
    verify = node.cli("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert lookup(node, "postmaster@example-1.org") == "OK"
    # The next start finishes the job.
    start_agent(node, "--watch", "--interval", "300")
    assert live_serial(node) == 2


def test_watch_without_any_inbox_exits_2_naming_the_config_file(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    configure(node, with_inbox=False)
    p = node.cli("agent", "--watch", "--interval", "300")
    assert p.returncode == 2
    assert str(node.config_path) in p.stderr
    assert "inbox" in p.stderr and "--watch" in p.stderr
    # Without --watch the same config is fine: it only polls.
    agent = start_agent(node, "--interval", "300")
    assert agent.wait_for("agent started")["watching"] == {}


def test_an_interval_below_one_second_is_refused(node: Cluster) -> None:
    p = node.cli("agent", "--interval", "0")
    assert p.returncode == 2
    assert "--interval" in p.stderr


def test_pruning_the_inbox_never_follows_a_symlink_out_of_it(tmp_path: Path) -> None:
    box, outside = tmp_path / "inbox", tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "MANIFEST.json").write_text("not the inbox's")
    releases = box / "releases"
    for serial in ("3", "4", "5"):
        (releases / serial).mkdir(parents=True)
        (releases / serial / "recipients").write_text("x OK\n")
    (releases / "3" / "escape").symlink_to(outside / "keep")  # inside an old release
    (releases / "2").symlink_to(outside / "keep")  # an old "release" that is a symlink
    (releases / "not-a-serial").mkdir()

    assert prune_inbox(box, 5, "mx") == [2, 3, 4]
    assert sorted(os.listdir(releases)) == ["5", "not-a-serial"]
    assert (outside / "keep" / "MANIFEST.json").read_text() == "not the inbox's"

    # A `releases` that is itself a symlink is not the inbox's to prune.
    shutil.rmtree(releases)
    (outside / "9").mkdir()
    releases.symlink_to(outside)
    assert prune_inbox(box, 100, "mx") == []
    assert sorted(os.listdir(outside)) == ["9", "keep"]


@pytest.mark.parametrize("linked", ["releases", "inbox"])
def test_pruning_refuses_a_symlinked_releases_or_inbox_and_says_so(
    tmp_path: Path, linked: str
) -> None:
    """``releases`` (or the inbox itself) is opened without following a symlink: whatever
    it points at is never listed, let alone deleted, and the operator is told why the inbox
    is not pruned."""
    outside = tmp_path / "spool"
    for serial in ("1", "2"):
        (outside / serial).mkdir(parents=True)
        (outside / serial / "queued").write_text("mail")
    real = tmp_path / "real-inbox"
    (real / "releases" / "1").mkdir(parents=True)
    box = tmp_path / "inbox"
    if linked == "releases":
        box.mkdir()
        (box / "releases").symlink_to(outside)
    else:
        box.symlink_to(real)
    with capture_logs() as logs:
        assert prune_inbox(box, 100, "mx") == []
    assert sorted(os.listdir(outside)) == ["1", "2"]
    assert (outside / "1" / "queued").read_text() == "mail"
    assert os.listdir(real / "releases") == ["1"]
    (warning,) = [r for r in logs if r["log_level"] == "warning"]
    assert warning["event"] == "not pruning the inbox: a symlink, not followed"
    assert warning["channel"] == "mx"
    assert warning["path"] == str(box / "releases" if linked == "releases" else box)


def test_pruning_survives_releases_being_swapped_for_a_symlink_meanwhile(tmp_path: Path) -> None:
    """The push account owns the inbox and can swap ``releases`` for a symlink (to the mail
    queue, say) between any check the root agent makes and its delete. Everything is done
    relative to one directory descriptor opened without following symlinks, so whichever
    directory ``releases`` named when it was opened is the only one ever touched."""
    outside = tmp_path / "spool"
    box = tmp_path / "inbox"
    releases, held, link = box / "releases", box / "releases.held", box / "releases.link"
    box.mkdir()
    releases.mkdir()
    link.symlink_to(outside)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                os.rename(releases, held)
                os.rename(link, releases)  # `releases` is the symlink now
                os.rename(releases, link)
                os.rename(held, releases)

    attacker = threading.Thread(target=swap, daemon=True)
    attacker.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for serial in ("1", "2", "3"):
                (outside / serial).mkdir(parents=True, exist_ok=True)
                (outside / serial / "queued").write_text("mail")
            prune_inbox(box, 3, "mx")
            assert sorted(os.listdir(outside)) == ["1", "2", "3"]
            assert all((outside / s / "queued").exists() for s in ("1", "2", "3"))
    finally:
        stop.set()
        attacker.join(5)


def test_a_missing_inbox_is_created_private(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    assert not inbox(node).exists()
    agent = start_agent(node, "--watch")
    agent.wait_for("created the push inbox", channel="mx")
    assert inbox(node).is_dir()
    assert inbox(node).stat().st_mode & 0o777 == 0o700  # a mailstore's releases carry hashes


# -- the inbox replaced under a running agent ----------------------------------------------------


def _recreate(box: Path, how: str) -> None:
    """Replace the inbox directory the way config management or an operator does."""
    if how == "rm -rf; mkdir":
        shutil.rmtree(box)
        box.mkdir(mode=0o700)
    elif how == "moved away; mkdir":
        box.rename(box.with_name("mx.old"))
        box.mkdir(mode=0o700)
    else:  # a symlink swapped to a new directory (ln -sfn new inbox, atomically)
        new = box.parent / f"mx.{time.monotonic_ns()}"
        new.mkdir(mode=0o700)
        tmp = box.parent / "mx.swap"
        tmp.symlink_to(new.name)
        tmp.replace(box)


@pytest.mark.parametrize("how", ["rm -rf; mkdir", "moved away; mkdir", "symlink swapped"])
def test_an_inbox_recreated_under_the_agent_is_watched_again_and_says_so(
    node: Cluster, start_agent: Callable[..., AgentProcess], how: str
) -> None:
    box = inbox(node)
    if how == "symlink swapped":
        first = box.parent / "mx.first"
        first.mkdir(parents=True, mode=0o700)
        box.symlink_to(first.name)
    # A poll every hour: within this test only the watch can bring a release in.
    agent = start_agent(node, "--watch", "--interval", "3600")
    _recreate(box, how)
    agent.wait_for("the push inbox was replaced; watching the new directory", channel="mx")

    for serial in (2, 3):
        add_account(node, f"zz-recreated-{serial}")
        node.publish()
        push_release(node, serial)
        push_latest(node, serial)
        wait_live(node, serial, timeout=5)
        agent.wait_for("pushed release installed", serial=serial)
    said = {r["event"] for r in agent.problems()}
    # Between rm -rf and mkdir the agent may look, and say that the inbox is gone, first.
    said.discard("the push inbox is gone; watching for it to come back")
    # A symlinked inbox is never pruned (prune_inbox follows no symlink), and says so.
    said.discard("not pruning the inbox: a symlink, not followed")
    assert said == {"the push inbox was replaced; watching the new directory"}
    assert agent.proc.poll() is None


def test_an_inbox_removed_and_made_again_later_is_watched_once_it_is_back(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(node, "--watch", "--interval", "3600")
    shutil.rmtree(inbox(node))
    agent.wait_for("the push inbox is gone; watching for it to come back", channel="mx")
    time.sleep(0.5)
    assert not inbox(node).exists()  # not made behind the operator's back, as another owner
    inbox(node).mkdir(mode=0o700)
    agent.wait_for("the push inbox was replaced; watching the new directory", channel="mx")
    add_account(node, "zz-back")
    node.publish()
    push_release(node, 2)
    push_latest(node, 2)
    wait_live(node, 2, timeout=5)


# -- a hung source -------------------------------------------------------------------------------


def test_a_pushed_release_installs_while_the_poll_waits_on_a_source_that_never_answers(
    node: Cluster, start_agent: Callable[..., AgentProcess]
) -> None:
    """The source accepts the connection and says nothing; the poll would wait for the whole
    rsync timeout (two minutes here). The push goes in within seconds all the same, the
    poll is stopped and tried again, and SIGTERM still ends everything at once."""
    with SilentListener() as silent:
        node.write_config(
            source=f"rsync://127.0.0.1:{silent.port}/mapsync/mx",
            extra_agent=f'inbox = "{inbox(node)}"',
        )
        text = node.config_path.read_text().replace('timeout = "30s"', 'timeout = "120s"')
        node.config_path.write_text(text.replace("[agent]\n", '[agent]\njitter = "0s"\n', 1))
        agent = start_agent(node, "--watch", "--interval", "3600", ready=False)
        agent.wait_for("watching the push inboxes", timeout=20)
        eventually(lambda: silent.connections >= 1, timeout=20)  # the first poll hangs

        new = add_account(node, "zz-hung-source")
        node.publish()
        push_release(node, 2)
        pushed_at = time.monotonic()
        push_latest(node, 2)
        wait_live(node, 2, timeout=20)
        took = time.monotonic() - pushed_at
        assert took < 20, took  # not the 120 s the poll would have waited
        assert lookup(node, new) == "OK"
        agent.wait_for("stopping the poll to install a pushed release", channel="mx")
        agent.wait_for("pushed release installed", serial=2)
        eventually(lambda: silent.connections >= 2, timeout=20)  # and the source polled again
        assert agent.logged("pull crashed") == []
        assert read_state(node)["last_push"] is not None

        code, took = agent.stop()
        assert code == 128 + signal.SIGTERM
        assert took < 5.0  # the second poll's rsync was ended, not waited for
    # A poll the agent stopped (to install a push, or to exit) is no failure of the source:
    # it was recorded as one, and status warned "last run failed: rsync stopped: the agent
    # is stopping" after every restart until the next poll.
    assert read_state(node).get("last_error") is None, read_state(node)
    assert agent.logged("pull failed") == []

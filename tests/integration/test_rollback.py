"""A bad release reached the nodes: roll back, on one node or for every node.

The story: serials 1, 2 and 3 were published and installed one after the other, each adding
one account. On a node, ``mapsync rollback`` reinstalls a kept release after verifying it
again (signature, every hash, cdb rebuilt) and pins the channel until ``pull --unpin``. On
the publisher, ``mapsync rollback --publisher 1`` publishes serial 1's maps as serial 4 and
every agent follows. Every refusal leaves the live maps as they were, byte, inode and mtime.

Everything runs the real CLI, real rsync and real ``postmap -q``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from mapsync.release import MANIFEST, SIGNATURE, parse_latest, parse_manifest
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import (
    MAPS,
    add_account,
    clone,
    lookup,
    read_state,
    tree_snapshot,
)
from tests.helpers.config import publish_expiring
from tests.helpers.processes import processes, started, wait_for_children
from tests.helpers.publisher import add_channels

SECOND = "zz-second@example-1.org"  # from serial 2 on
THIRD = "zz-third@example-1.org"  # from serial 3 on
OLD = "postmaster@example-1.org"  # in every release


def kept(cluster: Cluster) -> Path:
    return cluster.state / "mx" / "releases"


def reload_hook(cluster: Cluster) -> Path:
    """Configure a reload hook that appends a line to a log; return the log."""
    log = cluster.root / "reloads"
    cluster.write_config(extra_agent=f'reload = ["sh", "-c", "echo reload >> {log}"]')
    return log


def reloads(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture(scope="module")
def _three(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    root = tmp_path_factory.mktemp("three")
    c = make_cluster(root / "c", f"sqlite:///{root / 'central.db'}")
    c.publish()
    c.pull()
    add_account(c, "zz-second")
    c.publish()
    c.pull()
    add_account(c, "zz-third")
    c.publish()
    c.pull()
    return c


@pytest.fixture
def three(_three: Cluster, tmp_path: Path) -> Cluster:
    """Serials 1, 2, 3 published; each was installed in turn, 3 is live."""
    return clone(_three, tmp_path)


# -- kept releases ------------------------------------------------------------------------------


def test_the_agent_keeps_every_verified_release_as_separate_files(three: Cluster) -> None:
    assert sorted(os.listdir(kept(three))) == ["1", "2", "3"]
    three_dir = kept(three) / "3"
    assert sorted(os.listdir(three_dir)) == sorted([MANIFEST, SIGNATURE, *MAPS])  # text only
    assert (three_dir / MANIFEST).read_bytes() == (
        three.repo / "mx" / "releases" / "3" / MANIFEST
    ).read_bytes()
    # Separate inodes: a kept copy never keeps a swapped-out live inode alive.
    for name in MAPS:
        live = (three.target / name).stat()
        copy = (three_dir / name).stat()
        assert live.st_ino != copy.st_ino
        assert live.st_nlink == 1 and copy.st_nlink == 1


def test_the_agent_keeps_only_the_newest_releases(three: Cluster) -> None:
    three.write_config(extra_agent="keep = 2")
    add_account(three, "zz-fourth")
    three.publish()
    three.pull()
    assert sorted(os.listdir(kept(three))) == ["3", "4"]


def test_keep_below_two_is_a_config_error(three: Cluster) -> None:
    three.write_config(extra_agent="keep = 1")
    p = three.cli("status")
    assert p.returncode == 2
    assert "[agent.channels.mx] keep: must be at least 2, not 1" in p.stderr


def test_a_node_installed_before_keeping_existed_keeps_its_release_on_the_next_pull(
    three: Cluster,
) -> None:
    for serial in ("1", "2", "3"):
        (kept(three) / serial / SIGNATURE).unlink()
        for f in os.listdir(kept(three) / serial):
            (kept(three) / serial / f).unlink()
        (kept(three) / serial).rmdir()
    assert "serial 3 is current" in three.pull().stdout
    assert os.listdir(kept(three)) == ["3"]
    assert sorted(os.listdir(kept(three) / "3")) == sorted([MANIFEST, SIGNATURE, *MAPS])


# -- rollback on a node -------------------------------------------------------------------------


def test_rollback_reinstalls_the_previous_release_pins_it_and_reloads_once(
    three: Cluster,
) -> None:
    log = reload_hook(three)
    assert lookup(three, THIRD) == "OK"

    p = three.cli("rollback")
    assert p.returncode == 0, p.stderr
    assert "mx: rolled back to serial 2 (was 3), re-verified; pinned until" in p.stdout
    assert lookup(three, THIRD) is None
    assert lookup(three, SECOND) == "OK"
    assert lookup(three, OLD) == "OK"
    assert os.readlink(three.target / ".mapsync" / "current") == "2"
    assert sorted(os.listdir(three.target / ".mapsync")) == ["2", "current"]
    assert reloads(log) == 1
    assert read_state(three)["pinned"] == 2
    assert three.cli("verify").returncode == 0

    st = three.cli("status")
    assert st.returncode == 1
    assert "mx: WARNING serial 2" in st.stdout
    assert "pinned to serial 2 by rollback" in st.stdout
    data = json.loads(three.cli("status", "--json").stdout)
    assert data["status"] == "WARNING"
    assert data["channels"][0]["pinned"] == 2


def test_a_pinned_channel_checks_the_source_but_installs_nothing_newer(three: Cluster) -> None:
    log = reload_hook(three)
    three.cli("rollback", check=True)
    before = tree_snapshot(three.target)
    checked = read_state(three)["last_success"]
    add_account(three, "zz-fourth")
    three.publish()
    time.sleep(1.1)  # state timestamps have whole seconds

    p = three.cli("-v", "pull")
    assert "mx: pinned to serial 2 by rollback; LATEST is 4, not installed" in p.stdout
    # LATEST alone: not, with it, the release after the pinned basis, on every poll.
    assert "releases/3/" not in p.stderr and "--include" not in p.stderr, p.stderr
    assert tree_snapshot(three.target) == before
    assert reloads(log) == 1
    state = read_state(three)
    assert state["pinned"] == 2
    assert state["last_success"] != checked and state["last_error"] is None
    assert lookup(three, "zz-fourth@example-1.org") is None

    p = three.pull("--unpin")
    assert "mx: installed serial 4 (was 2)" in p.stdout
    assert lookup(three, "zz-fourth@example-1.org") == "OK"
    assert lookup(three, THIRD) == "OK"
    assert read_state(three)["pinned"] is None
    assert reloads(log) == 2
    assert three.cli("status").returncode == 0


def test_rollback_to_a_named_serial(three: Cluster) -> None:
    p = three.cli("rollback", "--channel", "mx", "1")
    assert p.returncode == 0, p.stderr
    assert "rolled back to serial 1 (was 3)" in p.stdout
    assert lookup(three, SECOND) is None and lookup(three, THIRD) is None
    assert lookup(three, OLD) == "OK"
    # Forward again to a kept release, still pinned.
    three.cli("rollback", "2", check=True)
    assert lookup(three, SECOND) == "OK" and lookup(three, THIRD) is None
    assert read_state(three)["pinned"] == 2
    # And to LATEST itself: still pinned, but no pull may say LATEST is not installed.
    three.cli("rollback", "3", check=True)
    p = three.pull()
    assert p.stdout == (
        "mx: pinned to serial 3 by rollback; LATEST names it too "
        "(`mapsync pull --unpin` follows the publisher again)\n"
    ), p.stdout


def test_a_reload_that_fails_after_a_rollback_is_reported_with_what_it_said(
    three: Cluster,
) -> None:
    """The same report as after a pull: the hook's own words, not only "it failed"."""
    log = three.root / "reloads"
    said = "postfix/postfix-script: fatal: the Postfix mail system is not running"
    three.write_config(
        extra_agent=f'reload = ["sh", "-c", "echo reload >> {log}; echo {said} >&2; exit 1"]'
    )
    p = three.cli("rollback")
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        f"mapsync: channel mx: rolled back to serial 2, but the reload hook failed (exit 1: "
        f"{said}); it is retried on the next run"
    ) in p.stderr
    assert lookup(three, THIRD) is None  # rolled back all the same
    state = read_state(three)
    assert state["pinned"] == 2 and state["reload_pending"] is True
    assert reloads(log) == 1

    reload_hook(three)  # the daemon is fixed: the next run owes it a reload, and runs it
    assert "pinned to serial 2 by rollback" in three.pull().stdout
    assert reloads(log) == 2 and read_state(three)["reload_pending"] is False


def test_sigterm_during_the_reload_of_a_rollback_ends_the_hook_and_all_it_started(
    three: Cluster,
) -> None:
    """The hook runs in a process group of its own; a signal that ends the agent ends the
    group, so no `sleep` (or half-done reload) outlives the run. The reload stays owed."""
    log = three.root / "reloads"
    three.write_config(extra_agent=f'reload = ["sh", "-c", "sleep 30; echo late >> {log}"]')
    with started(three, "rollback") as proc:
        [hook] = wait_for_children(proc, "sh", 1)
        deadline = time.monotonic() + 10
        while not any(p.name == "sleep" for p in processes(group=hook.pid)):
            assert time.monotonic() < deadline, processes(group=hook.pid)
            time.sleep(0.02)
        group = processes(group=hook.pid)  # sh and its sleep
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        took = time.monotonic() - signalled
        left = [p for p in group if p.running()]
    print(
        f"\n[signal] rollback in its reload hook: exit {proc.returncode} {took:.2f}s after SIGTERM"
    )
    assert proc.returncode == 143, out + err
    assert "Traceback" not in err
    assert sorted(p.name for p in group) == ["sh", "sleep"]
    assert not left, f"still running after mapsync exited: {left}"
    assert took < 5
    assert lookup(three, THIRD) is None  # the rollback itself happened
    state = read_state(three)
    assert state["pinned"] == 2 and state["reload_pending"] is True

    reload_hook(three)
    three.pull()
    assert reloads(log) == 1 and read_state(three)["reload_pending"] is False


def _refused(cluster: Cluster, args: list[str], code: int, message: str) -> None:
    before = tree_snapshot(cluster.target)
    state = read_state(cluster)
    p = cluster.cli("rollback", *args)
    assert p.returncode == code, (p.stdout, p.stderr)
    assert message in p.stderr
    assert tree_snapshot(cluster.target) == before
    assert read_state(cluster) == state
    assert lookup(cluster, THIRD) == "OK"


def test_rollback_to_a_serial_that_is_not_kept_is_refused(three: Cluster) -> None:
    _refused(
        three,
        ["9"],
        2,
        "mapsync: channel mx: release 9 is not kept on this node (kept: 1, 2, 3); nothing changed",
    )


def test_rollback_to_the_installed_serial_is_refused(three: Cluster) -> None:
    _refused(three, ["3"], 2, "channel mx: serial 3 is already installed; nothing changed")


def test_rollback_to_an_unknown_channel_is_refused(three: Cluster) -> None:
    _refused(three, ["--channel", "store-1", "2"], 2, "unknown channel store-1")


def test_rollback_of_a_tampered_kept_map_is_refused(three: Cluster) -> None:
    with open(kept(three) / "2" / "recipients", "a") as fh:
        fh.write("evil@example-1.org OK\n")
    _refused(three, [], 5, "/releases/2/recipients: sha256")
    p = three.cli("rollback", "2")
    assert "the file was altered" in p.stderr
    assert p.returncode == 5


def test_rollback_of_a_tampered_kept_manifest_is_refused(three: Cluster) -> None:
    path = kept(three) / "2" / MANIFEST
    path.write_bytes(path.read_bytes().replace(b'"entries": ', b'"entries": 1', 1))
    _refused(three, ["2"], 5, "signature does not verify with any trusted key")


def test_a_default_rollback_to_a_tampered_previous_release_is_refused_not_skipped(
    three: Cluster,
) -> None:
    # The previous release is the one the operator means; an older one is never taken instead.
    path = kept(three) / "2" / MANIFEST
    path.write_bytes(path.read_bytes().replace(b'"entries": ', b'"entries": 1', 1))
    _refused(three, [], 5, "/releases/2/MANIFEST.json.sig: signature does not verify")


def test_rollback_of_a_kept_release_with_an_extra_file_is_refused(three: Cluster) -> None:
    (kept(three) / "2" / "senders").write_text("x@example-1.org x\n")
    _refused(three, ["2"], 5, "unexpected file(s) not named by the manifest: senders")


def test_rollback_with_nothing_installed_is_refused(tmp_path: Path) -> None:
    c = make_cluster(tmp_path / "c", f"sqlite:///{tmp_path / 'central.db'}")
    p = c.cli("rollback")
    assert p.returncode == 2
    assert "channel mx: nothing is installed in" in p.stderr
    assert not c.target.exists()


def test_an_expired_kept_release_is_never_installed(tmp_path: Path) -> None:
    c = make_cluster(tmp_path / "c", f"sqlite:///{tmp_path / 'central.db'}")
    # Long enough for the pull to install it on a busy machine; the test waits it out below.
    publish_expiring(c, "10s")
    c.pull()
    add_account(c, "zz-second")
    c.publish()
    c.pull()
    first = parse_manifest((kept(c) / "1" / MANIFEST).read_bytes(), "1")
    time.sleep(max(0.0, first.expires_at().timestamp() - time.time() + 0.2))
    before = tree_snapshot(c.target)
    p = c.cli("rollback")
    assert p.returncode == 5
    assert f"expired at {first.expires} (this host's clock: " in p.stderr
    assert "); not installing" in p.stderr
    assert tree_snapshot(c.target) == before
    assert lookup(c, SECOND) == "OK"


def test_rollback_skips_renewals_of_the_installed_maps(tmp_path: Path) -> None:
    c = make_cluster(tmp_path / "c", f"sqlite:///{tmp_path / 'central.db'}")
    publish_expiring(c, "30s")
    c.pull()
    add_account(c, "zz-second")
    publish_expiring(c, "30s")
    c.pull()
    second = parse_manifest((kept(c) / "2" / MANIFEST).read_bytes(), "2")
    # Renewed once half the lifetime has passed: serial 3, the same maps as serial 2. (A
    # lifetime long enough that serial 1, published a few seconds earlier on a slow machine,
    # has not expired by the rollback.)
    time.sleep(max(0.0, second.created_at().timestamp() + 15.2 - time.time()))
    assert "renewed serial 3" in publish_expiring(c, "30s").stdout
    assert "serial 3 renews 2" in c.pull().stdout
    p = c.cli("rollback")
    assert p.returncode == 0, p.stderr
    assert "rolled back to serial 1 (was 3)" in p.stdout
    assert lookup(c, SECOND) is None


# -- history and diff of the kept releases ------------------------------------------------------


def test_history_and_diff_read_the_kept_releases_with_agent(three: Cluster) -> None:
    three.cli("rollback", check=True)
    # The repository moves on; the node's own view does not.
    (three.repo / "mx" / "releases" / "1" / "recipients").unlink()
    hist = json.loads(three.cli("history", "--agent", "--json", check=True).stdout)["mx"]
    assert [h["serial"] for h in hist] == [1, 2, 3]
    assert [h["installed"] for h in hist] == [False, True, False]
    assert hist[2]["changed"] == ["recipients", "virtual"] or hist[2]["changed"] == ["recipients"]
    text = three.cli("history", "--agent", check=True).stdout
    assert "channel mx: (kept on this node)" in text
    assert "<- installed" in text

    out = three.cli("diff", "--agent", "1", "3", "--keys", check=True).stdout
    assert f"  + {SECOND}" in out and f"  + {THIRD}" in out
    assert "domains: +0 -0 ~0" in out

    missing = three.cli("diff", "--agent", "1", "9")
    assert missing.returncode == 2
    assert "channel mx: release 9 is not kept (kept: 1, 2, 3)" in missing.stderr


# -- rollback on the publisher ------------------------------------------------------------------


def test_rollback_publisher_republishes_old_content_as_a_new_serial_and_agents_follow(
    three: Cluster,
) -> None:
    p = three.cli("rollback", "--publisher", "1")
    assert p.returncode == 0, p.stderr
    assert "channel mx: published serial 4 (previous 3)" in p.stdout
    assert "serial 4 carries the maps of serial 1" in p.stdout
    repo = three.repo / "mx"
    latest = parse_latest((repo / "LATEST").read_bytes(), "LATEST")
    assert latest.serial == 4
    old = parse_manifest((repo / "releases" / "1" / MANIFEST).read_bytes(), "1")
    new = parse_manifest((repo / "releases" / "4" / MANIFEST).read_bytes(), "4")
    assert new.previous == 3 and new.source["rollback_of"] == "1"
    assert {n: m.sha256 for n, m in new.maps.items()} == {n: m.sha256 for n, m in old.maps.items()}
    assert new.created >= old.created and new.expires > old.expires

    assert "mx: installed serial 4 (was 3)" in three.pull().stdout
    assert lookup(three, SECOND) is None and lookup(three, THIRD) is None
    assert lookup(three, OLD) == "OK"
    assert three.cli("status").returncode == 0
    hist = json.loads(three.cli("history", "--json", check=True).stdout)["mx"]
    assert [h["serial"] for h in hist] == [1, 2, 3, 4] and hist[3]["latest"]


def _publisher_refused(cluster: Cluster, args: list[str], code: int, message: str) -> None:
    before = tree_snapshot(cluster.repo)
    p = cluster.cli("rollback", "--publisher", *args)
    assert p.returncode == code, (p.stdout, p.stderr)
    assert message in p.stderr
    assert tree_snapshot(cluster.repo) == before


def test_rollback_publisher_refuses_a_serial_that_is_not_kept(three: Cluster) -> None:
    _publisher_refused(
        three, ["9"], 2, "channel mx: release 9 is not kept (kept: 1, 2, 3); nothing changed"
    )


def test_rollback_publisher_refuses_the_latest_serial(three: Cluster) -> None:
    _publisher_refused(three, ["3"], 2, "channel mx: release 3 is LATEST already")


def test_rollback_publisher_needs_a_serial(three: Cluster) -> None:
    _publisher_refused(three, [], 2, "rollback --publisher needs the SERIAL")


def test_rollback_publisher_never_signs_altered_content_again(three: Cluster) -> None:
    with open(three.repo / "mx" / "releases" / "1" / "recipients", "a") as fh:
        fh.write("evil@example-1.org OK\n")
    _publisher_refused(three, ["1"], 5, "the file was altered; nothing changed")


def test_rollback_publisher_refuses_a_release_not_signed_by_its_key(three: Cluster) -> None:
    path = three.repo / "mx" / "releases" / "1" / MANIFEST
    path.write_bytes(path.read_bytes().replace(b'"entries": ', b'"entries": 1', 1))
    _publisher_refused(three, ["1"], 5, "signature does not verify")


def _give_target_to_edge(cluster: Cluster) -> str:
    """Have the node's target hold channel edge's serial 1 (its channel renamed to edge for
    a pull, then back); returns the config naming mx."""
    add_channels(cluster, '[publisher.channels.edge]\nmaps = ["domains", "recipients"]\n')
    cluster.publish()
    config = cluster.config_path.read_text()
    cluster.config_path.write_text(
        config.replace("[agent.channels.mx]", "[agent.channels.edge]").replace(
            f'source = "{cluster.repo / "mx"}"', f'source = "{cluster.repo / "edge"}"'
        )
    )
    assert "edge: installed serial 1" in cluster.pull().stdout
    cluster.config_path.write_text(config)
    return config


def test_a_pinned_channel_whose_live_set_became_another_channels_gets_its_pinned_release_back(
    three: Cluster,
) -> None:
    """Another channel's set in the target is installed over, as on a new node, but a channel
    pinned by a rollback gets its pinned release back (from the copy kept in STATE), not
    LATEST, and stays pinned."""
    three.cli("rollback", check=True)  # serial 2 live and pinned
    _give_target_to_edge(three)

    p = three.pull()
    assert "mx: the live set is repaired: the live set was channel edge's" in p.stdout
    assert "mx: pinned to serial 2 by rollback; LATEST is 3, not installed" in p.stdout
    live = json.loads((three.target / ".mapsync" / "current" / MANIFEST).read_text())
    assert (live["channel"], live["serial"]) == ("mx", 2)
    assert lookup(three, SECOND) == "OK"
    assert lookup(three, THIRD) is None
    assert read_state(three)["pinned"] == 2
    assert three.cli("verify").returncode == 0


def test_a_pin_whose_release_is_kept_nowhere_is_lifted_when_latest_must_replace_the_live_set(
    three: Cluster,
) -> None:
    """Nothing of the channel is live and no verified copy of the pinned serial is kept: LATEST
    goes live and the pin is lifted with a warning (status must not tell of a pin on a
    release that is not live)."""
    three.cli("rollback", check=True)
    _give_target_to_edge(three)
    shutil.rmtree(kept(three))
    shutil.rmtree(three.state / "mx" / "basis")

    p = three.pull()
    assert "mx: installed serial 3" in p.stdout
    assert "the pin lifted" in p.stderr
    assert lookup(three, THIRD) == "OK"
    assert read_state(three)["pinned"] is None
    st = three.cli("status")
    assert "pinned" not in st.stdout, st.stdout


def _channel_maps(cluster: Cluster, maps: str) -> None:
    """Give the publisher's channel mx the maps ``maps`` (TOML list items)."""
    text = cluster.config_path.read_text()
    start = text.index("maps = [", text.index("[publisher.channels.mx]"))
    end = text.index("]", start) + 1
    cluster.config_path.write_text(text[:start] + f"maps = [{maps}]" + text[end:])


def test_rollback_publisher_never_publishes_a_map_the_channel_no_longer_lists(
    three: Cluster,
) -> None:
    """Password hashes put into the MX channel by mistake (serial 4) and taken out (serial 5):
    serial 4 goes with the release that drops them (tests/integration/test_secret_leftovers.py),
    so it cannot be re-published. Any other map the channel no longer lists (senders, serial 6,
    dropped in 7) is left out when its release is re-published; a map the channel lists that the
    old release lacks refuses the rollback."""
    _channel_maps(three, '"domains", "recipients", "virtual", "transport", "dovecot_users"')
    p = three.publish("--force")
    assert "a channel carries password hashes beside MX maps" in p.stderr
    assert "hashes=dovecot_users" in p.stderr
    assert (
        "dovecot_users"
        in parse_manifest((three.repo / "mx" / "releases" / "4" / MANIFEST).read_bytes(), "4").maps
    )
    _channel_maps(three, '"domains", "recipients", "virtual", "transport"')
    three.publish("--force")  # serial 5, dovecot_users dropped, serial 4 with it
    _publisher_refused(
        three, ["4"], 2, "channel mx: release 4 is not kept (kept: 1, 2, 3, 5); nothing changed"
    )

    _channel_maps(three, '"domains", "recipients", "virtual", "transport", "senders"')
    three.publish("--force")  # serial 6
    _channel_maps(three, '"domains", "recipients", "virtual", "transport"')
    three.publish("--force")  # serial 7, senders dropped
    p = three.cli("rollback", "--publisher", "6")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "maps of the old release the channel no longer lists are left out" in p.stderr
    new = parse_manifest((three.repo / "mx" / "releases" / "8" / MANIFEST).read_bytes(), "8")
    assert sorted(new.maps) == sorted(MAPS)
    assert not (three.repo / "mx" / "releases" / "8" / "senders").exists()

    _channel_maps(three, '"domains", "recipients", "virtual", "transport", "senders"')
    _publisher_refused(
        three,
        ["3"],
        2,
        "channel mx: release 3 has no map senders, which the channel lists now: re-published, "
        "it would vanish from every node; nothing changed",
    )

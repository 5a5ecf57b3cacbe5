"""A channel with mirrors: ``source = [primary, mirror, ...]``, tried in order.

A source that cannot be reached, or that serves something verification refuses (an older
serial than installed, a foreign signature, an altered map), is logged and the next one is
tried; the node records which source served it and status says so. A failure on the node
itself (the check command) is not a reason to ask another source. When every source fails,
the error names each one and the installed set keeps serving.

Mirrors are made the way an operator makes them, with ``rsync -a`` from the repository;
sources are local paths and real ``rsync --daemon`` modules on loopback ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mapsync.release import MANIFEST, SIGNATURE
from mapsync.signing import keygen, load_private, sign
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import (
    add_account,
    clone,
    lookup,
    read_state,
    tree_snapshot,
)
from tests.helpers.transport import RsyncDaemon, free_port, wire


def mirror(cluster: Cluster, name: str) -> Path:
    """A mirror of the publisher's repository as it is now (``rsync -a``, as an operator
    would sync one); returns the mirror's channel directory."""
    dest = cluster.root / name
    subprocess.run(["rsync", "-a", "--delete", f"{cluster.repo}/", f"{dest}/"], check=True)
    return dest / "mx"


def use_sources(cluster: Cluster, *sources: str | Path, extra: str = "") -> None:
    """Configure the node's channel to try ``sources`` in order."""
    cluster.write_config(extra_agent=extra)
    text = cluster.config_path.read_text()
    line = f'source = "{cluster.repo / "mx"}"'
    assert line in text
    cluster.config_path.write_text(
        text.replace(line, f"source = {json.dumps([str(s) for s in sources])}")
    )


def status(cluster: Cluster) -> tuple[int, str, dict[str, object]]:
    p = cluster.cli("status")
    channel = json.loads(cluster.cli("status", "--json").stdout)["channels"][0]
    assert isinstance(channel, dict)
    return p.returncode, p.stdout, channel


@pytest.fixture(scope="module")
def _published(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    root = tmp_path_factory.mktemp("mirrors")
    c = make_cluster(root / "c", f"sqlite:///{root / 'central.db'}")
    c.publish()
    return c


@pytest.fixture
def published(_published: Cluster, tmp_path: Path) -> Cluster:
    """Serial 1 published, nothing installed."""
    return clone(_published, tmp_path)


@pytest.fixture
def refused(tmp_path: Path) -> str:
    """An rsync:// source on a loopback port where nothing listens: connection refused."""
    return f"rsync://127.0.0.1:{free_port()}/mapsync/mx"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[RsyncDaemon]]:
    """Start rsync daemons with ``daemons.append(RsyncDaemon(...))``; all stopped afterwards."""
    started: list[RsyncDaemon] = []
    try:
        yield started
    finally:
        for d in started:
            d.stop()


# -- failing over -------------------------------------------------------------------------------


def test_a_missing_first_source_fails_over_and_status_names_the_serving_mirror(
    published: Cluster,
) -> None:
    gone = published.root / "unmounted" / "mx"
    repo = published.repo / "mx"
    use_sources(published, gone, repo)
    p = published.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "mx: installed serial 1" in p.stdout
    assert lookup(published, "postmaster@example-1.org") == "OK"
    # The log says which source failed, why, and that the next one was tried.
    assert "source failed; trying the next" in p.stderr and str(gone) in p.stderr
    assert "rsync failed" in p.stderr

    state = read_state(published)
    assert state["last_source"] == str(repo)
    failed = state["failed_sources"]
    assert isinstance(failed, dict) and list(failed) == [str(gone)]
    assert "rsync failed" in failed[str(gone)]

    code, text, channel = status(published)
    assert code == 1, text  # fresh maps, but the first source is broken: someone should look
    # 0s, or 1s on a busy machine: the status process starts after the pull's second ended
    assert re.search(rf"last good check [01]s ago from {re.escape(str(repo))}\b", text), text
    assert f"served by a later source, {repo}; {gone} failed: rsync failed" in text
    assert channel["source"] == str(repo)
    assert channel["failed_sources"] == failed
    assert channel["serial"] == 1 and channel["last_error"] is None

    # The first source is back: it serves again and status is OK.
    add_account(published, "zz-back")
    published.publish()
    gone.parent.mkdir()
    gone.symlink_to(repo)
    assert "installed serial 2 (was 1)" in published.pull().stdout
    code, text, channel = status(published)
    assert code == 0, text
    assert f"from {gone}" in text
    assert channel["source"] == str(gone) and channel["failed_sources"] is None


def test_a_refused_rsync_daemon_fails_over_to_a_working_one(
    published: Cluster, refused: str, daemons: list[RsyncDaemon]
) -> None:
    d = RsyncDaemon(published.root / "rsyncd", published.root / "mirror-a")
    daemons.append(d)
    mirror(published, "mirror-a")
    use_sources(published, refused, d.url())
    p = published.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "mx: installed serial 1" in p.stdout
    assert "Connection refused" in p.stderr and refused in p.stderr
    assert "rsync on mapsync/mx/releases/1/" in d.log.read_text()  # the mirror served it
    assert read_state(published)["last_source"] == d.url()
    assert published.cli("verify").returncode == 0
    assert "is current" in published.pull().stdout


def test_a_stale_mirror_is_passed_over_for_the_next_source(published: Cluster) -> None:
    """A mirror whose sync stopped at serial 1 while the node has serial 2: refused as a
    rollback would be, and the primary, listed after it, installs serial 3."""
    stale = mirror(published, "stale")
    add_account(published, "zz-second")
    published.publish()
    published.pull()
    third = add_account(published, "zz-third")
    published.publish()

    use_sources(published, stale, published.repo / "mx")
    p = published.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "installed serial 3 (was 2)" in p.stdout
    assert lookup(published, third) == "OK"
    failed = read_state(published)["failed_sources"]
    assert isinstance(failed, dict)
    assert "serial 1 is lower than the installed 2" in failed[str(stale)]


@pytest.mark.parametrize("damage", ["altered map", "foreign signature"])
def test_a_mirror_serving_something_unverifiable_is_passed_over(
    published: Cluster, damage: str
) -> None:
    published.pull()
    new = add_account(published, "zz-new")
    published.publish()
    bad = mirror(published, "bad") / "releases" / "2"
    if damage == "altered map":
        # A mirror of an earlier version, which carries no patches: the node fetches the text.
        shutil.rmtree(bad.parent.parent / "patches")
        data = bytearray((bad / "recipients").read_bytes())
        data[-2] ^= 0x01  # same size: only the sha256 can tell
        (bad / "recipients").write_bytes(bytes(data))
        why = "recipients: sha256"
    else:
        keygen(published.root / "intruder.key")
        intruder = load_private(published.root / "intruder.key")
        (bad / SIGNATURE).write_bytes(sign(intruder, (bad / MANIFEST).read_bytes()))
        why = "MANIFEST.json.sig"

    use_sources(published, bad.parent.parent, published.repo / "mx")
    p = published.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "installed serial 2 (was 1)" in p.stdout
    assert lookup(published, new) == "OK"
    assert published.cli("verify").returncode == 0
    failed = read_state(published)["failed_sources"]
    assert isinstance(failed, dict) and why in failed[str(bad.parent.parent)]
    # The node's own rsync basis was not blamed for the mirror's damage: it was kept and used.
    assert "discarding the local rsync basis" not in p.stderr


def test_the_rsync_basis_stays_valid_across_mirrors(
    tmp_path: Path, refused: str, daemons: list[RsyncDaemon]
) -> None:
    """Installed from a mirror, the next release from the primary still moves only the
    delta: the basis is the verified text, whoever served it."""
    c = make_cluster(
        tmp_path / "c", f"sqlite:///{tmp_path / 'central.db'}", accounts=3000, aliases=300
    )
    c.publish()
    primary = RsyncDaemon(tmp_path / "rsyncd-primary", c.repo)
    daemons.append(primary)
    secondary = RsyncDaemon(tmp_path / "rsyncd-mirror", c.root / "mirror")
    daemons.append(secondary)
    mirror(c, "mirror")
    use_sources(c, refused, secondary.url())
    full = wire(c.pull().stdout)

    add_account(c, "zz-delta")
    c.publish()
    # The same node without its basis: what serial 2 costs when nothing can be reused.
    blank = clone(c, tmp_path / "blank")
    shutil.rmtree(blank.state / "mx" / "basis")
    use_sources(blank, primary.url())
    without = wire(blank.pull().stdout)

    use_sources(c, primary.url(), secondary.url())
    p = c.pull()
    assert "installed serial 2 (was 1)" in p.stdout
    assert "discarding the local rsync basis" not in p.stderr
    assert wire(p.stdout) * 4 < without, (wire(p.stdout), without, full)
    assert lookup(c, "zz-delta@example-1.org") == "OK"


# -- when not to fail over, and when everything fails -------------------------------------------


def test_a_failing_check_does_not_ask_the_next_source(
    published: Cluster, daemons: list[RsyncDaemon]
) -> None:
    """The check judged the release, not the source: every mirror serves the same signed
    release, so asking them would only repeat the refusal."""
    d = RsyncDaemon(published.root / "rsyncd", published.root / "mirror")
    daemons.append(d)
    mirror(published, "mirror")
    use_sources(
        published,
        published.repo / "mx",
        d.url(),
        extra='check = ["postmap", "-q", "nobody@example-1.org", "cdb:{dir}/recipients"]',
    )
    p = published.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "serial 1 refused by the check command" in p.stderr
    assert "sources failed" not in p.stderr and "source failed" not in p.stderr
    assert "rsync on mapsync/mx" not in d.log.read_text()  # never contacted
    assert not (published.target / ".mapsync" / "current").exists()


def test_when_every_source_fails_the_error_names_each_and_the_old_set_serves(
    published: Cluster, refused: str
) -> None:
    stale = mirror(published, "stale")
    add_account(published, "zz-second")
    published.publish()
    published.pull()
    before = tree_snapshot(published.target)
    last_success = read_state(published)["last_success"]
    gone = published.root / "unmounted" / "mx"

    use_sources(published, gone, refused, stale)
    p = published.cli("pull")
    assert p.returncode == 5, p.stdout + p.stderr  # one source served a refused release
    head = f"channel mx: all 3 sources failed ({gone}, {refused}, {stale}); "
    assert f"mapsync: {head}the installed set keeps serving" in p.stderr
    assert f"\n  {gone}: rsync failed" in p.stderr
    assert f"\n  {refused}: rsync failed" in p.stderr and "Connection refused" in p.stderr
    assert f"\n  {stale}: {stale}/LATEST: serial 1 is lower than the installed 2" in p.stderr
    assert tree_snapshot(published.target) == before
    assert lookup(published, "zz-second@example-1.org") == "OK"

    state = read_state(published)
    assert state["last_success"] == last_success
    assert str(state["last_error"]).startswith(head)
    code, text, channel = status(published)
    assert code == 1, text
    assert f"last run failed: {head}the installed set keeps serving" in text
    assert "served by a later source" not in text  # the failure is reported once, as the last error
    assert channel["serial"] == 2

    # Only unreachable sources: a transport error (exit 2), not a verification failure.
    use_sources(published, gone, refused)
    p = published.cli("pull")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "all 2 sources failed" in p.stderr


# -- a broken or hostile LATEST -----------------------------------------------------------------


def _break_latest(channel: Path, how: str) -> None:
    """Make ``channel``'s LATEST something rsync (without -l/-D, with --max-size) skips."""
    latest = channel / "LATEST"
    good = latest.read_bytes()
    latest.unlink()
    if how == "oversized":
        latest.write_bytes(b"x" * 5000)  # over MAX_LATEST_BYTES (4096)
    elif how == "symlink":
        (channel / "LATEST.real").write_bytes(good)  # even one pointing at a good LATEST
        latest.symlink_to("LATEST.real")
    elif how == "directory":
        latest.mkdir()  # holding a file named as the node's LATEST would be: not copied
        (latest / "LATEST").write_bytes(good)
    else:
        os.mkfifo(latest)


LATEST_REFUSED = "LATEST: missing, not a regular file, or larger than 4096 bytes"


@pytest.mark.parametrize("how", ["oversized", "symlink", "fifo", "directory"])
def test_a_first_source_with_an_unusable_latest_fails_over_to_the_mirror(
    published: Cluster, how: str
) -> None:
    hostile = mirror(published, "hostile")
    _break_latest(hostile, how)
    repo = published.repo / "mx"
    use_sources(published, hostile, repo)
    p = published.cli("pull")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mx: installed serial 1" in p.stdout
    assert lookup(published, "postmaster@example-1.org") == "OK"
    state = read_state(published)
    assert state["last_source"] == str(repo)
    assert state["failed_sources"] == {str(hostile): f"{hostile}/{LATEST_REFUSED}"}
    code, text, _ = status(published)
    assert code == 1, text
    assert f"served by a later source, {repo}; {hostile} failed: {hostile}/{LATEST_REFUSED}" in text
    assert "incoming" not in text  # the message names the source, not the node's staging


@pytest.mark.parametrize("how", ["oversized", "symlink"])
def test_a_single_source_with_an_unusable_latest_is_a_verification_failure(
    published: Cluster, how: str
) -> None:
    _break_latest(published.repo / "mx", how)
    p = published.cli("pull")
    assert p.returncode == 5, p.stdout + p.stderr
    assert f"mapsync: channel mx: {published.repo / 'mx'}/{LATEST_REFUSED}\n" in p.stderr
    assert "incoming" not in p.stderr and "Errno" not in p.stderr
    assert not (published.target / ".mapsync" / "current").exists()
    assert f"{published.repo / 'mx'}/{LATEST_REFUSED}" == read_state(published)["last_error"]


def test_a_mirror_that_stopped_following_is_found_at_the_full_check(published: Cluster) -> None:
    """Every node behind a mirror that stopped following its source found itself current and
    reported OK, its release only aging. At each full check (here every second) the sources
    listed after the one that found the node current are asked too: the newer release is
    installed from them, and status is WARNING naming the mirror that is behind."""
    stale = mirror(published, "stale")
    use_sources(published, stale, published.repo / "mx")
    text = published.config_path.read_text()
    published.config_path.write_text(text.replace("[agent]\n", '[agent]\nfull_check = "1s"\n', 1))
    assert "mx: installed serial 1" in published.pull().stdout
    add_account(published, "zz-past-the-mirror")
    published.publish()  # serial 2; the mirror is not synced again

    time.sleep(1.1)
    p = published.pull()
    assert "mx: installed serial 2" in p.stdout, p.stdout + p.stderr
    assert "a source is behind the ones after it" in p.stderr
    assert lookup(published, "zz-past-the-mirror@example-1.org") == "OK"
    code, out, _ = status(published)
    assert code == 1, out
    assert f"{stale} failed: behind: it serves serial 1" in out
    # The next polls: the mirror serves a serial below the installed one; still WARNING.
    p = published.pull()
    assert "mx: serial 2 is current" in p.stdout
    code, out, _ = status(published)
    assert code == 1 and str(stale) in out, out
    mirror(published, "stale")  # the mirror follows again
    published.pull()
    assert status(published)[0] == 0

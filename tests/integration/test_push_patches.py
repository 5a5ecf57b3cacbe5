"""A push carries a release's patches, not its changed maps, to a node whose agent keeps the
text the patches are from: a one-entry change moves about a patch's bytes. For real: the
publisher pushes through a writable ``rsync --daemon`` module into the node's inbox, and the
node's agent installs from that inbox as ``mapsync agent --watch`` does (``pushed=True``),
polling the repository as its source.

The patch path is the pull's own (every rebuilt map checked against the signed manifest);
where the agent cannot apply the patches, the inbox release is refused as missing those
maps, nothing changes on the node, and the next poll of the source installs the release.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from mapsync.agent.pull import PullResult, pull
from mapsync.errors import VerificationError
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account, lookup
from tests.helpers.publisher import push_to
from tests.helpers.transport import RsyncDaemon


@pytest.fixture
def pushed_node(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[Cluster, RsyncDaemon, Path]]:
    """20,000 accounts (maps large enough that rsync's delta costs more than a patch); channel
    mx pushed through a node's rsync daemon into its inbox; the agent polls the repository and
    watches the inbox."""
    module = tmp_path / "node-inbox"
    module.mkdir()
    d = RsyncDaemon(tmp_path / "rsyncd", module, module="inbox", writable=True)
    try:
        c = make_cluster(tmp_path / "c", sqlite_url, accounts=20000, domains=50, aliases=2000)
        inbox = module / "mx"
        push_to(c, d.url())
        text = c.config_path.read_text()
        c.config_path.write_text(
            text.replace("[agent.channels.mx]\n", f'[agent.channels.mx]\ninbox = "{inbox}"\n', 1)
        )
        yield c, d, inbox
    finally:
        d.stop()


def from_inbox(c: Cluster) -> PullResult:
    """What ``mapsync agent --watch`` does when LATEST lands in the inbox."""
    cfg = c.config().need_agent()
    ch = cfg.channels["mx"]
    assert ch.inbox is not None
    return pull(cfg, replace(ch, source=str(ch.inbox), mirrors=(), password_file=None), pushed=True)


def publish(c: Cluster) -> dict[str, object]:
    """Publish; the one push's outcome."""
    doc = json.loads(c.publish("--json").stdout)
    [push] = doc["push"]
    assert push["action"] == "pushed", push
    return dict(push)


def test_a_push_carries_patches_to_an_agent_that_keeps_their_basis(
    pushed_node: tuple[Cluster, RsyncDaemon, Path],
) -> None:
    c, _d, inbox = pushed_node
    publish(c)  # serial 1: a first delivery, the text
    assert from_inbox(c).action == "installed"
    assert (inbox / "BASIS").read_text() == "1\n"  # the agent says which text it keeps

    # Serial 2 to an inbox whose agent kept serial 1's text: the patches instead of the maps.
    new = add_account(c, "zz-patched", "example-7.org")
    two = publish(c)
    manifest = json.loads((inbox / "releases/2/MANIFEST.json").read_text())
    patched = {manifest["maps"][name]["file"] for name in manifest["patches"]}
    assert "recipients" in patched
    patches = {p.name: p.stat().st_size for p in (inbox / "patches" / "2").iterdir()}
    assert set(patches) == {f"{f}.patch" for f in patched} | {"MANIFEST.json.patch"}
    assert {p.name for p in (inbox / "releases" / "2").iterdir()} == {
        "MANIFEST.json",
        "MANIFEST.json.sig",
        *(m["file"] for m in manifest["maps"].values()),
    } - patched
    # The unchanged maps are hard links to serial 1's (no bytes), the patched ones left out.
    assert (inbox / "releases/2/domains").stat().st_ino == (
        inbox / "releases/1/domains"
    ).stat().st_ino
    result = from_inbox(c)
    assert (result.action, result.serial) == ("installed", 2)
    assert lookup(c, new) == "OK"
    assert (inbox / "BASIS").read_text() == "2\n"
    # The agent completed the inbox's copy from the text it verified: the next push's basis.
    for f in patched:
        assert (inbox / "releases/2" / f).read_bytes() == (
            c.repo / "mx/releases/2" / f
        ).read_bytes()

    # The same kind of change with the text (an agent that says nothing, as before).
    (inbox / "BASIS").unlink()
    add_account(c, "zz-text", "example-7.org")
    text = publish(c)
    assert not (inbox / "patches" / "3").exists()
    assert "recipients" in {p.name for p in (inbox / "releases" / "3").iterdir()}
    assert from_inbox(c).serial == 3

    patched_bytes, text_bytes = int(str(two["bytes"])), int(str(text["bytes"]))
    recipients = (c.repo / "mx/releases/3/recipients").stat().st_size
    print(
        f"\n[push] one new account: text {text_bytes:,} B, patches {patched_bytes:,} B "
        f"(recipients text {recipients:,} B)"
    )
    # Measured: 4,598 B with the text (delta-encoded), 2,562 B with patches (20,000 accounts,
    # one map changed; four rsync sessions of ~400 B each are most of the rest).
    assert patched_bytes < text_bytes * 0.7, (patched_bytes, text_bytes)
    assert patched_bytes < sum(patches.values()) + 3_500
    assert text_bytes < 20_000  # a delta against the completed copy, not whole maps


def test_text_pushed_before_the_agent_installed_the_patched_release_is_still_a_delta(
    pushed_node: tuple[Cluster, RsyncDaemon, Path],
) -> None:
    """Serial 2 goes as patches; serial 3 is pushed before the agent installed 2 (it still
    keeps 1): the text goes, delta-encoded against the inbox's copy of 1 where 2 lacks the
    patched maps — never whole maps."""
    c, _d, inbox = pushed_node
    publish(c)
    from_inbox(c)
    add_account(c, "zz-two", "example-7.org")
    publish(c)
    assert (inbox / "patches" / "2").is_dir()
    newer = add_account(c, "zz-three", "example-7.org")
    three = publish(c)
    assert not (inbox / "patches" / "3").exists()
    assert int(str(three["bytes"])) < 20_000, three
    result = from_inbox(c)
    assert (result.action, result.serial) == ("installed", 3)
    assert lookup(c, newer) == "OK"


def test_patches_the_agent_cannot_apply_install_nothing_and_the_next_poll_does(
    pushed_node: tuple[Cluster, RsyncDaemon, Path],
) -> None:
    c, _d, inbox = pushed_node
    publish(c)
    from_inbox(c)
    assert (inbox / "BASIS").read_text() == "1\n"

    # A patch altered in the inbox: refused like a fetched one; the maps it stood for are missing.
    new = add_account(c, "zz-altered", "example-7.org")
    publish(c)
    patch = inbox / "patches" / "2" / "recipients.patch"
    data = patch.read_bytes()
    patch.write_bytes(data.replace(b"zz-altered", b"zz-altereX"))
    with pytest.raises(VerificationError, match="the push carried its patch instead"):
        from_inbox(c)
    assert lookup(c, new) is None  # serial 1 still serving
    assert "installed serial 2 (was 1)" in c.pull().stdout  # the poll: from the repository
    assert lookup(c, new) == "OK"
    assert (inbox / "BASIS").read_text() == "2\n"

    # The agent's basis lost while BASIS still names it: the push sends patches, the agent
    # cannot apply them, nothing changes, and the next poll installs the release.
    shutil.rmtree(c.state / "mx" / "basis")
    newer = add_account(c, "zz-no-basis", "example-7.org")
    publish(c)
    assert (inbox / "patches" / "3").is_dir()
    with pytest.raises(VerificationError, match="missing"):
        from_inbox(c)
    assert lookup(c, newer) is None
    assert "installed serial 3 (was 2)" in c.pull().stdout
    assert lookup(c, newer) == "OK"

"""Patches on the wire (docs/release-format.md, "Patches"): a node that holds the previous
serial fetches only each changed map's patch over a real rsync daemon, rebuilds the text and
installs exactly what a full fetch installs; a tampered patch, a node two serials behind and a
mirror each end in the same maps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, select, update

from mapsync.release import LATEST, MANIFEST, MANIFEST_PATCH, SIGNATURE, parse_manifest
from mapsync.sources import schema as t
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account, clone, delete_unreferenced_account, lookup
from tests.helpers.transport import RsyncDaemon, wire

ACCOUNTS = 20000


@pytest.fixture(scope="module")
def _big(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    root = tmp_path_factory.mktemp("patches")
    c = make_cluster(root / "c", f"sqlite:///{root / 'central.db'}", ACCOUNTS, 50, 2000)
    c.publish()
    c.pull()  # serial 1 installed: its text is the node's rsync basis
    return c


@pytest.fixture
def big(_big: Cluster, tmp_path: Path) -> Cluster:
    """20,000 accounts, serial 1 published and installed."""
    return clone(_big, tmp_path)


def _serve(c: Cluster, path: Path, where: Path) -> RsyncDaemon:
    d = RsyncDaemon(where, path)
    c.write_config(source=d.url())
    return d


def _release(c: Cluster, serial: int, repo: Path | None = None) -> Path:
    return (repo or c.repo) / "mx" / "releases" / str(serial)


def _same_as_release(c: Cluster, serial: int) -> None:
    """The live text maps are the release's files byte for byte (what a full fetch installs)."""
    release = _release(c, serial)
    manifest = parse_manifest((release / MANIFEST).read_bytes(), "test")
    for m in manifest.maps.values():
        assert (c.target / m.file).read_bytes() == (release / m.file).read_bytes(), m.file


def test_one_new_account_moves_only_the_patches(big: Cluster, tmp_path: Path) -> None:
    d = _serve(big, big.repo, tmp_path / "rsyncd")
    try:
        new = add_account(big, "zz-patch-probe", "example-7.org")
        assert "published serial 2" in big.publish().stdout
        p = big.pull()
        moved = wire(p.stdout)
        assert lookup(big, new) == "OK"
        assert "patches not used" not in p.stderr
        asked = [x.split("rsync on ")[1] for x in d.log.read_text().splitlines() if "rsync on" in x]
    finally:
        d.stop()
    # One connection: LATEST with the signature and patches of the serial after the node's,
    # the manifest's among them (asked for before LATEST says it is the one: the channel's
    # root, narrowed by a filter to them). Nothing else is fetched, so nothing is listed; the
    # manifest fetched apart, a listing or a patch fetched apart would be a second.
    assert len(asked) == 1, asked
    assert asked[0].startswith("mapsync/mx/ ")
    manifest = parse_manifest((_release(big, 2) / MANIFEST).read_bytes(), "test")
    assert set(manifest.patches) == {"recipients"}  # the one map the account changed
    assert all(p.base == 1 for p in manifest.patches.values())
    _same_as_release(big, 2)
    assert big.cli("verify").returncode == 0
    basis = big.state / "mx" / "basis"
    assert {oct(f.stat().st_mode & 0o777) for f in basis.iterdir()} == {"0o600"}
    print(f"\n[patches] one new account at {ACCOUNTS} accounts: {moved:,} B on the wire")
    assert moved <= 2048, f"{moved} bytes for one new account"  # the design's target


def test_a_changed_cdb_is_the_live_one_changed_in_place(big: Cluster, tmp_path: Path) -> None:
    """Keys added before the first and after the last, one removed, one alias's value
    changed: the node changes each changed map's live cdb in place (formats.cdbpatch) and
    installs the publisher's bytes, which Postfix reads."""
    first = add_account(big, "0000-first", "example-1.org")
    last = add_account(big, "zzzz-last", "example-7.org")
    gone = delete_unreferenced_account(big)
    engine = create_engine(big.db_url)
    with engine.begin() as conn:
        alias_id, alias = conn.execute(
            select(t.alias.c.id, t.alias.c.local_part + "@" + t.domain.c.name)
            .join(t.domain, t.domain.c.id == t.alias.c.domain_id)
            .where(t.alias.c.local_part != "")
            .order_by(t.alias.c.id)
        ).first()
        conn.execute(insert(t.alias_target).values(alias_id=alias_id, target="zz-new@example.net"))
    engine.dispose()
    assert lookup(big, gone) == "OK"
    unchanged = {f: (big.target / f).stat().st_ino for f in ("domains", "domains.cdb")}
    before = lookup(big, alias, "virtual")
    assert before is not None and "zz-new@example.net" not in before
    d = _serve(big, big.repo, tmp_path / "rsyncd")
    try:
        assert "published serial 2" in big.publish().stdout
        p = big.cli("-v", "pull", check=True)
    finally:
        d.stop()
    changed = {
        line.split("map=")[1].split()[0]
        for line in p.stderr.splitlines()
        if "cdb changed in place" in line
    }
    assert changed == {"recipients", "virtual"}, p.stderr
    assert "building it whole" not in p.stderr
    # A map the release did not change keeps its live inodes: nothing built, nothing new.
    assert {f: (big.target / f).stat().st_ino for f in unchanged} == unchanged
    assert (lookup(big, first), lookup(big, last), lookup(big, gone)) == ("OK", "OK", None)
    assert "zz-new@example.net" in (lookup(big, alias, "virtual") or "")
    manifest = parse_manifest((_release(big, 2) / MANIFEST).read_bytes(), "test")
    for m in manifest.maps.values():
        assert m.cdb is not None
        live = (big.target / m.cdb.file).read_bytes()
        assert hashlib.sha256(live).hexdigest() == m.cdb.sha256, m.cdb.file
    assert big.cli("verify").returncode == 0


def test_a_live_cdb_of_another_serial_than_the_basis_is_built_whole(
    big: Cluster, tmp_path: Path
) -> None:
    """After a rollback the live set (serial 1) is not the basis the patches apply to
    (serial 2): the text still comes from the patches, and changing the live cdb in place
    gives other bytes than the manifest's, so it is built whole from the text."""
    two = add_account(big, "zz-in-two", "example-7.org")
    big.publish()
    big.pull()
    assert big.cli("rollback", "1").returncode == 0
    assert lookup(big, two) is None
    three = add_account(big, "zz-in-three", "example-7.org")
    assert "published serial 3" in big.publish().stdout
    d = _serve(big, big.repo, tmp_path / "rsyncd")
    try:
        p = big.cli("-v", "pull", "--unpin", check=True)
    finally:
        d.stop()
    assert "installed serial 3" in p.stdout
    assert "patches not used" not in p.stderr  # the text came from the patches ...
    assert "the live cdb could not be changed in place; building it whole" in p.stderr
    assert "map=recipients" in p.stderr
    assert (lookup(big, two), lookup(big, three)) == ("OK", "OK")  # ... the cdb from the text
    assert big.cli("verify").returncode == 0


def test_the_release_directory_stays_what_earlier_agents_accept(big: Cluster) -> None:
    """Patches live in patches/<serial>/, beside the release: its directory still holds
    exactly the manifest's files, which is all an agent of an earlier version accepts."""
    add_account(big, "zz-old-agent", "example-7.org")
    big.publish()
    release = _release(big, 2)
    manifest = parse_manifest((release / MANIFEST).read_bytes(), "test")
    assert manifest.patches
    assert set(os.listdir(release)) == manifest.files() | {MANIFEST, SIGNATURE}
    patches = big.repo / "mx" / "patches" / "2"
    assert sorted(os.listdir(patches)) == sorted(
        [MANIFEST_PATCH, *(p.file for p in manifest.patches.values())]
    )
    raw = json.loads((release / MANIFEST).read_bytes())
    assert raw["patches"]["recipients"]["from"] == 1
    # The first release has none, and its manifest no "patches" key at all.
    assert "patches" not in json.loads((_release(big, 1) / MANIFEST).read_bytes())


def test_a_tampered_patch_falls_back_to_the_text(big: Cluster, tmp_path: Path) -> None:
    d = _serve(big, big.repo, tmp_path / "rsyncd")
    try:
        new = add_account(big, "zz-tampered", "example-7.org")
        big.publish()
        patch = big.repo / "mx" / "patches" / "2" / "recipients.patch"
        patch.write_bytes(patch.read_bytes().replace(b"zz-tampered", b"zz-tampereX"))
        p = big.pull()
    finally:
        d.stop()
    assert "installed serial 2" in p.stdout
    assert "patches not used" in p.stderr and "the patch was altered" in p.stderr
    assert lookup(big, new) == "OK"
    _same_as_release(big, 2)


@pytest.mark.parametrize(
    ("grown", "why"),
    [
        # Asked for with LATEST (up to a manifest's 1 MiB): refused by its size and hash.
        (b"+evil@example-1.org OK\n", "sha256 or size differ from the manifest's"),
        # Past that it never crosses (rsync's --max-size), then or when asked for again.
        (b"+evil@example-1.org OK\n" * 100_000, "larger than the manifest's"),
    ],
)
def test_a_grown_patch_is_warned_about_and_the_text_fetched(
    big: Cluster, tmp_path: Path, grown: bytes, why: str
) -> None:
    """A patch longer than the manifest says is refused before it is applied: the node warns,
    as for any altered patch, rather than taking the source for one without patches."""
    d = _serve(big, big.repo, tmp_path / "rsyncd")
    try:
        new = add_account(big, "zz-grown", "example-7.org")
        big.publish()
        with open(big.repo / "mx" / "patches" / "2" / "recipients.patch", "ab") as fh:
            fh.write(grown)
        p = big.pull()
    finally:
        d.stop()
    assert "installed serial 2" in p.stdout
    (line,) = [x for x in p.stderr.splitlines() if "patches not used" in x]
    assert "[warning" in line and why in line
    assert lookup(big, new) == "OK"
    assert lookup(big, "evil@example-1.org") is None
    _same_as_release(big, 2)


def test_a_node_two_serials_behind_fetches_the_text(big: Cluster, tmp_path: Path) -> None:
    d = _serve(big, big.repo, tmp_path / "rsyncd")
    try:
        first = add_account(big, "zz-gap-one", "example-7.org")
        big.publish()
        second = add_account(big, "zz-gap-two", "example-3.org")
        assert "published serial 3" in big.publish().stdout
        p = big.pull()
    finally:
        d.stop()
    assert "installed serial 3 (was 1)" in p.stdout
    assert "patches/3" not in d.log.read_text()  # its patches are from 2: never asked for
    assert lookup(big, first) == lookup(big, second) == "OK"
    _same_as_release(big, 3)


def test_a_mirror_serves_the_patches_and_the_node_uses_them(big: Cluster, tmp_path: Path) -> None:
    new = add_account(big, "zz-mirrored", "example-7.org")
    big.publish()
    dest = tmp_path / "mirror"
    big.cli("mirror", str(big.repo), str(dest), check=True)
    assert (dest / "mx" / "patches" / "2" / "recipients.patch").is_file()
    d = _serve(big, dest, tmp_path / "rsyncd-mirror")
    try:
        p = big.pull()
    finally:
        d.stop()
    # The mirror sent the patch (its transfer log: "send HOST [IP] MODULE () FILE SIZE").
    assert "mapsync () mx/patches/2/recipients.patch" in d.log.read_text()
    assert "patches not used" not in p.stderr
    assert wire(p.stdout) < 3000
    assert lookup(big, new) == "OK"
    _same_as_release(big, 2)


def test_a_small_cluster_patches_too(tmp_path: Path, sqlite_url: str) -> None:
    """A local path source, a removal and an addition in several maps."""
    c = make_cluster(tmp_path / "c", sqlite_url)
    c.publish()
    c.pull()
    add_account(c, "zz-small", "example-2.org")
    c.publish()
    p = c.pull()
    assert "patches not used" not in p.stderr
    _same_as_release(c, 2)


def test_patches_go_with_their_release(tmp_path: Path, sqlite_url: str) -> None:
    c = make_cluster(tmp_path / "c", sqlite_url)
    c.write_config(extra_publisher="keep = 2")
    c.publish()
    for i in range(3):
        add_account(c, f"zz-keep-{i}", "example-2.org")
        c.publish()
    channel = c.repo / "mx"
    assert sorted(os.listdir(channel / "releases")) == ["3", "4"]
    assert sorted(os.listdir(channel / "patches")) == ["3", "4"]


def test_a_changed_map_without_a_patch_is_fetched_beside_the_patched_one(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A store's LMTP host moves (most of the small transport map: no patch pays) while an
    account is added (recipients: a patch): one map patched, the other fetched by rsync."""
    c = make_cluster(tmp_path / "c", sqlite_url)
    c.publish()
    c.pull()
    add_account(c, "zz-partial", "example-2.org")
    engine = create_engine(c.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                update(t.mailstore)
                .where(t.mailstore.c.name == "store-1")
                .values(lmtp_host="10.9.9.9")
            )
    finally:
        engine.dispose()
    c.publish("--force")  # half the transport map changes: past the guard
    release = _release(c, 2)
    manifest = parse_manifest((release / MANIFEST).read_bytes(), "test")
    before = parse_manifest((_release(c, 1) / MANIFEST).read_bytes(), "test")
    assert manifest.maps["transport"].sha256 != before.maps["transport"].sha256
    assert set(manifest.patches) == {"recipients"}
    p = c.pull()
    assert "installed serial 2" in p.stdout and "patches not used" not in p.stderr
    assert "10.9.9.9" in (c.target / "transport").read_text()
    _same_as_release(c, 2)


def test_a_source_without_patches_is_no_warning(big: Cluster, tmp_path: Path) -> None:
    """A mirror of an earlier version (or a push inbox) carries no patches: the node says so
    at info level and fetches the text, as before patches."""
    d = _serve(big, big.repo, tmp_path / "rsyncd")
    try:
        new = add_account(big, "zz-no-patches", "example-7.org")
        big.publish()
        shutil.rmtree(big.repo / "mx" / "patches")
        p = big.pull()
    finally:
        d.stop()
    (line,) = [x for x in p.stderr.splitlines() if "patches not used" in x]
    assert "[info" in line and "not at this source" in line
    assert "warning" not in p.stderr
    assert lookup(big, new) == "OK"
    _same_as_release(big, 2)


def test_a_file_where_the_patches_belong_stops_a_publish_before_anything_is_visible(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The operator's stray file at REPO/<channel>/patches: a release with patches is refused
    naming it, LATEST unchanged; once it is moved away, the next publish goes out."""
    c = make_cluster(tmp_path / "c", sqlite_url)
    c.publish()
    stray = c.repo / "mx" / "patches"
    stray.write_text("not a directory\n")
    latest = (c.repo / "mx" / LATEST).read_bytes()
    add_account(c, "zz-stray", "example-2.org")
    p = c.cli("publish")
    assert p.returncode != 0
    assert f"{stray}: not a directory" in p.stderr + p.stdout
    assert (c.repo / "mx" / LATEST).read_bytes() == latest
    assert sorted(os.listdir(c.repo / "mx" / "releases")) == ["1"]
    stray.unlink()
    c.publish()
    assert sorted(os.listdir(c.repo / "mx" / "releases")) == ["1", "2"]


def test_a_patch_fetch_the_agent_stopped_is_no_reason_to_fetch_the_text(
    big: Cluster, tmp_path: Path
) -> None:
    """A patch's rsync that the agent ended itself (stopping, or a push preempting the poll)
    was taken as a broken patch: a warning "patches not used; fetching the text with rsync",
    and an rsync of the text that the stopped job then ended too."""
    from structlog.testing import capture_logs

    from mapsync.agent.patching import fetch_patched
    from mapsync.errors import TransferStopped

    add_account(big, "zz-stopped", "example-7.org")
    big.publish()
    release = _release(big, 2)
    manifest = parse_manifest((release / MANIFEST).read_bytes(), "test")
    assert manifest.patches

    class Stopped:  # the source's rsync, ended by this agent's own job
        source = "rsync://publisher/mx"

        def fetch_files(self, *args: object, **kwargs: object) -> int:
            raise TransferStopped("rsync stopped: the agent is stopping")

    staging, area = tmp_path / "staging", tmp_path / "patches"
    staging.mkdir()
    with capture_logs() as logs, pytest.raises(TransferStopped):
        fetch_patched(Stopped(), manifest, big.state / "mx" / "basis", staging, area, "mx")  # type: ignore[arg-type]
    assert not [e for e in logs if "patches not used" in e["event"]], logs

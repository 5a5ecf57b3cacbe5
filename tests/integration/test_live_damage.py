"""A damaged node heals itself: a live map deleted or edited, ``current`` replaced by a
directory, a garbage live manifest, a renewal over a corrupted inode, ``target`` wiped by
config management. ``status`` says CRITICAL while Postfix cannot read a map; the next
``pull`` (or ``verify --repair``) rebuilds the set from the verified copy kept in STATE, in a
new swap with the reload hook."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import Cluster
from tests.helpers.agent import MAPS, add_account, read_state, renew
from tests.helpers.agent_damage import flip_byte_keep_stat, forget_live_record, live_file, lookup

KNOWN = "postmaster@example-1.org"


@pytest.fixture
def node(cluster: Cluster) -> Cluster:
    """serial 1 published and installed, with a reload hook that counts its runs."""
    cluster.write_config(
        extra_agent=f'reload = ["sh", "-c", "echo reload >> {cluster.root}/reloads"]'
    )
    cluster.publish()
    cluster.pull()
    assert lookup(cluster, KNOWN) == (0, "OK")
    return cluster


def reloads(c: Cluster) -> int:
    path = c.root / "reloads"
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_healthy(c: Cluster) -> None:
    assert lookup(c, KNOWN) == (0, "OK")
    v = c.cli("verify")
    assert v.returncode == 0, v.stdout + v.stderr
    st = c.cli("status")
    assert st.returncode == 0, st.stdout
    assert "Traceback" not in v.stderr + st.stderr


def test_a_deleted_live_cdb_is_critical_in_status_and_the_next_pull_restores_it(
    node: Cluster,
) -> None:
    before = reloads(node)
    other = live_file(node, "domains.cdb").stat().st_ino
    live_file(node, "recipients.cdb").unlink()
    assert lookup(node, KNOWN)[0] != 0  # Postfix cannot open the map now

    st = node.cli("status")
    assert st.returncode == 2, st.stdout
    assert st.stdout.startswith("MAPSYNC CRITICAL")
    assert f"{node.target / 'recipients.cdb'}: missing (map recipients, serial 1)" in st.stdout
    assert "`mapsync verify --repair` or the next pull restores it" in st.stdout

    p = node.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "mx: the live set is repaired" in p.stdout
    assert "mx: serial 1 is current" in p.stdout
    assert_healthy(node)
    assert reloads(node) == before + 1  # a repair is a swap: the daemons are told
    assert live_file(node, "domains.cdb").stat().st_ino != other  # fresh inodes, whole set
    state = read_state(node)
    assert state["last_repair"] and "recipients.cdb: missing" in str(state["last_damage"])
    assert "repaired" in node.cli("status").stdout


def test_a_changed_byte_in_a_live_cdb_is_found_and_verify_repair_restores_it(
    node: Cluster,
) -> None:
    cdb = live_file(node, "virtual.cdb")
    data = bytearray(cdb.read_bytes())
    data[-3] ^= 0x01
    cdb.write_bytes(bytes(data))  # same size, new mtime: the check hashes it

    st = node.cli("status")
    assert st.returncode == 2, st.stdout
    assert (
        f"{node.target / 'virtual.cdb'}: rewritten since it was installed (the same size, a new "
        "mtime) and its sha256 differs from the manifest"
    ) in st.stdout
    v = node.cli("verify")
    assert v.returncode == 5

    before = reloads(node)
    r = node.cli("verify", "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mx: repaired serial 1:" in r.stdout
    assert "mx: serial 1 verified" in r.stdout
    assert reloads(node) == before + 1
    assert_healthy(node)


def test_damage_that_keeps_size_and_mtime_is_found_by_the_cheap_check(node: Cluster) -> None:
    # A rewrite in place that puts size and mtime back still changes the inode's ctime,
    # which nobody can set: status and the next pull see it without hashing anything.
    flip_byte_keep_stat(live_file(node, "recipients"))
    st = node.cli("status")
    assert st.returncode == 2, st.stdout
    assert (
        "rewritten since it was installed (the same size, the same mtime, a new ctime)" in st.stdout
    )
    p = node.cli("pull")
    assert p.returncode == 0, p.stderr
    assert_healthy(node)


def test_damage_no_cheap_check_sees_is_found_by_the_full_check(node: Cluster) -> None:
    node.write_config(extra_agent=f'reload = ["sh", "-c", "echo reload >> {node.root}/reloads"]')
    text = node.config_path.read_text().replace("[agent]\n", '[agent]\nfull_check = "0s"\n', 1)
    node.config_path.write_text(text)
    flip_byte_keep_stat(live_file(node, "recipients"))
    forget_live_record(node)  # as if installed by a mapsync that kept no record
    assert node.cli("status").returncode == 0  # status only makes the cheap check
    p = node.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "sha256 differs from the manifest (map recipients, serial 1)" in p.stdout
    assert_healthy(node)


def test_a_renewal_never_hard_links_a_corrupted_inode_into_the_new_set(node: Cluster) -> None:
    # Damage no cheap check sees (no record of the live files), and no full check is due
    # (full_check 1h by default).
    bad = live_file(node, "transport.cdb")
    flip_byte_keep_stat(bad)
    forget_live_record(node)
    bad_inode = bad.stat().st_ino
    assert node.cli("status").returncode == 0
    renew(node)
    before = reloads(node)
    p = node.cli("pull")
    assert p.returncode == 0, p.stderr
    v = node.cli("verify")
    assert v.returncode == 0, v.stdout + v.stderr  # the damage did not come forward
    assert live_file(node, "transport.cdb").stat().st_ino != bad_inode
    assert reloads(node) == before + 1  # the rebuilt map is a real swap
    assert_healthy(node)


def test_a_current_link_replaced_by_a_directory_is_repaired(node: Cluster) -> None:
    sets = node.target / ".mapsync"
    real = sets / os.readlink(sets / "current")
    (sets / "current").unlink()
    shutil.copytree(real, sets / "current")  # what `cp -r` or a restore leaves
    (sets / "current" / "domains.cdb").unlink()
    shutil.rmtree(real)

    st = node.cli("status")
    assert st.returncode == 2, st.stdout
    assert "current: is a directory, not mapsync's link to the live set" in st.stdout
    p = node.cli("pull")
    assert p.returncode == 0, p.stderr
    assert (sets / "current").is_symlink()
    assert sorted(os.listdir(sets)) == sorted([os.readlink(sets / "current"), "current"])
    assert_healthy(node)


def test_a_garbage_live_manifest_is_critical_and_repaired(node: Cluster) -> None:
    live_file(node, "MANIFEST.json").write_bytes(b"\x00garbage{")
    st = node.cli("status")
    assert st.returncode == 2, st.stdout  # not UNKNOWN: the node's maps are in doubt
    assert "live manifest unreadable" in st.stdout
    p = node.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "repaired" in p.stdout
    assert_healthy(node)


def test_a_live_map_damaged_while_nothing_is_kept_is_replaced_from_the_source(
    node: Cluster,
) -> None:
    shutil.rmtree(node.state / "mx" / "releases")
    shutil.rmtree(node.state / "mx" / "basis")
    live_file(node, "recipients.cdb").unlink()
    p = node.cli("pull")
    assert p.returncode == 0, p.stderr
    assert "installed serial 1" in p.stdout
    assert_healthy(node)


def test_a_wiped_target_is_restored_and_a_stale_mirror_is_still_refused(
    node: Cluster,
) -> None:
    """Config management recreates ``target`` empty: the floor against rollback comes from
    the node's own state, so a stale mirror serving serial 1 is refused after serial 2."""
    stale = node.root / "stale"
    shutil.copytree(node.repo / "mx", stale)  # a mirror that stopped at serial 1
    add_account(node, "zz-new")
    node.publish()
    node.pull()
    assert lookup(node, "zz-new@example-1.org") == (0, "OK")

    shutil.rmtree(node.target)
    node.target.mkdir()
    node.write_config(
        source=str(stale),
        extra_agent=f'reload = ["sh", "-c", "echo reload >> {node.root}/reloads"]',
    )
    p = node.cli("pull")
    assert p.returncode == 5, p.stdout + p.stderr
    # Refused against the set restored from the node's own copy (serial 2), not installed.
    assert "serial 1 is lower than the installed 2" in p.stderr
    # The node serves what it had, rebuilt from its verified copy, not serial 1.
    assert lookup(node, "zz-new@example-1.org") == (0, "OK")
    assert node.cli("verify").stdout.startswith("mx: serial 2 verified")


def test_the_floor_survives_a_lost_target_and_a_lost_state_file(node: Cluster) -> None:
    stale = node.root / "stale"
    shutil.copytree(node.repo / "mx", stale)
    add_account(node, "zz-new")
    node.publish()
    node.pull()
    shutil.rmtree(node.target)
    (node.state / "mx" / "state.json").unlink()
    node.write_config(source=str(stale))
    p = node.cli("pull")
    assert p.returncode == 5, p.stdout + p.stderr
    assert "serial 1 is lower than 2, the highest this node has installed" in p.stderr


def test_a_deliberate_rollback_still_works_under_the_floor(node: Cluster) -> None:
    add_account(node, "zz-new")
    node.publish()
    node.pull()
    r = node.cli("rollback", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert lookup(node, "zz-new@example-1.org")[0] == 1
    p = node.cli("pull")
    assert p.returncode == 0 and "pinned to serial 1" in p.stdout, p.stdout + p.stderr
    p = node.cli("pull", "--unpin")
    assert p.returncode == 0 and "installed serial 2" in p.stdout, p.stdout + p.stderr
    assert lookup(node, "zz-new@example-1.org") == (0, "OK")


def test_a_stray_file_in_the_live_set_is_never_linked_and_a_pull_swaps_in_a_set_without_it(
    node: Cluster,
) -> None:
    """A file dropped into ``.mapsync/current/`` (by hand, or an editor's swap file of a live
    map): it was linked into TARGET by every pull, and where the operator had a file of that
    name in TARGET, every pull then failed blaming the operator's file. Only the manifest's
    files are linked; the stray is a warning in status, an error in verify, and the next pull
    removes it (no swap: no map changed); the operator's own file stays as it was."""
    (node.target / "README").write_text("# the operator's own\n")
    live = node.target / ".mapsync" / "current"
    (live / "README").write_text("junk\n")
    (live / ".virtual.swp").write_text("swap\n")

    st = node.cli("status")
    assert st.returncode == 1, st.stdout
    assert f"stray file(s) in the live set ({live.resolve() / '.virtual.swp'}: in the live" in (
        st.stdout
    )
    v = node.cli("verify")
    assert v.returncode == 5 and "in the live set, but no file of its manifest" in v.stderr

    # The next pull removes them: no map changed, so no new set and no reload.
    before, set_dir = reloads(node), os.readlink(node.target / ".mapsync" / "current")
    p = node.pull()
    assert "mx: the live set is repaired: " in p.stdout and "stray files removed" in p.stderr
    assert os.readlink(node.target / ".mapsync" / "current") == set_dir
    assert reloads(node) == before
    assert not (live / "README").exists() and not (live / ".virtual.swp").exists()
    (live / "README").write_text("junk again\n")

    add_account(node, "after-the-stray")
    node.publish()
    p = node.cli("pull")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mx: installed serial 2" in p.stdout
    assert (node.target / "README").read_text() == "# the operator's own\n"
    assert not os.path.lexists(node.target / ".virtual.swp")
    assert sorted(os.listdir(node.target / ".mapsync" / "current")) == sorted(
        ["MANIFEST.json", "MANIFEST.json.sig", *(f for m in MAPS for f in (m, f"{m}.cdb"))]
    )
    assert lookup(node, "after-the-stray@example-1.org") == (0, "OK")
    assert_healthy(node)


def test_a_live_map_touched_but_unchanged_is_no_damage(node: Cluster) -> None:
    """`touch` on a live cdb (a backup tool restoring times): status said CRITICAL "changed
    since it was installed" while verify said all was well. The same size with another mtime
    is hashed: unchanged content is no damage (and recorded anew); changed content is."""
    cdb = live_file(node, "virtual.cdb")
    os.utime(cdb, (1_900_000_000, 1_900_000_000))
    st = node.cli("status")
    assert st.returncode == 0, st.stdout
    assert node.cli("verify").returncode == 0
    before = reloads(node)
    assert "mx: serial 1 is current" in node.pull().stdout
    assert reloads(node) == before
    # The manifest and its signature hold no hash of themselves: a touched one makes the
    # next pull a full check (the signature verified again), not a repair.
    set_dir = os.readlink(node.target / ".mapsync" / "current")
    for name in ("MANIFEST.json", "MANIFEST.json.sig"):
        os.utime(node.target / ".mapsync" / "current" / name, (1_900_000_000, 1_900_000_000))
    assert node.cli("status").returncode == 0
    assert "mx: serial 1 is current" in node.pull().stdout
    assert os.readlink(node.target / ".mapsync" / "current") == set_dir
    assert reloads(node) == before
    flip_byte_keep_stat(cdb)  # same size, its mtime put back: the record's own check
    os.utime(cdb, (1_900_000_100, 1_900_000_100))  # and then another mtime
    st = node.cli("status")
    assert st.returncode == 2 and "sha256 differs from the manifest" in st.stdout, st.stdout

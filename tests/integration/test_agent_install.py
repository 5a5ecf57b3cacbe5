"""What an install may and may not do on a node, through the real CLI, rsync and ``postmap``.

A map dropped from the publisher's channel keeps serving until the node's own config drops
it; a file the operator wrote in the target is never replaced or deleted; password hashes
are never readable by other users, not in the live set, the rsync basis nor the kept
releases; and a ``check`` command that changes the built set cannot get it installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from mapsync.release import LATEST, MANIFEST, SIGNATURE, Latest, parse_manifest
from mapsync.signing import load_private, sign
from tests.conftest import Cluster
from tests.helpers.agent import add_account, postmap_q, tree_snapshot

MX = ["domains", "recipients", "virtual", "transport"]
NO_VIRTUAL = ["domains", "recipients", "transport"]


def configure(c: Cluster, publisher_maps: list[str] = MX, agent: str = "") -> None:
    """The MX channel of the publisher carries ``publisher_maps``; ``agent`` is added to the
    node's channel."""
    c.write_config(extra_agent=agent)
    text = c.config_path.read_text()
    c.config_path.write_text(
        text.replace(f"maps = {json.dumps(MX)}", f"maps = {json.dumps(publisher_maps)}", 1)
    )


def publish(c: Cluster) -> None:
    # --force: a changed list of maps is the operator's decision here, whatever the guards say.
    c.cli("publish", "--force", check=True)


def an_alias(c: Cluster) -> str:
    """A key of the live ``virtual`` map."""
    lines = (c.target / "virtual").read_text().splitlines()
    return next(line.split(" ", 1)[0] for line in lines if line and not line.startswith("#"))


# -- a map dropped from the channel ------------------------------------------------------------


def test_a_map_dropped_from_the_channel_keeps_serving_until_the_node_drops_it(
    cluster: Cluster,
) -> None:
    cluster.publish()
    cluster.pull()
    alias = an_alias(cluster)
    assert postmap_q(alias, cluster.target / "virtual")
    configure(cluster, NO_VIRTUAL)
    publish(cluster)
    before = tree_snapshot(cluster.target)
    p = cluster.cli("pull")
    assert p.returncode == 5, p.stderr
    assert "serial 2 lacks map(s) virtual, which this node serves" in p.stderr
    assert tree_snapshot(cluster.target) == before
    assert postmap_q(alias, cluster.target / "virtual")
    st = cluster.cli("status")
    assert st.returncode == 1, st.stdout
    assert "lacks map(s) virtual" in st.stdout
    assert cluster.cli("verify").returncode == 0
    # The node's config drops it too: now the release goes in and the links go.
    configure(cluster, NO_VIRTUAL, agent=f"maps = {json.dumps(NO_VIRTUAL)}")
    assert "installed serial 2" in cluster.pull().stdout
    assert not os.path.lexists(cluster.target / "virtual")
    assert not os.path.lexists(cluster.target / "virtual.cdb")
    assert cluster.cli("status").returncode == 0


def test_a_node_that_lists_its_maps_refuses_a_release_lacking_one(cluster: Cluster) -> None:
    configure(cluster, NO_VIRTUAL, agent=f"maps = {json.dumps(MX)}")
    cluster.publish()
    p = cluster.cli("pull")
    assert p.returncode == 5, p.stderr
    assert "lacks map(s) virtual, which [agent.channels.mx] maps lists" in p.stderr
    assert not os.path.lexists(cluster.target / ".mapsync" / "current")


def test_a_signed_release_with_no_maps_is_refused(cluster: Cluster) -> None:
    cluster.publish()
    cluster.pull()
    first = cluster.repo / "mx" / "releases" / "1"
    empty = replace(parse_manifest((first / MANIFEST).read_bytes(), "1"), serial=2, maps={})
    data = empty.to_bytes()
    second = first.with_name("2")
    second.mkdir()
    (second / MANIFEST).write_bytes(data)
    key = load_private(cluster.root / "keys" / "signing.key")
    (second / SIGNATURE).write_bytes(sign(key, data))
    latest = Latest(2, hashlib.sha256(data).hexdigest()).to_bytes()
    (cluster.repo / "mx" / LATEST).write_bytes(latest)
    before = tree_snapshot(cluster.target)
    p = cluster.cli("pull")
    assert p.returncode == 5, p.stderr
    assert "serial 2 carries no maps" in p.stderr
    assert tree_snapshot(cluster.target) == before
    assert postmap_q(an_alias(cluster), cluster.target / "virtual")


def test_rollback_to_a_kept_release_lacking_a_map_follows_the_same_rule(
    cluster: Cluster,
) -> None:
    configure(cluster, NO_VIRTUAL)
    cluster.publish()
    cluster.pull()
    configure(cluster, MX)
    publish(cluster)
    assert "installed serial 2" in cluster.pull().stdout
    before = tree_snapshot(cluster.target)
    p = cluster.cli("rollback")
    assert p.returncode == 5, p.stderr
    assert "serial 1 lacks map(s) virtual, which this node serves" in p.stderr
    assert tree_snapshot(cluster.target) == before
    configure(cluster, MX, agent=f"maps = {json.dumps(NO_VIRTUAL)}")
    p = cluster.cli("rollback")
    assert p.returncode == 0, p.stderr
    assert not os.path.lexists(cluster.target / "virtual")


# -- the operator's own files in the target ----------------------------------------------------


def test_hand_written_files_in_the_target_are_never_replaced(cluster: Cluster) -> None:
    cluster.target.mkdir(parents=True)
    transport = cluster.target / "transport"
    transport.write_text("example.net smtp:[192.0.2.1]:25\n")
    theirs = cluster.root / "their-virtual"
    theirs.write_text("info@example.net someone@example.net\n")
    (cluster.target / "virtual").symlink_to(theirs)
    cluster.publish()
    before = tree_snapshot(cluster.target)
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stderr
    assert f"{transport}, {cluster.target / 'virtual'}: not a link mapsync made" in p.stderr
    assert "Traceback" not in p.stderr
    assert tree_snapshot(cluster.target) == before  # not even a .mapsync directory
    # Moved away: the next pull installs.
    transport.unlink()
    (cluster.target / "virtual").unlink()
    assert "installed serial 1" in cluster.pull().stdout


def test_a_live_link_the_operator_replaced_is_left_alone_and_named(cluster: Cluster) -> None:
    cluster.publish()
    cluster.pull()
    mine = cluster.target / "virtual"
    mine.unlink()
    mine.write_text("postmaster@example-1.org root@example.net\n")
    add_account(cluster, "zz-new")
    cluster.publish()
    before = tree_snapshot(cluster.target)
    p = cluster.cli("pull")
    assert p.returncode == 2, p.stderr
    assert f"{mine}: not a link mapsync made" in p.stderr
    assert tree_snapshot(cluster.target) == before  # serial 1 keeps serving
    assert postmap_q("zz-new@example-1.org", cluster.target / "recipients") is None
    st = cluster.cli("status")
    assert st.returncode == 1 and f"{mine}: not a link mapsync made" in st.stdout, st.stdout


def test_a_link_of_the_operator_into_the_live_set_survives_a_swap(cluster: Cluster) -> None:
    cluster.publish()
    cluster.pull()
    mine = cluster.target / "aliases-for-exim"
    mine.symlink_to(".mapsync/current/virtual")
    add_account(cluster, "zz-new")
    cluster.publish()
    assert "installed serial 2" in cluster.pull().stdout
    assert os.readlink(mine) == ".mapsync/current/virtual"


# -- password hashes on a mailstore ------------------------------------------------------------

STORE = """
[publisher.channels.store-1]
maps = ["dovecot_users"]
mailstore = "store-1"
"""


def store_node(c: Cluster, agent: str = "") -> None:
    """The node is mailstore store-1: its channel carries dovecot_users."""
    c.write_config(source=str(c.repo / "store-1"), extra_agent=agent)
    text = c.config_path.read_text().replace("[agent.channels.mx]", "[agent.channels.store-1]")
    head, rest = text.split("[agent]", 1)
    c.config_path.write_text(head + STORE + "\n[agent]" + rest)


def exposed(c: Cluster) -> list[str]:
    """Every file on the node holding password hashes that someone it is not meant for may
    read: under STATE anyone but the agent; in the target anyone but root and dovecot."""
    found = []
    for root, limit in ((c.state, 0o077), (c.target, 0o007)):
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                path = Path(dirpath) / name
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and b"{SHA512-CRYPT}" in path.read_bytes():
                    found.append(path)
                    if st.st_mode & limit:
                        return [f"{path} is {stat.S_IMODE(st.st_mode):04o}"]
    assert found, "no file with password hashes found: the test looks in the wrong place"
    return []


def test_password_hashes_are_never_readable_by_others_after_install_and_rollback(
    cluster: Cluster,
) -> None:
    store_node(cluster)
    cluster.publish()
    cluster.pull()
    assert exposed(cluster) == []
    new = add_account(cluster, "zz-new", mailstore="store-1")
    cluster.publish()
    assert "installed serial 2" in cluster.pull().stdout
    assert new in (cluster.target / "dovecot_users").read_text()
    kept = cluster.state / "store-1" / "releases"
    assert sorted(os.listdir(kept)) == ["1", "2"]
    assert exposed(cluster) == []
    p = cluster.cli("rollback")
    assert p.returncode == 0, p.stderr
    assert new not in (cluster.target / "dovecot_users").read_text()
    assert exposed(cluster) == []
    for d in (kept, kept / "1", kept / "2", cluster.state / "store-1" / "basis"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_kept_copies_an_older_mapsync_left_open_are_closed(cluster: Cluster) -> None:
    store_node(cluster)
    cluster.publish()
    cluster.pull()
    old = cluster.state / "store-1" / "releases" / "1" / "dovecot_users"
    os.chmod(old, 0o644)  # as kept before this fix
    add_account(cluster, "zz-new", mailstore="store-1")
    cluster.publish()
    cluster.pull()
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert exposed(cluster) == []


# -- a check command that changes what it checks -----------------------------------------------


@pytest.mark.parametrize(
    ("script", "victim"),
    [
        ('rm "$1/virtual.cdb"', "virtual.cdb"),
        ('echo "evil@example-1.org OK" >> "$1/recipients"', "recipients"),
        ('printf x > "$1/transport.cdb"', "transport.cdb"),
        ('chmod 0666 "$1/domains"', "domains"),
        ('echo x > "$1/sender_access"', "sender_access"),
        ('chmod 0777 "$1"', ""),
    ],
)
def test_a_check_that_changes_the_built_set_gets_nothing_installed(
    cluster: Cluster, script: str, victim: str
) -> None:
    cluster.publish()
    cluster.pull()
    new = add_account(cluster, "zz-new")
    cluster.publish()
    check = ["sh", "-c", script, "sh", "{dir}"]
    cluster.write_config(extra_agent=f"check = {json.dumps(check)}")
    before = tree_snapshot(cluster.target)
    p = cluster.cli("pull")
    assert p.returncode == 5, p.stderr
    assert "the check command changed the built set of serial 2" in p.stderr
    built = cluster.target / ".mapsync" / "2.new"
    assert f"{built / victim if victim else built}" in p.stderr
    assert tree_snapshot(cluster.target) == before
    assert postmap_q(new, cluster.target / "recipients") is None
    assert cluster.cli("status").returncode == 1
    # Without that check the release goes in, intact.
    cluster.write_config()
    assert "installed serial 2" in cluster.pull().stdout
    assert postmap_q(new, cluster.target / "recipients") == "OK"
    assert cluster.cli("verify").returncode == 0

"""A channel that stops carrying password hashes stops serving them.

A channel directory is what its nodes' credential reaches (docs/security.md): every kept
release in ``releases/`` can be fetched, not only the one LATEST names. So when a map with
hashes leaves a channel (``dovecot_users`` put into the MX channel by mistake, then taken out
with ``publish --force``; a ``secret`` map of the operator's own likewise), the releases that
still carry it are removed with the one that drops it, patches included, whatever ``keep``
says; the others stay for ``history``, ``diff`` and ``rollback --publisher``. A node that
installs the release dropping it drops its own kept copies of those releases alike.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.helpers.agent import add_account

MX_MAPS = 'maps = ["domains", "recipients", "virtual", "transport"]'
OWN = """
[publisher.maps.relay_passwords]
query = "SELECT name, 'user:' || name FROM domain"
secret = true
"""


def _set_mx_maps(cluster: Cluster, maps: str) -> None:
    text = cluster.config_path.read_text()
    start = text.index("[publisher.channels.mx]\nmaps = ")
    end = text.index("\n", start + len("[publisher.channels.mx]\n"))
    cluster.config_path.write_text(text[:start] + "[publisher.channels.mx]\n" + maps + text[end:])


def _tree(cluster: Cluster, name: str) -> list[str]:
    """Every file under the MX channel's directory named ``name`` or ``name.patch``."""
    root = cluster.repo / "mx"
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.name in (name, f"{name}.patch")
    )


@pytest.mark.parametrize("secret", ["dovecot_users", "relay_passwords"])
def test_releases_with_hashes_the_channel_dropped_are_no_longer_served(
    cluster: Cluster, secret: str
) -> None:
    if secret == "relay_passwords":
        text = cluster.config_path.read_text()
        cluster.config_path.write_text(text.replace("\n[agent]\n", f"{OWN}\n[agent]\n", 1))
    cluster.publish()  # serial 1: the MX maps alone
    cluster.pull()
    _set_mx_maps(cluster, MX_MAPS.replace('"transport"]', f'"transport", "{secret}"]'))
    cluster.publish()  # serial 2: the mistake
    add_account(cluster, "late", "example-2.org")
    cluster.publish()  # serial 3: still carrying it, with a patch of it from serial 2
    cluster.pull()
    patch = [f"patches/3/{secret}.patch"] if secret == "dovecot_users" else []
    assert _tree(cluster, secret) == sorted(
        [f"releases/2/{secret}", f"releases/3/{secret}", *patch]
    )

    _set_mx_maps(cluster, MX_MAPS)
    dropped: subprocess.CompletedProcess[str] = cluster.publish("--force")
    assert "channel mx: published serial 4" in dropped.stdout
    assert "removed a release carrying password hashes" in dropped.stderr
    assert _tree(cluster, secret) == []
    kept = sorted(int(p.name) for p in (cluster.repo / "mx" / "releases").iterdir())
    assert kept == [1, 4]  # keep = 20: only the releases with the hashes went

    # The node accepts the drop once its own maps say so; its kept copies go with it.
    assert sorted(p.name for p in (cluster.state / "mx" / "releases").iterdir()) == ["1", "3"]
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(text.replace('timeout = "30s"', f'timeout = "30s"\n{MX_MAPS}'))
    cluster.pull()
    assert sorted(p.name for p in (cluster.state / "mx" / "releases").iterdir()) == ["1", "4"]
    assert [p for p in cluster.state.rglob("*") if p.name.startswith(secret)] == []

    # Nothing to re-publish them from; the release without them still can be.
    refused = cluster.cli("rollback", "--publisher", "--channel", "mx", "2")
    assert refused.returncode == 2 and "release 2 is not kept (kept: 1, 4)" in refused.stderr
    cluster.cli("rollback", "--publisher", "--channel", "mx", "1", check=True)
    assert _tree(cluster, secret) == []


def test_a_mirror_with_keep_drops_the_releases_with_hashes_the_channel_dropped(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A mirror run as docs/scaling.md sets one up (``--keep 5``) keeps releases SOURCE no
    longer has: those the publisher removed for the hashes they carry stayed fetchable from
    the mirror by every node of the channel. The mirror drops them when LATEST moves to the
    release that drops the map, and in a run that finds LATEST already there."""
    dest = tmp_path / "mirror"

    def mirror(*args: str) -> subprocess.CompletedProcess[str]:
        return cluster.cli("mirror", str(cluster.repo), str(dest), "--keep", "5", *args)

    cluster.publish()  # serial 1: the MX maps alone
    _set_mx_maps(cluster, MX_MAPS.replace('"transport"]', '"transport", "dovecot_users"]'))
    cluster.publish()  # serial 2: the mistake
    add_account(cluster, "late", "example-2.org")
    cluster.publish()  # serial 3
    assert mirror().returncode == 0
    assert sorted(p.name for p in (dest / "mx" / "releases").iterdir()) == ["1", "2", "3"]
    for serial in ("2", "3"):
        shutil.copytree(dest / "mx" / "releases" / serial, tmp_path / "old" / serial)

    _set_mx_maps(cluster, MX_MAPS)
    cluster.publish("--force")  # serial 4 drops dovecot_users, and releases 2 and 3 with it
    p = mirror()
    assert p.returncode == 0, p.stdout + p.stderr
    assert "pruned releases 2, 3" in p.stdout, p.stdout
    assert sorted(p.name for p in (dest / "mx" / "releases").iterdir()) == ["1", "4"]
    assert [q for q in (dest / "mx").rglob("dovecot_users*")] == []

    # A run killed after LATEST moved, before its prune: the next one, LATEST unchanged,
    # drops them too.
    for serial in ("2", "3"):
        shutil.copytree(tmp_path / "old" / serial, dest / "mx" / "releases" / serial)
    p = mirror()
    assert p.stdout == "mx: serial 4 is current; pruned releases 2, 3\n", p.stdout + p.stderr
    assert sorted(p.name for p in (dest / "mx" / "releases").iterdir()) == ["1", "4"]

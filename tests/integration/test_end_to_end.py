"""The operator's story, end to end: seed, publish, pull over rsync, Postfix reads it."""

from __future__ import annotations

import json

from tests.conftest import Cluster
from tests.helpers.agent import postmap


def test_postfix_finds_seeded_addresses_in_the_maps_an_agent_installed(cluster: Cluster) -> None:
    out = cluster.publish().stdout
    assert "published serial 1" in out
    cluster.pull()
    assert postmap("postmaster@example-1.org", f"cdb:{cluster.target / 'recipients'}") == (
        0,
        "OK",
        "",
    )
    assert postmap("POSTMASTER@Example-1.ORG", f"cdb:{cluster.target / 'recipients'}")[1] == "OK"
    code, value, _ = postmap("example-1.org", f"cdb:{cluster.target / 'transport'}")
    assert (code, value) == (0, "lmtp:[10.0.1.11]:24")
    assert postmap("nobody@example-1.org", f"cdb:{cluster.target / 'recipients'}") == (1, "", "")


def test_nothing_changed_means_no_new_release(cluster: Cluster) -> None:
    cluster.publish()
    out = cluster.publish().stdout
    assert "unchanged (serial 1)" in out
    assert sorted(p.name for p in (cluster.repo / "mx" / "releases").iterdir()) == ["1"]
    assert json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"] == 1

"""Guards on value changes: a typo in a mailstore's address must not reroute a cluster's mail."""

from __future__ import annotations

import json

from sqlalchemy import create_engine, update

from mapsync.config import Guards
from mapsync.publish.plan import MapPlan, check
from mapsync.sources import schema as t
from tests.conftest import Cluster


def test_max_change_counts_changed_values_from_ten_entries_up() -> None:
    g = Guards(max_change=0.30)
    assert check(MapPlan("transport", 20, 20, 0, 0, 6), g, "mx") is None
    v = check(MapPlan("transport", 20, 20, 0, 0, 7), g, "mx")
    assert v is not None
    assert (
        v.message
        == "changes the value of 35.0% of its entries (7 of 20), more than max_change = 30%"
    )
    assert check(MapPlan("transport", 9, 9, 0, 0, 9), g, "mx") is None


def test_a_mailstore_address_typo_is_refused_with_exit_4_and_nothing_written(
    cluster: Cluster,
) -> None:
    cluster.publish()
    latest_before = (cluster.repo / "mx" / "LATEST").read_bytes()
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(
            update(t.mailstore).where(t.mailstore.c.id == 1).values(lmtp_host="10.0.1.111")
        )
    engine.dispose()

    proc = cluster.cli("publish")
    assert proc.returncode == 4
    assert "channel mx, map transport: changes the value of" in proc.stderr
    assert "max_change = 30%" in proc.stderr
    assert (cluster.repo / "mx" / "LATEST").read_bytes() == latest_before
    assert sorted(p.name for p in (cluster.repo / "mx" / "releases").iterdir()) == ["1"]

    cluster.write_config(extra_publisher='[publisher.guards.transport]\nmax_change = "100%"\n')
    out = cluster.publish().stdout
    assert "published serial 2" in out
    assert json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"] == 2

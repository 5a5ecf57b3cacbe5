"""The publisher's cheap "nothing changed" path: fast, but never trusted for long."""

from __future__ import annotations

import json
import time
from datetime import datetime

from sqlalchemy import create_engine, insert, update

from mapsync.release import parse_iso
from mapsync.sources import schema as t
from tests.conftest import Cluster
from tests.helpers.agent import unreferenced_account


def _stale_write(url: str) -> str:
    """Disable an account no alias points at, but stamp it with an old updated_at (clock skew,
    a late commit); return its address."""
    engine = create_engine(url)
    with engine.begin() as conn:
        aid, address = unreferenced_account(conn)
        conn.execute(
            update(t.account)
            .where(t.account.c.id == aid)
            .values(status="disabled", updated_at=datetime(2001, 1, 1))
        )
    engine.dispose()
    return address


def test_a_write_the_fingerprint_cannot_see_is_published_after_full_check(cluster: Cluster) -> None:
    # The trust window runs from the full check's time in checked.json; wide enough that the next
    # publish starts inside it on a busy machine, and waited out from that time, not a guess.
    cluster.write_config(extra_publisher='full_check = "5s"')
    cluster.publish()
    checked = json.loads((cluster.repo / ".private" / "mx" / "checked.json").read_text())
    window_ends = parse_iso(checked["at"]).timestamp() + 5
    address = _stale_write(cluster.db_url)
    inside = cluster.publish().stdout
    assert time.time() < window_ends, "premise: that publish ran inside the 5 s window"
    assert "unchanged (serial 1)" in inside
    time.sleep(max(0.0, window_ends + 0.1 - time.time()))
    out = cluster.publish().stdout
    assert "published serial 2" in out
    recipients = (cluster.repo / "mx" / "releases" / "2" / "recipients").read_text()
    assert f"{address} OK" not in recipients


def test_a_write_that_changes_no_map_does_not_disable_the_fast_path(cluster: Cluster) -> None:
    cluster.publish()
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(insert(t.customer).values(ext_id="X1", name="renamed later"))
    engine.dispose()
    assert "unchanged (serial 1)" in cluster.publish().stdout  # full check: maps equal
    checked = json.loads((cluster.repo / ".private" / "mx" / "checked.json").read_text())
    assert checked["serial"] == 1
    proc = cluster.cli("-v", "publish", check=True)
    assert "database unchanged since the last releases" in proc.stderr
    assert "reading snapshot" not in proc.stderr

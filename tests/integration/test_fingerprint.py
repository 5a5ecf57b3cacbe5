"""The publisher's cheap "nothing changed" path: fast, but never trusted for long."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import create_engine, insert, select, update

from mapsync.release import parse_iso
from mapsync.sources import schema as t
from mapsync.sources.builtin import BuiltinSource
from mapsync.sources.seed import init_db
from tests.conftest import Cluster
from tests.helpers import writers
from tests.helpers.agent import unreferenced_account
from tests.helpers.own_maps import run_sql


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


# --- what the fingerprint reads: indexes, never a count of every row --------------------------


def _fingerprint(url: str) -> dict[str, tuple[int, str | None]]:
    source = BuiltinSource(url)
    try:
        return source.fingerprint().tables
    finally:
        source.close()


def test_every_kind_of_write_changes_the_fingerprint(any_url: str) -> None:
    """Inserts and updates move a table's newest updated_at, deletes the deletion log (one
    row per deleted row), an expiry passing the newest passed expiry; a statement that
    changes nothing changes nothing."""
    init_db(any_url)
    run_sql(any_url, *writers.BARE_INSERTS)
    seen = [_fingerprint(any_url)]

    def changed(*sql: str) -> bool:
        if sql:
            run_sql(any_url, *sql)
        seen.append(_fingerprint(any_url))
        return seen[-1] != seen[-2]

    assert not changed()
    assert not changed("DELETE FROM alias_target WHERE target = 'nobody@nowhere.example'")
    assert changed("DELETE FROM sender_grant")
    assert changed("DELETE FROM alias_target")
    time.sleep(0.01)
    assert changed(
        "INSERT INTO alias_target (alias_id, target) SELECT id, 'x@y.example' FROM alias"
    )
    assert changed("DELETE FROM alias_target")
    assert changed("DELETE FROM alias")  # its index on expires_at goes with the row
    assert changed("DELETE FROM account")
    assert changed("DELETE FROM domain")
    assert changed("DELETE FROM mailstore")
    assert changed("DELETE FROM customer")
    deleted = [fp["mapsync_deleted"][0] for fp in seen]
    assert deleted == sorted(deleted) and deleted[-1] > deleted[0]
    # Every value is read from an index: no row count anywhere.
    assert all(count == 0 for name, (count, _) in seen[-1].items() if name != "mapsync_deleted")


def test_an_alias_expiring_changes_the_fingerprint(sqlite_url: str) -> None:
    init_db(sqlite_url)
    run_sql(sqlite_url, *writers.BARE_INSERTS)
    soon = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=1)
    run_sql(sqlite_url, f"UPDATE alias SET expires_at = '{soon.isoformat(sep=' ')}'")
    before = _fingerprint(sqlite_url)
    assert before == _fingerprint(sqlite_url)
    time.sleep(max(0.0, (soon - datetime.now(UTC).replace(tzinfo=None)).total_seconds()) + 0.1)
    after = _fingerprint(sqlite_url)
    assert after["alias_expired"] != before["alias_expired"]
    assert {k: v for k, v in after.items() if k != "alias_expired"} == {
        k: v for k, v in before.items() if k != "alias_expired"
    }


def test_the_deletion_log_is_trimmed(any_url: str) -> None:
    """SQLite's trigger keeps the newest rows; elsewhere init-db trims what the triggers add."""
    init_db(any_url)
    run_sql(any_url, *writers.BARE_INSERTS)
    engine = create_engine(any_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(t.customer),
                [{"ext_id": f"GONE-{i}", "name": "x"} for i in range(2 * t.KEEP_DELETED)],
            )
    finally:
        engine.dispose()
    run_sql(any_url, "DELETE FROM customer WHERE ext_id LIKE 'GONE-%'")  # a log row each
    newest = _fingerprint(any_url)["mapsync_deleted"][0]

    def kept() -> list[int]:
        engine = create_engine(any_url)
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(t.deleted.c.id))]
        engine.dispose()
        return ids

    if any_url.startswith("sqlite"):  # the trigger trims as it goes
        assert len(kept()) <= t.KEEP_DELETED and max(kept()) == newest
    else:  # one row per deleted row until init-db
        assert len(kept()) >= 2 * t.KEEP_DELETED
    init_db(any_url)
    ids = kept()
    assert len(ids) <= t.KEEP_DELETED and max(ids) == newest
    assert _fingerprint(any_url)["mapsync_deleted"][0] == newest


def test_a_database_without_the_deletion_log_is_counted_until_init_db(sqlite_url: str) -> None:
    writers.old_database(sqlite_url)
    old = _fingerprint(sqlite_url)
    assert "mapsync_deleted" not in old and old["account"][0] > 0  # counted, as before
    run_sql(sqlite_url, "DELETE FROM sender_grant")
    assert _fingerprint(sqlite_url) != old
    init_db(sqlite_url)
    assert _fingerprint(sqlite_url)["mapsync_deleted"] == (0, None)

"""The deletion log names every row deleted, so a publisher can read only what changed since
its last look, and says so whenever it cannot vouch for that (not upgraded, trimmed)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, event, func, insert, inspect, select, text

from mapsync.sources import schema as t
from mapsync.sources import upgrade
from mapsync.sources.builtin import make_engine
from mapsync.sources.deletion_log import deletions, entries
from mapsync.sources.seed import init_db
from tests.helpers import writers
from tests.helpers.own_maps import run_sql

Found = tuple[int, dict[str, set[int]] | None]


def _deletions(url: str, after: int) -> Found:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return deletions(conn, after)
    finally:
        engine.dispose()


def _one(url: str, sql: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


def _bare(url: str) -> tuple[int, int]:
    """A fresh database with one row in every table; the ids of its account and alias."""
    init_db(url)
    run_sql(url, *writers.BARE_INSERTS)
    return _one(url, "SELECT id FROM account"), _one(url, "SELECT id FROM alias")


def _log_rows(url: str) -> int:
    return _one(url, "SELECT count(*) FROM mapsync_deleted")


def test_each_deleted_row_is_logged_with_its_table_and_id(any_url: str) -> None:
    account, alias = _bare(any_url)
    ids = {
        name: _one(any_url, f"SELECT id FROM {name}")
        for name in ("customer", "mailstore", "domain")
    }
    mark, found = _deletions(any_url, 0)
    assert (mark, found) == (0, {})
    run_sql(any_url, "DELETE FROM sender_grant WHERE address = 'nobody@nowhere.example'")
    assert _deletions(any_url, mark) == (0, {})  # a DELETE of nothing logs nothing

    def step(*sql: str) -> dict[str, set[int]] | None:
        nonlocal mark
        run_sql(any_url, *sql)
        newest, found = _deletions(any_url, mark)
        assert newest > mark
        mark = newest
        return found

    assert step("DELETE FROM sender_grant") == {"sender_grant": {account}}
    # Two targets of one alias, one DELETE: a log row each, on every engine.
    run_sql(any_url, f"INSERT INTO alias_target (alias_id, target) VALUES ({alias}, 'b@x.example')")
    before = mark
    assert step("DELETE FROM alias_target") == {"alias_target": {alias}}
    assert mark == before + 2 and _log_rows(any_url) == 3
    assert step("DELETE FROM alias") == {"alias": {alias}}
    assert step("DELETE FROM account") == {"account": {account}}
    assert step("DELETE FROM domain") == {"domain": {ids["domain"]}}
    assert step("DELETE FROM mailstore", "DELETE FROM customer") == {
        "mailstore": {ids["mailstore"]},
        "customer": {ids["customer"]},
    }
    # From the start: everything, per table.
    newest, found = _deletions(any_url, 0)
    assert newest == mark and found == {
        "sender_grant": {account},
        "alias_target": {alias},
        "alias": {alias},
        "account": {account},
        **{name: {id_} for name, id_ in ids.items()},
    }
    assert _deletions(any_url, mark) == (mark, {})


def test_a_cascade_is_logged_where_the_engine_fires_triggers(any_url: str) -> None:
    """PostgreSQL fires the child table's trigger for an ``ON DELETE CASCADE``, and so does
    SQLite when the writer turned ``foreign_keys`` on; MariaDB never fires triggers for a
    foreign key's action, so only the alias and the account are logged there (the publisher
    takes a deleted alias or account as its targets or grants gone too)."""
    account, alias = _bare(any_url)
    dialect = create_engine(any_url).dialect.name
    on = ["PRAGMA foreign_keys=ON"] if dialect == "sqlite" else []
    run_sql(any_url, *on, "DELETE FROM alias", "DELETE FROM account")
    assert _one(any_url, "SELECT count(*) FROM alias_target") == 0  # the cascade ran
    assert _one(any_url, "SELECT count(*) FROM sender_grant") == 0
    _, found = _deletions(any_url, 0)
    if dialect in ("mysql", "mariadb"):
        assert found == {"alias": {alias}, "account": {account}}
    else:
        assert found == {
            "alias": {alias},
            "alias_target": {alias},
            "account": {account},
            "sender_grant": {account},
        }


def test_a_sqlite_writer_without_foreign_keys_leaves_the_children_unlogged(
    sqlite_url: str,
) -> None:
    """SQLite enforces foreign keys only when a connection asks (mapsync's own do not): a
    plain DELETE of an alias leaves its targets behind, and the log names the alias only."""
    account, alias = _bare(sqlite_url)
    run_sql(sqlite_url, "DELETE FROM alias", "DELETE FROM account")
    assert _one(sqlite_url, "SELECT count(*) FROM alias_target") == 1
    assert _deletions(sqlite_url, 0)[1] == {"alias": {alias}, "account": {account}}


def test_init_db_gives_an_older_log_its_row_id(any_url: str) -> None:
    account, alias = _bare(any_url)
    writers.old_deletion_log(any_url)
    run_sql(any_url, "DELETE FROM sender_grant")  # logged by the old trigger: no row id
    old = _deletions(any_url, 0)
    assert old == (1, None)  # no row_id column: cannot say which rows
    init_db(any_url)
    newest, found = _deletions(any_url, 0)
    assert (newest, found) == (1, None)  # the old row names no row
    run_sql(any_url, "DELETE FROM alias_target")
    assert _deletions(any_url, 1) == (2, {"alias_target": {alias}})
    init_db(any_url)  # idempotent: no second column, the triggers still log
    engine = create_engine(any_url)
    try:
        columns = [c["name"] for c in inspect(engine).get_columns(t.deleted.name)]
    finally:
        engine.dispose()
    assert columns.count("row_id") == 1
    run_sql(any_url, "DELETE FROM account")
    assert _deletions(any_url, 2) == (3, {"account": {account}})


def test_a_database_without_a_deletion_log_has_no_deletions(sqlite_url: str) -> None:
    writers.old_database(sqlite_url)
    assert _deletions(sqlite_url, 0) == (0, None)
    init_db(sqlite_url)
    assert _deletions(sqlite_url, 0) == (0, {})


def test_a_trimmed_log_cannot_vouch_for_what_it_lost(any_url: str) -> None:
    """SQLite's trigger keeps the newest KEEP_DELETED rows, init-db keeps as many on every
    engine: a mark that fell out of them gets None; one still inside them gets its rows."""
    init_db(any_url)
    run_sql(any_url, *writers.BARE_INSERTS)
    run_sql(any_url, "DELETE FROM sender_grant")
    mark, _ = _deletions(any_url, 0)
    engine = create_engine(any_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(t.customer),
                [{"ext_id": f"GONE-{i}", "name": "x"} for i in range(t.KEEP_DELETED + 5)],
            )
            first = conn.execute(
                select(func.min(t.customer.c.id)).where(t.customer.c.ext_id.like("GONE-%"))
            ).scalar_one()
        run_sql(any_url, "DELETE FROM customer WHERE ext_id LIKE 'GONE-%'")
    finally:
        engine.dispose()
    init_db(any_url)  # trims on PostgreSQL and MariaDB; SQLite's trigger has already
    assert _log_rows(any_url) == t.KEEP_DELETED
    newest, found = _deletions(any_url, mark)
    assert newest == mark + t.KEEP_DELETED + 5 and found is None
    # The oldest kept row is newest - KEEP_DELETED + 1: a mark just below it lost nothing.
    inside = newest - t.KEEP_DELETED
    newest, found = _deletions(any_url, inside)
    assert found is not None and len(found["customer"]) == t.KEEP_DELETED
    assert max(found["customer"]) == first + t.KEEP_DELETED + 4
    assert _deletions(any_url, inside - 1)[1] is None
    # A mark beyond the log: not the log it was read from.
    assert _deletions(any_url, newest + 1) == (newest, None)


def test_a_target_or_grant_moved_to_another_parent_logs_the_old_parent(any_url: str) -> None:
    """``UPDATE alias_target SET alias_id = ...`` takes a target from the old alias (whose
    rows carry no new updated_at): the old alias is logged as a delete of the row would log
    it; the same for ``sender_grant.account_id``. An UPDATE that keeps the parent logs
    nothing."""
    account, alias = _bare(any_url)
    run_sql(
        any_url,
        "INSERT INTO alias (domain_id, local_part) SELECT domain_id, 'other' FROM alias",
        "INSERT INTO account (domain_id, local_part) SELECT domain_id, 'bob' FROM account",
    )
    other_alias = _one(any_url, "SELECT id FROM alias WHERE local_part = 'other'")
    other_account = _one(any_url, "SELECT id FROM account WHERE local_part = 'bob'")
    run_sql(
        any_url,
        "UPDATE alias_target SET target = 'bob@bare.example'",
        "UPDATE sender_grant SET address = '@bare.example'",  # unchanged
    )
    assert _deletions(any_url, 0) == (0, {})
    run_sql(any_url, f"UPDATE alias_target SET alias_id = {other_alias}")
    assert _deletions(any_url, 0) == (1, {"alias_target": {alias}})
    run_sql(any_url, f"UPDATE sender_grant SET account_id = {other_account}")
    assert _deletions(any_url, 1) == (2, {"sender_grant": {account}})
    # Moved back, in one statement with a change of the address.
    run_sql(
        any_url,
        f"UPDATE sender_grant SET account_id = {account}, address = 'x@bare.example'",
    )
    assert _deletions(any_url, 2) == (3, {"sender_grant": {other_account}})


def test_init_db_installs_the_move_trigger_on_an_older_database(any_url: str) -> None:
    """A database an init-db before the move trigger made gets it from the next init-db."""
    _, alias = _bare(any_url)
    writers.drop_moved_triggers(any_url)
    run_sql(any_url, "INSERT INTO alias (domain_id, local_part) SELECT domain_id, 'o' FROM alias")
    other = _one(any_url, "SELECT id FROM alias WHERE local_part = 'o'")
    run_sql(any_url, f"UPDATE alias_target SET alias_id = {other}")
    assert _deletions(any_url, 0) == (0, {})  # the old database: nothing logged
    init_db(any_url)
    run_sql(any_url, f"UPDATE alias_target SET alias_id = {alias}")
    assert _deletions(any_url, 0)[1] == {"alias_target": {other}}
    init_db(any_url)  # idempotent: still one row per move
    run_sql(any_url, f"UPDATE alias_target SET alias_id = {other}")
    assert _deletions(any_url, 0)[1] == {"alias_target": {other, alias}}
    assert _log_rows(any_url) == 2


def test_a_log_whose_first_id_never_committed_still_vouches(any_url: str) -> None:
    """An id taken by a delete that rolled back (or is still in flight) leaves a gap at the
    log's start; no id above the newest less KEEP_DELETED was ever trimmed, so the log still
    vouches for what follows an older mark, and for a margin below one (``entries``)."""
    _, alias = _bare(any_url)
    run_sql(any_url, "DELETE FROM sender_grant")
    run_sql(any_url, "DELETE FROM alias_target")
    run_sql(any_url, "DELETE FROM mapsync_deleted WHERE id = 1")  # as if it never committed
    assert _deletions(any_url, 0) == (2, {"alias_target": {alias}})
    engine = create_engine(any_url)
    try:
        with engine.connect() as conn:
            assert entries(conn, 2, margin=1000) == (2, [(2, "alias_target", alias)])
            assert entries(conn, 2) == (2, [])
    finally:
        engine.dispose()


def test_init_db_again_on_mariadb_never_leaves_a_table_without_its_delete_trigger(
    mariadb_url: str,
) -> None:
    # init-db runs again (an upgrade) while the panel writes. MariaDB commits each DDL
    # statement at once: a DELETE that came between dropping a trigger and creating it anew
    # was logged nowhere, and its row stayed published until the next full check.
    account, _ = _bare(mariadb_url)
    engine = make_engine(mariadb_url)
    meanwhile: list[str] = []

    def writer(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "TRIGGER account_deleted " in statement and not meanwhile:
            meanwhile.append(statement)
            run_sql(mariadb_url, f"DELETE FROM account WHERE id = {account}")

    event.listen(engine, "before_cursor_execute", writer)
    try:
        upgrade.install(engine)
    finally:
        engine.dispose()
    assert meanwhile and _one(mariadb_url, "SELECT count(*) FROM account") == 0
    logged = "SELECT count(*) FROM mapsync_deleted WHERE table_name = 'account'"
    assert _one(mariadb_url, logged) == 1, meanwhile

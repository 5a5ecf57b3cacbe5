"""What was deleted since a publisher's last look: the rows of ``mapsync_deleted`` after an id.

The triggers of :func:`mapsync.sources.schema.delete_trigger_ddl` log every deleted row as
``(table_name, row_id)`` (:data:`~mapsync.sources.schema.LOGGED_ID`: the row's id; for
``alias_target`` the alias, for ``sender_grant`` the account, whose rows changed). A
publisher that keeps the newest id it has read can ask for only what came after it, and
falls back to reading everything whenever :func:`deletions` cannot vouch for the answer.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, inspect, select

from mapsync.sources import schema as t

Entry = tuple[int, str, int]  # (log id, table name, row id)


def deletions(conn: Connection, after: int) -> tuple[int, dict[str, set[int]] | None]:
    """The deletion log's newest id, and the ids of the rows deleted after log id ``after``
    per table: :func:`entries`, grouped (``{"account": {12, 40}, "alias_target": {7}}``;
    tables without deletions left out); None when it cannot vouch for them."""
    newest, rows = entries(conn, after)
    if rows is None:
        return newest, None
    found: dict[str, set[int]] = {}
    for _, table_name, row_id in rows:
        found.setdefault(table_name, set()).add(row_id)
    return newest, found


def entries(conn: Connection, after: int, margin: int = 0) -> tuple[int, list[Entry] | None]:
    """The deletion log's newest id, and its rows after log id ``after`` as (log id, table,
    row id), in log order (and the ``margin`` ids at or below ``after`` too, where the log
    still has them: see below), read in ``conn`` (the caller's transaction: read in the snapshot
    the publisher reads the tables in, the two agree). The newest id is the fingerprint's
    ``mapsync_deleted`` value (0 for an empty log): the next call's ``after``.

    ``None`` instead of the rows when the log cannot prove it holds every deletion after
    ``after``; the caller then reads everything:

    - no ``mapsync_deleted``, or no ``row_id`` column in it: ``init-db`` has not upgraded the
      database yet (no log: the newest id is 0);
    - a row after ``after`` has a NULL ``row_id``: logged by a trigger from before the upgrade;
    - the newest id is below ``after``: the log is not the one ``after`` was read from (a
      restored or recreated database, an emptied log);
    - rows after ``after - margin`` may have been trimmed (SQLite's trigger keeps
      :data:`~mapsync.sources.schema.KEEP_DELETED` rows, ``init-db`` trims to as many on
      every engine): both trim the ids at or below the newest then less ``KEEP_DELETED``, so
      none above the newest now less ``KEEP_DELETED`` ever went, and a log still holding a
      row at or below ``after - margin + 1`` lost nothing after it either (trimming takes
      the oldest rows). Neither true: ``None``. A gap *among* the ids is no loss:
      PostgreSQL's and MariaDB's ids skip on a rollback (SQLite's do not), and an id in
      flight (taken, not yet committed) is not seen yet. The rule errs only towards
      ``None``: a log whose first ids were skipped, once it has more than ``KEEP_DELETED``.

    What the log does not say: on MariaDB/MySQL a row deleted by ``ON DELETE CASCADE`` fires
    no trigger (its foreign-key actions never do), so deleting an alias logs the alias only,
    not its ``alias_target`` rows, and deleting an account only the account, not its
    ``sender_grant`` rows; PostgreSQL and SQLite (when the writer turned ``foreign_keys`` on)
    log both. A deleted alias or account is to be taken as its targets or grants gone too.
    And on PostgreSQL and MariaDB an id is taken when a row is logged but seen only at commit:
    a transaction that commits after this read may log ids at or below the newest returned
    (SQLite has one writer at a time: its ids commit in order); a caller that must not miss
    them reads with a margin below its mark, or relies on its periodic full read.
    """
    if after < 0 or margin < 0:
        raise ValueError(f"entries: after ({after}), margin ({margin}): 0 or more")
    log = t.deleted
    inspector = inspect(conn)
    if not inspector.has_table(log.name):
        return 0, None
    oldest, newest = conn.execute(select(func.min(log.c.id), func.max(log.c.id))).one()
    newest = int(newest or 0)
    if "row_id" not in {column["name"] for column in inspector.get_columns(log.name)}:
        return newest, None
    if newest < after:
        return newest, None
    if oldest is None:  # empty, and after is 0
        return 0, []
    start = max(0, after - margin)
    if start < int(oldest) - 1 and start < newest - t.KEEP_DELETED:
        return newest, None
    # Up to newest only: what a concurrent writer commits meanwhile comes with the next call.
    rows = conn.execute(
        select(log.c.id, log.c.table_name, log.c.row_id)
        .where(log.c.id > start, log.c.id <= newest)
        .order_by(log.c.id)
    )
    found: list[Entry] = []
    for log_id, table_name, row_id in rows:
        if row_id is None:
            return newest, None
        found.append((int(log_id), table_name, int(row_id)))
    return newest, found

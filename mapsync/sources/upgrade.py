"""``init-db`` on a database that already has mapsync's tables: what protects writers.

:func:`install` brings every table to :mod:`mapsync.sources.schema` as this version defines
it, without losing a row: the server-side defaults of the columns that have one, the trigger
that moves ``updated_at`` on an ``UPDATE`` that does not set it, the one that logs each
deleted row in ``mapsync_deleted``, and the one that logs there the old parent of an
``alias_target`` or ``sender_grant`` row an ``UPDATE`` moves to another parent (the table
and the index on ``alias.expires_at`` the fingerprint reads are made by ``create_all``, which ``init-db`` runs first; a log made before
it had ``row_id`` gets the column, ``ALTER TABLE ... ADD COLUMN`` on every engine). It is
idempotent: ``init-db`` runs it every time, on a new database too.

- PostgreSQL: ``ALTER TABLE ... ALTER COLUMN ... SET DEFAULT``; the trigger function
  ``mapsync_updated_at()`` and one trigger per table (``INSERT`` and ``UPDATE``); then every
  ``updated_at`` later than the database's UTC time is set to it (a writer that stamped local
  time before the trigger refused it: :func:`~mapsync.sources.schema.future_stamps_ddl`).
- MariaDB/MySQL: ``ALTER TABLE ... MODIFY COLUMN`` with the column's whole definition (the
  only way to give an expression default); two triggers per table (``UPDATE``, ``INSERT``),
  and the future stamps as on PostgreSQL.
- SQLite cannot change a column's default: a table whose columns lack one is rebuilt (the
  documented twelve-step way: a new table, the rows copied, the old one dropped, the new one
  renamed, its indexes created again), in one transaction, foreign keys off meanwhile.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, Table, delete, func, inspect, select
from sqlalchemy.schema import CreateColumn, CreateIndex, CreateTable

from mapsync import log
from mapsync.sources import schema as t

_log = log.get("init-db")


def install(engine: Engine) -> None:
    """Defaults and triggers on every table of mapsync's schema (the tables exist)."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        _sqlite_rebuild(engine)
    with engine.begin() as conn:
        if getattr(conn.dialect, "is_mariadb", False):  # known once connected ("mysql" before)
            dialect = "mariadb"
        _add_row_id(conn)  # before the triggers that write it
        for table in t.TABLES:
            if dialect != "sqlite":
                _set_defaults(conn, table)
            for statement in t.trigger_ddl(dialect, table):
                conn.exec_driver_sql(statement)
            for statement in t.delete_trigger_ddl(dialect, table):
                conn.exec_driver_sql(statement)
            for statement in t.moved_trigger_ddl(dialect, table):
                conn.exec_driver_sql(statement)
            for statement in t.future_stamps_ddl(dialect, table):
                moved = conn.exec_driver_sql(statement).rowcount
                if moved:
                    _log.warning(
                        "updated_at later than the database's UTC time set to it (a writer "
                        "stamped local time: write UTC, or leave updated_at to the database)",
                        table=table.name,
                        rows=moved,
                    )
        # An index create_all does not add to a table that exists already.
        t.alias_expires.create(conn, checkfirst=True)
        # The deletion log: a publisher reads only what came after its last id (PostgreSQL's
        # and MariaDB's triggers leave it to grow, one row per deleted row, until init-db runs
        # again); the same rows as SQLite's trigger keeps.
        log = t.deleted
        newest = conn.execute(select(func.max(log.c.id))).scalar()
        if newest is not None:
            conn.execute(delete(log).where(log.c.id <= newest - t.KEEP_DELETED))


def _add_row_id(conn: Connection) -> None:
    """Give a deletion log made before ``row_id`` existed the column (nullable: the rows
    already logged keep NULL there, which tells a publisher they name no row)."""
    had = {column["name"] for column in inspect(conn).get_columns(t.deleted.name)}
    if "row_id" in had:
        return
    definition = CreateColumn(t.deleted.c.row_id).compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {t.deleted.name} ADD COLUMN {definition}")
    _log.info("deletion log given its row_id column", table=t.deleted.name)


def _defaulted(table: Table) -> list[str]:
    return [c.name for c in table.columns if c.server_default is not None]


def _set_defaults(conn: Connection, table: Table) -> None:
    dialect = conn.dialect
    for name in _defaulted(table):
        column = table.c[name]
        if dialect.name == "postgresql":
            default = str(CreateColumn(column).compile(dialect=dialect)).split(" DEFAULT ", 1)[1]
            default = default.removesuffix(" NOT NULL")
            conn.exec_driver_sql(
                f"ALTER TABLE {table.name} ALTER COLUMN {name} SET DEFAULT {default}"
            )
        else:
            definition = CreateColumn(column).compile(dialect=dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table.name} MODIFY COLUMN {definition}")


def _sqlite_rebuild(engine: Engine) -> None:
    """Rebuild each table whose defaulted columns have no default in the file."""
    with engine.connect() as conn:
        stale = []
        for table in t.TABLES:
            info = conn.exec_driver_sql(f"PRAGMA table_info({table.name})").fetchall()
            defaults = {row[1]: row[4] for row in info}
            if any(defaults.get(name) is None for name in _defaulted(table)):
                stale.append((table, list(defaults)))
        if not stale:
            return
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # outside the transaction, as required
        conn.commit()
        with conn.begin():
            for table, had in stale:
                new = f"_mapsync_new_{table.name}"
                ddl = str(CreateTable(table).compile(dialect=engine.dialect)).strip()
                prefix = f"CREATE TABLE {table.name} ("
                assert ddl.startswith(prefix), ddl
                conn.exec_driver_sql(f"CREATE TABLE {new} (" + ddl[len(prefix) :])
                columns = ", ".join(c.name for c in table.columns if c.name in had)
                conn.exec_driver_sql(
                    f"INSERT INTO {new} ({columns}) SELECT {columns} FROM {table.name}"
                )
                conn.exec_driver_sql(f"DROP TABLE {table.name}")
                conn.exec_driver_sql(f"ALTER TABLE {new} RENAME TO {table.name}")
                for index in table.indexes:
                    conn.execute(CreateIndex(index))
                _log.info("table rebuilt with its server-side defaults", table=table.name)
            problems = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise RuntimeError(f"foreign keys broken by the rebuild: {problems[:5]}")
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")

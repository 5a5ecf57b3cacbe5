"""mapsync's own schema (SQLAlchemy Core).

Every table carries ``updated_at`` (microseconds) and an index on it, and a trigger logs
every deleted row in ``mapsync_deleted`` (table and id), so :meth:`BuiltinSource.fingerprint`
can tell from indexes alone whether anything changed (no row counted). What protects a
writer that bypasses SQLAlchemy (a panel, a script, ``psql``) lives in the database itself:
every column with a documented default has it server-side too (``status``, ``kind``, ports,
``active``, ``allow_*``, the timestamps in UTC), and a trigger per table moves ``updated_at``
on every ``UPDATE`` that does not set it (:func:`trigger_ddl`). ``init-db`` installs both, and
upgrades a database an earlier version made (:mod:`mapsync.sources.upgrade`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    FunctionElement,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    true,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# MySQL/MariaDB DATETIME drops fractions unless asked: a change in the same second as the
# last publish would then be invisible to the fingerprint.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

metadata = MetaData()


class utc_now(FunctionElement[datetime]):
    """The database's current time in UTC with microseconds: the server-side default of the
    timestamps, and what the triggers write (the publisher and SQLAlchemy write UTC too)."""

    type = DateTime()
    inherit_cache = True


# Per engine, as a column DEFAULT (SQLite wants an expression in parentheses): UTC whatever
# the session's time zone, with microseconds (SQLite's %f has milliseconds: padded to six
# digits, as SQLAlchemy writes them, so the newest updated_at compares as text too).
UTC_NOW = {
    "postgresql": "(clock_timestamp() AT TIME ZONE 'utc')",
    "mysql": "(UTC_TIMESTAMP(6))",
    "mariadb": "(UTC_TIMESTAMP(6))",
    "sqlite": "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')",
}


@compiles(utc_now)
def _utc_now(element: utc_now, compiler: SQLCompiler, **kw: object) -> str:
    return UTC_NOW.get(compiler.dialect.name, "CURRENT_TIMESTAMP")


# What a timestamp of PostgreSQL reads as where Python's datetime cannot hold it: 'infinity'
# and years after 9999 as the first, '-infinity' and years before 1 (BC) as the second, a day
# inside each end so a timestamptz moved to UTC stays inside too.
LATEST = datetime(9999, 12, 30)
EARLIEST = datetime(1, 1, 2)


class finite(FunctionElement[Any]):
    """A timestamp expression read as the driver gives it (no result processor: SQLite's
    text stays text), on PostgreSQL held to :data:`EARLIEST` .. :data:`LATEST`: psycopg
    refuses 'infinity', '-infinity' and years outside 1..9999 ("timestamp too large (after
    year 10K)"), which failed the whole read naming no row. Compared as timestamps in SQL,
    whatever the server's DateStyle; around an aggregate (``finite(max(column))``), the
    aggregate stays an index lookup."""

    type = String()
    inherit_cache = True


@compiles(finite)
def _finite(element: finite, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(finite, "postgresql")
def _finite_pg(element: finite, compiler: SQLCompiler, **kw: Any) -> str:
    value = compiler.process(element.clauses, **kw)
    latest, earliest = f"'{LATEST.isoformat(sep=' ')}'", f"'{EARLIEST.isoformat(sep=' ')}'"
    return (
        f"CASE WHEN {value} > {latest} THEN {latest} WHEN {value} < {earliest} THEN {earliest} "
        f"ELSE {value} END"
    )


def _updated_at() -> Column[datetime]:
    """Set on insert and on every update: by SQLAlchemy, by the database's default, and by
    the trigger of :func:`trigger_ddl` when an UPDATE leaves it as it was."""
    return Column(
        "updated_at",
        Timestamp,
        nullable=False,
        default=_now,
        onupdate=_now,
        server_default=utc_now(),
        index=True,
    )


def _stamps() -> list[Column[datetime]]:
    return [
        Column("created_at", Timestamp, nullable=False, default=_now, server_default=utc_now()),
        _updated_at(),
    ]


customer = Table(
    "customer",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ext_id", String(64), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("status", String(16), nullable=False, default="active", server_default="active"),
    *_stamps(),
    CheckConstraint("status IN ('active', 'suspended', 'closed')", name="customer_status"),
)

mailstore = Table(
    "mailstore",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("lmtp_host", String(255), nullable=False),
    Column("lmtp_port", Integer, nullable=False, default=24, server_default="24"),
    Column("imap_host", String(255), nullable=False),
    Column("imap_port", Integer, nullable=False, default=143, server_default="143"),
    Column("active", Boolean, nullable=False, default=True, server_default=true()),
    Column("accepts_new", Boolean, nullable=False, default=True, server_default=true()),
    *_stamps(),
)

domain = Table(
    "domain",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(253), nullable=False, unique=True),
    Column("name_unicode", String(253)),
    Column("customer_id", Integer, ForeignKey("customer.id")),
    Column("kind", String(8), nullable=False, default="hosted", server_default="hosted"),
    Column("target_domain_id", Integer, ForeignKey("domain.id")),
    Column("default_mailstore_id", Integer, ForeignKey("mailstore.id")),
    Column("relay_nexthop", String(255)),
    Column("status", String(16), nullable=False, default="active", server_default="active"),
    *_stamps(),
    CheckConstraint("kind IN ('hosted', 'alias', 'relay')", name="domain_kind"),
    CheckConstraint("status IN ('active', 'suspended', 'disabled')", name="domain_status"),
)

account = Table(
    "account",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("domain_id", Integer, ForeignKey("domain.id"), nullable=False),
    Column("local_part", String(64), nullable=False),
    Column("customer_id", Integer, ForeignKey("customer.id")),
    Column("password_hash", String(255)),
    Column("mailstore_id", Integer, ForeignKey("mailstore.id")),
    Column("home", String(255)),
    Column("quota_bytes", BigInteger),
    Column("status", String(16), nullable=False, default="active", server_default="active"),
    Column("allow_imap", Boolean, nullable=False, default=True, server_default=true()),
    Column("allow_pop3", Boolean, nullable=False, default=True, server_default=true()),
    Column("allow_submission", Boolean, nullable=False, default=True, server_default=true()),
    *_stamps(),
    UniqueConstraint("domain_id", "local_part", name="account_address"),
    CheckConstraint(
        "status IN ('active', 'login_disabled', 'disabled', 'moving')", name="account_status"
    ),
)

alias = Table(
    "alias",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("domain_id", Integer, ForeignKey("domain.id"), nullable=False),
    Column("local_part", String(64), nullable=False),  # '' = catch-all
    Column("active", Boolean, nullable=False, default=True, server_default=true()),
    Column("expires_at", Timestamp),
    *_stamps(),
    UniqueConstraint("domain_id", "local_part", name="alias_address"),
)

alias_target = Table(
    "alias_target",
    metadata,
    Column("alias_id", Integer, ForeignKey("alias.id", ondelete="CASCADE"), primary_key=True),
    Column("target", String(320), primary_key=True),
    _updated_at(),
)

sender_grant = Table(
    "sender_grant",
    metadata,
    Column("account_id", Integer, ForeignKey("account.id", ondelete="CASCADE"), primary_key=True),
    Column("address", String(320), primary_key=True),
    _updated_at(),
)

TABLES = (customer, mailstore, domain, account, alias, alias_target, sender_grant)

Index("account_domain", account.c.domain_id)
Index("alias_target_alias", alias_target.c.alias_id)
# The fingerprint's newest expiry that has passed: max(expires_at) below now, from the index.
alias_expires = Index("alias_expires", alias.c.expires_at)

# One row per deleted row, written by the trigger of :func:`delete_trigger_ddl`: a deletion
# moves max(id), which the fingerprint reads from the primary key instead of counting every
# table's rows (a count is a scan of millions), and ``row_id`` says which row went
# (:data:`LOGGED_ID`), so a publisher can read what changed since its last id
# (:func:`mapsync.sources.deletion_log.deletions`). SQLite's trigger keeps the newest rows only;
# on PostgreSQL and MariaDB a trigger that trimmed it would make concurrent writers wait on
# each other, so `init-db` trims it.
deleted = Table(
    "mapsync_deleted",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("table_name", String(64), nullable=False),
    # NULL in rows an older trigger logged (before init-db added the column).
    Column("row_id", BigInteger().with_variant(Integer, "sqlite")),
    sqlite_autoincrement=True,  # ids never reused: max(id) only grows
)
# Rows of mapsync_deleted SQLite's trigger and init-db keep: a publisher whose last id fell
# out of them reads everything again, so enough for the deletions of a busy interval.
KEEP_DELETED = 10_000

# What mapsync_deleted.row_id holds per table: the deleted row's id, or for the two tables
# keyed by their parent the id of the alias whose targets, the account whose grants changed.
LOGGED_ID = {
    **{table.name: "id" for table in (customer, mailstore, domain, account, alias)},
    alias_target.name: "alias_id",
    sender_grant.name: "account_id",
}


def trigger_ddl(dialect: str, table: Table) -> list[str]:
    """The statements that (re)install ``table``'s trigger: an ``UPDATE`` that leaves
    ``updated_at`` as it was gets the database's UTC time there, so the publisher's cheap
    fingerprint sees it at once; one that sets it keeps its own value, unless that is later
    than the database's UTC time.

    On PostgreSQL and MariaDB the trigger also fires on ``INSERT``, and there and on
    ``UPDATE`` a stamp in the future becomes the current UTC time: ``CURRENT_TIMESTAMP`` or
    ``NOW()`` in a session whose time zone is ahead of UTC stores local time in these columns
    (they have no time zone), and one such stamp, the table's newest for hours, would hide
    every later write from the fingerprint until the next full check. (A stamp behind, a
    session west of UTC, is kept: it delays that one write until the full check, as a late
    commit would.) SQLite has no session time zone: its ``CURRENT_TIMESTAMP`` is UTC."""
    name, trigger = table.name, f"{table.name}_updated_at"
    if dialect == "postgresql":
        now = UTC_NOW["postgresql"]
        return [
            "CREATE OR REPLACE FUNCTION mapsync_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$\n"
            "DECLARE\n"
            f"  now_utc timestamp := {now};\n"
            "BEGIN\n"
            "  IF NEW.updated_at > now_utc OR (TG_OP = 'UPDATE'\n"
            "      AND NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at) THEN\n"
            "    NEW.updated_at := now_utc;\n"
            "  END IF;\n"
            "  RETURN NEW;\n"
            "END $$",
            f"DROP TRIGGER IF EXISTS {trigger} ON {name}",
            f"CREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE ON {name} FOR EACH ROW "
            "EXECUTE FUNCTION mapsync_updated_at()",
        ]
    if dialect in ("mysql", "mariadb"):
        now = UTC_NOW["mysql"]
        inserted = f"{table.name}_inserted_at"
        return [
            *_mysql_trigger(
                dialect,
                trigger,
                f"BEFORE UPDATE ON {name} FOR EACH ROW SET NEW.updated_at = "
                f"IF(NEW.updated_at <=> OLD.updated_at OR NEW.updated_at > {now}, {now}, "
                "NEW.updated_at)",
            ),
            *_mysql_trigger(
                dialect,
                inserted,
                f"BEFORE INSERT ON {name} FOR EACH ROW SET NEW.updated_at = "
                f"IF(NEW.updated_at > {now}, {now}, NEW.updated_at)",
            ),
        ]
    if dialect == "sqlite":
        # SQLite cannot change NEW: an AFTER trigger sets the row again (it does not fire
        # itself: recursive_triggers is off, and its own UPDATE changes updated_at anyway).
        return [
            f"DROP TRIGGER IF EXISTS {trigger}",
            f"CREATE TRIGGER {trigger} AFTER UPDATE ON {name} FOR EACH ROW "
            f"WHEN NEW.updated_at IS OLD.updated_at BEGIN "
            f"UPDATE {name} SET updated_at = {UTC_NOW['sqlite']} WHERE rowid = NEW.rowid; END",
        ]
    return []


def _mysql_trigger(dialect: str, trigger: str, definition: str) -> list[str]:
    """The statements that (re)install ``trigger`` (``definition``: what follows its name) on
    MariaDB or MySQL. MariaDB replaces it in one statement: DDL commits at once there, so
    between a DROP and a CREATE a writer's DELETE went unlogged (its row stayed published
    until the next full check) and its UPDATE unstamped. MySQL has no CREATE OR REPLACE
    TRIGGER."""
    if dialect == "mariadb":
        return [f"CREATE OR REPLACE TRIGGER {trigger} {definition}"]
    return [f"DROP TRIGGER IF EXISTS {trigger}", f"CREATE TRIGGER {trigger} {definition}"]


def future_stamps_ddl(dialect: str, table: Table) -> list[str]:
    """The statement that sets every ``updated_at`` of ``table`` later than the database's
    UTC time to that time (rows a writer stamped ahead before :func:`trigger_ddl` refused
    it; ``init-db`` runs it after installing the trigger). None on SQLite (no session time
    zone)."""
    if dialect not in ("postgresql", "mysql", "mariadb"):
        return []
    now = UTC_NOW["mysql" if dialect != "postgresql" else "postgresql"]
    return [f"UPDATE {table.name} SET updated_at = {now} WHERE updated_at > {now}"]


def delete_trigger_ddl(dialect: str, table: Table) -> list[str]:
    """The statements that (re)install ``table``'s delete trigger: each deleted row adds a row
    ``(table_name, row_id)`` to ``mapsync_deleted`` (``row_id``: the column
    :data:`LOGGED_ID` names), so the fingerprint sees a deletion without counting rows and a
    publisher can tell which rows went."""
    name, trigger, log = table.name, f"{table.name}_deleted", deleted.name
    column = LOGGED_ID[name]
    if dialect == "postgresql":
        return [
            # SECURITY DEFINER: the log is written with the owner's (init-db's) rights, so a
            # writer role granted DELETE on the tables it edits needs no grant on the log; the
            # search_path is init-db's, not the writer's. One function for every table: the
            # column differs, so it is the trigger's argument, in dynamic SQL (which sees the
            # transition table too). It fires once per DELETE and logs each row that went.
            "CREATE OR REPLACE FUNCTION mapsync_deleted() RETURNS trigger LANGUAGE plpgsql "
            "SECURITY DEFINER SET search_path FROM CURRENT AS $$\n"
            "BEGIN\n"
            # (No format(): its % would be the driver's placeholder in exec_driver_sql.)
            f"  EXECUTE 'INSERT INTO {log} (table_name, row_id) SELECT $1, '\n"
            "    || quote_ident(TG_ARGV[0]) || ' FROM gone' USING TG_TABLE_NAME;\n"
            "  RETURN NULL;\n"
            "END $$",
            f"DROP TRIGGER IF EXISTS {trigger} ON {name}",
            f"CREATE TRIGGER {trigger} AFTER DELETE ON {name} REFERENCING OLD TABLE AS gone "
            f"FOR EACH STATEMENT EXECUTE FUNCTION mapsync_deleted('{column}')",
        ]
    if dialect in ("mysql", "mariadb"):
        return _mysql_trigger(
            dialect,
            trigger,
            f"AFTER DELETE ON {name} FOR EACH ROW "
            f"INSERT INTO {log} (table_name, row_id) VALUES ('{name}', OLD.{column})",
        )
    if dialect == "sqlite":  # one writer at a time: the trigger trims the log itself
        return [
            f"DROP TRIGGER IF EXISTS {trigger}",
            f"CREATE TRIGGER {trigger} AFTER DELETE ON {name} FOR EACH ROW BEGIN "
            f"INSERT INTO {log} (table_name, row_id) VALUES ('{name}', OLD.{column}); "
            f"DELETE FROM {log} WHERE id <= last_insert_rowid() - {KEEP_DELETED}; END",
        ]
    return []


# The tables whose logged column (LOGGED_ID) an UPDATE may change: a target moved to another
# alias, a grant to another account, and a row of any other table given another id (a sync
# tool renumbering rows), which is gone under its old id as if deleted.
MOVABLE = TABLES


def moved_trigger_ddl(dialect: str, table: Table) -> list[str]:
    """The statements that (re)install ``table``'s move trigger (none unless ``table`` is
    one of :data:`MOVABLE`): an ``UPDATE`` that changes the logged column (``alias_id``,
    ``account_id``; ``id`` elsewhere) logs the **old** value in ``mapsync_deleted`` exactly
    as a delete of the row would (the new parent's rows, or the row under its new id, carry
    the new ``updated_at``; the old one's lost a row, which only the log can tell)."""
    if table.name not in {m.name for m in MOVABLE}:
        return []
    name, trigger, log = table.name, f"{table.name}_moved", deleted.name
    column = LOGGED_ID[name]
    if dialect == "postgresql":
        return [
            # SECURITY DEFINER as mapsync_deleted(); per row (a statement trigger could not
            # pair an old row with its new one: the key itself may change).
            "CREATE OR REPLACE FUNCTION mapsync_moved() RETURNS trigger LANGUAGE plpgsql "
            "SECURITY DEFINER SET search_path FROM CURRENT AS $$\n"
            "BEGIN\n"
            f"  INSERT INTO {log} (table_name, row_id)\n"
            "    VALUES (TG_TABLE_NAME, (to_jsonb(OLD) ->> TG_ARGV[0])::bigint);\n"
            "  RETURN NULL;\n"
            "END $$",
            f"DROP TRIGGER IF EXISTS {trigger} ON {name}",
            f"CREATE TRIGGER {trigger} AFTER UPDATE ON {name} FOR EACH ROW "
            f"WHEN (OLD.{column} IS DISTINCT FROM NEW.{column}) "
            f"EXECUTE FUNCTION mapsync_moved('{column}')",
        ]
    if dialect in ("mysql", "mariadb"):
        return _mysql_trigger(
            dialect,
            trigger,
            f"AFTER UPDATE ON {name} FOR EACH ROW "
            f"INSERT INTO {log} (table_name, row_id) SELECT '{name}', OLD.{column} "
            f"FROM DUAL WHERE NOT (OLD.{column} <=> NEW.{column})",
        )
    if dialect == "sqlite":
        return [
            f"DROP TRIGGER IF EXISTS {trigger}",
            f"CREATE TRIGGER {trigger} AFTER UPDATE OF {column} ON {name} FOR EACH ROW "
            f"WHEN OLD.{column} IS NOT NEW.{column} BEGIN "
            f"INSERT INTO {log} (table_name, row_id) VALUES ('{name}', OLD.{column}); "
            f"DELETE FROM {log} WHERE id <= last_insert_rowid() - {KEEP_DELETED}; END",
        ]
    return []

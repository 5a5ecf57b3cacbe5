"""What a writer that bypasses SQLAlchemy sees (a panel, a script, ``psql``): plain SQL
INSERTs that leave out every defaulted column, UPDATEs that forget ``updated_at``; and a
database as an earlier mapsync's ``init-db`` made it (no server-side defaults, no triggers;
or a deletion log without ``row_id``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
    text,
)

from mapsync.sources import schema as t

# Every table, each INSERT naming only what has no default (the parents first).
BARE_INSERTS = (
    "INSERT INTO customer (ext_id, name) VALUES ('BARE-1', 'bare customer')",
    "INSERT INTO mailstore (name, lmtp_host, imap_host) VALUES ('bare-store', '10.0.9.1', '10.0.9.1')",
    "INSERT INTO domain (name, customer_id, default_mailstore_id) "
    "SELECT 'bare.example', c.id, m.id FROM customer c, mailstore m "
    "WHERE c.ext_id = 'BARE-1' AND m.name = 'bare-store'",
    "INSERT INTO account (domain_id, local_part, home, password_hash) "
    "SELECT id, 'anna', '/var/vmail/bare.example/anna', '{SHA512-CRYPT}$6$x$y' FROM domain "
    "WHERE name = 'bare.example'",
    "INSERT INTO alias (domain_id, local_part) SELECT id, 'sales' FROM domain "
    "WHERE name = 'bare.example'",
    "INSERT INTO alias_target (alias_id, target) SELECT a.id, 'anna@bare.example' FROM alias a "
    "JOIN domain d ON d.id = a.domain_id WHERE d.name = 'bare.example'",
    "INSERT INTO sender_grant (account_id, address) SELECT a.id, '@bare.example' FROM account a "
    "JOIN domain d ON d.id = a.domain_id WHERE d.name = 'bare.example'",
)


def rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order, as SQLAlchemy reads them."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                table.name: [
                    tuple(r) for r in conn.execute(select(table).order_by(*table.primary_key))
                ]
                for table in t.TABLES
            }
    finally:
        engine.dispose()


def updated_at(url: str, table: str, where: str) -> datetime:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tbl = t.metadata.tables[table]
            value = conn.execute(select(tbl.c.updated_at).where(text(where))).scalar_one()
            assert isinstance(value, datetime)
            return value
    finally:
        engine.dispose()


def old_database(url: str) -> None:
    """mapsync's tables as the versions before server-side defaults made them, with rows
    written the way those versions wrote them (SQLAlchemy filling every default)."""
    old = MetaData()
    for table in t.TABLES:
        copy = table.to_metadata(old)
        for column in copy.columns:
            column.server_default = None
    engine = create_engine(url)
    try:
        old.create_all(engine)
        with engine.begin() as conn:
            customer = conn.execute(
                insert(t.customer).values(ext_id="OLD-1", name="old")
            ).inserted_primary_key[0]
            store = conn.execute(
                insert(t.mailstore).values(
                    name="store-1", lmtp_host="10.0.1.11", imap_host="10.0.1.11"
                )
            ).inserted_primary_key[0]
            domain = conn.execute(
                insert(t.domain).values(
                    name="old.example", customer_id=customer, default_mailstore_id=store
                )
            ).inserted_primary_key[0]
            conn.execute(
                insert(t.domain).values(
                    name="old.example.net", kind="alias", target_domain_id=domain
                )
            )
            accounts = []
            for local, status in (
                ("postmaster", "active"),
                ("kim", "login_disabled"),
                ("lee", "moving"),
            ):
                accounts.append(
                    conn.execute(
                        insert(t.account).values(
                            domain_id=domain,
                            local_part=local,
                            status=status,
                            home=f"/var/vmail/old.example/{local}",
                            allow_pop3=local != "kim",
                        )
                    ).inserted_primary_key[0]
                )
            alias = conn.execute(
                insert(t.alias).values(domain_id=domain, local_part="info")
            ).inserted_primary_key[0]
            conn.execute(insert(t.alias_target).values(alias_id=alias, target="kim@old.example"))
            conn.execute(
                insert(t.sender_grant).values(account_id=accounts[0], address="@old.example")
            )
    finally:
        engine.dispose()


def _old_delete_trigger_ddl(dialect: str, name: str) -> list[str]:
    """The delete triggers of the init-db before ``row_id``: the table's name only (one row
    per statement on PostgreSQL, per row elsewhere, SQLite's trimming to 100 rows)."""
    trigger = f"{name}_deleted"
    if dialect == "postgresql":
        return [
            "CREATE OR REPLACE FUNCTION mapsync_deleted() RETURNS trigger LANGUAGE plpgsql "
            "SECURITY DEFINER SET search_path FROM CURRENT AS $$\n"
            "BEGIN\n"
            "  IF EXISTS (SELECT 1 FROM gone) THEN\n"
            "    INSERT INTO mapsync_deleted (table_name) VALUES (TG_TABLE_NAME);\n"
            "  END IF;\n"
            "  RETURN NULL;\n"
            "END $$",
            f"DROP TRIGGER IF EXISTS {trigger} ON {name}",
            f"CREATE TRIGGER {trigger} AFTER DELETE ON {name} REFERENCING OLD TABLE AS gone "
            "FOR EACH STATEMENT EXECUTE FUNCTION mapsync_deleted()",
        ]
    if dialect in ("mysql", "mariadb"):
        return [
            f"DROP TRIGGER IF EXISTS {trigger}",
            f"CREATE TRIGGER {trigger} AFTER DELETE ON {name} FOR EACH ROW "
            f"INSERT INTO mapsync_deleted (table_name) VALUES ('{name}')",
        ]
    return [
        f"DROP TRIGGER IF EXISTS {trigger}",
        f"CREATE TRIGGER {trigger} AFTER DELETE ON {name} FOR EACH ROW BEGIN "
        f"INSERT INTO mapsync_deleted (table_name) VALUES ('{name}'); "
        "DELETE FROM mapsync_deleted WHERE id <= last_insert_rowid() - 100; END",
    ]


def old_deletion_log(url: str) -> None:
    """Turn the deletion log of a database ``init-db`` made into the one the version before
    ``row_id`` made: ``mapsync_deleted(id, table_name)`` and its triggers (the rows logged so
    far are lost)."""
    old = MetaData()
    log = Table(
        t.deleted.name,
        old,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("table_name", String(64), nullable=False),
        sqlite_autoincrement=True,
    )
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            log.drop(conn)
            log.create(conn)
            for table in t.TABLES:
                for statement in _old_delete_trigger_ddl(engine.dialect.name, table.name):
                    conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def drop_moved_triggers(url: str) -> None:
    """Take away the triggers that log a moved ``alias_target``/``sender_grant`` row: the
    database as an ``init-db`` before them left it."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for table in t.MOVABLE:
                on = f" ON {table.name}" if engine.dialect.name == "postgresql" else ""
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table.name}_moved{on}")
    finally:
        engine.dispose()

"""What a writer that bypasses SQLAlchemy sees (a panel, a script, ``psql``): plain SQL
INSERTs that leave out every defaulted column, UPDATEs that forget ``updated_at``; and a
database as an earlier mapsync's ``init-db`` made it (no server-side defaults, no triggers)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import MetaData, create_engine, insert, select, text

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

"""mapsync's own schema (SQLAlchemy Core).

Every table carries ``updated_at`` (microseconds, set by SQLAlchemy on insert and update) and
an index on it, so :meth:`BuiltinSource.fingerprint` can tell cheaply whether anything changed.
Writers that bypass SQLAlchemy must set ``updated_at`` themselves (see docs/schema.md).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# MySQL/MariaDB DATETIME drops fractions unless asked: a change in the same second as the
# last publish would then be invisible to the fingerprint.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

metadata = MetaData()


def _stamps() -> list[Column[datetime]]:
    return [
        Column("created_at", Timestamp, nullable=False, default=_now),
        Column("updated_at", Timestamp, nullable=False, default=_now, onupdate=_now, index=True),
    ]


customer = Table(
    "customer",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ext_id", String(64), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("status", String(16), nullable=False, default="active"),
    *_stamps(),
    CheckConstraint("status IN ('active', 'suspended', 'closed')", name="customer_status"),
)

mailstore = Table(
    "mailstore",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("lmtp_host", String(255), nullable=False),
    Column("lmtp_port", Integer, nullable=False, default=24),
    Column("imap_host", String(255), nullable=False),
    Column("imap_port", Integer, nullable=False, default=143),
    Column("active", Boolean, nullable=False, default=True),
    Column("accepts_new", Boolean, nullable=False, default=True),
    *_stamps(),
)

domain = Table(
    "domain",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(253), nullable=False, unique=True),
    Column("name_unicode", String(253)),
    Column("customer_id", Integer, ForeignKey("customer.id")),
    Column("kind", String(8), nullable=False, default="hosted"),
    Column("target_domain_id", Integer, ForeignKey("domain.id")),
    Column("default_mailstore_id", Integer, ForeignKey("mailstore.id")),
    Column("relay_nexthop", String(255)),
    Column("status", String(16), nullable=False, default="active"),
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
    Column("status", String(16), nullable=False, default="active"),
    Column("allow_imap", Boolean, nullable=False, default=True),
    Column("allow_pop3", Boolean, nullable=False, default=True),
    Column("allow_submission", Boolean, nullable=False, default=True),
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
    Column("active", Boolean, nullable=False, default=True),
    Column("expires_at", Timestamp),
    *_stamps(),
    UniqueConstraint("domain_id", "local_part", name="alias_address"),
)

alias_target = Table(
    "alias_target",
    metadata,
    Column("alias_id", Integer, ForeignKey("alias.id", ondelete="CASCADE"), primary_key=True),
    Column("target", String(320), primary_key=True),
    Column("updated_at", Timestamp, nullable=False, default=_now, onupdate=_now, index=True),
)

sender_grant = Table(
    "sender_grant",
    metadata,
    Column("account_id", Integer, ForeignKey("account.id", ondelete="CASCADE"), primary_key=True),
    Column("address", String(320), primary_key=True),
    Column("updated_at", Timestamp, nullable=False, default=_now, onupdate=_now, index=True),
)

TABLES = (customer, mailstore, domain, account, alias, alias_target, sender_grant)

Index("account_domain", account.c.domain_id)
Index("alias_target_alias", alias_target.c.alias_id)

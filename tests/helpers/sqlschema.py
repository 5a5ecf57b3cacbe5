"""``schema = "sql"``: the query sets of docs/sql-schema.md as printed there, an iRedMail-shaped
database (its tables and columns as iRedMail's schema defines them, the few the query set
reads and their neighbours; written from the column facts, not copied) with sample data, and
a publisher config reading a database through a query set."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import create_engine, text

from mapsync.config import SqlConfig
from mapsync.sources.sql import SqlSource
from tests.conftest import Cluster
from tests.helpers import postfixadmin as pfa
from tests.helpers.config import MX_MAPS, mx_and_store

# The engines of a query set's heading → the fixture that makes a fresh database there.
ENGINES = {"MariaDB": "mariadb_url", "PostgreSQL": "pg_url"}
DOC = Path(__file__).resolve().parents[2] / "docs" / "sql-schema.md"
_BLOCK = re.compile(r"```toml\n# query set: (\S+) \(([^)]*)\)\n(.*?)```", re.S)


def query_set(name: str) -> tuple[str, list[str]]:
    """The TOML of query set ``name`` in docs/sql-schema.md, and the engines it names."""
    for found, engines, body in _BLOCK.findall(DOC.read_text()):
        if found == name:
            return body, [e.strip() for e in engines.split(",")]
    raise AssertionError(f"no query set {name!r} in {DOC}")


def write_config(root: Path, url: str, sql: str, maps: tuple[str, ...] | None = None) -> Cluster:
    """A publisher reading ``url`` with the ``[publisher.sql]`` TOML ``sql``; channels ``mx``
    (the MX maps) and ``store`` (dovecot_users of every mailstore), agents for both."""
    publisher = f'schema = "sql"\n\n{sql}\n'
    return mx_and_store(root, url, publisher, maps or MX_MAPS)


# --- iRedMail ------------------------------------------------------------------------------

IREDMAIL_DDL = [
    """CREATE TABLE domain (
        domain VARCHAR(255) NOT NULL DEFAULT '' PRIMARY KEY,
        description TEXT,
        maxquota BIGINT NOT NULL DEFAULT 0,
        transport VARCHAR(255) NOT NULL DEFAULT 'dovecot',
        backupmx SMALLINT NOT NULL DEFAULT 0,
        modified TIMESTAMP NULL,
        active SMALLINT NOT NULL DEFAULT 1)""",
    """CREATE TABLE alias_domain (
        alias_domain VARCHAR(255) NOT NULL PRIMARY KEY,
        target_domain VARCHAR(255) NOT NULL,
        active SMALLINT NOT NULL DEFAULT 1)""",
    """CREATE TABLE mailbox (
        username VARCHAR(255) NOT NULL DEFAULT '' PRIMARY KEY,
        password VARCHAR(255) NOT NULL DEFAULT '',
        name VARCHAR(255) NOT NULL DEFAULT '',
        storagebasedirectory VARCHAR(255) NOT NULL DEFAULT '',
        storagenode VARCHAR(255) NOT NULL DEFAULT '',
        maildir VARCHAR(255) NOT NULL DEFAULT '',
        quota BIGINT NOT NULL DEFAULT 0,
        domain VARCHAR(255) NOT NULL DEFAULT '',
        enabledeliver SMALLINT NOT NULL DEFAULT 1,
        enableimap SMALLINT NOT NULL DEFAULT 1,
        active SMALLINT NOT NULL DEFAULT 1)""",
    """CREATE TABLE alias (
        address VARCHAR(255) NOT NULL DEFAULT '' PRIMARY KEY,
        name VARCHAR(255) NOT NULL DEFAULT '',
        domain VARCHAR(255) NOT NULL DEFAULT '',
        active SMALLINT NOT NULL DEFAULT 1)""",
    """CREATE TABLE forwardings (
        id INTEGER PRIMARY KEY,
        address VARCHAR(255) NOT NULL DEFAULT '',
        forwarding VARCHAR(255) NOT NULL DEFAULT '',
        domain VARCHAR(255) NOT NULL DEFAULT '',
        dest_domain VARCHAR(255) NOT NULL DEFAULT '',
        is_maillist SMALLINT NOT NULL DEFAULT 0,
        is_list SMALLINT NOT NULL DEFAULT 0,
        is_forwarding SMALLINT NOT NULL DEFAULT 0,
        is_alias SMALLINT NOT NULL DEFAULT 0,
        active SMALLINT NOT NULL DEFAULT 1)""",
]
HASH = pfa.HASHES["dovecot:SHA512-CRYPT"]  # iRedMail writes {SCHEME}-prefixed hashes
# (domain, transport, backupmx, active)
IR_DOMAINS = [
    ("example.com", "dovecot", 0, 1),
    ("example.net", "dovecot", 0, 1),
    ("backup.example", "relay:[mx.backup.example]:25", 1, 1),
    ("off.example", "dovecot", 0, 0),
]
IR_ALIAS_DOMAINS = [("alias.example", "example.com", 1)]
# (username, storagenode, quota MB, active)
IR_MAILBOXES = [
    ("postmaster@example.com", "vmail1", 0, 1),
    ("alice@example.com", "vmail1", 1024, 1),
    ("bob@example.com", "vmail1", 0, 1),
    ("carl@example.com", "vmail1", 0, 0),
    ("postmaster@example.net", "vmail2", 0, 1),
    ("dave@example.net", "vmail2", 50, 1),
    ("eve@off.example", "vmail1", 0, 1),
]
IR_ALIASES = [("sales@example.com", 1), ("old@example.com", 0)]
# (address, forwarding, is_list, is_forwarding, is_alias)
IR_FORWARDINGS = [
    *((m[0], m[0], 0, 1, 0) for m in IR_MAILBOXES),  # iRedMail's row per mailbox
    ("bob@example.com", "bob@elsewhere.example", 0, 1, 0),  # forwards, keeps a copy
    ("carl@example.com", "carl@elsewhere.example", 0, 1, 0),  # an inactive mailbox's forward
    ("sales@example.com", "alice@example.com", 1, 0, 0),
    ("sales@example.com", "partner@external.example", 1, 0, 0),
    ("old@example.com", "alice@example.com", 1, 0, 0),  # its alias account is inactive
    ("info@example.com", "alice@example.com", 0, 0, 1),  # alice's own alias address
    ("example.net", "postmaster@example.net", 0, 0, 0),  # catch-all
]


def maildir(username: str) -> str:
    local, _, domain = username.partition("@")
    return f"{domain}/{local[0]}/{local}-2026.11.30.10.00.00/"


def build_iredmail(url: str) -> None:
    """iRedMail's tables (the columns the query set reads, and a few beside them) and the
    sample data, booleans as iRedMail stores them (small integers)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in IREDMAIL_DDL:
                conn.execute(text(statement))
            for d, transport, backupmx, active in IR_DOMAINS:
                conn.execute(
                    text(
                        "INSERT INTO domain (domain, transport, backupmx, active)"
                        " VALUES (:d, :t, :b, :a)"
                    ),
                    {"d": d, "t": transport, "b": backupmx, "a": active},
                )
            for alias_domain, target, active in IR_ALIAS_DOMAINS:
                conn.execute(
                    text("INSERT INTO alias_domain VALUES (:a, :t, :ac)"),
                    {"a": alias_domain, "t": target, "ac": active},
                )
            for username, node, quota, active in IR_MAILBOXES:
                conn.execute(
                    text(
                        "INSERT INTO mailbox (username, password, storagebasedirectory,"
                        " storagenode, maildir, quota, domain, active)"
                        " VALUES (:u, :p, '/var/vmail', :n, :m, :q, :d, :a)"
                    ),
                    {
                        "u": username,
                        "p": HASH,
                        "n": node,
                        "m": maildir(username),
                        "q": quota,
                        "d": username.partition("@")[2],
                        "a": active,
                    },
                )
            for address, active in IR_ALIASES:
                conn.execute(
                    text("INSERT INTO alias (address, domain, active) VALUES (:a, :d, :ac)"),
                    {"a": address, "d": address.partition("@")[2], "ac": active},
                )
            for i, (address, target, is_list, is_fwd, is_alias) in enumerate(IR_FORWARDINGS):
                conn.execute(
                    text(
                        "INSERT INTO forwardings (id, address, forwarding, domain, dest_domain,"
                        " is_list, is_forwarding, is_alias) VALUES (:i, :a, :f, :d, :dd, :l,"
                        " :fw, :al)"
                    ),
                    {
                        "i": i + 1,
                        "a": address,
                        "f": target,
                        "d": address.rpartition("@")[2],
                        "dd": target.rpartition("@")[2],
                        "l": is_list,
                        "fw": is_fwd,
                        "al": is_alias,
                    },
                )
    finally:
        engine.dispose()


class IRedMailLookups:
    """iRedMail's live Postfix and Dovecot lookups (its samples/postfix/*/ and dovecot-sql.conf
    describe them), written from that description, run against the database at ``url``.

    Postfix skips a query using ``%u`` for a key without a local part (``@domain``).
    """

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        live = "d.active = 1 AND d.backupmx = 0"
        # PostgreSQL cannot type a bare parameter inside CONCAT.
        u = "CAST(:u AS TEXT)" if self.engine.dialect.name == "postgresql" else ":u"
        self.q = {
            "domains": "SELECT domain FROM domain d WHERE domain = :s AND backupmx = 0"
            " AND active = 1 UNION SELECT a.alias_domain FROM alias_domain a, domain d"
            f" WHERE a.alias_domain = :s AND a.active = 1 AND a.target_domain = d.domain AND {live}",
            "relay_domains": "SELECT domain FROM domain WHERE domain = :s AND backupmx = 1"
            " AND active = 1",
            "virtual_alias": "SELECT f.forwarding FROM forwardings f, domain d"
            f" WHERE f.address = :s AND f.domain = d.domain AND f.active = 1 AND {live}",
            "domain_alias": "SELECT f.forwarding FROM forwardings f, alias_domain a, domain d"
            f" WHERE a.alias_domain = :d AND f.address = CONCAT({u}, '@', a.target_domain)"
            f" AND a.target_domain = d.domain AND f.active = 1 AND a.active = 1 AND {live}",
            "catchall": "SELECT f.forwarding FROM forwardings f, domain d WHERE f.address = :d"
            f" AND f.address = d.domain AND f.active = 1 AND {live}",
            "domain_alias_catchall": "SELECT f.forwarding FROM forwardings f, alias_domain a,"
            " domain d WHERE a.alias_domain = :d AND f.address = a.target_domain"
            " AND a.target_domain = d.domain AND f.active = 1 AND a.active = 1",
            "mailbox": "SELECT m.maildir FROM mailbox m, domain d WHERE m.username = :s"
            " AND m.active = 1 AND m.enabledeliver = 1 AND d.domain = m.domain AND d.active = 1",
            "transport": "SELECT transport FROM domain WHERE domain = :s AND active = 1",
            "sender_login": "SELECT m.username FROM mailbox m, domain d WHERE m.username = :s"
            f" AND m.domain = :d AND m.domain = d.domain AND m.active = 1 AND {live}",
            "user": "SELECT LOWER(CONCAT(m.storagebasedirectory, '/', m.storagenode, '/',"
            " m.maildir)), m.quota * 1048576 FROM mailbox m, domain d WHERE m.username = :s"
            f" AND m.active = 1 AND m.domain = d.domain AND {live}",
        }
        self.uses_local = {"domain_alias", "catchall"}

    def value(self, name: str, key: str) -> str | None:
        """The rows' first column joined by commas, as Postfix returns it; None: not found."""
        local, _, domain = key.rpartition("@")
        if name in self.uses_local and not local:
            return None
        with self.engine.connect() as conn:
            rows = list(conn.execute(text(self.q[name]), {"s": key, "u": local, "d": domain}))
        return ",".join(str(r[0]) for r in rows) if rows else None

    def virtual(self, key: str) -> str | None:
        """virtual_alias_maps: the four queries in iRedMail's order, the first answer wins."""
        for name in ("virtual_alias", "domain_alias", "catchall", "domain_alias_catchall"):
            found = self.value(name, key)
            if found is not None:
                return found
        return None

    def user(self, key: str) -> tuple[str, int] | None:
        """Dovecot's user_query: (home, quota bytes), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(text(self.q["user"]), {"s": key}).first()
        return (str(row[0]), int(row[1])) if row else None

    def close(self) -> None:
        self.engine.dispose()


# Probes beside every address of the data set: unknown users, alias-domain and catch-all hits.
IR_PROBES = [
    "nobody@example.com",
    "nobody@example.net",  # catch-all
    "alice@alias.example",
    "sales@alias.example",
    "dave@alias.example",
    "nobody@alias.example",
    "anyone@backup.example",
    "eve@off.example",
    "nobody@unknown.example",
]


def iredmail_addresses() -> list[str]:
    """Every address of the sample data plus the probes."""
    found = {u for u, *_ in IR_MAILBOXES} | {a for a, *_ in IR_FORWARDINGS if "@" in a}
    return sorted(found | {a for a, _ in IR_ALIASES} | set(IR_PROBES))


# mapsync routes a hosted domain to its mailstore's LMTP (iRedMail's transport is 'dovecot',
# on the one host): per domain, and per mailbox housed elsewhere (storagenode).
IR_TRANSPORT = {
    "example.com": "lmtp:[10.0.1.11]:24",
    "example.net": "lmtp:[10.0.1.11]:24",  # iRedMail has no per-domain node: the default
    "dave@example.net": "lmtp:[10.0.1.12]:24",  # storagenode vmail2
    "backup.example": "relay:[mx.backup.example]:25",
}


# --- mapsync's own schema read through SQL -------------------------------------------------


def seed_every_case(url: str) -> None:
    """A seeded mapsync database, plus the cases the seed lacks: a relay domain, a suspended
    and a closed customer, every account status, a sender grant, an expired and an expiring
    alias, an account housed off its domain's mailstore."""
    from datetime import datetime

    from sqlalchemy import insert, select, update

    from mapsync.sources import schema as t
    from mapsync.sources.seed import SeedCounts, seed
    from tests.helpers.publisher import drop_aliases_into

    seed(url, SeedCounts(accounts=120, domains=8, aliases=40, mailstores=2), seed=7)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            hosted = [
                row.id
                for row in conn.execute(
                    select(t.domain.c.id).where(t.domain.c.kind == "hosted").order_by(t.domain.c.id)
                )
            ]
            accounts = [
                row.id for row in conn.execute(select(t.account.c.id).order_by(t.account.c.id))
            ]
            stores = [row.id for row in conn.execute(select(t.mailstore.c.id))]
            conn.execute(
                insert(t.customer).values(id=901, ext_id="c-901", name="late", status="suspended")
            )
            conn.execute(
                insert(t.customer).values(id=902, ext_id="c-902", name="gone", status="closed")
            )
            conn.execute(update(t.domain).where(t.domain.c.id == hosted[1]).values(customer_id=901))
            conn.execute(update(t.domain).where(t.domain.c.id == hosted[2]).values(customer_id=902))
            # Closing a customer takes the aliases into its domain with it (a target there
            # reaches nothing published: refused).
            (gone,) = conn.execute(select(t.domain.c.name).where(t.domain.c.id == hosted[2])).one()
            drop_aliases_into(conn, {gone})
            conn.execute(
                insert(t.domain).values(
                    id=990, name="relay-client.example", kind="relay",
                    relay_nexthop="[mx.relay-client.example]:25", status="active",
                )
            )  # fmt: skip
            for account, status in zip(
                accounts[3:7], ("login_disabled", "moving", "disabled", "active"), strict=True
            ):
                conn.execute(
                    update(t.account).where(t.account.c.id == account).values(status=status)
                )
            conn.execute(
                update(t.account)
                .where(t.account.c.id == accounts[7])
                .values(mailstore_id=stores[-1])
            )
            conn.execute(
                insert(t.sender_grant).values(
                    account_id=accounts[0], address="@relay-client.example"
                )
            )
            for alias_id, local, expires in (
                (991, "expired", datetime(2020, 1, 1)),
                (992, "expiring", datetime(2099, 1, 1)),
            ):
                conn.execute(
                    insert(t.alias).values(
                        id=alias_id, domain_id=hosted[0], local_part=local, active=True,
                        expires_at=expires,
                    )
                )  # fmt: skip
                conn.execute(
                    insert(t.alias_target).values(
                        alias_id=alias_id, target="partner@external.example"
                    )
                )
    finally:
        engine.dispose()


# --- a small database for the error cases --------------------------------------------------

# Three tiny tables and the queries reading them: the cases of one row each.
BASE = {
    "domains": "SELECT name, kind, store AS mailstore FROM d",
    "accounts": "SELECT address, status, home, pw AS password_hash FROM a",
    "aliases": "SELECT address, targets FROM al",
}


def small_db(path: Path, *rows: str) -> str:
    """A SQLite database at ``path`` with BASE's tables, one row each, and ``rows``."""
    url = f"sqlite:///{path / 'db.sqlite'}"
    fill_small(url, *rows)
    return url


def fill_small(url: str, *rows: str) -> None:
    """BASE's tables at ``url`` (any engine), one row each, then the statements ``rows``."""
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in (
            "CREATE TABLE d (name TEXT, kind TEXT, store TEXT)",
            "CREATE TABLE a (address TEXT, status TEXT, home TEXT, pw TEXT, port INTEGER)",
            "CREATE TABLE al (address TEXT, targets TEXT)",
            "INSERT INTO d VALUES ('example.org', 'hosted', NULL)",
            "INSERT INTO a VALUES ('postmaster@example.org', 'active', '/m/pm', '{BLF-CRYPT}$2y$x', 1)",
            "INSERT INTO al VALUES ('info@example.org', 'postmaster@example.org')",
            *rows,
        ):
            conn.execute(text(statement))
    engine.dispose()


def small_source(url: str, **queries: str) -> SqlSource:
    """A source reading ``url`` with BASE's queries, ``queries`` replacing or adding some."""
    return SqlSource(url, SqlConfig({**BASE, **queries}, where="[publisher.sql]"))


def small_problems(url: str, secrets: bool = False, **queries: str) -> list[str]:
    """What validation says of :func:`small_source`'s snapshot, as printed."""
    from mapsync.validate import check

    source = small_source(url, **queries)
    try:
        return [str(p) for p in check(source.snapshot(secrets))]
    finally:
        source.close()

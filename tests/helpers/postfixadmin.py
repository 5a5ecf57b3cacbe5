"""A PostfixAdmin database as PostfixAdmin builds and fills it, on SQLite, MariaDB and
PostgreSQL, holding every case of shared/POSTFIXADMIN.md; and PostfixAdmin's documented
Postfix and Dovecot SQL lookups run against it (the oracle the published maps must match).

The tables are :func:`mapsync.sources.postfixadmin_seed.ddl`'s (written from the column facts:
types, defaults, nullability per engine; not copied from PostfixAdmin, shared with
``mapsync demo --schema postfixadmin``). ``build(url)`` creates and fills them; ``Lookups(url)`` answers
as Postfix and Dovecot configured by PostfixAdmin's DOCUMENTS would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from mapsync.sources.postfixadmin_seed import ddl
from tests.helpers.agent import postmap_q

PASSWORD = "pfa secret 1"  # every mailbox's password, in each hash family below
MAIL_BASE = "/var/vmail"
VACATION_DOMAIN = "autoreply.example.org"
VACATION_NEXTHOP = "[autoreply-host.example.net]:25"

# PASSWORD as PostfixAdmin's `encrypt` settings store it (made once with `doveadm pw`,
# `crypt(3)` and md5sum); several formats coexist in one table, as they do in the wild.
HASHES = {
    "bcrypt": "$2y$05$h/F4nFCtzEDPv5OfPUd1/.vyUi/WJsQqGNB3BFTg6Ohf05IkzGJcK",
    "md5crypt": "$1$XHXGQ3B2$fJ5o2oNVxMJljstRLa7nl1",
    "sha512crypt": "$6$rounds=1000$ED1beLDZC/yton2a$XYqYHEfnpp5fpVqAJkFtN1hIILWM2EyTurZ5wXIL"
    "obaFrUr2Zr./Hjyon/EDwexJy6QyxTFh5193n9uZLNv3k1",
    "sha256crypt": "$5$rounds=1000$kn16gpiTAhCH5l1S$881uT4JXQzJ.gA/dZQq27IcNGjTHJKLUL5P.JRF8fr.",
    "dovecot:SHA512-CRYPT": "{SHA512-CRYPT}$6$rounds=1000$ED1beLDZC/yton2a$XYqYHEfnpp5fpVqAJkF"
    "tN1hIILWM2EyTurZ5wXILobaFrUr2Zr./Hjyon/EDwexJy6QyxTFh5193n9uZLNv3k1",
    "sha512.b64": "{SHA512-CRYPT.B64}JDYkcm91bmRzPTEwMDAkZU5oYTZ1V1M4ZlBSRUd0TyRjUU5Mb0FxQWw5OW"
    "htUFFHSWwzVFFxZThMRVpHSnM3a09HcmY4aGJyeXpUQTdmVXJHYjFTYjVkVi4wa215bUZtcExXSWdQVkVQMWJCVU"
    "1wNDNvWVJVMA==",
    "ARGON2ID": "{ARGON2ID}$argon2id$v=19$m=1048576,t=5,p=1$Hj0Lrr+Woe55pIRZc2HM1A$84JdMLEXsd/t"
    "Rs6SWYebDYGhW9qeWOp92Bia+sFeqyk",
    "SSHA": "{SSHA}44fu7JGZiZYucFcWlWZcVK9fYBqgnpgO",
    "des": "abNUttvdAqVOw",
    "md5": "93e8621c72995dba43c2cff6d64f3e93",
    "cleartext": "{CLEARTEXT}" + PASSWORD,
    "legacy cleartext": "pfasecret",
}


@dataclass(frozen=True)
class DomainRow:
    domain: str
    transport: str | None = "virtual"
    backupmx: bool = False
    active: bool = True
    maxquota: int = 0
    quota: int = 0


@dataclass(frozen=True)
class MailboxRow:
    username: str
    hash: str  # a key of HASHES
    quota: int = 0  # bytes
    active: bool = True
    smtp_active: bool = True

    @property
    def local_part(self) -> str:
        return self.username.partition("@")[0]

    @property
    def domain(self) -> str:
        return self.username.partition("@")[2]

    @property
    def maildir(self) -> str:
        return f"{self.domain}/{self.local_part}/"


@dataclass(frozen=True)
class AliasRow:
    address: str
    goto: str
    active: bool = True

    @property
    def domain(self) -> str:
        return self.address.partition("@")[2]


DOMAINS = [
    DomainRow("ALL", transport=""),  # the pseudo-domain of every install
    DomainRow("example.com", maxquota=1024, quota=10240),
    DomainRow("alias.example"),  # alias domain of example.com
    DomainRow("alias2.example"),  # alias domain of lmtp.example (which has no catch-all)
    DomainRow("offalias.example"),  # an inactive alias domain of example.com
    DomainRow("inactive.example", active=False),
    DomainRow("backup.example", transport="relay", backupmx=True),
    DomainRow("lmtp.example", transport="lmtp:unix:private/dovecot-lmtp"),
    DomainRow("relay.example", transport="smtp:[mx.customer.example]:25"),
    DomainRow("old.example"),  # domain-wide forward to example.com
    DomainRow("old2.example"),  # domain-wide forward to alias.example (an alias domain)
    DomainRow("multi.example"),  # domain-wide forward to example.com, with an archive copy
]
ALIAS_DOMAINS = [
    ("alias.example", "example.com", True),
    ("alias2.example", "lmtp.example", True),
    ("offalias.example", "example.com", False),
]
MAILBOXES = [
    MailboxRow("postmaster@example.com", "bcrypt"),
    MailboxRow("alice@example.com", "md5crypt", quota=100 * 1024000),
    MailboxRow("bob@example.com", "sha512crypt"),  # on vacation
    MailboxRow("carl@example.com", "dovecot:SHA512-CRYPT", active=False),
    MailboxRow("dave@example.com", "sha256crypt"),  # forwards, keeps a copy
    MailboxRow("fay@example.com", "SSHA"),  # forwards only
    MailboxRow("gus@example.com", "sha512.b64", smtp_active=False),
    MailboxRow("hal@example.com", "des"),
    MailboxRow("ivy@example.com", "md5", quota=5 * 1048576),
    MailboxRow("jan@example.com", "ARGON2ID"),
    MailboxRow("kim@example.com", "cleartext"),
    MailboxRow("lee@example.com", "legacy cleartext"),
    MailboxRow("erin@lmtp.example", "sha512crypt"),
    MailboxRow("carol@inactive.example", "bcrypt"),  # active, in an inactive domain
    MailboxRow("max@old.example", "bcrypt"),  # a real mailbox in a forwarded domain
]
CLEARTEXT = ("kim@example.com", "lee@example.com")


def _self(m: MailboxRow) -> AliasRow:
    return AliasRow(m.username, m.username, m.active)


ALIASES = [
    *(_self(m) for m in MAILBOXES if m.username.partition("@")[0] not in ("bob", "dave", "fay")),
    # Vacation: the vacation address after the user's own targets.
    AliasRow("bob@example.com", f"bob#example.com@{VACATION_DOMAIN},bob@example.com"),
    AliasRow("dave@example.com", "dave@elsewhere.example,dave@example.com"),
    AliasRow("fay@example.com", "fay@elsewhere.example"),
    AliasRow("sales@example.com", "alice@example.com,bob@example.com,partner@external.example"),
    AliasRow("old-team@example.com", "alice@example.com", active=False),
    AliasRow("@example.com", "postmaster@example.com"),  # catch-all
    AliasRow("@old.example", "@example.com"),  # domain-wide forward
    AliasRow("sales@alias.example", "dave@example.com"),  # literal alias on an alias domain
    AliasRow("@alias.example", "fay@example.com"),  # loses to @example.com
    AliasRow("@alias2.example", "postmaster@example.com"),  # lmtp.example has none: this one
    AliasRow("info@inactive.example", "alice@example.com"),
    AliasRow("team@lmtp.example", "erin@lmtp.example,alice@example.com"),
    AliasRow("@old2.example", "@alias.example"),  # the chain old2 → alias → example.com
    AliasRow("@multi.example", "@example.com,archive@external.example"),
    # Targets that receive nothing here: a mailbox deleted through PostfixAdmin's UI stays in
    # other aliases' goto; a mailbox of an inactive domain.
    AliasRow("crew@lmtp.example", "erin@lmtp.example,gone@lmtp.example"),
    AliasRow("grp@lmtp.example", "erin@lmtp.example,carol@inactive.example"),
    AliasRow("ghost@lmtp.example", "gone@lmtp.example"),
]
# Left out of the aliases listing them (PostfixAdmin's lookups accept them and bounce), and
# an alias with no other target goes with them (docs/postfixadmin.md).
STALE_TARGETS = {"gone@lmtp.example", "carol@inactive.example"}
ONLY_STALE_TARGETS = {"ghost@lmtp.example"}

# Addresses that exist nowhere, or only through a rule: the probes beside every row's address.
PROBES = [
    "nobody@example.com",  # catch-all hit
    "nobody@alias.example",  # target's catch-all over the alias domain's own
    "alice@alias.example",
    "sales@alias.example",
    "erin@alias2.example",
    "team@alias2.example",
    "nobody@alias2.example",  # the alias domain's own catch-all
    "alice@offalias.example",  # inactive alias domain
    "alice@old.example",  # domain-wide forward
    "max@old.example",
    "nobody@old.example",
    "nobody@lmtp.example",
    "anyone@backup.example",
    "anyone@relay.example",
    "x@all",  # the pseudo-domain
    "nobody@unknown.example",
    "old-team@example.com",
    "carol@inactive.example",
    "info@inactive.example",
    "alice@old2.example",
    "sales@old2.example",  # the literal alias of alias.example
    "nobody@old2.example",  # example.com's catch-all, through alias.example
    "alice@multi.example",
    "nobody@multi.example",
]


def addresses() -> list[str]:
    """Every address in the data set plus the probes, lowercase, sorted."""
    keys = {m.username for m in MAILBOXES} | {a.address for a in ALIASES if a.address[0] != "@"}
    return sorted(keys | set(PROBES))


def build(url: str, prefix: str = "", version: int = 1856) -> None:
    """Create PostfixAdmin's tables (schema ``version``, names starting with ``prefix``) at
    ``url`` and fill them with the data set, booleans spelt as the engine spells them."""
    engine = create_engine(url)
    dialect = engine.dialect.name
    pg = dialect == "postgresql"

    def b(value: bool) -> Any:
        return value if pg else int(value)

    p = prefix
    try:
        with engine.begin() as conn:
            for statement in ddl(dialect, prefix, version):
                conn.execute(text(statement))
            conn.execute(
                text(f"INSERT INTO {p}config (id, name, value) VALUES (1, 'version', :v)"),
                {"v": str(version)},
            )
            for d in DOMAINS:
                conn.execute(
                    text(
                        f"INSERT INTO {p}domain (domain, description, maxquota, quota, transport,"
                        " backupmx, active, created, modified)"
                        " VALUES (:d, '', :mq, :q, :t, :bm, :a, :now, :now)"
                    ),
                    {
                        "d": d.domain,
                        "mq": d.maxquota,
                        "q": d.quota,
                        "t": d.transport,
                        "bm": b(d.backupmx),
                        "a": b(d.active),
                        "now": "2026-11-30 10:00:00",
                    },
                )
            for m in MAILBOXES:
                columns = "username, password, name, maildir, quota, local_part, domain, active, created, modified"
                values = ":u, :pw, :n, :md, :q, :lp, :d, :a, :now, :now"
                if version >= 1850:
                    columns += ", smtp_active"
                    values += ", :sa"
                conn.execute(
                    text(f"INSERT INTO {p}mailbox ({columns}) VALUES ({values})"),
                    {
                        "u": m.username,
                        "pw": HASHES[m.hash],
                        "n": m.local_part.title(),
                        "md": m.maildir,
                        "q": m.quota,
                        "lp": m.local_part,
                        "d": m.domain,
                        "a": b(m.active),
                        "sa": b(m.smtp_active),
                        "now": "2026-11-30 10:00:00",
                    },
                )
            for a in ALIASES:
                conn.execute(
                    text(
                        f"INSERT INTO {p}alias (address, goto, domain, active, created, modified)"
                        " VALUES (:ad, :g, :d, :a, :now, :now)"
                    ),
                    {
                        "ad": a.address,
                        "g": a.goto,
                        "d": a.domain,
                        "a": b(a.active),
                        "now": "2026-11-30 10:00:00",
                    },
                )
            for alias_domain, target, active in ALIAS_DOMAINS:
                conn.execute(
                    text(
                        f"INSERT INTO {p}alias_domain (alias_domain, target_domain, active,"
                        " created, modified) VALUES (:ad, :t, :a, :now, :now)"
                    ),
                    {"ad": alias_domain, "t": target, "a": b(active), "now": "2026-11-30 10:00:00"},
                )
    finally:
        engine.dispose()


class Lookups:
    """PostfixAdmin's documented live lookups (DOCUMENTS/POSTFIX_CONF.txt, BACKUP_MX.txt,
    DOVECOT.txt), written from their description, run against the database at ``url``.

    Postfix's ``%s`` is the whole key, ``%u`` the local part (an empty one skips the query),
    ``%d`` the domain (a key without '@' skips it); several rows are joined by commas.
    """

    def __init__(self, url: str, prefix: str = "") -> None:
        self.engine: Engine = create_engine(url)
        dialect = self.engine.dialect.name
        p = prefix
        mysql = dialect in ("mysql", "mariadb")

        def cat(*parts: str) -> str:
            return f"CONCAT({', '.join(parts)})" if mysql else " || ".join(parts)

        ad, al, mb = f"{p}alias_domain", f"{p}alias", f"{p}mailbox"
        user_at_target = cat(":u", "'@'", f"{ad}.target_domain")
        at_target = cat("'@'", f"{ad}.target_domain")
        home = cat(f"'{MAIL_BASE}/'", "maildir")
        self.q = {
            # virtual_mailbox_domains, BACKUP_MX.txt's variant: backup-MX domains are relayed.
            "domains": f"SELECT domain FROM {p}domain WHERE domain = :s AND active = '1'"
            " AND backupmx = '0'",
            "alias": f"SELECT goto FROM {al} WHERE address = :s AND active = '1'",
            "alias_domain": f"SELECT goto FROM {al}, {ad} WHERE {ad}.alias_domain = :d"
            f" AND {al}.address = {user_at_target} AND {al}.active = '1' AND {ad}.active = '1'",
            "alias_domain_catchall": f"SELECT goto FROM {al}, {ad} WHERE {ad}.alias_domain = :d"
            f" AND {al}.address = {at_target} AND {al}.active = '1' AND {ad}.active = '1'",
            "mailbox": f"SELECT maildir FROM {mb} WHERE username = :s AND active = '1'",
            "alias_domain_mailbox": f"SELECT maildir FROM {mb}, {ad} WHERE {ad}.alias_domain = :d"
            f" AND {mb}.username = {user_at_target} AND {mb}.active = '1' AND {ad}.active = '1'",
            "relay_domains": f"SELECT domain FROM {p}domain WHERE domain = :s AND active = '1'"
            " AND (transport LIKE 'smtp%' OR transport LIKE 'relay%' OR backupmx = '1')",
            "transport": f"SELECT REPLACE(transport, 'virtual', ':') FROM {p}domain"
            " WHERE domain = :s AND active = '1'",
            "sender_login": f"SELECT username FROM {mb} WHERE username = :s AND active = '1'",
            "password": f"SELECT password FROM {mb} WHERE username = :s AND active = '1'",
            "user": f"SELECT {home}, quota FROM {mb} WHERE username = :s AND active = '1'",
        }
        # The queries that use %u (skipped for an empty local part) or %d (skipped without '@').
        self.uses_local = {"alias_domain", "alias_domain_mailbox"}
        self.uses_domain = {"alias_domain_catchall"}

    def query(self, name: str, key: str) -> list[Any] | None:
        """Postfix's answer of map ``name`` for ``key``: the rows, or None (not found)."""
        local, at, domain = key.rpartition("@")
        if name in self.uses_local and not (at and local):
            return None
        if name in self.uses_domain and not at:
            return None
        params = {"s": key, "u": local, "d": domain}
        with self.engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(text(self.q[name]), params)]
        return rows or None

    def value(self, name: str, key: str) -> str | None:
        """The first column of all rows joined by commas, as Postfix returns it."""
        rows = self.query(name, key)
        return ",".join(str(r[0]) for r in rows) if rows else None

    def virtual(self, key: str) -> str | None:
        """virtual_alias_maps = alias, alias-domain, alias-domain catch-all (first answer wins)."""
        for name in ("alias", "alias_domain", "alias_domain_catchall"):
            found = self.value(name, key)
            if found is not None:
                return found
        return None

    def mailbox(self, key: str) -> str | None:
        """virtual_mailbox_maps = mailbox, alias-domain mailbox."""
        return self.value("mailbox", key) or self.value("alias_domain_mailbox", key)

    def close(self) -> None:
        self.engine.dispose()


def resolve(address: str, virtual: Callable[[str], str | None], depth: int = 0) -> set[str]:
    """The final recipients of ``address`` after virtual alias expansion, as Postfix's
    cleanup does it (virtual(5)): the full address, then ``@domain``; a result ``@other`` keeps
    the local part; an address that expands to itself is delivered, not expanded again."""
    assert depth < 20, f"alias loop at {address}"
    local, _, domain = address.rpartition("@")
    found = virtual(address)
    if found is None:
        found = virtual(f"@{domain}")
    if found is None:
        return {address}
    out: set[str] = set()
    for target in (t for t in found.replace(" ", ",").split(",") if t):
        if target.startswith("@"):
            target = local + target
        target = target.lower()
        out |= {target} if target == address else resolve(target, virtual, depth + 1)
    return out


def postmap_reader(path: Path) -> Callable[[str], str | None]:
    """``postmap -q KEY cdb:PATH`` (the real Postfix reading a published map), cached."""
    cache: dict[str, str | None] = {}

    def lookup(key: str) -> str | None:
        if key not in cache:
            cache[key] = postmap_q(key, path)
        return cache[key]

    return lookup

"""A PostfixAdmin-shaped database for ``mapsync demo --schema postfixadmin``: PostfixAdmin's
tables (as its installer builds them on each engine, written from the facts in
docs/postfixadmin.md, not copied from PostfixAdmin) filled with sample rows the way
PostfixAdmin's own handlers write them: the pseudo-domain ``ALL``, one alias row per mailbox
pointing at itself, bare crypt hashes, an alias domain, a catch-all, a forward that keeps a
copy, a vacation target, a backup-MX domain.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

from sqlalchemy import create_engine, text

from mapsync.sources.seed import sha512_crypt

VERSION = 1856  # PostfixAdmin's schema version the demo database claims (table `config`)
VACATION_DOMAIN = "autoreply.example.org"


def ddl(dialect: str, prefix: str, version: int) -> list[str]:
    """CREATE TABLEs with each engine's own types, as PostfixAdmin's installer builds them."""
    mysql, pg = dialect in ("mysql", "mariadb"), dialect == "postgresql"
    boolean = "boolean" if pg else "tinyint(1)"
    yes, no = ("true", "false") if pg else ("1", "0")
    stamp = (
        "timestamp with time zone DEFAULT now()" if pg else "datetime DEFAULT '2000-01-01 00:00:00'"
    )
    tail = " DEFAULT CHARSET=latin1" if mysql else ""  # latin1, case-insensitive collation
    late = ""
    if version >= 1849:
        late += ", totp_secret varchar(255) NULL"
    if version >= 1850:
        late += f", smtp_active {boolean} NOT NULL DEFAULT {yes}"
    description = ", description varchar(255) DEFAULT ''" if version >= 1854 else ""
    p = prefix
    fk = f" REFERENCES {p}domain(domain)" if pg else ""  # only PostgreSQL has foreign keys
    # PostgreSQL: mailbox.domain is nullable and comes after `active`.
    mailbox_domain = "" if pg else "domain varchar(255) NOT NULL,"
    pg_domain = f"domain varchar(255){fk}," if pg else ""
    return [
        f"""CREATE TABLE {p}config (id integer PRIMARY KEY, name varchar(20) NOT NULL,
            value varchar(20) NOT NULL){tail}""",
        f"""CREATE TABLE {p}domain (
            domain varchar(255) NOT NULL PRIMARY KEY,
            description varchar(255) {"DEFAULT ''" if pg else ""},
            aliases integer NOT NULL DEFAULT 0, mailboxes integer NOT NULL DEFAULT 0,
            maxquota bigint NOT NULL DEFAULT 0, quota bigint NOT NULL DEFAULT 0,
            transport varchar(255) {"" if pg else "NOT NULL"},
            backupmx {boolean} NOT NULL DEFAULT {no},
            created {stamp}, modified {stamp},
            active {boolean} NOT NULL DEFAULT {yes},
            password_expiry integer DEFAULT 0){tail}""",
        f"""CREATE TABLE {p}mailbox (
            username varchar(255) NOT NULL PRIMARY KEY,
            password varchar(255) NOT NULL {"DEFAULT ''" if pg else ""},
            name varchar(255) NOT NULL {"DEFAULT ''" if pg else ""},
            maildir varchar(255) NOT NULL {"DEFAULT ''" if pg else ""},
            quota bigint NOT NULL DEFAULT 0,
            local_part varchar(255) NOT NULL,
            {mailbox_domain}
            created {stamp}, modified {stamp},
            active {boolean} NOT NULL DEFAULT {yes},
            {pg_domain}
            phone varchar(30) DEFAULT '', email_other varchar(255) DEFAULT '',
            token varchar(255) DEFAULT '', token_validity {stamp},
            password_expiry {stamp}{late}){tail}""",
        f"""CREATE TABLE {p}alias (
            address varchar(255) NOT NULL PRIMARY KEY,
            goto text NOT NULL,
            domain varchar(255) NOT NULL{fk},
            created {stamp}, modified {stamp},
            active {boolean} NOT NULL DEFAULT {yes}{description}){tail}""",
        f"""CREATE TABLE {p}alias_domain (
            alias_domain varchar(255) NOT NULL PRIMARY KEY{fk},
            target_domain varchar(255) NOT NULL{fk},
            created {stamp}, modified {stamp},
            active {boolean} NOT NULL DEFAULT {yes}{description}){tail}""",
    ]


def seed_postfixadmin(url: str, password: str, domains: int = 4, users: int = 12) -> dict[str, int]:
    """Create PostfixAdmin's tables at ``url`` (SQLite, MariaDB or PostgreSQL) and fill them:
    ``domains`` domains ``example-N.org`` with ``users`` mailboxes each (``password`` for all,
    stored as PostfixAdmin's php_crypt:SHA512 stores it: a bare ``$6$`` hash), plus the rows
    that make PostfixAdmin's data what it is. Returns the row count per table."""
    engine = create_engine(url)
    pg = engine.dialect.name == "postgresql"
    rng = random.Random(1)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    hashed = sha512_crypt(password, rng).removeprefix("{SHA512-CRYPT}")
    rows: dict[str, list[dict[str, object]]] = {
        "domain": [], "mailbox": [], "alias": [], "alias_domain": []
    }  # fmt: skip

    def flag(value: bool) -> object:
        return value if pg else int(value)

    def domain(name: str, transport: str = "virtual", backupmx: bool = False) -> None:
        rows["domain"].append(
            {
                "domain": name,
                "transport": transport,
                "backupmx": flag(backupmx),
                "active": flag(True),
            }
        )

    def alias(address: str, goto: str) -> None:
        rows["alias"].append(
            {
                "address": address,
                "goto": goto,
                "domain": address.partition("@")[2],
                "active": flag(True),
            }
        )

    domain("ALL", "")
    names = [f"example-{n}.org" for n in range(1, domains + 1)]
    for name in names:
        domain(name)
        for local in ["postmaster", *(f"user{n:03d}" for n in range(1, users))]:
            username = f"{local}@{name}"
            rows["mailbox"].append(
                {
                    "username": username,
                    "password": hashed,
                    "name": local.title(),
                    "maildir": f"{name}/{local}/",
                    "quota": rng.choice([0, 1024000 * 1024]),
                    "local_part": local,
                    "domain": name,
                    "active": flag(True),
                }
            )
        alias(f"info@{name}", f"postmaster@{name}")
        alias(f"sales@{name}", f"user001@{name},user002@{name},partner@external.example")
    first, second = names[0], names[-1]
    for m in rows["mailbox"]:
        goto = str(m["username"])
        if goto == f"user003@{first}":  # forward, keeping a copy
            goto = f"someone@elsewhere.example,{goto}"
        elif goto == f"user004@{first}":  # on vacation
            goto = f"user004#{first}@{VACATION_DOMAIN},{goto}"
        alias(str(m["username"]), goto)
    alias(f"@{second}", f"postmaster@{second}")  # catch-all
    domain("alias-1.org")
    rows["alias_domain"].append(
        {"alias_domain": "alias-1.org", "target_domain": first, "active": flag(True)}
    )
    domain("backup-1.org", "relay", backupmx=True)
    try:
        with engine.begin() as conn:
            for statement in ddl(engine.dialect.name, "", VERSION):
                conn.execute(text(statement))
            conn.execute(
                text("INSERT INTO config (id, name, value) VALUES (1, 'version', :v)"),
                {"v": str(VERSION)},
            )
            for table, table_rows in rows.items():
                for row in table_rows:
                    row.update(created=now, modified=now)
                    columns = ", ".join(row)
                    values = ", ".join(f":{c}" for c in row)
                    conn.execute(text(f"INSERT INTO {table} ({columns}) VALUES ({values})"), row)
    finally:
        engine.dispose()
    return {table: len(table_rows) for table, table_rows in rows.items()}

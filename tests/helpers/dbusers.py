"""docs/database.md, run: its SQL blocks (```sql starting ``-- sql: NAME``) create an owner
and a read-only reader on the running PostgreSQL or MariaDB, with unique names per test, and
the tests connect as each. The SQL is the page's own, so the docs cannot drift from what the
tests prove; only the names and passwords are the test's."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError

from tests.conftest import MARIADB_URL, PG_URL
from tests.helpers.howto import statements
from tests.helpers.migrating import doc_blocks

DATABASE_MD = Path(__file__).resolve().parents[2] / "docs" / "database.md"


@dataclass(frozen=True)
class DatabaseUsers:
    """The page's database, owner and reader, under this test's names, on ``kind``'s server."""

    kind: str  # "postgresql" or "mariadb"
    database: str
    owner: str
    reader: str
    password: str  # the owner's and the reader's (PostgreSQL trusts 127.0.0.1 and ignores it)

    def url(self, user: str | None = None, database: str | None = None) -> str:
        """``user``'s URL for ``database`` (default: this database); no user: the superuser's."""
        template = PG_URL if self.kind == "postgresql" else MARIADB_URL
        u = make_url(template.format(db=database if database is not None else self.database))
        if user is not None:
            u = u.set(username=user, password=self.password)
        return u.render_as_string(hide_password=False)

    @property
    def owner_url(self) -> str:
        return self.url(self.owner)

    @property
    def reader_url(self) -> str:
        return self.url(self.reader)

    def documented(self, block: str, database: str = "mapsync") -> list[str]:
        """The statements of docs/database.md's block ``block``, with this test's names:
        the page's database ``database`` (a word of its own), owner and reader."""
        sql = doc_blocks(DATABASE_MD, "-- sql: ")[block]
        sql = sql.replace("mapsync_owner", self.owner).replace("mapsync_reader", self.reader)
        sql = re.sub(r"'(owner|reader)-password'", f"'{self.password}'", sql)
        sql = re.sub(rf"\b{database}\b", self.database, sql)
        return statements(sql)

    def as_superuser(self, sql: list[str], database: str | None = None) -> None:
        """Run ``sql`` one statement at a time (CREATE DATABASE runs in no transaction) as
        the server's superuser, in ``database`` (default: none, the server's own)."""
        admin = "postgres" if self.kind == "postgresql" else ""
        engine = create_engine(
            self.url(database=database if database is not None else admin),
            isolation_level="AUTOCOMMIT",
        )
        try:
            with engine.connect() as conn:
                for statement in sql:  # PyMySQL formats with %: the host '%' is '%%'
                    mysql = self.kind == "mariadb"
                    conn.exec_driver_sql(statement.replace("%", "%%") if mysql else statement)
        finally:
            engine.dispose()

    def refused(self, url: str, statement: str) -> str | None:
        """The database's refusal of ``statement`` run at ``url``, or None if it ran."""
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(text(statement))
        except SQLAlchemyError as exc:
            return str(getattr(exc, "orig", exc)).splitlines()[0]
        finally:
            engine.dispose()
        return None

    def drop(self) -> None:
        """The database (if this test made it) and both users, whatever state they are in."""
        if self.kind == "postgresql":
            self.as_superuser([f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)"])
            self.as_superuser([f"DROP ROLE IF EXISTS {r}" for r in (self.reader, self.owner)])
        else:
            self.as_superuser([f"DROP DATABASE IF EXISTS {self.database}"])
            self.as_superuser([f"DROP USER IF EXISTS '{u}'@'%'" for u in (self.reader, self.owner)])


def _names(kind: str, database: str | None) -> DatabaseUsers:
    tag = uuid.uuid4().hex[:10]
    return DatabaseUsers(
        kind=kind,
        database=database or f"mapsync_t_{tag}",
        owner=f"mso_{tag}",
        reader=f"msr_{tag}",
        password=f"pw-{uuid.uuid4().hex[:12]}",
    )


@contextmanager
def owner_and_reader(kind: str) -> Iterator[DatabaseUsers]:
    """docs/database.md's users block run on ``kind``: a new database owned by (PostgreSQL) or
    granted to (MariaDB) a new owner, and a reader; all dropped afterwards. The PostgreSQL
    grants block is left to the test (the page runs it after ``init-db``)."""
    users = _names(kind, None)
    try:
        users.as_superuser(users.documented(f"{kind}-users"))
        yield users
    finally:
        users.drop()


@contextmanager
def postfixadmin_reader(kind: str, url: str) -> Iterator[DatabaseUsers]:
    """docs/database.md's PostfixAdmin block run on the existing test database at ``url``:
    a reader that may SELECT from PostfixAdmin's four tables; dropped afterwards (the
    database is the fixture's)."""
    users = _names(kind, make_url(url).database)
    block = users.documented(f"postfixadmin-{kind}", database="postfix")
    try:
        users.as_superuser(block, database=users.database if kind == "postgresql" else None)
        yield users
    finally:
        if kind == "postgresql":  # its grants, before the role can go
            users.as_superuser([f"DROP OWNED BY {users.reader}"], database=users.database)
            users.as_superuser([f"DROP ROLE IF EXISTS {users.reader}"])
        else:
            users.as_superuser([f"DROP USER IF EXISTS '{users.reader}'@'%'"])

"""Reads mapsync's own schema (``schema = "mapsync"``)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from itertools import chain, groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    Integer,
    LargeBinary,
    String,
    Table,
    and_,
    case,
    cast,
    create_engine,
    event,
    func,
    literal,
    not_,
    null,
    select,
    text,
    type_coerce,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.sql import ColumnElement

from mapsync import log, progress
from mapsync.errors import InvalidData, LockBusy, SourceError
from mapsync.progress import track
from mapsync.snapshot import (
    Account,
    Alias,
    Changes,
    Domain,
    Fingerprint,
    Mailstore,
    Mark,
    NotIncremental,
    SenderGrant,
    Snapshot,
    paused_gc,
)
from mapsync.sources import maps
from mapsync.sources import schema as t
from mapsync.sources.base import Source
from mapsync.sources.changes import (
    ALIAS_COLUMNS,
    alias_read,
    clock,
    expiry,
    naive,
    read_changes,
    read_denied,
    read_mark,
)
from mapsync.validate import Problem

# pg_advisory_lock key of the publisher: "mapsync" as a number, the same on every host.
ADVISORY_LOCK = int.from_bytes(b"mapsync", "big")
# Whether this session still holds it (a bigint key is classid = high half, objid = low half).
_PG_HELD = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND objsubid = 1"
    " AND classid::bigint = :hi AND objid::bigint = :lo)"
)
# After this long in one database call, say so in the log (and again every as long).
SLOW = 5.0

_log = log.get("source")


def make_engine(url: str) -> Engine:
    """An engine for ``url``, with a clear error for a malformed URL or a missing driver."""
    try:
        return create_engine(url, pool_pre_ping=False)
    except (ArgumentError, ImportError, ValueError) as exc:
        raise SourceError(f"database {safe_url(url)}: {redact(str(exc), url)}") from None


# Query parameters that carry a password: libpq's and psycopg's ``password`` and
# ``sslpassword``, MySQL drivers' ``passwd``, ODBC's ``pwd``; drivers take them in any case.
# Any parameter whose name ends so is taken for one.
_SECRET_SUFFIXES = ("password", "passwd", "pwd")


def _secret_param(key: str) -> bool:
    return key.lower().endswith(_SECRET_SUFFIXES)


# ``password=...`` inside a libpq conninfo string or anything else that looks like one
# (a query value such as ``dsn=host=db password=x``, an unparseable URL, a driver's message).
_KEYWORD_SECRET = re.compile(
    r"""(?i)(\w*(?:password|passwd|pwd))(\s*=\s*|%3D)('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s&;,)+]*)"""
)
# ``scheme://user:password@`` in a string that make_url cannot parse.
_USERINFO_SECRET = re.compile(r"(://[^/?#@:]*:)[^/?#]*@")
HIDDEN = "***"
# A table of the schema is missing: SQLite, PostgreSQL, MariaDB/MySQL spell it so.
_NO_TABLE = re.compile(r"no such table|relation \S+ does not exist|Table \S+ doesn't exist")


# The database refused an action to this user: PostgreSQL's insufficient_privilege; MariaDB's
# and MySQL's database, table, column and command access denied; SQLite's read-only file.
_PG_NO_PRIVILEGE = "42501"
_MYSQL_NO_PRIVILEGE = (1044, 1142, 1143, 1227)


def no_privilege(orig: object) -> bool:
    """Whether ``orig`` (a driver error) says the database user lacks a privilege, not that
    the server is down or the SQL is wrong."""
    if getattr(orig, "sqlstate", None) == _PG_NO_PRIVILEGE:
        return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0] in _MYSQL_NO_PRIVILEGE
    return type(orig).__module__.startswith("sqlite3") and "readonly database" in str(orig)


def _mask_keywords(text: str) -> str:
    return _KEYWORD_SECRET.sub(lambda m: m.group(1) + m.group(2) + HIDDEN, text)


def safe_url(url: str) -> str:
    """``url`` without any password, for output, logs and manifests: the userinfo password,
    password query parameters of any case, and ``password=`` inside any query value."""
    try:
        parsed = make_url(url)
        query = {
            key: (
                HIDDEN
                if _secret_param(key)
                else tuple(map(_mask_keywords, value))
                if isinstance(value, tuple)
                else _mask_keywords(value)
            )
            for key, value in parsed.query.items()
        }
        rendered = parsed.set(query=query).render_as_string(hide_password=True)
        # The rendering quotes '***'; a password in a part make_url does not know (the
        # database name, say) is masked as a conninfo keyword.
        return _mask_keywords(rendered.replace(quote(HIDDEN, safe=""), HIDDEN))
    except (ArgumentError, ValueError, TypeError):
        return _mask_keywords(_USERINFO_SECRET.sub(r"\1" + HIDDEN + "@", url))


def _secrets_of(url: str) -> set[str]:
    """Every password ``url`` holds, as written and as decoded."""
    found = {m.group(3) for m in _KEYWORD_SECRET.finditer(url)}
    found |= {m.group(0)[len(m.group(1)) : -1] for m in _USERINFO_SECRET.finditer(url)}
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        pass
    else:
        if parsed.password:
            found.add(str(parsed.password))
        for key, value in parsed.query.items():
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if _secret_param(key):
                    found.add(v)
                found |= {m.group(3) for m in _KEYWORD_SECRET.finditer(v)}
    quoted = {q for s in found for q in (quote(s, safe=""), quote_plus(s, safe=""), s.strip("'\""))}
    return {s for s in found | quoted if s}


def redact(text: str, url: str) -> str:
    """``text`` (a driver's or SQLAlchemy's message) with every password of ``url`` hidden."""
    text = text.replace(url, safe_url(url))
    # Longest first: a password that contains another one is hidden whole.
    for secret in sorted(_secrets_of(url), key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return _mask_keywords(text)


def _refuse_missing_sqlite_file(engine: Engine, shown: str) -> None:
    """SQLite creates a missing database file on connect: the publisher would then fail with
    'no such table' on an empty file it made itself. Only init-db and seed create one."""
    if engine.dialect.name != "sqlite":
        return
    database = engine.url.database
    if not database or database == ":memory:" or engine.url.query.get("uri") == "true":
        return  # in memory, or a file: URI whose mode= decides
    path = Path(database)
    if not path.exists():
        raise SourceError(
            f"database {shown}: SQLite file {path} does not exist "
            "(create it with `mapsync init-db`, or fix [publisher].database)"
        )


def _read_only(conn: Connection) -> Connection:
    """Put ``conn`` into one read-only, repeatable-read transaction (one consistent instant)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    if dialect in ("mysql", "mariadb"):
        # READ ONLY comes with the START TRANSACTION in _begin (a SET TRANSACTION here would
        # autobegin the SQLAlchemy transaction, and conn.begin() then refuses).
        return conn.execution_options(isolation_level="REPEATABLE READ")
    # SQLite: a deferred transaction sees one consistent database state from its first read.
    return conn


def _begin(conn: Connection) -> None:
    """First statement inside ``conn.begin()``: PyMySQL and pysqlite begin no transaction
    before a read (pysqlite not before a write), so each SELECT would see a newer state."""
    dialect = conn.dialect.name
    if dialect in ("mysql", "mariadb"):
        conn.exec_driver_sql("START TRANSACTION READ ONLY")
    elif dialect == "sqlite":
        # The publisher never writes; make SQLite refuse to, as PostgreSQL and MariaDB do.
        conn.exec_driver_sql("PRAGMA query_only = ON")
        conn.exec_driver_sql("BEGIN")


def _refuse_lossy_charset(conn: Connection, shown: str) -> None:
    """SourceError unless MariaDB/MySQL sends this session's results as utf8mb4: in any
    other character set (``?charset=utf8``, or ``default-character-set = utf8`` in the file
    of ``read_default_file``, both utf8mb3) a character outside it is read as '?', and a row
    validation refuses ('pizza\U0001f355@') was published as another address ('pizza?@')."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        return
    charset = conn.exec_driver_sql("SELECT @@character_set_results").scalar()
    if charset != "utf8mb4":
        raise SourceError(
            f"database {shown}: the session's character set is {charset or 'binary'}, in "
            "which characters outside it read as '?' (another address): add "
            "charset=utf8mb4 to the URL's query, which wins over default-character-set in "
            "a read_default_file (docs/database.md)"
        )


def _bound(conn: Connection, lock_wait: float, statement_timeout: float, utc: bool = False) -> None:
    """Bound every wait of the transaction ``conn`` is in (or about to start): for a lock
    another session holds, ``lock_wait``; for one statement, ``statement_timeout``. Without
    this a table lock on the central database stalls the publisher silently (a day on
    MariaDB's defaults) while every node still reports OK. ``utc``: PostgreSQL's session
    zone is UTC (see :attr:`BuiltinSource.utc`)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        # SET LOCAL: ends with the transaction, so a pooler (pgbouncer) never hands the
        # setting to another client.
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, int(lock_wait * 1000))}")
        conn.exec_driver_sql(
            f"SET LOCAL statement_timeout = {max(1, int(statement_timeout * 1000))}"
        )
        if utc:
            conn.exec_driver_sql("SET LOCAL TimeZone = 'UTC'")
    elif dialect in ("mysql", "mariadb"):
        # Metadata locks (LOCK TABLES, DDL) and InnoDB row locks have separate bounds.
        wait = max(1, int(lock_wait))
        conn.exec_driver_sql(f"SET SESSION lock_wait_timeout = {wait}")
        conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {wait}")
        if getattr(conn.dialect, "is_mariadb", False):
            conn.exec_driver_sql(f"SET SESSION max_statement_time = {float(statement_timeout)}")
        else:  # MySQL's equivalent, for SELECTs only (all the publisher runs)
            conn.exec_driver_sql(
                f"SET SESSION max_execution_time = {max(1, int(statement_timeout * 1000))}"
            )
    # SQLite: the busy timeout is a connect argument (see BuiltinSource._connect_args).


# What each database says when a bound set by _bound was hit.
_LOCK_TIMEOUT_SQLSTATE = "55P03"  # PostgreSQL lock_not_available
_CANCELED_SQLSTATE = "57014"  # PostgreSQL query_canceled (statement_timeout)
_MYSQL_LOCK_TIMEOUT = 1205  # MariaDB/MySQL: lock wait timeout (metadata or row lock)
_MYSQL_STATEMENT_TIMEOUT = (1969, 3024)  # MariaDB max_statement_time, MySQL max_execution_time


def _bound_hit(orig: object) -> str | None:
    """``"lock"`` or ``"statement"`` if ``orig`` (a driver error) says a bound was hit."""
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == _LOCK_TIMEOUT_SQLSTATE:
        return "lock"
    if sqlstate == _CANCELED_SQLSTATE:
        return "statement"
    args = getattr(orig, "args", ())
    code = args[0] if args and isinstance(args[0], int) else None
    if code == _MYSQL_LOCK_TIMEOUT:
        return "lock"
    if code in _MYSQL_STATEMENT_TIMEOUT:
        return "statement"
    if type(orig).__module__.startswith("sqlite3") and "database is locked" in str(orig):
        return "lock"
    return None


@contextmanager
def _slow(what: str, url: str, bound: float) -> Iterator[None]:
    """Log a warning after ``SLOW`` seconds in the block, and now and then after that: a
    publish waiting on the database shows in the log before the bound ends it."""
    done = threading.Event()
    started = time.monotonic()

    def warn() -> None:
        pause = SLOW
        while not done.wait(pause):
            pause = 6 * SLOW  # then now and then: a big snapshot may rightly take minutes
            _log.warning(
                "still waiting for the database",
                database=url,
                doing=what,
                waited=f"{time.monotonic() - started:.0f}s",
                gives_up_after=f"{bound:.0f}s",
            )

    watcher = threading.Thread(target=warn, name="slow-database", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


class BuiltinSource(Source):
    """The tables of :mod:`mapsync.sources.schema`."""

    schema = "mapsync"
    # PostgreSQL reads in UTC: the publisher's times are naive UTC, and compared with a
    # timestamptz column (an expires_at an operator made one) they were taken for the
    # server's zone: east of UTC an expired alias went unseen by the fingerprint for that
    # many hours. Not for the operator's queries (schema "sql", [publisher.maps]: see
    # _server_zone), which run as their lookups.
    utc = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        self.engine = make_engine(url)
        _refuse_missing_sqlite_file(self.engine, self.safe_url)
        self._lock_conn: Connection | None = None
        event.listen(self.engine, "do_connect", self._connect_args)

    def _connect_args(self, dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> None:
        """Bound the connect itself (an unreachable host) and SQLite's busy wait; a value
        given in the URL's query wins."""
        name = self.engine.dialect.name
        if name in ("postgresql", "mysql", "mariadb"):
            cparams.setdefault("connect_timeout", max(1, int(self.lock_wait)))
        elif name == "sqlite":
            cparams.setdefault("timeout", float(self.lock_wait))

    def _fail(self, what: str, exc: SQLAlchemyError, hint: bool = True) -> SourceError:
        """``what`` failed, said with the database's words, its passwords redacted; ``hint``:
        name `init-db` when a table is missing (not for the operator's own queries)."""
        orig = getattr(exc, "orig", None)
        detail = str(orig) if orig is not None else str(exc)
        detail = detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__
        if hint and _NO_TABLE.search(detail):
            detail += " (is this mapsync's database? `mapsync init-db` creates the schema)"
        elif no_privilege(orig) and self.engine.dialect.name == "sqlite":
            detail += (
                " (a reader of a SQLite database in WAL mode creates its -wal and -shm files "
                "beside it: the publisher's user needs write access to that directory, "
                "docs/database.md)"
            )
        elif no_privilege(orig):
            detail += (
                " (the publisher's database user needs SELECT on every table it reads, and "
                "nothing more: docs/database.md has the GRANTs)"
            )
        hit = _bound_hit(orig)
        if hit == "lock":
            detail = (
                f"another session holds a lock longer than [publisher] lock_wait "
                f"({self.lock_wait:.0f}s) allows ({detail})"
            )
        elif hit == "statement":
            detail = (
                f"a statement ran longer than [publisher] statement_timeout "
                f"({self.statement_timeout:.0f}s) allows ({detail})"
            )
        return SourceError(f"database {self.safe_url}: {what} failed: {redact(detail, self.url)}")

    def fingerprint(self, secrets: bool = False) -> Fingerprint:
        """Row count and newest ``updated_at`` per table, and the aliases expired by now, read
        in one short transaction."""
        what = "reading the change fingerprint"
        try:
            with (
                _slow(what, self.safe_url, self.lock_wait),
                self.engine.connect() as conn,
                conn.begin(),
            ):
                _bound(conn, self.lock_wait, self.statement_timeout, self.utc)
                return _fingerprint(conn)
        except SQLAlchemyError as exc:
            raise self._fail(what, exc) from None

    def snapshot(self, secrets: bool = False) -> Snapshot:
        return self._snapshot(secrets, None)

    def snapshot_since(self, since: Mark, secrets: bool = False) -> Snapshot:
        return self._snapshot(secrets, since)

    @contextmanager
    def reading(self, what: str, bound: float | None = None) -> Iterator[Connection]:
        """One read-only, repeatable-read transaction (one instant of the database), its
        waits bounded and a slow one logged after ``bound`` (default: statement_timeout); a
        database error is a :class:`SourceError` saying ``what`` failed."""
        try:
            with (
                _slow(what, self.safe_url, self.statement_timeout if bound is None else bound),
                self.engine.connect() as raw,
            ):
                conn = _read_only(raw)
                with conn.begin():
                    _bound(conn, self.lock_wait, self.statement_timeout, self.utc)
                    _begin(conn)
                    _refuse_lossy_charset(conn, self.safe_url)
                    yield conn
        except SQLAlchemyError as exc:
            raise self._fail(what, exc) from None

    def _snapshot(self, secrets: bool, since: Mark | None) -> Snapshot:
        self._secrets = secrets
        with paused_gc(), self.reading("reading the snapshot") as conn:
            snap = self._read(conn)
            if self.maps:  # the operator's own maps: the same instant
                self._server_zone(conn)
                maps.read_all(conn, self, snap)
            if since is not None:
                if snap.mark is None:
                    raise NotIncremental("the database has no deletion log (run `mapsync init-db`)")
                # The same instants as the snapshot's: an alias that expires between two
                # clocks would otherwise be in the snapshot and gone from the changes.
                snap.changes = self._changes(
                    conn, since, snap.fingerprint, snap.mark.now, snap.mark.clock
                )
            return snap

    def changes(self, since: Mark, secrets: bool = False) -> Changes:
        """The rows changed since ``since`` (:mod:`mapsync.sources.changes`), read in one
        read-only transaction."""
        self._secrets = secrets
        with self.reading("reading the changes") as conn:
            db_clock = clock(conn)  # first, as in _read
            now = datetime.now(UTC).replace(tzinfo=None)
            return self._changes(conn, since, _fingerprint(conn), now, db_clock)

    def _changes(
        self,
        conn: Connection,
        since: Mark,
        fingerprint: Fingerprint,
        now: datetime,
        db_clock: datetime,
    ) -> Changes:
        if self.maps:
            raise NotIncremental("maps of your own are read whole")
        return read_changes(conn, since, fingerprint, now, db_clock, self._account_columns(conn))

    def maps_fingerprint(self) -> dict[str, tuple[int, str | None]]:
        """What tells a change in each map of ``maps``, read in one read-only transaction."""
        if not self.maps:
            return {}
        with self.reading("reading the change fingerprint of [publisher.maps]") as conn:
            self._server_zone(conn)
            return maps.fingerprints(conn, self)

    def _server_zone(self, conn: Connection) -> None:
        """Back to the session's own zone (the server's, the role's, the URL's) for the
        operator's queries of [publisher.maps], which ran in it before :attr:`utc` and may
        rely on it (``current_date``, ``localtimestamp``, a timestamptz shown as text)."""
        if self.utc and conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL TimeZone TO DEFAULT")

    def _account_columns(self, conn: Connection) -> list[ColumnElement[Any]]:
        """The columns of :class:`Account`, in its order, as this run reads them."""
        columns: list[ColumnElement[Any]] = [
            t.account.c.id,
            t.account.c.domain_id,
            t.account.c.local_part,
            t.account.c.mailstore_id,
            t.account.c.status,
        ]
        # The home is read for every run (validation fails a bad one in every channel);
        # hashes and quotas only for a channel that carries them.
        if getattr(self, "_secrets", False):
            columns += [
                t.account.c.password_hash,
                t.account.c.home,
                t.account.c.quota_bytes,
                t.account.c.customer_id if self.customers else null(),
            ]
        else:  # NULL from the database: every row has all of Account's fields
            columns += [null(), _unless_plain(conn.dialect.name, t.account.c.home), null(), null()]
        assert len(columns) == len(Account._fields)
        return columns

    def _read(self, conn: Connection) -> Snapshot:
        # The database's clock first: a row committed while the rows below are read (and so
        # not among them) is stamped after it, and the next change read finds it.
        db_clock = clock(conn)
        # The fingerprint is read inside the same transaction, so it describes these rows.
        fingerprint = _fingerprint(conn)

        problems: list[Problem] = []
        mailstores = []
        for ms_id, name, lmtp_host, lmtp_port, imap_host, imap_port, active in conn.execute(
            select(
                t.mailstore.c.id,
                t.mailstore.c.name,
                t.mailstore.c.lmtp_host,
                t.mailstore.c.lmtp_port,
                t.mailstore.c.imap_host,
                t.mailstore.c.imap_port,
                type_coerce(t.mailstore.c.active, Integer),  # raw: see read_denied
            ).order_by(t.mailstore.c.id)
        ):
            if active not in (0, 1):
                problems.append(_no_boolean("mailstore", ms_id, name, "active", active))
            mailstores.append(
                Mailstore(ms_id, name, lmtp_host, lmtp_port, imap_host, imap_port, active != 0)
            )
        customer_status = {}
        customers = {}
        for cid, status, ext_id in conn.execute(
            select(t.customer.c.id, t.customer.c.status, t.customer.c.ext_id)
        ):
            customer_status[cid] = status
            customers[cid] = ext_id
        domains = []
        for row in conn.execute(
            select(
                t.domain.c.id,
                t.domain.c.name,
                t.domain.c.name_unicode,
                t.domain.c.kind,
                t.domain.c.target_domain_id,
                t.domain.c.default_mailstore_id,
                t.domain.c.relay_nexthop,
                t.domain.c.status,
                t.domain.c.customer_id,
            ).order_by(t.domain.c.id)
        ):
            status = cascade_status(row.status, customer_status.get(row.customer_id))
            domains.append(Domain(*row[:7], status=status, customer_id=row.customer_id))
        columns = self._account_columns(conn)
        # Progress totals: counting is a scan, made only for a terminal that shows them.
        rows = _counts(conn) if progress.reporting() else {}
        accounts = list(
            map(
                _as(Account),
                track(
                    _plain_stream(conn.execute(select(*columns).order_by(t.account.c.id))),
                    "read accounts",
                    rows.get("account"),
                ),
            )
        )
        # Only the accounts denied a service (few): the allow_* columns of the rest stay unread.
        bad: list[tuple[int, str, Any]] = []
        denied = read_denied(conn, bad=bad)
        names = {d.id: d.name for d in domains}  # for naming a bad row
        if bad:
            ids = {i for i, _, _ in bad}
            where = {a.id: a for a in accounts if a.id in ids}
            for account_id, column, value in bad:
                a = where.get(account_id)
                key = f"{a.local_part}@{names.get(a.domain_id, '?')}" if a else str(account_id)
                problems.append(_no_boolean("account", account_id, key, column, value))
        grants = [
            SenderGrant(*row)
            for row in conn.execute(
                select(t.sender_grant.c.account_id, t.sender_grant.c.address).order_by(
                    t.sender_grant.c.account_id, t.sender_grant.c.address
                )
            )
        ]
        now = datetime.now(UTC).replace(tzinfo=None)
        # Sorted here, not by ORDER BY: the database's collation (ICU, glibc) may put '@'
        # before digits, and the maps must be byte-identical whatever the database.

        def read_targets(order: Callable[[Iterable[Any]], list[Any]]) -> dict[int, tuple[str, ...]]:
            return {
                alias_id: tuple(order(map(_second, group)))
                for alias_id, group in groupby(
                    track(
                        _plain_stream(
                            conn.execute(
                                select(t.alias_target.c.alias_id, t.alias_target.c.target).order_by(
                                    t.alias_target.c.alias_id
                                )
                            )
                        ),
                        "read alias targets",
                        rows.get("alias_target"),
                    ),
                    _first,
                )
            }

        try:
            targets = read_targets(sorted)
        except TypeError:  # a BLOB among text (SQLite): read again, for validation to name
            targets = read_targets(_sorted_targets)
        alias = _as(Alias)
        no_targets: tuple[str, ...] = ()
        aliases = []
        for alias_id, domain_id, local_part, expires_at, active in track(
            _stream(
                conn.execute(
                    select(*ALIAS_COLUMNS)
                    .where(alias_read(conn.dialect.name))
                    .order_by(t.alias.c.id)
                )
            ),
            "read aliases",
        ):
            if active not in (0, 1):
                key = f"{local_part}@{names.get(domain_id, '?')}"
                problems.append(_no_boolean("alias", alias_id, key, "active", active))
                continue
            try:
                ends = expiry(expires_at)
            except ValueError as exc:  # text that is no time (SQLite): an invalid row
                key = f"{local_part}@{names.get(domain_id, '?')}"
                problems.append(Problem("alias", alias_id, key, str(exc)))
                continue
            if ends is None or ends > now:
                targets_of = targets.get(alias_id, no_targets)
                aliases.append(alias((alias_id, domain_id, local_part, targets_of)))
        return Snapshot(
            mark=read_mark(conn, fingerprint, now, db_clock),
            mailstores=mailstores,
            domains=domains,
            accounts=accounts,
            aliases=aliases,
            fingerprint=fingerprint,
            sender_grants=grants,
            denied=denied,
            customers=customers,
            secrets=getattr(self, "_secrets", False),
            taken_at=datetime.now(UTC),
            problems=problems,
        )

    @contextmanager
    def lock(self, wait: float = 30.0) -> Iterator[None]:
        """A session lock in the database, so publishers on different hosts (a standby)
        never publish at the same time: on PostgreSQL an advisory lock, on MariaDB/MySQL
        ``GET_LOCK``. Waits up to ``wait`` seconds, then LockBusy. SQLite: none (one host)."""
        dialect = self.engine.dialect.name
        if dialect not in ("postgresql", "mysql", "mariadb"):
            yield
            return
        try:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as exc:
            raise self._fail("taking the publisher lock", exc) from None
        try:
            if dialect == "postgresql":
                self._pg_lock(conn, wait)
            else:
                self._named_lock(conn, wait)
            self._lock_conn = conn
            try:
                yield
            finally:
                self._lock_conn = None
                self._unlock(conn, dialect)
        except SQLAlchemyError as exc:
            raise self._fail("holding the publisher lock", exc) from None
        finally:
            conn.close()

    def _pg_lock(self, conn: Connection, wait: float) -> None:
        deadline = time.monotonic() + wait
        while not conn.execute(select(func.pg_try_advisory_lock(ADVISORY_LOCK))).scalar():
            if time.monotonic() >= deadline:
                raise LockBusy(
                    f"database {self.safe_url}: another publisher holds advisory lock "
                    f"{ADVISORY_LOCK} (waited {wait:.0f}s)"
                )
            time.sleep(0.5)

    def _lock_name(self) -> str:
        # GET_LOCK names are server-wide: name the database, so two mapsync databases on one
        # server do not exclude each other (at most 64 characters).
        return f"mapsync:{self.engine.url.database or ''}"[:64]

    def _named_lock(self, conn: Connection, wait: float) -> None:
        got = conn.execute(
            text("SELECT GET_LOCK(:name, :wait)"),
            {"name": self._lock_name(), "wait": max(0, int(wait))},
        ).scalar()
        if got != 1:
            raise LockBusy(
                f"database {self.safe_url}: another publisher holds lock {self._lock_name()!r} "
                f"(waited {wait:.0f}s)"
            )

    def _unlock(self, conn: Connection, dialect: str) -> None:
        try:
            if dialect == "postgresql":
                conn.execute(select(func.pg_advisory_unlock(ADVISORY_LOCK)))
            else:
                conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": self._lock_name()})
        except SQLAlchemyError as exc:
            # The session is gone, and its lock with it: what was published stays published.
            _log.warning(
                "publisher lock not released: its session is gone, and the lock with it",
                database=self.safe_url,
                error=redact(
                    str(getattr(exc, "orig", None) or exc).strip().splitlines()[0], self.url
                ),
            )

    def check_lock(self) -> None:
        """Raise SourceError unless the lock taken by :meth:`lock` is still held by this
        session. Its session can die under a running publish (``pg_terminate_backend``, a
        pooler, the network), and the database then lets another publisher in."""
        conn = self._lock_conn
        if conn is None:
            return
        lost = f"database {self.safe_url}: the publisher lock was lost while publishing"
        try:
            if conn.dialect.name == "postgresql":
                held = conn.execute(
                    _PG_HELD, {"hi": ADVISORY_LOCK >> 32, "lo": ADVISORY_LOCK & 0xFFFFFFFF}
                ).scalar()
            else:
                held = conn.execute(
                    text("SELECT IS_USED_LOCK(:name) = CONNECTION_ID()"),
                    {"name": self._lock_name()},
                ).scalar()
        except SQLAlchemyError as exc:
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            raise SourceError(
                f"{lost} ({redact(detail[0], self.url) if detail else type(exc).__name__}); "
                "not committing"
            ) from None
        if not held:
            raise SourceError(f"{lost} (another session may hold it now); not committing")

    def close(self) -> None:
        """Close the engine's pooled connections."""
        self.engine.dispose()


def _fingerprint(conn: Connection, now: datetime | None = None) -> Fingerprint:
    """Newest ``updated_at`` per table and the newest id of ``mapsync_deleted`` (an insert or
    an update moves the first, a delete the second), plus the newest expiry that has passed
    by ``now`` (default: the current UTC time), since expiry changes the maps without a
    write: each one index lookup, however many rows.

    A database whose ``init-db`` predates the deletion log is fingerprinted as before, with
    a row count per table (a scan of each), until ``init-db`` runs again.

    :mod:`mapsync.sources.sqlite_fingerprint` reads the same on a SQLite file without
    SQLAlchemy (a change here is made there too; a test compares the two)."""
    if not conn.dialect.has_table(conn, t.deleted.name):
        return _counted_fingerprint(conn)
    tables: dict[str, tuple[int, str | None]] = {}
    now = now or datetime.now(UTC).replace(tzinfo=None)
    expired = select(t.finite(func.max(t.alias.c.expires_at))).where(t.alias.c.expires_at <= now)
    row = conn.execute(  # one round trip
        select(
            *(
                select(t.finite(func.max(table.c.updated_at))).scalar_subquery().label(table.name)
                for table in t.TABLES
            ),
            expired.scalar_subquery().label("alias_expired"),
            select(func.max(t.deleted.c.id)).scalar_subquery().label("deleted"),
        )
    ).one()
    for table in t.TABLES:
        tables[table.name] = (0, _newest(conn, table, row._mapping[table.name]))
    tables["alias_expired"] = (0, _stamp(row._mapping["alias_expired"]))
    tables[t.deleted.name] = (int(row._mapping["deleted"] or 0), None)
    return Fingerprint(tables)


def _raw(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """A timestamp column read as the driver gives it: SQLite keeps any text there ('now',
    written by a writer as PostgreSQL would read it), which DateTime's result processor
    refuses with a ValueError naming nothing (every publish failed)."""
    return type_coerce(column, String)


def _is_time(text: str) -> bool:
    """Whether SQLite's ``text`` is a time as SQLAlchemy's DateTime reads it (ISO 8601)."""
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _newest(conn: Connection, table: Table, newest: Any) -> str | None:
    """``table``'s newest ``updated_at`` as read raw, as the fingerprint's text; InvalidData
    naming the rows where it is no time: SQLite's text or number (a writer's Unix time),
    which every change read would fail on, or PostgreSQL's 'infinity' (held to t.LATEST),
    after which no later change shows."""
    if newest is not None and not (
        isinstance(newest, datetime) or (isinstance(newest, str) and _is_time(newest))
    ):
        raise _no_stamp(conn, table, newest)
    if isinstance(newest, datetime) and naive(newest) >= t.LATEST:
        raise _no_stamp(conn, table, newest)
    return _stamp(newest)


def _stamp(value: Any) -> str | None:
    """A newest stamp of the fingerprint as text, as DateTime's result gave it: a
    datetime's str(), a SQLite text read as one where it is one, else the text as stored."""
    if value is None:
        return None
    return str(
        datetime.fromisoformat(value) if isinstance(value, str) and _is_time(value) else value
    )


def _no_stamp(conn: Connection, table: Table, newest: str | float | datetime) -> InvalidData:
    """The rows of ``table`` whose ``updated_at`` is ``newest``, which is no time (SQLite
    keeps 'now' as text; as text it sorts after every real stamp, so it would stay the
    table's newest and hide every later change from the fingerprint; a number, newest where
    every row has one, is no stamp a change read can start from; PostgreSQL's 'infinity',
    held to t.LATEST, would stay the newest too)."""
    infinite = isinstance(newest, datetime)
    keys = conn.execute(
        select(*table.primary_key.columns)
        .where(table.c.updated_at >= t.LATEST if infinite else _raw(table.c.updated_at) == newest)
        .limit(5)
    ).all()
    if infinite:
        newest = "infinity"
    named = ", ".join(
        " ".join(f"{c.name}={v!r}" for c, v in zip(table.primary_key.columns, k, strict=True))
        for k in keys
    )
    return InvalidData(
        [
            f"{table.name} {named}: updated_at {newest!r} is not a date and time (write the "
            "current UTC time, docs/howto.md, or leave updated_at to the trigger)"
        ]
    )


# What validate.GOOD_HOME admits after the leading '/': printable ASCII but ':' (and space).
_HOME_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != ":")


def _unless_plain(dialect: str, home: ColumnElement[Any]) -> ColumnElement[Any]:
    """``home``, or NULL where the database itself can tell it is one validation accepts
    (absolute, printable ASCII without ':' or a space, no '/..'): a run whose channels do not
    carry homes then holds no string for the plain ones (1M accounts: 80 MB), and only the
    others are validated in Python, with the same messages as ever. The tests are strict
    subsets of validate's (bytes, whole string): anything doubtful is read."""
    no_dots = func.instr(home, "/..") == 0
    if dialect == "sqlite":  # GLOB: whole string, code points, case-sensitive
        glob = home.op("GLOB", is_comparison=True)
        plain = and_(glob("/*"), not_(glob("*[^!-9;-~]*")), no_dots)
    elif dialect == "postgresql":  # every character in the list, none by a collated range
        plain = and_(
            func.left(home, 1) == "/",
            func.translate(home, _HOME_CHARS, "") == "",
            func.strpos(home, "/..") == 0,
        )
    elif dialect in ("mysql", "mariadb"):  # bytes; \z, not $, which admits a final newline
        pattern = literal(r"^/[!-9;-~]*\z", String())
        plain = and_(cast(home, LargeBinary).op("REGEXP", is_comparison=True)(pattern), no_dots)
    else:
        return home
    return case((plain, null()), else_=home)


def _counts(conn: Connection) -> dict[str, int]:
    """Rows of the two largest tables, for the progress of reading them."""
    return {
        table.name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())
        for table in (t.account, t.alias_target)
    }


def _counted_fingerprint(conn: Connection) -> Fingerprint:
    """Row count and newest ``updated_at`` per table, plus how many aliases have expired by
    now: the fingerprint of a database without ``mapsync_deleted`` (see :func:`_fingerprint`)."""
    tables: dict[str, tuple[int, str | None]] = {}
    for table in t.TABLES:
        count, newest = conn.execute(
            select(func.count(), func.max(_raw(table.c.updated_at))).select_from(table)
        ).one()
        tables[table.name] = (int(count), _newest(conn, table, newest))
    now = datetime.now(UTC).replace(tzinfo=None)
    expired = conn.execute(
        select(func.count()).select_from(t.alias).where(t.alias.c.expires_at <= now)
    ).scalar_one()
    tables["alias_expired"] = (int(expired), None)
    return Fingerprint(tables)


R = TypeVar("R", bound=tuple[Any, ...])
_BATCH = 10_000  # rows per fetch: large enough to amortise the call, small against the table
_first = itemgetter(0)
_second = itemgetter(1)


def _stream(result: CursorResult[Any]) -> Iterator[Any]:
    """The rows of ``result``, fetched ``_BATCH`` at a time (no per-row fetch call)."""
    return chain.from_iterable(result.partitions(_BATCH))


def _plain_stream(result: CursorResult[Any]) -> Iterator[tuple[Any, ...]]:
    """The rows of ``result`` as the driver returns them, ``_BATCH`` at a time from its
    cursor: for the two largest reads (accounts, alias targets), whose columns are integers
    and strings that no SQLAlchemy result processor changes (tests/integration/
    test_plain_read.py compares both ways on each engine). Skipping the ``Row`` objects saves
    a fifth of reading the accounts (1M: 3.8 -> 3.0 s). A driver error while fetching (a
    statement timeout interrupting SQLite) is raised as SQLAlchemy's, as ``_stream`` would."""
    cursor = result.cursor
    dbapi_error = result.dialect.loaded_dbapi.Error

    def batches() -> Iterator[Any]:
        try:
            while rows := cursor.fetchmany(_BATCH):
                yield rows
        except dbapi_error as exc:
            raise DBAPIError.instance(None, None, exc, dbapi_error) from exc
        finally:
            # Closed with its connection if the read was left (a signal): closing the cursor
            # of a closed connection would log a traceback ("Error closing cursor").
            if not (connection.closed or connection.invalidated):
                result.close()

    connection = result.context.root_connection
    return chain.from_iterable(batches())


def _as(row_type: type[R]) -> Callable[[Iterable[Any]], R]:
    """``row_type`` built straight from a row holding exactly its fields, in order:
    ``tuple.__new__`` runs in C, where ``row_type(*row)`` runs the NamedTuple's Python
    ``__new__`` once per row (a third of reading the accounts)."""
    return partial(tuple.__new__, row_type)


def _sorted_targets(targets: Iterable[Any]) -> list[Any]:
    """An alias's targets in order, a BLOB among them (SQLite keeps one in a TEXT column)
    sorted by its text."""
    return sorted(
        targets, key=lambda x: x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
    )


def _no_boolean(table_: str, row: int, key: str, column: str, value: Any) -> Problem:
    """A BOOLEAN column holding something else (SQLite keeps any text there, 'false' too;
    MariaDB a 2), named with its row. Refused like any invalid row; the rest of the check
    takes a mailstore or a service so marked as on, so that this is the one problem named."""
    return Problem(table_, row, key, f"{column} {value!r} is not a boolean (0 or 1)", column)


def cascade_status(domain_status: str, customer_status: str | None) -> str:
    """A suspended or closed customer suspends or disables all its domains."""
    if customer_status == "closed" or domain_status == "disabled":
        return "disabled"
    if customer_status == "suspended" or domain_status == "suspended":
        return "suspended"
    return domain_status

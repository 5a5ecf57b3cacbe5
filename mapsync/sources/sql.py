"""Reads any schema through the operator's own SELECTs (``schema = "sql"``), read-only.

Each query of ``[publisher.sql]`` returns rows of one table of mapsync's model, in columns
named by a contract (docs/sql-schema.md): ``domains``, ``accounts``, ``aliases`` and,
optionally, ``mailstores``, ``alias_domains``, ``forwards``, ``sender_grants``. Rows link by
names, not ids: an account names its address and its mailstore, an alias its address and its
targets (a comma or space separated list, or one row per target: rows of one address are
merged).

- Every query runs inside the one read-only, repeatable-read transaction of
  :class:`~mapsync.sources.builtin.BuiltinSource` (same engine, lock and time limits), wrapped
  as ``SELECT <contract columns> FROM (<query>) AS q``: only the columns mapsync uses are fetched,
  and ``password_hash`` and ``quota_bytes`` only when a channel carries them.
- An empty read of each query first (``WHERE 1 = 0``) checks its columns: a missing one is an
  error naming the query and the column, before any row is read.
- A row that cannot be read into the model (NULL or a wrong type where a value is needed, an
  unknown status, a domain nobody defines) is an invalid row naming the query and its key, for
  validation to report with the rest (``--skip-invalid`` leaves it out).
- The cheap "nothing changed" check runs ``fingerprint``, a one-row SELECT the operator writes
  (counts and newest change time per table); without one, the check is a digest of every row
  the snapshot reads (correct, never cheap: the read is kept for the snapshot that follows).

Config example::

    [publisher]
    database = "postgresql+psycopg://mapsync_ro@db.example.net/billing"
    schema = "sql"
    utc = False  # the queries run in the server's zone, as the live lookups they stand for

    [publisher.sql]
    domains = "SELECT name, 'hosted' AS kind FROM mail_domains WHERE enabled"
    accounts = "SELECT email AS address, pw AS password_hash, quota_mb * 1048576 AS quota_bytes FROM users"
    aliases = "SELECT source AS address, destination AS targets FROM redirects"
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import Connection, TextClause, text
from sqlalchemy.exc import SQLAlchemyError

from mapsync.config import SqlConfig
from mapsync.errors import SourceError
from mapsync.snapshot import (
    Account,
    Alias,
    Domain,
    Fingerprint,
    Mailstore,
    SenderGrant,
    Snapshot,
    paused_gc,
)
from mapsync.sources.builtin import (
    BuiltinSource,
    _bound_hit,
    _stream,
    redact,
)
from mapsync.validate import Problem


@dataclass(frozen=True)
class Query:
    """The contract of one query: the model table its rows become, its columns."""

    table: str  # the model table (Problem.table)
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    # Alternatives: one of these column sets names the row (an address, or its two halves).
    names: tuple[tuple[str, ...], ...] = ()
    secret: tuple[str, ...] = ()  # read only with secrets (password hashes, quotas)


_ADDRESS = (("address",), ("local_part", "domain"))
CONTRACT = {
    "mailstores": Query(
        "mailstore", ("name", "lmtp_host"), ("lmtp_port", "imap_host", "imap_port", "active")
    ),
    "domains": Query(
        "domain",
        ("name",),
        ("kind", "status", "active", "mailstore", "target", "relay_nexthop", "name_unicode"),
    ),
    "alias_domains": Query("domain", ("name", "target"), ("status", "active")),
    "accounts": Query(
        "account",
        (),
        ("mailstore", "status", "active", "home", "password_hash", "quota_bytes"),
        _ADDRESS,
        ("password_hash", "quota_bytes"),
    ),
    "aliases": Query("alias", ("targets",), ("active",), _ADDRESS),
    "forwards": Query("forward", ("targets",), ("active",), _ADDRESS),
    "sender_grants": Query("sender_grant", ("account", "address"), ("active",)),
}
DOMAIN_STATUS = ("active", "suspended", "disabled")
ACCOUNT_STATUS = ("active", "login_disabled", "disabled", "moving")
KINDS = ("hosted", "relay", "alias")
# The query a model table's rows come from, unless noted per row (alias_domains).
_QUERY_OF = {query.table: name for name, query in reversed(CONTRACT.items())}
_TRUE = {"1", "t", "true", "y", "yes", "on"}
_FALSE = {"0", "f", "false", "n", "no", "off"}
_SPLIT = re.compile(r"[,\s]+")


# What text() would take for a bind parameter (':name'): the operator's SQL has none, and a
# literal such as '[mx.example.net]:25' must reach the database as written.
_BIND = re.compile(r"(?<![:\w\\]):(?=\w)")


def _sql(query: str) -> TextClause:
    """``query`` as SQL text, every ``:`` taken literally."""
    return text(_BIND.sub(r"\\:", query))


class RowError(Exception):
    """One row cannot be read into the model; the message says why."""


class SqlSource(BuiltinSource):
    """The operator's SELECTs of ``[publisher.sql]``, read into the neutral model.

    Shares the engine, the read-only repeatable-read transaction, the time limits and the
    publisher lock of :class:`~mapsync.sources.builtin.BuiltinSource`."""

    schema = "sql"

    def __init__(self, url: str, settings: SqlConfig) -> None:
        super().__init__(url)
        self.settings = settings
        self._kept: tuple[bool, Snapshot] | None = None  # the fallback fingerprint's read

    # --- reading -------------------------------------------------------------------------

    def fingerprint(self, secrets: bool = False) -> Fingerprint:
        """The ``fingerprint`` queries' rows; without them the digest of a full read, kept for :meth:`snapshot`."""
        if self.settings.fingerprint is None:
            # No cheap check configured: the digest of a full read, kept for the snapshot.
            snap = self.snapshot(secrets)
            self._kept = (secrets, snap)
            return snap.fingerprint
        with self.reading("reading the change fingerprint", self.lock_wait) as conn:
            return self._fingerprint(conn)

    def snapshot(self, secrets: bool = False) -> Snapshot:
        """The read :meth:`fingerprint` just made, when it made one with the same ``secrets``; else a new one."""
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == secrets:
            return kept[1]  # read a moment ago, in one transaction, by fingerprint()
        return super().snapshot(secrets)

    def _settings_digest(self) -> str:
        blob = json.dumps(asdict(self.settings), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def _fingerprint(self, conn: Connection) -> Fingerprint:
        """The operator's fingerprint row, plus the settings (a changed query is a change)."""
        query = self.settings.fingerprint
        assert query is not None
        rows = self._run(conn, "fingerprint", query)
        if len(rows) != 1:
            raise SourceError(
                f"{self.settings.where} fingerprint: must return exactly one row, "
                f"returned {len(rows)}"
            )
        values = json.dumps([_plain(v) for v in rows[0]], default=str)
        return Fingerprint({"fingerprint": (0, values), "settings": (0, self._settings_digest())})

    def _run(self, conn: Connection, name: str, query: str) -> list[Any]:
        """Run ``query`` (named ``name`` in errors) inside a savepoint: a failing query is
        named, and PostgreSQL's transaction stays usable for the message."""
        try:
            with conn.begin_nested():
                return list(conn.execute(_sql(query)).all())
        except SQLAlchemyError as exc:
            raise self._query_failed(name, exc) from None

    def _query_failed(self, name: str, exc: SQLAlchemyError) -> SourceError:
        orig = getattr(exc, "orig", None)
        if _bound_hit(orig) is not None:
            # A time limit is the database's trouble, not the query's: said as ever.
            return self._fail(f"running {self.settings.where} {name}", exc)
        detail = str(orig) if orig is not None else str(exc)
        first = detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__
        return SourceError(
            f"{self.settings.where} {name}: the query failed on database {self.safe_url}: "
            f"{redact(first, self.url)}"
        )

    def _columns(self, conn: Connection, name: str, secrets: bool) -> list[tuple[str, str]]:
        """(contract column, the query's own spelling) of what query ``name`` is read for."""
        contract = CONTRACT[name]
        probe = f"SELECT * FROM ({self.settings.queries[name]}) AS q WHERE 1 = 0"
        try:
            with conn.begin_nested():
                result = conn.execute(_sql(probe))
                names = list(result.keys())
                have = {str(k).lower(): str(k) for k in names}
                result.close()
        except SQLAlchemyError as exc:
            raise self._query_failed(name, exc) from None
        where = f"{self.settings.where} {name}"
        listed = ", ".join(sorted(have.values())) or "none"
        missing = [c for c in contract.required if c not in have]
        if contract.names and not any(all(c in have for c in alt) for alt in contract.names):
            missing.insert(0, " or ".join("+".join(alt) for alt in contract.names))
        if missing:
            raise SourceError(
                f"{where}: the query returns no column {', '.join(map(repr, missing))} "
                f"(it returns: {listed}; docs/sql-schema.md lists the columns)"
            )
        if secrets and name == "accounts" and "password_hash" not in have:
            raise SourceError(
                f"{where}: the query returns no column 'password_hash', which dovecot_users "
                f"needs (it returns: {listed})"
            )
        # The first way of naming the row that the query offers (an address, or its halves).
        wanted = list(next((alt for alt in contract.names if all(c in have for c in alt)), ()))
        wanted += [c for c in (*contract.required, *contract.optional) if c in have]
        if not secrets:
            wanted = [c for c in wanted if c not in contract.secret]
        return [(c, have[c]) for c in dict.fromkeys(wanted)]

    def _select(self, conn: Connection, name: str, secrets: bool) -> list[dict[str, Any]]:
        """Query ``name``'s rows, as dicts of contract columns; only those columns are read."""
        if name not in self.settings.queries:
            return []
        columns = self._columns(conn, name, secrets)
        quote = conn.dialect.identifier_preparer.quote
        wrapped = (
            f"SELECT {', '.join(quote(real) for _, real in columns)} "
            f"FROM ({self.settings.queries[name]}) AS q"
        )
        keys = [c for c, _ in columns]
        try:
            with conn.begin_nested():
                result = conn.execute(_sql(wrapped))
                return [dict(zip(keys, row, strict=True)) for row in _stream(result)]
        except SQLAlchemyError as exc:
            raise self._query_failed(name, exc) from None

    def _read(self, conn: Connection) -> Snapshot:
        secrets = getattr(self, "_secrets", False)
        rows = {name: self._select(conn, name, secrets) for name in CONTRACT}
        with paused_gc():
            snap = _Reader(self.settings, secrets).build(rows)
        if self.settings.fingerprint is not None:
            fingerprint = self._fingerprint(conn)
        else:
            fingerprint = _digest(snap, self._settings_digest())
        snap.fingerprint = fingerprint
        return snap


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return value


def _digest(snap: Snapshot, settings: str) -> Fingerprint:
    """Every row the snapshot holds, hashed: changes whenever any map could."""
    h = hashlib.sha256()
    for part in (
        snap.mailstores,
        snap.domains,
        snap.accounts,
        snap.aliases,
        snap.forwards,
        snap.sender_grants,
        [p[:4] for p in snap.problems],
    ):
        for row in part:
            h.update(repr(row).encode())
            h.update(b"\n")
        h.update(b"\x00")
    return Fingerprint({"rows": (len(snap.accounts), h.hexdigest()), "settings": (0, settings)})


# --- values --------------------------------------------------------------------------------


def _text(row: dict[str, Any], column: str, *, required: bool = True) -> str | None:
    """Column ``column`` of ``row`` as text (bytes decoded as UTF-8); RowError for a NULL
    where ``required``, and for any other type."""
    value = row.get(column)
    if type(value) is str:  # nearly always: once per column and row, so first
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = bytes(value).decode()
        except UnicodeDecodeError:
            raise RowError(f"column {column!r} is not UTF-8 text") from None
    if value is None:
        if required:
            raise RowError(f"column {column!r} is NULL")
        return None
    if not isinstance(value, str):
        raise RowError(f"column {column!r} is {value!r} ({type(value).__name__}), not text")
    return value


def _flag(row: dict[str, Any], column: str = "active") -> bool:
    """A boolean as the engines spell it: true/false, 1/0, '1'/'0', 't'/'f', 'y'/'n'."""
    value = row.get(column, True)  # no such column: every row is on
    if value is True or value is False:
        return value
    if isinstance(value, int | Decimal) and value in (0, 1):
        return bool(value)
    if isinstance(value, str | bytes):
        word = (value.decode(errors="replace") if isinstance(value, bytes) else value).lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise RowError(f"column {column!r} is {value!r}, not a boolean (true/false, 1/0)")


def _number(value: Any) -> Any:
    """An integer column (port, quota): ints as they are, an integral DECIMAL as an int;
    anything else as it is, for validation to refuse naming the row and column."""
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _status(row: dict[str, Any], allowed: tuple[str, ...]) -> str:
    """``status`` if the query has one (one of ``allowed``), else from ``active``; an
    inactive row is disabled whatever its status."""
    status = "active"
    if "status" in row:
        given = _text(row, "status")
        assert given is not None
        status = given if given in allowed else given.lower()
        if status not in allowed:
            raise RowError(f"status {given!r} is not one of {', '.join(allowed)}")
    if "active" in row and not _flag(row):
        status = "disabled"
    return status


def _address(row: dict[str, Any], *, catchall: bool = False) -> tuple[str, str]:
    """(local part, domain) of a row's ``address`` or ``local_part`` + ``domain``."""
    if "address" in row:
        address = _text(row, "address")
        assert address is not None
        if address.isascii():  # nearly always: lowercase it whole
            address = address.lower()
        local, at, domain = address.rpartition("@")
        if not at:
            raise RowError(f"address {address!r} has no '@'")
    else:
        local = _text(row, "local_part", required=False) or ""
        domain = _text(row, "domain") or ""
    if not local and not catchall:
        raise RowError("address has no local part")
    return _lower(local), _lower(domain)


def _lower(name: str) -> str:
    """``name`` lowercased if it is ASCII. Python lowercases some other letters to ASCII
    (U+212A KELVIN SIGN → 'k'): a key must reach validation as the database holds it."""
    return name.lower() if name.isascii() else name


def _inactive(row: dict[str, Any]) -> bool:
    """The row says it is off (``active`` false or ``status`` disabled): then what else is
    wrong with it does not matter, it is left out anyway."""
    try:
        return not _flag(row) or str(row.get("status", "")).lower() == "disabled"
    except RowError:
        return False


def _preferred(written: str, other: str) -> bool:
    """Of two rows of one address differing in case, whether the row ``written`` so is the one
    used: the one written in lowercase, else the smaller as written (not the query's order)."""
    return (written != written.lower(), written) < (other != other.lower(), other)


def _targets(value: str | None) -> list[str]:
    return [t for t in _SPLIT.split(value or "") if t]


class _Reader:
    """Turns the queries' rows into the neutral model."""

    def __init__(self, settings: SqlConfig, secrets: bool) -> None:
        self.settings = settings
        self.secrets = secrets
        self.labels: dict[tuple[str, int], str] = {}
        self.problems: list[Problem] = []
        self.next_id: dict[str, int] = defaultdict(int)
        self.query_of: dict[tuple[str, int], str] = {}

    def describe(self, table: str, row: int, key: str) -> str:
        """A problem's row in the config's words: ``[publisher.sql] aliases 'sales@x.org'``."""
        label = self.labels.get((table, row))
        if label is not None:
            return label
        return f"[publisher.sql] {self.query_of.get((table, row), _QUERY_OF[table])} {key!r}"

    def _id(self, name: str) -> int:
        """The next id of ``name``'s model table (labels are made only for problems)."""
        table = CONTRACT[name].table
        self.next_id[table] += 1
        i = self.next_id[table]
        if name == "alias_domains":  # shares the table "domain" with the domains query
            self.query_of[(table, i)] = name
        return i

    def _bad(self, name: str, position: int, row: dict[str, Any], reason: str) -> None:
        """A row that cannot be read: a problem naming the query and the row's key."""
        shown = {k: v for k, v in row.items() if k not in CONTRACT[name].secret}
        key = next(
            (str(row[c]) for c in ("address", "name", "account") if row.get(c) is not None),
            f"row {position}",
        )
        i = self._id(name)
        table = CONTRACT[name].table
        self.labels[(table, i)] = f"[publisher.sql] {name} row {position} {_show(shown)}"
        self.problems.append(Problem(table, i, key, reason))

    def _each(
        self, name: str, rows: list[dict[str, Any]], read: Callable[[dict[str, Any]], None]
    ) -> None:
        for position, row in enumerate(rows, start=1):
            try:
                read(row)
            except RowError as exc:
                if not _inactive(row):
                    self._bad(name, position, row, str(exc))

    def build(self, rows: dict[str, list[dict[str, Any]]]) -> Snapshot:
        stores = self._mailstores(rows["mailstores"])
        store_ids = {m.name: m.id for m in stores}
        domains = self._domains(rows["domains"], rows["alias_domains"], store_ids)
        by_name = {d.name: d for d in domains}
        accounts = self._accounts(rows["accounts"], by_name, store_ids)
        domain_names = {d.id: d.name for d in domains}
        account_of = {f"{a.local_part}@{domain_names[a.domain_id]}": a for a in accounts}
        aliases = self._aliases("aliases", rows["aliases"], by_name)
        forwards = [
            fw
            for fw in self._aliases("forwards", rows["forwards"], by_name)
            # Only its own address: a plain mailbox (iRedMail and PostfixAdmin write such rows).
            if [t.lower() for t in fw.targets] != [f"{fw.local_part}@{domain_names[fw.domain_id]}"]
        ]
        grants = self._grants(rows["sender_grants"], account_of)
        return Snapshot(
            mailstores=stores,
            domains=domains,
            accounts=accounts,
            aliases=aliases,
            fingerprint=Fingerprint({}),
            taken_at=datetime.now(UTC),
            sender_grants=grants,
            secrets=self.secrets,
            forwards=forwards,
            describe=self.describe,
            problems=self.problems,
        )

    def _mailstores(self, rows: list[dict[str, Any]]) -> list[Mailstore]:
        stores: list[Mailstore] = []
        if "mailstores" not in self.settings.queries:
            for ms in self.settings.mailstores.values():
                i = self._id("mailstores")
                self.labels[("mailstore", i)] = f"[publisher.sql.mailstores.{ms.name}]"
                imap = ms.imap_host or ms.lmtp_host
                stores.append(
                    Mailstore(i, ms.name, ms.lmtp_host, ms.lmtp_port, imap, ms.imap_port, True)
                )
            return stores

        def read(row: dict[str, Any]) -> None:
            name, lmtp = _text(row, "name"), _text(row, "lmtp_host")
            assert name is not None and lmtp is not None
            imap = _text(row, "imap_host", required=False) or lmtp
            active = _flag(row)
            lport = _number(row.get("lmtp_port", 24))
            iport = _number(row.get("imap_port", 143))
            stores.append(Mailstore(self._id("mailstores"), name, lmtp, lport, imap, iport, active))

        self._each("mailstores", rows, read)
        return stores

    def _store_for(self, domain: str) -> str | None:
        for ms in self.settings.mailstores.values():
            if "mailstores" not in self.settings.queries and any(
                fnmatchcase(domain, p) for p in ms.domains
            ):
                return ms.name
        return self.settings.default_mailstore

    @staticmethod
    def _store_id(name: str | None, store_ids: dict[str, int]) -> int | None:
        """The id of mailstore ``name`` (None: none named); RowError if there is none."""
        if not name:
            return None
        if name not in store_ids:
            raise RowError(
                f"mailstore {name!r} is no mailstore (known: {', '.join(store_ids) or 'none'})"
            )
        return store_ids[name]

    def _domains(
        self,
        rows: list[dict[str, Any]],
        alias_rows: list[dict[str, Any]],
        store_ids: dict[str, int],
    ) -> list[Domain]:
        # (query, row) per name, then ids; alias targets resolve once every name is known.
        read: list[tuple[str, dict[str, Any], str, str, str]] = []
        seen: dict[str, tuple[int, str]] = {}  # name → (index in read, the row's words)

        def collect(query: str) -> Callable[[dict[str, Any]], None]:
            def one(row: dict[str, Any]) -> None:
                name = _lower(_text(row, "name") or "")
                kind = "alias" if query == "alias_domains" else "hosted"
                if "kind" in row:
                    kind = (_text(row, "kind") or "").lower()
                    if kind not in KINDS:
                        raise RowError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
                status = _status(row, DOMAIN_STATUS)
                words = f"[publisher.sql] {query} {name!r}"
                if name in seen:
                    at, other = seen[name]
                    # A disabled row beside one in use is left out, whichever comes first
                    # (it defined the name when first, and the active row was refused).
                    if status == "disabled":
                        return
                    if read[at][4] != "disabled":
                        raise RowError(f"domain {name!r} is also defined by {other}")
                    read[at] = (query, row, name, kind, status)
                    seen[name] = (at, words)
                    return
                seen[name] = (len(read), words)
                read.append((query, row, name, kind, status))

            return one

        self._each("domains", rows, collect("domains"))
        self._each("alias_domains", alias_rows, collect("alias_domains"))
        ids = {name: self._id(query) for query, _, name, _, _ in read}
        out = []
        for _, row, name, kind, status in read:
            i = ids[name]
            target = store = nexthop = unicode = None
            # A reference that leads nowhere is the row's problem; the row stays, so the
            # accounts and aliases of the domain are read (and left out with it if skipped).
            try:
                unicode = _text(row, "name_unicode", required=False)
                if kind == "alias":
                    target_name = _lower(_text(row, "target", required=False) or "")
                    target = ids.get(target_name)
                    if target_name and target is None:
                        raise RowError(
                            f"target {target_name!r} is no domain of [publisher.sql] domains"
                        )
                elif kind == "relay":
                    nexthop = _text(row, "relay_nexthop", required=False)
                else:
                    store = self._store_id(
                        _text(row, "mailstore", required=False) or self._store_for(name),
                        store_ids,
                    )
            except RowError as exc:
                self.problems.append(Problem("domain", i, name, str(exc)))
            out.append(Domain(i, name, unicode, kind, target, store, nexthop, status))
        return out

    def _accounts(
        self, rows: list[dict[str, Any]], domains: dict[str, Domain], store_ids: dict[str, int]
    ) -> list[Account]:
        accounts: list[Account] = []

        def read(row: dict[str, Any]) -> None:
            local, domain = _address(row)
            d = domains.get(domain)
            if d is None:
                raise RowError(f"domain {domain!r} is no domain of [publisher.sql] domains")
            status = _status(row, ACCOUNT_STATUS)
            home = _text(row, "home", required=False)
            password = _text(row, "password_hash", required=False) if self.secrets else None
            quota = _number(row.get("quota_bytes")) if self.secrets else None
            if isinstance(quota, int) and not isinstance(quota, bool) and quota == 0:
                quota = None  # 0: no limit, as most panels store it (a negative one is refused)
            address = f"{local}@{domain}"
            written = str(
                row["address"]
                if "address" in row
                else f"{row.get('local_part')}@{row.get('domain')}"
            )
            # A disabled row takes no part: it is in no map, and an active one wins over it.
            first = claimed.get(address) if status != "disabled" else None
            if first is not None and not _preferred(written, first[1]):
                # The same address twice, differing in case: one row is used whatever order
                # the query returns them in (the one written in lowercase), the other named.
                raise RowError(f"address also defined by [publisher.sql] accounts {first[1]!r}")
            i = self._id("accounts")
            try:
                store = self._store_id(_text(row, "mailstore", required=False), store_ids)
            except RowError as exc:
                store = None
                self.problems.append(Problem("account", i, f"{local}@{domain}", str(exc)))
            account = Account(i, d.id, local, store, status, password, home, quota)
            if first is not None:
                loser = accounts[first[0]]
                accounts[first[0]] = account
                self.problems.append(
                    Problem(
                        "account",
                        loser.id,
                        first[1],
                        f"address also defined by [publisher.sql] accounts {written!r}",
                    )
                )
                claimed[address] = (first[0], written)
                return
            if status != "disabled":
                claimed[address] = (len(accounts), written)
            accounts.append(account)

        claimed: dict[str, tuple[int, str]] = {}  # address → (index in accounts, as written)
        self._each("accounts", rows, read)
        return accounts

    def _aliases(
        self, name: str, rows: list[dict[str, Any]], domains: dict[str, Domain]
    ) -> list[Alias]:
        """Rows of one address merged (one row per target, or a list per row)."""
        grouped: dict[tuple[str, str], list[str]] = {}

        def read(row: dict[str, Any]) -> None:
            local, domain = _address(row, catchall=True)
            if domain not in domains:
                raise RowError(f"domain {domain!r} is no domain of [publisher.sql] domains")
            targets = _targets(_text(row, "targets", required=False))
            if not _flag(row):
                return
            grouped.setdefault((domain, local), []).extend(targets)

        self._each(name, rows, read)
        out = []
        for (domain, local), targets in sorted(grouped.items()):
            i = self._id(name)
            # Sorted: the rows come in the database's order, the map must not depend on it.
            out.append(Alias(i, domains[domain].id, local, tuple(sorted(set(targets)))))
        return out

    def _grants(
        self, rows: list[dict[str, Any]], accounts: dict[str, Account]
    ) -> list[SenderGrant]:
        grants: list[SenderGrant] = []

        def read(row: dict[str, Any]) -> None:
            owner = _lower(_text(row, "account") or "")
            address = _text(row, "address")
            assert address is not None
            if not _flag(row):
                return
            account = accounts.get(owner)
            if account is None:
                raise RowError(f"account {owner!r} is no account of [publisher.sql] accounts")
            grants.append(SenderGrant(account.id, _lower(address)))

        self._each("sender_grants", rows, read)
        return sorted(set(grants))


def _show(row: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in row.items()) + ")"

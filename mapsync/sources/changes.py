"""Reading what changed in mapsync's own schema since a :class:`~mapsync.snapshot.Mark`.

What tells a change, each an index range (docs/schema.md):

- an insert or an update moves the row's ``updated_at`` (a trigger sees to it for writers that
  do not): the rows with ``updated_at`` at or after the database's clock at the mark, less
  :data:`SKEW`, are read (again: a writer whose clock is behind, a transaction that commits
  after our read; what falls outside the skew is found by the next full check). The
  database's clock, not the table's newest stamp: a table nobody wrote to since a bulk
  import would otherwise have its import read again on every run;
- a delete adds rows to ``mapsync_deleted`` naming the table and the row;
- an alias that expires changes nothing in the database: the aliases whose ``expires_at``
  passed since the mark are read again.

A change to ``alias_target`` is a change of its alias, one to ``sender_grant`` a change of the
grants of its account (one moved to another alias or account logs the old one as a delete
would). A change to a domain, a mailstore or a customer touches what any number of
addresses resolve to: :class:`~mapsync.snapshot.NotIncremental` (the publisher reads
everything), as for a deletion log that cannot prove it is complete. Those three tables are
read in the same window as the rows, and their deletions with the same margin, but against
what the mark saw there (:attr:`Mark.recent`, :attr:`Mark.logged`): a row stamped below the
table's newest (a clock behind, a late commit) is a change, one the last read saw already
is not (else every run would be read in full for a minute after any change of a domain).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import groupby
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Integer, and_, not_, or_, select, true, type_coerce
from sqlalchemy.sql import ColumnElement

from mapsync.snapshot import (
    SERVICES,
    Account,
    Alias,
    Changes,
    Fingerprint,
    Mark,
    NotIncremental,
    SenderGrant,
)
from mapsync.sources import schema as t
from mapsync.sources.deletion_log import Entry, entries

# How far before the database's clock at the last read a row is read again.
SKEW = timedelta(seconds=60)
# More changed rows than this in one read: a bulk import; reading everything is cheaper.
MAX_CHANGED = 20_000
# Log ids read again below the last newest: on PostgreSQL and MariaDB a delete's id is taken
# when it is logged and seen at commit, so one committed after a read may sit below its mark.
DELETED_MARGIN = 1000
# Tables whose change reaches any number of addresses.
STRUCTURAL = ("customer", "mailstore", "domain")
# Rows of one of them in the skew window a mark keeps (their id and updated_at); more (a bulk
# import): the next read is a full one, until the window has passed them.
MAX_RECENT = 1000


def clock(conn: Connection) -> datetime:
    """The database's clock, UTC, naive (SQLite's: the host's)."""
    value = conn.execute(select(t.utc_now())).scalar_one()
    return naive(value if isinstance(value, datetime) else datetime.fromisoformat(value))


def mark_of(
    fingerprint: Fingerprint,
    now: datetime,
    db_clock: datetime,
    recent: dict[str, dict[int, datetime] | None],
    logged: frozenset[int],
) -> Mark | None:
    """The mark of a read whose fingerprint is ``fingerprint``, taken at ``now`` (the
    publisher's clock) and ``db_clock`` (the database's), which saw ``recent`` and
    ``logged`` (see :class:`Mark`); None for a database whose fingerprint counts rows (no
    deletion log: ``init-db`` not run since)."""
    tables = fingerprint.tables
    if t.deleted.name not in tables:
        return None
    stamps = {
        table.name: _stamp(tables[table.name][1]) for table in t.TABLES if table.name in tables
    }
    return Mark(stamps, tables[t.deleted.name][0], now, db_clock, recent, logged)


def read_mark(
    conn: Connection, fingerprint: Fingerprint, now: datetime, db_clock: datetime
) -> Mark | None:
    """The mark of a full read in ``conn``'s transaction (see :func:`mark_of`): with the rows
    of the structural tables in the skew window and their deletions in the margin."""
    if t.deleted.name not in fingerprint.tables:
        return None
    newest = fingerprint.tables[t.deleted.name][0]
    _, logged = entries(conn, newest, DELETED_MARGIN)
    return mark_of(
        fingerprint,
        now,
        db_clock,
        recent_rows(conn, db_clock - SKEW),
        _structural(logged or [], newest),
    )


def recent_rows(conn: Connection, since: datetime) -> dict[str, dict[int, datetime] | None]:
    """Per structural table, ``{id: updated_at}`` of its rows stamped at or after ``since``
    (an index range), or None for more than :data:`MAX_RECENT`."""
    out: dict[str, dict[int, datetime] | None] = {}
    for name in STRUCTURAL:
        table = t.metadata.tables[name]
        rows = conn.execute(
            select(table.c.id, table.c.updated_at)
            .where(table.c.updated_at >= since)
            .limit(MAX_RECENT + 1)
        ).all()
        out[name] = None if len(rows) > MAX_RECENT else {i: naive(s) for i, s in rows}
    return out


def _structural(logged: list[Entry], newest: int) -> frozenset[int]:
    """The log ids of the structural tables' deletions in ``logged`` a mark at log id
    ``newest`` keeps: those the next read reads again (its margin)."""
    return frozenset(
        log_id
        for log_id, table, _ in logged
        if table in STRUCTURAL and log_id > newest - DELETED_MARGIN
    )


def _structural_change(
    conn: Connection, since: Mark, db_clock: datetime, logged: list[Entry]
) -> tuple[str | None, dict[str, dict[int, datetime] | None]]:
    """Why the structural tables changed since ``since`` (None: they did not), and what the
    new mark keeps of their rows in the window."""
    low = min(since.clock, db_clock) - SKEW
    found = recent_rows(conn, low)
    keep: dict[str, dict[int, datetime] | None] = {}
    reason = None
    for name in STRUCTURAL:
        rows, seen = found[name], since.recent.get(name)
        if rows is None or seen is None:
            keep[name] = None
            reason = reason or f"table {name}: more than {MAX_RECENT} rows changed lately"
            continue
        since_low = since.clock - SKEW
        if {i: s for i, s in rows.items() if s >= since_low} != seen:
            reason = reason or f"table {name} changed"
        keep[name] = {i: s for i, s in rows.items() if s >= db_clock - SKEW}
    for log_id, table, _ in logged:
        if table in STRUCTURAL and log_id not in since.logged:
            reason = reason or f"table {table} changed (a row deleted)"
    return reason, keep


def _stamp(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def read_changes(
    conn: Connection,
    since: Mark,
    fingerprint: Fingerprint,
    now: datetime,
    db_clock: datetime,
    account_columns: list[ColumnElement[Any]],
) -> Changes:
    """The rows changed since ``since``, read inside ``conn``'s transaction, whose
    ``fingerprint`` (read in it too), ``now`` (the publisher's clock, UTC, naive: what has
    expired) and ``db_clock`` (the database's clock, read first in it) give the new mark.
    :class:`NotIncremental` when they cannot be applied row by row."""
    if t.deleted.name not in fingerprint.tables:
        raise NotIncremental("the database has no deletion log (run `mapsync init-db`)")
    # The rows deleted since the mark, and a margin before it (see DELETED_MARGIN).
    _, logged = entries(conn, since.deleted, DELETED_MARGIN)
    if logged is None:
        raise NotIncremental("the deletion log cannot name every row deleted since")
    reason, recent = _structural_change(conn, since, db_clock, logged)
    mark = mark_of(
        fingerprint,
        now,
        db_clock,
        recent,
        _structural(logged, fingerprint.tables[t.deleted.name][0]),
    )
    assert mark is not None
    # The deletion log gone backwards, or a table's newest stamp with no deletion logged to
    # explain it (deleting the newest row lowers it too): the database is an older copy now
    # (a backup restored, a standby promoted), whose rows no change read tells from the new.
    if mark.deleted < since.deleted:
        raise NotIncremental("the deletion log's newest entry is older than at the last read")
    for name, was in since.stamps.items():
        now_ = mark.stamps.get(name)
        if was is not None and (now_ is None or now_ < was) and mark.deleted == since.deleted:
            raise NotIncremental(f"table {name}'s newest change is older than at the last read")
    for name in STRUCTURAL:
        if mark.stamps.get(name) != since.stamps.get(name):
            raise NotIncremental(f"table {name} changed")
    # A table's newest stamp moved up to one below the window read below: the row that moved
    # it (a transaction open longer than SKEW, committed since) is not among the rows read.
    for name, now_ in mark.stamps.items():
        was = since.stamps.get(name)
        if now_ is not None and (was is None or now_ > was) and now_ < since.clock - SKEW:
            raise NotIncremental(f"table {name}: a row committed with a stamp older than {SKEW}")
    if reason is not None:
        raise NotIncremental(reason)
    deletions: dict[str, set[int]] = {}
    for _, name, row_id in logged:
        deletions.setdefault(name, set()).add(row_id)
    changed = {
        "account": set(deletions.get("account", ())),
        "alias": set(deletions.get("alias", ())) | set(deletions.get("alias_target", ())),
        "grants": set(deletions.get("sender_grant", ())),
    }
    for table, column, into in (
        (t.account, t.account.c.id, "account"),
        (t.alias, t.alias.c.id, "alias"),
        (t.alias_target, t.alias_target.c.alias_id, "alias"),
        (t.sender_grant, t.sender_grant.c.account_id, "grants"),
    ):
        # The rows, not their DISTINCT parents: for those SQLite walks the whole index of
        # the parent (alias_target's alias_id: 0.07 s at 1M rows, every run) instead of the
        # updated_at range; a bulk change is as many rows however few parents they have.
        query = select(column).where(table.c.updated_at >= since.clock - SKEW)
        ids = conn.scalars(query.limit(MAX_CHANGED + 1)).all()
        changed[into].update(ids)
        if len(ids) > MAX_CHANGED or len(changed[into]) > MAX_CHANGED:
            raise NotIncremental(f"more than {MAX_CHANGED} rows changed")
    expired = select(t.alias.c.id).where(
        t.alias.c.expires_at > since.now - SKEW, t.alias.c.expires_at <= now
    )
    changed["alias"].update(conn.scalars(expired))
    # A deleted account's grants go with it (on MariaDB without a trigger firing).
    changed["grants"] |= changed["account"]

    out = Changes(mark, fingerprint)
    out.accounts = dict.fromkeys(changed["account"])
    for chunk in chunks(changed["account"]):
        for row in conn.execute(select(*account_columns).where(t.account.c.id.in_(chunk))):
            out.accounts[row[0]] = tuple.__new__(Account, row)
    bad: list[tuple[int, str, Any]] = []
    out.denied = read_denied(conn, changed["account"], bad)
    if bad:  # the full read names the row (an invalid row: validation's, not a change's)
        account_id, name, value = bad[0]
        raise NotIncremental(f"account id={account_id}: {name} {value!r} is not a boolean")
    out.aliases = dict.fromkeys(changed["alias"])
    for chunk in chunks(changed["alias"]):
        targets = {
            alias_id: tuple(sorted(map(_second, group)))
            for alias_id, group in groupby(
                conn.execute(
                    select(t.alias_target.c.alias_id, t.alias_target.c.target)
                    .where(t.alias_target.c.alias_id.in_(chunk))
                    .order_by(t.alias_target.c.alias_id)
                ),
                _first,
            )
        }
        for alias_id, domain_id, local_part, expires_at, active in conn.execute(
            select(*ALIAS_COLUMNS)
            .where(t.alias.c.id.in_(chunk))
            .where(alias_read(conn.dialect.name))
        ):
            if active not in (0, 1):  # the full read names it (an invalid row)
                raise NotIncremental(f"alias id={alias_id}: active {active!r} is not a boolean")
            try:
                ends = expiry(expires_at)
            except ValueError as exc:  # the full read names it (an invalid row)
                raise NotIncremental(f"alias id={alias_id}: {exc}") from None
            if ends is None or ends > now:
                out.aliases[alias_id] = Alias(
                    alias_id, domain_id, local_part, targets.get(alias_id, ())
                )
    out.grants = {account_id: () for account_id in changed["grants"]}
    for chunk in chunks(changed["grants"]):
        rows = conn.execute(
            select(t.sender_grant.c.account_id, t.sender_grant.c.address)
            .where(t.sender_grant.c.account_id.in_(chunk))
            .order_by(t.sender_grant.c.account_id, t.sender_grant.c.address)
        )
        for account_id, group in groupby(rows, _first):
            out.grants[account_id] = tuple(SenderGrant(*row) for row in group)
    return out


ALLOW = (t.account.c.allow_imap, t.account.c.allow_pop3, t.account.c.allow_submission)
# Read raw, with no result processor: SQLite's text 'false' stays text (see read_denied).
ALLOW_RAW = tuple(type_coerce(c, Integer) for c in ALLOW)
ALIAS_ACTIVE = type_coerce(t.alias.c.active, Integer)  # raw: see read_denied
# Raw too: SQLite keeps any text ('never', '') or number in a DATETIME column, and the
# processor's ValueError ended the read naming no row. expiry() reads it. PostgreSQL's
# 'infinity' reads as t.LATEST (never expires), '-infinity' as t.EARLIEST (expired).
ALIAS_EXPIRES = t.finite(t.alias.c.expires_at)
# An alias row as the readers take it: id, domain, local part, expiry (raw), active (raw).
ALIAS_COLUMNS = (
    t.alias.c.id,
    t.alias.c.domain_id,
    t.alias.c.local_part,
    ALIAS_EXPIRES,
    ALIAS_ACTIVE,
)


def expiry(value: Any) -> datetime | None:
    """An alias's ``expires_at`` as read raw (:data:`ALIAS_EXPIRES`), as a naive UTC
    datetime; None: it never expires. ValueError naming the value when it is no date and time
    (SQLite's text, as its DATETIME type reads it: ISO 8601)."""
    if value is None:
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise ValueError(f"expires_at {value!r} is not a date and time")
    return naive(value)


def alias_read(dialect: str) -> ColumnElement[bool]:
    """Which alias rows are read: the active ones and, where the column can hold anything
    else (SQLite keeps the text 'true', which is not TRUE; MariaDB a 2), those neither 0 nor
    1, for the reader to name (``ALIAS_ACTIVE`` not in (0, 1))."""
    active = t.alias.c.active.is_(True)
    return active if dialect == "postgresql" else or_(active, ALIAS_ACTIVE.not_in([0, 1]))


def read_denied(
    conn: Connection,
    ids: Iterable[int] | None = None,
    bad: list[tuple[int, str, Any]] | None = None,
) -> dict[int, frozenset[str]]:
    """The services each account denied one may not log in to (see Snapshot.denied): of
    every account, or of those of ``ids``. Read raw: a value that is no boolean (SQLite keeps
    the text 'false' in a BOOLEAN column, which reads as true) is put in ``bad`` as
    (account id, column, value) and denies nothing."""
    shared: dict[tuple[bool, ...], frozenset[str]] = {}  # one set per combination
    denied = {}
    query = select(t.account.c.id, *ALLOW_RAW).where(not_(and_(*(c == true() for c in ALLOW))))
    for chunk in [None] if ids is None else chunks(ids):
        rows = conn.execute(query if chunk is None else query.where(t.account.c.id.in_(chunk)))
        for account_id, *flags in rows:
            wrong = [(c.name, f) for c, f in zip(ALLOW, flags, strict=True) if f not in (0, 1)]
            if wrong:
                if bad is not None:
                    bad += [(account_id, column, value) for column, value in wrong]
                continue
            key = tuple(map(bool, flags))
            services = shared.get(key)
            if services is None:
                services = frozenset(s for s, ok in zip(SERVICES, key, strict=True) if not ok)
                shared[key] = services
            denied[account_id] = services
    return denied


_CHUNK = 500  # ids per IN list: far below every engine's bound-parameter limit


def chunks(ids: Iterable[int]) -> Iterator[list[int]]:
    """``ids`` sorted, ``_CHUNK`` at a time (for ``IN`` lists)."""
    ordered = sorted(ids)
    for start in range(0, len(ordered), _CHUNK):
        yield ordered[start : start + _CHUNK]


def naive(value: Any) -> datetime:
    """``value`` as a naive UTC datetime (drivers differ in what they return)."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value  # type: ignore[no-any-return]


_first = itemgetter(0)
_second = itemgetter(1)

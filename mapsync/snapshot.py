"""One consistent read of the central database, as plain rows.

Sources (``mapsync.sources``) produce a :class:`Snapshot`; maps (``mapsync.maps``) consume it.
Rows are NamedTuples rather than dataclasses: a snapshot of a large cluster holds millions of
them, and tuples are what the database driver hands out anyway.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from mapsync.validate import Problem


class Mailstore(NamedTuple):
    """A mailstore (Dovecot backend): where LMTP delivers and IMAP is served."""

    id: int
    name: str
    lmtp_host: str
    lmtp_port: int
    imap_host: str
    imap_port: int
    active: bool


class Domain(NamedTuple):
    """A domain row: hosted (has mailboxes), alias (of a hosted domain) or relay (passed on)."""

    id: int
    name: str  # lowercase A-label
    name_unicode: str | None
    kind: str  # hosted | alias | relay
    target_domain_id: int | None
    default_mailstore_id: int | None
    relay_nexthop: str | None
    status: str  # active | suspended | disabled (customer status already folded in)
    customer_id: int | None = None  # whose domain it is (see Snapshot.customers)


def live_domains(domains: Iterable[Domain]) -> dict[int, Domain]:
    """The domains that are not disabled, by id, in their order: what the maps serve and what
    validation resolves addresses in (maps and validation share this one definition)."""
    return {d.id: d for d in domains if d.status != "disabled"}


def alias_domains(live: Mapping[int, Domain]) -> dict[int, list[Domain]]:
    """The alias domains of ``live`` (see :func:`live_domains`) by the id of the live domain
    they point at, in their order; one whose target is disabled or unknown resolves nowhere."""
    out: dict[int, list[Domain]] = {}
    for d in live.values():
        target = d.target_domain_id
        if d.kind == "alias" and target is not None and target in live:
            out.setdefault(target, []).append(d)
    return out


class Account(NamedTuple):
    """A mailbox: its domain, local part, mailstore (None: the domain's default), state and login data."""

    id: int
    domain_id: int
    local_part: str
    mailstore_id: int | None
    status: str  # active | login_disabled | disabled | moving
    # Hash and quota read only when a channel carries dovecot_users (least privilege: an MX
    # publish never even loads password hashes); the home always (validated in every run).
    password_hash: str | None = None
    home: str | None = None
    quota_bytes: int | None = None
    # Read with the secrets when a channel carries customer ids (Source.customers): the
    # account's own customer; None falls back to its domain's (see Snapshot.customers).
    customer_id: int | None = None


# The services an account's allow_* columns govern (a login for any other is not governed).
SERVICES = ("imap", "pop3", "submission")


class SenderGrant(NamedTuple):
    """``account_id`` may send as ``address`` (``@domain`` for a whole domain)."""

    account_id: int
    address: str


class Alias(NamedTuple):
    """An address that forwards to ``targets`` (a catch-all when ``local_part`` is empty)."""

    id: int
    domain_id: int
    local_part: str  # '' = catch-all
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Fingerprint:
    """Cheap change detector: per table what tells a change (for mapsync's own schema the
    newest ``updated_at``; see :func:`mapsync.sources.builtin._fingerprint`)."""

    tables: dict[str, tuple[int, str | None]]

    def digest(self) -> str:
        """One sha256 over the counts and stamps of every table."""
        blob = json.dumps(self.tables, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


@dataclass
class Snapshot:
    """Everything the maps need, read in one read-only transaction."""

    mailstores: list[Mailstore]
    domains: list[Domain]
    accounts: list[Account]
    aliases: list[Alias]
    fingerprint: Fingerprint
    taken_at: datetime
    sender_grants: list[SenderGrant] = field(default_factory=list)
    secrets: bool = False  # password hashes and quotas were read (homes always are)
    # Where an account's own mail goes instead of its mailbox (a PostfixAdmin "forward"): keyed
    # like an alias, on a live account's address; the account's own address among the targets
    # keeps a copy in the mailbox. The account keeps its login either way.
    forwards: list[Alias] = field(default_factory=list)
    # The services an account may not log in to, by account id (only the accounts with one):
    # "imap", "pop3", "submission" (see SERVICES). Few rows: kept apart from the millions.
    denied: dict[int, frozenset[str]] = field(default_factory=dict)
    # customer id → its ext_id (the billing system's id), for the userdb's customer field.
    customers: dict[int, str] = field(default_factory=dict)
    # How the source names a row in problems: (table, id, key) → "alias 'sales@example.com'".
    # None: mapsync's own "table id=N 'key'".
    describe: Callable[[str, int, str], str] | None = None
    # Maps of the operator's own ([publisher.maps.NAME]): their query's rows as read, by map
    # name; then, checked by the publisher (mapsync.maps.custom.check_rows), their entries.
    map_rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    map_entries: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # Rows the source could not read into the model (a NULL or a wrong type in a column the
    # row needs, a domain nobody defines): reported by validation like any invalid row, and
    # gone once skipped (``publish --skip-invalid``). Whole rows only (no ``field``).
    problems: list[Problem] = field(default_factory=list)
    # Where the next change read resumes (a source that reads changes sets it; see Mark), and,
    # when the publisher asked for them with the snapshot, the changes since its last mark,
    # read in the same transaction (a full check compares the two).
    mark: Mark | None = None
    changes: Changes | None = None


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for snapshot-sized work (reading, validating,
    rendering): the rows are acyclic tuples and strings, freed by reference counting, but every
    700 new ones trigger a collection that walks the young ones again, and the older generations
    ever more of them (measured at 100k accounts: 0.24 s of a 1.85 s publish). Restores the
    collector as it was, so nesting is harmless."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class NotIncremental(Exception):
    """What was read cannot be applied to the last snapshot: the publisher reads everything
    (:mod:`mapsync.publish.incremental`). Not an error: the reason is logged."""


@dataclass(frozen=True)
class Mark:
    """Where a change read resumes.

    ``clock``: the database's own clock (UTC) at the last read: rows written since, by its
    ``updated_at``, are what changed (less a skew: mapsync.sources.changes); ``stamps``: per
    table, the newest ``updated_at`` then; ``deleted``: the newest id of the deletion log;
    ``now``: the publisher's clock at the read, for the aliases that expired since (their rows
    do not change when they do).

    The tables read whole (domain, mailstore, customer) are read again in the same window
    as the rows, and their deletions with the same margin: ``recent`` holds, per such table,
    ``{id: updated_at}`` of the rows stamped at or after ``clock`` less the skew that the
    read saw (None: too many to keep), and ``logged`` the deletion log ids of theirs at or
    after ``deleted`` less the margin that it saw; what the next read finds there and they
    do not hold is a change it cannot apply row by row."""

    stamps: dict[str, datetime | None]
    deleted: int
    now: datetime
    clock: datetime
    recent: dict[str, dict[int, datetime] | None] = field(default_factory=dict)
    logged: frozenset[int] = frozenset()


@dataclass
class Changes:
    """The rows changed since a :class:`Mark`, as they are now, read in one transaction.

    For every id listed, the row as the snapshot would read it, or None where the snapshot
    would no longer hold it (deleted, an alias made inactive or expired). ``grants``: for each
    account whose sender grants may have changed, all of its grants now. ``denied``: the
    services each listed account may not log in to (empty: none)."""

    mark: Mark
    fingerprint: Fingerprint
    accounts: dict[int, Account | None] = field(default_factory=dict)
    aliases: dict[int, Alias | None] = field(default_factory=dict)
    grants: dict[int, tuple[SenderGrant, ...]] = field(default_factory=dict)
    denied: dict[int, frozenset[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.accounts or self.aliases or self.grants)

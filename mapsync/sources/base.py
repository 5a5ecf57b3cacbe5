"""Base class of the database sources.

A source must provide:

- ``fingerprint()``: a cheap :class:`~mapsync.snapshot.Fingerprint` (counts and newest
  ``updated_at`` per table) so a publisher can tell that nothing changed without reading rows;
- ``snapshot()``: every row the maps need, read in one read-only, repeatable-read
  transaction so the maps of one release describe one instant of the database;
- ``safe_url``: the database URL without its password, recorded in manifests.

Optional: ``changes()`` and ``snapshot_since()``, the rows changed since a
:class:`~mapsync.snapshot.Mark` (mapsync's own schema only: docs/incremental.md).

Optional: ``lock()``/``check_lock()``, a database-side publisher lock and whether it is still
held; ``bound()`` sets how long any database wait may last. ``maps``: the maps of the
operator's own (``[publisher.maps.NAME]``) on this database that the publisher wants; a source
that can read them puts their rows into ``Snapshot.map_rows`` from the snapshot's own
transaction and answers ``maps_fingerprint()`` (see :mod:`mapsync.sources.maps`).

Config example::

    [publisher]
    database = "postgresql+psycopg://mapsync@db.example.net/mail"
    schema = "mapsync"
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

from mapsync.config import MapConfig
from mapsync.errors import SourceError
from mapsync.snapshot import Changes, Fingerprint, Mark, NotIncremental, Snapshot


class Source(ABC):
    """Reads the central database; see the module docstring for the contract."""

    safe_url: str
    schema: str
    # Bounds on waiting for the database (seconds): set by the publisher with bound().
    lock_wait: float = 30.0
    statement_timeout: float = 600.0
    # Maps of the operator's own to read with the snapshot (set by the publisher).
    maps: tuple[MapConfig, ...] = ()
    # Set by the publisher when a channel carries customer ids (customer_field): read each
    # account's own customer with the secrets (Account.customer_id); else they stay unread.
    customers: bool = False
    # Seconds a change stamp can share with a later write (PostfixAdmin's ``modified`` has
    # whole seconds): two edits in one second leave the fingerprint as the first made it, so
    # the publisher trusts a fingerprint only after a full read at least this long after it
    # first saw it (:func:`mapsync.publish.quiet.quiet_plan`). 0: stamps tell every write.
    stamp_resolution: float = 0.0

    def bound(self, lock_wait: float, statement_timeout: float) -> None:
        """Wait at most ``lock_wait`` for a lock another session holds (and for a connect),
        and at most ``statement_timeout`` for one statement."""
        self.lock_wait = lock_wait
        self.statement_timeout = statement_timeout

    @abstractmethod
    def fingerprint(self, secrets: bool = False) -> Fingerprint:
        """``secrets``: the snapshot that may follow reads hashes and quotas (a source whose
        fingerprint is a digest of its rows reads what that snapshot would)."""

    @abstractmethod
    def snapshot(self, secrets: bool = False) -> Snapshot:
        """Every row the maps need; password hashes and quotas only with ``secrets``."""

    def changes(self, since: Mark, secrets: bool = False) -> Changes:
        """The rows changed since ``since`` (a mark of an earlier snapshot or change read),
        for the long-running publisher's incremental runs; :class:`NotIncremental` when they
        cannot be told row by row (by default: every change reads the whole snapshot)."""
        raise NotIncremental(f"schema {self.schema!r} is read whole for every change")

    def snapshot_since(self, since: Mark, secrets: bool = False) -> Snapshot:
        """:meth:`snapshot` with, in ``Snapshot.changes``, the changes since ``since`` read in
        the same transaction (a full check compares the incremental state with them)."""
        raise NotIncremental(f"schema {self.schema!r} is read whole for every change")

    def maps_fingerprint(self) -> dict[str, tuple[int, str | None]]:
        """Per map of ``maps``, ``"map:NAME"`` → what tells a change (row count and hash)."""
        if self.maps:
            raise SourceError(f"schema {self.schema!r} cannot read [publisher.maps]")
        return {}

    @contextmanager
    def lock(self, wait: float = 30.0) -> Iterator[None]:
        """Hold the database-side publisher lock, where the database has one (default: none)."""
        yield

    def check_lock(self) -> None:  # noqa: B027 - optional hook
        """Raise SourceError if the lock taken by :meth:`lock` is no longer held."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

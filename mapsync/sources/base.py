"""Base class of the database sources.

A source must provide:

- ``fingerprint()``: a cheap :class:`~mapsync.snapshot.Fingerprint` (counts and newest
  ``updated_at`` per table) so a publisher can tell that nothing changed without reading rows;
- ``snapshot()``: every row the maps need, read in one read-only, repeatable-read
  transaction so the maps of one release describe one instant of the database;
- ``safe_url``: the database URL without its password, recorded in manifests.

Config example::

    [publisher]
    database = "postgresql+psycopg://mapsync@db.example.net/mail"
    schema = "mapsync"
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

from mapsync.snapshot import Fingerprint, Snapshot


class Source(ABC):
    """Reads the central database; see the module docstring for the contract."""

    safe_url: str
    schema: str

    @abstractmethod
    def fingerprint(self) -> Fingerprint: ...

    @abstractmethod
    def snapshot(self, secrets: bool = False) -> Snapshot:
        """Every row the maps need; password hashes, homes and quotas only with ``secrets``."""

    @contextmanager
    def lock(self, wait: float = 30.0) -> Iterator[None]:
        """Hold the database-side publisher lock, where the database has one (default: none)."""
        yield

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

"""A second database that maps of the operator's own read (``[publisher.maps.NAME] database``);
how their queries are run and fingerprinted is :mod:`mapsync.sources.maps`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, event

from mapsync.config import MapConfig
from mapsync.errors import SourceError
from mapsync.snapshot import Fingerprint, Snapshot
from mapsync.sources.builtin import BuiltinSource, make_engine, safe_url


class MapDatabase(BuiltinSource):
    """A second database that maps of the operator's own read (``[publisher.maps.NAME]
    database``): no schema of mapsync's in it, no publisher lock taken there; the engine,
    the read-only transaction, the bounds and the redaction of :class:`BuiltinSource`."""

    schema = "maps"
    utc = False  # the operator's queries run in the server's zone

    def __init__(self, url: str, maps: tuple[MapConfig, ...]) -> None:
        # Not BuiltinSource.__init__: its message for a missing SQLite file is about init-db.
        self.url = url
        self.safe_url = safe_url(url)
        self.maps = maps
        where = f"[publisher.maps.{maps[0].name}] database"
        self.engine = make_engine(url)
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            if database and database != ":memory:" and not Path(database).exists():
                raise SourceError(f"{where}: SQLite file {database} does not exist")
        self._lock_conn = None
        event.listen(self.engine, "do_connect", self._connect_args)

    def fingerprint(self, secrets: bool = False) -> Fingerprint:
        """The fingerprints of its maps only: the database has no tables of mapsync's."""
        return Fingerprint(self.maps_fingerprint())

    def _read(self, conn: Connection) -> Snapshot:
        return Snapshot([], [], [], [], Fingerprint({}), taken_at=datetime.now(UTC))

"""``publish --interval`` woken by a commit: the SQLite file watched (inotify, watchdog).

The long-running publisher runs every ``--interval`` seconds; a commit made just after a run
waits up to that long to be published. For a SQLite database the loop also watches the
file: a commit writes the database or its write-ahead log, and the next run starts at once
(docs/incremental.md). The interval stays the upper bound, the poll for what a watch cannot
see (a database on another machine's disk, an alias's expiry, which writes nothing, a map of
the operator's own reading another database). A wake-up with nothing new is a quiet run
(about 0.05 s).

In WAL mode the commit's last write to the log comes before its fsyncs and before readers can
see it, so a run woken at once may read the state before it: the loop runs once more shortly
after each woken run (:data:`mapsync.interval.RECHECK`).

Another engine (PostgreSQL, MariaDB) is polled every interval, as before.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from mapsync import log
from mapsync.sources.sqlite_fingerprint import sqlite_file

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent
    from watchdog.observers.api import BaseObserver

_log = log.get("publisher")

# The files a commit writes into: the database (a rollback journal's commit, a checkpoint)
# or its write-ahead log. Their writes count (inotify's IN_MODIFY), and the database put in
# place by a rename or made anew (a backup restored): in WAL mode a mere reader creates, opens
# for writing and deletes the log and the shared-memory index, and writes only the index
# (measured: a SELECT on a database no one else had open), so the log's creation does not.
_SUFFIXES = ("", "-wal")


class DatabaseWatch:
    """Sets ``wake`` whenever the SQLite file ``url`` names is written (a commit). Watches
    the file's real directory (symlinks resolved: SQLite writes there); :meth:`check`,
    called before each run, watches again when that directory was deleted, moved or
    replaced, or could not be watched before."""

    def __init__(self, url: str, wake: threading.Event) -> None:
        self.wake = wake
        path = sqlite_file(url)
        self.path = os.path.realpath(path) if path is not None else None
        self._observer: BaseObserver | None = None
        self._watched: tuple[int, int] | None = None  # the directory's (st_dev, st_ino)
        self._warned = False
        self._gone = threading.Event()  # the watched directory deleted or moved away

    def check(self) -> bool:
        """Watch the database's directory unless it is watched already; whether it is."""
        if self.path is None:
            return False
        directory = os.path.dirname(self.path)
        try:
            st = os.stat(directory)
            identity = (st.st_dev, st.st_ino)
        except OSError as exc:
            self.stop()
            self._warn(exc)
            return False
        if self._observer is not None and identity == self._watched and not self._gone.is_set():
            return True
        self.stop()
        try:
            self._gone.clear()
            self._observer = _observe(directory, os.path.basename(self.path), self.wake, self._gone)
        except OSError as exc:  # the inotify watch limit, a permission
            self._warn(exc)
            return False
        again = self._watched is not None or self._warned
        self._watched, self._warned = identity, False
        _log.info(
            "watching the database again"
            if again
            else "watching the database: a commit is published at once",
            database=self.path,
        )
        if again:
            self.wake.set()  # whatever was committed while nothing watched
        return True

    def stop(self) -> None:
        """Stop watching (until the next :meth:`check`)."""
        if self._observer is not None:
            self._observer.stop()
            self._observer = None

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            _log.warning(
                "not watching the database; publishing every interval until it can be",
                database=self.path,
                error=str(exc),
            )
            self._warned = True


def _observe(
    directory: str, name: str, wake: threading.Event, gone: threading.Event
) -> BaseObserver:
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    names = {name + suffix for suffix in _SUFFIXES}

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.is_directory:
                if event.event_type in ("deleted", "moved") and os.fsdecode(
                    event.src_path
                ) == os.fsdecode(directory):
                    gone.set()  # this watch is dead: the next run's check watches anew
                    wake.set()
                return
            if event.event_type == "modified":
                woken = os.path.basename(os.fsdecode(event.src_path)) in names
            elif event.event_type in ("moved", "created"):
                # The database put in place or made anew; not its log, which any reader makes.
                path = event.dest_path if event.event_type == "moved" else event.src_path
                woken = os.path.basename(os.fsdecode(path)) == name
            else:
                return
            if woken:
                wake.set()

    observer = Observer()
    try:
        observer.schedule(Handler(), directory, recursive=False)
        observer.start()
    except OSError:
        observer.stop()
        raise
    return observer

"""``publish --interval`` woken by a commit: the SQLite file watched (inotify, watchdog).

The long-running publisher runs every ``--interval`` seconds; a commit made just after a run
waits up to that long to be published. For a SQLite database the loop also watches the
file: a commit writes the database or its write-ahead log or rollback journal, and the next
run starts at once (docs/incremental.md). The interval stays the upper bound, the poll for
what a watch cannot see (a database on another machine's disk, a watch that failed). A
wake-up with nothing new is a quiet run (about 0.05 s): the last connection's checkpoint
writes the database, once.

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
# or its write-ahead log. Only their writes count (inotify's IN_MODIFY): in WAL mode a mere
# reader creates, opens for writing and deletes the log and the shared-memory index, and
# writes only the index (measured: a SELECT on a database no one else had open).
_SUFFIXES = ("", "-wal")


def watch_database(url: str, wake: threading.Event) -> BaseObserver | None:
    """Set ``wake`` whenever the SQLite file ``url`` names is written (a commit); the
    observer watching it, started, or None (another database, or the watch failed: logged,
    and the loop polls every interval as before)."""
    path = sqlite_file(url)
    if path is None:
        return None
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    names = {os.path.basename(path) + suffix for suffix in _SUFFIXES}

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type != "modified" or event.is_directory:
                return
            if os.path.basename(os.fsdecode(event.src_path)) in names:
                wake.set()

    observer = Observer()
    try:
        observer.schedule(Handler(), os.path.dirname(path), recursive=False)
        observer.start()
    except OSError as exc:  # the directory gone, the inotify watch limit
        observer.stop()
        _log.warning(
            "not watching the database; publishing every interval", database=path, error=str(exc)
        )
        return None
    _log.info("watching the database: a commit is published at once", database=path)
    return observer

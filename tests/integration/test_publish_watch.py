"""The long-running publisher's watch of a SQLite file (mapsync.publish.watch) and the loop
it wakes (mapsync.interval): real files, real inotify, real SQLite commits."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from mapsync import interval
from mapsync.publish.watch import DatabaseWatch

WAIT = 5.0  # seconds an event may take under load


def _db(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
    conn.close()


def _commit(path: Path) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()


def _watched(url: str) -> tuple[DatabaseWatch, threading.Event]:
    wake = threading.Event()
    watch = DatabaseWatch(url, wake)
    return watch, wake


def test_reads_do_not_wake_a_commit_does(tmp_path: Path) -> None:
    _db(tmp_path / "central.db")
    watch, wake = _watched(f"sqlite:///{tmp_path / 'central.db'}")
    try:
        assert watch.check()
        time.sleep(0.2)
        wake.clear()
        for _ in range(3):  # each creates and deletes the log: not a commit
            with sqlite3.connect(tmp_path / "central.db") as conn:
                conn.execute("SELECT count(*) FROM t").fetchall()
            conn.close()
        assert not wake.wait(0.5)
        _commit(tmp_path / "central.db")
        assert wake.wait(WAIT)
    finally:
        watch.stop()


def test_a_symlinked_directory_is_watched_where_sqlite_writes(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    _db(real / "central.db")
    (tmp_path / "link").symlink_to(real)
    watch, wake = _watched(f"sqlite:///{tmp_path / 'link' / 'central.db'}")
    try:
        assert watch.check() and watch.path == str(real / "central.db")
        wake.clear()
        _commit(tmp_path / "link" / "central.db")
        assert wake.wait(WAIT)
    finally:
        watch.stop()


def test_a_database_restored_by_rename_wakes(tmp_path: Path) -> None:
    _db(tmp_path / "central.db")
    _db(tmp_path / "backup.db")
    watch, wake = _watched(f"sqlite:///{tmp_path / 'central.db'}")
    try:
        assert watch.check()
        wake.clear()
        os.rename(tmp_path / "backup.db", tmp_path / "central.db")
        assert wake.wait(WAIT)
    finally:
        watch.stop()


def test_a_directory_replaced_or_missing_at_first_is_watched_once_it_is_there(
    tmp_path: Path,
) -> None:
    where = tmp_path / "db"
    watch, wake = _watched(f"sqlite:///{where / 'central.db'}")
    try:
        assert not watch.check()  # missing: said once, polled meanwhile
        where.mkdir()
        _db(where / "central.db")
        assert watch.check()
        assert wake.is_set()  # what came while nothing watched: a run at once
        wake.clear()
        shutil.rmtree(where)
        where.mkdir()
        _db(where / "central.db")
        assert watch.check()  # a new directory: watched again
        wake.clear()
        _commit(where / "central.db")
        assert wake.wait(WAIT)
    finally:
        watch.stop()


def test_another_engine_is_not_watched() -> None:
    watch, _ = _watched("postgresql://mapsync@127.0.0.1/mapsync")
    assert watch.path is None and not watch.check()


def test_a_woken_run_is_followed_by_one_more_soon_then_the_interval() -> None:
    """A WAL commit's event can come before the commit is visible: the run it wakes is
    followed by one more RECHECK later; then the loop sleeps its interval."""
    wake = threading.Event()
    runs: list[float] = []

    def run() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            wake.set()  # a commit during the first run
        if len(runs) == 3:
            raise SystemExit(0)

    started = time.monotonic()
    with pytest.raises(SystemExit):
        interval.run_every(60, run, logger="publisher", what="publish", wake=wake)
    assert runs[1] - runs[0] < 1.0  # woken during the first run: the next one at once
    assert interval.RECHECK * 0.9 < runs[2] - runs[1] < 2.0  # then one more, soon
    assert time.monotonic() - started < 5.0  # not the 60 s interval

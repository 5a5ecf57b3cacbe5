"""Two publishers at once — a timer overlapping a manual run, or a standby host — never
produce two releases with the same serial: one waits, or exits cleanly with a message."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from mapsync.sources.builtin import ADVISORY_LOCK
from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account


def test_a_second_publisher_waits_then_exits_2_while_the_repository_is_locked(
    cluster: Cluster,
) -> None:
    cluster.write_config(extra_publisher='lock_wait = "1s"')
    cluster.publish()
    fd = os.open(cluster.repo / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = cluster.cli("publish")
    finally:
        os.close(fd)
    assert proc.returncode == 2
    assert "another publisher is running" in proc.stderr
    assert "unchanged (serial 1)" in cluster.publish().stdout  # the lock is free again


def test_publishers_started_together_make_distinct_serials(cluster: Cluster) -> None:
    cluster.publish()
    add_account(cluster, "together")
    argv = [sys.executable, "-m", "mapsync", "--config", str(cluster.config_path), "publish"]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    published = [o for o, _ in outs if "published serial" in o]
    assert len(published) == 1  # the others waited, then found nothing new
    serials = sorted(int(n) for n in os.listdir(cluster.repo / "mx" / "releases"))
    assert serials == [1, 2]
    assert json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"] == 2


@pytest.mark.postgresql
def test_a_standby_publisher_on_postgresql_respects_the_advisory_lock(
    tmp_path: Path, pg_url: str
) -> None:
    """Two publisher hosts have separate repositories (no shared flock); the database lock
    is what keeps them apart."""
    c = make_cluster(tmp_path / "pg", pg_url, accounts=30, domains=3, aliases=5)
    c.write_config(extra_publisher='lock_wait = "1s"')
    holder = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with holder.connect() as conn:
        assert conn.execute(select(func.pg_try_advisory_lock(ADVISORY_LOCK))).scalar()
        proc = c.cli("publish")
        assert proc.returncode == 2
        assert "another publisher holds advisory lock" in proc.stderr
        assert not (c.repo / "mx" / "LATEST").exists()
        conn.execute(select(func.pg_advisory_unlock(ADVISORY_LOCK)))
    holder.dispose()
    assert "published serial 1" in c.publish().stdout

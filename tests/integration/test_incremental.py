"""The long-running publisher's incremental runs (docs/incremental.md): after every one of a
random sequence of changes (accounts added, changed, moved between mailstores and domains,
deleted; aliases added, chained, retargeted, renamed, deactivated, expired, deleted;
catch-alls; sender grants; alias domains and mailstores, which the publisher reads in full),
the incrementally published maps are byte for byte those a full publish of the same database
makes, on SQLite and on the running PostgreSQL."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path

import pytest

from mapsync import config
from mapsync.publish.publisher import Publisher
from mapsync.sources import changes, open_source
from tests.conftest import make_cluster
from tests.helpers.incremental import bodies, step

CHANNELS = """
[publisher.guards]
max_shrink = "100%"
max_growth = "10000%"
max_change = "100%"
min_entries = 0

[publisher.channels.mx]
maps = ["domains", "recipients", "virtual", "transport", "senders", "exim_routes"]

[publisher.channels.store]
maps = ["dovecot_users", "dovecot_deny"]
mailstore = "store-1"

[publisher.channels.proxy]
maps = ["dovecot_proxy", "dovecot_submission"]
"""


def _publisher(root: Path, url: str, repo: str) -> Publisher:
    text = (root / "mapsync.toml").read_text()
    text = text.replace(
        '[publisher.channels.mx]\nmaps = ["domains", "recipients", "virtual", "transport"]\n', ""
    )
    text = text.replace("[agent]", CHANNELS + "\n[agent]", 1).replace("/repo", f"/{repo}")
    path = root / f"{repo}.toml"
    path.write_text(text)
    pub = config.load(path).need_publisher()
    return Publisher(pub, lambda: open_source(pub.database, pub.schema))


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_incremental_runs_publish_what_a_full_run_publishes(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No rows read again for clock skew: each run renders only what its change reaches
    # (with the minute of skew, every row the seed wrote just before would be read again).
    monkeypatch.setattr(changes, "SKEW", timedelta(0))
    url = (
        f"sqlite:///{tmp_path / 'central.db'}"
        if engine == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    cluster = make_cluster(tmp_path / "c", url, accounts=150, domains=6, aliases=40)
    kept = _publisher(cluster.root, url, "inc")
    kept.incremental = True
    kept.run()
    assert kept.last_read == "full"
    rnd = random.Random(20261130)
    reads = []
    for number in range(80):
        name, rows_only = step(url, rnd)
        kept.run()
        reads.append(kept.last_read)
        if rows_only:
            assert kept.last_read == "incremental", f"step {number} ({name}) was read in full"
        full = _publisher(cluster.root, url, "full")
        full.run()
        for channel in ("mx", "store", "proxy"):
            assert bodies(cluster.root / "inc", channel) == bodies(
                cluster.root / "full", channel
            ), f"step {number} ({name}): channel {channel} differs from a full render"
    print("reads:", {r: reads.count(r) for r in set(reads)})
    assert reads.count("incremental") >= 60

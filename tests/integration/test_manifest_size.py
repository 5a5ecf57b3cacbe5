"""No manifest the agents would refuse is ever signed, and an agent says why it refuses one.

Agents fetch at most ``MAX_MANIFEST_BYTES`` (1 MiB) of manifest. Twenty thousand invalid rows
skipped with ``--skip-invalid`` used to be listed one by one, signing a manifest every node
refused (as "MANIFEST.json is missing"): the publisher lists the first rows and counts the rest.
"""

from __future__ import annotations

import json
from dataclasses import replace

from sqlalchemy import create_engine, insert

from mapsync.release import MAX_MANIFEST_BYTES, Latest, manifest_sha256, parse_manifest
from mapsync.signing import load_private, sign
from mapsync.sources import schema as t
from tests.conftest import Cluster

ROWS = 14_000  # listed one by one, ~1.3 MB of manifest


def _invalid_aliases(cluster: Cluster, n: int) -> None:
    engine = create_engine(cluster.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(t.alias),
                [{"id": 100_000 + i, "domain_id": 2, "local_part": f"bad{i}"} for i in range(n)],
            )
            conn.execute(
                insert(t.alias_target),
                [{"alias_id": 100_000 + i, "target": "nowhere"} for i in range(n)],
            )
    finally:
        engine.dispose()


def test_twenty_thousand_skipped_rows_make_a_manifest_every_agent_accepts(
    cluster: Cluster,
) -> None:
    _invalid_aliases(cluster, ROWS)
    out = cluster.publish("--skip-invalid").stdout
    assert "published serial 1" in out and f"skipped {ROWS} invalid row(s)" in out

    path = cluster.repo / "mx" / "releases" / "1" / "MANIFEST.json"
    assert path.stat().st_size < 64 * 1024
    skipped = json.loads(path.read_text())["skipped"]
    assert len(skipped) == 101
    assert skipped[0].startswith("alias id=100000 'bad0@example-2.org': target 'nowhere'")
    assert skipped[-1] == (
        f"... and {ROWS - 100} more: {ROWS} invalid row(s) skipped in all "
        "(the publisher's log names each)"
    )
    pulled = cluster.cli("pull")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "installed serial 1" in pulled.stdout


def test_an_agent_names_a_manifest_too_large_not_missing(cluster: Cluster) -> None:
    """A repository not written by this publisher (an older one, a hand-made release)."""
    cluster.publish()
    cluster.pull()
    repo = cluster.repo / "mx"
    one = repo / "releases" / "1"
    m = parse_manifest((one / "MANIFEST.json").read_bytes(), "release 1")
    big = replace(m, serial=2, previous=1, skipped=["x" * 1000] * 1100)
    data = big.to_bytes()
    assert len(data) > MAX_MANIFEST_BYTES
    two = repo / "releases" / "2"
    two.mkdir()
    for f in m.files():
        (two / f).write_bytes((one / f).read_bytes())
    (two / "MANIFEST.json").write_bytes(data)
    key = load_private(cluster.root / "keys" / "signing.key")
    (two / "MANIFEST.json.sig").write_bytes(sign(key, data))
    (repo / "LATEST").write_bytes(Latest(2, manifest_sha256(data)).to_bytes())

    proc = cluster.cli("pull")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert (
        f"MANIFEST.json: {len(data)} bytes, too large (agents accept at most 1048576)"
        in proc.stderr
    )
    assert "is missing" not in proc.stderr
    verified = cluster.cli("verify")  # serial 1 keeps serving, whole
    assert verified.returncode == 0 and "serial 1 verified" in verified.stdout

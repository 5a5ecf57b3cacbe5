"""A pulled release is verified once: the manifest's signature is checked when the manifest
arrives, and everything after (the listing, the files, the install) works from that
VerifiedRelease instead of reading and checking the manifest again."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import create_engine, select, update

import mapsync.formats.text as text_mod
import mapsync.release.verify as verify_mod
from mapsync.agent.pull import pull
from mapsync.release import SIGNATURE
from mapsync.sources import schema as t
from tests.conftest import Cluster


def test_a_pull_checks_the_fetched_manifests_signature_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.publish()
    checked: list[str] = []
    real = verify_mod.verify

    def counting(
        keys: Mapping[str, Ed25519PublicKey], data: bytes, signature: bytes, where: str
    ) -> str:
        checked.append(where)
        return real(keys, data, signature, where)

    monkeypatch.setattr(verify_mod, "verify", counting)
    agent = cluster.config().need_agent()
    assert pull(agent, agent.channels["mx"]).action == "installed"
    assert checked == [f"{cluster.repo / 'mx'}/releases/1/{SIGNATURE}"]


def test_a_changed_map_of_the_same_size_is_not_hashed_to_see_whether_it_changed(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new release keeps the live inodes of a map it did not change, once their hashes
    prove them intact; a map whose files the live manifest gives other hashes changed, and is
    built without its live files being read first (a password or target of the same length:
    the sizes alone cannot tell)."""
    cluster.publish()
    agent = cluster.config().need_agent()
    assert pull(agent, agent.channels["mx"]).action == "installed"
    engine = create_engine(cluster.db_url)
    try:
        with engine.begin() as conn:
            target = conn.execute(select(t.alias_target.c.target).limit(1)).scalar_one()
            local, _, domain = target.rpartition("@")
            changed = f"{local}@{'q' * (len(domain) - 4)}.net"  # elsewhere, the same length
            conn.execute(
                update(t.alias_target)
                .where(t.alias_target.c.target == target)
                .values(target=changed)
            )
    finally:
        engine.dispose()
    assert "published serial 2" in cluster.publish().stdout
    live = cluster.target / ".mapsync" / "1"
    assert sum(1 for _ in live.iterdir()) > 2
    hashed: list[Path] = []
    real = text_mod.sha256_file

    def spying(path: Path) -> tuple[str, int]:
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(text_mod, "sha256_file", spying)
    assert pull(agent, agent.channels["mx"]).action == "installed"
    from_live = {p.name for p in hashed if p.parent == live}
    assert "domains" in from_live  # an unchanged map, proved intact before it is linked
    assert not {"virtual", "virtual.cdb"} & from_live, from_live
    assert (cluster.target / "virtual").read_text().count(changed) >= 1

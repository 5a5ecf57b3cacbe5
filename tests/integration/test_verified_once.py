"""A pulled release is verified once: the manifest's signature is checked when the manifest
arrives, and everything after (the listing, the files, the install) works from that
VerifiedRelease instead of reading and checking the manifest again."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import mapsync.release.verify as verify_mod
from mapsync.agent.pull import pull
from mapsync.release import SIGNATURE
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

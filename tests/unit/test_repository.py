"""The publisher's repository stages and commits every release (publish and rollback alike):
one serial rule, one staging directory, and a release that is visible only once whole."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mapsync.publish.repository import Repository
from mapsync.release import LATEST, MANIFEST, STAGING, Manifest, MapEntry, parse_latest
from mapsync.release.verify import check_map_files, verify_release
from mapsync.signing import key_id

TEXT = b"# recipients\nkim@example.org OK\n"


def _manifest(serial: int, previous: int | None) -> Manifest:
    digest = hashlib.sha256(TEXT).hexdigest()
    return Manifest(
        "mx", serial, previous, "2026-11-30T00:00:00Z", "2036-11-30T00:00:00Z", "mapsync test",
        {"url": "sqlite:///x.db"}, {"recipients": MapEntry("recipients", 1, digest, len(TEXT), digest)},
    )  # fmt: skip


def _publish(repo: Repository, key: Ed25519PrivateKey, keep: int = 5) -> Manifest:
    last = repo.latest_manifest("mx")
    with repo.stage("mx", last) as staging:
        (staging.path / "recipients").write_bytes(TEXT)
        return repo.commit(
            staging, _manifest(staging.serial, last.serial if last else None), key, keep=keep
        )


def test_a_committed_release_is_signed_named_by_latest_and_leaves_no_staging(
    tmp_path: Path,
) -> None:
    repo, key = Repository(tmp_path), Ed25519PrivateKey.generate()
    signed = _publish(repo, key)
    assert signed.serial == 1
    assert signed.signer == key_id(key.public_key())
    public = key.public_key()
    release = verify_release(
        repo.release("mx", 1), {key_id(public): public}, "test", channel="mx", serial=1
    )
    check_map_files(release, "test")
    latest = parse_latest((tmp_path / "mx" / LATEST).read_bytes(), "LATEST")
    assert latest.serial == 1
    assert (repo.release("mx", 1) / MANIFEST).read_bytes() == signed.to_bytes()
    assert not (tmp_path / "mx" / STAGING).exists()


def test_serials_follow_latest_and_old_releases_are_collected(tmp_path: Path) -> None:
    repo, key = Repository(tmp_path), Ed25519PrivateKey.generate()
    for _ in range(4):
        _publish(repo, key, keep=2)
    assert repo.serials("mx") == [3, 4]
    assert repo.manifest("mx", 4).previous == 3


def test_a_crashed_runs_leftovers_are_removed_and_an_uncommitted_stage_leaves_nothing(
    tmp_path: Path,
) -> None:
    repo = Repository(tmp_path)
    leftover = tmp_path / "mx" / STAGING / "7"
    leftover.mkdir(parents=True)
    (leftover / "recipients").write_bytes(b"half written")
    with pytest.raises(RuntimeError), repo.stage("mx", None) as staging:
        assert staging.serial == 1
        assert not leftover.exists()
        (staging.path / "recipients").write_bytes(TEXT)
        raise RuntimeError("render failed")
    assert not (tmp_path / "mx" / STAGING).exists()
    assert repo.serials("mx") == []
    assert not (tmp_path / "mx" / LATEST).exists()


def test_a_stray_file_taking_a_serial_is_skipped(tmp_path: Path) -> None:
    repo, key = Repository(tmp_path), Ed25519PrivateKey.generate()
    _publish(repo, key)
    (tmp_path / "mx" / "releases" / "2").write_bytes(b"not a release")
    assert _publish(repo, key).serial == 3

"""The one way to a trusted manifest (mapsync.release.verify): a VerifiedRelease is only
returned for a release a trusted key signed, of the channel and serial asked for, whose
manifest LATEST names; its map files are checked against it, never against a re-read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mapsync.errors import VerificationError
from mapsync.release import (
    MANIFEST,
    SIGNATURE,
    Latest,
    Manifest,
    MapEntry,
    manifest_sha256,
)
from mapsync.release.verify import (
    FileAltered,
    VerifiedRelease,
    check_map_files,
    verify_manifest,
    verify_release,
)
from mapsync.signing import key_id, sign

TEXT = b"# recipients\n# header\nkim@example.org OK\n"


def _release(directory: Path, key: Ed25519PrivateKey, serial: int = 4) -> bytes:
    """Write a signed one-map release of channel mx into ``directory``; its manifest bytes."""
    digest = hashlib.sha256(TEXT).hexdigest()
    entry = MapEntry("recipients", 1, digest, len(TEXT), digest)
    manifest = Manifest(
        "mx", serial, None, "2026-11-30T00:00:00Z", "2036-11-30T00:00:00Z", "mapsync test",
        {"url": "sqlite:///x.db"}, {"recipients": entry},
    )  # fmt: skip
    data = manifest.to_bytes()
    directory.mkdir(exist_ok=True)
    (directory / "recipients").write_bytes(TEXT)
    (directory / MANIFEST).write_bytes(data)
    (directory / SIGNATURE).write_bytes(sign(key, data))
    return data


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _trusted(*keys: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    return {key_id(k.public_key()): k.public_key() for k in keys}


def test_a_signed_release_is_verified_once_with_its_path_manifest_and_key(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    data = _release(tmp_path, key)
    latest: Latest | None = Latest(4, manifest_sha256(data))
    got = verify_release(tmp_path, _trusted(key), "r", channel="mx", serial=4, latest=latest)
    assert isinstance(got, VerifiedRelease)
    assert (got.path, got.key_id) == (tmp_path, key_id(key.public_key()))
    assert got.manifest.serial == 4 and set(got.manifest.maps) == {"recipients"}
    check_map_files(got, "r")  # the text is the manifest's
    same = verify_manifest(tmp_path, data, (tmp_path / SIGNATURE).read_bytes(), _trusted(key), "r")
    assert same == got


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ("other key", r"r/MANIFEST.json.sig: signature does not verify with any trusted key"),
        ("channel", r"r/MANIFEST.json: is for channel 'mx', not 'store-1'"),
        ("serial", r"r/MANIFEST.json: is serial 4, not 5"),
        ("latest", r"r/MANIFEST.json: sha256 differs from the one LATEST names"),
        ("no signature", r"r: MANIFEST.json.sig is missing"),
        ("tampered", r"signature does not verify"),
    ],
)
def test_anything_but_the_release_asked_for_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, change: str, error: str
) -> None:
    data = _release(tmp_path, key)
    keys = _trusted(Ed25519PrivateKey.generate() if change == "other key" else key)
    channel = "store-1" if change == "channel" else "mx"
    serial = 5 if change == "serial" else 4
    latest: Latest | None = Latest(4, "0" * 64 if change == "latest" else manifest_sha256(data))
    if change == "tampered":
        latest = None  # a manifest altered in place: only its signature can tell
    if change == "no signature":
        (tmp_path / SIGNATURE).unlink()
    elif change == "tampered":
        (tmp_path / MANIFEST).write_bytes(data.replace(b'"serial": 4', b'"serial": 9'))
    with pytest.raises(VerificationError, match=error):
        verify_release(tmp_path, keys, "r", channel=channel, serial=serial, latest=latest)


def test_a_map_file_is_checked_against_the_verified_manifest(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    _release(tmp_path, key)
    got = verify_release(tmp_path, _trusted(key), "r")
    (tmp_path / "recipients").write_bytes(TEXT.replace(b"kim", b"eve"))
    with pytest.raises(FileAltered, match=r"r/recipients: sha256 .* the file was altered"):
        check_map_files(got, "r")
    (tmp_path / "recipients").unlink()
    with pytest.raises(VerificationError, match=r"r/recipients: missing or not a regular file"):
        check_map_files(got, "r")

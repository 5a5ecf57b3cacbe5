"""The release format: manifests and LATEST pointers round-trip, and anything odd is refused;
signatures verify only over the exact bytes with a trusted key."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mapsync.errors import VerificationError
from mapsync.release import (
    CdbInfo,
    CustomInfo,
    Latest,
    Manifest,
    MapEntry,
    PatchInfo,
    iso,
    manifest_sha256,
    parse_iso,
    parse_latest,
    parse_manifest,
    same_maps,
)
from mapsync.signing import Keyring, key_id, public_path, sign, verify

H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64


def manifest(**kw: Any) -> Manifest:
    base = Manifest(
        channel="mx",
        serial=7,
        previous=6,
        created="2026-01-01T00:00:00Z",
        expires="2026-01-08T00:00:00Z",
        generator="mapsync 0.1.0",
        source={"url": "sqlite:///x.db", "schema": "mapsync", "fingerprint": "sha256:ab"},
        maps={
            "recipients": MapEntry(
                "recipients", 3, H1, 100, H2, CdbInfo("recipients.cdb", H3, 2100)
            ),
            "domains": MapEntry("domains", 1, H2, 50, H3, None, forced=True),
        },
        skipped=["account id=3 'a b@x.org': bad"],
    )
    return replace(base, **kw)


def raw(m: Manifest) -> dict[str, Any]:
    return json.loads(m.to_bytes())


def test_manifest_round_trip() -> None:
    m = manifest()
    data = m.to_bytes()
    assert parse_manifest(data, "m") == m
    assert data.endswith(b"\n")
    assert json.loads(data)["format"] == 1
    assert m.files() == {"recipients", "domains"}
    assert m.expires_at() == datetime(2026, 1, 8, tzinfo=UTC)
    assert m.created_at() == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_manifest(manifest(previous=None).to_bytes(), "m").previous is None


def test_manifest_bytes_are_canonical() -> None:
    # Same content → same bytes → same signature and same LATEST hash.
    assert manifest().to_bytes() == manifest().to_bytes()
    assert manifest_sha256(manifest().to_bytes()) != manifest_sha256(manifest(serial=8).to_bytes())


def _mutate(path: str, value: Any) -> bytes:
    obj = raw(manifest())
    *parents, last = path.split(".")
    node = obj
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return json.dumps(obj).encode()


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        ("format", 2, "format 2 is not supported"),
        ("format", _DELETE, "missing field 'format'"),
        ("serial", "7", "field 'serial' has the wrong type"),
        ("serial", True, "field 'serial' has the wrong type"),
        ("serial", _DELETE, "missing field 'serial'"),
        ("previous", "6", "field 'previous' has the wrong type"),
        ("previous", False, "field 'previous' has the wrong type"),
        ("channel", 5, "field 'channel' has the wrong type"),
        ("expires", "next week", "not UTC timestamps"),
        ("created", "2026-01-01 00:00:00", "not UTC timestamps"),
        ("maps", [], "field 'maps' has the wrong type"),
        ("maps.recipients.sha256", "ABC", "not a sha256 hex digest"),
        ("maps.recipients.sha256", "A" * 64, "not a sha256 hex digest"),
        ("maps.recipients.content_sha256", _DELETE, "missing field 'content_sha256'"),
        ("maps.recipients.entries", "3", "field 'entries' has the wrong type"),
        ("maps.recipients.file", "../etc/passwd", "file name '../etc/passwd' is not allowed"),
        ("maps.recipients.file", "sub/recipients", "is not allowed"),
        ("maps.recipients.file", ".hidden", "is not allowed"),
        ("maps.recipients.file", "recipients\n", "is not allowed"),
        ("maps.recipients.file", "MANIFEST.json", "is not allowed"),
        ("maps.recipients.cdb.file", "other.cdb", "is not recipients.cdb"),
        ("maps.recipients.cdb.sha256", "x", "not a sha256 hex digest"),
        ("maps.recipients", "text", "bad map entry"),
        ("maps.domains.file", "recipients", "two maps name the same file"),
    ],
)
def test_parse_manifest_refuses(path: str, value: Any, error: str) -> None:
    with pytest.raises(VerificationError, match=r"^m: ") as info:
        parse_manifest(_mutate(path, value), "m")
    assert error in str(info.value)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b" " * (1 << 20) + b"{}", "too large for a manifest"),
    ],
)
def test_parse_manifest_refuses_garbage(data: bytes, error: str) -> None:
    with pytest.raises(VerificationError, match=error):
        parse_manifest(data, "m")


def test_bad_map_name_is_refused() -> None:
    obj = raw(manifest())
    obj["maps"]["../x"] = obj["maps"].pop("domains")
    with pytest.raises(VerificationError, match="bad map entry"):
        parse_manifest(json.dumps(obj).encode(), "m")


def test_same_maps_is_same_names_and_content_and_identical_is_same_files() -> None:
    maps = manifest().maps
    assert same_maps(maps, dict(maps))
    # A renewal: the previous entries again, forced cleared.
    renewed = {n: replace(e, forced=False) for n, e in maps.items()}
    assert same_maps(renewed, maps, identical=True)
    # Same lines in another file (another header): same content, not identical files.
    reheaded = {**maps, "domains": replace(maps["domains"], sha256=H1, size=51)}
    assert same_maps(reheaded, maps)
    assert not same_maps(reheaded, maps, identical=True)
    # Other lines, a map more or less, a cdb switched off, a separator changed: not the same.
    assert not same_maps({**maps, "domains": replace(maps["domains"], content_sha256=H1)}, maps)
    assert not same_maps({"recipients": maps["recipients"]}, maps)
    assert not same_maps(maps, {"recipients": maps["recipients"]})
    assert not same_maps({**maps, "recipients": replace(maps["recipients"], cdb=None)}, maps)
    custom = {**maps, "domains": replace(maps["domains"], custom=CustomInfo(":"))}
    assert not same_maps(custom, {**maps, "domains": replace(maps["domains"], custom=CustomInfo())})


def test_a_manifest_expires_at_its_expires_time() -> None:
    m = manifest(expires="2026-01-08T00:00:00Z")
    assert not m.expired(datetime(2026, 1, 7, 23, 59, 59, tzinfo=UTC))
    assert m.expired(datetime(2026, 1, 8, tzinfo=UTC))
    assert m.expired()  # now: long after 2026-01-08
    assert not manifest(expires="2999-01-01T00:00:00Z").expired()


def test_latest_round_trip_and_refusals() -> None:
    latest = Latest(12, H1)
    assert parse_latest(latest.to_bytes(), "L") == latest
    for data, error in [
        (b'{"serial": 0, "manifest_sha256": "' + H1.encode() + b'"}', "serial must be positive"),
        (b'{"serial": true, "manifest_sha256": "' + H1.encode() + b'"}', "wrong type"),
        (b'{"serial": "3", "manifest_sha256": "' + H1.encode() + b'"}', "wrong type"),
        (b'{"serial": 3, "manifest_sha256": "xyz"}', "not a sha256 hex digest"),
        (b'{"serial": 3}', "missing field 'manifest_sha256'"),
        (b"[]", "not a JSON object"),
        (b"3", "not a JSON object"),
        (b"{" + b" " * 5000 + b"}", "a LATEST pointer is tiny"),
    ]:
        with pytest.raises(VerificationError, match=error):
            parse_latest(data, "L")


def test_iso_round_trip() -> None:
    t = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert iso(t) == "2026-03-04T05:06:07Z"
    assert parse_iso(iso(t)) == t


# --- signatures --------------------------------------------------------------------------------


def test_a_refused_signature_names_the_claimed_signer_and_each_trusted_key_file() -> None:
    signer, trusted = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    data = replace(manifest(), signer=key_id(signer.public_key())).to_bytes()
    keys = Keyring()
    kid = keys.add(trusted.public_key(), Path("/etc/mapsync/keys/publisher.pub"))
    with pytest.raises(VerificationError) as exc:
        verify(keys, data, sign(signer, data), "s")
    assert str(exc.value) == (
        f"s: signature does not verify with any trusted key; the manifest names signing key "
        f"{key_id(signer.public_key())} (unverified); trusted keys: {kid} "
        f"(/etc/mapsync/keys/publisher.pub)"
    )
    # A malformed claim is not repeated; a parsed manifest refuses it.
    bad = data.replace(key_id(signer.public_key()).encode(), b"not-a-key-id!!!!")
    with pytest.raises(VerificationError, match="does not name its signing key"):
        verify(keys, bad, sign(signer, bad), "s")
    with pytest.raises(VerificationError, match="field 'signer' is not a key id"):
        parse_manifest(bad, "m")
    assert parse_manifest(data, "m").signer == key_id(signer.public_key())


def test_signature_verifies_only_the_exact_bytes_with_a_trusted_key() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    data = manifest().to_bytes()
    sig = sign(key, data)
    assert len(base64.b64decode(sig)) == 64 and sig.endswith(b"\n")
    trusted = {key_id(key.public_key()): key.public_key()}
    assert verify(trusted, data, sig, "s") == key_id(key.public_key())
    # Key rotation: any trusted key may have signed.
    both = {key_id(other.public_key()): other.public_key(), **trusted}
    assert verify(both, data, sig, "s") == key_id(key.public_key())

    with pytest.raises(VerificationError, match="does not verify with any trusted key"):
        verify(trusted, data.replace(b'"serial": 7', b'"serial": 8'), sig, "s")
    with pytest.raises(VerificationError, match="does not verify"):
        verify({key_id(other.public_key()): other.public_key()}, data, sig, "s")
    with pytest.raises(VerificationError, match=r"does not verify with any trusted key; .*: none"):
        verify({}, data, sig, "s")
    with pytest.raises(VerificationError, match="not base64"):
        verify(trusted, data, b"***", "s")
    with pytest.raises(VerificationError, match="has 63 bytes, not 64"):
        verify(trusted, data, base64.b64encode(b"x" * 63), "s")


def test_key_id_is_short_and_stable() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    assert key_id(key) == key_id(key)
    assert len(key_id(key)) == 16 and int(key_id(key), 16) >= 0


@pytest.mark.parametrize(
    ("private", "public"),
    [
        ("/etc/mapsync/signing.key", "/etc/mapsync/signing.pub"),
        ("/k", "/k.pub"),
        ("/keys/release-2026", "/keys/release-2026.pub"),
        ("/keys/a.pem", "/keys/a.pem.pub"),
    ],
)
def test_public_path(private: str, public: str) -> None:
    assert public_path(Path(private)) == Path(public)


def test_serial_names_tell_release_directories_from_everything_else(tmp_path: Path) -> None:
    from mapsync.release import is_serial_name, serial_names

    assert [n for n in ("1", "12", "012", "0", "²", "٣", "1.tmp", "") if is_serial_name(n)] == [
        "1",
        "12",
    ]
    for name in ("3", "12", "007", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "5").write_text("a file named like a serial")
    good, taken, stray = serial_names(tmp_path)
    assert good == [3, 12] and taken == [5]
    assert sorted(p.name for p in stray) == ["007", "5", "notes"]
    assert serial_names(tmp_path / "missing") == ([], [], [])


def test_patches_round_trip_and_are_absent_when_none() -> None:
    m = manifest(patches={"recipients": PatchInfo(6, "recipients.patch", H1, 250)})
    assert raw(m)["patches"] == {
        "recipients": {"from": 6, "file": "recipients.patch", "sha256": H1, "size": 250}
    }
    assert parse_manifest(m.to_bytes(), "M") == m
    assert "patches" not in raw(manifest())  # additive: a manifest without is as before


@pytest.mark.parametrize(
    ("patch", "error"),
    [
        ({"dovecot_users": {"from": 6, "file": "x.patch", "sha256": H1, "size": 1}}, "not a map"),
        ({"recipients": {"from": 6, "file": "domains.patch", "sha256": H1, "size": 1}}, "is not"),
        (
            {"recipients": {"from": 7, "file": "recipients.patch", "sha256": H1, "size": 1}},
            "earlier",
        ),
        (
            {"recipients": {"from": 6, "file": "recipients.patch", "sha256": "x", "size": 1}},
            "sha256",
        ),
        ({"recipients": {"from": 0, "file": "recipients.patch", "sha256": H1, "size": 1}}, "range"),
        ([], "wrong type"),
    ],
)
def test_bad_patches_are_refused(patch: Any, error: str) -> None:
    data = raw(manifest())
    data["patches"] = patch
    with pytest.raises(VerificationError, match=error):
        parse_manifest(json.dumps(data).encode(), "M")

"""The signing key is read without cryptography's PEM loader when keygen wrote it (a publish
that signs nothing spares that import), and to the very same key; any other PEM goes to the
loader, which reads or refuses it as ever."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from mapsync.errors import ConfigError, MapsyncError
from mapsync.signing import _keygen_seed, key_id, keygen, load_private, load_public, public_key_id


def _write(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def test_a_key_keygen_wrote_is_the_key_cryptography_reads(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    keygen(path)
    pem = path.read_bytes()
    assert _keygen_seed(pem) is not None  # not vacuous: the short way is taken
    expected = serialization.load_pem_private_key(pem, password=None)
    key = load_private(path)
    assert key.private_bytes_raw() == expected.private_bytes_raw()  # type: ignore[union-attr]
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


def test_any_other_form_of_the_key_is_read_by_cryptography(tmp_path: Path) -> None:
    keygen(tmp_path / "signing.key")
    pem = (tmp_path / "signing.key").read_bytes()
    want = load_private(tmp_path / "signing.key").private_bytes_raw()
    for i, other in enumerate(
        [
            pem.replace(b"\n", b"\r\n"),
            pem + b"\n",
            b"the publisher's key\n" + pem,
        ]
    ):
        assert _keygen_seed(other) is None
        path = _write(tmp_path / f"other-{i}.key", other)
        assert load_private(path).private_bytes_raw() == want


@pytest.mark.parametrize(
    "private",
    [x25519.X25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())],
    ids=["x25519", "p256"],
)
def test_a_key_of_another_kind_is_refused(tmp_path: Path, private: object) -> None:
    pem = private.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert _keygen_seed(pem) is None  # an X25519 key has the same length, not the same OID
    path = _write(tmp_path / "other.key", pem)
    with pytest.raises(ConfigError, match="not an ed25519 key"):
        load_private(path)


def test_a_damaged_key_is_refused_as_ever(tmp_path: Path) -> None:
    keygen(tmp_path / "signing.key")
    lines = (tmp_path / "signing.key").read_bytes().split(b"\n")
    lines[1] = lines[1][:-8] + b"!!!!!!!!"
    damaged = b"\n".join(lines)
    assert _keygen_seed(damaged) is None
    with pytest.raises(ConfigError, match="not a PEM private key"):
        load_private(_write(tmp_path / "damaged.key", damaged))


def test_a_public_key_s_id_is_read_without_cryptography_and_is_the_same(tmp_path: Path) -> None:
    """``status`` compares the live manifest's signer with the trusted keys' ids every minute:
    a key file as keygen writes it gives its id without the loader; any other form (CRLF line
    ends, a copy through Windows) the same id through it; a private key or garbage is refused
    naming the file."""
    public, kid = keygen(tmp_path / "signing.key")
    assert public_key_id(public) == kid == key_id(load_public(public))
    crlf = tmp_path / "crlf.pub"
    crlf.write_bytes(public.read_bytes().replace(b"\n", b"\r\n"))
    assert public_key_id(crlf) == kid
    for bad in (tmp_path / "signing.key", _write(tmp_path / "junk.pub", b"junk\n")):
        with pytest.raises(ConfigError, match=re.escape(str(bad))):
            public_key_id(bad)
    with pytest.raises(ConfigError, match=r"missing\.pub"):
        public_key_id(tmp_path / "missing.pub")


def test_keygen_refuses_a_dangling_symlink_where_a_key_would_go(tmp_path: Path) -> None:
    """/etc/mapsync/signing.key a link to a key on a volume not mounted: keygen replaced the
    link with a new key, and once the volume came back the publisher signed with a key no
    node trusts (`exists()` follows the link and found nothing)."""
    (tmp_path / "signing.key").symlink_to(tmp_path / "vault" / "signing.key")
    with pytest.raises(MapsyncError, match="already exists; refusing to overwrite a key"):
        keygen(tmp_path / "signing.key")
    assert (tmp_path / "signing.key").is_symlink()
    assert not (tmp_path / "signing.pub").exists()


def test_keygen_refuses_a_private_key_named_pub(tmp_path: Path) -> None:
    """`mapsync keygen /etc/mapsync/signing.pub` wrote the private key to signing.pub, the
    file the docs say to copy to every node, and its public half to signing.pub.pub."""
    with pytest.raises(MapsyncError, match=r"mapsync keygen .*/signing\.key\)"):
        keygen(tmp_path / "signing.pub")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646])
def test_a_trusted_key_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    """docs/security.md: a trusted key is writable by root only; whoever may write it may put
    a key of their own there and sign maps the node installs. 0644 and 0444 are fine."""
    keygen(tmp_path / "signing.key")
    public = tmp_path / "signing.pub"
    for fine in (0o644, 0o444):
        public.chmod(fine)
        load_public(public)
    public.chmod(mode)
    with pytest.raises(
        ConfigError, match=rf"mode {mode:04o}, so its group or others may replace it"
    ):
        load_public(public)

"""ed25519 signing of manifests (``cryptography``).

Keys are PEM files: the private half PKCS#8 with mode 0600, the public half
SubjectPublicKeyInfo beside it (``signing.key`` → ``signing.pub``, ``k`` → ``k.pub``).
A signature file holds the base64 of the 64-byte signature over the exact manifest bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mapsync.access import denied
from mapsync.atomic import atomic_write
from mapsync.errors import ConfigError, MapsyncError, VerificationError

# cryptography is imported by the functions that use a key (40 ms): a pull or a publish that
# finds nothing changed verifies and signs nothing.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )


def public_path(private: Path) -> Path:
    """Where the public half of ``private`` lives."""
    return (
        private.with_suffix(".pub")
        if private.suffix == ".key"
        else private.with_name(private.name + ".pub")
    )


def keygen(private: Path) -> tuple[Path, str]:
    """Create a key pair at ``private`` (0600) and its public half; refuse to overwrite.
    Returns the public key's path and its key id."""
    public = public_path(private)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if private.suffix == ".pub":
        # signing.pub is the file every node is given: a private key there is one copy away
        # from every node (and the public half would be signing.pub.pub).
        raise MapsyncError(
            f"{private}: PATH is the private key's file, and .pub names the public half "
            f"written beside it (mapsync keygen {private.with_suffix('.key')})"
        )
    for p in (private, public):
        if os.path.lexists(p):  # a symlink too, even one to a key not there now (a mount)
            raise MapsyncError(f"{p}: already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(private, pem, mode=0o600)
    atomic_write(public, pub, mode=0o644)
    return public, key_id(key.public_key())


def load_private(path: Path) -> Ed25519PrivateKey:
    """The signing key at ``path``, refused unless only its owner (or root) may read it."""
    try:
        with open(path, "rb") as fh:
            _check_private_mode(path, os.fstat(fh.fileno()))  # the file read, not a name
            pem = fh.read()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: signing key not found (create one with `mapsync keygen {path}`)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: signing key is a directory, not a PEM file") from None
    except PermissionError:
        raise ConfigError(denied(path, "reading the signing key")) from None
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = _keygen_seed(pem)
    if seed is not None:
        return Ed25519PrivateKey.from_private_bytes(seed)
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an ed25519 key")
    return key


# The DER of an ed25519 key in PKCS#8 (RFC 8410) up to its 32-byte seed: what keygen writes.
_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")


def _keygen_seed(pem: bytes) -> bytes | None:
    """The seed of ``pem`` if it is an ed25519 key exactly as :func:`keygen` writes it (one
    PEM block, PKCS#8, unencrypted); None for anything else, which cryptography's PEM loader
    then reads or refuses. Spares a publish that signs nothing that loader's import (its
    serialization package: SSH keys, ciphers; 6 ms of a 0.1 s run)."""
    lines = pem.split(b"\n")
    if len(lines) != 4 or lines[0] != b"-----BEGIN PRIVATE KEY-----" or lines[3] != b"":
        return None
    if lines[2] != b"-----END PRIVATE KEY-----":
        return None
    try:
        der = base64.b64decode(lines[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_PKCS8_ED25519) + 32 or not der.startswith(_PKCS8_ED25519):
        return None
    return der[len(_PKCS8_ED25519) :]


def _check_private_mode(path: Path, st: os.stat_result) -> None:
    """Refuse, as rsync refuses a readable ``password_file``: whoever can read the key can
    sign a release every node installs. A warning would scroll past in a timer's journal."""
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: signing key is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{path}: signing key has mode {mode:04o}, so others may read it and sign releases "
            f"every node trusts; it must be 0600 or 0400 (chmod 600 {path})"
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"{path}: signing key is owned by uid {st.st_uid}, not by the publisher's user "
            f"(uid {os.geteuid()}) or root (chown {os.geteuid()} {path})"
        )


def _read_trusted(path: Path) -> bytes:
    """A trusted key file's bytes, for :func:`load_public` and :func:`public_key_id` alike:
    ConfigError naming the file when it cannot be read, or when its group or others may write
    it (docs/security.md: writable by root only; whoever may write the file may replace it
    with a key of their own and sign maps every node installs)."""
    try:
        with open(path, "rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: trusted key not found") from None
    except PermissionError:
        raise ConfigError(denied(path, "reading the trusted key")) from None
    except OSError as exc:
        raise ConfigError(f"{path}: trusted key cannot be read ({exc.strerror})") from None
    if mode & 0o022:
        raise ConfigError(
            f"{path}: trusted key has mode {mode:04o}, so its group or others may replace it "
            f"with their own key and sign maps this node installs; chmod go-w {path}"
        )
    return data


def load_public(path: Path) -> Ed25519PublicKey:
    """The ed25519 public key in PEM file ``path``; ConfigError naming the file otherwise."""
    return _public(_read_trusted(path), path)


def _public(data: bytes, path: Path) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an ed25519 public key")
    return key


KEY_ID = re.compile(r"[0-9a-f]{16}")

# The DER of an ed25519 public key in SubjectPublicKeyInfo (RFC 8410) up to its 32 raw bytes:
# what keygen writes beside the private key.
_SPKI_ED25519 = bytes.fromhex("302a300506032b6570032100")


def public_key_id(path: Path) -> str:
    """The key id of the public key in PEM file ``path``, read without cryptography when the
    file is as :func:`keygen` writes it (``status`` runs every minute and imports none);
    ConfigError naming the file when it cannot be read or is no ed25519 public key."""
    pem = _read_trusted(path)
    lines = pem.split(b"\n")
    if (
        len(lines) == 4
        and lines[0] == b"-----BEGIN PUBLIC KEY-----"
        and lines[2] == b"-----END PUBLIC KEY-----"
        and lines[3] == b""
    ):
        try:
            der = base64.b64decode(lines[1], validate=True)
        except (binascii.Error, ValueError):
            der = b""
        if len(der) == len(_SPKI_ED25519) + 32 and der.startswith(_SPKI_ED25519):
            return hashlib.sha256(der[len(_SPKI_ED25519) :]).hexdigest()[:16]
    return key_id(_public(pem, path))


def key_id(key: Ed25519PublicKey) -> str:
    """Short, stable name of a public key for logs and status (first 16 hex of its sha256)."""
    return hashlib.sha256(key.public_bytes_raw()).hexdigest()[:16]


class Keyring(dict[str, "Ed25519PublicKey"]):
    """Trusted public keys by key id, remembering the file each came from (for messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, Path] = {}

    def add(self, key: Ed25519PublicKey, path: Path) -> str:
        """Trust ``key``, read from ``path``; return its key id."""
        kid = key_id(key)
        self[kid] = key
        self.files[kid] = path
        return kid

    def describe(self) -> str:
        """``id (file), ...`` of every trusted key, or ``none``."""
        return ", ".join(f"{k} ({self.files[k]})" if k in self.files else k for k in self) or "none"


def claimed_signer(data: bytes) -> str | None:
    """The key id an (unverified) manifest says signed it, if it names a well-formed one."""
    try:
        signer = json.loads(data).get("signer")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return signer if isinstance(signer, str) and KEY_ID.fullmatch(signer) else None


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The signature file's content for ``data``."""
    return base64.b64encode(key.sign(data)) + b"\n"


def verify(keys: Mapping[str, Ed25519PublicKey], data: bytes, signature: bytes, where: str) -> str:
    """Return the id of the trusted key that signed ``data``; raise VerificationError otherwise."""
    from cryptography.exceptions import InvalidSignature

    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(f"{where}: signature file is not base64") from None
    if len(raw) != 64:
        raise VerificationError(f"{where}: signature has {len(raw)} bytes, not 64")
    for kid, key in keys.items():
        try:
            key.verify(raw, data)
            return kid
        except InvalidSignature:
            continue
    trusted = keys.describe() if isinstance(keys, Keyring) else ", ".join(keys) or "none"
    signer = claimed_signer(data)
    claim = (
        f"the manifest names signing key {signer} (unverified)"
        if signer
        else "the manifest does not name its signing key"
    )
    raise VerificationError(
        f"{where}: signature does not verify with any trusted key; {claim}; trusted keys: {trusted}"
    )

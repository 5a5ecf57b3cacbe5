"""Verifying a release: the one way publisher and agent come to a manifest they trust.

:func:`verify_release` reads a release directory's ``MANIFEST.json`` and its signature and
returns a :class:`VerifiedRelease` only if the manifest is the one ``LATEST`` names (when
given), a trusted key signed it, it is well-formed, it is for the expected channel and
serial, and it names only maps this mapsync can install. Everything after that — fetching
the files it lists, checking them (:func:`check_map_files`), building and installing,
re-publishing — works from the verified value, never from a manifest read again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mapsync.errors import VerificationError
from mapsync.formats import text
from mapsync.release.catalogue import check_map_names
from mapsync.release.format import (
    MANIFEST,
    SIGNATURE,
    Latest,
    Manifest,
    manifest_sha256,
    parse_manifest,
)
from mapsync.signing import verify

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from mapsync.formats.cdbpatch import Edit


@dataclass(frozen=True)
class VerifiedRelease:
    """A release directory (``path``) and its ``manifest``, which the trusted key
    ``key_id`` signed. The map files beside it are checked against it separately.

    What an agent's fetch learnt on the way (:mod:`mapsync.agent.patching`): ``proven``,
    the text files it wrote from a patch and found with the manifest's sha256 and size as it
    wrote them (in its private staging: not hashed again); ``cdb_edits``, per map so
    rebuilt, the pairs its patch changed, so the cdb can be changed in place from the live
    one instead of built whole — only a hint: what that makes must have the manifest's
    sha256 too."""

    path: Path
    manifest: Manifest
    key_id: str
    proven: frozenset[str] = field(default=frozenset(), compare=False)
    cdb_edits: Mapping[str, Sequence[Edit]] = field(default_factory=dict, compare=False)


class FileAltered(VerificationError):
    """A map file does not have the manifest's sha256 and size."""


def verify_release(
    directory: Path,
    keys: Mapping[str, Ed25519PublicKey],
    where: str,
    *,
    channel: str | None = None,
    serial: int | None = None,
    latest: Latest | None = None,
) -> VerifiedRelease:
    """The release in ``directory``, verified (see the module docstring); ``channel`` and
    ``serial``, when given, are what it must be. Messages name ``where`` and the file."""
    try:
        data = (directory / MANIFEST).read_bytes()
        signature = (directory / SIGNATURE).read_bytes()
    except FileNotFoundError as exc:
        raise VerificationError(f"{where}: {Path(exc.filename).name} is missing") from None
    return verify_manifest(
        directory, data, signature, keys, where, channel=channel, serial=serial, latest=latest
    )


def verify_manifest(
    directory: Path,
    data: bytes,
    signature: bytes,
    keys: Mapping[str, Ed25519PublicKey],
    where: str,
    *,
    channel: str | None = None,
    serial: int | None = None,
    latest: Latest | None = None,
) -> VerifiedRelease:
    """:func:`verify_release` for manifest bytes ``data`` and ``signature`` already read from
    ``directory``."""
    if latest is not None and manifest_sha256(data) != latest.manifest_sha256:
        raise VerificationError(f"{where}/{MANIFEST}: sha256 differs from the one LATEST names")
    kid = verify(keys, data, signature, f"{where}/{SIGNATURE}")
    manifest = parse_manifest(data, f"{where}/{MANIFEST}")
    if channel is not None and manifest.channel != channel:
        raise VerificationError(
            f"{where}/{MANIFEST}: is for channel {manifest.channel!r}, not {channel!r}"
        )
    if serial is not None and manifest.serial != serial:
        raise VerificationError(f"{where}/{MANIFEST}: is serial {manifest.serial}, not {serial}")
    check_map_names(manifest, where)
    return VerifiedRelease(directory, manifest, kid)


def check_map_files(release: VerifiedRelease, where: str) -> None:
    """Refuse unless every text map of ``release`` is a regular file with the manifest's
    sha256 and size (:class:`FileAltered` when it has other content); those its fetch proved
    (``proven``) by size alone."""
    check_files(release.path, release.manifest, where, release.proven)


def check_files(
    directory: Path, manifest: Manifest, where: str, proven: frozenset[str] = frozenset()
) -> None:
    """:func:`check_map_files` for the maps ``manifest`` names in ``directory``, whoever signed
    it (a mirror without trusted keys copies what it cannot judge; the agents judge it)."""
    for name, m in sorted(manifest.maps.items()):
        path = directory / m.file
        if not path.is_file() or path.is_symlink():
            raise VerificationError(f"{where}/{m.file}: missing or not a regular file (map {name})")
        if m.file in proven:
            digest, size = m.sha256, path.stat().st_size
        else:
            digest, size = text.sha256_file(path)
        if size != m.size or digest != m.sha256:
            raise FileAltered(
                f"{where}/{m.file}: sha256 {digest[:16]}… size {size} does not match the manifest "
                f"({m.sha256[:16]}… size {m.size}); the file was altered"
            )

"""What this node requires of a release before it installs it, wherever it comes from: a
source, the push inbox, a kept copy (``rollback``) or the copy a repair rebuilds from.

:func:`read_signed` is :func:`mapsync.release.verify.verify_release` plus the node's own
``maps`` setting; :func:`verify_files` checks expiry and the files beside the manifest;
:func:`check_keeps_maps` refuses a release that would drop a map the node serves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import VerificationError
from mapsync.release import MANIFEST, SIGNATURE, Latest, Manifest
from mapsync.release.verify import VerifiedRelease, check_map_files, verify_release
from mapsync.signing import Keyring, load_public

if TYPE_CHECKING:  # cryptography only where a key is used (mapsync.signing)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def trusted_keys(cfg: AgentConfig) -> Keyring:
    """The node's trusted public keys, by key id (messages name each key's file)."""
    keys = Keyring()
    for path in cfg.trusted_keys:
        keys.add(load_public(path), path)
    return keys


def read_signed(
    directory: Path,
    ch: AgentChannel,
    keys: Mapping[str, Ed25519PublicKey],
    where: str,
    latest: Latest | None = None,
    serial: int | None = None,
) -> VerifiedRelease:
    """The release in ``directory`` verified for channel ``ch``
    (:func:`mapsync.release.verify.verify_release`: the manifest's sha256 against ``latest``
    when given, its signature against the trusted keys, its channel, ``serial`` when given,
    its map names), and carrying no map that ``ch``'s ``maps`` does not list."""
    release = verify_release(directory, keys, where, channel=ch.name, serial=serial, latest=latest)
    for name in sorted(release.manifest.maps):
        if ch.maps and name not in ch.maps:
            raise VerificationError(
                f"{where}/{MANIFEST}: carries map {name!r}, which channel {ch.name} does not "
                f"(its maps: {', '.join(ch.maps)})"
            )
    return release


def verify_files(release: VerifiedRelease, where: str, *, check_expiry: bool = True) -> None:
    """Refuse an expired release (unless ``check_expiry`` is false: a repair restores the
    release that was live), any file its manifest does not name, and any text map whose
    sha256 or size differ from the manifest's."""
    manifest = release.manifest
    now = datetime.now(UTC)
    if check_expiry and manifest.expired(now):
        # This host's time too: a release the publisher stopped renewing and a node whose
        # clock runs ahead read alike otherwise.
        raise VerificationError(
            f"{where}/{MANIFEST}: expired at {manifest.expires} (this host's clock: "
            f"{now:%Y-%m-%dT%H:%M:%SZ}); not installing"
        )
    expected = manifest.files() | {MANIFEST, SIGNATURE}
    present = set(os.listdir(release.path))
    extra = sorted(present - expected)
    if extra:
        raise VerificationError(
            f"{where}: unexpected file(s) not named by the manifest: {', '.join(extra)}"
        )
    check_map_files(release, where)


def check_keeps_maps(
    manifest: Manifest, ch: AgentChannel, current: Manifest | None, where: str
) -> None:
    """Refuse a release that lacks a map this node must keep serving: one its config
    ``maps`` lists or, without that setting, one it serves now. A map dropped from the
    publisher's channel would otherwise vanish from every node while Postfix still reads it.
    The node's own config decides: once its ``maps`` no longer lists the map, the drop goes in.
    A release with no maps at all is never installed."""
    if not manifest.maps:
        raise VerificationError(
            f"{where}/{MANIFEST}: serial {manifest.serial} carries no maps; not installing, "
            "the old set keeps serving"
        )
    if ch.maps:
        required, why = set(ch.maps), f"[agent.channels.{ch.name}] maps lists"
    else:
        required = set(current.maps) if current is not None else set()
        why = "this node serves"
    missing = sorted(required - set(manifest.maps))
    if missing:
        raise VerificationError(
            f"{where}/{MANIFEST}: serial {manifest.serial} lacks map(s) {', '.join(missing)}, "
            f"which {why}; not installing, the old set keeps serving (if the channel dropped "
            f"them on purpose, set [agent.channels.{ch.name}] maps to the maps it still carries)"
        )

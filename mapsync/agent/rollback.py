"""``mapsync rollback`` on a node: reinstall a kept earlier release, re-verified, and pin it.

The kept copy (``STATE/<channel>/releases/<serial>/``) is trusted no more than a fetched
release: its signature is checked against ``trusted_keys``, every text file against the
manifest, and each cdb is built again and proved equal to the publisher's by sha256, by the
same code ``pull`` uses. Only then is it swapped in, in one rename. An expired release is
never installed, not even by a rollback: ``rollback --publisher`` re-publishes old content
with a fresh expiry instead.

After a rollback the channel is *pinned*: ``pull`` checks the source but installs nothing
newer until ``pull --unpin``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mapsync import log
from mapsync.agent.checks import check_keeps_maps, read_signed, trusted_keys, verify_files
from mapsync.agent.hooks import reload_failure
from mapsync.agent.install import install
from mapsync.agent.node import NodeChannel, held
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import InstallError, MapsyncError, VerificationError
from mapsync.release import MANIFEST, Manifest, iso, parse_manifest, same_maps, utcnow
from mapsync.release.verify import VerifiedRelease

if TYPE_CHECKING:  # cryptography only where a key is used (mapsync.signing)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

_log = log.get("agent")


@dataclass
class RollbackResult:
    """What ``rollback`` installed (and pinned) and what it replaced."""

    channel: str
    serial: int  # installed now, and pinned
    previous: int  # installed before


def choose(
    node: NodeChannel,
    current: Manifest,
    serial: int | None,
    keys: Mapping[str, Ed25519PublicKey],
) -> tuple[int, VerifiedRelease | None]:
    """The kept serial to install: ``serial``, or else the newest kept release older than the
    installed one whose maps differ from it (a renewal of the same maps would change nothing);
    with it the release verified on the way, if it was (None: verify it)."""
    ch, kept = node.ch, node.paths.kept
    serials = kept.serials()
    listed = ", ".join(map(str, serials)) or "none"
    if serial is not None:
        if serial == current.serial:
            raise MapsyncError(
                f"channel {ch.name}: serial {serial} is already installed; nothing changed"
            )
        if serial not in serials:
            raise MapsyncError(
                f"channel {ch.name}: release {serial} is not kept on this node (kept: {listed}); "
                "nothing changed"
            )
        return serial, None
    for candidate in reversed([s for s in serials if s < current.serial]):
        src = kept.path(candidate)
        try:
            release = read_signed(src, ch, keys, str(src), serial=candidate)
        except (OSError, VerificationError):
            # Chosen, so that the verification below says what is wrong with it, unless it
            # plainly is a renewal of the installed maps, which is skipped like a good one.
            try:
                unverified = parse_manifest((src / MANIFEST).read_bytes(), str(src / MANIFEST))
            except (OSError, VerificationError):
                return candidate, None
            if not same_maps(unverified.maps, current.maps):
                return candidate, None
            continue
        if not same_maps(release.manifest.maps, current.maps):
            return candidate, release
    raise MapsyncError(
        f"channel {ch.name}: no kept release older than the installed {current.serial} has "
        f"different maps (kept: {listed}); nothing changed"
    )


def rollback(cfg: AgentConfig, ch: AgentChannel, serial: int | None = None) -> RollbackResult:
    """Reinstall kept release ``serial`` (default: the previous one) of ``ch`` and pin it."""
    with held(cfg, ch) as node:
        state = node.state
        node.settle()
        current = node.current()
        if current is None:
            raise MapsyncError(f"channel {ch.name}: nothing is installed in {node.paths.target}")
        if current.channel != ch.name:
            # Its serials are not this channel's: "already installed", "older than" would
            # compare the two channels' numbers.
            raise MapsyncError(
                f"channel {ch.name}: the live set in {node.paths.target} is channel "
                f"{current.channel}'s (serial {current.serial}), not this channel's; "
                "`mapsync pull` installs this channel's release first; nothing changed"
            )
        keys = trusted_keys(cfg)
        chosen, release = choose(node, current, serial, keys)
        src = node.paths.kept.path(chosen)
        where = str(src)
        if release is None:
            try:
                release = read_signed(src, ch, keys, where, serial=chosen)
            except VerificationError as exc:
                raise VerificationError(f"{exc}; not installing") from None
        manifest = release.manifest
        # Same rule as a pull: a kept release lacking a map the node serves is not installed.
        check_keeps_maps(manifest, ch, current, where)
        verify_files(release, where)
        try:
            install(node, release, pin=manifest.serial)
        except MapsyncError:
            node.record()  # the pin, taken back if the swap did not happen
            raise
        state.last_install = iso(utcnow())
        _log.warning(
            "rolled back; pinned until `mapsync pull --unpin`",
            channel=ch.name,
            serial=manifest.serial,
            previous=current.serial,
        )
        failure = reload_failure(ch) if state.reload_pending else None
        state.reload_pending = failure is not None
        node.record()
        if failure is not None:
            raise InstallError(
                f"channel {ch.name}: rolled back to serial {manifest.serial}, but the reload hook "
                f"failed ({failure.splitlines()[0]}); it is retried on the next run"
            )
        return RollbackResult(ch.name, manifest.serial, current.serial)

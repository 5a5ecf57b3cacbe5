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

from dataclasses import dataclass

from mapsync import log
from mapsync.agent.hooks import reload_failure
from mapsync.agent.kept import KeptReleases
from mapsync.agent.pull import (
    ChannelPaths,
    check_keeps_maps,
    install,
    installed,
    read_signed,
    settled,
    trusted_keys,
    verify_files,
)
from mapsync.agent.state import ChannelState, channel_lock
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import InstallError, MapsyncError, VerificationError
from mapsync.release import MANIFEST, Manifest, iso, parse_manifest, utcnow

_log = log.get("agent")


@dataclass
class RollbackResult:
    channel: str
    serial: int  # installed now, and pinned
    previous: int  # installed before


def choose(ch: AgentChannel, kept: KeptReleases, current: Manifest, serial: int | None) -> int:
    """The kept serial to install: ``serial``, or else the newest kept release older than the
    installed one whose maps differ from it (a renewal of the same maps would change nothing)."""
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
        return serial
    for candidate in reversed([s for s in serials if s < current.serial]):
        path = kept.path(candidate) / MANIFEST
        try:
            m = parse_manifest(path.read_bytes(), str(path))
        except (OSError, VerificationError):
            return candidate  # unreadable: let the full verification below say what is wrong
        if set(m.maps) != set(current.maps) or any(
            not e.same_content(current.maps[n]) for n, e in m.maps.items()
        ):
            return candidate
    raise MapsyncError(
        f"channel {ch.name}: no kept release older than the installed {current.serial} has "
        f"different maps (kept: {listed}); nothing changed"
    )


def rollback(cfg: AgentConfig, ch: AgentChannel, serial: int | None = None) -> RollbackResult:
    """Reinstall kept release ``serial`` (default: the previous one) of ``ch`` and pin it."""
    paths = ChannelPaths(cfg, ch)
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with channel_lock(paths.lock):
        state = ChannelState.load(paths.state)
        live = settled(ch)
        current = installed(live, str(ch.target))
        if current is None:
            raise MapsyncError(f"channel {ch.name}: nothing is installed in {ch.target}")
        chosen = choose(ch, paths.kept, current, serial)
        src = paths.kept.path(chosen)
        where = str(src)
        try:
            release = read_signed(src, ch, trusted_keys(cfg), where, serial=chosen)
        except VerificationError as exc:
            raise VerificationError(f"{exc}; not installing") from None
        manifest = release.manifest
        # Same rule as a pull: a kept release lacking a map the node serves is not installed.
        check_keeps_maps(manifest, ch, current, where)
        verify_files(release, where)
        try:
            install(live, src, manifest, ch, paths, state, pin=manifest.serial)
        except MapsyncError:
            state.save(paths.state, paths.public)  # the pin, taken back if the swap did not happen
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
        state.save(paths.state, paths.public)
        if failure is not None:
            raise InstallError(
                f"channel {ch.name}: rolled back to serial {manifest.serial}, but the reload hook "
                f"failed ({failure.splitlines()[0]}); it is retried on the next run"
            )
        return RollbackResult(ch.name, manifest.serial, current.serial)

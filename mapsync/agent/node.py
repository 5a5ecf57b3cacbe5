"""One channel on this node, as every agent command sees it: :class:`NodeChannel`.

Its paths (:class:`ChannelPaths`, derived here and nowhere else), its state, its live set and
what is installed there. ``pull``, ``rollback`` and ``verify --repair`` take the channel
(:func:`taken`, :func:`held`: the lock, the state loaded) and pass the one object down;
``status``, ``verify``, ``history --agent`` and the watcher look at it without the lock
(:meth:`NodeChannel.look`). The installed manifest is read once per object
(:meth:`NodeChannel.installed`), through :func:`mapsync.agent.liveset.read_installed`.

Kept free of heavy imports (no cryptography): ``status`` runs through it every minute.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapsync import log
from mapsync.agent.kept import KEPT, KeptReleases
from mapsync.agent.liveset import Installed, LiveSet, NotOurs
from mapsync.agent.state import (
    ChannelState,
    StateDamaged,
    channel_lock,
    remove_stray_temp_files,
    secure_dir,
    secure_file,
)
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import InstallError, MapsyncError
from mapsync.release import MANIFEST, Manifest, iso, parse_manifest, utcnow

_log = log.get("agent")


class ChannelPaths:
    """Where channel ``ch`` lives on this node: its target, its state directory and what is
    in it (state file, lock, fetch area, rsync basis, kept releases), its public status copy."""

    def __init__(self, cfg: AgentConfig, ch: AgentChannel) -> None:
        self.target = ch.target  # the live set: TARGET/.mapsync and the links to it
        self.root = cfg.state / ch.name
        self.state = self.root / "state.json"
        self.public = cfg.public_status / f"{ch.name}.json"  # world-readable copy of it
        self.lock = self.root / "lock"
        self.incoming = self.root / "incoming"
        # Verified text of the installed release: rsync's delta basis.
        self.basis = self.root / "basis"
        self.kept = KeptReleases(self.root / KEPT)  # verified releases kept for rollback


@dataclass
class NodeChannel:
    """One channel on this node: config, paths, state, the live set and what is installed in
    it. Made by :func:`taken` or :func:`held` (lock held) or :meth:`look` (read only)."""

    cfg: AgentConfig
    ch: AgentChannel
    paths: ChannelPaths
    live: LiveSet
    state: ChannelState = field(default_factory=ChannelState)
    # The state as its file holds it, but for the times of the check (None: the file does not
    # hold this state: none yet, or rebuilt): what decides how :meth:`save_run` writes.
    stored: dict[str, Any] | None = field(default=None, repr=False)
    _installed: Installed | None = field(default=None, repr=False)
    _read: bool = field(default=False, repr=False)  # whether _installed was read or seen

    @classmethod
    def look(cls, cfg: AgentConfig, ch: AgentChannel) -> NodeChannel:
        """The channel as it is, without the lock and without changing anything (its state
        is not loaded: ``status`` reads it its own way)."""
        paths = ChannelPaths(cfg, ch)
        return cls(cfg, ch, paths, LiveSet(paths.target))

    @property
    def name(self) -> str:
        """The channel's name."""
        return self.ch.name

    def installed(self) -> Installed | None:
        """Manifest and signature of the installed set, read once (None: nothing installed).
        After :meth:`saw_installed`, what the check of the live set or an install found."""
        if not self._read:
            self._installed, self._read = self.live.installed(), True
        return self._installed

    def current(self) -> Manifest | None:
        """The installed manifest (VerificationError if it does not parse)."""
        found = self.installed()
        return found.manifest if found is not None else None

    def saw_installed(self, found: Installed | None) -> None:
        """Record what is installed now: the intact live set a check found (None when it is
        damaged beyond repair here), or the set an install just swapped in."""
        self._installed, self._read = found, True

    def installed_serial(self) -> int | None:
        """The installed serial of this channel; None if none, unreadable, or another
        channel's (the channel renamed, the node moved: its serials are not this one's)."""
        try:
            manifest = self.current()
        except (MapsyncError, OSError):
            return None
        return manifest.serial if manifest is not None and manifest.channel == self.name else None

    def settle(self) -> None:
        """Finish what a run killed right after its swap left in the target (under the lock)."""
        if not self.live.sets.is_dir():
            return
        try:
            self.live.settle()
        except NotOurs as exc:
            raise InstallError(
                f"channel {self.name}: {exc}; nothing changed, the installed set keeps serving"
            ) from None
        except OSError as exc:
            raise InstallError(
                f"channel {self.name}: finishing the last swap in {self.paths.target} failed: {exc}"
            ) from None

    def record(self) -> None:
        """Write the state atomically (and its public copy)."""
        self.state.save(self.paths.state, self.paths.public)

    def save(self) -> None:
        """Save the state, durably. On a full disk the atomic write (a new file) fails; the
        outcome is then written over the old file's own blocks, so ``status`` still learns what
        happened (a kill in that instant leaves a damaged file, which the next run rebuilds)."""
        try:
            self.record()
        except OSError as exc:
            first = exc
        else:
            self.stored = self.state.without_check_times()
            return
        try:
            self.state.save_in_place(self.paths.state)
            self.state.publish_copy(self.paths.public)
        except OSError as exc:
            raise InstallError(
                f"channel {self.name}: cannot record the outcome in {self.paths.state}: "
                f"{first.strerror} (in place: {exc.strerror})"
            ) from None
        self.stored = self.state.without_check_times()
        _log.warning(
            "state written in place: the atomic write failed",
            channel=self.name,
            path=str(self.paths.state),
            error=first.strerror,
        )

    def save_run(self) -> None:
        """Save the outcome of a run, once. When nothing but the times of the check moved
        since the state file was written (a nothing-changed poll), only those times are
        written, without fsync (:meth:`ChannelState.save_check_times`: a lost "checked at"
        costs nothing after a crash); anything else is saved durably (:meth:`save`)."""
        if self.stored is None or self.stored != self.state.without_check_times():
            self.save()
            return
        try:
            self.state.save_check_times(self.paths.state, self.paths.public)
        except OSError:
            self.save()  # a full disk: the durable save knows how to still record the run


@contextlib.contextmanager
def taken(cfg: AgentConfig, ch: AgentChannel) -> Iterator[NodeChannel]:
    """Channel ``ch`` taken for a change: its state directory secured, its lock held, what a
    killed run left (temp files in STATE and the kept copies) removed, and its state loaded
    (rebuilt when damaged). The lock is released when the block ends."""
    node = NodeChannel.look(cfg, ch)
    paths = node.paths
    _open_state_dir(cfg, paths)
    with channel_lock(paths.lock):
        remove_stray_temp_files(paths.root)
        remove_stray_temp_files(paths.kept.root)  # a killed copy for rollback
        node.state = _load_state(node)
        yield node


@contextlib.contextmanager
def held(cfg: AgentConfig, ch: AgentChannel) -> Iterator[NodeChannel]:
    """Channel ``ch`` with its lock held and its state loaded as it is (``rollback``: a damaged
    state file is an error, not rebuilt)."""
    node = NodeChannel.look(cfg, ch)
    node.paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with channel_lock(node.paths.lock):
        node.state = ChannelState.load(node.paths.state)
        yield node


def _open_state_dir(cfg: AgentConfig, paths: ChannelPaths) -> None:
    """Create STATE and STATE/<channel> 0700 (and bring older ones back to it), state.json 0600."""
    try:
        secure_dir(cfg.state)
        secure_dir(paths.root)
        secure_file(paths.state)
    except OSError as exc:
        raise InstallError(f"state directory {paths.root}: {exc}") from None


def _load_state(node: NodeChannel) -> ChannelState:
    """The channel's state; a damaged file is reported (naming it), moved aside and rebuilt
    from the live set and the kept releases, so one bad file never stops the agent."""
    try:
        state = ChannelState.load(node.paths.state)
    except StateDamaged as exc:
        state = rebuilt_state(node)
        aside = discard_state(node.paths.state)
        _log.error(
            "the state file is damaged; rebuilt from the live set and the kept releases",
            channel=node.name,
            error=str(exc),
            moved_to=str(aside),
            highest_serial=state.highest_serial,
            pinned=state.pinned,
        )
        state.last_damage = str(exc)
        state.last_repair = iso(utcnow())
        return state
    if node.paths.state.is_file():
        node.stored = state.without_check_times()
    return state


def rebuilt_state(node: NodeChannel) -> ChannelState:
    """A state for a channel whose ``state.json`` was damaged: the floor from the live set and
    the kept releases, the pin from the live serial if it is older than one kept (only a
    rollback installs an older release). The next check hashes every live file."""
    state = ChannelState()
    kept = node.paths.kept.serials()
    try:
        current = node.current()
    except MapsyncError:
        current = None
    if current is not None and current.channel != node.name:
        current = None  # another channel's set: its serial is no floor nor pin of this one
    serial = current.serial if current is not None else None
    candidates = [*kept, *([serial] if serial is not None else [])]
    state.highest_serial = max(candidates, default=None)
    state.live_serial = serial if serial is not None else (kept[-1] if kept else None)
    if serial is not None and kept and serial < kept[-1]:
        state.pinned = serial
    return state


def discard_state(path: Path) -> Path:
    """Move a damaged state file aside (kept for a post-mortem); return where it went."""
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    return aside


def basis_manifest(basis: Path) -> Manifest | None:
    """The manifest of the release whose text is the basis (None: none, or unreadable).
    Not verified again: it only says which patches could apply and which release may come
    next; every result is checked against the new release's signed manifest."""
    try:
        return parse_manifest((basis / MANIFEST).read_bytes(), str(basis / MANIFEST))
    except (OSError, MapsyncError):
        return None

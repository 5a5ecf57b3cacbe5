"""Find damage in a channel's live set and rebuild it from the verified text kept in STATE.

Used by every ``pull`` (before it asks the source anything) and by ``mapsync verify
--repair``. The copy a repair installs from — the kept release of the live serial, else the
rsync basis (the verified text of the installed release) — is trusted no more than a fetched
release: signature, channel, serial and every text hash are checked first, and each cdb is
built again and proved equal to the publisher's. A repair is a new swap (fresh inodes, fresh
mtimes, the ``check`` command and the reload hook), so every daemon notices.

Where nothing in STATE can rebuild the set, the damage is reported and the pull goes on to
the source: the release it installs (never below the serial floor) replaces the damaged set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mapsync import log
from mapsync.agent.damage import LiveCheck, check_live
from mapsync.agent.liveset import LiveSet
from mapsync.agent.pull import (
    ChannelPaths,
    install,
    read_signed,
    trusted_keys,
    verify_files,
)
from mapsync.agent.state import ChannelState
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import MapsyncError
from mapsync.release import MANIFEST, Manifest, iso, parse_iso, parse_manifest, utcnow
from mapsync.release.verify import VerifiedRelease, verify_manifest

_log = log.get("agent")


@dataclass
class LiveOutcome:
    """The live set after :func:`check_and_repair`."""

    manifest: Manifest | None  # what is live now (None: nothing, or damaged beyond repair here)
    problems: list[str]  # the damage found ([] if none)
    repaired: bool = False  # rebuilt from STATE by a new swap
    checked_fully: bool = False  # every sha256 was compared (and the signature verified)


def full_check_due(cfg: AgentConfig, state: ChannelState, now: datetime) -> bool:
    """Whether this run hashes every live file: every ``full_check``, and whenever the state
    holds no size/mtime record to check against (a new or a rebuilt state)."""
    if not state.live_files or state.last_full_check is None:
        return True
    last = parse_iso(state.last_full_check)
    return now - last >= timedelta(seconds=cfg.full_check) or last > now


def check_and_repair(
    cfg: AgentConfig,
    ch: AgentChannel,
    paths: ChannelPaths,
    state: ChannelState,
    live: LiveSet,
    *,
    full: bool = False,
) -> LiveOutcome:
    """Check the live set of ``ch`` (cheaply, or fully when ``full`` or when due) and rebuild
    it from STATE if damaged. Records what it found and did in ``state``. Run under the lock."""
    now = datetime.now(UTC)
    full = full or full_check_due(cfg, state, now)
    check = check_live(ch.target, state.recorded_live(), state.live_serial is not None, full=full)
    if check.manifest is not None and not check.record_used and not full:
        # No record of this very set (a run killed between its swap and saving the state):
        # size and mtime say nothing, the hashes do.
        full = True
        check = check_live(ch.target, (None, {}), True, full=True)
    if not check.damaged and check.manifest is not None and full:
        _verify_signature(cfg, check)
    if not check.damaged:
        if check.manifest is not None and check.directory is not None:
            if full or check.rerecord:
                # A re-record after hashing only the rewritten files is no full check.
                stamp = iso(utcnow()) if full else state.last_full_check or iso(utcnow())
                state.note_installed(
                    check.manifest.serial, check.directory.name, check.files, stamp
                )
            else:
                state.highest_serial = max(check.manifest.serial, state.highest_serial or 0)
        return LiveOutcome(check.manifest, [], checked_fully=full)
    _log.error(
        "the live set is damaged; rebuilding it from the verified copy kept in the state",
        channel=ch.name,
        target=str(ch.target),
        problems=check.problems,
    )
    state.last_damage = "; ".join(check.problems)
    serial = (
        check.manifest.serial
        if check.manifest is not None
        else state.live_serial or state.pinned or max(paths.kept.serials(), default=None)
    )
    found = _verified_copy(cfg, ch, paths, serial) if serial is not None else None
    if found is None:
        _log.error(
            "no verified copy of the live release is kept here; the source's release replaces it",
            channel=ch.name,
            serial=serial,
        )
        return LiveOutcome(None, check.problems)
    src, manifest = found.path, found.manifest
    install(live, src, manifest, ch, paths, state)
    state.last_repair = iso(utcnow())
    _log.warning(
        "repaired the live set: a new swap from the verified copy",
        channel=ch.name,
        serial=manifest.serial,
        copy=str(src),
        problems=check.problems,
    )
    return LiveOutcome(manifest, check.problems, repaired=True, checked_fully=True)


def _verify_signature(cfg: AgentConfig, check: LiveCheck) -> None:
    """A full check also proves the live manifest is still the one a trusted key signed."""
    assert check.manifest_bytes is not None and check.signature is not None
    assert check.directory is not None
    try:
        verify_manifest(
            check.directory,
            check.manifest_bytes,
            check.signature,
            trusted_keys(cfg),
            str(check.directory),
        )
    except MapsyncError as exc:
        check.problems.append(f"live manifest: {exc}")


def _verified_copy(
    cfg: AgentConfig, ch: AgentChannel, paths: ChannelPaths, serial: int
) -> VerifiedRelease | None:
    """The kept release ``serial`` or the rsync basis, whichever verifies (signature, channel,
    serial, every text hash); None if neither does."""
    keys = trusted_keys(cfg)
    for src in (paths.kept.path(serial), paths.basis):
        if not (src / MANIFEST).is_file():
            continue
        where = str(src)
        try:
            release = read_signed(src, ch, keys, where)
            if release.manifest.serial != serial:
                continue  # the basis of another serial: not this set's copy
            # An expired release is still the one the daemons were reading: restoring it
            # loses nothing (status says it expired; a pull installs a renewal).
            verify_files(release, where, check_expiry=False)
        except (MapsyncError, OSError) as exc:
            _log.warning(
                "a kept copy failed verification; not used for the repair",
                channel=ch.name,
                copy=where,
                error=str(exc),
            )
            continue
        return release
    return None


def rebuilt_state(paths: ChannelPaths, live: LiveSet) -> ChannelState:
    """A state for a channel whose ``state.json`` was damaged: the floor from the live set and
    the kept releases, the pin from the live serial if it is older than one kept (only a
    rollback installs an older release). The next check hashes every live file."""
    state = ChannelState()
    kept = paths.kept.serials()
    serial: int | None = None
    pair = live.installed_manifest()
    if pair is not None:
        try:
            serial = parse_manifest(pair[0], str(live.sets)).serial
        except MapsyncError:
            serial = None
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

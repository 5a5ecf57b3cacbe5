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

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from mapsync import log
from mapsync.agent.damage import LiveCheck, check_live, untrusted_signer
from mapsync.agent.liveset import SETS
from mapsync.agent.node import NodeChannel
from mapsync.agent.owners import drifted, unmet_key
from mapsync.agent.state import ChannelState
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import InstallError, MapsyncError
from mapsync.release import MANIFEST, Manifest, iso, parse_iso, utcnow

if TYPE_CHECKING:
    from mapsync.release.verify import VerifiedRelease

# Verifying signatures and copies, and installing (mapsync.agent.checks, mapsync.agent.install)
# are imported only by a full check or a repair: the cheap check of every pull does without.

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


def check_and_repair(node: NodeChannel, *, full: bool = False) -> LiveOutcome:
    """Check the live set of ``node`` (cheaply, or fully when ``full`` or when due) and rebuild
    it from STATE if damaged. Records what it found and did in its state, and what is
    installed now in the node (nothing, when the set is damaged beyond repair here). Run
    under the lock."""
    cfg, ch, paths, state = node.cfg, node.ch, node.paths, node.state
    now = datetime.now(UTC)
    full = full or full_check_due(cfg, state, now)
    target = paths.target
    check = check_live(target, state.recorded_live(), state.live_serial is not None, full=full)
    if check.manifest is not None and check.manifest.channel != ch.name:
        # The target's live set is another channel's (this node's channel renamed, or the
        # node moved to another role): its serials say nothing of this channel's, and its maps
        # (another mailstore's logins) must not keep serving. Installed over, as on a new node.
        _log.warning(
            "the live set is another channel's; this channel's release replaces it",
            channel=ch.name,
            live_channel=check.manifest.channel,
            live_serial=check.manifest.serial,
            target=str(target),
        )
        node.saw_installed(None)
        if state.pinned is not None:
            # A rollback pinned this channel: its pinned release replaces the set, not LATEST.
            return _restore(
                node, state.pinned, [f"the live set was channel {check.manifest.channel}'s"]
            )
        return LiveOutcome(None, [])
    if (
        check.manifest is not None
        and not full
        and (
            check.recheck
            or not check.record_used
            or untrusted_signer(check.manifest, cfg.trusted_keys) is not None
        )
    ):
        # No record of this very set (a run killed between its swap and saving the state), or
        # its manifest or signature touched: size and mtime say nothing, the hashes do. Or
        # signed by a key trusted_keys no longer lists (rotated out, revoked): the signature
        # is checked now, not at the next full check, and the set replaced or the run failed.
        full = True
        check = check_live(target, (None, {}), True, full=True)
    if not check.damaged and check.manifest is not None and full:
        _verify_signature(cfg, check)
    if not check.damaged:
        node.saw_installed(check.installed if check.manifest is not None else None)
        if check.manifest is not None and check.directory is not None:
            if full or check.rerecord:
                # A re-record after hashing only the rewritten files is no full check.
                stamp = iso(utcnow()) if full else state.last_full_check or iso(utcnow())
                state.note_installed(
                    check.manifest.serial, check.directory.name, check.files, stamp
                )
            else:
                state.highest_serial = max(check.manifest.serial, state.highest_serial or 0)
            drifted, key = _drifted(ch, check.manifest, check.directory)
            # Not again for a set whose rebuilt files could not keep these settings, unless
            # asked (verify --repair: a full check).
            if drifted and (full or key != state.ownership_unmet):
                return _give_ownership(node, check.manifest, drifted, full)
        return LiveOutcome(check.manifest, [], checked_fully=full)

    if (
        check.only_strays
        and check.directory is not None
        and _remove_strays(check.directory, check.strays)
    ):
        # Only files no map is made of (dropped there by hand, an editor's swap file): gone
        # from the set's directory, no map changed, no swap and no reload owed.
        state.last_repair, state.last_damage = iso(utcnow()), "; ".join(check.problems)
        _log.warning("stray files removed from the live set", channel=ch.name, files=check.problems)
        node.saw_installed(check.installed)
        return LiveOutcome(check.manifest, check.problems, repaired=True, checked_fully=full)
    _log.error(
        "the live set is damaged; rebuilding it from the verified copy kept in the state",
        channel=ch.name,
        target=str(target),
        problems=check.problems,
    )
    node.saw_installed(None)  # nothing intact is live
    state.last_damage = "; ".join(check.problems)
    serial = (
        check.manifest.serial
        if check.manifest is not None
        else state.live_serial or state.pinned or max(paths.kept.serials(), default=None)
    )
    return _restore(node, serial, check.problems)


def _remove_strays(directory: Path, names: list[str]) -> bool:
    """Remove the stray entries ``names`` of the live set's ``directory``; whether every one
    went. Only in a set directory mapsync made (a real directory in TARGET/.mapsync, not one
    that ``current`` reaches through a link): else nothing, and the set is rebuilt instead."""
    from mapsync.atomic import remove_tree

    if directory.is_symlink() or directory.parent.name != SETS or not directory.is_dir():
        return False
    for name in names:
        path = directory / name
        try:
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            else:
                path.unlink()
        except OSError as exc:
            _log.warning("a stray file could not be removed", path=str(path), error=str(exc))
            return False
    return True


def _restore(node: NodeChannel, serial: int | None, problems: list[str]) -> LiveOutcome:
    """Install the verified copy of ``serial`` kept in STATE in a new swap; with none, nothing
    is live and the source's release replaces the set."""
    found = _verified_copy(node, serial) if serial is not None else None
    if found is None:
        _log.error(
            "no verified copy of the live release is kept here; the source's release replaces it",
            channel=node.ch.name,
            serial=serial,
        )
        return LiveOutcome(None, problems)
    from mapsync.agent.install import install

    install(node, found)
    node.state.last_repair = iso(utcnow())
    _log.warning(
        "repaired the live set: a new swap from the verified copy",
        channel=node.ch.name,
        serial=found.manifest.serial,
        copy=str(found.path),
        problems=problems,
    )
    return LiveOutcome(found.manifest, problems, repaired=True, checked_fully=True)


def _drifted(ch: AgentChannel, manifest: Manifest, directory: Path) -> tuple[list[str], str]:
    """The live files whose owner, group or mode are not what the channel's ``files``
    settings (or mapsync's defaults) give now: changed by hand, or a setting that changed or
    could not be met when the set was built (the ``dovecot`` group made after it). And a key
    naming this set directory (its name and inode: a name comes back) and these settings,
    for ``ownership_unmet``."""
    try:
        found = drifted(ch, manifest, directory)
    except InstallError as exc:  # a user or group this node does not have
        _log.warning("the files settings cannot be given to the live set", error=str(exc))
        return [], ""
    if not found:
        return [], ""  # every pull: nothing more to work out
    return found, unmet_key(ch, manifest, directory)


def _give_ownership(
    node: NodeChannel, manifest: Manifest, drifted: list[str], full: bool
) -> LiveOutcome:
    """Build the live release again from its verified copy, as a renewal: the maps of
    ``drifted`` as new files, with the owner, group and mode they should have (never a live
    inode changed in place), the rest linked; then the swap (no reload hook: the maps' content
    is the same, and the daemons notice the new files). Files the new set could not be given
    their settings either (a filesystem forcing them) are not tried again until the next
    release (``ownership_unmet``)."""
    from mapsync.agent.install import install

    ch = node.ch
    problems = [f"{file}: owner, group or mode not as configured" for file in drifted]
    found = _verified_copy(node, manifest.serial)
    if found is None:
        _log.warning(
            "live files' owner, group or mode differ from the files settings; no verified copy "
            "is kept to build them again from (the next release gives them)",
            channel=ch.name,
            files=drifted,
        )
        return LiveOutcome(manifest, [], checked_fully=full)
    try:
        install(node, found, renewal=True)
    except InstallError as exc:
        _log.warning(
            "live files' owner, group or mode differ from the files settings; not rebuilt",
            channel=ch.name,
            files=drifted,
            error=str(exc),
        )
        return LiveOutcome(manifest, [], checked_fully=full)
    state = node.state
    state.last_repair, state.last_damage = iso(utcnow()), "; ".join(problems)
    _log.warning(
        "live files' owner, group or mode differed from the files settings: built again "
        "from the verified copy and swapped in",
        channel=ch.name,
        serial=manifest.serial,
        files=drifted,
    )
    now = node.live.current()
    unmet, key = _drifted(ch, manifest, now) if now is not None else ([], "")
    state.ownership_unmet = key if unmet else None
    if unmet:
        _log.warning(
            "the new files could not be given their owner, group or mode either (a filesystem "
            "that forces them?); not tried again before the next release",
            channel=ch.name,
            files=unmet,
        )
    return LiveOutcome(manifest, problems, repaired=True, checked_fully=full)


def _verify_signature(cfg: AgentConfig, check: LiveCheck) -> None:
    """A full check also proves the live manifest is still the one a trusted key signed."""
    from mapsync.agent.checks import trusted_keys
    from mapsync.release.verify import verify_manifest

    found = check.installed
    assert found is not None
    # A trusted_keys file that holds no key is this node's config, not damage of the live set:
    # the run fails naming the file, rather than "rebuilding" a set nothing is wrong with.
    keys = trusted_keys(cfg)
    try:
        verify_manifest(found.directory, found.data, found.signature, keys, str(found.directory))
    except MapsyncError as exc:
        check.problems.append(f"live manifest: {exc}")


def _verified_copy(node: NodeChannel, serial: int) -> VerifiedRelease | None:
    """The kept release ``serial`` or the rsync basis, whichever verifies (signature, channel,
    serial, every text hash); None if neither does."""
    from mapsync.agent.checks import read_signed, trusted_keys, verify_files

    ch, paths = node.ch, node.paths
    keys = trusted_keys(node.cfg)
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

"""Installing a verified release on a node: build the set, prove it, swap it in, keep it.

Each text map is copied (a new inode, a fresh mtime) into a private directory beside the
live set, each cdb built locally and proved equal to the publisher's by sha256, every file
given the owner, group and mode the channel's ``files`` settings (or mapsync's defaults for
maps with password hashes) say before a byte is written. The ``check`` command runs against
the built set, which is verified again afterwards; then one rename swaps it in
(:meth:`mapsync.agent.liveset.LiveSet.swap`). A renewal (same maps) hard-links the live
inodes instead, so no daemon reloads. The installed release is kept for ``rollback`` and,
after a pull, its text becomes the next fetch's rsync basis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mapsync import log, signals
from mapsync.agent import inbox
from mapsync.agent.damage import stat_files
from mapsync.agent.hooks import run_check
from mapsync.agent.liveset import SwapUnfinished, live_names, read_installed
from mapsync.agent.node import NodeChannel
from mapsync.agent.owners import KEEP, Ownership, has_ownership, ownership
from mapsync.atomic import copy_into, remove_tree
from mapsync.config import AgentChannel
from mapsync.errors import InstallError, VerificationError
from mapsync.formats import cdb, text
from mapsync.release import (
    MANIFEST,
    SIGNATURE,
    CdbInfo,
    Manifest,
    MapEntry,
    iso,
    separator,
    utcnow,
)
from mapsync.release.verify import VerifiedRelease

if TYPE_CHECKING:
    from mapsync.formats.cdbpatch import Edit

_log = log.get("agent")


def install(
    node: NodeChannel,
    release: VerifiedRelease,
    *,
    renewal: bool = False,
    pin: int | None = None,
    reuse: bool = False,
) -> bool:
    """Build the set of ``release`` from its verified text and swap it in as ``node``'s live
    set (which the node then reports as installed).

    ``renewal`` (same maps as the live set): hard links keep the live inodes, so no daemon
    reloads; returns whether it stayed a renewal. A map whose live files no longer have the
    owner, group or mode the ``files`` settings give is built again from ``src`` instead, as
    a new file: a hard link *is* the live inode, and changing it would change the live map
    before the swap (and for good, if the swap then failed). ``pin`` records a rollback's pin
    in the state before the swap, so a run killed after the swap cannot forget it. ``reuse``
    (a new release): a map it did not change keeps its live inodes, as in a renewal, where
    they are intact (:func:`build_set`).
    """
    ch, live, state = node.ch, node.live, node.state
    src, manifest = release.path, release.manifest
    same = renewal
    was_pinned = state.pinned
    owners = ownership(ch, manifest)  # an unknown user or group stops here, before anything
    theirs = live.foreign(live_names(manifest))
    if theirs:
        raise InstallError(
            f"channel {ch.name}: {', '.join(map(str, theirs))}: not a link mapsync made (the "
            f"operator's own file?); mapsync never replaces it. Move it away or give the channel "
            f"a target of its own; serial {manifest.serial} not installed, the old set keeps serving"
        )
    built = live.new_set_dir(manifest.serial)
    try:
        if same:
            cur = live.current()
            assert cur is not None
            # A renewal: identical maps. Hard links keep the live inodes, so no daemon reloads.
            try:
                now = time.time()
                for name, m in sorted(manifest.maps.items()):
                    files = [m.file] + ([m.cdb.file] if m.cdb else [])
                    intact = _intact(cur, m)
                    if not intact:
                        # Never carry a damaged inode forward: this map is built anew, and
                        # the install is a real swap (reload) so every daemon notices.
                        _log.warning(
                            "a live file differs from its manifest; rebuilt, not reused",
                            channel=ch.name,
                            map=name,
                            serial=manifest.serial,
                        )
                        same = False
                    if intact and all(has_ownership(cur / f, owners[name], built) for f in files):
                        for f in files:
                            os.link(cur / f, built / f)
                    else:
                        # New files settings (or the live file's owner changed its mode): a
                        # new inode from the verified text, never the live file or its copy.
                        build_map(src, name, m, built, cur, owners[name], ch, now)
            except FileNotFoundError:  # the live set lost a file: rebuild it from the text
                remove_tree(built)
                built = live.new_set_dir(manifest.serial)
                build_set(release, built, cur, owners, ch)
                same = False
        else:
            # Never with a check command: it is handed the built set and may write to it, and
            # a linked file is the live inode.
            build_set(release, built, live.current(), owners, ch, reuse=reuse and not ch.check)
        for f in (MANIFEST, SIGNATURE):
            shutil.copyfile(src / f, built / f)
            os.chmod(built / f, 0o644)
        # Built in a directory only the agent may enter; opened to readers (and to a check
        # running as another user) once every file has its final mode.
        os.chmod(built, 0o755)
        if not same:
            # The maps exactly as they will go live; a renewal's are the live ones already.
            before = os.lstat(built)
            run_check(ch, built, manifest.serial)
            if ch.check:
                # A check runs with the agent's rights: what it changed must not go live.
                verify_built(built, before, src, manifest, owners, ch)
        if (ch.reload and not same) or pin is not None:
            # The hook (and the pin) are owed from the swap on: a run killed before it ran
            # must not lose them.
            state.reload_pending = state.reload_pending or bool(ch.reload and not same)
            state.pinned = pin if pin is not None else state.pinned
            node.record()
        try:
            live.swap(built, manifest.serial)
        finally:
            _note_live(node, manifest)
    except SwapUnfinished as exc:
        raise InstallError(
            f"channel {ch.name}: serial {manifest.serial} is live, but finishing the swap failed: "
            f"{exc}; the next run finishes it"
        ) from None
    except OSError as exc:
        remove_tree(built, ignore_errors=True)
        state.pinned = was_pinned
        raise InstallError(
            f"channel {ch.name}: installing serial {manifest.serial} failed: {exc}"
            + ("" if getattr(exc, "filename", None) else f" (in {live.sets})")
            + "; the old set keeps serving"
        ) from None
    except BaseException:
        remove_tree(built, ignore_errors=True)
        state.pinned = was_pinned
        raise
    return same


def _note_live(node: NodeChannel, manifest: Manifest) -> None:
    """Record the size and mtime of the set just swapped in (if it is live): what the cheap
    check of every later run compares against. Its files were all verified moments ago."""
    cur = node.live.current()
    serial = str(manifest.serial)
    if cur is None or not (cur.name == serial or cur.name.startswith(serial + ".")):
        return  # the swap did not happen
    try:
        node.saw_installed(read_installed(cur))
    except OSError:
        node.saw_installed(None)
    try:
        files = stat_files(cur, manifest)
    except OSError:
        return  # the next run finds no record for this serial and hashes every file
    node.state.note_installed(manifest.serial, cur.name, files, iso(utcnow()))


def _intact(live: Path, m: MapEntry) -> bool:
    """Whether map ``m``'s live files still have the manifest's sha256 and size: checked
    before a renewal reuses their inodes. A missing file raises FileNotFoundError."""
    checks = m.installed_files()
    return all(text.sha256_file(live / f) == (want, size) for f, want, size in checks)


def keep(node: NodeChannel, src: Path, manifest: Manifest) -> None:
    """Keep a verified release for rollback. It is installed already: failing to keep a copy
    (a full disk) is logged, never turned into a failed install."""
    ch = node.ch
    try:
        dropped = node.paths.kept.keep(src, manifest, ch.keep, manifest.serial)
    except OSError as exc:
        _log.warning(
            "could not keep a copy for rollback",
            channel=ch.name,
            serial=manifest.serial,
            error=str(exc),
        )
        return
    if dropped:
        _log.debug("dropped kept releases", channel=ch.name, serials=dropped)


def _protect(path: Path, name: str, own: Ownership, ch: AgentChannel) -> None:
    """Give ``path`` (map ``name``, or its cdb), a new file not yet live, its owner, group and
    mode — before the swap makes it visible, so no reader ever sees it more open than
    configured. Never called on a live inode."""
    try:
        if own.uid != KEEP or own.gid != KEEP:
            os.chown(path, own.uid, own.gid)
        os.chmod(path, own.mode)
    except PermissionError as exc:
        raise InstallError(
            f"channel {ch.name}: map {name}: cannot give {path.name} owner/group/mode "
            f"{own.uid}:{own.gid} {own.mode:04o} ({exc.strerror}; the agent runs as uid "
            f"{os.geteuid()}); the old set keeps serving"
        ) from None


def build_set(
    release: VerifiedRelease,
    built: Path,
    previous: Path | None,
    owners: dict[str, Ownership],
    ch: AgentChannel,
    *,
    reuse: bool = False,
) -> None:
    """Copy the verified text of ``release`` into ``built`` and build each cdb; prove cdb
    hashes equal. A map's cdb gets the same owner, group and mode as its text. ``reuse``: a
    map whose files in ``previous`` (the live set) are already the manifest's, by size and
    sha256, with the owner, group and mode a built one gets, is linked from there instead:
    nothing to build, and no daemon sees a new file for it."""
    now = time.time()
    installed = _installed_maps(previous) if reuse and previous is not None else None
    for name, m in sorted(release.manifest.maps.items()):
        if (
            reuse
            and previous is not None
            # A map the live manifest gives other files or hashes changed: not hashed to see.
            and (installed is None or _files(installed.get(name)) == _files(m))
            and _link_unchanged(previous, m, owners[name], built)
        ):
            continue
        edits = release.cdb_edits.get(name)
        build_map(release.path, name, m, built, previous, owners[name], ch, now, edits)


def _installed_maps(live: Path) -> dict[str, MapEntry] | None:
    """The maps of the live set's manifest (None if it cannot be read)."""
    try:
        return read_installed(live).manifest.maps
    except (OSError, VerificationError):
        return None


def _files(m: MapEntry | None) -> list[tuple[str, str, int]] | None:
    return m.installed_files() if m is not None else None


def _link_unchanged(live: Path, m: MapEntry, own: Ownership, built: Path) -> bool:
    """Hard-link map ``m``'s files from ``live`` into ``built`` if they are the manifest's
    (sizes first: a changed map is seldom hashed) and have ownership ``own``; whether it did."""
    installed = m.installed_files()
    files = [file for file, _, _ in installed]
    try:
        if any((live / f).stat().st_size != size for f, _, size in installed):
            return False
        if not _intact(live, m) or not all(has_ownership(live / f, own, built) for f in files):
            return False
        for f in files:
            os.link(live / f, built / f)
    except OSError:  # a file gone, or no link to be made (EMLINK): built instead
        for f in files:
            (built / f).unlink(missing_ok=True)
        return False
    return True


def build_map(
    staging: Path,
    name: str,
    m: MapEntry,
    built: Path,
    previous: Path | None,
    own: Ownership,
    ch: AgentChannel,
    now: float,
    edits: Sequence[Edit] | None = None,
) -> None:
    """Map ``name`` of :func:`build_set`: its text copied from ``staging`` into ``built``,
    its cdb made and proved equal to the publisher's, both given ``own`` and an mtime later
    than the files they replace in ``previous``. With ``edits`` (the pairs its patch changed)
    the cdb is the live one in ``previous`` changed in place (formats.cdbpatch) where that
    gives the publisher's bytes, else built whole from the text."""
    dst = built / m.file
    _create(dst, name, own, ch)
    # A new inode; fresh mtime, never the publisher's.
    with open(dst, "r+b") as out:
        copy_into(staging / m.file, out.fileno())
    files = [dst]
    if m.cdb is not None:
        cdb_path = built / m.cdb.file
        _create(cdb_path, name, own, ch)  # written in place: this inode, mode kept
        made = None
        if edits is not None and previous is not None:
            made = _patched_cdb(previous / m.cdb.file, edits, cdb_path, name, m.cdb, ch)
        if made is None:
            sep = separator(name, m).encode()
            made = cdb.build_text(cdb_path, dst, sep, f"build {m.cdb.file}")
        digest, size = made
        if digest != m.cdb.sha256 or size != m.cdb.size:
            raise VerificationError(
                f"map {name}: the cdb built here (sha256 {digest[:16]}…, {size} bytes) differs from "
                f"the publisher's ({m.cdb.sha256[:16]}…, {m.cdb.size} bytes); not installing"
            )
        files.append(cdb_path)
    for f in files:
        _fresh_mtime(f, previous / f.name if previous else None, now)


def _patched_cdb(
    old: Path, edits: Sequence[Edit], new: Path, name: str, want: CdbInfo, ch: AgentChannel
) -> tuple[str, int] | None:
    """The live cdb ``old`` changed by ``edits`` into ``new``: its sha256 and size if they are
    the manifest's (``want``), else None (``new`` is then built whole: cdbx truncates it)."""
    from mapsync.formats.cdbpatch import NotPatchable, patch_cdb_file

    try:
        made = patch_cdb_file(old, edits, new)
    except (NotPatchable, OSError) as exc:
        reason = str(exc)
    else:
        if made == (want.sha256, want.size):
            _log.debug(
                "cdb changed in place", channel=ch.name, map=name, file=want.file, pairs=len(edits)
            )
            return made
        reason = f"gives sha256 {made[0][:16]}…, not the manifest's {want.sha256[:16]}…"
    _log.info(
        "the live cdb could not be changed in place; building it whole",
        channel=ch.name,
        map=name,
        file=want.file,
        reason=reason,
    )
    return None


def _create(path: Path, name: str, own: Ownership, ch: AgentChannel) -> None:
    """Create ``path`` empty, owner-only, then give it its final owner, group and mode —
    before a byte is written, so a map with password hashes is never readable by anyone it
    is not meant for, not even for an instant (a reader's open handle would outlive a chmod)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    _protect(path, name, own, ch)


def verify_built(
    built: Path,
    before: os.stat_result,
    src: Path,
    manifest: Manifest,
    owners: dict[str, Ownership],
    ch: AgentChannel,
) -> None:
    """Check the built set once more after the ``check`` command, before the swap: the same
    directory (``before``: its lstat then) with the same owner and mode, exactly the
    manifest's files, each a regular file with its owner, group and mode, and the sha256 and
    size of the text and of the cdb the manifest names; manifest and signature as verified.
    Raise VerificationError naming the first path that differs."""
    where = (
        f"channel {ch.name}: the check command changed the built set of serial {manifest.serial}"
    )
    tail = "; not installed, the old set keeps serving"
    try:
        now = os.lstat(built)
    except FileNotFoundError:
        raise VerificationError(f"{where}: {built} removed{tail}") from None
    same = (now.st_dev, now.st_ino, now.st_mode, now.st_uid, now.st_gid)
    if same != (before.st_dev, before.st_ino, before.st_mode, before.st_uid, before.st_gid):
        raise VerificationError(f"{where}: {built} replaced or its owner or mode changed{tail}")
    expected = live_names(manifest) | {MANIFEST, SIGNATURE}
    present = set(os.listdir(built))
    if present != expected:
        changed = sorted(present ^ expected)
        raise VerificationError(
            f"{where}: {', '.join(str(built / f) for f in changed)} added or removed{tail}"
        )
    for f in (MANIFEST, SIGNATURE):
        if (built / f).is_symlink() or (built / f).read_bytes() != (src / f).read_bytes():
            raise VerificationError(f"{where}: {built / f} altered{tail}")
    for name, m in sorted(manifest.maps.items()):
        checks = m.installed_files()
        for file, want, want_size in checks:
            path = built / file
            if not stat.S_ISREG(path.lstat().st_mode):
                raise VerificationError(f"{where}: {path} is no longer a regular file{tail}")
            if not has_ownership(path, owners[name], built):
                raise VerificationError(
                    f"{where}: {path} has another owner or mode (map {name}){tail}"
                )
            digest, size = text.sha256_file(path)
            if digest != want or size != want_size:
                raise VerificationError(
                    f"{where}: {path} (map {name}) has sha256 {digest[:16]}… size {size}, the "
                    f"manifest {want[:16]}… size {want_size}{tail}"
                )


def _fresh_mtime(path: Path, old: Path | None, now: float) -> None:
    """Give ``path`` an mtime later than the file it replaces, in whole seconds.

    Dovecot re-reads a passwd-file only when mtime (seconds) or size changes; two installs in
    the same second with equal sizes would otherwise go unnoticed.
    """
    stamp = int(now)
    if old is not None:
        with contextlib.suppress(FileNotFoundError):
            stamp = max(stamp, int(old.stat().st_mtime) + 1)
    os.utime(path, (stamp, stamp))


def promote_basis(node: NodeChannel, staging: Path, manifest: Manifest) -> None:
    """Make the verified text in ``staging`` (release ``manifest``, just installed) the next
    fetch's rsync basis; with an inbox, complete that release there and tell the push which
    serial the basis is (:mod:`mapsync.agent.inbox`)."""
    basis = node.paths.basis
    old_basis = node.paths.root / "basis.old"
    remove_tree(old_basis, ignore_errors=True)
    inbox.note_basis(node.ch, None)  # between the two renames it is neither serial
    with signals.held():  # never neither: a run ended between them would fetch all again
        if basis.exists():
            os.rename(basis, old_basis)
        os.rename(staging, basis)
    remove_tree(old_basis, ignore_errors=True)
    inbox.complete_release(node.ch, manifest, basis)
    inbox.note_basis(node.ch, manifest.serial)

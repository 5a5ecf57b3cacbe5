"""Fetching a release's text maps as patches against this node's rsync basis (the verified
text of the release it installed last), docs/release-format.md "Patches".

:func:`fetch_patched` is one of the two ways :func:`mapsync.agent.fetch.fetch_release` gets
the text: when the basis is the serial a map's patch is ``from``, only the patch crosses the
wire; the map is rebuilt from the basis and must have the signed manifest's sha256 and size.
A map the release did not change is taken from the basis as it is (a hard link). Whatever
the patches cannot give is left for rsync; a missing, altered or malformed patch, or a result
that does not match, undoes the lot and rsync fetches the text as without patches.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mapsync import log
from mapsync.agent.node import basis_manifest
from mapsync.atomic import remove_tree
from mapsync.errors import TransferStopped, TransportError, VerificationError
from mapsync.formats import text
from mapsync.formats.cdbpatch import Edit, NotPatchable, edits_from_changes
from mapsync.release import Manifest, patch_dir, separator
from mapsync.release.patch import Change, apply_patch
from mapsync.transport import Remote
from mapsync.transport.rsync import not_at_source

_log = log.get("agent")

# Changed lines up to which a map's cdb is changed in place from the live one
# (formats.cdbpatch): beyond, each edit's lookup and the relaid tables cost more than a
# build (measured: docs/benchmarks.md, 2026-12-01 "the agent's cdb").
MAX_CDB_EDITS = 2000


class PatchMissing(VerificationError):
    """The source does not have a patch the manifest names (a mirror or push inbox that
    carries none: no warning, rsync fetches the text)."""


@dataclass
class Patched:
    """What :func:`fetch_patched` put into staging (``files``), and the bytes it moved."""

    files: set[str] = field(default_factory=set)
    moved: int = 0
    patched: list[str] = field(default_factory=list)  # maps rebuilt from a patch
    edits: dict[str, list[Edit]] = field(default_factory=dict)  # their cdbs' changed pairs


def fetch_patched(
    remote: Remote,
    manifest: Manifest,
    basis: Path,
    staging: Path,
    area: Path,
    channel: str,
    ahead: Path | None = None,
) -> Patched:
    """Put into ``staging`` every text map of ``manifest`` that the basis gives: unchanged
    ones linked, changed ones patched (their patches fetched into ``area``, or taken from
    ``ahead`` where they came with LATEST). On any failure of a patch, nothing: the
    caller's rsync fetches every map."""
    base = basis_manifest(basis)
    if base is None:
        return Patched()
    unchanged, patches = [], []
    for name, m in sorted(manifest.maps.items()):
        old = base.maps.get(name)
        if old is None or old.file != m.file or not (basis / m.file).is_file():
            continue
        if (old.sha256, old.size) == (m.sha256, m.size):
            unchanged.append(m.file)
        elif name in manifest.patches and manifest.patches[name].base == base.serial:
            patches.append(name)
    if not patches:
        # Nothing to patch: rsync's quick check gives the unchanged maps as cheaply.
        return Patched()
    done = Patched()
    where = f"{remote.source}/{patch_dir(manifest.serial)}"
    try:
        _patch(remote, manifest, basis, staging, area, patches, where, done, ahead)
    except (VerificationError, TransportError) as exc:
        for f in done.files:
            (staging / f).unlink(missing_ok=True)
        remove_tree(area, ignore_errors=True)
        if isinstance(exc, TransferStopped):
            raise  # this agent ended the rsync: no reason to fetch the text instead
        say = _log.info if isinstance(exc, PatchMissing) else _log.warning
        say(
            "patches not used; fetching the text with rsync",
            channel=channel,
            serial=manifest.serial,
            basis=base.serial,
            reason=str(exc),
        )
        return Patched(moved=done.moved)
    for f in unchanged:
        _link(basis / f, staging / f)
        done.files.add(f)
    remove_tree(area, ignore_errors=True)
    _log.debug(
        "text rebuilt from patches",
        channel=channel,
        serial=manifest.serial,
        basis=base.serial,
        maps=",".join(done.patched),
        bytes=done.moved,
    )
    return done


def _patch(
    remote: Remote,
    manifest: Manifest,
    basis: Path,
    staging: Path,
    area: Path,
    names: list[str],
    where: str,
    done: Patched,
    ahead: Path | None,
) -> None:
    """Fetch the patches of maps ``names`` into ``area`` (those not in ``ahead``), check them
    against the manifest and apply each to its basis text into ``staging``;
    VerificationError at the first problem."""
    remove_tree(area, ignore_errors=True)
    area.mkdir(mode=0o700)
    infos = {name: manifest.patches[name] for name in names}
    files = []
    for p in sorted(infos.values(), key=lambda p: p.file):
        if ahead is not None and (ahead / p.file).is_file():
            os.rename(ahead / p.file, area / p.file)  # checked below like a fetched one
        else:
            files.append(p.file)
    try:
        if files:
            largest = max(p.size for p in infos.values() if p.file in files)
            done.moved += remote.fetch_files(
                patch_dir(manifest.serial), files, area, None, largest + 1
            )
    except TransportError as exc:
        if not_at_source(exc):  # no patches/<serial>/ there
            raise PatchMissing(f"{where}: not at this source") from None
        raise
    for name, p in sorted(infos.items()):
        path = area / p.file
        if not path.is_file() or path.is_symlink():
            # The source has this release's patches but not this one whole: rsync skips a file
            # over --max-size, a symlink or a directory. Not a source without patches: warned.
            raise VerificationError(
                f"{where}/{p.file}: missing, not a regular file, or larger than the manifest's "
                f"{p.size} bytes (map {name}); the patch was altered or removed"
            )
        if text.sha256_file(path) != (p.sha256, p.size):
            raise VerificationError(
                f"{where}/{p.file}: sha256 or size differ from the manifest's; the patch was altered"
            )
    for name, p in sorted(infos.items()):
        m = manifest.maps[name]
        sep = separator(name, m).encode()
        out = staging / m.file
        done.files.add(m.file)
        # Private, as rsync lands text here (--chmod F600): a map may carry password hashes.
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        # The lines it changes, for the cdb's edits (a map without a cdb needs none), at most
        # one more than the edits a cdb is changed in place with.
        changes: list[Change] | None = [] if m.cdb is not None else None
        with os.fdopen(fd, "wb") as fh:
            digest, size = apply_patch(
                basis / m.file, area / p.file, fh, f"{where}/{p.file}", sep, changes, MAX_CDB_EDITS
            )
        if (digest, size) != (m.sha256, m.size):
            raise VerificationError(
                f"{where}/{p.file}: applied to serial {p.base}'s {m.file}, gives sha256 "
                f"{digest[:16]}… size {size}, not the manifest's ({m.sha256[:16]}… size {m.size})"
            )
        done.patched.append(name)
        if changes is not None and len(changes) <= MAX_CDB_EDITS:
            with contextlib.suppress(NotPatchable):  # the cdb is built whole
                done.edits[name] = edits_from_changes(changes, sep)


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to the basis file ``src`` (a copy where links fail)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

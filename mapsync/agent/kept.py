"""The releases an agent keeps for rollback: ``STATE/<channel>/releases/<serial>/``.

::

    STATE/mx/releases/41/    MANIFEST.json, MANIFEST.json.sig, text maps (as verified at install)
    STATE/mx/releases/42/    ...

A kept release never shares an inode with the live set: the swapped-out live inode of a
changed map must die at the swap so a running Postfix notices (MAIL-FACTS.md). Its text maps are hard links to the
verified text in the agent's private staging (which becomes the rsync basis, whose files
nobody rewrites in place: rsync and patches make new ones), else private copies.
Only text is kept; ``rollback`` builds the cdb files again and proves them equal by sha256,
and verifies signature and every hash first, so a copy damaged here is refused, not installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from stat import S_ISREG

from mapsync.atomic import commit_dir, copy_into, remove_tree
from mapsync.errors import MapsyncError
from mapsync.release import MANIFEST, SIGNATURE, Manifest, parse_manifest, secrets_beyond

KEPT = "releases"


class KeptReleases:
    """The kept releases of one channel under ``root`` (``STATE/<channel>/releases``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, serial: int) -> Path:
        """The directory release ``serial`` is (or would be) kept in."""
        return self.root / str(serial)

    def serials(self) -> list[int]:
        """Serials kept, oldest first."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit() and (self.root / n).is_dir())

    def has(self, serial: int) -> bool:
        """Whether release ``serial`` is kept."""
        return self.path(serial).is_dir()

    def keep(self, src: Path, manifest: Manifest, keep: int, installed: int) -> list[int]:
        """Copy release ``manifest.serial`` from ``src`` (verified text, manifest, signature),
        then drop all but the newest ``keep`` releases (never ``installed``), and any that
        carries password hashes in a map ``manifest`` no longer has; return those dropped.
        """
        final = self.path(manifest.serial)
        if not final.is_dir():
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.root.stat().st_mode & 0o077:  # made by an older mapsync, or by hand
                os.chmod(self.root, 0o700)
            tmp = self.root / f".{manifest.serial}.tmp"
            remove_tree(tmp, ignore_errors=True)  # a killed run's half copy
            tmp.mkdir(mode=0o700)
            try:
                for name in (MANIFEST, SIGNATURE):
                    _copy_private(src / name, tmp / name)
                for name in sorted(manifest.files()):
                    _link_private(src / name, tmp / name)
                commit_dir(tmp, final)
            except BaseException:
                remove_tree(tmp, ignore_errors=True)
                raise
        return self.prune(keep, installed, carried=set(manifest.maps))

    def prune(self, keep: int, installed: int, *, carried: set[str] | None = None) -> list[int]:
        """Drop all but the newest ``keep`` releases (never ``installed``) and what a killed
        copy left; close any left readable by others. Return the serials dropped.

        ``carried``: the maps of the release just installed. A kept release with a map of
        password hashes not among them is dropped too: the channel no longer carries them
        (a ``dovecot_users`` once published to an MX by mistake), and no rollback is to bring
        them back."""
        serials = self.serials()
        doomed = set(serials[:-keep] if len(serials) > keep else [])
        if carried is not None:
            doomed.update(s for s in serials if self._secret_beyond(s, carried))
        dropped = []
        for serial in sorted(doomed):
            if serial == installed:
                continue
            remove_tree(self.path(serial))
            dropped.append(serial)
        for name in os.listdir(self.root):
            if name.startswith(".") and name.endswith(".tmp"):
                remove_tree(self.root / name, ignore_errors=True)
        for serial in self.serials():
            _make_private(self.path(serial))
        return dropped

    def _secret_beyond(self, serial: int, carried: set[str]) -> bool:
        """Whether kept release ``serial`` has a map with password hashes not in ``carried``
        (one whose manifest does not read is left to the count)."""
        path = self.path(serial) / MANIFEST
        try:
            manifest = parse_manifest(path.read_bytes(), str(path))
        except (OSError, MapsyncError):
            return False
        return bool(secrets_beyond(manifest, carried))


def _copy_private(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new file ``dst`` that only the agent can read from the moment it
    exists (kept ``dovecot_users`` holds password hashes); :func:`commit_dir` fsyncs it."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        copy_into(src, fd)
    finally:
        os.close(fd)


def _link_private(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` where that is a regular file of this process's user
    that only it can read; else (another file system, another owner or mode) a copy."""
    try:
        st = os.lstat(src)
        if S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
            os.link(src, dst, follow_symlinks=False)
            return
    except OSError:
        pass
    _copy_private(src, dst)


def _make_private(directory: Path) -> None:
    """Close a kept release that an older mapsync left readable by others (0644 files)."""
    for entry in os.scandir(directory):
        if (
            entry.is_file(follow_symlinks=False)
            and entry.stat(follow_symlinks=False).st_mode & 0o077
        ):
            os.chmod(entry.path, 0o600)
    if os.stat(directory).st_mode & 0o077:
        os.chmod(directory, 0o700)

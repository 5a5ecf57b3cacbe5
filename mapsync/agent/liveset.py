"""The live set of maps in a channel's ``target`` directory, and its atomic swap.

::

    TARGET/recipients.cdb -> .mapsync/current/recipients.cdb     (one link per file)
    TARGET/.mapsync/current -> 42                                (swapped by rename)
    TARGET/.mapsync/42/    MANIFEST.json, MANIFEST.json.sig, text maps, cdb files

A reader opening ``TARGET/recipients.cdb`` resolves ``current`` at that instant, so it gets
a file of the old set or of the new set, never a partial file. After the swap the old set
directory is deleted, so its inodes die: a running Postfix smtpd or cleanup sees
``st_nlink == 0`` on its open table and restarts before the next client
(tests/daemons/test_running_postfix.py). Postfix's trivial-rewrite, which answers "is this
domain ours" and routing (relay_domains, transport_maps), checks only every 10 s and smtpd
caches its answers, so domain and routing changes need the channel's ``reload`` hook.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mapsync import signals
from mapsync.atomic import atomic_symlink, commit_dir, fsync_dir, remove_tree
from mapsync.errors import VerificationError
from mapsync.release import MANIFEST, SIGNATURE, Manifest, manifest_sha256, parse_manifest

SETS = ".mapsync"
_STRAY_LINK = re.compile(r"^\..+\.[0-9]+\.tmp\Z")


class SwapUnfinished(OSError):
    """The new set is live, but linking its files or deleting the old set failed."""


class NotOurs(OSError):
    """A path in the target that a map's link would replace is not mapsync's own link."""


CURRENT = "current"


@dataclass(frozen=True)
class Installed:
    """The manifest and signature of a live set as read from its directory: the one read of
    what is installed. The signature was verified when the set was installed; a full check
    (``verify``, ``[agent] full_check``) verifies it again from these bytes."""

    directory: Path
    data: bytes
    signature: bytes

    @functools.cached_property
    def manifest(self) -> Manifest:
        """The manifest parsed (VerificationError, naming the file, if it does not parse)."""
        return parse_manifest(self.data, f"{self.directory}/{MANIFEST}")

    @property
    def sha256(self) -> str:
        """The sha256 ``LATEST`` names for this manifest."""
        return manifest_sha256(self.data)


def read_installed(directory: Path) -> Installed:
    """Manifest and signature of the set in ``directory`` (OSError if either cannot be read)."""
    return Installed(
        directory, (directory / MANIFEST).read_bytes(), (directory / SIGNATURE).read_bytes()
    )


def live_names(manifest: Manifest) -> set[str]:
    """The names the live set of ``manifest`` links into the target: text maps and cdbs."""
    names = manifest.files()
    names |= {m.cdb.file for m in manifest.maps.values() if m.cdb is not None}
    return names


def strays(directory: Path, manifest: Manifest) -> list[str]:
    """The names in the set ``directory`` that are neither ``manifest``'s files nor the
    manifest and its signature: dropped there by hand, an editor's swap file of a live map."""
    return sorted(set(os.listdir(directory)) - live_names(manifest) - {MANIFEST, SIGNATURE})


class LiveSet:
    """A node's live maps: the set directories under ``TARGET/.mapsync`` and the ``current`` link
    that names the installed one."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.sets = target / SETS

    def current(self) -> Path | None:
        """The directory of the installed set, or None."""
        link = self.sets / CURRENT
        try:
            name = os.readlink(link)
        except (FileNotFoundError, OSError):
            return None
        path = self.sets / name
        return path if path.is_dir() else None

    def installed(self) -> Installed | None:
        """Manifest and signature of the installed set; None if there is none or either file
        is missing."""
        cur = self.current()
        if cur is None:
            return None
        try:
            return read_installed(cur)
        except FileNotFoundError:
            return None

    def new_set_dir(self, serial: int) -> Path:
        """An empty directory, only the agent may enter, to build the set of ``serial`` in."""
        self.target.mkdir(parents=True, exist_ok=True)
        self.sets.mkdir(mode=0o755, exist_ok=True)
        path = self.sets / f"{serial}.new"
        if path.exists():
            remove_tree(path)  # a killed run's half-built set
        # Private while it is built (maps with password hashes are written here); the
        # installer opens it (0755) once every file has its final mode.
        path.mkdir(mode=0o700)
        return path

    def swap(self, built: Path, serial: int) -> None:
        """Make ``built`` the live set: committed (every file fsynced, renamed) under its
        serial, then ``current`` switched to it in one rename; then every older set dropped."""
        final = self.sets / str(serial)
        cur = self.current()
        if final.exists() and final != cur:
            remove_tree(final)
        if final == cur:
            # Re-installing the same serial (a renewal rebuilt in place): keep names unique.
            final = self.sets / f"{serial}.{os.getpid()}"
        commit_dir(built, final)  # every file durable before the set can go live
        # A SIGTERM now waits until the target is settled (a directory in the link's place
        # moved aside, the link made, older sets dropped): the run then ends with one whole
        # set and nothing left over for the next run.
        with signals.held():
            self._drop_current_directory()
            atomic_symlink(final.name, self.sets / CURRENT)
            try:
                self.settle()
            except OSError as exc:
                raise SwapUnfinished(str(exc)) from exc

    def _drop_current_directory(self) -> None:
        """A directory where the ``current`` link belongs (copied back by hand, a restore)
        cannot be replaced by a rename: move it aside (``prune`` deletes it) just before the
        link is made. Its files are not mapsync's verified set; the new set replaces them."""
        link = self.sets / CURRENT
        if link.is_dir() and not link.is_symlink():
            os.rename(link, self.sets / f".{CURRENT}.damaged.{os.getpid()}")

    def remove_stray_links(self) -> list[str]:
        """Delete the temporary links ``atomic_symlink`` leaves when killed between creating
        and renaming them (``.NAME.PID.tmp``): in ``.mapsync`` any, in ``target`` only those
        that point into the live set (anything else there is not mapsync's)."""
        removed = []
        for directory, must_point_into in ((self.sets, ""), (self.target, f"{SETS}/{CURRENT}/")):
            try:
                names = os.listdir(directory)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                path = directory / name
                if not _STRAY_LINK.match(name) or not path.is_symlink():
                    continue
                if not os.readlink(path).startswith(must_point_into):
                    continue
                path.unlink()
                removed.append(str(path))
        return removed

    def settle(self) -> None:
        """Bring the target in line with the live set: one link per file, older sets deleted.

        Idempotent; run after every swap and at the start of every run, so a run that died
        (or hit a full disk) right after switching ``current`` is finished by the next one.
        """
        self.remove_stray_links()
        cur = self.current()
        if cur is None:
            return
        self._link_files(cur)
        self.prune()

    def prune(self) -> None:
        """Delete every set but the live one: a swapped-out set (its inodes must die so running
        daemons notice) or a half-built one left by a killed run."""
        cur = self.current()
        if cur is None:
            return
        removed = False
        for entry in os.listdir(self.sets):
            path = self.sets / entry
            if entry == CURRENT or path == cur or path.is_symlink() or not path.is_dir():
                continue
            remove_tree(path)
            removed = True
        if removed:
            fsync_dir(self.sets)

    def is_ours(self, name: str) -> bool:
        """Whether ``TARGET/name`` is the link mapsync makes for a live file of that name."""
        try:
            return os.readlink(self.target / name) == f"{SETS}/{CURRENT}/{name}"
        except OSError:  # missing, or not a symlink
            return False

    def foreign(self, names: Iterable[str]) -> list[Path]:
        """The paths ``TARGET/name`` that exist and are not mapsync's own link: the operator's
        files (``target = "/etc/postfix"`` holds a hand-written ``transport``). mapsync never
        replaces or deletes them."""
        return [
            self.target / n
            for n in sorted(names)
            if os.path.lexists(self.target / n) and not self.is_ours(n)
        ]

    def _link_files(self, live: Path) -> None:
        # The files the set's manifest names, never what else is in its directory (a file
        # dropped there, an editor's swap file): only they are mapsync's to link. A set whose
        # manifest does not read is damage for the check (mapsync.agent.damage): links kept.
        try:
            wanted = live_names(parse_manifest((live / MANIFEST).read_bytes(), str(live)))
        except (OSError, VerificationError):
            return
        # Checked before any link changes, so a refusal leaves the target as it was.
        theirs = self.foreign(wanted)
        if theirs:
            raise NotOurs(
                f"{', '.join(map(str, theirs))}: not a link mapsync made; it is never replaced "
                "(move it away, or give the channel a target of its own)"
            )
        for name in sorted(wanted):
            if not self.is_ours(name):
                atomic_symlink(f"{SETS}/{CURRENT}/{name}", self.target / name)
        for name in os.listdir(self.target):
            if name not in wanted and self.is_ours(name):
                (self.target / name).unlink()  # a map the new release no longer carries
        fsync_dir(self.target)

"""``mapsync mirror SOURCE DEST``: keep a copy of a repository in step, safely, for nodes.

A mirror is a second repository (docs/release-format.md's layout) that an rsync daemon
serves to nodes, so that thousands of agents need not poll the publisher (docs/scaling.md).
It stands on the release contract only (:mod:`mapsync.release`) and fetches through
:class:`mapsync.transport.Remote`, never the publisher's or the agent's code.

Per channel, one run:

1. reads SOURCE's ``LATEST`` (at most 4 KiB). Lower than DEST's: refused (exit 5), DEST
   untouched. Equal: nothing is fetched (a quick local check that the release it names is
   whole, its signature verified with trusted keys, repaired from SOURCE when not).
2. copies the release LATEST names, if DEST lacks it: its manifest and
   signature (at most 1 MiB; the manifest must be the one LATEST names, and with trusted
   keys its signature is verified), then exactly the files the manifest names, delta-encoded
   against the nearest release DEST has (``--link-dest``: unchanged maps are hard links), into
   ``DEST/<channel>/.staging/``; every file is checked against the manifest (sha256, size),
   then the directory is renamed into ``releases/`` whole. A half-copied release is never
   visible.
3. checks the release LATEST names once more where it now lies, then writes ``LATEST``
   (temp file, fsync, rename, fsync of the directory): never one that names missing files.
4. copies, the same way, the older wanted releases DEST lacks (after ``LATEST``: they must
   not delay it, nor take the space it needs); one that fails is a warning, and leaves
   nothing in staging.
5. prunes, after that, the releases no longer wanted: those SOURCE no longer has, or with
   ``keep`` all but the newest ``keep``, and whatever ``keep`` says those carrying a map
   with password hashes the release LATEST names no longer has; never the one LATEST names.

The whole run holds ``DEST/.lock``. An error in one channel leaves that channel's DEST as
it was (its LATEST still names a whole release) and the other channels go on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mapsync import log
from mapsync.access import check_owner
from mapsync.atomic import atomic_write, commit_dir, fsync_dir, remove_tree
from mapsync.config import CHANNEL_NAME
from mapsync.errors import (
    EXIT_WARNING,
    ConfigError,
    MapsyncError,
    TransportError,
    VerificationError,
    described,
)
from mapsync.formats import text
from mapsync.locks import waiting_lock
from mapsync.mirrorlog import ChannelRun, LoopMark, loop_running, record_mirror_run
from mapsync.release import (
    LATEST,
    MANIFEST,
    MANIFEST_PATCH,
    MAX_LATEST_BYTES,
    MAX_MANIFEST_BYTES,
    PATCHES,
    RELEASES,
    SIGNATURE,
    STAGING,
    Latest,
    Manifest,
    is_serial_name,
    manifest_sha256,
    parse_latest,
    parse_manifest,
    patch_dir,
    release_dir,
    secrets_beyond,
    serial_names,
)
from mapsync.signing import Keyring
from mapsync.transport import Remote
from mapsync.transport.rsync import DEFAULT_SSH, block_size, not_at_source

_log = log.get("mirror")
LOCK = ".lock"
DIR_MODE, FILE_MODE = 0o755, 0o644  # what the serving rsync daemon's user must read
MODES = "D755,F644"


@dataclass
class Mirrored:
    """What one run did for one channel."""

    channel: str
    action: str  # "mirrored" (LATEST moved) | "current" (LATEST was already SOURCE's)
    serial: int
    previous: int | None
    copied: list[int] = field(default_factory=list)  # releases copied, in copy order
    pruned: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # older releases not copied: why
    bytes: int = 0  # on the wire, both ways
    repaired: str | None = None  # DEST's copy of LATEST's release was damaged: what was wrong
    # A full check (--verify): older releases, and patches, found damaged here: what was
    # wrong, and what was done ("copied again", "removed")
    damaged: dict[str, str] = field(default_factory=dict)
    checked: int = 0  # releases a full check hashed
    # Older releases a full check set aside and that could not be copied again: why (as
    # `skipped`, tried again when LATEST next moves)
    lost: dict[int, str] = field(default_factory=dict)


class Mirror:
    """A mirror of the repository at ``source`` (path, ``rsync://``, ``ssh://``) in ``dest``.

    ``keep``: releases kept per channel (None: those SOURCE has); ``keys``: trusted keys whose
    signature every copied manifest must carry (None: not checked here; agents check)."""

    def __init__(
        self,
        source: str,
        dest: Path,
        *,
        keep: int | None = None,
        keys: Keyring | None = None,
        timeout: int = 300,
        password_file: Path | None = None,
        ssh: tuple[str, ...] = DEFAULT_SSH,
    ) -> None:
        if keep is not None and keep < 2:
            # As the publisher's `keep`: a node that read LATEST just before it moved must
            # still find the release it named.
            raise ConfigError(f"mirror --keep: must be at least 2, not {keep}")
        if timeout < 1:
            raise ConfigError(f"mirror --timeout: must be at least 1 (seconds), not {timeout}")
        if "://" not in source:  # a path, relative to where the command runs
            source = os.path.abspath(source)
        self.remote = Remote(source, timeout, ssh, password_file, MODES)
        self.source = self.remote.source
        self.dest = dest
        self.timeout = timeout
        self.keep = keep
        self.keys = keys
        self.mark: LoopMark | None = None  # held by a --interval process (:meth:`looping`)
        local = self.remote.endpoint
        if not local.daemon and not local.ssh and os.path.exists(local.path):
            same = os.path.realpath(local.path) == os.path.realpath(dest)
            if same or dest.resolve().is_relative_to(Path(local.path).resolve()):
                raise ConfigError(
                    f"mirror: DEST {dest} is (inside) SOURCE {source}; a mirror needs its own "
                    "directory"
                )

    def _own_dest(self) -> None:
        """DEST, this user's directory (made if missing): ConfigError for anything else."""
        check_owner(self.dest, "the mirror's copy")
        if self.dest.is_symlink() or (self.dest.exists() and not self.dest.is_dir()):
            raise ConfigError(f"mirror: DEST {self.dest} is not a directory")
        self.dest.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self, wait: float = 10.0) -> Iterator[None]:
        """Hold ``DEST/.lock`` (one mirror run, or publisher, at a time in DEST). DEST must be
        this user's: a copy written as root could not be pruned by the ``mapsync`` user."""
        self._own_dest()
        lock = self.dest / LOCK
        with waiting_lock(lock, wait, f"{self.dest}: another mirror run holds {lock}"):
            yield

    @contextlib.contextmanager
    def looping(self) -> Iterator[None]:
        """Mark DEST as followed by this ``--interval`` process while in the block: a one-shot
        run meanwhile keeps the loop's interval in the run note (:mod:`mapsync.mirrorlog`)."""
        self._own_dest()
        with loop_running(self.dest) as self.mark:
            try:
                yield
            finally:
                self.mark = None

    def channels(self) -> list[str]:
        """The channels SOURCE serves: its directories named like a channel (``.private``,
        ``.lock`` and anything else are not)."""
        try:
            listing = self.remote.list_dir("")
        except TransportError as exc:
            raise TransportError(f"{self.source}: listing its channels: {exc}") from None
        if LATEST in listing:
            raise ConfigError(
                f"{self.source}: holds a {LATEST}, so it is one channel's directory; give the "
                "repository that holds the channel directories (docs/scaling.md: mapsync-all)"
            )
        names = sorted(
            n for n, (kind, _) in listing.items() if kind == "d" and CHANNEL_NAME.match(n)
        )
        if not names:
            raise MapsyncError(f"{self.source}: no channel directory to mirror")
        return names

    def channel(self, name: str, *, full: bool = False) -> Mirrored:
        """Bring channel ``name`` of DEST up to SOURCE's (see the module); raise on refusal.
        ``full``: first hash every file of every release DEST serves (:meth:`_Channel.check`)."""
        if not CHANNEL_NAME.match(name):
            raise ConfigError(f"mirror --channel {name!r}: not a channel name")
        home = self.dest / name
        home.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        work = home / STAGING
        remove_tree(work, ignore_errors=True)  # what a killed run left (DEST's lock is ours)
        work.mkdir(mode=0o700)
        try:
            return _Channel(self, name, home, work).run(full)
        finally:
            remove_tree(work, ignore_errors=True)


class _Channel:
    """One channel's run: SOURCE's pointer, DEST's, and the copies between them."""

    def __init__(self, mirror: Mirror, name: str, home: Path, work: Path) -> None:
        self.m = mirror
        self.remote = mirror.remote
        self.name = name
        self.home = home
        self.work = work
        self.where = f"{mirror.source}/{name}"
        self.moved = 0
        self.hashed: dict[tuple[int, int], tuple[str, int]] = {}  # inode → sha256, size

    def run(self, full: bool = False) -> Mirrored:
        latest = self._source_latest()
        have = self._dest_latest()
        previous = have.serial if have else None
        damaged: dict[str, str] = {}
        set_aside: list[int] = []
        checked = 0
        if full and (have is None or latest.serial >= have.serial):
            checked, set_aside, damaged = self.check(have)
        done = self._run(latest, have, previous)
        if have is not None and have.serial in set_aside and done.repaired is not None:
            # The release LATEST names, copied again as the quick check has it, and said so.
            set_aside.remove(have.serial)
            done.repaired = damaged.pop(f"release {have.serial}")
        if set_aside:
            self._copy_again(latest, set_aside, damaged, done)
        done.damaged, done.checked = damaged, checked
        return done

    def _run(self, latest: Latest, have: Latest | None, previous: int | None) -> Mirrored:
        if have is not None and latest.serial < have.serial:
            raise VerificationError(
                f"{self.where}/{LATEST}: serial {latest.serial} is lower than {have.serial}, "
                f"which this mirror ({self.home}) serves (a stale upstream, a rollback attack "
                "or a restored publisher); refusing to go backwards, nothing changed. A "
                "publisher restored from an older backup gets back what it had published from "
                "this copy: on it, before it publishes again, `mapsync mirror --trusted-key KEY "
                f"SOURCE REPOSITORY`, SOURCE this mirror's {self.m.dest} as rsync or ssh reach "
                "it (docs/scaling.md); its nodes refuse anything lower meanwhile. If this "
                "mirror's serial is the "
                f"wrong one (copied from a bad upstream), remove {self.home}/{LATEST} and run "
                "again (and give mirror --trusted-key)"
            )
        repaired = None
        if have is not None and latest.serial == have.serial:
            if latest.manifest_sha256 != have.manifest_sha256:
                raise VerificationError(
                    f"{self.where}/{LATEST}: serial {latest.serial} names another manifest than "
                    f"the one this mirror serves ({self.home / LATEST}); refusing, nothing changed"
                )
            repaired = self._damage(latest)
            if repaired is None:
                pruned = self._prune(latest.serial, self._keep_local(latest.serial))
                return Mirrored(
                    self.name, "current", latest.serial, previous, pruned=pruned, bytes=self.moved
                )
            self._set_aside(
                latest.serial,
                "the release LATEST names is damaged here; copying it again",
                repaired,
            )
        done = Mirrored(self.name, "mirrored", latest.serial, previous, repaired=repaired)
        offered = self._source_serials(latest)
        wanted = self._wanted(offered, latest.serial)
        here = self._dest_serials()
        if latest.serial in here:
            # Copied by an earlier run that did not get to LATEST (or before SOURCE changed it):
            # checked in full, and copied again unless it is exactly the one LATEST names.
            problem = self._verify_here(latest)
            if problem is not None:
                self._set_aside(
                    latest.serial, "an earlier copy, never served, is copied again", problem
                )
                here.remove(latest.serial)
        if latest.serial not in here:
            self._copy(latest.serial, latest, here)  # checked in full in staging
            done.copied.append(latest.serial)
            here.append(latest.serial)
        problem = self._damage(latest)
        if problem is not None:  # never a LATEST that names what is not here, whole
            raise VerificationError(f"{problem}; {LATEST} not moved")
        # LATEST before the older releases: it is what nodes fetch, and the older copies must
        # neither delay it nor take the space it needs (a disk nearly full).
        try:
            atomic_write(self.home / LATEST, latest.to_bytes(), FILE_MODE)
        except OSError as exc:
            raise MapsyncError(
                f"{self.home / LATEST}: not written ({exc.strerror}); it still names serial "
                f"{previous}, and release {latest.serial} is here whole for the next run"
            ) from None
        _log.info("LATEST moved", channel=self.name, serial=latest.serial, was=previous)
        for serial in sorted(wanted - set(here), reverse=True):
            try:
                self._copy(serial, None, here)
            except (MapsyncError, OSError) as exc:
                # Not what nodes fetch (they fetch what LATEST names): a warning, retried when
                # LATEST next moves.
                problem = described(exc)
                _log.warning(
                    "older release not mirrored", channel=self.name, serial=serial, problem=problem
                )
                done.skipped[serial] = problem
                continue
            done.copied.append(serial)
            here.append(serial)
        self._manifest_patches_after(done.copied, here)
        done.pruned = self._prune(latest.serial, wanted)
        done.bytes = self.moved
        return done

    # -- pointers ----------------------------------------------------------------------------

    def _source_latest(self) -> Latest:
        path = self.work / LATEST
        self.moved += self.remote.fetch_file(f"{self.name}/{LATEST}", path, MAX_LATEST_BYTES)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise VerificationError(
                f"{self.where}/{LATEST}: missing, not a regular file, or larger than "
                f"{MAX_LATEST_BYTES} bytes"
            ) from None
        return parse_latest(data, f"{self.where}/{LATEST}")

    def _dest_latest(self) -> Latest | None:
        path = self.home / LATEST
        try:
            return parse_latest(path.read_bytes(), str(path))
        except FileNotFoundError:
            return None
        except (OSError, MapsyncError) as exc:
            raise MapsyncError(
                f"{path}: damaged ({getattr(exc, 'strerror', None) or exc}); the mirror does not "
                "guess which serial it served: look at it, and remove it to mirror afresh"
            ) from None

    # -- which releases ----------------------------------------------------------------------

    def _source_serials(self, latest: Latest) -> list[int]:
        listing = self.remote.list_dir(f"{self.name}/{RELEASES}")
        serials = sorted(
            int(n) for n, (kind, _) in listing.items() if kind == "d" and is_serial_name(n)
        )
        if latest.serial not in serials:
            raise VerificationError(
                f"{self.where}/{LATEST}: names release {latest.serial}, which "
                f"{self.where}/{RELEASES}/ does not hold; nothing changed"
            )
        return [s for s in serials if s <= latest.serial]

    def _dest_serials(self) -> list[int]:
        good, _, stray = serial_names(self.home / RELEASES)
        for path in stray:
            _log.warning("not a release, ignored (remove it by hand)", path=str(path))
        return good

    def _wanted(self, offered: list[int], serial: int) -> set[int]:
        """The releases DEST should hold once LATEST is ``serial``."""
        if self.m.keep is None:
            return {*offered, serial}
        universe = sorted({*offered, *(s for s in self._dest_serials() if s <= serial)})
        return {*universe[-self.m.keep :], serial}

    def _keep_local(self, serial: int) -> set[int]:
        """Wanted releases when LATEST did not move: with ``keep``, the newest here; else all
        (those SOURCE pruned go when LATEST next moves)."""
        here = [s for s in self._dest_serials() if s <= serial]
        if self.m.keep is None:
            return {*here, serial}
        return {*here[-self.m.keep :], serial}

    def _prune(self, serial: int, wanted: set[int]) -> list[int]:
        wanted = wanted - self._secret_leftovers(serial)
        pruned = []
        for old in self._dest_serials():
            if old in wanted or old == serial:
                continue
            path = self.home / release_dir(old)
            try:
                remove_tree(path)
            except OSError as exc:
                _log.warning(
                    "old release not removed",
                    channel=self.name,
                    serial=old,
                    problem=described(exc),
                )
                continue
            pruned.append(old)
        if pruned:
            _log.info("old releases pruned", channel=self.name, serials=pruned, latest=serial)
        here = set(self._dest_serials())
        try:
            patched = serial_names(self.home / PATCHES)[0]
        except MapsyncError as exc:  # after LATEST moved: the release is served, say so and go on
            _log.warning("old patches not removed", channel=self.name, error=str(exc))
            patched = []
        for old in patched:
            if old not in here:  # the patches of a release no longer served
                remove_tree(self.home / patch_dir(old), ignore_errors=True)
        return pruned

    def _secret_leftovers(self, serial: int) -> set[int]:
        """The releases here before ``serial`` (the one LATEST names) holding a map with
        password hashes that release ``serial`` no longer has: the publisher removed them with
        the release that drops the map, and a mirror keeping them (``--keep``, or a run killed
        before its prune) would still serve them to every node of the channel. A manifest
        that does not read is left to the count, as the publisher leaves it."""
        path = self.home / release_dir(serial) / MANIFEST
        try:
            carried = set(parse_manifest(path.read_bytes(), str(path)).maps)
        except (OSError, MapsyncError):
            return set()
        found = set()
        for old in self._dest_serials():
            path = self.home / release_dir(old) / MANIFEST
            if old >= serial:
                continue
            try:
                secret = secrets_beyond(parse_manifest(path.read_bytes(), str(path)), carried)
            except (OSError, MapsyncError):
                continue
            if secret:
                _log.warning(
                    "removing a release carrying password hashes the channel no longer carries "
                    "(its nodes could still fetch them)",
                    channel=self.name,
                    serial=old,
                    maps=",".join(secret),
                )
                found.add(old)
        return found

    # -- copies ------------------------------------------------------------------------------

    def _copy(self, serial: int, latest: Latest | None, here: list[int]) -> None:
        """Copy release ``serial`` into staging, check it, rename it into ``releases/``. A
        copy that fails leaves nothing in staging: what it had written would take the space
        the next copies (and ``LATEST``) need."""
        try:
            self._copy_release(serial, latest, here)
        finally:
            for left in (self.work / str(serial), self.work / f"{serial}.patches"):
                remove_tree(left, ignore_errors=True)

    def _copy_release(self, serial: int, latest: Latest | None, here: list[int]) -> None:
        name = f"{self.name}/{release_dir(serial)}"
        where = f"{self.m.source}/{name}"
        staging = self.work / str(serial)
        staging.mkdir()
        os.chmod(staging, DIR_MODE)
        self.moved += self.remote.fetch_files(
            name, [MANIFEST, SIGNATURE], staging, None, MAX_MANIFEST_BYTES
        )
        manifest = self._manifest(staging, serial, latest, where)
        largest = max((m.size for m in manifest.maps.values()), default=0)
        basis = self._basis(serial, here)
        files = sorted(manifest.files())
        self.moved += self.remote.fetch_files(
            name, files, staging, basis, largest + 1, block_size(largest)
        )
        problem = self._check_files(staging, manifest, where)
        if (
            problem is not None
            and basis is not None
            and all((staging / f).is_file() for f in files)
        ):
            # rsync's quick check (size, mtime) trusts the basis: a file damaged on this disk
            # would be linked into every later release. Once more without it.
            _log.warning(
                "copying again without the local delta basis",
                channel=self.name,
                serial=serial,
                basis=str(basis),
                problem=problem,
            )
            for f in files:
                (staging / f).unlink()
            self.moved += self.remote.fetch_files(name, files, staging, None, largest + 1)
            problem = self._check_files(staging, manifest, where)
        if problem is not None:
            raise VerificationError(f"{problem}; nothing of release {serial} is served")
        previous = self._previous_manifest(manifest)
        if manifest.patches or previous is not None:
            # First: a release never names absent ones.
            self._copy_patches(serial, manifest, (staging / MANIFEST).read_bytes(), previous)
        releases = self.home / RELEASES
        releases.mkdir(mode=DIR_MODE, exist_ok=True)
        commit_dir(staging, releases / str(serial))
        _log.info("release copied", channel=self.name, serial=serial)

    def _previous_manifest(self, manifest: Manifest) -> bytes | None:
        """The manifest of the release ``manifest`` follows, if this mirror serves it."""
        if manifest.previous is None:
            return None
        try:
            return (self.home / release_dir(manifest.previous) / MANIFEST).read_bytes()
        except OSError:
            return None

    def _copy_patches(
        self, serial: int, manifest: Manifest, data: bytes, previous: bytes | None
    ) -> None:
        """Copy the patches release ``serial`` names into ``patches/<serial>``, each checked
        against the manifest (bytes ``data``). Ones SOURCE lacks or that are altered: none are
        served (a warning); agents then fetch the text, as from a mirror of an earlier
        version. The manifest's own patch too, where this mirror has the ``previous``
        manifest to prove it on: served only if it makes ``data`` of it."""
        name = f"{self.name}/{patch_dir(serial)}"
        where = f"{self.m.source}/{name}"
        staging = self.work / f"{serial}.patches"
        remove_tree(staging, ignore_errors=True)
        staging.mkdir()
        os.chmod(staging, DIR_MODE)
        files = sorted(p.file for p in manifest.patches.values())
        largest = max((p.size for p in manifest.patches.values()), default=0)
        if previous is not None:
            files.append(MANIFEST_PATCH)
            largest = max(largest, MAX_MANIFEST_BYTES)
        try:
            self.moved += self.remote.fetch_files(name, files, staging, None, largest + 1)
        except TransportError as exc:
            if not not_at_source(exc):
                raise
            # No patches/<serial>/ at SOURCE (a publisher or mirror of an earlier version, or
            # a release without patches): as for patches missing from it, below.
        if previous is not None:
            self._check_manifest_patch(
                staging / MANIFEST_PATCH, previous, data, f"{where}/{MANIFEST_PATCH}"
            )
        for p in manifest.patches.values():
            path = staging / p.file
            got = text.sha256_file(path) if path.is_file() else None
            if got != (p.sha256, p.size):
                _log.warning(
                    "patches not mirrored: missing or altered at the source",
                    channel=self.name,
                    serial=serial,
                    file=f"{where}/{p.file}",
                )
                remove_tree(staging, ignore_errors=True)
                return
        if not any(staging.iterdir()):
            staging.rmdir()
            return
        patches = self.home / PATCHES
        patches.mkdir(mode=DIR_MODE, exist_ok=True)
        remove_tree(patches / str(serial), ignore_errors=True)  # a killed run's
        commit_dir(staging, patches / str(serial))

    def _manifest_patches_after(self, copied: list[int], here: list[int]) -> None:
        """The manifest patches of the releases here that follow one ``copied`` after them:
        a mirror catching up copies LATEST's release first, then the older ones newest first,
        so when each was copied the manifest it follows (to prove its patch on) was not here
        yet. A release LATEST names at once, and whose nodes hold the one before, would be
        served without it, and every node would fetch the manifest whole. A warning when one
        cannot be copied (its nodes fetch the manifest)."""
        for previous in copied:
            for serial in here:
                if serial <= previous or (self.home / patch_dir(serial) / MANIFEST_PATCH).exists():
                    continue
                try:
                    self._copy_manifest_patch(serial, previous)
                except (MapsyncError, OSError) as exc:
                    _log.warning(
                        "manifest patch not mirrored",
                        channel=self.name,
                        serial=serial,
                        problem=described(exc),
                    )
                finally:
                    remove_tree(self.work / f"{serial}.patches", ignore_errors=True)

    def _copy_manifest_patch(self, serial: int, previous: int) -> None:
        """Copy release ``serial``'s manifest patch, if it follows release ``previous`` here,
        proved on its manifest, into ``patches/<serial>/`` (made for it if the release has no
        map patches: a renewal)."""
        data = (self.home / release_dir(serial) / MANIFEST).read_bytes()
        if parse_manifest(data, str(self.home / release_dir(serial))).previous != previous:
            return
        old = (self.home / release_dir(previous) / MANIFEST).read_bytes()
        name = f"{self.name}/{patch_dir(serial)}"
        staging = self.work / f"{serial}.patches"
        remove_tree(staging, ignore_errors=True)
        staging.mkdir()
        os.chmod(staging, DIR_MODE)
        try:
            self.moved += self.remote.fetch_files(
                name, [MANIFEST_PATCH], staging, None, MAX_MANIFEST_BYTES + 1
            )
        except TransportError as exc:
            if not not_at_source(exc):
                raise
        path = staging / MANIFEST_PATCH
        self._check_manifest_patch(path, old, data, f"{self.m.source}/{name}/{MANIFEST_PATCH}")
        if not path.exists():
            return
        final = self.home / patch_dir(serial)
        if final.is_dir():  # served: the one file added whole (nodes fetch it by name)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            os.rename(path, final / MANIFEST_PATCH)
            fsync_dir(final)
        else:
            patches = self.home / PATCHES
            patches.mkdir(mode=DIR_MODE, exist_ok=True)
            commit_dir(staging, final)

    def _check_manifest_patch(self, path: Path, previous: bytes, data: bytes, where: str) -> None:
        """Keep the manifest patch at ``path`` (SOURCE's ``where``) only if it makes ``data``
        of ``previous``."""
        from mapsync.release.manifest_patch import apply_manifest_patch

        if not path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)  # none at the source (an earlier version's)
            return
        try:
            if apply_manifest_patch(previous, path.read_bytes(), where) == data:
                return
            problem = "does not give the release's manifest"
        except (OSError, VerificationError) as exc:
            problem = str(exc)
        _log.warning("manifest patch not mirrored", channel=self.name, file=where, problem=problem)
        path.unlink()

    def _basis(self, serial: int, here: list[int]) -> Path | None:
        """The release here nearest ``serial``: rsync's delta basis (and hard-link source)."""
        if not here:
            return None
        nearest = min(here, key=lambda s: (abs(s - serial), -s))
        return self.home / release_dir(nearest)

    def _manifest(
        self, directory: Path, serial: int, latest: Latest | None, where: str
    ) -> Manifest:
        try:
            data = (directory / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise VerificationError(
                f"{where}/{MANIFEST}: missing, or larger than {MAX_MANIFEST_BYTES} bytes"
            ) from None
        if not (directory / SIGNATURE).is_file():
            raise VerificationError(f"{where}/{SIGNATURE}: missing")
        if latest is not None and manifest_sha256(data) != latest.manifest_sha256:
            raise VerificationError(
                f"{where}/{MANIFEST}: sha256 differs from the one {LATEST} names"
            )
        if self.m.keys is not None:
            # A local import: it needs `cryptography`, which the rest of this module does not.
            from mapsync.release.verify import verify_release

            return verify_release(
                directory, self.m.keys, where, channel=self.name, serial=serial, latest=latest
            ).manifest
        manifest = parse_manifest(data, f"{where}/{MANIFEST}")
        if manifest.channel != self.name or manifest.serial != serial:
            raise VerificationError(
                f"{where}/{MANIFEST}: is channel {manifest.channel!r} serial {manifest.serial}, "
                f"not {self.name!r} serial {serial}"
            )
        return manifest

    def _check_files(self, directory: Path, manifest: Manifest, where: str) -> str | None:
        """What is wrong with the files in ``directory`` (None: exactly the manifest's files,
        each with its sha256 and size, beside the manifest and its signature)."""
        from mapsync.release.verify import check_files

        try:
            extra = _extra_files(directory, manifest, where)
            if extra:
                return extra
            check_files(directory, manifest, where)
        except (OSError, MapsyncError) as exc:
            return str(exc)
        return None

    def _verify_here(self, latest: Latest) -> str | None:
        """What is wrong with DEST's copy of the release ``latest`` names (None: it is whole:
        its manifest is the one named, and every file it names has its sha256 and size)."""
        directory = self.home / release_dir(latest.serial)
        where = str(directory)
        try:
            manifest = self._manifest(directory, latest.serial, latest, where)
        except (OSError, MapsyncError) as exc:
            return str(exc)
        return self._check_files(directory, manifest, where)

    # -- the full check (--verify) -------------------------------------------------------------

    def check(self, have: Latest | None) -> tuple[int, list[int], dict[str, str]]:
        """Hash every file of every release here against its manifest (with trusted keys,
        each signature verified too), and the patches beside each. A damaged release is set
        aside (copied again from SOURCE after the run's copies: LATEST's at once, as the quick
        check does); damaged patches are removed (nodes then fetch the text) and copied again.
        A file hard-linked into several releases is hashed once. (releases checked, serials
        set aside, what was damaged: release or patches → problem)."""
        damaged: dict[str, str] = {}
        set_aside: list[int] = []
        serials = self._dest_serials()
        for serial in serials:
            directory = self.home / release_dir(serial)
            latest = have if have is not None and have.serial == serial else None
            try:
                manifest = self._manifest(directory, serial, latest, str(directory))
                problem = _extra_files(directory, manifest, str(directory)) or self._hash_files(
                    directory, manifest
                )
            except (OSError, MapsyncError) as exc:
                problem = described(exc)
            if problem is not None:
                damaged[f"release {serial}"] = problem
                set_aside.append(serial)  # LATEST's: the quick check that follows finds it gone
                self._set_aside(serial, "full check: release damaged here", problem)
                continue
            problem = self._check_patches(serial, manifest)
            if problem is not None:
                damaged[f"patches {serial}"] = problem
                _log.warning(
                    "full check: patches damaged here, removed",
                    channel=self.name,
                    serial=serial,
                    problem=problem,
                )
                remove_tree(self.home / patch_dir(serial), ignore_errors=True)
                self._refetch_patches(serial, manifest, damaged)
        _log.info("full check done", channel=self.name, releases=len(serials), damaged=len(damaged))
        return len(serials), set_aside, damaged

    def _hash_files(self, directory: Path, manifest: Manifest) -> str | None:
        """What differs between the maps in ``directory`` and ``manifest`` (None: nothing)."""
        for name, m in sorted(manifest.maps.items()):
            path = directory / m.file
            if not path.is_file() or path.is_symlink():
                return f"{path}: missing or not a regular file (map {name})"
            got = self._sha256(path)
            if got != (m.sha256, m.size):
                return (
                    f"{path}: sha256 {got[0][:16]}… size {got[1]} does not match the manifest "
                    f"({m.sha256[:16]}… size {m.size}); the file was altered"
                )
        return None

    def _sha256(self, path: Path) -> tuple[str, int]:
        st = path.stat()
        key = (st.st_dev, st.st_ino)
        if key not in self.hashed:
            self.hashed[key] = text.sha256_file(path)
        return self.hashed[key]

    def _check_patches(self, serial: int, manifest: Manifest) -> str | None:
        """What is wrong with ``patches/<serial>/`` here (None: nothing, or none here): each
        patch the manifest names, if there, with its sha256 and size; nothing else but the
        manifest's own patch."""
        directory = self.home / patch_dir(serial)
        try:
            names = set(os.listdir(directory))
        except FileNotFoundError:
            return None
        except OSError as exc:
            return described(exc)
        wanted = {p.file: p for p in manifest.patches.values()}
        extra = sorted(names - set(wanted) - {MANIFEST_PATCH})
        if extra:
            return f"{directory}: file(s) the manifest does not name: {', '.join(extra)}"
        for name in sorted(names & set(wanted)):
            path = directory / name
            try:
                got = self._sha256(path) if path.is_file() and not path.is_symlink() else None
            except OSError as exc:
                return described(exc)
            if got != (wanted[name].sha256, wanted[name].size):
                return f"{path}: sha256 or size differ from the manifest's; the patch was altered"
        if MANIFEST_PATCH in names:
            previous = self._previous_manifest(manifest)
            if previous is None:
                return None  # nothing here to prove it on; nodes check it against their own
            from mapsync.release.manifest_patch import apply_manifest_patch

            path = directory / MANIFEST_PATCH
            try:
                data = (self.home / release_dir(serial) / MANIFEST).read_bytes()
                if apply_manifest_patch(previous, path.read_bytes(), str(path)) != data:
                    return f"{path}: does not give the release's manifest"
            except (OSError, VerificationError) as exc:
                return described(exc)
        return None

    def _refetch_patches(self, serial: int, manifest: Manifest, damaged: dict[str, str]) -> None:
        key = f"patches {serial}"
        try:
            data = (self.home / release_dir(serial) / MANIFEST).read_bytes()
            self._copy_patches(serial, manifest, data, self._previous_manifest(manifest))
        except (OSError, MapsyncError) as exc:
            damaged[key] += f"; removed, not copied again: {described(exc)}"
            return
        finally:
            remove_tree(self.work / f"{serial}.patches", ignore_errors=True)
        if (self.home / patch_dir(serial)).is_dir():
            damaged[key] += "; copied again"
        else:
            damaged[key] += "; removed (SOURCE has none whole: nodes fetch the text)"

    def _copy_again(
        self, latest: Latest, serials: list[int], damaged: dict[str, str], done: Mirrored
    ) -> None:
        """Copy the older releases a full check set aside again, those SOURCE still has."""
        try:
            offered = set(self._source_serials(latest))
        except MapsyncError as exc:
            offered, listed = set(), False
            why = f"not copied again: {' '.join(str(exc).split())}"
        else:
            listed, why = True, "removed (SOURCE no longer has it)"
        here = self._dest_serials()
        for serial in sorted(serials, reverse=True):
            key = f"release {serial}"
            if serial in here:  # copied by the run (LATEST moved and wanted it)
                damaged[key] += "; copied again"
                continue
            if serial not in offered:
                damaged[key] += f"; {why}"
                if not listed:
                    done.lost[serial] = f"damaged here, {why}"
                continue
            try:
                self._copy(serial, None, here)
            except (MapsyncError, OSError) as exc:
                damaged[key] += f"; removed, not copied again: {described(exc)}"
                done.lost[serial] = f"damaged here, not copied again: {described(exc)}"
                continue
            here.append(serial)
            done.copied.append(serial)
            damaged[key] += "; copied again"

    def _damage(self, latest: Latest) -> str | None:
        """A quick look at the release DEST's LATEST names: its manifest is the one named
        (with trusted keys, its signature verified: one check, and a signature damaged here
        is refused by every node), every file it names is there with its size, and no other
        file is there (a node
        refuses a release holding one). A map newer than the manifest (edited in place, its
        size kept? the publisher writes the maps first and the copies keep its times, but an
        unchanged map keeps its first release's time, and a clock may have been ahead then)
        has every file hashed (:meth:`_verify_here`). What is wrong, or None."""
        directory = self.home / release_dir(latest.serial)
        try:
            manifest = self._manifest(directory, latest.serial, latest, str(directory))
            signed = (directory / MANIFEST).stat().st_mtime_ns
            newer = False
            for m in manifest.maps.values():
                st = (directory / m.file).stat()
                if st.st_size != m.size:
                    return f"{directory / m.file}: size differs from the manifest's"
                newer = newer or st.st_mtime_ns > signed
            extra = _extra_files(directory, manifest, str(directory))
            if extra:
                return extra
            if newer:
                return self._verify_here(latest)
        except OSError as exc:
            return described(exc)
        except MapsyncError as exc:
            return str(exc)
        return None

    def _set_aside(self, serial: int, why: str, problem: str) -> None:
        """Say ``why`` (a warning naming ``problem``) and move DEST's damaged, or never served,
        copy of ``serial`` out of ``releases/``."""
        _log.warning(why, channel=self.name, serial=serial, problem=problem)
        path = self.home / release_dir(serial)
        if os.path.lexists(path):
            os.rename(path, self.work / f"old-{serial}")


def _extra_files(directory: Path, manifest: Manifest, where: str) -> str | None:
    """The files in ``directory`` besides the manifest's, its signature and the maps it names
    (a node refuses the release for any), said; None when there are none."""
    extra = sorted(set(os.listdir(directory)) - manifest.files() - {MANIFEST, SIGNATURE})
    return f"{where}: file(s) the manifest does not name: {', '.join(extra)}" if extra else None


def mirror_channels(
    mirror: Mirror, names: list[str] | None, *, full: bool = False, interval: int | None = None
) -> tuple[list[Mirrored], list[tuple[str, MapsyncError]]]:
    """One pass over ``names`` (default: every channel SOURCE serves), under DEST's lock:
    what was done per channel, and each channel's error (the others go on). ``full``: each
    channel's releases are hashed first (``--verify``). Every pass that gets DEST's lock,
    failed or not, is noted in ``DEST/.mirror.json`` (``interval``: its loop's) for
    ``mapsync status --mirror``; one that does not leaves the note to the run holding it."""
    done: list[Mirrored] = []
    failed: list[tuple[str, MapsyncError]] = []
    with mirror.locked():
        if mirror.mark is not None:
            try:
                mirror.mark.hold()  # DEST recreated by hand: marked again
            except OSError as exc:
                _log.warning("loop mark not taken", dest=str(mirror.dest), error=described(exc))
        try:
            offered = names or mirror.channels()
            if not names:
                failed.extend(_orphans(mirror, offered))
            for name in offered:
                try:
                    done.append(mirror.channel(name, full=full))
                except MapsyncError as exc:
                    failed.append((name, exc))
                except OSError as exc:
                    failed.append((name, MapsyncError(f"{mirror.dest / name}: {described(exc)}")))
        except Exception as exc:
            _record(mirror, exc, done, failed, full, interval)
            raise
        _record(mirror, None, done, failed, full, interval)
    return done, failed


def _record(
    mirror: Mirror,
    error: Exception | None,
    done: list[Mirrored],
    failed: list[tuple[str, MapsyncError]],
    full: bool,
    interval: int | None,
) -> None:
    """Note the pass in DEST (:mod:`mapsync.mirrorlog`): per channel its error, or its
    warning (SOURCE no longer has it; older releases not copied), and damage found here."""
    runs: dict[str, ChannelRun] = {}
    for d in done:
        damaged = dict(d.damaged)
        if d.repaired is not None:
            damaged[f"release {d.serial}"] = f"{d.repaired}; copied again"
        runs[d.channel] = ChannelRun(
            mirrored=d.action == "mirrored",
            skipped={**d.skipped, **d.lost},
            damaged=damaged,
        )
    others = []
    for name, exc in failed:
        if not CHANNEL_NAME.match(name):
            # `--channel` given a name no channel can have: the run's error, not a channel's
            others.append(f"channel {name!r}: {' '.join(str(exc).split())}")
        elif isinstance(exc, Orphaned):
            runs[name] = ChannelRun(
                warning=f"{mirror.source} no longer has it; what it serves is not renewed "
                "(nodes pulling it go CRITICAL when it expires): remove "
                f"{mirror.dest / name} when no node pulls it"
            )
        else:
            runs[name] = ChannelRun(error=" ".join(str(exc).split()))
    if error is not None:
        others.insert(0, described(error))
    record_mirror_run(
        mirror.dest,
        mirror.source,
        "; ".join(others) or None,
        runs,
        interval=interval,
        timeout=mirror.timeout,
        full=full,
    )


class Orphaned(MapsyncError):
    """DEST serves a channel SOURCE no longer has (exit 1: a warning)."""

    exit_code = EXIT_WARNING


def _orphans(mirror: Mirror, offered: list[str]) -> list[tuple[str, MapsyncError]]:
    """The channels DEST serves (a ``LATEST`` in a directory named like one) that SOURCE no
    longer has: each a warning. Not removed: an upstream that lost one by mistake, or a
    SOURCE given wrong, must not empty a mirror; nodes keep pulling what it serves, and go
    CRITICAL when it expires, unrenewed."""
    found: list[tuple[str, MapsyncError]] = []
    try:
        here = sorted(p.name for p in mirror.dest.iterdir() if CHANNEL_NAME.match(p.name))
    except OSError:
        return []
    for name in here:
        if name in offered or not (mirror.dest / name / LATEST).is_file():
            continue
        try:
            latest = parse_latest((mirror.dest / name / LATEST).read_bytes(), name)
            serial = f"serial {latest.serial}"
        except (OSError, MapsyncError):
            serial = "a damaged LATEST"
        _log.warning("channel no longer at the source", channel=name, dest=str(mirror.dest))
        found.append(
            (
                name,
                Orphaned(
                    f"{mirror.source} no longer has it; {mirror.dest / name} still serves "
                    f"{serial}, which nobody renews (nodes pulling it go CRITICAL when it "
                    f"expires). Not removed: remove {mirror.dest / name} when no node pulls it"
                ),
            )
        )
    return found


class MirrorFailed(MapsyncError):
    """Some channels could not be mirrored; each keeps serving what it served."""

    def __init__(self, failed: list[tuple[str, MapsyncError]]) -> None:
        self.failed = failed
        self.exit_code = max(exc.exit_code for _, exc in failed)
        super().__init__(
            "\n".join(f"channel {name}: {' '.join(str(exc).split())}" for name, exc in failed)
        )

"""The publisher's repository on disk: what agents pull from.

::

    REPO/<channel>/LATEST                       {"serial": N, "manifest_sha256": "..."}
    REPO/<channel>/releases/<serial>/           MANIFEST.json, MANIFEST.json.sig, text maps
    REPO/<channel>/.staging/                    a release being written; never served
    REPO/.private/<channel>/checked.json        the publisher's last full check
    REPO/.private/<channel>/pushed.json         what each push destination last received
    REPO/.private/<channel>/push.lock           one push of the channel at a time
    REPO/.lock                                  one publisher at a time

A channel directory is what a node's credential reaches (an rsync module, or ``rrsync -ro``
confined to it): the publisher's own notes live outside it, under ``REPO/.private/``, so no
node can list or fetch them however the channel is served (``pushed.json`` names every
node's push destination). Notes an earlier mapsync kept in the channel directory
(``.checked``, ``.pushed.json``, ``.push.lock``) are moved there on first use.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from mapsync import log
from mapsync.access import denied, is_denied
from mapsync.atomic import atomic_write, commit_dir, fsync_dir, remove_tree, scratch_dir
from mapsync.errors import MapsyncError
from mapsync.locks import waiting_lock
from mapsync.release import (
    LATEST,
    MANIFEST,
    MANIFEST_PATCH,
    PATCHES,
    RELEASES,
    SIGNATURE,
    STAGING,
    Latest,
    Manifest,
    check_manifest_size,
    iso,
    manifest_sha256,
    parse_iso,
    parse_latest,
    parse_manifest,
    secrets_beyond,
    serial_names,
    utcnow,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PRIVATE = ".private"
CHECKED = "checked.json"
# Where an earlier mapsync kept each note: in the channel directory, that nodes can reach.
LEGACY = {CHECKED: ".checked", "pushed.json": ".pushed.json", "push.lock": ".push.lock"}
_log = log.get("publisher")


def release_serials(releases: Path) -> list[int]:
    """Serials of the release directories under ``releases``, oldest first. Anything else
    there (a stray file, a name that is no serial, a half-written ``.tmp``) is not a release:
    it is named in a warning and left alone (mapsync never deletes what it did not make)."""
    good, _, stray = serial_names(releases)
    for path in stray:
        _log.warning("not a release, ignored (remove it by hand)", path=str(path))
    return good


def _read_checked(path: Path) -> dict[str, object] | None:
    """The note of the last full check at ``path`` (None: there is none); OSError or
    ValueError when it is damaged."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("fingerprint"), str)
        or not isinstance(data.get("serial"), int)
        or isinstance(data.get("serial"), bool)
    ):
        raise ValueError("not a note with fingerprint, serial and at")
    parse_iso(str(data.get("at")))
    parse_iso(str(data.get("since", data.get("at"))))
    return data


@dataclass(frozen=True)
class Staging:
    """The directory ``path`` (``REPO/<channel>/.staging/<serial>``) where release ``serial``
    of ``channel`` is written; never served, made a release only by :meth:`Repository.commit`."""

    channel: str
    serial: int
    path: Path

    @property
    def patches(self) -> Path:
        """Where the release's patches are staged (made ``patches/<serial>`` on commit)."""
        return self.path.with_name(f"{self.serial}.patches")


class Repository:
    """The release tree under ``root``: its paths, what is published there, and the one way a
    release is staged (:meth:`stage`) and made visible (:meth:`commit`)."""

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = root
        # For a dry run and the commands that only read: nothing is written into the
        # repository (a release is staged in a private temporary directory, no lock file or
        # note is made, no note of an earlier mapsync moved), so a run as another user (root
        # previewing, a monitoring user) leaves nothing the publisher could not write.
        self.read_only = read_only

    def channel(self, name: str) -> Path:
        """The directory of channel ``name``: what its nodes can reach."""
        return self.root / name

    def releases(self, channel: str) -> Path:
        """``REPO/<channel>/releases``: one directory per published release."""
        return self.channel(channel) / RELEASES

    def private(self, channel: str, name: str) -> Path:
        """The publisher's note ``name`` of ``channel``, outside what nodes can reach. Notes an
        earlier mapsync kept in the channel directory are moved there first (all of them)."""
        directory = self.root / PRIVATE / channel
        for note, legacy_name in () if self.read_only else LEGACY.items():
            legacy = self.channel(channel) / legacy_name
            if os.path.lexists(legacy):
                self._move_note(legacy, directory / note)
        return directory / name

    @staticmethod
    def _move_note(legacy: Path, path: Path) -> None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.name.endswith(".lock") or os.path.lexists(path):
                os.unlink(legacy)  # a lock file holds nothing; a newer note wins
            else:
                os.replace(legacy, path)
                fsync_dir(path.parent)
            _log.info("publisher note moved out of the served channel directory", path=str(legacy))
        except OSError as exc:
            _log.warning(
                "publisher note left in the served channel directory (remove it by hand)",
                path=str(legacy),
                error=exc.strerror,
            )

    def release(self, channel: str, serial: int) -> Path:
        """Where release ``serial`` of ``channel`` lives (whether or not it exists)."""
        return self.releases(channel) / str(serial)

    def serials(self, channel: str) -> list[int]:
        """Serials of the complete releases of ``channel``, oldest first."""
        return release_serials(self.releases(channel))

    def next_serial(self, channel: str, last: Manifest | None) -> int:
        """The serial of the next release: above every kept one, LATEST's, and any name a
        stray file already takes in ``releases/`` (the new directory is renamed to it)."""
        good, taken, _ = serial_names(self.releases(channel))
        return max([*good, *taken, last.serial if last else 0]) + 1

    def latest(self, channel: str) -> Latest | None:
        """The LATEST pointer of ``channel`` (None: nothing published); a damaged one raises
        a :class:`MapsyncError` naming the file."""
        path = self.channel(channel) / LATEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MapsyncError(f"{path}: cannot be read: {exc.strerror}") from None
        return parse_latest(data, str(path))

    def current(self, channel: str) -> tuple[Manifest | None, str | None]:
        """(manifest of the release LATEST names, None), for the publisher to build on.

        LATEST is the publisher's own pointer, so a damaged one (garbage, unreadable, naming a
        release that is gone or whose manifest is not the one it names) is repaired, not fatal:
        (manifest of the newest kept release whose manifest reads, reason LATEST is damaged);
        the caller then writes a new release and a new LATEST. No release at all: (None, reason).
        """
        try:
            return self._pointed(channel), None
        except MapsyncError as exc:
            damage = str(exc)
        for serial in reversed(self.serials(channel)):
            try:
                newest = self.manifest(channel, serial)
            except MapsyncError:
                continue
            _log.warning(
                "LATEST is damaged; building on the newest kept release, and the next "
                "release rewrites LATEST",
                channel=channel,
                problem=damage,
                serial=serial,
            )
            return newest, damage
        _log.warning("LATEST is damaged and no release is kept", channel=channel, problem=damage)
        return None, damage

    def _pointed(self, channel: str) -> Manifest | None:
        """The manifest of the release LATEST names (None: no LATEST); a :class:`MapsyncError`
        saying how LATEST is damaged otherwise."""
        path = self.channel(channel) / LATEST
        latest = self.latest(channel)
        if latest is None:
            return None
        release = self.release(channel, latest.serial) / MANIFEST
        try:
            data = release.read_bytes()
        except OSError:
            raise MapsyncError(
                f"{path}: names release {latest.serial}, which is not kept"
            ) from None
        if manifest_sha256(data) != latest.manifest_sha256:
            raise MapsyncError(f"{path}: the sha256 it names is not that of {release}")
        return parse_manifest(data, str(release))

    def settled(self, channel: str) -> tuple[Manifest | None, dict[str, object] | None] | None:
        """(:meth:`current`'s manifest, :meth:`checked`'s note) of ``channel`` when both are
        sound (or absent) and no note of an earlier mapsync is to be moved: what they return
        then, without a word. None otherwise: ask them, and they log what they find."""
        if any(os.path.lexists(self.channel(channel) / legacy) for legacy in LEGACY.values()):
            return None
        try:
            return self._pointed(channel), _read_checked(self.private(channel, CHECKED))
        except (MapsyncError, OSError, ValueError):
            return None

    def manifest(self, channel: str, serial: int) -> Manifest:
        """The parsed (not verified) manifest of release ``serial``; a missing one raises."""
        path = self.release(channel, serial) / MANIFEST
        try:
            return parse_manifest(path.read_bytes(), str(path))
        except OSError:
            raise MapsyncError(f"{path}: release {serial} of channel {channel} not found") from None

    def checked(self, channel: str) -> dict[str, object] | None:
        """The publisher's note of its last full check: fingerprint, serial, time (or None).

        A damaged note (not JSON, wrong fields, a time that does not parse, a directory) is
        "no full check recorded": the next run reads the whole database again, with a warning.
        """
        path = self.private(channel, CHECKED)
        try:
            return _read_checked(path)
        except (OSError, ValueError) as exc:
            _log.warning(
                "damaged note of the last full check ignored; reading the whole database",
                path=str(path),
                problem=getattr(exc, "strerror", None) or str(exc),
            )
            return None

    def record_check(
        self,
        channel: str,
        fingerprint: str,
        serial: int | None,
        *,
        full: bool = True,
        at: datetime | None = None,
    ) -> None:
        """Remember that the database with ``fingerprint`` renders as release ``serial``;
        ``full``: found by reading every row (an incremental run keeps the time of the last
        full read, which says when the next one is due); ``at``: when that read began (now
        if None)."""
        if serial is None:
            return
        path = self.private(channel, CHECKED)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = iso(at or utcnow())
        before = self.checked(channel) or {}
        if not full:
            stamp = str(before.get("at", stamp))
        # When a full read first saw this fingerprint (see Source.stamp_resolution).
        since = stamp
        if before.get("fingerprint") == fingerprint:
            since = str(before.get("since", before.get("at", stamp)))
        note = {"fingerprint": fingerprint, "serial": serial, "at": stamp, "since": since}
        try:
            atomic_write(path, (json.dumps(note, sort_keys=True) + "\n").encode())
        except OSError as exc:
            # Only a shortcut for the next run (which then reads the whole database): the
            # release is published, so this is no reason to fail the run.
            _log.warning("note of the full check not written", path=str(path), error=exc.strerror)

    def latest_manifest(self, channel: str) -> Manifest | None:
        """The parsed manifest of the release LATEST names (None: nothing published)."""
        latest = self.latest(channel)
        return self.manifest(channel, latest.serial) if latest else None

    @contextmanager
    def stage(self, channel: str, last: Manifest | None) -> Iterator[Staging]:
        """A new, empty staging directory for the next release of ``channel`` (built on
        ``last``, see :meth:`next_serial`), removed on leaving, committed or not. A crashed
        run's leftovers are removed first. Hold the repository lock."""
        serial = self.next_serial(channel, last)
        if self.read_only:
            with scratch_dir(Path(tempfile.gettempdir()), f"mapsync-dry-run-{channel}-") as tmp:
                (tmp / str(serial)).mkdir()
                yield Staging(channel, serial, tmp / str(serial))
            return
        self.unstage(channel)  # a crashed run's leftovers
        path = self.channel(channel) / STAGING / str(serial)
        try:
            path.mkdir(parents=True)
            yield Staging(channel, serial, path)
        finally:
            self.unstage(channel)

    def unstage(self, channel: str) -> None:
        """Remove the staging directory of ``channel``, whatever is in it (also after the
        context of :meth:`stage` was lost: a signal as an ExitStack entered it)."""
        if not self.read_only:
            remove_tree(self.channel(channel) / STAGING, ignore_errors=True)

    def commit(
        self,
        staging: Staging,
        manifest: Manifest,
        key: Ed25519PrivateKey,
        *,
        keep: int,
        renewal: bool = False,
    ) -> Manifest:
        """Make ``staging`` a release: sign ``manifest`` (naming its signer), write it and its
        signature beside the maps, rename the fsynced directory into ``releases/``, point
        LATEST at it, then remove all but the newest ``keep`` releases. Returns the manifest
        as signed. A crash at any instant leaves the old LATEST or the new one, each naming a
        complete, signed release. Hold the repository lock."""
        from mapsync.signing import key_id, sign  # cryptography: only a publish loads it

        assert (manifest.channel, manifest.serial) == (staging.channel, staging.serial)
        # The manifest names its signing key, so a node that does not trust it can say which.
        manifest = replace(manifest, signer=key_id(key.public_key()))
        data = manifest.to_bytes()
        # Agents refuse a manifest over MAX_MANIFEST_BYTES: never sign one.
        check_manifest_size(data, f"channel {manifest.channel}")
        (staging.path / MANIFEST).write_bytes(data)
        (staging.path / SIGNATURE).write_bytes(sign(key, data))
        if self._write_manifest_patch(staging, manifest, data):
            # The patches first: a release never names patches that are not there yet.
            patches = self.channel(manifest.channel) / PATCHES
            if patches.is_symlink() or (patches.exists() and not patches.is_dir()):
                raise MapsyncError(
                    f"{patches}: not a directory (it holds the releases' patches); move it "
                    f"away; serial {manifest.serial} not published, LATEST unchanged"
                )
            patches.mkdir(exist_ok=True)
            remove_tree(patches / str(manifest.serial), ignore_errors=True)  # a crash's
            commit_dir(staging.patches, patches / str(manifest.serial))
        releases = self.releases(manifest.channel)
        releases.mkdir(parents=True, exist_ok=True)
        commit_dir(staging.path, releases / str(manifest.serial))
        atomic_write(
            self.channel(manifest.channel) / LATEST,
            Latest(manifest.serial, manifest_sha256(data)).to_bytes(),
        )
        removed = self.collect_garbage(manifest.channel, keep, carried=set(manifest.maps))
        _log.info(
            "renewed release" if renewal else "published release",
            channel=manifest.channel,
            serial=manifest.serial,
            expires=manifest.expires,
            **({"removed": removed} if removed else {}),
        )
        return manifest

    def _write_manifest_patch(self, staging: Staging, manifest: Manifest, data: bytes) -> bool:
        """Stage the patch of manifest bytes ``data`` from the previous release's manifest,
        where that is still here (what a node holding it fetches instead of the manifest);
        True if the release has patches to commit (this one or its maps')."""
        from mapsync.release.manifest_patch import make_manifest_patch

        if manifest.previous is not None:
            try:
                old = (self.release(manifest.channel, manifest.previous) / MANIFEST).read_bytes()
            except OSError:
                old = b""  # pruned, or never here: nodes fetch the manifest itself
            patch = make_manifest_patch(old, data, manifest.previous) if old else None
            if patch is not None:
                staging.patches.mkdir(exist_ok=True)
                (staging.patches / MANIFEST_PATCH).write_bytes(patch)
        return staging.patches.is_dir()

    @contextmanager
    def lock(self, wait: float = 30.0) -> Iterator[None]:
        """Hold the repository lock; wait up to ``wait`` seconds for another publisher."""
        if not self.read_only:
            self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / ".lock"
        busy = f"{self.root}: another publisher is running (on {lock})"
        with waiting_lock(lock, wait, busy, create=not self.read_only):
            yield

    def collect_garbage(
        self, channel: str, keep: int, *, carried: set[str] | None = None
    ) -> list[int]:
        """Remove all but the newest ``keep`` releases; never the one LATEST names.

        ``carried``: the maps of the release LATEST names (the channel's maps now). Any other
        release holding a map with password hashes that is not among them is removed too,
        however new: the channel no longer carries those hashes, yet every node it is served
        to could still fetch them from ``releases/<serial>/`` (a ``dovecot_users`` put into
        the MX channel by mistake, then taken out)."""
        try:
            latest = self.latest(channel)
        except MapsyncError as exc:
            _log.warning("LATEST unreadable: no release removed", channel=channel, problem=str(exc))
            return []
        serials = self.serials(channel)
        doomed = set(serials[:-keep] if keep < len(serials) else [])
        secret: dict[int, list[str]] = {}
        if carried is not None and latest is not None:
            secret = dict(self._secrets_left(channel, serials, latest.serial, carried))
            doomed.update(secret)
        removed = []
        for serial in sorted(doomed):
            if latest and serial >= latest.serial:
                continue
            try:
                remove_tree(self.release(channel, serial))
            except OSError as exc:
                # LATEST has moved: the release is published; an old one left behind costs
                # only disk, so this is a warning for the operator, never a failed publish.
                _log.warning(
                    "old release not removed",
                    channel=channel,
                    serial=serial,
                    problem=denied(Path(exc.filename or self.release(channel, serial)))
                    if is_denied(exc)
                    else f"{exc.filename}: {exc.strerror}",
                )
                continue
            removed.append(serial)
            if serial in secret:
                _log.warning(
                    "removed a release carrying password hashes the channel no longer "
                    "carries (its nodes could still fetch them)",
                    channel=channel,
                    serial=serial,
                    maps=",".join(secret[serial]),
                )
        self._prune_patches(channel)
        return removed

    def _secrets_left(
        self, channel: str, serials: list[int], latest: int, carried: set[str]
    ) -> Iterator[tuple[int, list[str]]]:
        """(serial, its maps with password hashes not in ``carried``) of each release before
        ``latest`` that holds any. A manifest that does not read is left to the count."""
        for serial in serials:
            if serial >= latest:
                continue
            try:
                old = self.manifest(channel, serial)
            except MapsyncError:
                continue
            secret = secrets_beyond(old, carried)
            if secret:
                yield serial, secret

    def _prune_patches(self, channel: str) -> None:
        """Remove ``patches/<serial>`` of every release no longer kept (or never committed)."""
        kept = set(self.serials(channel))
        try:
            good, _, _ = serial_names(self.channel(channel) / PATCHES)
        except MapsyncError as exc:  # after LATEST moved: the release is out, say so and go on
            _log.warning("old patches not removed", channel=channel, error=str(exc))
            return
        for serial in good:
            if serial not in kept:
                remove_tree(self.channel(channel) / PATCHES / str(serial), ignore_errors=True)

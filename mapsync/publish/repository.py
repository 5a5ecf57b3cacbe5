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
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mapsync import log
from mapsync.access import denied, is_denied
from mapsync.atomic import atomic_write, fsync_dir
from mapsync.errors import MapsyncError
from mapsync.locks import waiting_lock
from mapsync.release import (
    LATEST,
    MANIFEST,
    RELEASES,
    Latest,
    Manifest,
    iso,
    manifest_sha256,
    parse_iso,
    parse_latest,
    parse_manifest,
    utcnow,
)

PRIVATE = ".private"
CHECKED = "checked.json"
# Where an earlier mapsync kept each note: in the channel directory, that nodes can reach.
LEGACY = {CHECKED: ".checked", "pushed.json": ".pushed.json", "push.lock": ".push.lock"}
_log = log.get("publisher")
# A release directory's name: the serial in ASCII digits, as str(serial) writes it. Not
# str.isdigit, which takes '٣' and '²' (int() refuses the second, and the first is not the
# directory str(3) names), nor '007', which is not where release 7 lives.
_SERIAL = re.compile(r"[1-9][0-9]{0,17}\Z")


def serial_names(releases: Path) -> tuple[list[int], list[int], list[Path]]:
    """The entries of a ``releases`` directory: (serials of release directories, oldest first;
    serials taken by a non-directory; paths that are no release). Missing: all empty."""
    try:
        entries = list(os.scandir(releases))
    except FileNotFoundError:
        return [], [], []
    except NotADirectoryError:
        raise MapsyncError(f"{releases}: not a directory (it should hold the releases)") from None
    good, taken, stray = [], [], []
    for e in entries:
        if _SERIAL.match(e.name):
            if e.is_dir(follow_symlinks=False):
                good.append(int(e.name))
                continue
            taken.append(int(e.name))
        stray.append(releases / e.name)
    return sorted(good), sorted(taken), sorted(stray)


def release_serials(releases: Path) -> list[int]:
    """Serials of the release directories under ``releases``, oldest first. Anything else
    there (a stray file, a name that is no serial, a half-written ``.tmp``) is not a release:
    it is named in a warning and left alone (mapsync never deletes what it did not make)."""
    good, _, stray = serial_names(releases)
    for path in stray:
        _log.warning("not a release, ignored (remove it by hand)", path=str(path))
    return good


class Repository:
    """Paths and read access to the release tree under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def channel(self, name: str) -> Path:
        return self.root / name

    def releases(self, channel: str) -> Path:
        return self.channel(channel) / RELEASES

    def private(self, channel: str, name: str) -> Path:
        """The publisher's note ``name`` of ``channel``, outside what nodes can reach. Notes an
        earlier mapsync kept in the channel directory are moved there first (all of them)."""
        directory = self.root / PRIVATE / channel
        for note, legacy_name in LEGACY.items():
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
        path = self.channel(channel) / LATEST
        try:
            latest = self.latest(channel)
            if latest is None:
                return None, None
            release = self.release(channel, latest.serial) / MANIFEST
            try:
                data = release.read_bytes()
            except OSError:
                raise MapsyncError(
                    f"{path}: names release {latest.serial}, which is not kept"
                ) from None
            if manifest_sha256(data) != latest.manifest_sha256:
                raise MapsyncError(f"{path}: the sha256 it names is not that of {release}")
            return parse_manifest(data, str(release)), None
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

    def manifest(self, channel: str, serial: int) -> Manifest:
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
            data = json.loads(path.read_bytes())
            if (
                not isinstance(data, dict)
                or not isinstance(data.get("fingerprint"), str)
                or not isinstance(data.get("serial"), int)
                or isinstance(data.get("serial"), bool)
            ):
                raise ValueError("not a note with fingerprint, serial and at")
            parse_iso(str(data.get("at")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            _log.warning(
                "damaged note of the last full check ignored; reading the whole database",
                path=str(path),
                problem=getattr(exc, "strerror", None) or str(exc),
            )
            return None
        return data

    def record_check(self, channel: str, fingerprint: str, serial: int | None) -> None:
        """Remember that the database with ``fingerprint`` renders as release ``serial``."""
        if serial is None:
            return
        path = self.private(channel, CHECKED)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        note = {"fingerprint": fingerprint, "serial": serial, "at": iso(utcnow())}
        try:
            atomic_write(path, (json.dumps(note, sort_keys=True) + "\n").encode())
        except OSError as exc:
            # Only a shortcut for the next run (which then reads the whole database): the
            # release is published, so this is no reason to fail the run.
            _log.warning("note of the full check not written", path=str(path), error=exc.strerror)

    def latest_manifest(self, channel: str) -> Manifest | None:
        latest = self.latest(channel)
        return self.manifest(channel, latest.serial) if latest else None

    @contextmanager
    def lock(self, wait: float = 30.0) -> Iterator[None]:
        """Hold the repository lock; wait up to ``wait`` seconds for another publisher."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / ".lock"
        with waiting_lock(lock, wait, f"{self.root}: another publisher is running (on {lock})"):
            yield

    def collect_garbage(self, channel: str, keep: int) -> list[int]:
        """Remove all but the newest ``keep`` releases; never the one LATEST names."""
        try:
            latest = self.latest(channel)
        except MapsyncError as exc:
            _log.warning("LATEST unreadable: no release removed", channel=channel, problem=str(exc))
            return []
        serials = self.serials(channel)
        removed = []
        for serial in serials[:-keep] if keep < len(serials) else []:
            if latest and serial >= latest.serial:
                continue
            try:
                shutil.rmtree(self.release(channel, serial))
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
        return removed

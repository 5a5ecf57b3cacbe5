"""The publisher's repository on disk: what agents pull from.

::

    REPO/<channel>/LATEST                       {"serial": N, "manifest_sha256": "..."}
    REPO/<channel>/releases/<serial>/           MANIFEST.json, MANIFEST.json.sig, text maps
    REPO/<channel>/.staging/                    a release being written; never served
    REPO/<channel>/.checked                     the publisher's last full check (not served)
    REPO/.lock                                  one publisher at a time
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mapsync.atomic import atomic_write
from mapsync.errors import MapsyncError
from mapsync.locks import waiting_lock
from mapsync.release import (
    LATEST,
    MANIFEST,
    Latest,
    Manifest,
    iso,
    parse_latest,
    parse_manifest,
    utcnow,
)

CHECKED = ".checked"


class Repository:
    """Paths and read access to the release tree under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def channel(self, name: str) -> Path:
        return self.root / name

    def releases(self, channel: str) -> Path:
        return self.channel(channel) / "releases"

    def release(self, channel: str, serial: int) -> Path:
        return self.releases(channel) / str(serial)

    def serials(self, channel: str) -> list[int]:
        """Serials of the complete releases of ``channel``, oldest first."""
        try:
            names = os.listdir(self.releases(channel))
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def latest(self, channel: str) -> Latest | None:
        path = self.channel(channel) / LATEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return parse_latest(data, str(path))

    def manifest(self, channel: str, serial: int) -> Manifest:
        path = self.release(channel, serial) / MANIFEST
        try:
            return parse_manifest(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise MapsyncError(f"{path}: release {serial} of channel {channel} not found") from None

    def checked(self, channel: str) -> dict[str, object] | None:
        """The publisher's note of its last full check: fingerprint, serial, time (or None)."""
        try:
            data = json.loads((self.channel(channel) / CHECKED).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) and "at" in data else None

    def record_check(self, channel: str, fingerprint: str, serial: int | None) -> None:
        """Remember that the database with ``fingerprint`` renders as release ``serial``."""
        if serial is None:
            return
        path = self.channel(channel) / CHECKED
        path.parent.mkdir(parents=True, exist_ok=True)
        note = {"fingerprint": fingerprint, "serial": serial, "at": iso(utcnow())}
        atomic_write(path, (json.dumps(note, sort_keys=True) + "\n").encode())

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
        latest = self.latest(channel)
        serials = self.serials(channel)
        removed = []
        for serial in serials[:-keep] if keep < len(serials) else []:
            if latest and serial >= latest.serial:
                continue
            shutil.rmtree(self.release(channel, serial))
            removed.append(serial)
        return removed

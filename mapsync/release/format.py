"""The release format, shared by publisher and agent (specified in docs/release-format.md).

``REPO/<channel>/LATEST`` is a tiny JSON pointer (serial, manifest sha256);
``REPO/<channel>/releases/<serial>/`` holds ``MANIFEST.json``, ``MANIFEST.json.sig`` and the
text maps; ``REPO/<channel>/.staging/`` a release being written (never served). The manifest
is the unit of trust: the agent believes nothing it does not list. Parsing here checks form
only; a manifest is trusted once :func:`mapsync.release.verify.verify_release` has checked its
signature.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mapsync.errors import MapsyncError, VerificationError

FORMAT = 1
MANIFEST = "MANIFEST.json"
SIGNATURE = "MANIFEST.json.sig"
LATEST = "LATEST"
RELEASES = "releases"  # REPO/<channel>/releases/<serial>/: the published releases
STAGING = ".staging"  # REPO/<channel>/.staging/: a release being written, never served
# REPO/<channel>/patches/<serial>/: the patches release <serial> names (outside its release
# directory, which agents of earlier versions require to hold exactly the manifest's files).
PATCHES = "patches"
MAX_LATEST_BYTES = 4096
MAX_MANIFEST_BYTES = 1 << 20
# A map file name inside a release: no '/', no '..', no leading dot.
FILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")


def release_dir(serial: int) -> str:
    """Where release ``serial`` lives, relative to its channel directory."""
    return f"{RELEASES}/{serial}"


def patch_dir(serial: int) -> str:
    """Where the patches of release ``serial`` live, relative to its channel directory."""
    return f"{PATCHES}/{serial}"


# In patch_dir: the patch of the release's manifest from the previous release's
# (mapsync.release.manifest_patch); no map file can be named so (FILE_NAME).
MANIFEST_PATCH = "MANIFEST.json.patch"


def patch_file(map_file: str) -> str:
    """The name of the patch of text map ``map_file`` in :func:`patch_dir`."""
    return f"{map_file}.patch"


# A release directory's name: the serial in ASCII digits, as str(serial) writes it. Not
# str.isdigit, which takes '٣' and '²' (int() refuses the second, and the first is not the
# directory str(3) names), nor '007', which is not where release 7 lives.
SERIAL_NAME = re.compile(r"[1-9][0-9]{0,17}\Z")


def is_serial_name(name: str) -> bool:
    """Whether ``name`` is what :func:`release_dir` names a release directory (``12``, not
    ``012``)."""
    return SERIAL_NAME.match(name) is not None


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
        if is_serial_name(e.name):
            if e.is_dir(follow_symlinks=False):
                good.append(int(e.name))
                continue
            taken.append(int(e.name))
        stray.append(releases / e.name)
    return sorted(good), sorted(taken), sorted(stray)


def utcnow() -> datetime:
    """Now, in UTC, to the second (the precision of the manifest's timestamps)."""
    return datetime.now(UTC).replace(microsecond=0)


def iso(t: datetime) -> str:
    """``t`` as the manifest writes a time: UTC, ``YYYY-MM-DDTHH:MM:SSZ``."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_ISO = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")


def parse_iso(text: str) -> datetime:
    """A time written by :func:`iso`; ValueError for anything else. (Not strptime: its
    first call imports _strptime, calendar and locale, 5 ms of every agent run.)"""
    m = _ISO.fullmatch(text)
    if m is None:
        raise ValueError(f"time data {text!r} does not match format '%Y-%m-%dT%H:%M:%SZ'")
    year, month, day, hour, minute, second = map(int, m.groups())
    # ValueError for month 13, hour 24, ... as strptime.
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@dataclass(frozen=True)
class CdbInfo:
    """The canonical cdb of a map, which the agent builds from the text and must match."""

    file: str
    sha256: str
    size: int


# The separators a map of the operator's own may have (config.MAP_SEPARATORS is this list;
# the agent checks a manifest against it, without the publisher's config).
SEPARATORS = (" ", "\t", ":")


@dataclass(frozen=True)
class CustomInfo:
    """What a node needs to install a map of the operator's own (``[publisher.maps.NAME]``)
    without the publisher's config: the separator its text lines split at (to build the cdb
    from them, and for diffs) and whether it is handled like password hashes (mode 0640)."""

    separator: str = " "
    secret: bool = False


@dataclass(frozen=True)
class MapEntry:
    """One map of a release: its text file and, for key/value maps, its canonical cdb."""

    file: str
    entries: int
    sha256: str
    size: int
    content_sha256: str
    cdb: CdbInfo | None = None
    forced: bool = False
    custom: CustomInfo | None = None  # a map of the operator's own; None: a built-in map

    def installed_files(self) -> list[tuple[str, str, int]]:
        """(file name, sha256, size) of each file this map installs: its text, then its cdb."""
        files = [(self.file, self.sha256, self.size)]
        if self.cdb is not None:
            files.append((self.cdb.file, self.cdb.sha256, self.cdb.size))
        return files

    def same_content(self, other: MapEntry | None) -> bool:
        """Whether ``other`` serves the same lines, split and built the same way."""
        return (
            other is not None
            and other.content_sha256 == self.content_sha256
            and other.custom == self.custom
            and (other.cdb is None) == (self.cdb is None)  # a map's cdb switched on or off
        )


def same_maps(
    a: Mapping[str, MapEntry], b: Mapping[str, MapEntry], *, identical: bool = False
) -> bool:
    """Whether the maps ``a`` and ``b`` of two releases serve the same: the same map names,
    each with the same content (:meth:`MapEntry.same_content`). With ``identical``, also the
    same files byte for byte (entries equal but for ``forced``), as a renewal that keeps the
    live files needs. (A publisher ships an unchanged map's previous file, so the releases it
    renews are identical.)"""
    if set(a) != set(b):
        return False
    if identical:
        return all(b[n] == replace(e, forced=b[n].forced) for n, e in a.items())
    return all(e.same_content(b[n]) for n, e in a.items())


@dataclass(frozen=True)
class PatchInfo:
    """The patch that turns a map's text of serial ``base`` into this release's
    (docs/release-format.md, "Patches"): its file in :func:`patch_dir`, sha256 and size."""

    base: int  # "from" in the manifest
    file: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What one release of a channel holds (MANIFEST.json): its serial, expiry, source and
    every map's file and hashes. Parsed from bytes it is only well-formed; trusted once a
    :class:`~mapsync.release.verify.VerifiedRelease` carries it."""

    channel: str
    serial: int
    previous: int | None
    created: str
    expires: str
    generator: str
    source: dict[str, str]
    maps: dict[str, MapEntry]
    format: int = FORMAT
    skipped: list[str] = field(default_factory=list)
    # Maps the previous release had and this one lacks (dropped from the channel with --force).
    dropped: list[str] = field(default_factory=list)
    # The id of the key that signed it (set when signing; unverified until the signature is).
    signer: str | None = None
    # Per changed map, the patch from an earlier serial's text (additive: absent when empty).
    patches: dict[str, PatchInfo] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The manifest file's exact bytes (what is signed)."""
        data = asdict(self)
        for entry in data["maps"].values():
            if entry["custom"] is None:  # additive: a built-in map's entry is as before
                del entry["custom"]
        if self.patches:
            data["patches"] = {
                name: {"from": p.base, "file": p.file, "sha256": p.sha256, "size": p.size}
                for name, p in self.patches.items()
            }
        else:
            del data["patches"]
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    def files(self) -> set[str]:
        """Every file the release directory holds besides the manifest and its signature."""
        return {m.file for m in self.maps.values()}

    def expires_at(self) -> datetime:
        """``expires`` as a time: nothing installs the release from then on."""
        return parse_iso(self.expires)

    def expired(self, now: datetime | None = None) -> bool:
        """Whether the release has expired at ``now`` (default: this instant), so nothing
        installs it."""
        return self.expires_at() <= (now if now is not None else datetime.now(UTC))

    def created_at(self) -> datetime:
        """``created`` as a time."""
        return parse_iso(self.created)


@dataclass(frozen=True)
class Latest:
    """The pointer ``LATEST``: the channel's current serial and the sha256 of its manifest."""

    serial: int
    manifest_sha256: str

    def to_bytes(self) -> bytes:
        """The exact bytes of the ``LATEST`` file."""
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()


def manifest_sha256(data: bytes) -> str:
    """The sha256 of manifest bytes, as ``LATEST`` names it."""
    return hashlib.sha256(data).hexdigest()


def _req(data: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise VerificationError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise VerificationError(f"{where}: field {key!r} has the wrong type")
    return value


def _hexdigest(value: str, where: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise VerificationError(f"{where}: not a sha256 hex digest")
    return value


def _json_object(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{where}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise VerificationError(f"{where}: not a JSON object")
    return obj


def check_manifest_size(data: bytes, where: str) -> None:
    """Refuse manifest bytes agents would refuse for their size (before they are signed)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise MapsyncError(
            f"{where}: the manifest would be {len(data)} bytes, more than the "
            f"{MAX_MANIFEST_BYTES} bytes agents accept; nothing was published"
        )


def parse_latest(data: bytes, where: str) -> Latest:
    """Parse a LATEST pointer, refusing anything odd."""
    if len(data) > MAX_LATEST_BYTES:
        raise VerificationError(f"{where}: {len(data)} bytes, a LATEST pointer is tiny")
    obj = _json_object(data, where)
    serial = _req(obj, "serial", int, where)
    if serial < 1:
        raise VerificationError(f"{where}: serial must be positive")
    return Latest(
        serial, _hexdigest(_req(obj, "manifest_sha256", str, where), f"{where}: manifest_sha256")
    )


def _signer(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{16}", value):
        raise VerificationError(f"{where}: field 'signer' is not a key id")
    return value


def _patches(obj: dict[str, Any], maps: dict[str, MapEntry], where: str) -> dict[str, PatchInfo]:
    """The manifest's ``patches`` (absent: none), each for one of its maps."""
    raw = obj.get("patches")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise VerificationError(f"{where}: field 'patches' has the wrong type")
    patches: dict[str, PatchInfo] = {}
    for name, p in raw.items():
        pw = f"{where}: patch of map {name!r}"
        if name not in maps or not isinstance(p, dict):
            raise VerificationError(f"{pw}: not a map of this release, or not an object")
        file = _req(p, "file", str, pw)
        if file != patch_file(maps[name].file):
            raise VerificationError(f"{pw}: file {file!r} is not {patch_file(maps[name].file)}")
        base, size = _req(p, "from", int, pw), _req(p, "size", int, pw)
        if base < 1 or size < 0:
            raise VerificationError(f"{pw}: 'from' or 'size' out of range")
        patches[name] = PatchInfo(base, file, _hexdigest(_req(p, "sha256", str, pw), pw), size)
    return patches


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse manifest bytes whose signature has already been verified; check every field."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise VerificationError(f"{where}: {len(data)} bytes is too large for a manifest")
    obj = _json_object(data, where)
    fmt = _req(obj, "format", int, where)
    if fmt != FORMAT:
        raise VerificationError(
            f"{where}: format {fmt} is not supported (this mapsync reads {FORMAT})"
        )
    maps: dict[str, MapEntry] = {}
    for name, m in _req(obj, "maps", dict, where).items():
        mw = f"{where}: map {name!r}"
        if not isinstance(m, dict) or not FILE_NAME.match(name):
            raise VerificationError(f"{mw}: bad map entry")
        file = _req(m, "file", str, mw)
        if not FILE_NAME.match(file):
            raise VerificationError(f"{mw}: file name {file!r} is not allowed")
        cdb = None
        if m.get("cdb") is not None:
            c = _req(m, "cdb", dict, mw)
            cfile = _req(c, "file", str, mw)
            if cfile != f"{file}.cdb":
                raise VerificationError(f"{mw}: cdb file name {cfile!r} is not {file}.cdb")
            cdb = CdbInfo(
                cfile, _hexdigest(_req(c, "sha256", str, mw), mw), _req(c, "size", int, mw)
            )
        custom = None
        if m.get("custom") is not None:
            c = _req(m, "custom", dict, mw)
            separator = _req(c, "separator", str, mw)
            if separator not in SEPARATORS:
                raise VerificationError(f"{mw}: separator {separator!r} is not allowed")
            secret = _req(c, "secret", bool, mw)
            if file != name:
                raise VerificationError(f"{mw}: file name {file!r} is not the map's name")
            custom = CustomInfo(separator, secret)
        maps[name] = MapEntry(
            file=file,
            entries=_req(m, "entries", int, mw),
            sha256=_hexdigest(_req(m, "sha256", str, mw), mw),
            size=_req(m, "size", int, mw),
            content_sha256=_hexdigest(_req(m, "content_sha256", str, mw), mw),
            cdb=cdb,
            forced=bool(m.get("forced", False)),
            custom=custom,
        )
    files = [m.file for m in maps.values()]
    if len(set(files)) != len(files):
        raise VerificationError(f"{where}: two maps name the same file")
    patches = _patches(obj, maps, where)
    previous = obj.get("previous")
    if previous is not None and (not isinstance(previous, int) or isinstance(previous, bool)):
        raise VerificationError(f"{where}: field 'previous' has the wrong type")
    manifest = Manifest(
        channel=_req(obj, "channel", str, where),
        serial=_req(obj, "serial", int, where),
        previous=previous,
        created=_req(obj, "created", str, where),
        expires=_req(obj, "expires", str, where),
        generator=_req(obj, "generator", str, where),
        source={str(k): str(v) for k, v in _req(obj, "source", dict, where).items()},
        maps=maps,
        format=fmt,
        skipped=[str(s) for s in obj.get("skipped", [])],
        dropped=[str(s) for s in obj.get("dropped", [])],
        signer=_signer(obj.get("signer"), where),
        patches=patches,
    )
    for name, p in patches.items():
        if p.base >= manifest.serial:
            raise VerificationError(
                f"{where}: patch of map {name!r} is from serial {p.base}, not an earlier one"
            )
    try:
        manifest.expires_at()
        manifest.created_at()
    except ValueError:
        raise VerificationError(f"{where}: created/expires are not UTC timestamps") from None
    return manifest

"""``mapsync history`` and ``mapsync diff`` over a directory of releases.

The same functions read the publisher's repository (``REPO/<channel>/releases``) and an
agent's kept releases (``STATE/<channel>/releases``, for ``--agent``): both hold one
``<serial>/`` directory per release with its manifest and text maps. Read-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mapsync import log
from mapsync.errors import MapsyncError, VerificationError
from mapsync.formats import text
from mapsync.publish.plan import merge_diff
from mapsync.publish.repository import Repository, release_serials
from mapsync.release import (
    MANIFEST,
    Manifest,
    MapEntry,
    is_secret,
    parse_manifest,
    separator,
)

_log = log.get("history")


@dataclass(frozen=True)
class HistoryEntry:
    """One kept release as ``mapsync history`` lists it."""

    serial: int
    created: str
    expires: str
    entries: dict[str, int]
    changed: list[str]  # maps whose content differs from the previous kept release
    forced: list[str]
    latest: bool
    dropped: list[str] = field(default_factory=list)  # maps the previous release had, not this
    installed: bool = False  # the release installed on this node (``history --agent``)


def serials_in(releases: Path) -> list[int]:
    """Serials of the release directories under ``releases``, oldest first (anything else
    there is named in a warning and ignored)."""
    return release_serials(releases)


def manifest_in(releases: Path, serial: int, channel: str) -> Manifest:
    """The parsed manifest of release ``serial`` of ``channel`` under ``releases``
    (VerificationError if it cannot be read, or is another release's: a copy put there by
    hand, another channel's)."""
    path = releases / str(serial) / MANIFEST
    try:
        m = parse_manifest(path.read_bytes(), str(path))
    except OSError as exc:
        raise VerificationError(
            f"{path}: cannot be read ({exc.strerror}): release {serial} is damaged"
        ) from None
    if (m.channel, m.serial) != (channel, serial):
        raise VerificationError(
            f"{path}: is release {m.serial} of channel {m.channel!r}, not release {serial} of "
            f"{channel!r}"
        )
    return m


def _checked(path: Path, entry: MapEntry) -> Path:
    """``path``, the text file of map ``entry``, if it has the manifest's sha256 and size
    (VerificationError naming it if not: a diff would show its content as the release's)."""
    try:
        digest, size = text.sha256_file(path)
    except OSError as exc:
        raise VerificationError(f"{path}: cannot be read ({exc.strerror})") from None
    if (digest, size) != (entry.sha256, entry.size):
        raise VerificationError(
            f"{path}: sha256 {digest[:16]}… size {size} does not match the manifest "
            f"({entry.sha256[:16]}… size {entry.size}); the file was altered"
        )
    return path


def history_of(
    releases: Path, channel: str, latest: int | None = None, installed: int | None = None
) -> list[HistoryEntry]:
    """Every release of ``channel`` under ``releases``, oldest first; ``latest`` and
    ``installed`` mark one. One whose manifest cannot be read, or is another release's, is
    left out, named in a warning: the others are still worth listing (a damaged kept copy on
    a node, a release half-removed or copied by hand)."""
    out = []
    previous = None
    for serial in serials_in(releases):
        try:
            m = manifest_in(releases, serial, channel)
        except MapsyncError as exc:
            _log.warning(
                "release not listed: its manifest cannot be read or is another release's",
                problem=str(exc),
            )
            continue
        changed = [
            name
            for name, entry in sorted(m.maps.items())
            if previous is None or not entry.same_content(previous.maps.get(name))
        ]
        out.append(
            HistoryEntry(
                serial=serial,
                created=m.created,
                expires=m.expires,
                entries={n: e.entries for n, e in sorted(m.maps.items())},
                changed=changed,
                forced=[n for n, e in sorted(m.maps.items()) if e.forced],
                latest=latest == serial,
                installed=installed == serial,
                dropped=list(m.dropped),
            )
        )
        previous = m
    return out


def history(repo: Repository, channel: str) -> list[HistoryEntry]:
    """Every kept release of ``channel`` in the publisher's repository, oldest first."""
    return history_of(repo.releases(channel), channel, latest_or_none(repo, channel))


def latest_or_none(repo: Repository, channel: str) -> int | None:
    """The serial LATEST names, for marking it; a damaged LATEST marks none, with a warning
    (the next publish repairs it)."""
    try:
        latest = repo.latest(channel)
    except MapsyncError as exc:
        _log.warning("LATEST is damaged; no release marked as LATEST", problem=str(exc))
        return None
    return latest.serial if latest else None


# The fields after the user name of a passwd-file line (``dovecot_users``, ``dovecot_proxy``).
PASSWD_FIELDS = ("password", "uid", "gid", "gecos", "home", "shell", "extra fields")


@dataclass
class MapDiff:
    """The keys of one map that differ between two releases, with their values where the map
    carries no secret.

    ``values``: key → (old value, new value) (None on the side where the key is absent) for a
    map without secrets. ``fields``: for a passwd-file map, which fields of each changed key
    differ; ``field_values`` the old and new value of each such field that is not the
    password (a hash is never shown, only that it changed)."""

    name: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)
    values: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    field_values: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)


def changed_fields(old: str, new: str) -> dict[str, tuple[str, str]]:
    """The passwd-file fields that differ between two values of one user: name → (old, new)."""
    a, b = old.split(":", 6), new.split(":", 6)
    width = max(len(a), len(b))
    a += [""] * (width - len(a))
    b += [""] * (width - len(b))
    return {
        PASSWD_FIELDS[i] if i < len(PASSWD_FIELDS) else f"field {i + 2}": (a[i], b[i])
        for i in range(width)
        if a[i] != b[i]
    }


def diff_releases(releases: Path, channel: str, a: int, b: int) -> list[MapDiff]:
    """Per map, the keys added, removed and changed from release ``a`` to release ``b``."""
    kept = serials_in(releases)
    for serial in (a, b):
        if serial not in kept:
            raise MapsyncError(
                f"channel {channel}: release {serial} is not kept (kept: {', '.join(map(str, kept)) or 'none'})"
            )
    ma, mb = manifest_in(releases, a, channel), manifest_in(releases, b, channel)
    out = []
    for name in sorted(set(ma.maps) | set(mb.maps)):
        d = MapDiff(name)
        ea, eb = ma.maps.get(name), mb.maps.get(name)
        if ea is not None and eb is not None and ea.same_content(eb):
            out.append(d)
            continue
        # Split lines as the map's daemon does: a passwd-file's user name ends at ':' (split at
        # the first space, a whole line with its hash would be the "key").
        entry = eb or ea
        assert entry is not None  # the name is in one of the two
        sep = separator(name, entry)
        # Which passwd-file field changed: Dovecot's maps; a map of the operator's own with
        # ':' between key and value has no fields mapsync knows.
        passwd = sep == ":" and entry.custom is None
        # Secret in either release: a map of the operator's own whose `secret` was since
        # turned off must not show the values it had while secret (nor the reverse).
        secret = is_secret(name, ea) or is_secret(name, eb)
        old = text.keyed(_checked(releases / str(a) / ea.file, ea), sep) if ea else iter(())
        new = text.keyed(_checked(releases / str(b) / eb.file, eb), sep) if eb else iter(())
        for kind, key, old_value, new_value in merge_diff(old, new):
            getattr(d, kind).append(key)
            if kind == "changed" and passwd:
                fields = changed_fields(old_value or "", new_value or "")
                d.fields[key] = list(fields)
                shown = {f: v for f, v in fields.items() if f != "password"}
                if shown:
                    d.field_values[key] = shown
            elif not secret:
                d.values[key] = (old_value, new_value)
        out.append(d)
    return out


def diff(repo: Repository, channel: str, a: int, b: int) -> list[MapDiff]:
    """:func:`diff_releases` over the publisher's repository."""
    return diff_releases(repo.releases(channel), channel, a, b)

"""``mapsync history`` and ``mapsync diff`` over the releases kept in the repository."""

from __future__ import annotations

from dataclasses import dataclass, field

from mapsync.errors import MapsyncError
from mapsync.formats import text
from mapsync.publish.plan import merge_diff
from mapsync.publish.repository import Repository


@dataclass(frozen=True)
class HistoryEntry:
    serial: int
    created: str
    expires: str
    entries: dict[str, int]
    changed: list[str]  # maps whose content differs from the previous kept release
    forced: list[str]
    latest: bool


def history(repo: Repository, channel: str) -> list[HistoryEntry]:
    """Every kept release of ``channel``, oldest first."""
    latest = repo.latest(channel)
    out = []
    previous = None
    for serial in repo.serials(channel):
        m = repo.manifest(channel, serial)
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
                latest=latest is not None and latest.serial == serial,
            )
        )
        previous = m
    return out


@dataclass
class MapDiff:
    name: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


def diff(repo: Repository, channel: str, a: int, b: int) -> list[MapDiff]:
    """Per map, the keys added, removed and changed from release ``a`` to release ``b``."""
    kept = repo.serials(channel)
    for serial in (a, b):
        if serial not in kept:
            raise MapsyncError(
                f"channel {channel}: release {serial} is not kept (kept: {', '.join(map(str, kept)) or 'none'})"
            )
    ma, mb = repo.manifest(channel, a), repo.manifest(channel, b)
    out = []
    for name in sorted(set(ma.maps) | set(mb.maps)):
        d = MapDiff(name)
        ea, eb = ma.maps.get(name), mb.maps.get(name)
        if ea is not None and eb is not None and ea.same_content(eb):
            out.append(d)
            continue
        old = text.keyed(repo.release(channel, a) / ea.file) if ea else iter(())
        new = text.keyed(repo.release(channel, b) / eb.file) if eb else iter(())
        for kind, key, _, _ in merge_diff(old, new):
            getattr(d, kind).append(key)
        out.append(d)
    return out

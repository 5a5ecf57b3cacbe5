"""The map catalogue: every map a channel may list, by name."""

from __future__ import annotations

from mapsync.maps.base import Map
from mapsync.maps.directory import Directory
from mapsync.maps.dovecot import (
    DovecotDenyMap,
    DovecotProxyMap,
    DovecotSubmissionMap,
    DovecotUsersMap,
)
from mapsync.maps.exim import EximRoutesMap
from mapsync.maps.postfix import DomainsMap, RecipientsMap, SendersMap, TransportMap, VirtualMap
from mapsync.release import MapEntry

CATALOGUE: dict[str, Map] = {
    m.name: m
    for m in (
        DomainsMap(),
        RecipientsMap(),
        VirtualMap(),
        TransportMap(),
        SendersMap(),
        EximRoutesMap(),
        DovecotUsersMap(),
        DovecotProxyMap(),
        DovecotDenyMap(),
        DovecotSubmissionMap(),
    )
}


def separator(name: str, entry: MapEntry | None = None) -> str:
    """Where a line of map ``name`` splits into key and value: a map of the operator's own
    says so in its manifest ``entry``; a built-in map in the catalogue."""
    if entry is not None and entry.custom is not None:
        return entry.custom.separator
    spec = CATALOGUE.get(name)
    return spec.separator if spec is not None else " "


# The maps that carry password hashes, as the catalogue declares them (Map.secrets).
SECRET_MAPS = frozenset(name for name, spec in CATALOGUE.items() if spec.secrets)


def is_secret(name: str, entry: MapEntry | None) -> bool:
    """Whether map ``name`` is handled like password hashes: a built-in map that carries them,
    or a map of the operator's own that its manifest ``entry`` marks ``secret``."""
    return name in SECRET_MAPS or (
        entry is not None and entry.custom is not None and entry.custom.secret
    )


__all__ = ["CATALOGUE", "SECRET_MAPS", "Directory", "Map", "is_secret", "separator"]

"""The map catalogue: every map a channel may list, by name."""

from __future__ import annotations

from mapsync.maps.base import Map
from mapsync.maps.directory import Directory
from mapsync.maps.dovecot import DovecotProxyMap, DovecotUsersMap
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
    )
}


def separator(name: str, entry: MapEntry | None = None) -> str:
    """Where a line of map ``name`` splits into key and value: a map of the operator's own
    says so in its manifest ``entry``; a built-in map in the catalogue."""
    if entry is not None and entry.custom is not None:
        return entry.custom.separator
    spec = CATALOGUE.get(name)
    return spec.separator if spec is not None else " "


__all__ = ["CATALOGUE", "Directory", "Map", "separator"]

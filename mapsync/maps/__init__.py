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

__all__ = ["CATALOGUE", "Directory", "Map"]

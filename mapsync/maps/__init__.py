"""The renderers: every built-in map a channel may list, by name, with how its entries are
made from a :class:`Directory`. Only the publisher imports them; what a map *is* (cdb, secret,
separator) is the release catalogue's (:data:`mapsync.release.BUILTIN_MAPS`), which every
renderer takes its facts from."""

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

"""``exim_routes``: Exim manualroute host lists, looked up with ``${lookup{...}cdb{...}}``.

Keys as in ``transport`` (``user@domain`` where it differs from its domain, ``domain``); the
value is an Exim host list with ``+`` as separator, so a port can follow the host:
``<+ [10.0.1.11]:24`` for an IP, ``<+ mx.customer.tld:25`` for a name. Exim's cdb lookups are
case-sensitive: configurations look keys up with ``${lc:...}``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from mapsync.config import PublisherChannel
from mapsync.maps.base import Map
from mapsync.maps.directory import Directory
from mapsync.validate import split_nexthop


def host_list(host: str, port: int | None) -> str:
    try:
        ipaddress.ip_address(host)
        item = f"[{host}]"
    except ValueError:
        item = host
    return f"<+ {item}:{port}" if port else f"<+ {item}"


class EximRoutesMap(Map):
    name = "exim_routes"
    description = "user@domain or domain → Exim host list, e.g. <+ [10.0.1.11]:24"

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        for d in directory.of_kind("hosted"):
            default = directory.default_store(d)
            yield d.name, host_list(default.lmtp_host, default.lmtp_port)
            for a in directory.accounts.get(d.id, ()):
                store = directory.store_of(a)
                if store.id != default.id and a.status != "moving":
                    yield f"{a.local_part}@{d.name}", host_list(store.lmtp_host, store.lmtp_port)
        for d in directory.of_kind("relay"):
            assert d.relay_nexthop is not None
            host, port = split_nexthop(d.relay_nexthop)
            for name in directory.names(d):
                yield name, host_list(host, port)

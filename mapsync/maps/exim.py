"""``exim_routes``: Exim manualroute host lists, looked up with ``${lookup{...}cdb{...}}``.

Keys as in ``transport`` (``user@domain`` where it differs from its domain, ``domain``); the
value is what a manualroute router's ``route_data`` takes: a host list with ``+`` as separator,
so a port can follow the host, then the transport, as Postfix's transport map names one:
``<+[10.0.1.11]:24 mapsync_lmtp`` to a mailstore, ``<+mx.customer.tld:25 mapsync_relay`` to a
relay domain's next hop (transports defined in agents/exim-mx/transports.conf). A moving
account's value is the literal ``:defer:`` (``transport`` names ``mapsync-moving:``): the
``mapsync_moving`` redirect router, before the manualroute router, defers its delivery until
it lands (``:defer: mailbox is being moved``), and the verify-only ``mapsync_moving_verify``
router accepts it at RCPT time, so the mail waits in our queue. No space after
``<+``: Exim ends the host list at the first space and reads the rest as options (measured with
Exim 4.96: ``<+ [10.0.1.11]:24`` fails with 'unknown routing option or transport name').
Exim's cdb lookups are case-sensitive: configurations look keys up with ``${lc:...}``.
"""

from __future__ import annotations

from collections.abc import Iterator

from mapsync.config import PublisherChannel
from mapsync.maps.base import Map
from mapsync.maps.directory import Directory
from mapsync.release import BUILTIN_MAPS
from mapsync.validate import is_ip, split_nexthop

LMTP = "mapsync_lmtp"
RELAY = "mapsync_relay"
MOVING = ":defer:"  # agents/exim-mx/routers.conf: mapsync_moving defers these addresses


def route(host: str, port: int | None, transport: str) -> str:
    """``route_data`` for one host: ``<+[IP]:port transport`` or ``<+name:port transport``."""
    item = f"[{host}]" if is_ip(host) else host
    return f"<+{item}:{port} {transport}" if port else f"<+{item} {transport}"


class EximRoutesMap(Map):
    """Exim manualroute ``route_data``: where each hosted address or relay domain is delivered."""

    spec = BUILTIN_MAPS["exim_routes"]
    reads = frozenset(
        {"domain", "account", "mailstore", "mailstore.lmtp_host", "mailstore.lmtp_port"}
    )
    description = (
        "user@domain or domain → Exim route_data, e.g. <+[10.0.1.11]:24 mapsync_lmtp;"
        " :defer: while moving"
    )

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        for d in directory.of_kind("hosted"):
            default = directory.default_store(d)
            yield d.name, route(default.lmtp_host, default.lmtp_port, LMTP)
            for a in directory.routed.get(d.id, ()):  # the others go to the default
                if a.status == "moving":
                    yield f"{a.local_part}@{d.name}", MOVING
                    continue
                store = directory.store_of(a)
                if store.id != default.id:
                    yield f"{a.local_part}@{d.name}", route(store.lmtp_host, store.lmtp_port, LMTP)
        for d in directory.of_kind("relay"):
            assert d.relay_nexthop is not None
            host, port = split_nexthop(d.relay_nexthop)
            for name in directory.names(d):
                yield name, route(host, port, RELAY)

"""The MX maps: ``domains``, ``recipients``, ``virtual``, ``transport``.

What each one means to Postfix (see docs/maps.md):

- ``domains``: relay_domains — every live domain, hosted, alias or relay → ``OK``;
- ``recipients``: relay_recipient_maps — every deliverable address → ``OK``, alias-domain
  addresses expanded one by one (never ``@alias``, which would accept every recipient);
- ``virtual``: virtual_alias_maps — aliases, per-address alias-domain rewrites, catch-alls with
  identity lines for the real accounts of that domain;
- ``transport``: transport_maps — each hosted domain to its default mailstore's LMTP, accounts
  housed elsewhere to theirs, moving accounts deferred, relay domains to their next hop.
"""

from __future__ import annotations

from collections.abc import Iterator

from mapsync.config import PublisherChannel
from mapsync.maps.base import Map
from mapsync.maps.directory import Directory
from mapsync.snapshot import Mailstore

MOVING = "retry:4.2.0 mailbox is being moved"


def lmtp(store: Mailstore) -> str:
    return f"lmtp:[{store.lmtp_host}]:{store.lmtp_port}"


class DomainsMap(Map):
    name = "domains"
    description = "every live domain (A-label, and U-label where different) → OK"

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        for d in directory.domains.values():
            for name in directory.names(d):
                yield name, "OK"


def _local_parts(directory: Directory, domain_id: int) -> Iterator[str]:
    for a in directory.accounts.get(domain_id, ()):
        yield a.local_part
    for al in directory.aliases.get(domain_id, ()):
        yield al.local_part


class RecipientsMap(Map):
    name = "recipients"
    description = "every deliverable address → OK (accounts, aliases, alias-domain expansions)"

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        for d in directory.of_kind("hosted"):
            locals_ = list(_local_parts(directory, d.id))
            has_catchall = d.id in directory.catchall
            for domain in (d, *directory.alias_domains.get(d.id, ())):
                for name in directory.names(domain):
                    for local in locals_:
                        yield f"{local}@{name}", "OK"
                    if has_catchall:
                        yield f"@{name}", "OK"
        for d in directory.of_kind("relay"):
            # mapsync does not know a relay customer's mailboxes: their server decides.
            for name in directory.names(d):
                yield f"@{name}", "OK"


class VirtualMap(Map):
    name = "virtual"
    description = (
        "alias and alias-domain address → comma-separated targets; catch-alls with identity lines"
    )

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        for d in directory.of_kind("hosted"):
            aliases = directory.aliases.get(d.id, ())
            accounts = directory.accounts.get(d.id, ())
            catchall = directory.catchall.get(d.id)
            for name in directory.names(d):
                for al in aliases:
                    yield f"{al.local_part}@{name}", ",".join(al.targets)
                if catchall is not None:
                    yield f"@{name}", ",".join(catchall.targets)
                    # Without identity lines the catch-all would swallow real mailboxes.
                    for a in accounts:
                        address = f"{a.local_part}@{name}"
                        yield address, f"{a.local_part}@{d.name}"
                elif name != d.name:
                    # The U-label form of an account rewrites to its canonical A-label address.
                    for a in accounts:
                        yield f"{a.local_part}@{name}", f"{a.local_part}@{d.name}"
            for alias_domain in directory.alias_domains.get(d.id, ()):
                for name in directory.names(alias_domain):
                    for local in _local_parts(directory, d.id):
                        yield f"{local}@{name}", f"{local}@{d.name}"
                    if catchall is not None:
                        yield f"@{name}", ",".join(catchall.targets)


class TransportMap(Map):
    name = "transport"
    description = (
        "domain or user@domain → lmtp:[mailstore]:24, relay:[nexthop], retry: while moving"
    )

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        for d in directory.of_kind("hosted"):
            default = directory.default_store(d)
            yield d.name, lmtp(default)
            for a in directory.accounts.get(d.id, ()):
                if a.status == "moving":
                    yield f"{a.local_part}@{d.name}", MOVING
                    continue
                store = directory.store_of(a)
                if store.id != default.id:
                    yield f"{a.local_part}@{d.name}", lmtp(store)
        for d in directory.of_kind("relay"):
            assert d.relay_nexthop is not None
            for name in directory.names(d):
                yield name, f"relay:{d.relay_nexthop}"


class SendersMap(Map):
    name = "senders"
    description = "address → the login(s) that may send as it (smtpd_sender_login_maps)"

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        owners: dict[str, set[str]] = {}
        by_id: dict[int, str] = {}
        for d in directory.of_kind("hosted"):
            if d.status == "suspended":
                continue  # a suspended customer sends nothing
            aliases = directory.alias_domains.get(d.id, ())
            for a in directory.accounts.get(d.id, ()):
                if a.status == "login_disabled":
                    continue  # receives mail, may not log in, so may not send
                login = f"{a.local_part}@{d.name}"
                by_id[a.id] = login
                for domain in (d, *aliases):
                    for name in directory.names(domain):
                        owners.setdefault(f"{a.local_part}@{name}", set()).add(login)
        for grant in directory.snapshot.sender_grants:
            owner = by_id.get(grant.account_id)
            if owner is not None:
                owners.setdefault(grant.address.lower(), set()).add(owner)
        for address, logins in owners.items():
            yield address, ",".join(sorted(logins))

"""The MX maps: ``domains``, ``recipients``, ``virtual``, ``transport``.

What each one means to Postfix (see docs/maps.md):

- ``domains``: relay_domains — every live domain, hosted, alias or relay → ``OK``;
- ``recipients``: relay_recipient_maps — every deliverable address → ``OK``, alias-domain
  addresses expanded one by one (never ``@alias``, which would accept every recipient);
- ``virtual``: virtual_alias_maps — aliases, per-address alias-domain rewrites, catch-alls with
  identity lines for the real accounts of that domain;
- ``transport``: transport_maps — each hosted domain to its default mailstore's LMTP, accounts
  housed elsewhere to theirs, moving accounts held in the MX's queue, relay domains to their
  next hop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain, repeat

from mapsync.config import PublisherChannel
from mapsync.maps.base import Map
from mapsync.maps.directory import Directory, at
from mapsync.release import BUILTIN_MAPS
from mapsync.snapshot import Mailstore

# A moving account's mail is accepted and held in the MX's own queue until the move ends.
# Not ``retry:``: smtpd answers 450 at RCPT for an address whose transport is named ``retry``
# (550 for ``error``), so the mail would wait in the sender's queue on the sender's schedule. The
# ``mapsync-moving`` service of agents/postfix-mx/master.cf is Postfix's retry daemon under
# another name: every delivery attempt defers with the next hop as the reason, until the
# account's route changes; then the next queue run (or ``postqueue -s DOMAIN``) delivers it.
MOVING_TRANSPORT = "mapsync-moving"
MOVING = f"{MOVING_TRANSPORT}:4.2.0 mailbox is being moved"


def lmtp(store: Mailstore) -> str:
    """Postfix's transport to ``store``: ``lmtp:[host]:port``."""
    return f"lmtp:[{store.lmtp_host}]:{store.lmtp_port}"


class DomainsMap(Map):
    """Postfix ``relay_domains``: every live domain."""

    spec = BUILTIN_MAPS["domains"]
    reads = frozenset({"domain"})
    description = "every live domain (A-label, and U-label where different) → OK"

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        for d in directory.domains.values():
            for name in directory.key_names(d):
                yield name, "OK"


class RecipientsMap(Map):
    """Postfix ``relay_recipient_maps``: every deliverable address."""

    spec = BUILTIN_MAPS["recipients"]
    reads = frozenset({"domain", "account", "alias"})
    description = "every deliverable address → OK (accounts, aliases, alias-domain expansions)"

    constant_value = "OK"

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterable[tuple[str, str]]:
        return zip(self.keys(directory, channel), repeat("OK"))

    def keys(self, directory: Directory, channel: PublisherChannel) -> Iterable[str]:
        # A domain's keys at a time, built in C (see Directory.at); the publisher sorts them.
        return chain.from_iterable(self._by_domain(directory))

    def _by_domain(self, directory: Directory) -> Iterator[Iterable[str]]:
        for d in directory.of_kind("hosted"):
            locals_ = directory.account_locals(d.id) + directory.alias_locals(d.id)
            has_catchall = d.id in directory.catchall
            for domain in (d, *directory.alias_domains.get(d.id, ())):
                for name in directory.key_names(domain):
                    yield at(locals_, name)
                    if has_catchall:
                        yield (f"@{name}",)
        for d in directory.of_kind("relay"):
            # mapsync does not know a relay customer's mailboxes: their server decides.
            for name in directory.key_names(d):
                yield (f"@{name}",)


class VirtualMap(Map):
    """Postfix ``virtual_alias_maps``: aliases, alias-domain addresses, catch-alls and forwards."""

    spec = BUILTIN_MAPS["virtual"]
    reads = frozenset({"domain", "account", "alias", "forward"})
    description = (
        "alias and alias-domain address → comma-separated targets; catch-alls with identity lines"
    )

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterable[tuple[str, str]]:
        # A domain's lines at a time, built in C (see Directory.at); the publisher sorts them.
        return chain.from_iterable(self._by_domain(directory))

    def _by_domain(self, directory: Directory) -> Iterator[Iterable[tuple[str, str]]]:
        for d in directory.of_kind("hosted"):
            alias_locals = directory.alias_locals(d.id)
            alias_targets = [",".join(al.targets) for al in directory.aliases.get(d.id, ())]
            account_locals = directory.account_locals(d.id)
            catchall = directory.catchall.get(d.id)
            forwards = directory.forwards.get(d.id, ())
            identity = account_locals
            if forwards:  # a forwarded account's line is its forward, not an identity line
                forwarded = {fw.local_part for fw in forwards}
                identity = [local for local in account_locals if local not in forwarded]
            for name in directory.key_names(d):
                yield zip(at(alias_locals, name), alias_targets, strict=True)
                if catchall is not None:
                    yield ((f"@{name}", ",".join(catchall.targets)),)
                if catchall is not None or name != d.name:
                    # Without identity lines the catch-all would swallow real mailboxes; the
                    # U-label form of an account rewrites to its canonical A-label address.
                    yield zip(at(identity, name), at(identity, d.name), strict=True)
                else:
                    # With recipient_delimiter = +, Postfix looks up 'a+x@d' and then 'a@d':
                    # an account whose own local part holds '+' needs its line, or an alias
                    # 'a@d' would take its mail (to another customer).
                    plus = [local for local in identity if "+" in local]
                    if plus:
                        yield zip(at(plus, name), at(plus, d.name), strict=True)
                for fw in forwards:
                    yield ((f"{fw.local_part}@{name}", ",".join(fw.targets)),)
            for alias_domain in directory.alias_domains.get(d.id, ()):
                for name in directory.key_names(alias_domain):
                    locals_ = account_locals + alias_locals
                    yield zip(at(locals_, name), at(locals_, d.name), strict=True)
                    if catchall is not None:
                        yield ((f"@{name}", ",".join(catchall.targets)),)


class TransportMap(Map):
    """Postfix ``transport_maps``: each domain's mailstore or relay, and the accounts housed elsewhere."""

    spec = BUILTIN_MAPS["transport"]
    reads = frozenset(
        {"domain", "account", "mailstore", "mailstore.lmtp_host", "mailstore.lmtp_port"}
    )
    description = (
        "domain or user@domain → lmtp:[mailstore]:24, relay:[nexthop],"
        " mapsync-moving: (held in the MX queue) while moving"
    )

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterator[tuple[str, str]]:
        route = {store_id: lmtp(store) for store_id, store in directory.stores.items()}
        for d in directory.of_kind("hosted"):
            default = directory.default_store(d).id
            yield d.name, route[default]
            for a in directory.routed.get(d.id, ()):  # the others go to the default
                if a.status == "moving":
                    yield f"{a.local_part}@{d.name}", MOVING
                    continue
                store = directory.store_of(a)
                if store.id != default:
                    yield f"{a.local_part}@{d.name}", route[store.id]
        for d in directory.of_kind("relay"):
            assert d.relay_nexthop is not None
            for name in directory.key_names(d):
                yield name, f"relay:{d.relay_nexthop}"


class SendersMap(Map):
    """Postfix ``smtpd_sender_login_maps``: the logins that may send as each address."""

    spec = BUILTIN_MAPS["senders"]
    reads = frozenset({"domain", "account", "sender_grant"})
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
                    for name in directory.key_names(domain):
                        owners.setdefault(f"{a.local_part}@{name}", set()).add(login)
        for grant in directory.snapshot.sender_grants:
            owner = by_id.get(grant.account_id)
            if owner is not None:
                owners.setdefault(grant.address.lower(), set()).add(owner)
        for address, logins in owners.items():
            yield address, ",".join(sorted(logins))

"""A resolved view of a validated snapshot: what is live, where each mailbox lives.

Built once per publish and shared by every map, so alias-domain expansion and mailstore
resolution are computed once and agree across maps.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from itertools import repeat
from operator import add, itemgetter

from mapsync.snapshot import (
    Account,
    Alias,
    Domain,
    Mailstore,
    Snapshot,
    alias_domains,
    live_domains,
    paused_gc,
)

_local_part = itemgetter(2)  # Account.local_part and Alias.local_part


def at(locals_: list[str], domain: str) -> Iterator[str]:
    """``local@domain`` for each of ``locals_``, concatenated in C (maps build millions)."""
    return map(add, locals_, repeat("@" + domain))


class Directory:
    """Live domains, addresses and routes of one snapshot (disabled rows already dropped)."""

    def __init__(self, snap: Snapshot) -> None:
        with paused_gc():
            self._build(snap)

    def _build(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.stores: dict[int, Mailstore] = {m.id: m for m in snap.mailstores}
        self.domains: dict[int, Domain] = live_domains(snap.domains)
        self.accounts: dict[int, list[Account]] = defaultdict(list)
        # The accounts that may route off their domain's default: moving, or housed on a
        # mailstore of their own. The route maps look at these few, not at every account.
        self.routed: dict[int, list[Account]] = defaultdict(list)
        hosted = {i for i, d in self.domains.items() if d.kind == "hosted"}
        accounts, routed = self.accounts, self.routed
        for a in snap.accounts:
            if a.domain_id in hosted and a.status != "disabled":
                accounts[a.domain_id].append(a)
                if a.mailstore_id or a.status == "moving":
                    routed[a.domain_id].append(a)
        self.aliases: dict[int, list[Alias]] = defaultdict(list)
        self.catchall: dict[int, Alias] = {}
        for al in snap.aliases:
            d = self.domains.get(al.domain_id)
            if d is None or d.kind != "hosted":
                continue
            if al.local_part:
                self.aliases[al.domain_id].append(al)
            else:
                self.catchall[al.domain_id] = al
        # Forwards of accounts (see Snapshot.forwards), by domain; few, so a plain scan.
        self.forwards: dict[int, list[Alias]] = defaultdict(list)
        for fw in snap.forwards:
            if fw.domain_id in hosted:
                self.forwards[fw.domain_id].append(fw)
        self.alias_domains: dict[int, list[Domain]] = alias_domains(self.domains)
        self._account_locals: dict[int, list[str]] = {}
        self._alias_locals: dict[int, list[str]] = {}

    def account_locals(self, domain_id: int) -> list[str]:
        """The local parts of the live accounts of a domain (computed once, shared by maps)."""
        locals_ = self._account_locals.get(domain_id)
        if locals_ is None:
            locals_ = list(map(_local_part, self.accounts.get(domain_id, ())))
            self._account_locals[domain_id] = locals_
        return locals_

    def alias_locals(self, domain_id: int) -> list[str]:
        """The local parts of the aliases of a domain, catch-all aside (computed once)."""
        locals_ = self._alias_locals.get(domain_id)
        if locals_ is None:
            locals_ = list(map(_local_part, self.aliases.get(domain_id, ())))
            self._alias_locals[domain_id] = locals_
        return locals_

    def of_kind(self, kind: str) -> list[Domain]:
        """The live domains of ``kind`` (hosted, alias or relay), in snapshot order."""
        return [d for d in self.domains.values() if d.kind == kind]

    @staticmethod
    def names(d: Domain) -> tuple[str, ...]:
        """The A-label, and the U-label too where it differs."""
        if d.name_unicode and d.name_unicode != d.name:
            return (d.name, d.name_unicode)
        return (d.name,)

    @staticmethod
    def key_names(d: Domain) -> tuple[str, ...]:
        """The names the address maps key a domain by: :meth:`names`, and the U-label
        case-folded too where that differs. Postfix folds every key fully as it builds a map
        and as it looks one up (``ß`` → ``ss``, final sigma → sigma), so ``straße.example``
        is found only as ``strasse.example``; Exim lowercases, and finds the U-label as it
        is. Both read these maps (an Exim MX channel lists the same domains, recipients and
        virtual), so both keys are there."""
        if d.name_unicode and d.name_unicode != d.name:
            folded = d.name_unicode.casefold()
            if folded not in (d.name, d.name_unicode):
                return (d.name, d.name_unicode, folded)
            return (d.name, d.name_unicode)
        return (d.name,)

    def store_of(self, account: Account) -> Mailstore:
        """The mailstore ``account`` lives on: its own, else its domain's default."""
        d = self.domains[account.domain_id]
        store_id = account.mailstore_id or d.default_mailstore_id
        assert store_id is not None  # guaranteed by validate.check
        return self.stores[store_id]

    def default_store(self, d: Domain) -> Mailstore:
        """The default mailstore of hosted domain ``d``."""
        assert d.default_mailstore_id is not None
        return self.stores[d.default_mailstore_id]

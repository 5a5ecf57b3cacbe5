"""Incremental publishing: the long-running publisher keeps the last snapshot, reads only the
rows changed since (:meth:`mapsync.sources.base.Source.changes`), and re-renders only the
entries those rows reach (docs/incremental.md).

Every entry of every built-in map belongs to one **unit**: the address ``local@domain`` of a
hosted domain, counted once for the domain and its alias domains (``(domain id, local)``;
local ``""`` for the ``@domain`` keys: catch-alls, domain-wide sender grants), or a key outside
the hosted domains (``(-1, key)``: a sender grant for a foreign address). A changed account,
alias or sender grant names the units whose entries it can change, in the state before and
after; the maps are rendered from a small snapshot holding every row those units' entries
are made of (the same renderers as a full run: no second implementation of a map), and only
the entries of those units are kept. A catch-all's change reaches every address of its
domain (identity lines): the whole domain is rendered. A change of a domain, a mailstore
or a customer reaches any number of units: the source refuses it as incremental.

The rows the change reaches are validated with the same checks as a full run, against the
rest of the state (:class:`mapsync.validate.Outside`), and alias cycles are sought from
every changed alias over the whole alias graph. Any problem ends the incremental run: the
full run that follows reports it as ever.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TypeVar

from mapsync.config import PublisherChannel
from mapsync.formats.splice import Change, changes
from mapsync.maps import CATALOGUE, Directory
from mapsync.snapshot import (
    Account,
    Alias,
    Changes,
    Mark,
    NotIncremental,
    SenderGrant,
    Snapshot,
    alias_domains,
    live_domains,
)
from mapsync.validate import Outside, same_home
from mapsync.validate import check as validate

Row = TypeVar("Row", Account, Alias)  # a row State indexes by its address
Unit = tuple[int, str]  # (hosted domain id, local part) or (-1, a key outside them)
DENY = "dovecot_deny"  # its keys are SERVICE/user


def _lower(s: str) -> str:
    low = s.lower()
    return s if low == s else low  # the row's own string where it is lowercase already


def _base(address: str) -> str | None:
    """``user@domain`` of a ``user+tag@domain`` (lowercase), which Postfix's
    recipient_delimiter delivers it to where no row has it whole; None without a tag."""
    local, at, domain = address.rpartition("@")
    if not at or "+" not in local:
        return None
    base = local.partition("+")[0]
    return f"{base}@{domain}" if base else None


class State:
    """The snapshot the last releases were rendered from, indexed by unit; updated in place
    by :meth:`apply`. Built only from a snapshot without problems."""

    def __init__(self, snap: Snapshot, mark: Mark) -> None:
        self.snap = snap  # mailstores, domains, customers: what changes read as structural
        self.mark = mark
        self.fingerprint = snap.fingerprint
        self.domains = {d.id: d for d in snap.domains}
        live = live_domains(snap.domains)
        self.live = set(live)
        self.hosted = {i for i, d in live.items() if d.kind == "hosted"}
        self.alias_domains = alias_domains(live)
        # Every name of a hosted domain or of an alias domain of one → the hosted domain.
        self.resolve: dict[str, int] = {}
        self.names: dict[int, tuple[str, ...]] = {}  # hosted id → its names and its aliases'
        for i in self.hosted:
            names = [*Directory.key_names(live[i])]  # as the maps key them
            for alias_domain in self.alias_domains.get(i, ()):
                names += Directory.key_names(alias_domain)
            self.names[i] = tuple(names)
            for name in names:
                self.resolve[name] = i
        # Alias target (lowercase) → the aliases that list it: built here, after the full
        # publish that keeps this state, not in the first change that needs it (seconds at
        # millions of aliases).
        self.targeting: dict[str, set[int]] = defaultdict(set)
        self.accounts: dict[int, Account] = {}
        self.aliases: dict[int, Alias] = {}
        # Lowercase local part → the row there, per domain: of the rows a full run serves and
        # validates only (an account not disabled, in a live domain; an alias in a live
        # domain). The others are in no map and unchecked, so a full run accepts their
        # address twice (a disabled "Bob" beside "bob"): kept in accounts/aliases only.
        self.account_at: dict[int, dict[str, Account]] = defaultdict(dict)
        self.alias_at: dict[int, dict[str, Alias]] = defaultdict(dict)
        # Per domain, the part before the '+' → the lowercase local parts of account_at that
        # hold one ('sales' → {'sales+eu'}): Dovecot's LMTP delivers those to that part.
        self.tagged: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        # The accounts whose home is spelt other than the directory it names ('/a//b/'), by
        # id, with that directory: few, so a home is looked for among all as stored and here.
        self.odd_homes: dict[int, str] = {}
        for a in snap.accounts:
            self._add_account(a)
        for al in snap.aliases:
            self._add_alias(al)
        self.grants: dict[int, tuple[SenderGrant, ...]] = {}
        self.granted: dict[str, set[int]] = defaultdict(set)  # address → accounts granted it
        for account_id, address in snap.sender_grants:
            self.grants[account_id] = (
                *self.grants.get(account_id, ()),
                SenderGrant(account_id, address),
            )
            self.granted[_lower(address)].add(account_id)
        self.denied = dict(snap.denied)

    # -- the index --------------------------------------------------------------------------

    def _add_account(self, a: Account) -> None:
        if a.status != "disabled" and a.domain_id in self.live:
            _index(self.account_at, a, "accounts")
            if "+" in a.local_part:
                local = _lower(a.local_part)
                self.tagged[a.domain_id][local.partition("+")[0]].add(local)
        home = same_home(a.home) if a.home is not None else None
        if home is not None and home != a.home:
            self.odd_homes[a.id] = home
        self.accounts[a.id] = a

    def _drop_account(self, a: Account) -> None:
        del self.accounts[a.id]
        self.odd_homes.pop(a.id, None)
        _unindex(self.account_at, a)
        if "+" in a.local_part:
            local = _lower(a.local_part)
            if local not in self.account_at.get(a.domain_id, {}):
                self.tagged[a.domain_id][local.partition("+")[0]].discard(local)

    def _add_alias(self, al: Alias) -> None:
        if al.domain_id in self.live:
            _index(self.alias_at, al, "aliases")
        self.aliases[al.id] = al
        for target in al.targets:
            target = _lower(target)
            self.targeting[target].add(al.id)
            base = _base(target) if "+" in target else None
            if base is not None:  # user+tag@ leads to user@ where no row has it whole
                self.targeting[base].add(al.id)

    def _drop_alias(self, al: Alias) -> None:
        del self.aliases[al.id]
        _unindex(self.alias_at, al)
        for target in al.targets:
            target = _lower(target)
            self.targeting[target].discard(al.id)
            base = _base(target) if "+" in target else None
            if base is not None:
                self.targeting[base].discard(al.id)

    # -- units ------------------------------------------------------------------------------

    def owner(self, key: str) -> Unit:
        """The unit map key ``key`` belongs to (``SERVICE/`` already taken off)."""
        local, at, name = key.rpartition("@")
        if not at:
            return (-2, key)  # a domain's own key: no account, alias or grant changes it
        domain = self.resolve.get(name)
        if domain is None:
            return (-1, key)
        return (domain, local)

    def claimed(self, address: str) -> bool:
        """Whether a live account or an alias holds ``address`` (lowercase, hosted domain:
        what :func:`mapsync.validate.check` finds in the addresses it has seen)."""
        local, _, name = address.rpartition("@")
        domain = self.resolve.get(name)
        if domain is None:
            return False
        a = self.account_at.get(domain, {}).get(local)
        return (a is not None and a.status != "disabled") or local in self.alias_at.get(domain, {})

    def catchall_names(self) -> frozenset[str]:
        """The names of the hosted domains with a catch-all (the ``@domain`` keys)."""
        return frozenset(
            self.domains[i].name for i in self.hosted if "" in self.alias_at.get(i, {})
        )

    # -- the rows of units ------------------------------------------------------------------

    def part(self, units: set[Unit], whole: set[int]) -> Snapshot:
        """The snapshot of every row the entries of ``units`` (and of every address of the
        domains in ``whole``) are made of, in the state as it is now."""
        accounts: dict[int, Account] = {}
        aliases: dict[int, Alias] = {}
        domains: set[int] = set()
        addresses: set[str] = set()
        for domain in whole:
            domains.add(domain)
            for a in self.account_at.get(domain, {}).values():
                accounts[a.id] = a
            for al in self.alias_at.get(domain, {}).values():
                aliases[al.id] = al
            names = self.names.get(domain, ())
            addresses.update(
                address for address in self.granted if address.rpartition("@")[2] in names
            )
        for domain, local in units:
            if domain < 0:
                addresses.add(local)
                continue
            domains.add(domain)
            account = self.account_at.get(domain, {}).get(local)
            if account is not None:
                accounts[account.id] = account
            for at in (local, ""):  # the catch-all decides the identity lines
                alias = self.alias_at.get(domain, {}).get(at)
                if alias is not None:
                    aliases[alias.id] = alias
            addresses.update(f"{local}@{name}" for name in self.names.get(domain, ()))
        grants = []
        for address in addresses:
            for account_id in self.granted.get(address, ()):
                grants += [g for g in self.grants[account_id] if _lower(g.address) == address]
                owner = self.accounts.get(account_id)
                if owner is not None:
                    accounts[owner.id] = owner
                    domains.add(owner.domain_id)
        for domain in list(domains):
            domains.update(d.id for d in self.alias_domains.get(domain, ()))
        return replace(
            self.snap,
            domains=[self.domains[i] for i in sorted(domains) if i in self.domains],
            accounts=list(accounts.values()),
            aliases=list(aliases.values()),
            sender_grants=grants,
            denied={i: self.denied[i] for i in accounts if i in self.denied},
            forwards=[],
            problems=[],
            mark=None,
            changes=None,
        )

    # -- a change ---------------------------------------------------------------------------

    def reach(self, change: Changes) -> tuple[set[Unit], set[int]]:
        """The units ``change`` may alter, and the domains it alters whole (a catch-all's),
        from the rows before it (the state, not yet applied) and after it (``change``):
        domains do not change in an incremental run, so a unit means the same in both."""
        units: set[Unit] = set()
        whole: set[int] = set()
        for account_id in change.accounts.keys() | change.grants.keys():
            old_grants = self.grants.get(account_id, ())
            new_grants = change.grants.get(account_id, old_grants)
            units.update(self.owner(_lower(g.address)) for g in (*old_grants, *new_grants))
            old = self.accounts.get(account_id)
            new = change.accounts.get(account_id, old)
            for a in (old, new):
                if a is not None:
                    units.add((a.domain_id, _lower(a.local_part)))
        for alias_id, row in change.aliases.items():
            for al in (self.aliases.get(alias_id), row):
                if al is None:
                    continue
                local = _lower(al.local_part)
                units.add((al.domain_id, local))
                if not local:
                    whole.add(al.domain_id)
        return units, whole

    def apply(self, change: Changes) -> None:
        """Make the state the database's as ``change`` read it."""
        # Every old row out before any new one in: rows that swap addresses (one account
        # disabled, another enabled at its address) never meet in the index.
        for account_id in change.accounts:
            old = self.accounts.get(account_id)
            if old is not None:
                self._drop_account(old)
        for account_id, row in change.accounts.items():
            if row is not None:
                self._add_account(row)
            self.denied.pop(account_id, None)
            if account_id in change.denied:
                self.denied[account_id] = change.denied[account_id]
        for alias_id in change.aliases:
            old_alias = self.aliases.get(alias_id)
            if old_alias is not None:
                self._drop_alias(old_alias)
        for al in change.aliases.values():
            if al is not None:
                self._add_alias(al)
        for account_id, grants in change.grants.items():
            for g in self.grants.pop(account_id, ()):
                self.granted[_lower(g.address)].discard(account_id)
            if grants:
                self.grants[account_id] = grants
                for g in grants:
                    self.granted[_lower(g.address)].add(account_id)
        self.mark = change.mark
        self.fingerprint = change.fingerprint

    def differs(self, snap: Snapshot) -> list[str]:
        """The kinds of rows in which this state and ``snap`` (of the same database state)
        differ: none, unless incremental runs went wrong."""
        grants: dict[int, tuple[SenderGrant, ...]] = defaultdict(tuple)
        for g in snap.sender_grants:
            grants[g.account_id] += (SenderGrant(*g),)
        out = []
        if {a.id: a for a in snap.accounts} != self.accounts:
            out.append("account")
        if {al.id: al for al in snap.aliases} != self.aliases:
            out.append("alias")
        if {i: tuple(sorted(g)) for i, g in grants.items()} != {
            i: tuple(sorted(g)) for i, g in self.grants.items() if g
        }:
            out.append("sender_grant")
        if snap.denied != self.denied:
            out.append("denied")
        return out

    # -- validation -------------------------------------------------------------------------

    def check(
        self, change: Changes, units: set[Unit], whole: set[int], proxy: bool, customers: bool
    ) -> None:
        """Validate what ``change`` reaches (after :meth:`apply`) as a full run would:
        :class:`NotIncremental` naming the first problem."""
        part = self.part(units, whole)  # a grant for a foreign address is checked too
        # The aliases that name an address of the units: one that lost its account or alias
        # now leads nowhere. With the whole domains, the other way round too.
        referrers: dict[int, Alias] = {}
        # Those that name a +tag of the units: one whose account or alias went now leads to
        # the part before the '+', which may lead back to them (a cycle no changed alias is on).
        retargeted: dict[int, Alias] = {}
        targeting = self.targeting
        for domain, local in units:
            if domain < 0 or not local:
                continue
            for name in self.names.get(domain, ()):
                for alias_id in targeting.get(f"{local}@{name}", ()):
                    referrers[alias_id] = self.aliases[alias_id]
                    if "+" in local:
                        retargeted[alias_id] = self.aliases[alias_id]
        if whole:
            for target, ids in targeting.items():
                if self.resolve.get(target.rpartition("@")[2]) in whole:
                    for alias_id in ids:
                        referrers[alias_id] = self.aliases[alias_id]
        seen = {al.id for al in part.aliases}
        accounts = {a.id: a for a in part.accounts}
        part = replace(
            part,
            # All domains and mailstores: alias targets resolve through any of them.
            domains=self.snap.domains,
            aliases=part.aliases + [al for i, al in referrers.items() if i not in seen],
            accounts=[*accounts.values(), *self._beside(accounts)],
        )
        problems = validate(
            part, proxy, customers, outside=Outside(self.claimed, self.catchall_names())
        )
        if problems:
            raise NotIncremental(f"an invalid row: {problems[0]}")
        for alias_id, al in [*change.aliases.items(), *retargeted.items()]:
            if al is not None and al.local_part and self._cycle(al):
                raise NotIncremental(f"alias id={alias_id} closes an alias cycle")

    def _beside(self, accounts: dict[int, Account]) -> Iterator[Account]:
        """The accounts of the state, not among ``accounts``, that a full run validates
        ``accounts`` against beyond their addresses: the account before the '+' of a
        tagged one and the tagged ones of an account (Dovecot's LMTP delivers 'sales+eu@'
        to 'sales@'), and the accounts given the same home (one mailbox for two users)."""
        found: dict[int, Account] = {}
        homes: set[str] = set()
        for a in accounts.values():
            local, at = _lower(a.local_part), self.account_at.get(a.domain_id, {})
            for other in (
                local.partition("+")[0] if "+" in local else None,
                *self.tagged.get(a.domain_id, {}).get(local, ()),
            ):
                row = at.get(other) if other is not None else None
                if row is not None and row.id not in accounts:
                    found[row.id] = row
            if a.home is not None:
                homes.add(same_home(a.home))
        if homes:
            # One pass over the state's accounts (only a run whose channels carry homes reads
            # them), then the few spelt otherwise.
            sharing = [a for a in self.accounts.values() if a.home in homes]
            sharing += [self.accounts[i] for i, home in self.odd_homes.items() if home in homes]
            found.update((a.id, a) for a in sharing if a.id not in accounts)
        return iter(found.values())

    def _resolved(self, target: str) -> tuple[int, str] | None:
        """The alias of this cluster ``target`` names, as (domain id, local), if any: a
        ``user+tag@`` no row has whole leads to ``user@``, as the full run follows it."""
        local, at, name = _lower(target).rpartition("@")
        domain = self.resolve.get(name) if at else None
        if domain is None or not local:
            return None
        if "+" in local and not self.claimed(f"{local}@{name}"):
            base = local.partition("+")[0]
            if base and self.claimed(f"{base}@{name}"):
                local = base
        if local not in self.alias_at.get(domain, {}):
            return None
        return (domain, local)

    def _cycle(self, start: Alias) -> bool:
        """Whether the alias graph leads from ``start`` back to it (through aliases only, as
        :func:`mapsync.validate.alias_graph` follows them)."""
        home = (start.domain_id, _lower(start.local_part))
        stack = [start]
        visited: set[tuple[int, str]] = set()
        while stack:
            al = stack.pop()
            for target in al.targets:
                node = self._resolved(target)
                if node is None:
                    continue
                if node == home:
                    return True
                if node not in visited:
                    visited.add(node)
                    stack.append(self.alias_at[node[0]][node[1]])
        return False


def _index(index: dict[int, dict[str, Row]], row: Row, what: str) -> None:
    """Put ``row`` into ``index`` (State.account_at, alias_at) at its lowercase address; a
    second live row at one address is one a full run refuses: :class:`NotIncremental`."""
    at = index[row.domain_id]
    local = _lower(row.local_part)
    if local in at:
        raise NotIncremental(f"two {what} at {local!r} of domain id {row.domain_id}")
    at[local] = row


def _unindex(index: dict[int, dict[str, Row]], row: Row) -> None:
    """Take ``row`` out of ``index`` (State.account_at, alias_at), where it is indexed."""
    at = index.get(row.domain_id)
    local = _lower(row.local_part)
    if at is not None and local in at and at[local].id == row.id:
        del at[local]


def rendered(
    state: State, units: set[Unit], whole: set[int], ch: PublisherChannel, names: Iterable[str]
) -> dict[str, dict[str, str]]:
    """Per map of ``names``, the entries of ``units`` (and of the ``whole`` domains) that
    ``ch`` carries, rendered from the state as it is now."""
    directory = Directory(state.part(units, whole))
    out: dict[str, dict[str, str]] = {}
    for name in names:
        spec = CATALOGUE[name]
        kept: dict[str, str] = {}
        for key, value in spec.entries(directory, ch):
            domain, local = state.owner(key.partition("/")[2] if name == DENY else key)
            if (domain, local) in units or domain in whole:
                kept[key] = value
        out[name] = kept
    return out


def deltas(
    state: State,
    change: Changes,
    channels: list[PublisherChannel],
    proxy: bool,
    customers: bool,
) -> Iterator[tuple[str, str, list[Change]]]:
    """Apply ``change`` to ``state`` and yield (channel, map, the changed lines) for each
    map of each of ``channels``. :class:`NotIncremental` when the change cannot be published
    incrementally (an invalid row among those it reaches): the state is then changed but
    unpublished, and the caller must drop it, as when it cannot publish what is yielded."""
    units, whole = state.reach(change)
    maps = {ch.name: _builtin(ch) for ch in channels}
    before = {ch.name: rendered(state, units, whole, ch, maps[ch.name]) for ch in channels}
    state.apply(change)
    state.check(change, units, whole, proxy, customers)
    for ch in channels:
        after = rendered(state, units, whole, ch, maps[ch.name])
        for name in maps[ch.name]:
            old, new = before[ch.name][name], after[name]
            yield ch.name, name, changes(old, new, name, CATALOGUE[name].separator)


def _builtin(ch: PublisherChannel) -> list[str]:
    maps = [m for m in ch.maps if m in CATALOGUE]
    if len(maps) != len(ch.maps):
        raise NotIncremental(f"channel {ch.name} carries maps of your own")
    return maps

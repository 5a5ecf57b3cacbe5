"""The data-correctness rules, checked on a snapshot before any map is rendered.

Each rule yields a :class:`Problem` naming table, row and reason. By default any problem fails
the publish (nothing is written, the old release keeps serving). Values that could change how a
map line parses (whitespace, control characters, commas, a leading ``#``) are refused here, so
no database value can inject a different key or field into a text map.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterator
from typing import NamedTuple

from mapsync import log
from mapsync.snapshot import Domain, Snapshot, paused_gc

_log = log.get("validate")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
# RFC 5322 atext plus dots; no quoting, no whitespace, no comma, no colon, no '@'.
_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
# Exactly the local parts local_part_problem accepts (1-64 characters, not starting with '#',
# _LOCAL's characters, all lowercase): one C match per row; the function runs only on a miss.
_GOOD_LOCAL = re.compile(
    r"(?!#)(?=.{1,64}\Z)[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z", re.S
)
_NEXTHOP = re.compile(r"^(?:\[([^\[\]\s]+)\]|([^\[\]\s:]+))(?::(\d{1,5}))?\Z")


class Problem(NamedTuple):
    """One invalid row: ``table`` and ``row`` (primary key) locate it, ``key`` names it.

    ``field``: the one column at fault when only some maps carry it (``password_hash``,
    ``home``, ``imap_host``, ...), so ``--skip-invalid`` leaves the row out of those maps'
    channels only (maps declare what they read: :attr:`mapsync.maps.base.Map.reads`); None
    when the row as a whole is wrong (its address, its domain, where it routes).
    """

    table: str
    row: int
    key: str
    reason: str
    field: str | None = None

    def __str__(self) -> str:
        return f"{self.table} id={self.row} {self.key!r}: {self.reason}"


@functools.lru_cache(maxsize=65536)  # alias targets and grants repeat a few thousand domains
def domain_name_problem(name: str) -> str | None:
    """Why ``name`` is not a lowercase A-label domain name, or None."""
    if name != name.lower():
        return "not lowercase (store the lowercase A-label)"
    if len(name) > 253:
        return f"longer than 253 characters ({len(name)})"
    labels = name.split(".")
    if len(labels) < 2:
        return "needs at least two labels"
    for label in labels:
        if not _LABEL.match(label):
            return f"label {label!r} is not a valid A-label (letters, digits, '-', 1-63 characters)"
    return None


def local_part_problem(local: str) -> str | None:
    """Why ``local`` is not an acceptable local part, or None."""
    if len(local) > 64:
        return f"local part longer than 64 characters ({len(local)})"
    if local != local.lower():
        return "local part not lowercase"
    if local.startswith("#"):
        return "local part starts with '#' (a text map would read the line as a comment)"
    if not _LOCAL.match(local):
        return "local part has characters that are not allowed (whitespace, ',', ':', '@', quotes, control characters)"
    return None


def address_problem(address: str) -> str | None:
    """Why ``address`` (an alias target) is not a plain ``local@domain``, or None."""
    local, at, domain = address.rpartition("@")
    if not at:
        return f"target {address!r} is not an address (local@domain)"
    # A target is a value, not a key: an external mailbox may keep its case.
    problem = local_part_problem(local.lower()) or domain_name_problem(domain.lower())
    return f"target {address!r}: {problem}" if problem else None


def host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address nor a hostname, or None."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    problem = domain_name_problem(host)
    return f"host {host!r}: {problem}" if problem else None


def split_nexthop(nexthop: str) -> tuple[str, int | None]:
    """``[mx.example.net]:25`` → ("mx.example.net", 25); call only on a valid next hop."""
    m = _NEXTHOP.match(nexthop)
    assert m is not None
    return m.group(1) or m.group(2), int(m.group(3)) if m.group(3) else None


def nexthop_problem(nexthop: str) -> str | None:
    """Why ``nexthop`` is not ``host``, ``[host]``, ``host:port`` or ``[host]:port``, or None."""
    m = _NEXTHOP.match(nexthop)
    if not m:
        return f"relay_nexthop {nexthop!r} is not 'host', '[host]' or '[host]:port'"
    if m.group(3) and not 0 < int(m.group(3)) < 65536:
        return f"relay_nexthop {nexthop!r}: port out of range"
    return host_problem(m.group(1) or m.group(2))


def _unicode_problem(name: str, unicode: str) -> str | None:
    if unicode != unicode.lower():
        return f"name_unicode {unicode!r} is not lowercase (its map keys would never be found)"
    # Decode the A-label rather than encode the U-label: Python's codec encodes with IDNA 2003
    # mappings ('faß' → 'fass'), which would accept a different domain than IDNA 2008 means.
    try:
        decoded = ".".join(
            label[4:].encode("ascii").decode("punycode") if label.startswith("xn--") else label
            for label in name.split(".")
        )
    except UnicodeError as exc:
        return f"A-label {name!r} does not decode: {exc}"
    if decoded != unicode:
        return f"name_unicode {unicode!r} is not what the name decodes to ({decoded!r})"
    return None


def check(snap: Snapshot, proxy: bool = False) -> list[Problem]:
    """Every rule violation in ``snap``; an empty list means it may be published.

    ``proxy``: a channel carries ``dovecot_proxy``, so every mailstore's imap_host must be an IP.
    """
    with paused_gc():
        return list(_check(snap, proxy))


def _check(snap: Snapshot, proxy: bool = False) -> Iterator[Problem]:
    stores = {m.id: m for m in snap.mailstores}
    domains = {d.id: d for d in snap.domains}

    for m in snap.mailstores:
        if proxy and not host_problem(m.imap_host):
            try:
                ipaddress.ip_address(m.imap_host)
            except ValueError:
                # Dovecot's proxy host= should be an IP: a name is resolved at every login.
                yield Problem(
                    "mailstore",
                    m.id,
                    m.name,
                    f"imap_host {m.imap_host!r} is not an IP address (dovecot_proxy host=)",
                    "imap_host",
                )
        for field, host, port in (
            ("lmtp", m.lmtp_host, m.lmtp_port),
            ("imap", m.imap_host, m.imap_port),
        ):
            problem = host_problem(host)
            if problem:
                yield Problem(
                    "mailstore", m.id, m.name, f"{field}_host: {problem}", f"{field}_host"
                )
            if not 0 < port < 65536:
                yield Problem(
                    "mailstore", m.id, m.name, f"{field}_port {port} out of range", f"{field}_port"
                )

    for d in snap.domains:
        problem = domain_name_problem(d.name)
        if problem:
            yield Problem("domain", d.id, d.name, problem)
        if d.name_unicode:
            problem = _unicode_problem(d.name, d.name_unicode)
            if problem:
                yield Problem("domain", d.id, d.name, problem)
        if d.status == "disabled":
            continue
        if d.kind == "hosted":
            store = stores.get(d.default_mailstore_id) if d.default_mailstore_id else None
            if store is None:
                yield Problem("domain", d.id, d.name, "hosted domain has no default mailstore")
            elif not store.active:
                yield Problem(
                    "domain", d.id, d.name, f"default mailstore {store.name!r} is not active"
                )
        elif d.kind == "alias":
            target = domains.get(d.target_domain_id) if d.target_domain_id else None
            if target is None:
                yield Problem("domain", d.id, d.name, "alias domain has no target domain")
            elif target.kind != "hosted":
                yield Problem(
                    "domain",
                    d.id,
                    d.name,
                    f"alias domain points at {target.name!r}, which is {target.kind}, not hosted (alias domains never chain)",
                )
            elif target.status == "disabled":
                yield Problem("domain", d.id, d.name, f"target domain {target.name!r} is disabled")
        elif d.kind == "relay":
            if not d.relay_nexthop:
                yield Problem("domain", d.id, d.name, "relay domain has no relay_nexthop")
            else:
                problem = nexthop_problem(d.relay_nexthop)
                if problem:
                    yield Problem("domain", d.id, d.name, problem)

    # Each address claimed once, case-insensitively; the rows' loops below run once per row of
    # the largest tables, so they inline the claim and try _GOOD_LOCAL (C) before the functions.
    seen: dict[str, tuple[str, int]] = {}
    good_local = _GOOD_LOCAL.match
    secrets = snap.secrets

    for a in snap.accounts:
        dom = domains.get(a.domain_id)
        if dom is None or dom.status == "disabled" or a.status == "disabled":
            continue
        address = f"{a.local_part}@{dom.name}"
        if not good_local(a.local_part):
            problem = local_part_problem(a.local_part)
            if problem:
                yield Problem("account", a.id, address, problem)
        if dom.kind != "hosted":
            yield Problem(
                "account",
                a.id,
                address,
                f"account in a {dom.kind} domain (only hosted domains have mailboxes)",
            )
            continue
        store_id = a.mailstore_id or dom.default_mailstore_id
        store = stores.get(store_id) if store_id else None
        if store is None:
            yield Problem("account", a.id, address, "resolves to no mailstore")
        elif not store.active:
            yield Problem("account", a.id, address, f"mailstore {store.name!r} is not active")
        if secrets:
            for column, problem in _secret_problems(a.password_hash, a.home):
                yield Problem("account", a.id, address, problem, column)
        claim = ("account", a.id)
        first = seen.setdefault(address.lower(), claim)
        if first is not claim:
            yield _duplicate("account", a.id, address, first)

    bad_targets: set[str] = set()
    for al in snap.aliases:
        dom = domains.get(al.domain_id)
        if dom is None or dom.status == "disabled":
            continue
        address = f"{al.local_part}@{dom.name}" if al.local_part else f"@{dom.name}"
        if al.local_part and not good_local(al.local_part):
            problem = local_part_problem(al.local_part)
            if problem:
                yield Problem("alias", al.id, address, problem)
        if dom.kind != "hosted":
            yield Problem(
                "alias",
                al.id,
                address,
                f"alias in a {dom.kind} domain (define it in the target domain)",
            )
            continue
        if not al.targets:
            yield Problem("alias", al.id, address, "alias has no targets")
        for target_address in al.targets:
            # address_problem's own test, inline: local@domain, both parts valid once lowercased
            local, at, domain = target_address.rpartition("@")
            if at and good_local(local.lower()) and not domain_name_problem(domain.lower()):
                continue
            problem = address_problem(target_address)
            if problem:
                bad_targets.add(target_address)
                yield Problem("alias", al.id, address, problem)
        claim = ("alias", al.id)
        first = seen.setdefault(address.lower(), claim)
        if first is not claim:
            yield _duplicate("alias", al.id, address, first)

    yield from _alias_graph(snap, domains, seen, bad_targets)

    accounts = {a.id for a in snap.accounts}
    for g in snap.sender_grants:
        if g.account_id not in accounts:
            continue
        local, at, domain = g.address.rpartition("@")
        problem = (
            f"{g.address!r} is not an address or @domain"
            if not at
            else (local_part_problem(local.lower()) if local else None)
            or domain_name_problem(domain.lower())
        )
        if problem:
            yield Problem("sender_grant", g.account_id, g.address, problem)

    postmasters = {key for key in seen if key.startswith("postmaster@")}
    for d in snap.domains:
        if (
            d.kind == "hosted"
            and d.status != "disabled"
            and f"postmaster@{d.name}" not in postmasters
        ):
            # A warning, not a refusal: refusing would stop the domain's mail (or every
            # publish) over a missing role address, a worse outage than the missing address.
            _log.warning(
                "hosted domain has no postmaster@ (RFC 5321 requires it)", domain=d.name, row=d.id
            )


def _duplicate(table: str, row: int, address: str, first: tuple[str, int]) -> Problem:
    other_table, other_row = first
    return Problem(
        table,
        row,
        address,
        f"address also defined by {other_table} id={other_row} (addresses are unique case-insensitively)",
    )


MAX_FANOUT = 1000


def _alias_graph(
    snap: Snapshot,
    domains: dict[int, Domain],
    seen: dict[str, tuple[str, int]],
    bad_targets: set[str],
) -> Iterator[Problem]:
    """Fan-out, targets inside our own domains that lead nowhere, and alias cycles."""
    live = {d.id: d for d in domains.values() if d.status != "disabled"}
    alias_of = {
        d.name: live[d.target_domain_id].name
        for d in live.values()
        if d.kind == "alias" and d.target_domain_id in live
    }
    hosted = {d.name for d in live.values() if d.kind == "hosted"}
    catchall = {key[1:] for key in seen if key.startswith("@")}
    # The aliases that can be nodes of the graph, and their addresses, first: a target then
    # joins its alias's edges only if it is one of them (a cycle runs through aliases only).
    nodes = [
        (al, f"{al.local_part}@{dom.name}")
        for al in snap.aliases
        if (dom := live.get(al.domain_id)) is not None and dom.kind == "hosted" and al.local_part
    ]
    addresses = {address for _, address in nodes}
    # address → its alias targets (None: none); the last alias of an address wins, in the
    # place of its first, as the duplicate itself is refused above.
    edges: dict[str, list[str] | None] = {}
    where: dict[str, int] = {}
    for al, address in nodes:
        if len(al.targets) > MAX_FANOUT:
            yield Problem(
                "alias", al.id, address, f"{len(al.targets)} targets, more than {MAX_FANOUT}"
            )
        found: list[str] | None = None
        for target in al.targets:
            if target in bad_targets:
                continue  # reported as a syntax problem already
            resolved = target.lower()
            local, _, tdomain = resolved.rpartition("@")
            if tdomain in alias_of:
                tdomain = alias_of[tdomain]
                resolved = f"{local}@{tdomain}"
            if tdomain not in hosted:
                continue  # mail leaves the cluster: not ours to check
            if resolved not in seen and tdomain not in catchall:
                yield Problem(
                    "alias",
                    al.id,
                    address,
                    f"target {target!r} is in a hosted domain but is no account or alias there",
                )
            if resolved in addresses:
                if found is None:
                    found = []
                found.append(resolved)
        edges[address] = found
        if found:
            where[address] = al.id
    # Postfix gives up at recursion depth 1000 with a deferral (4.6.0): refuse cycles here.
    # An alias without alias targets can start no cycle (the search below, on the whole graph,
    # would finish it at once and skip it after: the same cycles, in the same order).
    graph = {node: targets for node, targets in edges.items() if targets}
    state: dict[str, int] = {}
    for start in graph:
        if state.get(start):
            continue
        stack = [(start, iter(graph[start]))]
        state[start] = 1
        path = [start]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                yield Problem("alias", where[nxt], nxt, "alias cycle: " + " → ".join(cycle))
                continue
            if not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(graph[nxt])))
                path.append(nxt)


STRONG_SCHEMES = {
    "SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2I", "ARGON2ID",
    "PBKDF2", "SSHA512", "SSHA256",
}  # fmt: skip
WEAK_SCHEMES = {"MD5-CRYPT", "SSHA", "SHA", "SMD5", "CRYPT", "SHA256", "SHA512"}
_CRYPT_PREFIXES = ("$6$", "$5$", "$2y$", "$2b$", "$2a$")
_SCHEME = re.compile(r"^\{([A-Z0-9.-]+)\}")


def _secret_problems(password_hash: str | None, home: str | None) -> Iterator[tuple[str, str]]:
    """Rules for the passwd-file fields: a known, strong scheme; nothing that splits a field.
    Yields (column, reason)."""
    if not password_hash:
        yield "password_hash", "no password hash"
    elif any(c in password_hash for c in ": \t\r\n\0"):
        yield "password_hash", "password hash contains ':', whitespace or a control character"
    else:
        m = _SCHEME.match(password_hash)
        if m is None and not password_hash.startswith(_CRYPT_PREFIXES):
            yield "password_hash", "password hash has no {SCHEME} prefix"
        elif m is not None and m.group(1) not in STRONG_SCHEMES:
            scheme = m.group(1)
            if scheme in WEAK_SCHEMES:
                _log.warning("weak password scheme", scheme=scheme)
            else:
                yield (
                    "password_hash",
                    f"password scheme {scheme} is not allowed (cleartext or unknown)",
                )
    if home is not None:
        if not home.startswith("/") or any(c in home for c in ": \t\r\n\0"):
            yield "home", f"home {home!r} must be an absolute path without ':' or whitespace"
        elif ".." in home.split("/"):
            yield "home", f"home {home!r} contains '..'"

"""The data-correctness rules, checked on a snapshot before any map is rendered.

Each rule yields a :class:`Problem` naming table, row and reason. By default any problem fails
the publish (nothing is written, the old release keeps serving). Values that could change how a
map line parses (whitespace, control characters, commas, a leading ``#``) are refused here, so
no database value can inject a different key or field into a text map.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import NamedTuple

from mapsync.snapshot import Snapshot

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
# RFC 5322 atext plus dots; no quoting, no whitespace, no comma, no colon, no '@'.
_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_NEXTHOP = re.compile(r"^(?:\[([^\[\]\s]+)\]|([^\[\]\s:]+))(?::(\d{1,5}))?\Z")


class Problem(NamedTuple):
    """One invalid row: ``table`` and ``row`` (primary key) locate it, ``key`` names it."""

    table: str
    row: int
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.table} id={self.row} {self.key!r}: {self.reason}"


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


def check(snap: Snapshot) -> list[Problem]:
    """Every rule violation in ``snap``; an empty list means it may be published."""
    return list(_check(snap))


def _check(snap: Snapshot) -> Iterator[Problem]:
    stores = {m.id: m for m in snap.mailstores}
    domains = {d.id: d for d in snap.domains}

    for m in snap.mailstores:
        for field, host, port in (
            ("lmtp", m.lmtp_host, m.lmtp_port),
            ("imap", m.imap_host, m.imap_port),
        ):
            problem = host_problem(host)
            if problem:
                yield Problem("mailstore", m.id, m.name, f"{field}_host: {problem}")
            if not 0 < port < 65536:
                yield Problem("mailstore", m.id, m.name, f"{field}_port {port} out of range")

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

    seen: dict[str, tuple[str, int]] = {}

    def claim(address: str, table: str, row: int) -> Iterator[Problem]:
        folded = address.lower()
        if folded in seen:
            other_table, other_row = seen[folded]
            yield Problem(
                table,
                row,
                address,
                f"address also defined by {other_table} id={other_row} (addresses are unique case-insensitively)",
            )
        else:
            seen[folded] = (table, row)

    for a in snap.accounts:
        dom = domains.get(a.domain_id)
        if dom is None or dom.status == "disabled" or a.status == "disabled":
            continue
        address = f"{a.local_part}@{dom.name}"
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
        yield from claim(address, "account", a.id)

    for al in snap.aliases:
        dom = domains.get(al.domain_id)
        if dom is None or dom.status == "disabled":
            continue
        address = f"{al.local_part}@{dom.name}" if al.local_part else f"@{dom.name}"
        if al.local_part:
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
            problem = address_problem(target_address)
            if problem:
                yield Problem("alias", al.id, address, problem)
        yield from claim(address, "alias", al.id)

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
import unicodedata
from collections.abc import Callable, Iterator
from typing import NamedTuple

from mapsync import log
from mapsync.snapshot import (
    Account,
    Alias,
    Domain,
    Snapshot,
    alias_domains,
    live_domains,
    paused_gc,
)

_log = log.get("validate")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
# RFC 5322 atext plus dots; no quoting, no whitespace, no comma, no colon, no '@'.
_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
# Exactly the local parts local_part_problem accepts (1-64 characters, not starting with '#',
# _LOCAL's characters, all lowercase): one C match per row; the function runs only on a miss.
GOOD_LOCAL = re.compile(
    r"(?!#)(?=.{1,64}\Z)[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z", re.S
)
# GOOD_LOCAL without '+': the accounts' short way below, so that an account whose local part
# holds one goes the long way, which notes it for _tagged_accounts.
_PLAIN_LOCAL = re.compile(GOOD_LOCAL.pattern.replace("*+/", "*/"), re.S)
# [0-9], not \d: Python's \d and int() accept other scripts' digits, which no daemon reads.
_NEXTHOP = re.compile(r"^(?:\[([^\[\]\s]+)\]|([^\[\]\s:]+))(?::([0-9]{1,5}))?\Z")
# The grammar of a host a daemon is given (Postfix nexthop, Exim host list, Dovecot host=):
# dotted-quad IPv4 without leading zeros, or IPv6 hex digits, colons (and an embedded IPv4);
# never a scope id ('%eth0'): ipaddress accepts any text after '%', spaces and '=' included,
# which would become extra fields of a Dovecot proxy line.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"^{_OCTET}(?:\.{_OCTET}){{3}}\Z")
_IPV6_CHARS = re.compile(r"^[0-9a-fA-F:.]{2,45}\Z")


class Problem(NamedTuple):
    """One invalid row: ``table`` and ``row`` (primary key) locate it, ``key`` names it.

    ``field``: the one column at fault when only some maps carry it (``password_hash``,
    ``quota_bytes``, ``imap_host``, ...), so ``--skip-invalid`` leaves the row out of those
    maps' channels only (maps declare what they read: :attr:`mapsync.maps.base.Map.reads`);
    None when the row as a whole is wrong (its address, its domain, where it routes, its home).
    A problem in ``password_hash`` costs the account its login only, never its mail
    (:attr:`login`); one in ``quota_bytes`` its quota rule only (:attr:`quota`).
    ``where``: how the source names the row in its own tables (``alias 'sales@example.com'``),
    set by :func:`check` from :attr:`Snapshot.describe`; None prints mapsync's own
    ``table id=N 'key'``.
    ``public``: the reason without the value it quotes, where that value is not for every
    channel that skips the row (a bad home skips the account everywhere, but only a
    mailstore's ``dovecot_users`` carries homes): what a manifest records (:meth:`note`).
    The publisher's log and its errors give ``reason``, for the operator.
    """

    table: str
    row: int
    key: str
    reason: str
    field: str | None = None
    where: str | None = None
    public: str | None = None

    @property
    def login(self) -> bool:
        """The problem is the account's login only (its password hash): ``--skip-invalid``
        keeps the account's mail and drops just its login."""
        return self.table == "account" and self.field == "password_hash"

    @property
    def quota(self) -> bool:
        """The problem is the account's quota only: ``--skip-invalid`` keeps the account and
        its userdb line, without a quota rule."""
        return self.table == "account" and self.field == "quota_bytes"

    def __str__(self) -> str:
        if self.where is not None:
            return f"{self.where}: {self.reason}"
        key = self.key if len(self.key) <= 200 else self.key[:200] + "…"  # a 10 KB value
        if self.table == "sender_grant":  # no id of its own: the row is its account's
            return f"sender_grant of account id={self.row} {key!r}: {self.reason}"
        return f"{self.table} id={self.row} {key!r}: {self.reason}"

    def note(self) -> str:
        """The problem as every channel skipping the row may read it (a manifest's
        ``skipped``): as :meth:`__str__`, with ``public`` for the reason where set."""
        return str(self if self.public is None else self._replace(reason=self.public))


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
    if not local:
        return "local part is empty"
    if len(local) > 64:
        return f"local part longer than 64 characters ({len(local)})"
    if local != local.lower():
        return "local part not lowercase"
    if local.startswith("#"):
        return "local part starts with '#' (a text map would read the line as a comment)"
    if not local.isascii():
        return (
            "local part has non-ASCII characters (internationalized local parts are not supported)"
        )
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return "local part starts or ends with '.' or has '..' in it"
    if not _LOCAL.match(local):
        return "local part has characters that are not allowed (whitespace, ',', ':', '@', quotes, control characters)"
    return None


def address_problem(address: str) -> str | None:
    """Why ``address`` (an alias target) is not a plain ``local@domain``, or None."""
    local, at, domain = address.rpartition("@")
    if not at:
        return f"target {address!r} is not an address (local@domain)"
    if not address.isascii():
        # str.lower() maps some non-ASCII letters to ASCII ('\u212a' KELVIN SIGN → 'k'), so
        # the checks below, on the lowercased parts, would pass what the map then carries.
        return f"target {address!r} has non-ASCII characters (use the A-label domain)"
    # A target is a value, not a key: an external mailbox may keep its case.
    problem = local_part_problem(local.lower()) or domain_name_problem(domain.lower())
    return f"target {address!r}: {problem}" if problem else None


def is_ip(host: str) -> bool:
    """``host`` is a dotted-quad IPv4 address or an IPv6 address without a scope id."""
    if _IPV4.match(host):
        return True
    if not _IPV6_CHARS.match(host):
        return False
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address (:func:`is_ip`) nor a hostname, or None."""
    if is_ip(host):
        return None
    if "%" in host:
        return f"host {host!r}: an IPv6 scope id ('%...') is not allowed"
    problem = domain_name_problem(host)
    if problem is None and host.rsplit(".", 1)[-1].isdigit():
        # RFC 1123 2.1: a name's last label is never all digits; this one is a bad address.
        problem = "not an IP address, and a hostname's last label is never all digits"
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
    if m.group(2) and is_ip(m.group(2)):
        # Postfix would look up MX records of a bare address; an address needs brackets.
        return f"relay_nexthop {nexthop!r}: an IP address must be in brackets ([{m.group(2)}])"
    return host_problem(m.group(1) or m.group(2))


# A home _home_problems accepts without looking at each character: absolute, printable ASCII
# without ':' or a space (it still refuses a '..' segment).
GOOD_HOME = re.compile(r"/[!-9;-~]*\Z")

# Every scheme's alphabet (crypt's [./0-9A-Za-z$], base64, argon2's ',' and '=') is printable
# ASCII; a passwd-file field ends at ':'.
_HASH = re.compile(r"^[!-9;-~]+\Z")


def _unprintable(c: str) -> bool:
    """Whitespace (any of Unicode's), control, format, unassigned or private-use characters."""
    return c.isspace() or unicodedata.category(c)[0] in "CZ"


_IDNA_DOTS = "\u3002\uff0e\uff61"  # IDNA label separators besides '.' (RFC 3490 3.1)


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
    # The U-label becomes a map key as it is: nothing a key may not hold (whitespace of any
    # script ends a Postfix key; the renderer refuses those for every channel), no control,
    # format or unassigned code point, no dot that IDNA reads as a label separator.
    bad = next((c for c in unicode if _unprintable(c) or c in _IDNA_DOTS), None)
    if bad is not None:
        what = " ".join(filter(None, (f"U+{ord(bad):04X}", unicodedata.name(bad, ""))))
        return (
            f"name_unicode {unicode!r} contains {what} "
            "(whitespace, control, format and label-separator characters are not allowed)"
        )
    return None


def check(
    snap: Snapshot,
    proxy: bool = False,
    customers: bool = False,
    *,
    outside: Outside | None = None,
) -> list[Problem]:
    """Every rule violation in ``snap``; an empty list means it may be published.

    ``proxy``: a channel carries ``dovecot_proxy``, so every mailstore's imap_host must be an IP.
    ``customers``: a channel carries the customer id in its userdb (``customer_field``), so the
    ext_id of every customer with a live account must fit a userdb field value.
    ``outside``: ``snap`` is a part of the database (the rows an incremental publish touches,
    :mod:`mapsync.publish.incremental`); what it says of the rest stands in for them.
    """
    with paused_gc():
        try:
            problems = list(_check(snap, proxy, outside))
            if customers:
                problems += _customers(snap)
        except TypeError:
            # Bytes where text belongs (SQLite keeps a BLOB in a TEXT column): the checks,
            # made for text, cannot read them. Named here, looked for only then.
            problems = list(_blob_problems(snap))
            if not problems:
                raise
    if snap.problems:
        # The source's own reason for a row comes first, and stands for the row: a domain
        # naming an unknown mailstore is that, not also "has no default mailstore".
        named = {(p.table, p.row) for p in snap.problems}
        problems = [*snap.problems, *(p for p in problems if (p.table, p.row) not in named)]
    describe = snap.describe
    if describe is not None:
        problems = [p._replace(where=describe(p.table, p.row, p.key)) for p in problems]
    return problems


def _blob_problems(snap: Snapshot) -> Iterator[Problem]:
    """Every text column of ``snap`` holding bytes (a BLOB), named with its row."""

    def blobs(**columns: object) -> list[str]:
        found = [name for name, value in columns.items() if isinstance(value, bytes)]
        targets = columns.get("targets")
        if isinstance(targets, tuple) and any(isinstance(x, bytes) for x in targets):
            found.append("target")
        return found

    def key(value: object) -> str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    rows: list[tuple[str, int, object, list[str]]] = [
        *(("domain", d.id, d.name, blobs(name=d.name, name_unicode=d.name_unicode,
           relay_nexthop=d.relay_nexthop)) for d in snap.domains),
        *(("mailstore", m.id, m.name, blobs(name=m.name, lmtp_host=m.lmtp_host,
           imap_host=m.imap_host)) for m in snap.mailstores),
        *(("account", a.id, a.local_part, blobs(local_part=a.local_part,
           password_hash=a.password_hash, home=a.home)) for a in snap.accounts),
        *(("alias", al.id, al.local_part, blobs(local_part=al.local_part, targets=al.targets))
          for al in snap.aliases),
        *(("forward", al.id, al.local_part, blobs(local_part=al.local_part, targets=al.targets))
          for al in snap.forwards),
        *(("sender_grant", g.account_id, g.address, blobs(address=g.address))
          for g in snap.sender_grants),
        *(("customer", c, e, blobs(ext_id=e)) for c, e in snap.customers.items()),
    ]  # fmt: skip
    for table, row, value, columns in rows:
        for column in columns:
            yield Problem(table, row, key(value), f"{column} is bytes (a BLOB), not text", None)


class Outside(NamedTuple):
    """The rest of the database, for :func:`check` of a part of it: whether an address
    (lowercase, its domain hosted) is an account's or an alias's there, and the hosted domain
    names that have a catch-all. No postmaster warnings: the whole run gave them."""

    claimed: Callable[[str], bool]
    catchall: frozenset[str]


# The claims of the addresses seen (see _check): by lowercase domain name, then lowercase
# local part ('' for the catch-all), the row that claimed each.
Claims = dict[str, dict[str, Account | Alias]]
_NO_CLAIMS: dict[str, Account | Alias] = {}


def claimant(seen: Claims, address: str) -> Account | Alias | None:
    """The row that claimed ``address`` (lowercase: ``local@domain`` or ``@domain``)."""
    local, _, domain = address.rpartition("@")
    return seen.get(domain, _NO_CLAIMS).get(local)


def _check(
    snap: Snapshot, proxy: bool = False, outside: Outside | None = None
) -> Iterator[Problem]:
    stores = {m.id: m for m in snap.mailstores}
    domains = {d.id: d for d in snap.domains}

    for m in snap.mailstores:
        if proxy and not host_problem(m.imap_host) and not is_ip(m.imap_host):
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
            if type(port) is not int:
                # SQLite keeps whatever text an INTEGER column is given: '24 host=x' too.
                yield Problem(
                    "mailstore",
                    m.id,
                    m.name,
                    f"{field}_port {port!r} is not a number",
                    f"{field}_port",
                )
            elif not 0 < port < 65536:
                yield Problem(
                    "mailstore", m.id, m.name, f"{field}_port {port} out of range", f"{field}_port"
                )

    # Postfix's keys of each domain (A-label, folded U-label): two domains must not share one.
    # A disabled domain is in no map: it answers nothing, so it takes no key.
    postfix_key = {d.name: d for d in snap.domains if d.status != "disabled"}
    for d in snap.domains:
        problem = domain_name_problem(d.name)
        if problem:
            yield Problem("domain", d.id, d.name, problem)
        if d.name_unicode:
            problem = _unicode_problem(d.name, d.name_unicode)
            if problem:
                yield Problem("domain", d.id, d.name, problem)
            folded = d.name_unicode.casefold()
            other = postfix_key.setdefault(folded, d) if d.status != "disabled" else d
            if other.id != d.id:
                yield Problem(
                    "domain",
                    d.id,
                    d.name,
                    f"name_unicode {d.name_unicode!r} is looked up by Postfix as {folded!r} (it "
                    f"folds case fully: 'ß' → 'ss'), which domain {other.name!r} answers already",
                )
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

    # Each address claimed once, case-insensitively: the row that claimed it, by the domain's
    # lowercase name, then by the lowercase local part ('' for a catch-all). Keyed so, the
    # local part read from the database is the key itself (a GOOD_LOCAL one has no capital):
    # no "local@domain" string is made per row (1.5M of them at 1M accounts, 110 MB and
    # 0.5 s), only for the rows a problem names. The rows' loops below run once per row of
    # the largest tables, so they inline the claim and try GOOD_LOCAL (C) before the
    # functions.
    seen: Claims = {}
    claims_of: dict[int, dict[str, Account | Alias]] = {}
    for d in snap.domains:
        claims_of[d.id] = seen.setdefault(d.name.lower(), {})
    good_local = GOOD_LOCAL.match
    plain_local = _PLAIN_LOCAL.match
    good_home = GOOD_HOME.match
    secrets = snap.secrets
    catchall: set[str] = set()  # the domains with a catch-all claim ('' in theirs)
    tagged: list[tuple[str, Account]] = []  # the accounts claiming a local part with a '+'
    # Home as the filesystem reads it → the first live account given it (the same home on
    # another mailstore is another directory: those by (mailstore id, home)); and by that
    # first account's id, every account given its home on its mailstore.
    homes: dict[str, Account] = {}
    elsewhere: dict[tuple[int, str], Account] = {}
    shared: dict[int, list[Account]] = {}

    # The common account first, tested without a call or an attribute: in a live hosted
    # domain whose default mailstore is active (plain_claims: the domain's claims), on that
    # default, not disabled, its local part GOOD_LOCAL, no home or quota to look at and no
    # hash to check. Nothing but its claim is left to make; any other row takes the long way.
    plain_claims = {
        d.id: claims_of[d.id]
        for d in snap.domains
        if d.status != "disabled"
        and d.kind == "hosted"
        and d.default_mailstore_id
        and (store := stores.get(d.default_mailstore_id)) is not None
        and store.active
    }
    # The rows are unpacked, not read by attribute: 1M accounts, eight fields each.
    for claim in snap.accounts:
        aid, domain_id, local, mailstore_id, status, password_hash, home, quota, _ = claim
        claims = plain_claims.get(domain_id)
        if (
            claims is not None
            and mailstore_id is None
            and home is None
            and quota is None
            and not secrets
            and status != "disabled"
            and plain_local(local)
        ):
            first = claims.setdefault(local, claim)
            if first is not claim:
                yield _duplicate("account", aid, f"{local}@{domains[domain_id].name}", first)
            continue
        dom = domains.get(domain_id)
        if dom is None:
            # Its domain deleted without it (a writer with foreign keys off, SQLite's
            # default): it was left out of every map without a word.
            yield Problem("account", aid, local, f"domain_id {domain_id} is no domain")
            continue
        if dom.status == "disabled" or status == "disabled":
            continue
        good = good_local(local) is not None
        if not good:
            problem = local_part_problem(local)
            if problem:
                yield Problem("account", aid, f"{local}@{dom.name}", problem)
        if dom.kind != "hosted":
            yield Problem(
                "account",
                aid,
                f"{local}@{dom.name}",
                f"account in {'an' if dom.kind == 'alias' else 'a'} {dom.kind} domain (only "
                "hosted domains have mailboxes)",
            )
            continue
        store_id = mailstore_id or dom.default_mailstore_id
        store = stores.get(store_id) if store_id else None
        if store is None:
            yield Problem("account", aid, f"{local}@{dom.name}", "resolves to no mailstore")
        elif not store.active:
            yield Problem(
                "account", aid, f"{local}@{dom.name}", f"mailstore {store.name!r} is not active"
            )
        # An account already without its login (no hash, nologin) has no password to check.
        if secrets and (password_hash or status != "login_disabled"):
            for problem in _password_problems(password_hash):
                yield Problem("account", aid, f"{local}@{dom.name}", problem, "password_hash")
        # Read for every run, not only with the secrets: a bad home fails the row in every
        # channel, so a run of the MX alone must see it too (else its recipients flip-flop).
        if (home is None or (good_home(home) and "/.." not in home)) and (
            quota is None or (type(quota) is int and quota >= 0)
        ):
            pass  # what _home_problems accepts, tested in C (its per-character test is slow)
        else:
            for column, problem, public in _home_problems(home, quota):
                yield Problem("account", aid, f"{local}@{dom.name}", problem, column, public=public)
                if column is None:
                    home = None  # refused as it is: not compared with the others
        if home is not None and store is not None:
            if "//" in home or "/./" in home or home.endswith(("/", "/.")):
                home = same_home(home)  # the common home is spelt as its directory
            first_home = homes.setdefault(home, claim)
            if first_home is not claim:
                first_store = (
                    first_home.mailstore_id or domains[first_home.domain_id].default_mailstore_id
                )
                if first_store != store.id:
                    first_home = elsewhere.setdefault((store.id, home), claim)
                if first_home is not claim:
                    shared.setdefault(first_home.id, [first_home]).append(claim)
        if not local:
            catchall.add(dom.name.lower())  # the catch-all's claim (an account is refused)
        key = local if good else local.lower()
        first = claims_of[domain_id].setdefault(key, claim)
        if first is not claim:
            yield _duplicate("account", aid, f"{local}@{dom.name}", first)
        elif "+" in key:
            tagged.append((key, claim))

    yield from _shared_homes(shared, domains)
    yield from _tagged_accounts(tagged, claims_of, domains, warn=outside is None)

    bad_targets: set[str] = set()
    # The common alias first, as the common account above: in a live hosted domain, its
    # local part GOOD_LOCAL, every target a plain address (address_problem's own test,
    # inline: local@domain, both parts valid once lowercased). Any other row takes the long
    # way, which finds its problems in their order (the short one yielded nothing for it).
    hosted_claims = {
        d.id: claims_of[d.id] for d in snap.domains if d.status != "disabled" and d.kind == "hosted"
    }
    for row in snap.aliases:
        alias_id, domain_id, local, targets = row
        claims = hosted_claims.get(domain_id)
        if claims is not None and targets and local and good_local(local):
            for target_address in targets:
                tlocal, at, tdomain = target_address.rpartition("@")
                if not (
                    at
                    and target_address.isascii()
                    and good_local(tlocal.lower())
                    and not domain_name_problem(tdomain.lower())
                ):
                    break
            else:
                first = claims.setdefault(local, row)
                if first is not row:
                    yield _duplicate("alias", alias_id, f"{local}@{domains[domain_id].name}", first)
                continue
        dom = domains.get(domain_id)
        if dom is None:
            yield Problem("alias", alias_id, local, f"domain_id {domain_id} is no domain")
            continue
        if dom.status == "disabled":
            continue
        address = f"{local}@{dom.name}" if local else f"@{dom.name}"
        good = not local or good_local(local) is not None
        if not good:
            problem = local_part_problem(local)
            if problem:
                yield Problem("alias", alias_id, address, problem)
        if dom.kind != "hosted":
            yield Problem(
                "alias",
                alias_id,
                address,
                "alias in an alias domain (define it in the target domain)"
                if dom.kind == "alias"
                else "alias in a relay domain (its mail is passed on, not delivered here)",
            )
            continue
        if not targets:
            yield Problem("alias", alias_id, address, "alias has no targets")
        for target_address in targets:
            # address_problem's own test, inline: local@domain, both parts valid once lowercased
            tlocal, at, tdomain = target_address.rpartition("@")
            if (
                at
                and target_address.isascii()
                and good_local(tlocal.lower())
                and not domain_name_problem(tdomain.lower())
            ):
                continue
            problem = address_problem(target_address)
            if problem:
                bad_targets.add(target_address)
                yield Problem("alias", alias_id, address, problem)
        if not local:
            catchall.add(dom.name.lower())
        first = claims_of[domain_id].setdefault(local if good else local.lower(), row)
        if first is not row:
            yield _duplicate("alias", alias_id, address, first)

    yield from _forwards(snap, domains, seen, bad_targets)
    if outside is not None:
        catchall |= outside.catchall
    yield from alias_graph(
        snap, domains, seen, bad_targets, catchall, outside.claimed if outside else None
    )

    accounts = {a.id for a in snap.accounts}
    for g in snap.sender_grants:
        if g.account_id not in accounts:
            if outside is None:  # a part holds the grants of its own accounts only
                _log.warning(
                    "sender grant of no account ignored (its account deleted without it)",
                    account_id=g.account_id,
                    address=g.address,
                )
            continue
        local, at, domain = g.address.rpartition("@")
        problem = (
            f"{g.address!r} is not an address or @domain"
            if not at
            else "has non-ASCII characters"
            if not g.address.isascii()
            else (local_part_problem(local.lower()) if local else None)
            or domain_name_problem(domain.lower())
        )
        if problem:
            yield Problem("sender_grant", g.account_id, g.address, problem)

    for d in () if outside is not None else snap.domains:
        if d.kind == "hosted" and d.status != "disabled" and "postmaster" not in claims_of[d.id]:
            # A warning, not a refusal: refusing would stop the domain's mail (or every
            # publish) over a missing role address, a worse outage than the missing address.
            _log.warning(
                "hosted domain has no postmaster@ (RFC 5321 requires it)", domain=d.name, row=d.id
            )


# A userdb extra-field value: visible ASCII, no space (it ends the field), no '%' (Dovecot
# expands %variables in passwd-file extra fields).
_EXT_ID = re.compile(r"[!-$&-~]{1,64}\Z")


def _customers(snap: Snapshot) -> Iterator[Problem]:
    """The ext_id of each customer a live account belongs to (its own, else its domain's)."""
    domains = {i: d for i, d in live_domains(snap.domains).items() if d.kind == "hosted"}
    used: set[int] = set()
    for a in snap.accounts:
        d = domains.get(a.domain_id)
        if d is None or a.status == "disabled":
            continue
        customer = a.customer_id if a.customer_id is not None else d.customer_id
        if customer is not None:
            used.add(customer)
    for cid in sorted(used):
        if cid not in snap.customers:
            # A warning, as a sender grant of no account is: the userdb line loses its field
            # (what a customer with no ext_id gives), the mailbox works.
            _log.warning(
                "customer_id of no customer: its accounts' userdb lines have no customer field"
                " (the customer deleted without them?)",
                customer_id=cid,
            )
            continue
        ext_id = snap.customers[cid]
        if ext_id is not None and not _EXT_ID.match(ext_id):
            yield Problem(
                "customer",
                cid,
                ext_id,
                f"ext_id {ext_id!r} cannot be a userdb field value (customer_field): "
                "1-64 visible ASCII characters, no space, no '%'",
                "ext_id",
            )


def _forwards(
    snap: Snapshot, domains: dict[int, Domain], seen: Claims, bad: set[str]
) -> Iterator[Problem]:
    """A forward belongs to a live account's own address and lists plain addresses."""
    forwarded: set[str] = set()
    for fw in snap.forwards:
        dom = domains.get(fw.domain_id)
        if dom is None or dom.status == "disabled":
            continue
        address = f"{fw.local_part}@{dom.name}"
        if not isinstance(claimant(seen, address.lower()), Account):
            yield Problem("forward", fw.id, address, "forward of an address that is no account")
            continue
        if address.lower() in forwarded:
            yield Problem("forward", fw.id, address, "account forwarded twice")
        forwarded.add(address.lower())
        if not fw.targets:
            yield Problem("forward", fw.id, address, "forward has no targets")
        for target in fw.targets:
            problem = address_problem(target)
            if problem:
                bad.add(target)
                yield Problem("forward", fw.id, address, problem)


def same_home(home: str) -> str:
    """``home`` as the filesystem resolves it: '//', '/./' and a trailing '/' make no other
    directory ('..' is refused before). The string itself where it has none of them."""
    if "//" not in home and "/./" not in home and not home.endswith(("/", "/.")):
        return home
    return "/" + "/".join(part for part in home.split("/") if part not in ("", "."))


def _shared_homes(
    shared: dict[int, list[Account]], domains: dict[int, Domain]
) -> Iterator[Problem]:
    """Each account given the home of another account on its mailstore (the one with the
    lowest id keeps it, whatever the order read): Dovecot would deliver both users' mail into
    one mailbox, and each would read the other's. Only ``dovecot_users`` carries homes (field
    ``home``); the note a manifest records leaves the directory out."""
    for accounts in shared.values():
        first, *others = sorted(accounts, key=lambda a: a.id)
        owner = f"{first.local_part}@{domains[first.domain_id].name}"
        why = (
            f"is {owner}'s home too (Dovecot would deliver both users' mail into one mailbox; "
            "each user needs a home of its own)"
        )
        for a in others:
            yield Problem(
                "account",
                a.id,
                f"{a.local_part}@{domains[a.domain_id].name}",
                f"home {same_home(a.home or '')!r} {why}",
                "home",
                public=f"home {why}",
            )


def _tagged_accounts(
    tagged: list[tuple[str, Account]],
    claims_of: dict[int, dict[str, Account | Alias]],
    domains: dict[int, Domain],
    warn: bool = True,
) -> Iterator[Problem]:
    """Each account of ``tagged`` (its claim's key, the account) where the part before the
    '+' is another account on its mailstore: the MX routes its mail to it whole, but
    Dovecot's LMTP (recipient_delimiter, '+' by default) looks up only the part before the
    '+' and delivers it into that other account's mailbox. The others are a warning (``warn``:
    a whole run's): with the shipped Dovecot configuration their mail bounces at the
    mailstore ("User doesn't exist") and their login is refused, but a mailstore without a
    recipient_delimiter, and with '+' in auth_username_chars, serves them."""
    for key, row in tagged:
        other = claims_of[row.domain_id].get(key.partition("+")[0])
        default = domains[row.domain_id].default_mailstore_id
        if not isinstance(other, Account) or (row.mailstore_id or default) != (
            other.mailstore_id or default
        ):
            if warn:
                _log.warning(
                    "account's local part holds '+': a mailstore's Dovecot with "
                    "recipient_delimiter = + (the shipped configuration) delivers none of its "
                    "mail and refuses its login (docs/maps.md)",
                    address=f"{row.local_part}@{domains[row.domain_id].name}",
                    row=row.id,
                )
            continue
        name = domains[row.domain_id].name
        yield Problem(
            "account",
            row.id,
            f"{row.local_part}@{name}",
            "local part holds '+': Dovecot's LMTP on its mailstore (recipient_delimiter"
            " = +, the default) delivers its mail to the part before it, account "
            f"id={other.id} '{other.local_part}@{name}' (another mailbox)",
        )


def _duplicate(table: str, row: int, address: str, first: Account | Alias) -> Problem:
    """``address`` of ``table`` row ``row`` claimed already by the row ``first``."""
    other_table, other_row = ("account" if isinstance(first, Account) else "alias"), first.id
    return Problem(
        table,
        row,
        address,
        f"address also defined by {other_table} id={other_row} (addresses are unique case-insensitively)",
    )


MAX_FANOUT = 1000


def alias_graph(
    snap: Snapshot,
    domains: dict[int, Domain],
    seen: Claims,
    bad_targets: set[str],
    catchall: set[str] | None = None,
    claimed: Callable[[str], bool] | None = None,
) -> Iterator[Problem]:
    """Fan-out, targets inside our own domains that lead nowhere, and alias cycles.
    ``catchall``: the domains with a catch-all claim in ``seen`` (found from ``seen`` if
    None; the caller that filled ``seen`` knows them without a pass over every domain).
    ``claimed``: whether an address not in ``seen`` is claimed by a row outside ``snap``
    (see :class:`Outside`)."""
    live = live_domains(domains.values())
    alias_of = {a.name: live[t].name for t, aliases in alias_domains(live).items() for a in aliases}
    hosted = {d.name for d in live.values() if d.kind == "hosted"}
    # The names of this cluster's domain rows that are not live (disabled, or their
    # customer's closed): a target there reaches nothing published, and an MX sends its mail
    # out to the domain's MX, often this cluster again (a bounce, or a loop).
    dead = {d.name for d in domains.values() if d.id not in live} - {d.name for d in live.values()}
    if catchall is None:
        catchall = {name for name, claims in seen.items() if "" in claims}
    # The aliases that can be nodes of the graph, and their addresses, first: a target then
    # joins its alias's edges only if it is one of them (a cycle runs through aliases only).
    nodes = [
        (table, al, f"{al.local_part}@{dom.name}")
        for table, rows in (("alias", snap.aliases), ("forward", snap.forwards))
        for al in rows
        if (dom := live.get(al.domain_id)) is not None and dom.kind == "hosted" and al.local_part
    ]
    addresses = {address for _, _, address in nodes}
    # address → its alias targets (None: none); the last alias of an address wins, in the
    # place of its first, as the duplicate itself is refused above.
    edges: dict[str, list[str] | None] = {}
    where: dict[str, tuple[str, int]] = {}
    for table, al, address in nodes:
        if len(al.targets) > MAX_FANOUT:
            yield Problem(
                table, al.id, address, f"{len(al.targets)} targets, more than {MAX_FANOUT}"
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
                if tdomain in dead:
                    yield Problem(
                        table,
                        al.id,
                        address,
                        f"target {target!r} is in domain {tdomain!r}, which is disabled "
                        "(nothing here receives it)",
                    )
                continue  # mail leaves the cluster: not ours to check
            if (
                "+" in local
                and local not in seen.get(tdomain, _NO_CLAIMS)
                and (claimed is None or not claimed(resolved))
            ):
                # user+tag@: Postfix (recipient_delimiter = +) and the Exim routers deliver
                # what no row claims whole to the part before the first '+'.
                base = local.partition("+")[0]
                if base and (
                    base in seen.get(tdomain, _NO_CLAIMS)
                    or (claimed is not None and claimed(f"{base}@{tdomain}"))
                ):
                    local, resolved = base, f"{base}@{tdomain}"
            if resolved == address and table == "forward":
                continue  # a forward keeping a copy: Postfix delivers an address to itself
            if (
                local not in seen.get(tdomain, _NO_CLAIMS)
                and tdomain not in catchall
                and (claimed is None or not claimed(resolved))
            ):
                yield Problem(
                    table,
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
            where[address] = (table, al.id)
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
                yield Problem(
                    where[nxt][0], where[nxt][1], nxt, "alias cycle: " + " → ".join(cycle)
                )
                continue
            if not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(graph[nxt])))
                path.append(nxt)


STRONG_SCHEMES = {
    "SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2I", "ARGON2ID",
    "PBKDF2", "SSHA512", "SSHA256",
}  # fmt: skip
WEAK_SCHEMES = {"MD5-CRYPT", "SSHA", "SHA", "SMD5", "CRYPT", "SHA256", "SHA512", "PLAIN-MD5"}
_CRYPT_PREFIXES = ("$6$", "$5$", "$2y$", "$2b$", "$2a$")
# Dovecot reads a scheme in any case ({sha512-crypt} is SHA512-CRYPT).
_SCHEME = re.compile(r"^\{([A-Za-z0-9.-]+)\}")


def _password_problems(password_hash: str | None) -> Iterator[str]:
    """The passwd-file's password field: a known, strong scheme; nothing that splits a field."""
    m = _SCHEME.match(password_hash or "")
    scheme = m.group(1).upper() if m is not None else None
    if not password_hash:
        yield "no password hash"
    elif scheme in ("PLAIN", "CLEARTEXT"):
        yield f"password scheme {scheme} is not allowed (a cleartext password is never published)"
    elif not _HASH.match(password_hash):
        yield "password hash contains ':', whitespace, a control or a non-ASCII character"
    else:
        if scheme is None and not password_hash.startswith(_CRYPT_PREFIXES):
            yield "password hash has no {SCHEME} prefix"
        elif scheme is not None and scheme not in STRONG_SCHEMES:
            # Dovecot's encoding suffix (SHA512-CRYPT.B64) changes how it is written, not the hash.
            base = scheme.removesuffix(".B64").removesuffix(".HEX").removesuffix(".BASE64")
            if base in WEAK_SCHEMES:
                _log.warning("weak password scheme", scheme=scheme)
            elif base not in STRONG_SCHEMES:
                yield f"password scheme {scheme} is not allowed (cleartext or unknown)"


def _home_problems(
    home: str | None, quota_bytes: int | None = None
) -> Iterator[tuple[str | None, str, str | None]]:
    """The passwd-file's home and quota fields: an absolute home inside no '..', nothing
    that splits a field; a quota that is a non-negative integer. Yields (field, reason,
    the reason without the value where not every channel skipping the row carries it:
    :attr:`Problem.public`).

    A bad quota is the quota rule's problem alone (field ``quota_bytes``: ``--skip-invalid``
    keeps the userdb line without ``userdb_quota_rule``). A bad home is the row's (field
    None): without its userdb line the mailstore's LMTP answers "user unknown" after the MX
    accepted the mail (a bounce to a forged sender), so the account leaves every channel and
    the MX refuses at RCPT instead.
    """
    if quota_bytes is not None and type(quota_bytes) is not int:
        # SQLite: text in an INTEGER column
        yield "quota_bytes", f"quota_bytes {quota_bytes!r} is not a number", None
    elif quota_bytes is not None and quota_bytes < 0:
        yield "quota_bytes", f"quota_bytes {quota_bytes} is negative", None
    # A bad home skips the account in every channel (an MX's too), which must not learn it.
    if home is not None:
        if not home.startswith("/") or ":" in home or any(map(_unprintable, home)):
            why = "must be an absolute path without ':' or whitespace"
            yield None, f"home {home!r} {why}", f"home {why}"
        elif ".." in home.split("/"):
            yield None, f"home {home!r} contains '..'", "home contains '..'"

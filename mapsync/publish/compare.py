"""``mapsync compare``: the operator's live SQL lookups against the published maps, address by
address, before Postfix and Dovecot are switched over (docs/migrating.md).

*Before* is what the daemons use today: the Postfix parameters of ``main.cf`` (or ``--table``)
with their SQL tables (:mod:`mapsync.sources.live`) and Dovecot's SQL passdb/userdb. *After* is
the latest release of the publisher's channels, read from its text maps, as
agents/postfix-mx/main.cf and agents/dovecot-store/dovecot.conf use them.

The two setups use different Postfix parameters (PostfixAdmin's ``virtual_mailbox_domains`` +
``virtual_mailbox_maps`` + ``virtual_transport`` against mapsync's ``relay_domains`` +
``relay_recipient_maps`` + ``transport_maps`` to a mailstore's LMTP), so the values of one
parameter cannot be compared with another's. What is compared is what the mail system *does*
with each address, evaluated by Postfix's documented rules on each side:

- ``domain``: is the domain ours, and hosted (delivered to a mailbox) or relayed;
- ``accepted``: does the MX accept the recipient at SMTP time;
- ``delivery``: after virtual alias expansion (virtual(5): ``user@domain``, then ``@domain``;
  the first table of a list that answers wins), where each final recipient's mail goes:
  a mailbox (and its home), a relay next hop, or elsewhere;
- ``senders``: who may send as the address (``smtpd_sender_login_maps``);
- for each user Dovecot knows on either side: ``userdb`` (exists), ``login``, ``password``
  (scheme-normalized; never printed), ``home``, ``uid``, ``gid``, ``quota``.

Where mapsync differs on purpose (docs/postfixadmin.md, "Where mapsync deliberately
differs"), the difference is reported too, labelled ``expected`` with the reason.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mapsync import log
from mapsync.config import PublisherConfig
from mapsync.errors import ConfigError, MapsyncError
from mapsync.formats import text
from mapsync.publish.repository import Repository
from mapsync.sources.live import (
    TABLE_TYPES,
    Connections,
    DovecotSql,
    SqlTable,
    dovecot_sql,
    read_settings,
    sql_table,
)

_log = log.get("compare")

# The Postfix parameters whose answers decide what happens to an address.
PARAMETERS = (
    "virtual_mailbox_domains",
    "virtual_alias_domains",
    "virtual_alias_maps",
    "virtual_mailbox_maps",
    "relay_domains",
    "relay_recipient_maps",
    "transport_maps",
    "smtpd_sender_login_maps",
)
_DOMAIN_LISTS = ("virtual_mailbox_domains", "virtual_alias_domains", "relay_domains")
PROBE = "mapsync-compare-probe"  # the local part of an address no one has, in every domain

# Why mapsync differs on purpose (docs/postfixadmin.md); the text goes into the report.
WHY_PSEUDO = "PostfixAdmin's pseudo-domain ALL is no mail domain"
WHY_VACATION = "the vacation domain is published as a relay domain to vacation_nexthop"
WHY_BOUNCE = "the live lookups accept it and then bounce it; mapsync refuses it at SMTP time"
WHY_NOWHERE = "a target that leads nowhere (no such mailbox) is left out"
WHY_NOWHERE_CATCHALL = (
    "an alias whose every target leads nowhere is left out: the catch-all takes its mail"
)
WHY_INACTIVE_TARGET = (
    "a target in a domain of the database that is not accepted (inactive) is left out"
)
WHY_INACTIVE = "the domain is not accepted (inactive): mapsync publishes nothing for its rows"
WHY_RELAY_MAILBOX = "a mailbox in a relay (backup-MX) domain is not delivered here"
WHY_CLEARTEXT = "cleartext passwords are never published: no login until it is hashed"


@dataclass(frozen=True)
class Difference:
    """One answer that differs: ``expected`` says why mapsync differs on purpose (or None)."""

    address: str
    check: str
    before: str
    after: str
    expected: str | None = None


@dataclass
class Comparison:
    """The result of a comparison: what was compared, and every difference."""

    addresses: int
    domains: int
    users: int
    before: list[str]
    after: dict[str, int]  # channel → serial compared
    differences: list[Difference] = field(default_factory=list)

    @property
    def unexpected(self) -> list[Difference]:
        """The differences no documented rule explains."""
        return [d for d in self.differences if d.expected is None]

    @property
    def expected(self) -> list[Difference]:
        """The differences mapsync makes on purpose (each names its reason)."""
        return [d for d in self.differences if d.expected is not None]


# --- the two sides -----------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """What Dovecot's passdb and userdb answer for one user, normalized for comparing."""

    login: bool
    password: str | None  # "{SCHEME}body", never printed
    home: str | None
    uid: str | None
    gid: str | None
    quota: int | str | None  # bytes; None: no limit; a rule compare cannot read: as written


_CRYPT_ID = re.compile(r"^\$(1|2[aby]|5|6|argon2i|argon2id)\$")
_SCHEME = re.compile(r"^\{([A-Za-z0-9.-]+)\}")


def password_key(value: str | None) -> str | None:
    """A password as something to compare: ``{SCHEME}body``, with a crypt(3) hash's many
    scheme names (CRYPT, MD5-CRYPT, SHA512-CRYPT, BLF-CRYPT) reduced to its body. A bare
    value gets its scheme by its shape, as the PostfixAdmin source publishes it (Dovecot's
    ``default_pass_scheme`` is not consulted)."""
    from mapsync.sources.postfixadmin import dovecot_password

    if not value:
        return None
    m = _SCHEME.match(value)
    if m is None:
        value = dovecot_password(value) or ""
        m = _SCHEME.match(value)
        assert m is not None
    scheme, body = m.group(1).upper(), value[m.end() :]
    if _CRYPT_ID.match(body) or scheme == "CRYPT":
        return "{CRYPT}" + body
    return "{" + scheme + "}" + body


def cleartext(key: str | None) -> bool:
    """Whether a password field holds a cleartext password (``{CLEARTEXT}``/``{PLAIN}``)."""
    return key is not None and key.startswith(("{CLEARTEXT}", "{PLAIN}"))


def _scheme(key: str | None) -> str:
    """What a password's kind is, without the hash: ``{SSHA}``, or ``{CRYPT}$6$``."""
    if not key:
        return "(none)"
    scheme = key[: key.index("}") + 1]
    m = _CRYPT_ID.match(key[len(scheme) :])
    return scheme + (m.group(0) if m else "")


def _quota(rule: object) -> int | str | None:
    if rule is None:
        return None
    value = str(rule).strip()
    m = re.fullmatch(r"\*:(bytes|storage)=(-?\d+)([kKmMgG]?)", value)
    if not m:
        return value
    n = int(m.group(2)) * (1024 if m.group(1) == "storage" else 1)
    n *= {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(3).lower()]
    return n if n > 0 else None


def _home(value: object) -> str | None:
    return str(value).rstrip("/") or "/" if value else None


def _split(value: str | None) -> list[str]:
    return [t for t in re.split(r"[,\s]+", value or "") if t]


class Side(ABC):
    """One mail system's answers. Subclasses give the lookups; the rules are Postfix's."""

    label = ""

    @abstractmethod
    def domain_class(self, domain: str) -> str | None:
        """How Postfix classes ``domain``: ``alias``, ``hosted``, ``relay``, or None (not ours)."""

    @abstractmethod
    def accepts(self, address: str) -> bool:
        """Whether Postfix accepts mail for ``address`` at RCPT time."""

    @abstractmethod
    def virtual(self, key: str) -> str | None:
        """The ``virtual_alias_maps`` answer for ``key`` (an address or ``@domain``), or None."""

    @abstractmethod
    def delivery(self, final: str) -> tuple[str, ...]:
        """Where mail for the final recipient ``final`` goes: ``("mailbox", home)``,
        ``("relay", nexthop)``, ``("transport", route)``, ``("elsewhere",)`` or ``("unknown",)``."""

    @abstractmethod
    def senders(self, address: str) -> frozenset[str] | None:
        """The logins that may send as ``address`` (None: no sender login maps to ask)."""

    @abstractmethod
    def user(self, name: str) -> User | None:
        """What Dovecot answers for user ``name`` (None: no such user, or no Dovecot side)."""

    def finals(self, address: str, depth: int = 0) -> set[str]:
        """The final recipients of ``address`` after virtual alias expansion (virtual(5)): the
        full address, then ``@domain``; a result ``@other`` keeps the local part; an address
        that expands to itself is delivered, not expanded again."""
        if depth > 20:
            return {f"{address} (alias loop)"}
        local, _, domain = address.rpartition("@")
        found = self.virtual(address)
        if found is None:
            found = self.virtual(f"@{domain}")
        if found is None:
            return {address}
        out: set[str] = set()
        for target in _split(found):
            if target.startswith("@"):
                target = local + target
            target = target.lower()
            out |= {target} if target == address else self.finals(target, depth + 1)
        return out


def _nexthop(transport: str, domain: str) -> str:
    """``smtp:[h]:25`` → ``[h]:25``; ``relay`` or ``smtp:`` → the domain (its MX)."""
    nexthop = transport.partition(":")[2].strip()
    return nexthop or domain


# Postfix's indexed file tables: postmap builds them from a text file of the same name.
FILE_TYPES = ("hash", "btree", "cdb", "lmdb", "dbm", "texthash")
_COMPILED = {"hash": ".db", "btree": ".db", "cdb": ".cdb", "lmdb": ".lmdb", "dbm": ".dir"}


class TextTable:
    """A ``hash:``/``cdb:``/... table, read from the text file postmap(1) builds it from:
    ``key value`` lines, ``#`` comments, a line starting with whitespace continues the one
    before; keys folded to lower case; the first of duplicate keys wins (as postmap keeps it)."""

    def __init__(self, kind: str, path: Path, where: str) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{where}: {kind}:{path}: cannot read: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: {kind}:{path}: not UTF-8 text") from None
        logical: list[str] = []
        for line in raw.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace() and logical:
                logical[-1] += line.rstrip()  # as postmap joins it: the indent is kept
            else:
                logical.append(line.strip())
        for line in logical:
            key, *value = re.split(r"\s+", line, maxsplit=1)
            self.entries.setdefault(key.lower(), value[0] if value else "")
        compiled = path.with_name(path.name + _COMPILED.get(kind, ""))
        if (
            kind in _COMPILED
            and compiled.exists()
            and compiled.stat().st_mtime < path.stat().st_mtime
        ):
            _log.warning(
                "the text file is newer than the table Postfix reads (run postmap); compare "
                "reads the text",
                table=f"{kind}:{path}",
            )

    def lookup(self, key: str, db: Connections) -> str | None:
        """The value of ``key`` (lower-cased), or None."""
        return self.entries.get(key.lower())


# A SQL table, a file table, or the literal domains of a *_domains list.
Lookup = SqlTable | TextTable | frozenset[str]


class LiveSide(Side):
    """Postfix and Dovecot as main.cf and dovecot-sql.conf.ext configure them today."""

    label = "before"

    def __init__(
        self,
        tables: dict[str, list[Lookup]],
        mailbox_base: str | None,
        dovecot: DovecotSql | None,
        db: Connections,
    ) -> None:
        self.tables = tables
        self.mailbox_base = mailbox_base
        self.dovecot = dovecot
        self.db = db
        self._cache: dict[tuple[str, str], str | None] = {}
        self._users: dict[str, User | None] = {}

    def first(self, parameter: str, key: str) -> str | None:
        """The answer of the first table of ``parameter`` that answers ``key``."""
        cached = self._cache.get((parameter, key), self)
        if cached is not self:
            return cached  # type: ignore[return-value]
        answer = None
        for table in self.tables.get(parameter, ()):
            if isinstance(table, frozenset):
                answer = "OK" if key in table else None
            else:
                answer = table.lookup(key, self.db)
            if answer is not None:
                break
        self._cache[(parameter, key)] = answer
        return answer

    def domain_class(self, domain: str) -> str | None:
        # trivial-rewrite's order: virtual alias, virtual mailbox, then relay domains.
        if self.first("virtual_alias_domains", domain):
            return "alias"
        if self.first("virtual_mailbox_domains", domain):
            return "hosted"
        if self.first("relay_domains", domain):
            return "relay"
        return None

    def accepts(self, address: str) -> bool:
        domain = address.rpartition("@")[2]
        kind = self.domain_class(domain)
        if kind is None:
            return False
        if kind == "relay":
            if not self.tables.get("relay_recipient_maps"):
                return True  # no relay_recipient_maps: every recipient is accepted
            return any(self.first("relay_recipient_maps", k) for k in (address, f"@{domain}"))
        if self.virtual(address) or self.virtual(f"@{domain}"):
            return True
        return kind == "hosted" and self.first("virtual_mailbox_maps", address) is not None

    def virtual(self, key: str) -> str | None:
        return self.first("virtual_alias_maps", key)

    def transport(self, final: str) -> str | None:
        """``transport_maps``' answer for the address ``final``, else for its domain."""
        return self.first("transport_maps", final) or self.first(
            "transport_maps", final.rpartition("@")[2]
        )

    def delivery(self, final: str) -> tuple[str, ...]:
        domain = final.rpartition("@")[2]
        kind = self.domain_class(domain)
        if kind == "relay":
            return ("relay", _nexthop(self.transport(final) or "", domain))
        if kind == "hosted":
            maildir = self.first("virtual_mailbox_maps", final)
            if maildir is None:
                return ("unknown",)
            user = self.user(final)
            if self.mailbox_base:
                home = _home(f"{self.mailbox_base.rstrip('/')}/{maildir}")
            else:
                home = user.home if user else None
            return ("mailbox", home or "")
        if kind == "alias":
            return ("unknown",)
        route = self.transport(final)
        return ("transport", route) if route else ("elsewhere",)

    def senders(self, address: str) -> frozenset[str] | None:
        if not self.tables.get("smtpd_sender_login_maps"):
            return None
        domain = address.rpartition("@")[2]
        found = self.first("smtpd_sender_login_maps", address) or self.first(
            "smtpd_sender_login_maps", f"@{domain}"
        )
        return frozenset(_split(found))

    def user(self, name: str) -> User | None:
        if self.dovecot is None:
            return None
        if name in self._users:
            return self._users[name]
        passdb = self.dovecot.passdb(name, self.db)
        userdb = self.dovecot.userdb(name, self.db)
        found = None
        if passdb is not None or userdb is not None:
            p = passdb or {}
            u = userdb or {}
            key = password_key(p.get("password"))
            quota = _quota(u.get("quota_rule", u.get("userdb_quota_rule")))
            found = User(
                login=passdb is not None
                and bool(key)
                and str(p.get("nologin", "")).lower() not in ("y", "yes", "1", "t", "true"),
                password=key,
                home=_home(u.get("home")),
                uid=str(u["uid"]) if u.get("uid") is not None else None,
                gid=str(u["gid"]) if u.get("gid") is not None else None,
                quota=quota,
            )
        self._users[name] = found
        return found

    def names(self) -> set[str]:
        """Every Dovecot user the ``iterate_query`` names (none without one)."""
        return set(self.dovecot.users(self.db)) if self.dovecot else set()


class PublishedSide(Side):
    """Postfix and Dovecot reading the published maps (agents/postfix-mx/main.cf,
    agents/dovecot-store/dovecot.conf)."""

    label = "after"

    def __init__(self, maps: dict[str, dict[str, str]]) -> None:
        self.maps = maps
        self.has_users = "dovecot_users" in maps

    def get(self, name: str, key: str) -> str | None:
        """The value of ``key`` in published map ``name``, or None."""
        return self.maps.get(name, {}).get(key)

    def domain_class(self, domain: str) -> str | None:
        if self.get("domains", domain) is None:
            return None
        route = self.get("transport", domain) or ""
        return "relay" if route.startswith(("relay:", "smtp:")) else "hosted"

    def accepts(self, address: str) -> bool:
        domain = address.rpartition("@")[2]
        if self.domain_class(domain) is None:
            return False
        return any(self.get("recipients", k) is not None for k in (address, f"@{domain}"))

    def virtual(self, key: str) -> str | None:
        return self.get("virtual", key)

    def delivery(self, final: str) -> tuple[str, ...]:
        domain = final.rpartition("@")[2]
        route = self.get("transport", final) or self.get("transport", domain)
        kind = self.domain_class(domain)
        if kind is None:
            return ("transport", route) if route else ("elsewhere",)
        if kind == "relay":
            return ("relay", _nexthop(route or "", domain))
        if self.has_users:
            user = self.user(final)
            return ("mailbox", user.home or "") if user else ("unknown",)
        return ("mailbox", "") if self.get("recipients", final) is not None else ("unknown",)

    def senders(self, address: str) -> frozenset[str] | None:
        if "senders" not in self.maps:
            return None
        domain = address.rpartition("@")[2]
        found = self.get("senders", address) or self.get("senders", f"@{domain}")
        return frozenset(_split(found))

    def user(self, name: str) -> User | None:
        line = self.get("dovecot_users", name)
        if line is None:
            return None
        fields = (line.split(":", 6) + [""] * 7)[:7]
        password, uid, gid, _gecos, home, _shell, extra = fields
        extras = dict(x.partition("=")[::2] for x in extra.split() if x)
        quota = _quota(extras.get("userdb_quota_rule"))
        return User(
            login=bool(password) and "nologin" not in extras,
            password=password_key(password),
            home=_home(home),
            uid=uid or None,
            gid=gid or None,
            quota=quota,
        )


# --- reading the two setups ----------------------------------------------------------------

_VARIABLE = re.compile(r"\$(\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")


def _expand_main_cf(value: str, settings: dict[str, str], where: str, depth: int = 0) -> str:
    """main.cf's ``$name`` / ``${name}``, for names the file sets (or config_directory)."""
    if depth > 10:
        raise ConfigError(f"{where}: $parameter references loop")

    def one(m: re.Match[str]) -> str:
        name = m.group(2) or m.group(3)
        if name in settings:
            return _expand_main_cf(settings[name], settings, where, depth + 1)
        if name == "config_directory":
            return "/etc/postfix"
        raise ConfigError(f"{where}: ${name} is not set in the file (compare expands only those)")

    return _VARIABLE.sub(one, value)


def _table_list(parameter: str, value: str, where: str, url: str | None) -> list[Lookup]:
    """A parameter's list of lookup tables (``proxy:mysql:/path, sqlite:/path, example.com``)."""
    out: list[Lookup] = []
    literal: set[str] = set()
    for item in (x for x in re.split(r"[,\s]+", value) if x):
        spec = item.removeprefix("proxy:")
        kind, colon, path = spec.partition(":")
        if not colon:
            if parameter in _DOMAIN_LISTS and "/" not in item:
                literal.add(item.lower())
                continue
            raise ConfigError(f"{where}: {item!r} is not a TYPE:NAME lookup table")
        if kind not in TABLE_TYPES + FILE_TYPES:
            raise ConfigError(
                f"{where}: {item}: table type {kind!r} is not supported by mapsync compare "
                f"(supported: {', '.join(TABLE_TYPES + FILE_TYPES)}); name the tables it "
                f"should read with --table {parameter}=TYPE:FILE"
            )
        if literal:
            out.append(frozenset(literal))
            literal = set()
        if kind in FILE_TYPES:
            out.append(TextTable(kind, Path(path), where))
        else:
            out.append(sql_table(kind, Path(path), url))
    if literal:
        out.append(frozenset(literal))
    return out


def read_postfix(
    main_cf: Path | None, tables: Iterable[str], url: str | None
) -> tuple[dict[str, list[Lookup]], str | None, list[str]]:
    """(parameter → lookup tables, virtual_mailbox_base, files read) from ``main_cf`` and the
    ``--table PARAMETER=TYPE:FILE`` options (which replace main.cf's list for that parameter)."""
    settings = read_settings(main_cf) if main_cf else {}
    out: dict[str, list[Lookup]] = {}
    read = [str(main_cf)] if main_cf else []
    for parameter in PARAMETERS:
        if settings.get(parameter):
            where = f"{main_cf}: {parameter}"
            value = _expand_main_cf(settings[parameter], settings, where)
            out[parameter] = _table_list(parameter, value, where, url)
    replaced: set[str] = set()
    for option in tables:
        parameter, eq, spec = option.partition("=")
        parameter = parameter.strip()
        if not eq or parameter not in PARAMETERS:
            raise ConfigError(
                f"--table {option}: expected PARAMETER=TYPE:FILE with PARAMETER one of "
                + ", ".join(PARAMETERS)
            )
        if parameter not in replaced:
            out[parameter] = []
            replaced.add(parameter)
        out[parameter] += _table_list(parameter, spec, f"--table {option}", url)
    for lookups in out.values():
        read += [str(t.path) for t in lookups if not isinstance(t, frozenset)]
    if not out.get("virtual_mailbox_domains") and not out.get("relay_domains"):
        raise ConfigError(
            f"{main_cf or '--table'}: neither virtual_mailbox_domains nor relay_domains names a "
            "lookup table: nothing to compare (give --postfix /etc/postfix/main.cf or --table)"
        )
    base = settings.get("virtual_mailbox_base")
    if base:
        base = _expand_main_cf(base, settings, f"{main_cf}: virtual_mailbox_base")
    return out, base or None, read


# Which maps compare reads, and the separator of their text files.
_MAPS = {
    "domains": " ",
    "recipients": " ",
    "virtual": " ",
    "transport": " ",
    "senders": " ",
    "dovecot_users": ":",
}
_NEEDED = ("domains", "recipients", "virtual", "transport")


def read_published(
    pub: PublisherConfig, channels: list[str] | None
) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
    """The text maps of the latest release of each channel (all, or ``channels``); each file's
    sha256 is checked against its manifest. ``dovecot_users`` of several channels (one per
    mailstore) are merged; for the other maps the first channel that has one is used."""
    from mapsync.formats.text import sha256_file

    names = channels or sorted(pub.channels)
    for name in names:
        if name not in pub.channels:
            raise ConfigError(f"unknown channel {name} (configured: {', '.join(pub.channels)})")
    repo = Repository(pub.repository, read_only=True)
    maps: dict[str, dict[str, str]] = {}
    serials: dict[str, int] = {}
    for name in names:
        latest = repo.latest(name)
        if latest is None:
            if channels:
                raise MapsyncError(
                    f"channel {name}: nothing published in {pub.repository} yet "
                    "(run `mapsync publish` first)"
                )
            continue
        manifest = repo.manifest(name, latest.serial)
        release = repo.release(name, latest.serial)
        serials[name] = latest.serial
        for map_name, entry in sorted(manifest.maps.items()):
            if map_name not in _MAPS or (map_name in maps and map_name != "dovecot_users"):
                continue
            path = release / entry.file
            try:
                digest, _ = sha256_file(path)
            except OSError as exc:
                raise MapsyncError(f"{path}: cannot be read: {exc.strerror}") from None
            if digest != entry.sha256:
                raise MapsyncError(f"{path}: sha256 differs from its manifest (damaged release)")
            into = maps.setdefault(map_name, {})
            for key, value in text.keyed(path, _MAPS[map_name]):
                into.setdefault(key, value)
    if not serials:
        raise MapsyncError(
            f"nothing published in {pub.repository} yet (run `mapsync publish` first)"
        )
    missing = [m for m in _NEEDED if m not in maps]
    if missing:
        raise ConfigError(
            f"channels {', '.join(serials)}: no release carries map(s) {', '.join(missing)}; "
            "compare needs an MX channel's maps (domains, recipients, virtual, transport)"
        )
    return maps, serials


# --- comparing -----------------------------------------------------------------------------


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _outcome(outcome: tuple[str, ...]) -> str:
    return " ".join(x for x in outcome if x) or "?"


def _deliveries(found: dict[str, tuple[str, ...]]) -> str:
    return "; ".join(f"{f} → {_outcome(o)}" for f, o in sorted(found.items())) or "(none)"


class _Compare:
    def __init__(
        self,
        before: LiveSide,
        after: PublishedSide,
        vacation_domain: str | None,
        homes: bool,
    ) -> None:
        self.before = before
        self.after = after
        self.vacation = vacation_domain
        self.homes = homes
        self.out: list[Difference] = []

    def add(self, address: str, check: str, a: str, b: str, expected: str | None) -> None:
        self.out.append(Difference(address, check, a, b, expected))

    def domain(self, domain: str) -> None:
        a, b = self.before.domain_class(domain), self.after.domain_class(domain)
        if a != b:
            why = (
                WHY_PSEUDO if domain == "all" else WHY_VACATION if domain == self.vacation else None
            )
            self.add(domain, "domain", a or "not ours", b or "not ours", why)

    def _outcome(self, side: Side, final: str) -> tuple[str, ...]:
        o = side.delivery(final)
        return o[:1] if o[0] == "mailbox" and not self.homes else o

    def address(self, address: str) -> None:
        domain = address.rpartition("@")[2]
        a, b = self.before.accepts(address), self.after.accepts(address)
        if a != b:
            why = None
            if domain == "all":
                why = WHY_PSEUDO
            elif domain == self.vacation:
                why = WHY_VACATION
            elif a and not b:
                finals = {f: self._outcome(self.before, f) for f in self.before.finals(address)}
                if all(o == ("unknown",) for o in finals.values()):
                    why = WHY_BOUNCE
            self.add(address, "accepted", _yes_no(a), _yes_no(b), why)
        elif a:
            mine = {f: self._outcome(self.before, f) for f in self.before.finals(address)}
            theirs = {f: self._outcome(self.after, f) for f in self.after.finals(address)}
            if mine != theirs:
                reasons = set()
                bounced = bool(mine) and all(o == ("unknown",) for o in mine.values())
                for f in set(mine) | set(theirs):
                    if mine.get(f) == theirs.get(f):
                        continue
                    fdomain = f.rpartition("@")[2]
                    if fdomain == self.vacation:
                        reasons.add(WHY_VACATION)
                    elif mine.get(f) == ("unknown",) and f not in theirs:
                        reasons.add(WHY_NOWHERE)
                    elif bounced and f not in mine:
                        reasons.add(WHY_NOWHERE_CATCHALL)
                    elif (
                        mine.get(f) == ("elsewhere",)
                        and f not in theirs
                        and self.before.domain_class(fdomain) is None
                        and self.after.domain_class(fdomain) is None
                    ):
                        # Neither side accepts its domain, yet mapsync left it out: mapsync
                        # drops only a target in a domain its database holds inactive.
                        reasons.add(WHY_INACTIVE_TARGET)
                    else:
                        reasons.add("")
                why = None if "" in reasons else "; ".join(sorted(reasons))
                # Only the final recipients whose mail goes elsewhere: the rest agree.
                differ = {f for f in set(mine) | set(theirs) if mine.get(f) != theirs.get(f)}
                a_only = {f: o for f, o in mine.items() if f in differ}
                b_only = {f: o for f, o in theirs.items() if f in differ}
                self.add(address, "delivery", _deliveries(a_only), _deliveries(b_only), why)
        sa, sb = self.before.senders(address), self.after.senders(address)
        if sa is not None and sb is not None and sa != sb:
            why = None
            if self.before.domain_class(domain) is None:
                why = WHY_INACTIVE
            elif cleartext((self.before.user(address) or _NOBODY).password):
                why = WHY_CLEARTEXT
            self.add(
                address,
                "senders",
                ",".join(sorted(sa)) or "(none)",
                ",".join(sorted(sb)) or "(none)",
                why,
            )

    def user(self, name: str) -> None:
        a, b = self.before.user(name), self.after.user(name)
        if a is None and b is None:
            return
        kind = self.before.domain_class(name.rpartition("@")[2])
        gone = WHY_INACTIVE if kind is None else WHY_RELAY_MAILBOX if kind == "relay" else None
        if a is None or b is None:
            self.add(name, "userdb", _yes_no(a is not None), _yes_no(b is not None), gone)
            return
        if a.login != b.login:
            why = gone or (WHY_CLEARTEXT if cleartext(a.password) and not b.login else None)
            self.add(name, "login", _yes_no(a.login), _yes_no(b.login), why)
        if a.login and b.login and a.password != b.password:
            sa, sb = _scheme(a.password), _scheme(b.password)
            if sa == sb:
                sa = sb = "password differs"
            self.add(name, "password", sa, sb, None)
        for check in ("home", "uid", "gid", "quota"):
            va, vb = getattr(a, check), getattr(b, check)
            if check in ("uid", "gid") and va is None:
                continue  # the live userdb leaves it to Dovecot's mail_uid/mail_gid
            if va != vb:
                self.add(name, check, str(va), str(vb), gone)


_NOBODY = User(False, None, None, None, None, None)


def compare(
    pub: PublisherConfig,
    *,
    main_cf: Path | None,
    tables: Iterable[str] = (),
    dovecot: Path | None = None,
    database: str | None = None,
    channels: list[str] | None = None,
    addresses: Iterable[str] = (),
) -> Comparison:
    """Compare the live lookups (``main_cf``/``tables``, ``dovecot``; ``database`` overrides
    every table's connection) with the latest releases of ``channels`` for every address
    either side names, the ``addresses`` given, and a probe in every domain."""
    parameters, base, read = read_postfix(main_cf, tables, database)
    dove = dovecot_sql(dovecot, database) if dovecot else None
    if dove:
        read.append(str(dovecot))
    maps, serials = read_published(pub, channels)
    db = Connections()
    try:
        before = LiveSide(parameters, base, dove, db)
        after = PublishedSide(maps)
        names: set[str] = {a.strip().lower() for a in addresses if a.strip()}
        for name in ("recipients", "virtual", "senders", "dovecot_users"):
            names |= {k for k in maps.get(name, {}) if not k.startswith("@")}
        domains = set(maps["domains"])
        if pub.schema == "postfixadmin":
            from mapsync.sources.postfixadmin import PostfixAdminSource

            source = PostfixAdminSource(pub.database, pub.postfixadmin)
            try:
                live_domains, live_addresses = source.names()
            finally:
                source.close()
            domains |= live_domains
            names |= live_addresses
        users = before.names() | set(maps.get("dovecot_users", {}))
        names |= users
        domains |= {a.rpartition("@")[2] for a in names if "@" in a}
        domains.discard("")
        names |= {f"{PROBE}@{d}" for d in domains}
        names = {n for n in names if "@" in n and n.partition("@")[0]}
        result = Comparison(
            addresses=len(names), domains=len(domains), users=0, before=read, after=serials
        )
        homes = after.has_users and (dove is not None or base is not None)
        check = _Compare(before, after, pub.postfixadmin.vacation_domain, homes)
        for d in sorted(domains):
            check.domain(d)
        for a in sorted(names):
            check.address(a)
        if dove is not None and after.has_users:
            every = sorted(users | {n for n in names if before.first("virtual_mailbox_maps", n)})
            for user in every:
                check.user(user)
            result.users = len(every)
        elif dove is not None or after.has_users:
            _log.warning(
                "Dovecot not compared: it needs both --dovecot and a channel with dovecot_users",
                dovecot=str(dovecot) if dovecot else None,
                channels=",".join(serials),
            )
        result.differences = check.out
        return result
    finally:
        db.close()

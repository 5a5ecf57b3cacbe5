"""Reads an existing PostfixAdmin database as it is (``schema = "postfixadmin"``), read-only.

PostfixAdmin's rows mean what its own documented Postfix and Dovecot lookups make of them
(docs/postfixadmin.md lists each rule and the few places mapsync deliberately differs):

- ``domain``: the pseudo-domain ``ALL`` is skipped; ``backupmx`` or a ``relay``/``smtp``
  transport makes a relay domain (next hop from ``smtp:[host]:port``, else the domain's MX);
  every other transport (``virtual``, ``lmtp:...``, ``local``) a hosted domain housed on the
  mailstore the configuration gives it. ``active = 0`` disables the domain *with* its
  mailboxes and aliases (PostfixAdmin's own alias and mailbox lookups would still deliver).
- ``mailbox``: an account; home = ``mail_base`` + ``maildir``; ``quota`` is bytes; the stored
  hash gets the ``{SCHEME}`` Dovecot needs (cleartext is refused by validation).
- ``alias``: ``goto`` split on commas. The alias row of a mailbox's own address is its
  delivery: ``goto`` = the address itself is a plain mailbox, anything else a forward
  (:attr:`Snapshot.forwards`). ``@domain`` is a catch-all; ``@old → @new`` a domain-wide
  forward, read like an alias domain.
- ``alias_domain``: every ``user@alias`` resolves as PostfixAdmin's lookups do, in their order:
  the literal alias row, then ``user@target``, then the target's catch-all, then the alias
  domain's own catch-all. Written out as plain aliases of the alias domain.
- A target that receives nothing here (a mailbox deleted through PostfixAdmin's UI stays in
  other aliases' ``goto``; a mailbox of an inactive domain) is left out with a warning, not
  refused: it is what PostfixAdmin itself leaves behind, and must not stop every publish.

Config example::

    [publisher]
    database = "mysql+pymysql://mapsync@db.example.net/postfixadmin"
    schema = "postfixadmin"

    [publisher.postfixadmin]
    mail_base = "/var/vmail"
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import asdict
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, cast

from sqlalchemy import Connection, column, false, func, select, table, text
from sqlalchemy.exc import SQLAlchemyError

from mapsync import log
from mapsync.config import PostfixAdminConfig
from mapsync.errors import SourceError
from mapsync.snapshot import Account, Alias, Domain, Fingerprint, Mailstore, Snapshot, paused_gc
from mapsync.sources.builtin import BuiltinSource, _bound
from mapsync.sources.schema import finite

_log = log.get("postfixadmin")

# The columns read from each table; anything else (late columns among them) is optional.
COLUMNS = {
    "domain": ("domain", "transport", "backupmx", "active", "modified"),
    "mailbox": ("username", "password", "maildir", "quota", "active", "modified"),
    "alias": ("address", "goto", "active", "modified"),
    "alias_domain": ("alias_domain", "target_domain", "active", "modified"),
}
# The columns read that PostfixAdmin's schema makes varchar or text.
_TEXT = frozenset(
    {"domain", "transport", "alias_domain", "target_domain", "username", "password", "maildir"}
    | {"address", "goto"}
)
PSEUDO_DOMAIN = "all"  # PostfixAdmin's 'ALL' row: no mail domain

_TRUE = {"1", "t", "true", "y", "yes", "on"}
_DES = re.compile(r"^[./0-9A-Za-z]{13}\Z")
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}\Z")
_PREFIXED = re.compile(r"^\{[A-Za-z0-9.-]+\}")  # Dovecot reads a scheme in any case
# Bare crypt(3) hashes as PostfixAdmin's php_crypt/md5crypt write them → Dovecot's scheme.
_CRYPT_SCHEMES = (
    ("$2y$", "BLF-CRYPT"),
    ("$2b$", "BLF-CRYPT"),
    ("$2a$", "BLF-CRYPT"),
    ("$1$", "MD5-CRYPT"),
    ("$5$", "SHA256-CRYPT"),
    ("$6$", "SHA512-CRYPT"),
    ("$argon2id$", "ARGON2ID"),
    ("$argon2i$", "ARGON2I"),
)


def dovecot_password(stored: str | None) -> str | None:
    """PostfixAdmin's stored password with the ``{SCHEME}`` prefix Dovecot needs.

    Prefixed values are kept; bare crypt hashes, 13-character DES and 32-hex MD5 get their
    scheme; anything else is cleartext and comes back as ``{CLEARTEXT}...`` for validation
    to refuse (it is never published)."""
    if not stored:
        return None
    if _PREFIXED.match(stored):
        return stored
    for prefix, scheme in _CRYPT_SCHEMES:
        if stored.startswith(prefix):
            return f"{{{scheme}}}{stored}"
    if _DES.match(stored):
        return "{CRYPT}" + stored
    if _HEX32.match(stored):
        return "{PLAIN-MD5}" + stored.lower()
    return "{CLEARTEXT}" + stored


def relay_nexthop(domain: str, transport: str) -> str:
    """Where a relay domain's mail goes: the next hop of ``smtp:[host]:port`` or
    ``relay:host``, else the domain itself (Postfix then looks up its MX)."""
    _, _, nexthop = transport.partition(":")
    return nexthop.strip() or domain


def _yes(value: Any) -> bool:
    """A boolean as PostgreSQL (t/f), MariaDB and SQLite (1/0, '1'/'0') store it."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    return str(value).strip().lower() in _TRUE


def _targets(goto: str | None) -> list[str]:
    # PostfixAdmin joins with ',' and no spaces; a hand edit may add some, Postfix allows it.
    return [t for t in re.split(r"[,\s]+", goto or "") if t]


class PostfixAdminSource(BuiltinSource):
    """PostfixAdmin's ``domain``, ``mailbox``, ``alias`` and ``alias_domain`` tables.

    Shares the engine, the read-only repeatable-read transaction and the publisher lock of
    :class:`~mapsync.sources.builtin.BuiltinSource`; reads other tables into the same model.
    """

    schema = "postfixadmin"
    stamp_resolution = 2.0  # ``modified``: whole seconds (MariaDB DATETIME, SQLite text)

    def __init__(self, url: str, settings: PostfixAdminConfig | None = None) -> None:
        super().__init__(url)
        self.settings = settings or PostfixAdminConfig()
        self.tables = {name: self.settings.table(name) for name in COLUMNS}

    def fingerprint(self, secrets: bool = False) -> Fingerprint:
        """Row count and newest ``modified`` per PostfixAdmin table, and the settings' digest."""
        try:
            # Bounded and in UTC as the snapshot's read (_bound): a timestamptz `modified`
            # read in the server's zone here and in UTC there never matched, and every run
            # read everything.
            with self.engine.connect() as conn, conn.begin():
                _bound(conn, self.lock_wait, self.statement_timeout, self.utc)
                return self._fingerprint(conn)
        except SQLAlchemyError as exc:
            raise self._fail("reading the change fingerprint", exc) from None

    def _fingerprint(self, conn: Connection) -> Fingerprint:
        """Row count and newest ``modified`` per table (PostfixAdmin sets it on every edit),
        plus the settings that shape the maps, so a changed mailstore rule is a change too."""
        tables: dict[str, tuple[int, str | None]] = {}
        for name, real in self.tables.items():
            self._need(conn, name)
            t = table(real, column("modified"))
            # finite: PostgreSQL's 'infinity' there failed every read naming nothing; as the
            # latest time, an edit under it waits for the full check (docs/postfixadmin.md).
            count, newest = conn.execute(select(func.count(), finite(func.max(t.c.modified)))).one()
            tables[name] = (int(count), str(newest) if newest is not None else None)
        blob = json.dumps(asdict(self.settings), sort_keys=True, default=str).encode()
        tables["settings"] = (0, hashlib.sha256(blob).hexdigest())
        return Fingerprint(tables)

    def _need(self, conn: Connection, name: str) -> set[str]:
        """The columns of PostfixAdmin table ``name``; SourceError if it or a needed one is missing."""
        real = self.tables[name]
        # An empty SELECT names the columns on every engine (reflection warns on SQLite's
        # tinyint(1) and costs more); a missing table fails it inside a savepoint, so the
        # transaction (PostgreSQL aborts it on any error) stays usable for the message.
        try:
            with conn.begin_nested():
                result = conn.execute(select(text("*")).select_from(table(real)).where(false()))
                have = set(map(str.lower, map(str, result.keys())))
                result.close()
        except SQLAlchemyError:
            raise SourceError(
                f"database {self.safe_url}: PostfixAdmin table {real!r} not found or not "
                f"readable (check [publisher.postfixadmin] prefix and {name}_table, and "
                "that the database user may SELECT from it: docs/database.md)"
            ) from None
        missing = [c for c in COLUMNS[name] if c not in have]
        if missing:
            raise SourceError(
                f"database {self.safe_url}: PostfixAdmin table {real!r} has no column "
                f"{', '.join(map(repr, missing))}"
            )
        return have

    def _rows(self, conn: Connection, name: str, *names: str) -> list[Any]:
        t = table(self.tables[name], *(column(n) for n in names))
        return list(conn.execute(select(*t.c)))

    def names(self) -> tuple[set[str], set[str]]:
        """(domains, addresses) that any row names, active or not (``mapsync compare`` asks
        the live lookups and the published maps about each): every domain, mailbox and alias,
        and for each alias domain or domain-wide forward ``user@alias`` for every local part
        its target domain has."""
        try:
            with self.engine.connect() as conn:
                for name in self.tables:
                    self._need(conn, name)
                domain_rows = self._rows(conn, "domain", "domain")
                mailbox_rows = self._rows(conn, "mailbox", "username")
                alias_rows = self._rows(conn, "alias", "address", "goto")
                alias_domain_rows = self._rows(
                    conn, "alias_domain", "alias_domain", "target_domain"
                )
        except SQLAlchemyError as exc:
            raise self._fail("reading the addresses", exc) from None
        domains = {str(d).strip().lower() for (d,) in domain_rows if d}
        addresses = {str(u).strip().lower() for (u,) in mailbox_rows if u}
        pairs = [(str(a).strip().lower(), (g or "").strip().lower()) for a, g in alias_rows if a]
        addresses |= {a for a, _ in pairs if not a.startswith("@")}
        locals_of: dict[str, set[str]] = defaultdict(set)
        for address in addresses:
            local, _, domain = address.rpartition("@")
            locals_of[domain].add(local)
        translations = [
            (str(a).strip().lower(), str(t).strip().lower())
            for a, t in alias_domain_rows
            if a and t
        ]
        translations += [
            (a[1:], g[1:]) for a, g in pairs if a.startswith("@") and g.startswith("@")
        ]
        for alias, target in translations:
            domains.add(alias)
            addresses |= {f"{local}@{alias}" for local in locals_of.get(target, ())}
        return domains, addresses

    def _read(self, conn: Connection) -> Snapshot:
        fingerprint = self._fingerprint(conn)
        secrets = getattr(self, "_secrets", False)
        mailbox_columns = ["username", "maildir", "quota", "active"]
        if secrets:
            mailbox_columns.append("password")
        # smtp_active (PostfixAdmin >= 4.0, schema 1850): SMTP AUTH apart from `active`.
        smtp = "smtp_active" in self._need(conn, "mailbox")
        if smtp:
            mailbox_columns.append("smtp_active")
        read = {
            "domain": COLUMNS["domain"][:4],
            "alias_domain": COLUMNS["alias_domain"][:3],
            "mailbox": tuple(mailbox_columns),
            "alias": COLUMNS["alias"][:3],
        }
        rows = {name: self._rows(conn, name, *columns) for name, columns in read.items()}
        # A column's type is every row's: its first row tells a bytea or BLOB column, which
        # the reader does not always fail on (b'x.org'.lower() is no error: an alias domain
        # so read translated nothing, its mail refused, without a word).
        self._refuse_not_text(read, {name: found[:1] for name, found in rows.items()})
        with paused_gc():
            try:
                return _Reader(self.settings, secrets, smtp).build(
                    domains=rows["domain"],
                    alias_domains=rows["alias_domain"],
                    mailboxes=rows["mailbox"],
                    aliases=rows["alias"],
                    fingerprint=fingerprint,
                )
            except TypeError:
                # The other rows looked at only now: a sound database's cost no check.
                self._refuse_not_text(read, rows)
                raise

    def _refuse_not_text(
        self, read: dict[str, tuple[str, ...]], rows: dict[str, list[Any]]
    ) -> None:
        """SourceError naming the first value of a text column of ``rows`` that is no text
        (a bytea or BLOB column, an array, JSON that is no string), which the reader fails on
        with a TypeError naming nothing. Its value is not shown: it may be a password hash."""
        for name, columns in read.items():
            for row in rows[name]:
                for column_, value in zip(columns, row, strict=False):
                    if column_ in _TEXT and value is not None and not isinstance(value, str):
                        raise SourceError(
                            f"database {self.safe_url}: PostfixAdmin table "
                            f"{self.tables[name]!r}, row {str(row[0])!r}: {column_} is "
                            f"{type(value).__name__}, not text (PostfixAdmin's schema has "
                            "varchar or text there: docs/postfixadmin.md)"
                        )


class _Reader:
    """Turns PostfixAdmin's rows into the neutral model (see the module docstring)."""

    def __init__(self, settings: PostfixAdminConfig, secrets: bool, smtp: bool = False) -> None:
        self.settings = settings
        self.secrets = secrets
        self.smtp = smtp  # the mailbox rows end with smtp_active
        self.labels: dict[tuple[str, int], str] = {}

    def describe(self, table_: str, row: int, key: str) -> str:
        """A problem's row in PostfixAdmin's words: ``alias 'sales@example.com'``."""
        label = self.labels.get((table_, row))
        if label is not None:
            return label
        names = {"account": "mailbox", "forward": "alias"}
        if table_ == "mailstore":
            return f"[publisher.postfixadmin.mailstores.{key}]"
        return f"{names.get(table_, table_)} {key!r}"

    def _mailstores(self) -> tuple[list[Mailstore], dict[str, int]]:
        stores = []
        ids = {}
        for i, ms in enumerate(self.settings.mailstores.values(), start=1):
            stores.append(
                Mailstore(
                    i,
                    ms.name,
                    ms.lmtp_host,
                    ms.lmtp_port,
                    ms.imap_host or ms.lmtp_host,
                    ms.imap_port,
                    True,
                )
            )
            ids[ms.name] = i
        return stores, ids

    def _store_of(self, domain: str, ids: dict[str, int]) -> int:
        """Per-domain rules: the first mailstore with a matching pattern, else the default."""
        for ms in self.settings.mailstores.values():
            if any(fnmatchcase(domain, pattern) for pattern in ms.domains):
                return ids[ms.name]
        return ids[self.settings.default_mailstore]

    @staticmethod
    def _drop_dead_targets(
        literal: dict[str, dict[str, tuple[int, list[str]]]],
        resolved: _Resolved,
        domains: dict[str, Domain],
        relay: set[str],
    ) -> bool:
        """Leave out of ``literal`` the targets nothing receives (an alias left with none goes
        too); whether any was left out."""
        dropped = False
        for domain, own in literal.items():
            for local, (i, targets) in list(own.items()):
                keep = [t for t in targets if resolved.receives(t, domains, relay)]
                if keep == targets:
                    continue
                dropped = True
                _log.warning(
                    "targets that receive nothing here (a deleted mailbox, an inactive domain) "
                    "left out of an alias" + ("" if keep else "; the alias goes with them"),
                    alias=f"{local}@{domain}",
                    targets=[t for t in targets if t not in keep],
                )
                if keep:
                    own[local] = (i, keep)
                else:
                    del own[local]
        return dropped

    def build(
        self,
        domains: list[Any],
        alias_domains: list[Any],
        mailboxes: list[Any],
        aliases: list[Any],
        fingerprint: Fingerprint,
    ) -> Snapshot:
        stores, store_ids = self._mailstores()

        # Domains: one model row per `domain` row, ids in name order (stable across reads).
        rows = {}
        for name, transport, backupmx, active in _one_per_name(domains, "domain"):
            name = (name or "").strip().lower()
            if name and name != PSEUDO_DOMAIN:
                rows[name] = ((transport or "").strip(), _yes(backupmx), _yes(active))
        vacation = self.settings.vacation_domain
        if vacation:
            # Relayed to the host that runs the vacation transport, with a row or without
            # (PostfixAdmin's docs give it one, transport 'vacation'): never hosted here,
            # where its user#domain targets would receive nothing.
            nexthop = self.settings.vacation_nexthop or vacation
            rows[vacation] = (f"relay:{nexthop}", False, rows.get(vacation, ("", False, True))[2])
        domain_ids = {name: i for i, name in enumerate(sorted(rows), start=1)}
        model_domains: dict[str, Domain] = {}
        for name, (transport, backupmx, active) in sorted(rows.items()):
            relay = backupmx or transport.lower().startswith(("relay", "smtp"))
            i = domain_ids[name]
            model_domains[name] = Domain(
                i,
                name,
                None,
                "relay" if relay else "hosted",
                None,
                None if relay else self._store_of(name, store_ids),
                relay_nexthop(name, transport) if relay else None,
                "active" if active else "disabled",
            )
            if name == vacation and name not in {(r[0] or "").lower() for r in domains}:
                self.labels[("domain", i)] = f"[publisher.postfixadmin] vacation_domain {name!r}"
        hosted = {
            n for n, d in model_domains.items() if d.kind == "hosted" and d.status == "active"
        }
        domain_names = {d.id: n for n, d in model_domains.items()}
        relay_names = {n for n, d in model_domains.items() if d.kind == "relay"}

        # Mailboxes.
        accounts: list[Account] = []
        mailbox_of: dict[str, Account] = {}
        denied: dict[int, frozenset[str]] = {}
        no_smtp = frozenset({"submission"})
        skipped_in: dict[str, int] = defaultdict(int)
        base = self.settings.mail_base.rstrip("/")
        for i, row in enumerate(_one_per_name(mailboxes, "mailbox"), start=1):
            username = (row[0] or "").strip().lower()
            local, _, domain = username.rpartition("@")
            d = model_domains.get(domain)
            if d is None or d.kind != "hosted":
                # PostfixAdmin's domains lookup would not accept mail for it either.
                why = "a relay (backup MX) domain" if domain in relay_names else "no domain row"
                _log.warning("mailbox skipped", mailbox=username, reason=why)
                continue
            active = _yes(row[3])
            if active and d.status != "active":
                skipped_in[domain] += 1
            quota = _quota(row[2])
            account = Account(
                i,
                d.id,
                local,
                None,
                "active" if active else "disabled",
                dovecot_password(row[4]) if self.secrets else None,
                # Validated in every run, as a bad home fails the row; not formatted: a bytes
                # maildir (a BLOB) raises, for _refuse_not_text, instead of "/b'x.org/u/'".
                base + "/" + (row[1] or ""),
                quota if self.secrets else None,
            )
            accounts.append(account)
            mailbox_of[username] = account
            if self.smtp and not _yes(row[-1]):
                denied[i] = no_smtp  # may read mail, may not authenticate to send it
        for domain, count in sorted(skipped_in.items()):
            _log.warning(
                "inactive domain: its active mailboxes get no mail and no login "
                "(PostfixAdmin's own mailbox lookups would still deliver to them)",
                domain=domain,
                mailboxes=count,
            )

        # Aliases: catch-alls, literal aliases, mailbox self-rows (plain or forward).
        literal: dict[str, dict[str, tuple[int, list[str]]]] = defaultdict(dict)
        forwards: list[tuple[int, Account, str, list[str]]] = []
        # '@old' → ('new', the other targets): domain-wide forwards, read like alias domains.
        forward_to: dict[str, tuple[str, list[str]]] = {}
        for i, (written, goto, active) in enumerate(_one_per_name(aliases, "alias"), start=1):
            if not _yes(active):
                continue
            address = (written or "").strip().lower()
            local, _, domain = address.rpartition("@")
            if domain not in model_domains:
                continue  # PostfixAdmin's domains lookup refuses the address: no mail
            if domain in relay_names:
                _log.warning("alias skipped", alias=address, reason="a relay (backup MX) domain")
                continue
            targets = _targets(goto)
            if not targets:
                # Postfix takes an empty result as no alias: the catch-all, if any, gets it.
                _log.warning("alias skipped", alias=address, reason="its goto is empty")
                continue
            if local and any(t.startswith("@") for t in targets):
                # Postfix rewrites user@a → '@b' to user@b.
                targets = [f"{local}{t}" if t.startswith("@") else t for t in targets]
            if not local and targets[0].startswith("@") and "@" not in targets[0][1:]:
                # Postfix rewrites only the first address of a result (virtual(5)).
                forward_to[domain] = (targets[0][1:].lower(), targets[1:])
                continue
            owner = mailbox_of.get(address)
            if owner is not None and owner.status == "active":
                if [t.lower() for t in targets] != [address]:
                    forwards.append((i, owner, address, targets))
                continue
            if address in map(str.lower, targets):
                # The own address of a disabled or deleted mailbox leads nowhere (Postfix would
                # accept and bounce it): keep only the other targets.
                targets = [t for t in targets if t.lower() != address]
                if not targets:
                    continue
            literal[domain][local] = (i, targets)

        # Alias domains and domain-wide forwards: u@A as PostfixAdmin's lookups resolve it.
        translated: dict[str, tuple[str, list[str]]] = dict(forward_to)
        forwarded = set(forward_to)  # the domains translated by an alias row, for labels
        for alias_domain, target, active in _one_per_name(alias_domains, "alias_domain"):
            a = (alias_domain or "").strip().lower()
            if _yes(active) and a in model_domains:
                translated[a] = ((target or "").strip().lower(), [])
                forwarded.discard(a)
        locals_of: dict[str, set[str]] = defaultdict(set)
        for account in accounts:
            if account.status == "active":
                locals_of[domain_names[account.domain_id]].add(account.local_part)
        for domain, (target, _) in sorted(translated.items()):
            if domain in hosted and target not in hosted:
                _log.warning(
                    "alias domain or domain-wide forward to a domain not hosted here (or not "
                    "active): not published, mail for the domain is refused (PostfixAdmin's "
                    "own lookups would rewrite it to the target)",
                    domain=domain,
                    target=target,
                )
        # A target in a hosted domain that nothing there receives (a mailbox deleted through
        # PostfixAdmin stays in other aliases' goto), or in an inactive domain: Postfix would
        # accept and bounce it; left out, with the row named, so one stale goto does not stop
        # every publish. Leaving out an alias can strand others: again, until none changes.
        while True:
            resolved = _Resolved(hosted, locals_of, literal, translated)
            if not self._drop_dead_targets(literal, resolved, model_domains, relay_names):
                break
        for domain, (target, extra) in sorted(translated.items()):
            keep = [t for t in extra if resolved.receives(t, model_domains, relay_names)]
            if keep != extra:  # the other targets of a domain-wide forward, the same way
                _log.warning(
                    "targets that receive nothing here (a deleted mailbox, an inactive domain) "
                    "left out of a domain-wide forward",
                    alias=f"@{domain}",
                    targets=[t for t in extra if t not in keep],
                )
                translated[domain] = (target, keep)
        model_forwards = []
        for i, owner, address, targets in forwards:
            keep = [t for t in targets if resolved.receives(t, model_domains, relay_names)]
            if keep != targets:
                _log.warning(
                    "targets that receive nothing here left out of a forward"
                    + ("" if keep else "; the mail stays in the mailbox"),
                    alias=address,
                    targets=[t for t in targets if t not in keep],
                )
            model_forwards.append(
                Alias(i, owner.domain_id, owner.local_part, tuple(keep or [address]))
            )
        model_aliases: list[Alias] = []
        next_id = len(aliases) + 1
        for domain in sorted(literal.keys() | translated.keys()):
            own = literal.get(domain, {})
            d = model_domains[domain]
            target, extra = translated.get(domain, ("", []))
            if resolved.translates(domain):
                label = (
                    f"alias '@{domain}' → '@{target}'"
                    if domain in forwarded
                    else f"alias_domain {domain!r} → {target!r}"
                )
                for local in sorted(resolved.names(target) - own.keys() - locals_of[domain]):
                    self.labels[("alias", next_id)] = f"{label} (alias '{local}@{domain}')"
                    to = (f"{local}@{target}", *extra)
                    model_aliases.append(Alias(next_id, d.id, local, to))
                    next_id += 1
                target_catchall = resolved.catchall(target)
                if target_catchall is not None:
                    # The target's catch-all wins over the alias domain's own (lookup order).
                    own = {**own, "": (next_id, [*target_catchall, *extra])}
                    self.labels[("alias", next_id)] = f"{label} (catch-all '@{target}')"
                    next_id += 1
            for local, (i, targets) in own.items():
                model_aliases.append(Alias(i, d.id, local, tuple(targets)))

        model_aliases.sort(key=lambda al: al.id)
        return Snapshot(
            mailstores=stores,
            domains=list(model_domains.values()),
            accounts=accounts,
            aliases=model_aliases,
            fingerprint=fingerprint,
            forwards=model_forwards,
            denied=denied,
            secrets=self.secrets,
            taken_at=datetime.now(UTC),
            describe=self.describe,
        )


def _one_per_name(rows: list[Any], table_: str) -> list[Any]:
    """``rows`` of PostfixAdmin table ``table_`` (the name first: a domain, username or
    address) in name order, one per name as the reader keys it (case and surrounding
    whitespace aside), whatever order the database returned them in.

    On PostgreSQL and SQLite ``Sales@x``, ``sales@x`` and ``sales@x `` are three rows, and
    PostfixAdmin's lookups (their key lowercased by Postfix and Dovecot) find only the row
    written exactly so, active or not; MariaDB's collation (case-insensitive, trailing
    spaces ignored) lets only one of them exist. That row is used, else the first as
    written; the others are left out with a warning. (Which one was used, a domain hosted or
    relayed to another host, an alias's targets, a mailbox's password, depended on the row
    order, which an UPDATE changes.)"""
    by_name: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        written = str(row[0] or "")
        by_name[written.strip().lower()].append(row)
    out = []
    for name, found in sorted(by_name.items()):
        found.sort(key=lambda r: (str(r[0] or "") != name, str(r[0] or "")))
        if len(found) > 1:
            _log.warning(
                f"{table_} rows whose names differ only in case or surrounding whitespace: "
                "the one written in lowercase without spaces is used, as PostfixAdmin's own "
                "lookups on PostgreSQL find it",
                used=repr(found[0][0]),
                ignored=[repr(r[0]) for r in found[1:]],
            )
        out.append(found[0])
    return out


class _Resolved:
    """What each hosted domain receives once alias domains and domain-wide forwards are
    expanded, as PostfixAdmin's lookups resolve them: an alias domain of an alias domain
    receives what its target receives, chain and all (in a loop of them, each what the
    others have of their own)."""

    def __init__(
        self,
        hosted: set[str],
        locals_of: dict[str, set[str]],
        literal: dict[str, dict[str, tuple[int, list[str]]]],
        translated: dict[str, tuple[str, list[str]]],
    ) -> None:
        self.hosted, self.locals_of = hosted, locals_of
        self.literal, self.translated = literal, translated
        self._names: dict[str, frozenset[str]] = {}
        self._busy: set[str] = set()

    def translates(self, domain: str) -> bool:
        """Whether ``domain``'s addresses resolve in its (hosted) target domain."""
        target = self.translated.get(domain, ("", []))[0]
        return domain in self.hosted and target in self.hosted

    def names(self, domain: str) -> frozenset[str]:
        """The local parts ``domain`` receives (mailboxes, aliases, those its target gives)."""
        found = self._names.get(domain)
        if found is not None:
            return found
        own = {n for n in self.literal.get(domain, {}) if n} | self.locals_of.get(domain, set())
        if domain in self._busy:
            return frozenset(own)  # a loop of alias domains: each keeps its own addresses
        self._busy.add(domain)
        try:
            if self.translates(domain):
                own |= self.names(self.translated[domain][0])
        finally:
            self._busy.discard(domain)
        if not self._busy:
            # Kept only when asked from outside: one worked out inside a loop of alias
            # domains lacks what the rest of the loop gives (that depends on where it began).
            self._names[domain] = frozenset(own)
        return frozenset(own)

    def catchall(self, domain: str) -> list[str] | None:
        """The targets ``@domain`` resolves to: its target's catch-all (with the forward's
        other targets) where it has one, else its own."""
        own = self.literal.get(domain, {}).get("")
        if domain in self._busy:
            return own[1] if own else None
        self._busy.add(domain)
        try:
            if self.translates(domain):
                target, extra = self.translated[domain]
                theirs = self.catchall(target)
                if theirs is not None:
                    return [*theirs, *extra]
        finally:
            self._busy.discard(domain)
        return own[1] if own else None

    def receives(self, target: str, domains: dict[str, Domain], relay: set[str]) -> bool:
        """Whether mail to ``target`` reaches something: an address or catch-all of a hosted
        domain, a relay domain, or a domain not in the database (it leaves the cluster)."""
        local, _, domain = target.lower().rpartition("@")
        if domain not in domains or domain in relay:
            return True
        if domain not in self.hosted:
            return False  # an inactive domain of the database
        names = self.names(domain)
        # user+tag@ reaches user@ where no row has it whole (recipient_delimiter = +).
        base = local.partition("+")[0] if "+" in local and local not in names else local
        return base in names or self.catchall(domain) is not None


def _quota(raw: Any) -> int | None:
    """``mailbox.quota`` in bytes; 0 and -1 (PostfixAdmin's "unlimited", "disabled") are no
    quota. Anything that is not an integer (SQLite keeps '10M' in an INTEGER column) is passed
    on as it is, for validation to name the row, instead of failing the whole read."""
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if raw > 0 else None
    return cast(int, raw)

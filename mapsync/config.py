"""Configuration: one TOML file with a ``[publisher]`` part, an ``[agent]`` part, or both.

Validation happens here, at the edge: unknown keys, wrong types and bad durations raise
:class:`~mapsync.errors.ConfigError` naming the file and the key; everything inside mapsync
trusts the frozen dataclasses it gets.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mapsync import location, log
from mapsync.errors import ConfigError
from mapsync.release import BUILTIN_MAPS, SEPARATORS, MapSpec

DEFAULT_PATH = Path("/etc/mapsync/mapsync.toml")
CHANNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The publisher renews a release once half its lifetime is gone: below an hour every
# publish run would sign a renewal, and a node that missed one run would go CRITICAL.
MIN_EXPIRES = 3600
MAX_DURATION = 36500 * 86400  # any duration: 100 years
# status WARNING after warn_after without a good check: below a minute it would flap
# between two runs of a pull timer.
MIN_WARN_AFTER = 60


@dataclass(frozen=True)
class Guards:
    """Limits a publish plan must respect per map (issue: plan and guards)."""

    min_entries: int = 1
    max_shrink: float = 0.10
    max_growth: float = 1.00
    max_change: float = 0.30


@dataclass(frozen=True)
class PublisherChannel:
    """A named list of maps plus an optional mailstore filter."""

    name: str
    maps: tuple[str, ...]
    mailstore: str | None = None
    push: tuple[str, ...] = ()  # node inboxes: a path, rsync://host/module/path, ssh://host/path
    uid: int = 5000  # dovecot_users: the owner of the mail files on the mailstore
    gid: int = 5000
    # dovecot_users: the userdb field that carries the account's customer.ext_id; None: none.
    customer_field: str | None = None


@dataclass(frozen=True)
class PostfixAdminMailstore:
    """A mailstore PostfixAdmin does not know of (``[publisher.postfixadmin.mailstores.NAME]``):
    where its LMTP and IMAP listen, and the domains it houses (glob patterns)."""

    name: str
    lmtp_host: str
    lmtp_port: int = 24
    imap_host: str | None = None  # None: the LMTP host
    imap_port: int = 143
    domains: tuple[str, ...] = ()


# With no mailstore configured, every PostfixAdmin domain is delivered on this host.
LOCAL_MAILSTORE = PostfixAdminMailstore("local", "127.0.0.1")


@dataclass(frozen=True)
class PostfixAdminConfig:
    """How to read an existing PostfixAdmin database (``[publisher.postfixadmin]``)."""

    prefix: str = ""  # PostfixAdmin's $CONF['database_prefix']
    domain_table: str | None = None  # None: prefix + "domain"
    mailbox_table: str | None = None
    alias_table: str | None = None
    alias_domain_table: str | None = None
    mail_base: str = "/var/vmail"  # home = mail_base + "/" + mailbox.maildir
    mailstore: str | None = None  # houses the domains no `domains` pattern matches; None: the first
    mailstores: dict[str, PostfixAdminMailstore] = field(
        default_factory=lambda: {"local": LOCAL_MAILSTORE}
    )
    vacation_domain: str | None = None  # PostfixAdmin's $CONF['vacation_domain']
    vacation_nexthop: str | None = None  # None: the vacation domain (its MX)

    @property
    def default_mailstore(self) -> str:
        """The mailstore of every domain that no mailstore's ``domains`` pattern matches."""
        return self.mailstore or next(iter(self.mailstores))

    def table(self, name: str) -> str:
        """The real name of PostfixAdmin table ``name`` in this installation."""
        own: str | None = getattr(self, f"{name}_table")
        return own or self.prefix + name


# ``[publisher.sql]``: the queries of ``schema = "sql"`` (docs/sql-schema.md has the contract).
SQL_REQUIRED = ("domains", "accounts", "aliases")
SQL_OPTIONAL = ("mailstores", "alias_domains", "forwards", "sender_grants")


@dataclass(frozen=True)
class SqlConfig:
    """How to read any schema by SQL (``[publisher.sql]``): one SELECT per model table."""

    queries: dict[str, str] = field(default_factory=dict)  # "accounts" → "SELECT ..."
    fingerprint: str | None = None  # a one-row SELECT that changes whenever the rows do
    mailstore: str | None = None  # default mailstore of a domain that names none
    # From the config when the database has no mailstores (no `mailstores` query).
    mailstores: dict[str, PostfixAdminMailstore] = field(
        default_factory=lambda: {"local": LOCAL_MAILSTORE}
    )
    where: str = "[publisher.sql]"  # how errors name the section: the file and the table

    @property
    def default_mailstore(self) -> str | None:
        """The mailstore of a domain whose row names none (None: the query must name it)."""
        if self.mailstore is not None:
            return self.mailstore
        return None if "mailstores" in self.queries else next(iter(self.mailstores), None)


# The separators a map of the operator's own may use between key and value on a text line:
# a space (Postfix's source format, Exim lsearch), a tab, or ':' (a passwd-file-like line).
# The release format's list: a node checks a manifest's ``custom.separator`` against it.
MAP_SEPARATORS = SEPARATORS
MAP_KEYS = ("lower", "exact")


@dataclass(frozen=True)
class MapConfig:
    """A map of the operator's own (``[publisher.maps.NAME]``): a query returning key and value.

    ``keys``: ``"lower"`` folds keys to lowercase (Postfix lowercases every lookup, Exim
    configurations look up ``${lc:...}``), ``"exact"`` keeps them. ``secret``: handled like
    ``dovecot_users`` (read only for a channel that lists it, installed 0640). ``database``:
    a second SQLAlchemy URL to read it from (else the publisher's, in its snapshot).
    ``fingerprint``: a cheap query whose result changes whenever the map's rows do (else the
    map's own query is run and its rows hashed to tell whether anything changed)."""

    name: str
    query: str
    separator: str = " "
    cdb: bool = True
    keys: str = "lower"
    secret: bool = False
    database: str | None = None
    fingerprint: str | None = None
    description: str = ""

    @property
    def spec(self) -> MapSpec:
        """This map's facts in the release catalogue (what its manifest entry tells a node)."""
        return MapSpec(self.name, cdb=self.cdb, secret=self.secret, separator=self.separator)


@dataclass(frozen=True)
class PublisherConfig:
    """The ``[publisher]`` section: database, repository, signing key, guards, channels and maps."""

    database: str
    repository: Path
    signing_key: Path
    schema: str = "mapsync"
    keep: int = 20
    expires: int = 7 * 86400
    full_check: int = 15 * 60
    lock_wait: int = 30
    statement_timeout: int = 10 * 60  # one database statement, at most
    guards: Guards = Guards()
    map_guards: dict[str, Guards] = field(default_factory=dict)
    channels: dict[str, PublisherChannel] = field(default_factory=dict)
    ssh: tuple[str, ...] = ("ssh", "-o", "BatchMode=yes")  # remote shell for ssh:// push
    push_timeout: int = 60
    postfixadmin: PostfixAdminConfig = PostfixAdminConfig()
    sql: SqlConfig = SqlConfig()
    maps: dict[str, MapConfig] = field(default_factory=dict)  # [publisher.maps.NAME]


@dataclass(frozen=True)
class FileMode:
    """Who owns an installed map file and who may read it (``[agent.channels.C.files.MAP]``).
    None keeps mapsync's default: 0644 root, or 0640 group ``dovecot`` for maps with hashes."""

    mode: int | None = None
    owner: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class AgentChannel:
    """Where one channel comes from, where its maps go live and how daemons are told."""

    name: str
    source: str
    target: Path
    reload: tuple[str, ...] = ()
    mirrors: tuple[str, ...] = ()  # further sources, tried in order when the ones before fail
    check: tuple[str, ...] = ()  # run against the staged set before the swap; "{dir}" → its path
    check_timeout: int = 60
    reload_timeout: int = 60
    files: dict[str, FileMode] = field(default_factory=dict)
    inbox: Path | None = None
    warn_after: int = 15 * 60
    critical_after: int = 2 * 3600
    timeout: int = 300
    ssh: tuple[str, ...] = ("ssh", "-o", "BatchMode=yes")
    password_file: Path | None = None  # rsync daemon password (``auth users`` of the module)
    keep: int = 5  # verified releases kept on the node for ``rollback``
    maps: tuple[str, ...] = ()  # if set: the only maps a release of this channel may carry

    @property
    def sources(self) -> tuple[str, ...]:
        """``source`` then its mirrors: the order in which a pull tries them."""
        return (self.source, *self.mirrors)


@dataclass(frozen=True)
class AgentConfig:
    """The ``[agent]`` section: state directory, trusted keys, channels and poll timing."""

    state: Path
    trusted_keys: tuple[Path, ...]
    channels: dict[str, AgentChannel] = field(default_factory=dict)
    interval: int = 5 * 60  # `mapsync agent`: seconds between polls of every channel
    jitter: int = 30  # ... plus a random 0..jitter seconds, so fifty nodes do not poll at once
    # sha256 of every live file at least this often (size/mtime on every pull; see agent/damage.py)
    full_check: int = 3600
    # A world-readable copy of each channel's state (no secret in it), for `mapsync status`
    # run by an unprivileged monitoring user who may not read ``state`` (0700).
    status_dir: Path | None = None

    @property
    def public_status(self) -> Path:
        """``status_dir``, by default ``<state>-status`` beside ``state``."""
        return self.status_dir or self.state.with_name(self.state.name + "-status")


@dataclass(frozen=True)
class Config:
    """A loaded configuration file: its path and the sections it has."""

    path: Path
    publisher: PublisherConfig | None = None
    agent: AgentConfig | None = None

    def need_publisher(self) -> PublisherConfig:
        """The ``[publisher]`` section; ConfigError naming the file when it has none."""
        if self.publisher is None:
            raise ConfigError(f"{self.path}: this command needs a [publisher] section")
        return self.publisher

    def need_agent(self) -> AgentConfig:
        """The ``[agent]`` section; ConfigError naming the file when it has none."""
        if self.agent is None:
            raise ConfigError(f"{self.path}: this command needs an [agent] section")
        return self.agent


def parse_duration(text: str) -> int:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"7d"`` → seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. '90s', '15m', '2h', '7d')")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION:
        # Past it, a date it is added to may pass the year 9999 (Python's last).
        raise ValueError(f"{text!r} is more than {MAX_DURATION // 86400}d (100 years)")
    return seconds


def parse_percent(text: str) -> float:
    """``"10%"`` → 0.10."""
    m = re.match(r"^(\d+(?:\.\d+)?)%$", text.strip())
    if not m:
        raise ValueError(f"not a percentage: {text!r} (use e.g. '10%')")
    return float(m.group(1)) / 100


class Section:
    """Typed access to one TOML table that remembers its file and dotted name for error
    messages. Every table's keys are checked by :meth:`allow` (the configuration docs test
    records those calls to compare the accepted keys with docs/configuration.md)."""

    def __init__(self, path: Path, name: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.path, self.name, self.data = path, name, data

    def where(self, key: str) -> str:
        """``FILE: [section] key``: where an error message says the problem is."""
        return f"{self.path}: [{self.name}] {key}"

    def allow(self, *keys: str) -> None:
        """Refuse a key of the table that is not one of ``keys``, naming it and the known ones."""
        for key in self.data:
            if key not in keys:
                raise ConfigError(
                    f"{self.where(key)}: unknown key (known: {', '.join(sorted(keys))})"
                )

    def _get(self, key: str, typ: type | tuple[type, ...], default: Any, what: str) -> Any:
        if key not in self.data:
            if default is _REQUIRED:
                raise ConfigError(f"{self.where(key)}: missing (required)")
            return default
        value = self.data[key]
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
            raise ConfigError(f"{self.where(key)}: must be {what}, not {value!r}")
        return value

    def text(self, key: str, default: Any = None) -> Any:
        """A non-empty string (``default`` when absent; an error if the key is required)."""
        value = self._get(key, str, default, "a string")
        if isinstance(value, str) and not value:
            raise ConfigError(f"{self.where(key)}: must not be empty")
        return value

    def integer(self, key: str, default: Any, minimum: int = 0) -> Any:
        """An integer of at least ``minimum`` (``default`` when absent)."""
        value = self._get(key, int, default, "an integer")
        if value is not None and value < minimum:
            raise ConfigError(f"{self.where(key)}: must be at least {minimum}, not {value}")
        return value

    def strlist(self, key: str, default: Any = ()) -> tuple[str, ...]:
        """A list of non-empty strings, as a tuple (``default`` when absent)."""
        value = self._get(key, list, _Missing if default is _REQUIRED else default, "a list")
        if value is _Missing:
            raise ConfigError(f"{self.where(key)}: missing (required)")
        if not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.where(key)}: must be a list of non-empty strings")
        return tuple(value)

    def duration(self, key: str, default: int, minimum: int = 0) -> int:
        """A duration string (``"15m"``) in seconds, at least ``minimum`` (``default`` when absent)."""
        value = self._get(key, str, None, "a duration string like '15m'")
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ConfigError(f"{self.where(key)}: {exc}") from None
        if seconds < minimum:
            raise ConfigError(
                f"{self.where(key)}: must be at least {_spell(minimum)}, not {value!r}"
            )
        return seconds

    def percent(self, key: str, default: float) -> float:
        """A percentage string (``"10%"``) as a fraction (``default`` when absent)."""
        value = self._get(key, str, None, "a percentage string like '10%'")
        if value is None:
            return default
        try:
            return parse_percent(value)
        except ValueError as exc:
            raise ConfigError(f"{self.where(key)}: {exc}") from None

    def table(self, key: str) -> dict[str, Any]:
        """A sub-table as a dict (empty when absent)."""
        value = self._get(key, dict, {}, "a table")
        return dict(value)


_REQUIRED = object()
_Missing = object()


def _spell(seconds: int) -> str:
    """Seconds as the largest whole duration unit: 3600 → ``"1h"``."""
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def _timeout(section: Section, key: str, default: int) -> int:
    return section.duration(key, default, minimum=1)


def _argv(section: Section, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A command that must name a program (``ssh``): an empty list would run nothing."""
    argv = section.strlist(key, default)
    if not argv:
        raise ConfigError(f"{section.where(key)}: must name a program (e.g. {list(default)})")
    return argv


def _path(section: Section, key: str, default: Any = _REQUIRED, *, kind: str = "dir") -> Path:
    value = section.text(key, default)
    p = Path(value)
    if not p.is_absolute():
        # Relative paths are relative to the config file, so a demo directory can move.
        p = section.path.resolve().parent / p
    _check_kind(section.where(key), p, kind)
    return p


def _check_name(path: Path, where: str, name: str, what: str) -> None:
    """Refuse a channel or mailstore name (``what``) that cannot be a directory and an rsync
    module name everywhere."""
    if not CHANNEL_NAME.match(name):
        raise ConfigError(f"{path}: [{where}]: {what} names are lowercase letters, digits, - and _")


def non_utf8(p: Path) -> str | None:
    """``p`` shown with its undecodable bytes as ``\\xff`` when it is not valid UTF-8 (a legal
    POSIX name that rsync's argv, state.json, manifests and logs cannot carry); else None."""
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(p).decode("utf-8", "backslashreplace")
    return None


def _check_kind(where: str, p: Path, kind: str) -> None:
    """Refuse, naming ``where``, a path that cannot become a ``kind`` ("dir" or "file"):
    one that exists as the other kind, or lies under a regular file. Found now, not as
    ``[Errno 20]``/``[Errno 21]`` from the first command that uses it. A path that does not
    exist yet is fine (mapsync creates directories; keys may be made after the config)."""
    shown = non_utf8(p)
    if shown is not None:
        raise ConfigError(
            f"{where}: {shown} is not valid UTF-8; mapsync needs paths it can pass to rsync "
            "and record (rename the directory)"
        )
    for q in (p, *p.parents):
        try:
            st = q.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there yet, or under a file: the loop finds which
        except OSError:
            return  # cannot tell (no permission): the command that uses it will say
        if q == p:
            if kind == "dir" and not stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"{where}: {p} is not a directory")
            if kind == "file" and stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"{where}: {p} is a directory, not a file")
        elif not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{where}: {p} lies under {q}, which is not a directory")
        return


def _guards(section: Section, base: Guards) -> Guards:
    section.allow("min_entries", "max_shrink", "max_growth", "max_change")
    return Guards(
        min_entries=section.integer("min_entries", base.min_entries),
        max_shrink=section.percent("max_shrink", base.max_shrink),
        max_growth=section.percent("max_growth", base.max_growth),
        max_change=section.percent("max_change", base.max_change),
    )


def exception_guards(base: Guards) -> Guards:
    """The guards of a list of exceptions (a deny list): it may be empty and may shrink at
    will; growth and changes are guarded as ``base`` says (a mass denial locks users out)."""
    return Guards(0, 1.0, base.max_growth, base.max_change)


def _publisher(path: Path, data: Any) -> PublisherConfig:
    s = Section(path, "publisher", data)
    s.allow(
        "database",
        "schema",
        "repository",
        "signing_key",
        "keep",
        "expires",
        "full_check",
        "lock_wait",
        "statement_timeout",
        "guards",
        "channels",
        "ssh",
        "push_timeout",
        "postfixadmin",
        "sql",
        "maps",
    )
    schema = s.text("schema", "mapsync")
    own_maps = _own_maps(path, s.table("maps"))
    known = {*BUILTIN_MAPS, *own_maps}
    if schema not in SCHEMAS:
        raise ConfigError(
            f"{s.where('schema')}: unknown schema {schema!r} (known: {', '.join(map(repr, SCHEMAS))})"
        )
    postfixadmin = _postfixadmin(path, s.table("postfixadmin"))
    sql = _sql(path, s.table("sql"), required=schema == "sql")
    guards_data = s.table("guards")
    per_map = {k: v for k, v in guards_data.items() if isinstance(v, dict)}
    base = _guards(
        Section(
            path, "publisher.guards", {k: v for k, v in guards_data.items() if k not in per_map}
        ),
        Guards(),
    )
    map_guards = {}
    for name, sub in per_map.items():
        if name not in known:
            raise ConfigError(f"{path}: [publisher.guards.{name}]: unknown map {name!r}")
        # A list of exceptions (dovecot_deny) starts from its own defaults: MapSpec.exceptions.
        spec = BUILTIN_MAPS.get(name)  # None: a map of the operator's own
        start = exception_guards(base) if spec is not None and spec.exceptions else base
        map_guards[name] = _guards(Section(path, f"publisher.guards.{name}", sub), start)

    channels = {}
    for name, sub in s.table("channels").items():
        where = f"publisher.channels.{name}"
        _check_name(path, where, name, "channel")
        cs = Section(path, where, sub)
        cs.allow("maps", "mailstore", "push", "uid", "gid", "customer_field")
        maps = cs.strlist("maps", _REQUIRED)
        if not maps:
            raise ConfigError(f"{cs.where('maps')}: must name at least one map")
        for m in maps:
            if m not in known:
                raise ConfigError(
                    f"{cs.where('maps')}: unknown map {m!r} (known: {', '.join(sorted(known))}; "
                    "a map of your own is defined in [publisher.maps.NAME])"
                )
        if len(set(maps)) != len(maps):
            raise ConfigError(f"{cs.where('maps')}: a map is listed twice")
        push = tuple(_location(cs, "push", d) for d in cs.strlist("push"))
        _distinct(cs, "push", push, "a push destination")
        channels[name] = PublisherChannel(
            name=name,
            maps=maps,
            mailstore=cs.text("mailstore"),
            push=push,
            uid=cs.integer("uid", 5000, minimum=1),
            gid=cs.integer("gid", 5000, minimum=1),
            customer_field=_customer_field(cs, maps),
        )
    if not channels:
        raise ConfigError(f"{path}: [publisher.channels]: define at least one channel")
    _refuse_shared_remote_inboxes(path, channels)
    repository, signing_key = _path(s, "repository"), _path(s, "signing_key", kind="file")
    if repository.resolve() in signing_key.resolve().parents:
        raise ConfigError(
            f"{s.where('signing_key')}: {signing_key} lies inside the repository {repository}, "
            "which every node can download; keep the private key elsewhere"
        )
    return PublisherConfig(
        database=s.text("database", _REQUIRED),
        schema=schema,
        repository=repository,
        signing_key=signing_key,
        keep=s.integer("keep", 20, minimum=2),
        expires=s.duration("expires", 7 * 86400, minimum=MIN_EXPIRES),
        full_check=s.duration("full_check", 15 * 60),
        lock_wait=s.duration("lock_wait", 30),
        statement_timeout=_timeout(s, "statement_timeout", 10 * 60),
        guards=base,
        map_guards=map_guards,
        channels=channels,
        ssh=_argv(s, "ssh", PublisherConfig.ssh),
        push_timeout=_timeout(s, "push_timeout", 60),
        postfixadmin=postfixadmin,
        maps=own_maps,
        sql=sql,
    )


_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}\Z")
# userdb fields Dovecot itself acts on: a customer id must not set one of them.
_RESERVED_FIELDS = frozenset(
    {"uid", "gid", "home", "mail", "user", "nologin", "quota_rule", "system_groups_user"}
)


def _customer_field(cs: Section, maps: tuple[str, ...]) -> str | None:
    """``customer_field``: the userdb field name for the customer id (dovecot_users only)."""
    name: str | None = cs.text("customer_field")
    if name is None:
        return None
    if "dovecot_users" not in maps:
        raise ConfigError(
            f"{cs.where('customer_field')}: only a channel with dovecot_users carries it"
        )
    if not _FIELD_NAME.match(name) or name in _RESERVED_FIELDS or name.startswith("quota"):
        raise ConfigError(
            f"{cs.where('customer_field')}: {name!r} is not a free userdb field name "
            "(lowercase letters, digits, '_'; not one Dovecot acts on, such as home or quota_rule)"
        )
    return name


def _own_maps(path: Path, data: dict[str, Any]) -> dict[str, MapConfig]:
    """``[publisher.maps.NAME]``: maps of the operator's own (docs/maps.md, "Maps of your own")."""
    out = {}
    for name, sub in data.items():
        where = f"publisher.maps.{name}"
        if not CHANNEL_NAME.match(name):
            raise ConfigError(
                f"{path}: [{where}]: map names are lowercase letters, digits, - and _ "
                "(at most 63, starting with a letter or digit): the name is also its file name"
            )
        if name in BUILTIN_MAPS:
            raise ConfigError(
                f"{path}: [{where}]: {name!r} is a built-in map; give yours another name"
            )
        ms = Section(path, where, sub)
        ms.allow(
            "query", "separator", "cdb", "keys", "secret", "database", "fingerprint", "description"
        )
        separator = ms._get("separator", str, " ", "a string")
        if separator not in MAP_SEPARATORS:
            raise ConfigError(
                f"{ms.where('separator')}: must be one of {', '.join(map(repr, MAP_SEPARATORS))}, "
                f"not {separator!r}"
            )
        keys = ms.text("keys", "lower")
        if keys not in MAP_KEYS:
            raise ConfigError(
                f"{ms.where('keys')}: must be {' or '.join(map(repr, MAP_KEYS))}, not {keys!r}"
            )
        out[name] = MapConfig(
            name=name,
            query=_query(ms, "query", _REQUIRED),
            separator=separator,
            cdb=ms._get("cdb", bool, True, "true or false"),
            keys=keys,
            secret=ms._get("secret", bool, False, "true or false"),
            database=ms.text("database"),
            fingerprint=_query(ms, "fingerprint", None),
            description=ms._get("description", str, "", "a string"),
        )
    return out


def _query(section: Section, key: str, default: Any) -> Any:
    """A query of the operator's own: one SELECT, as ``[publisher.sql]``'s. A second statement
    ("...; COMMIT; DELETE ...") would run on PostgreSQL (psycopg runs a string of several),
    writing to the database and ending the snapshot's read-only transaction."""
    value = section.text(key, default)
    if value is None:
        return value
    if not value.strip():
        raise ConfigError(f"{section.where(key)}: must not be blank")
    query = value.strip().rstrip(";").rstrip()
    if not _SELECT.match(_LEADING_COMMENTS.sub("", query)):
        raise ConfigError(f"{section.where(key)}: must be one SELECT (or WITH ... SELECT)")
    if ";" in query:
        # Anywhere, strings and comments too: where a string ends depends on the engine and
        # its settings (E'\'', backslash escapes), so none can be told safe. In a value,
        # chr(59) (PostgreSQL, SQLite) or CHAR(59) (MariaDB) is a ';'.
        raise ConfigError(
            f"{section.where(key)}: must be one statement (no ';' inside, not even in a "
            "string: write chr(59))"
        )
    return query


# Comments before a query's first word ("-- relay access" on a line of its own).
_LEADING_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.S)


SCHEMAS = ("mapsync", "postfixadmin", "sql")
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}\Z")


def _postfixadmin(path: Path, data: dict[str, Any]) -> PostfixAdminConfig:
    """``[publisher.postfixadmin]``; read whatever the schema, so a typo is found before a switch."""
    s = Section(path, "publisher.postfixadmin", data)
    s.allow(
        "prefix",
        "domain_table",
        "mailbox_table",
        "alias_table",
        "alias_domain_table",
        "mail_base",
        "mailstore",
        "mailstores",
        "vacation_domain",
        "vacation_nexthop",
    )
    prefix = s._get("prefix", str, "", "a string")
    names = {}
    for key in ("prefix", "domain_table", "mailbox_table", "alias_table", "alias_domain_table"):
        value = prefix if key == "prefix" else s.text(key)
        # Table names go into SQL as identifiers: letters, digits and '_' only.
        if value and not _TABLE_NAME.match(value):
            raise ConfigError(
                f"{s.where(key)}: {value!r} is not a table name (letters, digits, '_')"
            )
        names[key] = value
    mail_base = s.text("mail_base", PostfixAdminConfig.mail_base)
    if not mail_base.startswith("/") or any(c in mail_base for c in ": \t\r\n\0"):
        raise ConfigError(
            f"{s.where('mail_base')}: must be an absolute path without ':' or whitespace"
        )
    stores = _mailstores(path, "publisher.postfixadmin", s.table("mailstores"))
    default = s.text("mailstore", None)
    if not stores:
        stores = {LOCAL_MAILSTORE.name: LOCAL_MAILSTORE}
    if default is not None and default not in stores:
        raise ConfigError(
            f"{s.where('mailstore')}: no mailstore {default!r} in [publisher.postfixadmin.mailstores] "
            f"(known: {', '.join(stores)})"
        )
    return PostfixAdminConfig(
        prefix=prefix,
        domain_table=names["domain_table"],
        mailbox_table=names["mailbox_table"],
        alias_table=names["alias_table"],
        alias_domain_table=names["alias_domain_table"],
        mail_base=mail_base,
        mailstore=default,
        mailstores=stores,
        vacation_domain=(s.text("vacation_domain") or "").lower() or None,
        vacation_nexthop=s.text("vacation_nexthop"),
    )


def _mailstores(path: Path, section: str, data: dict[str, Any]) -> dict[str, PostfixAdminMailstore]:
    """``[SECTION.mailstores.NAME]`` tables: mailstores the database does not know of."""
    stores = {}
    for name, sub in data.items():
        where = f"{section}.mailstores.{name}"
        _check_name(path, where, name, "mailstore")
        ms = Section(path, where, sub)
        ms.allow("lmtp_host", "lmtp_port", "imap_host", "imap_port", "domains")
        stores[name] = PostfixAdminMailstore(
            name=name,
            lmtp_host=ms.text("lmtp_host", _REQUIRED),
            lmtp_port=ms.integer("lmtp_port", 24, minimum=1),
            imap_host=ms.text("imap_host"),
            imap_port=ms.integer("imap_port", 143, minimum=1),
            domains=tuple(d.lower() for d in ms.strlist("domains")),
        )
    return stores


# A query's first word: a SELECT, or a WITH that ends in one (the transaction is read-only
# anyway; this names the mistake before the database does).
_SELECT = re.compile(r"^\s*(?:SELECT|WITH)\b", re.IGNORECASE)


def _sql(path: Path, data: dict[str, Any], *, required: bool) -> SqlConfig:
    """``[publisher.sql]``; read whatever the schema, its queries required only for "sql"."""
    s = Section(path, "publisher.sql", data)
    s.allow(*SQL_REQUIRED, *SQL_OPTIONAL, "fingerprint", "mailstore")
    queries = {}
    for key in (*SQL_REQUIRED, *SQL_OPTIONAL, "fingerprint"):
        if key == "mailstores" and isinstance(data.get(key), dict):
            continue  # a table of mailstores, not a query
        value = s.text(key, _REQUIRED if required and key in SQL_REQUIRED else None)
        if value is None:
            continue
        queries[key] = _query(s, key, None)  # wrapped as a subquery: one SELECT
    fingerprint = queries.pop("fingerprint", None)
    stores = _mailstores(
        path,
        "publisher.sql",
        data["mailstores"] if isinstance(data.get("mailstores"), dict) else {},
    )
    default = s.text("mailstore", None)
    if not stores:
        stores = {LOCAL_MAILSTORE.name: LOCAL_MAILSTORE}
    if default is not None and "mailstores" not in queries and default not in stores:
        raise ConfigError(
            f"{s.where('mailstore')}: no mailstore {default!r} in [publisher.sql.mailstores] "
            f"(known: {', '.join(stores)})"
        )
    return SqlConfig(queries, fingerprint, default, stores, f"{path}: [publisher.sql]")


def _known_maps(section: Section, maps: tuple[str, ...]) -> tuple[str, ...]:
    """A node's ``maps``: built-in maps, or maps of the publisher's own (``[publisher.maps]``,
    which the node does not see): any name of a map's grammar."""
    for m in maps:
        if not CHANNEL_NAME.match(m):
            raise ConfigError(
                f"{section.where('maps')}: {m!r} is not a map name (lowercase letters, digits, "
                "- and _; a built-in map or one of the publisher's [publisher.maps.NAME])"
            )
    return maps


def _location(section: Section, key: str, value: str) -> str:
    """A channel source or push destination: a path (relative to the config file),
    ``file://``, ``rsync://`` or ``ssh://``; any other URL is refused, naming the key."""
    if location.URL.match(value):
        if not value.startswith(("rsync://", "ssh://", "file://")):
            # Not a relative path named "http:": an unsupported URL.
            raise ConfigError(
                f"{section.where(key)}: unsupported URL {value!r} (use a path, file://, rsync:// or ssh://)"
            )
        url = location.normal(value)
        if url.startswith("file://"):
            _check_kind(section.where(key), Path(url[len("file://") :]), "dir")
        return url
    p = Path(value)  # drops a trailing "/" and "." components: one spelling per directory
    p = p if p.is_absolute() else section.path.resolve().parent / p
    _check_kind(section.where(key), p, "dir")
    return str(p)


def _refuse_shared_remote_inboxes(path: Path, channels: dict[str, PublisherChannel]) -> None:
    """Two push destinations on one host whose paths overlap would mix two channels' releases
    in one inbox (local paths are checked with the other directories, in :func:`_areas`)."""
    seen: list[tuple[str, str, PurePosixPath, str]] = []  # channel, host part, path, url
    for ch in channels.values():
        for url in ch.push:
            parsed = location.parse(url)
            if parsed.local is not None:
                continue
            host, rest = parsed.place
            here = PurePosixPath("/" + rest)
            for other, other_host, there, other_url in seen:
                if host == other_host and (
                    here == there or there in here.parents or here in there.parents
                ):
                    raise ConfigError(
                        f"{path}: [publisher.channels.{ch.name}] push: {url} overlaps "
                        f"[publisher.channels.{other}] push {other_url} (an inbox takes the "
                        "releases of one channel)"
                    )
            seen.append((ch.name, host, here, url))


def _distinct(section: Section, key: str, values: tuple[str, ...], what: str) -> None:
    """Refuse a location listed twice, however it is spelled (the values are normalised)."""
    seen: set[tuple[str, str]] = set()
    for v in values:
        parsed = location.parse(v)
        place = parsed.place if parsed.local is None else ("", v)
        if place in seen:
            raise ConfigError(f"{section.where(key)}: {what} is listed twice ({v})")
        seen.add(place)


_MODE = re.compile(r"^0?[0-7]{3}\Z")


def _files(path: Path, where: str, data: dict[str, Any]) -> dict[str, FileMode]:
    """``[agent.channels.C.files.MAP]``: mode (an octal string, "0640"), owner, group. MAP is
    a built-in map or one of the publisher's own: any name of a map's grammar."""
    files = {}
    for name, sub in data.items():
        fs = Section(path, f"{where}.files.{name}", sub)
        if not CHANNEL_NAME.match(name):
            raise ConfigError(
                f"{path}: [{where}.files.{name}]: {name!r} is not a map name (lowercase letters, "
                "digits, - and _; a built-in map or one of the publisher's [publisher.maps.NAME])"
            )
        fs.allow("mode", "owner", "group")
        mode = fs.text("mode")
        if mode is not None and not _MODE.match(mode):
            raise ConfigError(
                f'{fs.where("mode")}: must be an octal mode string like "0640", not {mode!r}'
            )
        if mode is not None and int(mode, 8) & 0o7133:
            raise ConfigError(
                f"{fs.where('mode')}: {mode} makes a map executable or writable by its group or others; "
                'maps are read-only data (e.g. "0644" or "0640")'
            )
        files[name] = FileMode(
            mode=int(mode, 8) if mode is not None else None,
            owner=fs.text("owner"),
            group=fs.text("group"),
        )
    return files


def _agent(path: Path, data: Any) -> AgentConfig:
    s = Section(path, "agent", data)
    s.allow("state", "trusted_keys", "channels", "interval", "jitter", "full_check", "status_dir")
    interval = s.duration("interval", AgentConfig.interval)
    if interval < 1:
        raise ConfigError(f"{s.where('interval')}: must be at least 1s")
    keys = s.strlist("trusted_keys", _REQUIRED)
    if not keys:
        raise ConfigError(f"{s.where('trusted_keys')}: name at least one public key")
    channels = {}
    for name, sub in s.table("channels").items():
        where = f"agent.channels.{name}"
        _check_name(path, where, name, "channel")
        cs = Section(path, where, sub)
        cs.allow(
            "source",
            "target",
            "reload",
            "inbox",
            "warn_after",
            "critical_after",
            "timeout",
            "ssh",
            "keep",
            "maps",
            "password_file",
            "check",
            "check_timeout",
            "reload_timeout",
            "files",
        )
        warn = cs.duration("warn_after", 15 * 60, minimum=MIN_WARN_AFTER)
        crit = cs.duration("critical_after", 2 * 3600)
        if crit < warn:
            raise ConfigError(f"{cs.where('critical_after')}: must not be shorter than warn_after")
        raw_source = cs.data.get("source")
        if isinstance(raw_source, list):
            if not raw_source:
                raise ConfigError(f"{cs.where('source')}: an empty list names no source")
            sources = tuple(_location(cs, "source", v) for v in cs.strlist("source"))
        else:
            sources = (_location(cs, "source", cs.text("source", _REQUIRED)),)
        _distinct(cs, "source", sources, "a source")
        source = sources[0]
        if "password_file" in cs.data and not any(x.startswith("rsync://") for x in sources):
            raise ConfigError(
                f"{cs.where('password_file')}: only an rsync:// source takes a password "
                "(ssh:// authenticates with the ssh key)"
            )
        if "password_file" in cs.data:
            for url in sources:
                parsed = location.parse(url)
                # A URL that does not parse is refused, naming it, by the transport.
                if url.startswith("rsync://") and parsed.split and not parsed.username:
                    # Found now, not when a failover first reaches this mirror in an outage.
                    raise ConfigError(
                        f"{cs.where('source')}: {url!r} names no user, but the channel has a "
                        "password_file; write rsync://USER@host/module/... (the user of the "
                        "module's `auth users`)"
                    )
        check = cs.strlist("check")
        channels[name] = AgentChannel(
            name=name,
            source=source,
            target=_path(cs, "target"),
            reload=cs.strlist("reload"),
            inbox=_path(cs, "inbox") if "inbox" in cs.data else None,
            warn_after=warn,
            critical_after=crit,
            timeout=_timeout(cs, "timeout", 300),
            ssh=_argv(cs, "ssh", AgentChannel.ssh),
            password_file=(
                _path(cs, "password_file", kind="file") if "password_file" in cs.data else None
            ),
            keep=cs.integer("keep", AgentChannel.keep, minimum=2),
            maps=_known_maps(cs, cs.strlist("maps")),
            mirrors=sources[1:],
            check=check,
            check_timeout=_timeout(cs, "check_timeout", AgentChannel.check_timeout),
            reload_timeout=_timeout(cs, "reload_timeout", AgentChannel.reload_timeout),
            files=_files(path, where, cs.table("files")),
        )
    if not channels:
        raise ConfigError(f"{path}: [agent.channels]: define at least one channel")
    return AgentConfig(
        state=_path(s, "state"),
        status_dir=_path(s, "status_dir") if "status_dir" in s.data else None,
        trusted_keys=tuple(_key_file(s, k) for k in keys),
        channels=channels,
        interval=interval,
        jitter=s.duration("jitter", AgentConfig.jitter),
        full_check=s.duration("full_check", AgentConfig.full_check),
    )


def _key_file(section: Section, value: str) -> Path:
    p = Path(value) if Path(value).is_absolute() else section.path.resolve().parent / value
    _check_kind(section.where("trusted_keys"), p, "file")
    return p


@dataclass(frozen=True)
class _Area:
    """A directory mapsync writes or reads, for the overlap check."""

    where: str  # "[agent.channels.mx] inbox"
    kind: str  # repository | push | state | status_dir | target | inbox | source
    path: Path
    channel: str = ""

    @property
    def real(self) -> Path:
        return self.path.resolve()


# Pairs of kinds that must not share a directory, nor lie one inside the other. Sources
# may (two channels can read one repository), and a source lies inside the repository.
_CLASHES = {
    frozenset(pair)
    for pair in (
        ("target", "target"),
        ("target", "inbox"),
        ("target", "source"),
        ("target", "state"),
        ("inbox", "inbox"),
        ("inbox", "source"),
        ("inbox", "state"),
        ("source", "state"),
        ("repository", "target"),
        ("repository", "inbox"),
        ("repository", "state"),
        ("repository", "push"),
        ("push", "push"),
        ("push", "target"),
        ("push", "state"),
        ("status_dir", "target"),
        ("status_dir", "inbox"),
        ("status_dir", "source"),
        ("status_dir", "state"),
        ("status_dir", "repository"),
        ("status_dir", "push"),
    )
}


def _areas(publisher: PublisherConfig | None, agent: AgentConfig | None) -> list[_Area]:
    """In the order a clash is reported: on the later of two areas, so the message names the
    key to change (an inbox, not the repository it lies in)."""
    areas = []
    if publisher is not None:
        areas.append(_Area("[publisher] repository", "repository", publisher.repository))
        for pc in publisher.channels.values():
            for dest in pc.push:
                if (local := location.parse(dest).local) is not None:
                    areas.append(
                        _Area(f"[publisher.channels.{pc.name}] push", "push", local, pc.name)
                    )
    if agent is not None:
        areas.append(_Area("[agent] state", "state", agent.state))
        areas.append(_Area("[agent] status_dir", "status_dir", agent.public_status))
        for ch in agent.channels.values():
            where = f"[agent.channels.{ch.name}]"
            for src in ch.sources:
                if (local := location.parse(src).local) is not None:
                    areas.append(_Area(f"{where} source", "source", local, ch.name))
            areas.append(_Area(f"{where} target", "target", ch.target, ch.name))
            if ch.inbox is not None:
                areas.append(_Area(f"{where} inbox", "inbox", ch.inbox, ch.name))
    return areas


def _refuse_overlaps(path: Path, areas: list[_Area]) -> None:
    """Each directory mapsync writes has one owner: an inbox that is also a source would
    have its releases pruned after the next pushed install; a target inside the state or
    the repository would be overwritten by either."""
    # The inbox/source clash first: its message says what would be lost.
    pairs = [(a, b) for i, a in enumerate(areas) for b in areas[:i]]
    pairs.sort(key=lambda ab: {ab[0].kind, ab[1].kind} != {"inbox", "source"})
    for a, b in pairs:
        if frozenset((a.kind, b.kind)) not in _CLASHES:
            continue
        ra, rb = a.real, b.real
        if not (ra == rb or ra in rb.parents or rb in ra.parents):
            continue
        if a.kind == b.kind == "target":
            raise ConfigError(
                f"{path}: {a.where}: {a.path} overlaps the target of channel {b.channel} "
                "(each channel needs a directory of its own)"
            )
        if {a.kind, b.kind} == {"inbox", "source"}:
            why = "pruning the inbox after a pushed install would delete the source's releases"
        elif {a.kind, b.kind} == {"inbox"}:
            why = "one channel's pushed release would be pruned or installed by the other"
        elif {a.kind, b.kind} == {"push"}:
            why = "an inbox takes the releases of one channel"
        else:
            why = "each needs a directory of its own"
        raise ConfigError(f"{path}: {a.where}: {a.path} overlaps {b.where} {b.path} ({why})")


def _refuse_unknown_node_maps(
    path: Path, publisher: PublisherConfig | None, agent: AgentConfig | None
) -> None:
    """A node alone accepts any map name (the publisher's own maps are not in its file); in a
    file that also holds the publisher, a node's map must be one the publisher knows: a typo is
    found now, not as every release refused for lacking it."""
    if publisher is None or agent is None:
        return
    known = {*BUILTIN_MAPS, *publisher.maps}
    listed = ", ".join(sorted(known))
    for ch in agent.channels.values():
        for m in ch.maps:
            if m not in known:
                raise ConfigError(
                    f"{path}: [agent.channels.{ch.name}] maps: unknown map {m!r} (known: {listed})"
                )
        for m in ch.files:
            if m not in known:
                raise ConfigError(
                    f"{path}: [agent.channels.{ch.name}.files.{m}]: unknown map {m!r} (known: {listed})"
                )


def unauthenticated_rsync(ch: AgentChannel, source: str) -> bool:
    """Whether ``source`` of ``ch`` is an rsync daemon module pulled without a user and a
    password: anyone who reaches its port can copy what it serves."""
    if not source.startswith("rsync://"):
        return False
    parsed = location.parse(source)
    if not parsed.split:  # malformed: the transport refuses it, naming it
        return False
    user = parsed.username
    return not (user and (ch.password_file is not None or "RSYNC_PASSWORD" in os.environ))


def _warn_unauthenticated(
    path: Path, publisher: PublisherConfig | None, agent: AgentConfig | None
) -> None:
    """A channel with password hashes pulled from an rsync daemon without a user and a
    password: whoever reaches port 873 can copy the same module."""
    if agent is None:
        return
    for ch in agent.channels.values():
        maps = ch.maps
        if not maps and publisher is not None and ch.name in publisher.channels:
            maps = publisher.channels[ch.name].maps
        own = publisher.maps if publisher is not None else {}
        secret = sorted(
            m
            for m in maps
            if (m in BUILTIN_MAPS and BUILTIN_MAPS[m].secret) or (m in own and own[m].secret)
        )
        if not secret:
            continue
        for src in ch.sources:
            if not unauthenticated_rsync(ch, src):
                continue
            log.get("config").warning(
                "channel carries password hashes but is pulled without authentication",
                config=str(path),
                channel=ch.name,
                source=src,
                maps=",".join(secret),
                fix="serve it from a module with `auth users` and set "
                "rsync://USER@host/... and password_file (docs/security.md)",
            )


def resolve_path(explicit: str | None) -> Path:
    """``--config``, else ``$MAPSYNC_CONFIG``, else ``/etc/mapsync/mapsync.toml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("MAPSYNC_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def load(path: Path) -> Config:
    """Read and validate the config file at ``path``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (use --config FILE or set MAPSYNC_CONFIG)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for key in data:
        if key not in ("publisher", "agent"):
            raise ConfigError(f"{path}: [{key}]: unknown section (known: agent, publisher)")
    if not data:
        raise ConfigError(f"{path}: empty config: needs a [publisher] or an [agent] section")
    publisher = _publisher(path, data["publisher"]) if "publisher" in data else None
    agent = _agent(path, data["agent"]) if "agent" in data else None
    _refuse_overlaps(path, _areas(publisher, agent))
    _refuse_unknown_node_maps(path, publisher, agent)
    _warn_unauthenticated(path, publisher, agent)
    return Config(path=path, publisher=publisher, agent=agent)

"""Configuration: one TOML file with a ``[publisher]`` part, an ``[agent]`` part, or both.

Validation happens here, at the edge: unknown keys, wrong types and bad durations raise
:class:`~mapsync.errors.ConfigError` naming the file and the key; everything inside mapsync
trusts the frozen dataclasses it gets.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mapsync.errors import ConfigError

DEFAULT_PATH = Path("/etc/mapsync/mapsync.toml")
CHANNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
MX_MAPS = ("domains", "recipients", "virtual", "transport")
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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


@dataclass(frozen=True)
class PublisherConfig:
    database: str
    repository: Path
    signing_key: Path
    schema: str = "mapsync"
    keep: int = 20
    expires: int = 7 * 86400
    full_check: int = 15 * 60
    lock_wait: int = 30
    guards: Guards = Guards()
    map_guards: dict[str, Guards] = field(default_factory=dict)
    channels: dict[str, PublisherChannel] = field(default_factory=dict)
    ssh: tuple[str, ...] = ("ssh", "-o", "BatchMode=yes")  # remote shell for ssh:// push
    push_timeout: int = 60


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
    state: Path
    trusted_keys: tuple[Path, ...]
    channels: dict[str, AgentChannel] = field(default_factory=dict)
    interval: int = 5 * 60  # `mapsync agent`: seconds between polls of every channel
    jitter: int = 30  # ... plus a random 0..jitter seconds, so fifty nodes do not poll at once
    # sha256 of every live file at least this often (size/mtime on every pull; see agent/damage.py)
    full_check: int = 3600


@dataclass(frozen=True)
class Config:
    path: Path
    publisher: PublisherConfig | None = None
    agent: AgentConfig | None = None

    def need_publisher(self) -> PublisherConfig:
        if self.publisher is None:
            raise ConfigError(f"{self.path}: this command needs a [publisher] section")
        return self.publisher

    def need_agent(self) -> AgentConfig:
        if self.agent is None:
            raise ConfigError(f"{self.path}: this command needs an [agent] section")
        return self.agent


def parse_duration(text: str) -> int:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"7d"`` → seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. '90s', '15m', '2h', '7d')")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_percent(text: str) -> float:
    """``"10%"`` → 0.10."""
    m = re.match(r"^(\d+(?:\.\d+)?)%$", text.strip())
    if not m:
        raise ValueError(f"not a percentage: {text!r} (use e.g. '10%')")
    return float(m.group(1)) / 100


class _Section:
    """Typed access to one TOML table that remembers its dotted name for error messages."""

    def __init__(self, path: Path, name: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.path, self.name, self.data = path, name, data

    def where(self, key: str) -> str:
        return f"{self.path}: [{self.name}] {key}"

    def allow(self, *keys: str) -> None:
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
        value = self._get(key, str, default, "a string")
        if isinstance(value, str) and not value:
            raise ConfigError(f"{self.where(key)}: must not be empty")
        return value

    def integer(self, key: str, default: Any, minimum: int = 0) -> Any:
        value = self._get(key, int, default, "an integer")
        if value is not None and value < minimum:
            raise ConfigError(f"{self.where(key)}: must be at least {minimum}, not {value}")
        return value

    def strlist(self, key: str, default: Any = ()) -> tuple[str, ...]:
        value = self._get(key, list, _Missing if default is _REQUIRED else default, "a list")
        if value is _Missing:
            raise ConfigError(f"{self.where(key)}: missing (required)")
        if not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.where(key)}: must be a list of non-empty strings")
        return tuple(value)

    def duration(self, key: str, default: int) -> int:
        value = self._get(key, str, None, "a duration string like '15m'")
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ConfigError(f"{self.where(key)}: {exc}") from None

    def percent(self, key: str, default: float) -> float:
        value = self._get(key, str, None, "a percentage string like '10%'")
        if value is None:
            return default
        try:
            return parse_percent(value)
        except ValueError as exc:
            raise ConfigError(f"{self.where(key)}: {exc}") from None

    def table(self, key: str) -> dict[str, Any]:
        value = self._get(key, dict, {}, "a table")
        return dict(value)


_REQUIRED = object()
_Missing = object()


def _timeout(section: _Section, key: str, default: int) -> int:
    seconds = section.duration(key, default)
    if seconds < 1:
        raise ConfigError(f"{section.where(key)}: must be at least 1s")
    return seconds


def _argv(section: _Section, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A command that must name a program (``ssh``): an empty list would run nothing."""
    argv = section.strlist(key, default)
    if not argv:
        raise ConfigError(f"{section.where(key)}: must name a program (e.g. {list(default)})")
    return argv


def _path(section: _Section, key: str, default: Any = _REQUIRED) -> Path:
    value = section.text(key, default)
    p = Path(value)
    if not p.is_absolute():
        # Relative paths are relative to the config file, so a demo directory can move.
        p = section.path.resolve().parent / p
    return p


def _guards(section: _Section, base: Guards) -> Guards:
    section.allow("min_entries", "max_shrink", "max_growth", "max_change")
    return Guards(
        min_entries=section.integer("min_entries", base.min_entries),
        max_shrink=section.percent("max_shrink", base.max_shrink),
        max_growth=section.percent("max_growth", base.max_growth),
        max_change=section.percent("max_change", base.max_change),
    )


def _publisher(path: Path, data: Any) -> PublisherConfig:
    from mapsync.maps import CATALOGUE  # the map names are the catalogue's

    s = _Section(path, "publisher", data)
    s.allow(
        "database",
        "schema",
        "repository",
        "signing_key",
        "keep",
        "expires",
        "full_check",
        "lock_wait",
        "guards",
        "channels",
        "ssh",
        "push_timeout",
    )
    schema = s.text("schema", "mapsync")
    if schema != "mapsync":
        raise ConfigError(f"{s.where('schema')}: unknown schema {schema!r} (known: 'mapsync')")
    guards_data = s.table("guards")
    per_map = {k: v for k, v in guards_data.items() if isinstance(v, dict)}
    base = _guards(
        _Section(
            path, "publisher.guards", {k: v for k, v in guards_data.items() if k not in per_map}
        ),
        Guards(),
    )
    map_guards = {}
    for name, sub in per_map.items():
        if name not in CATALOGUE:
            raise ConfigError(f"{path}: [publisher.guards.{name}]: unknown map {name!r}")
        map_guards[name] = _guards(_Section(path, f"publisher.guards.{name}", sub), base)

    channels = {}
    for name, sub in s.table("channels").items():
        where = f"publisher.channels.{name}"
        if not CHANNEL_NAME.match(name):
            raise ConfigError(
                f"{path}: [{where}]: channel names are lowercase letters, digits, - and _"
            )
        cs = _Section(path, where, sub)
        cs.allow("maps", "mailstore", "push", "uid", "gid")
        maps = cs.strlist("maps", _REQUIRED)
        if not maps:
            raise ConfigError(f"{cs.where('maps')}: must name at least one map")
        for m in maps:
            if m not in CATALOGUE:
                raise ConfigError(
                    f"{cs.where('maps')}: unknown map {m!r} (known: {', '.join(sorted(CATALOGUE))})"
                )
        if len(set(maps)) != len(maps):
            raise ConfigError(f"{cs.where('maps')}: a map is listed twice")
        channels[name] = PublisherChannel(
            name=name,
            maps=maps,
            mailstore=cs.text("mailstore"),
            push=tuple(_location(cs, "push", d) for d in cs.strlist("push")),
            uid=cs.integer("uid", 5000, minimum=1),
            gid=cs.integer("gid", 5000, minimum=1),
        )
    if not channels:
        raise ConfigError(f"{path}: [publisher.channels]: define at least one channel")
    return PublisherConfig(
        database=s.text("database", _REQUIRED),
        schema=schema,
        repository=_path(s, "repository"),
        signing_key=_path(s, "signing_key"),
        keep=s.integer("keep", 20, minimum=2),
        expires=s.duration("expires", 7 * 86400),
        full_check=s.duration("full_check", 15 * 60),
        lock_wait=s.duration("lock_wait", 30),
        guards=base,
        map_guards=map_guards,
        channels=channels,
        ssh=_argv(s, "ssh", PublisherConfig.ssh),
        push_timeout=_timeout(s, "push_timeout", 60),
    )


def _known_maps(section: _Section, maps: tuple[str, ...]) -> tuple[str, ...]:
    from mapsync.maps import CATALOGUE

    for m in maps:
        if m not in CATALOGUE:
            raise ConfigError(
                f"{section.where('maps')}: unknown map {m!r} (known: {', '.join(sorted(CATALOGUE))})"
            )
    return maps


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _location(section: _Section, key: str, value: str) -> str:
    """A channel source or push destination: a path (relative to the config file),
    ``file://``, ``rsync://`` or ``ssh://``; any other URL is refused, naming the key."""
    if _URL.match(value):
        if not value.startswith(("rsync://", "ssh://", "file://")):
            # Not a relative path named "http:": an unsupported URL.
            raise ConfigError(
                f"{section.where(key)}: unsupported URL {value!r} (use a path, file://, rsync:// or ssh://)"
            )
        return value
    p = Path(value)
    return str(p if p.is_absolute() else section.path.resolve().parent / p)


_MODE = re.compile(r"^0?[0-7]{3}\Z")


def _files(path: Path, where: str, data: dict[str, Any]) -> dict[str, FileMode]:
    """``[agent.channels.C.files.MAP]``: mode (an octal string, "0640"), owner, group."""
    from mapsync.maps import CATALOGUE

    files = {}
    for name, sub in data.items():
        fs = _Section(path, f"{where}.files.{name}", sub)
        if name not in CATALOGUE:
            raise ConfigError(
                f"{path}: [{where}.files.{name}]: unknown map {name!r} (known: {', '.join(sorted(CATALOGUE))})"
            )
        fs.allow("mode", "owner", "group")
        mode = fs.text("mode")
        if mode is not None and not _MODE.match(mode):
            raise ConfigError(
                f'{fs.where("mode")}: must be an octal mode string like "0640", not {mode!r}'
            )
        if mode is not None and int(mode, 8) & 0o7133:
            raise ConfigError(
                f"{fs.where('mode')}: {mode} makes a map executable or writable by others; "
                'maps are read-only data (e.g. "0644" or "0640")'
            )
        files[name] = FileMode(
            mode=int(mode, 8) if mode is not None else None,
            owner=fs.text("owner"),
            group=fs.text("group"),
        )
    return files


def _agent(path: Path, data: Any) -> AgentConfig:
    s = _Section(path, "agent", data)
    s.allow("state", "trusted_keys", "channels", "interval", "jitter", "full_check")
    interval = s.duration("interval", AgentConfig.interval)
    if interval < 1:
        raise ConfigError(f"{s.where('interval')}: must be at least 1s")
    keys = s.strlist("trusted_keys", _REQUIRED)
    if not keys:
        raise ConfigError(f"{s.where('trusted_keys')}: name at least one public key")
    channels = {}
    for name, sub in s.table("channels").items():
        where = f"agent.channels.{name}"
        if not CHANNEL_NAME.match(name):
            raise ConfigError(
                f"{path}: [{where}]: channel names are lowercase letters, digits, - and _"
            )
        cs = _Section(path, where, sub)
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
        warn = cs.duration("warn_after", 15 * 60)
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
        if len(set(sources)) != len(sources):
            raise ConfigError(f"{cs.where('source')}: a source is listed twice")
        source = sources[0]
        if "password_file" in cs.data and not any(x.startswith("rsync://") for x in sources):
            raise ConfigError(
                f"{cs.where('password_file')}: only an rsync:// source takes a password "
                "(ssh:// authenticates with the ssh key)"
            )
        if "password_file" in cs.data:
            for url in sources:
                if url.startswith("rsync://") and not urlsplit(url).username:
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
            timeout=cs.duration("timeout", 300),
            ssh=_argv(cs, "ssh", AgentChannel.ssh),
            password_file=_path(cs, "password_file") if "password_file" in cs.data else None,
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
    seen: dict[Path, str] = {}
    for ch in channels.values():
        target = ch.target.resolve()
        for other_target, other in seen.items():
            if (
                target == other_target
                or other_target in target.parents
                or target in other_target.parents
            ):
                raise ConfigError(
                    f"{path}: [agent.channels.{ch.name}] target: {ch.target} overlaps the target of "
                    f"channel {other} (each channel needs a directory of its own)"
                )
        seen[target] = ch.name
    return AgentConfig(
        state=_path(s, "state"),
        trusted_keys=tuple(
            (Path(k) if Path(k).is_absolute() else path.resolve().parent / k) for k in keys
        ),
        channels=channels,
        interval=interval,
        jitter=s.duration("jitter", AgentConfig.jitter),
        full_check=s.duration("full_check", AgentConfig.full_check),
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
    return Config(
        path=path,
        publisher=_publisher(path, data["publisher"]) if "publisher" in data else None,
        agent=_agent(path, data["agent"]) if "agent" in data else None,
    )

"""Freshness of every channel on this node, for people, Nagios and Prometheus.

Kept free of heavy imports (no SQLAlchemy, no cryptography): monitoring runs it every minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mapsync.access import denied
from mapsync.agent.damage import check_live, untrusted_signer
from mapsync.agent.node import NodeChannel
from mapsync.agent.owners import drifted, unmet_key
from mapsync.agent.state import ChannelState, StateDamaged
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_WARNING,
    InstallError,
)
from mapsync.metrics import LEVELS, exposition, write_textfile
from mapsync.release import Manifest, parse_iso
from mapsync.runnote import CLOCK_SKEW


@dataclass
class ChannelStatus:
    """One channel's health as ``mapsync status`` reports it: a monitoring exit code, its message
    and the facts behind it."""

    channel: str
    code: int
    message: str
    serial: int | None = None
    installed_age: int | None = None  # seconds since the installed release was created
    last_success_age: int | None = None
    last_success: str | None = None
    expires: str | None = None
    last_error: str | None = None
    entries: dict[str, int] | None = None
    pinned: int | None = None  # serial pinned by ``rollback`` until ``pull --unpin``
    source: str | None = None  # the source (or mirror) that answered the last good check
    failed_sources: dict[str, str] | None = None  # tried before it on that run: source → error
    last_push: str | None = None  # the last good pull from the push inbox (not a source check)
    damage: list[str] | None = None  # what no longer matches the manifest in the live set
    only_strays: bool = False  # the damage is stray files alone: no map changed (a warning)
    last_repair: str | None = None  # when a damaged live set (or state file) was last rebuilt
    last_damage: str | None = None  # what was damaged then
    reason: str | None = None  # the first of the worst problems, for the one-line summary

    @property
    def level(self) -> str:
        """The code's name: OK, WARNING, CRITICAL or UNKNOWN."""
        return LEVELS[self.code]


def _unknown(channel: str, why: str) -> ChannelStatus:
    """UNKNOWN, saying ``why`` on the first line too (Nagios notifications show only it)."""
    return ChannelStatus(channel, EXIT_UNKNOWN, why, reason=why)


def human(seconds: int | None) -> str:
    """An age for people: ``3d``, ``5h``, ``12m``, ``40s``; ``never`` for None."""
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


REPAIR_SHOWN = 86400  # a repair is mentioned (not a problem: it worked) for a day


def ago(seconds: int | None) -> str:
    """``"5m ago"``, ``"never"``, or ``"5m in the future"`` — never a negative age."""
    if seconds is None:
        return "never"
    if seconds < 0:
        return f"{human(-seconds)} in the future"
    return f"{human(seconds)} ago"


def _first_line(text: str, limit: int = 200) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _age(stamp: str | None, now: datetime) -> int | None:
    return int((now - parse_iso(stamp)).total_seconds()) if stamp else None


def channel_status(
    cfg: AgentConfig, ch: AgentChannel, now: datetime | None = None
) -> ChannelStatus:
    """The health of channel ``ch`` on this node, from its state file (or the public copy) and the
    installed set."""
    now = now or datetime.now(UTC)
    problems: list[tuple[int, str]] = []
    paths = NodeChannel.look(cfg, ch).paths
    path = paths.state
    try:
        try:
            state = ChannelState.load(path)
        except PermissionError:
            # An unprivileged monitoring user (nagios, node_exporter's textfile job): the
            # world-readable copy every run writes holds the same fields.
            path = paths.public
            if not path.is_file():
                raise
            state = ChannelState.load(path)
    except StateDamaged as exc:
        # The installed set is still checked below; the next pull rebuilds the state.
        state = ChannelState()
        problems.append((EXIT_ERROR, f"state file damaged, the next pull rebuilds it: {exc}"))
    except PermissionError:
        return _unknown(
            ch.name,
            f"cannot read state: {denied(paths.state)}, nor its public "
            f"copy {path} (written by every pull of this version; readable by all)",
        )
    except OSError as exc:
        return _unknown(ch.name, f"cannot read state: {exc}")
    try:
        live = check_live(paths.target, state.recorded_live(), state.live_serial is not None)
    except OSError as exc:
        return _unknown(ch.name, f"cannot read the live set: {exc}")
    manifest = live.manifest
    if manifest is not None and manifest.channel != ch.name:
        # The node's channel renamed, or the node moved to another channel, with the same
        # target: what the daemons read is the other channel's (another mailstore's logins),
        # and its serial, expiry and entries say nothing of this one's.
        problems.append(
            (
                EXIT_ERROR,
                f"the live set in {paths.target} is channel {manifest.channel}'s (serial "
                f"{manifest.serial}), not this channel's; the next pull installs this channel's "
                "release over it",
            )
        )
        manifest = None
    st = ChannelStatus(ch.name, EXIT_OK, "", last_error=state.last_error, pinned=state.pinned)
    st.last_repair, st.last_damage = state.last_repair, state.last_damage
    if live.damaged:
        st.damage, st.only_strays = live.problems, live.only_strays
        # What Postfix reads no longer matches what was verified: the maps may fail lookups.
        # A stray file alone changes no map: a warning.
        problems.append(
            (
                EXIT_WARNING if live.only_strays else EXIT_ERROR,
                ("stray file(s) in the live set (" if live.only_strays else "live set damaged (")
                + "; ".join(live.problems[:3])
                + (f"; and {len(live.problems) - 3} more" if len(live.problems) > 3 else "")
                + "); `mapsync verify --repair` or the next pull restores it",
            )
        )
    st.last_success = state.last_success
    st.source = state.last_source
    st.failed_sources = dict(state.failed_sources) or None
    st.last_push = state.last_push
    st.last_success_age = _age(state.last_success, now)
    if manifest is None:
        if not live.damaged and live.manifest is None:
            problems.append((EXIT_ERROR, "nothing installed"))
    else:
        if not live.damaged:
            problems += _ownership(ch, manifest, live.directory, state.ownership_unmet)
        st.serial = manifest.serial
        st.installed_age = _age(manifest.created, now)
        st.expires = manifest.expires
        st.entries = {n: m.entries for n, m in manifest.maps.items()}
        left = int((manifest.expires_at() - now).total_seconds())
        lifetime = int((manifest.expires_at() - manifest.created_at()).total_seconds())
        untrusted = untrusted_signer(manifest, cfg.trusted_keys)
        if untrusted is not None:
            # A revoked key's release is what the daemons read: the operator must hear of it
            # now, not at the next full check's failed pull.
            problems.append((EXIT_ERROR, untrusted))
        if manifest.expired(now):
            problems.append((EXIT_ERROR, f"expired {human(-left)} ago"))
        elif left * 4 <= lifetime:
            # The publisher renews at half the lifetime; a quarter left means it has not.
            problems.append((EXIT_WARNING, f"expires in {human(left)}"))
    for what, seconds in (
        ("the installed release was created", st.installed_age),
        ("the last good check is", st.last_success_age),
        ("the last push is", _age(state.last_push, now)),
    ):
        if seconds is not None and seconds < -CLOCK_SKEW:
            # A backward clock step (or a publisher clock far ahead): ages and expiry cannot
            # be trusted until the clocks agree again.
            problems.append(
                (
                    EXIT_WARNING,
                    f"{what} {human(-seconds)} in the future: this node's clock was stepped back "
                    "or differs from the publisher's",
                )
            )
    age = st.last_success_age
    if age is None:
        problems.append((EXIT_ERROR, "never checked successfully"))
    elif age > ch.critical_after:
        problems.append(
            (
                EXIT_ERROR,
                f"last good check {human(age)} ago (critical after {human(ch.critical_after)})",
            )
        )
    elif age > ch.warn_after:
        problems.append(
            (
                EXIT_WARNING,
                f"last good check {human(age)} ago (warning after {human(ch.warn_after)})",
            )
        )
    if state.last_error:
        problems.append((EXIT_WARNING, f"last run failed: {state.last_error.splitlines()[0]}"))
    if state.reload_pending:
        problems.append((EXIT_WARNING, "reload hook failed; retried on the next run"))
    if state.failed_sources and not state.last_error:
        # Served by a later source (a mirror, or the publisher listed after a mirror): the maps
        # are fresh, but a source before it is broken, and a mirror that stops following the
        # publisher would otherwise go unnoticed until expiry.
        problems.append(
            (
                EXIT_WARNING,
                f"served by a later source, {state.last_source}; "
                + "; ".join(
                    f"{src} failed: {_first_line(err)}" for src, err in state.failed_sources.items()
                ),
            )
        )
    if state.pinned is not None:
        problems.append(
            (
                EXIT_WARNING,
                f"pinned to serial {state.pinned} by rollback (`mapsync pull --unpin` follows the publisher again)",
            )
        )
    if problems:
        st.code = max(code for code, _ in problems)
        st.reason = next(msg for code, msg in problems if code == st.code)
    parts = []
    if st.serial is not None:
        parts.append(f"serial {st.serial} (released {ago(st.installed_age)})")
    parts.append(f"last good check {ago(age)}")
    if ch.mirrors and state.last_source:
        parts[-1] += f" from {state.last_source}"
    if state.last_push:
        parts.append(f"last push {ago(_age(state.last_push, now))}")
    if st.expires:
        parts.append(f"expires {st.expires}")
    repaired_age = _age(state.last_repair, now)
    if repaired_age is not None and repaired_age < REPAIR_SHOWN and not live.damaged:
        parts.append(f"repaired {ago(_age(state.last_repair, now))} ({state.last_damage})")
    st.message = ", ".join(parts) + "".join(f"; {msg}" for _, msg in problems)
    return st


def _ownership(
    ch: AgentChannel, manifest: Manifest, directory: Path | None, unmet: str | None
) -> list[tuple[int, str]]:
    """A WARNING for live files (in the live set ``directory``) whose mode, owner or group are
    not what the channel's ``files`` settings give (a ``chmod 600`` by hand: Postfix, not
    root, can no longer read the map): the next pull gives them back, unless ``unmet`` (the
    state's ``ownership_unmet``) says a set built again could not keep them either."""
    if directory is None:
        return []
    try:
        found = drifted(ch, manifest, directory)
    except InstallError as exc:  # a user or group this node does not have: pull says so
        return [(EXIT_WARNING, f"the files settings cannot be given: {exc}")]
    if not found:
        return []
    files = f"live file(s) {', '.join(found[:3])}{' and more' if len(found) > 3 else ''}: "
    if unmet is not None and unmet == unmet_key(ch, manifest, directory):
        return [
            (
                EXIT_WARNING,
                f"{files}owner, group or mode not as configured, and the set "
                "built again could not keep them either (a filesystem that forces them?); "
                "no pull tries again before the next release (`mapsync verify --repair` does)",
            )
        ]
    return [
        (
            EXIT_WARNING,
            f"{files}owner, group or mode not as configured (changed by hand?); "
            "the next pull restores them",
        )
    ]


def summary(statuses: list[ChannelStatus]) -> str:
    """The first line's channel list: each channel's level, with the reason when not OK
    (Nagios shows only the first line in notifications)."""
    return ", ".join(
        f"{s.channel} {s.level}" + (f" ({_first_line(s.reason, 120)})" if s.reason else "")
        for s in statuses
    )


def overall(statuses: list[ChannelStatus]) -> int:
    """Nagios semantics: CRITICAL beats WARNING beats UNKNOWN beats OK."""
    codes = {s.code for s in statuses}
    for code in (EXIT_ERROR, EXIT_WARNING, EXIT_UNKNOWN):
        if code in codes:
            return code
    return EXIT_OK


def perfdata(statuses: list[ChannelStatus]) -> str:
    """The Nagios performance data of ``statuses``: each channel's serial and check age."""
    parts = []
    for s in statuses:
        if s.serial is not None:
            parts.append(f"{s.channel}_serial={s.serial}")
        if s.last_success_age is not None:
            parts.append(f"{s.channel}_check_age={s.last_success_age}s")
    return " ".join(parts)


_METRICS = (
    ("mapsync_status", "Channel status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."),
    ("mapsync_release_serial", "Serial of the installed release."),
    (
        "mapsync_release_age_seconds",
        "Seconds since the installed release was created by the publisher.",
    ),
    ("mapsync_last_success_timestamp_seconds", "Unix time of the last good check of the source."),
    (
        "mapsync_last_push_timestamp_seconds",
        "Unix time of the last release installed from the push inbox.",
    ),
    ("mapsync_expiry_timestamp_seconds", "Unix time at which the installed release expires."),
    ("mapsync_pinned", "1 while a rollback pins the channel to an older release."),
    ("mapsync_last_run_failed", "1 while the last run of the channel failed (see status)."),
    ("mapsync_map_entries", "Entries of each installed map."),
    (
        "mapsync_live_damaged",
        "1 while a live map no longer matches its manifest (stray files alone: 0).",
    ),
    (
        "mapsync_last_repair_timestamp_seconds",
        "Unix time at which a damaged live set (or state file) was last rebuilt.",
    ),
)


def write_prometheus(path: Path, statuses: list[ChannelStatus]) -> None:
    """Write the metrics of ``statuses`` to ``path``; see :func:`write_textfile`."""
    write_textfile(path, prometheus(statuses))


def prometheus(statuses: list[ChannelStatus]) -> str:
    """node_exporter textfile-collector metrics for ``statuses`` (gauges, one per channel)."""
    samples: dict[str, list[str]] = {name: [] for name, _ in _METRICS}
    for s in statuses:
        label = f'channel="{s.channel}"'
        samples["mapsync_status"].append(f"{{{label}}} {s.code}")
        samples["mapsync_pinned"].append(f"{{{label}}} {1 if s.pinned is not None else 0}")
        damaged = s.damage and not s.only_strays  # strays change no map: status WARNING
        samples["mapsync_live_damaged"].append(f"{{{label}}} {1 if damaged else 0}")
        samples["mapsync_last_run_failed"].append(f"{{{label}}} {1 if s.last_error else 0}")
        if s.last_repair:
            stamp = int(parse_iso(s.last_repair).timestamp())
            samples["mapsync_last_repair_timestamp_seconds"].append(f"{{{label}}} {stamp}")
        if s.serial is not None:
            samples["mapsync_release_serial"].append(f"{{{label}}} {s.serial}")
        if s.installed_age is not None:
            samples["mapsync_release_age_seconds"].append(f"{{{label}}} {s.installed_age}")
        if s.last_success:
            stamp = int(parse_iso(s.last_success).timestamp())
            samples["mapsync_last_success_timestamp_seconds"].append(f"{{{label}}} {stamp}")
        if s.last_push:
            stamp = int(parse_iso(s.last_push).timestamp())
            samples["mapsync_last_push_timestamp_seconds"].append(f"{{{label}}} {stamp}")
        if s.expires:
            stamp = int(parse_iso(s.expires).timestamp())
            samples["mapsync_expiry_timestamp_seconds"].append(f"{{{label}}} {stamp}")
        for name, n in sorted((s.entries or {}).items()):
            samples["mapsync_map_entries"].append(f'{{{label},map="{name}"}} {n}')
    return exposition(_METRICS, samples)

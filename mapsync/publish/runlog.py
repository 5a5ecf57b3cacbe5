"""The publisher's own health: ``REPO/.publisher.json`` records its last run and its last
successful run, so ``mapsync status --publisher`` can tell a publisher that keeps failing
(the database locked, down or unreachable) while every node still reports OK.

Kept free of heavy imports (no SQLAlchemy, no cryptography): monitoring runs it every minute.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mapsync import log
from mapsync.config import PublisherConfig
from mapsync.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_WARNING,
    MapsyncError,
    described,
)
from mapsync.release import iso, parse_iso, utcnow
from mapsync.runnote import ago as _ago
from mapsync.runnote import first_line as _first_line
from mapsync.runnote import (
    in_future,
    read_note,
    write_note,
)
from mapsync.runnote import stamp as _stamp

RUNLOG = ".publisher.json"

_log = log.get("publisher")


def _read(repository: Path) -> dict[str, object]:
    return read_note(repository / RUNLOG)


def record_run(
    repository: Path,
    error: BaseException | str | None,
    channels: Collection[str] = (),
    every: bool = True,
) -> None:
    """Note a finished publish run of ``channels`` (``error`` None: it succeeded; else what
    ended it). ``every``: the run covered every configured channel; a run of some
    (``publish --channel``) notes its own, and its success clears no other channel's failure.
    Never fails the run: a note that cannot be written is logged."""
    note = _read(repository)
    now = iso(utcnow())
    if isinstance(error, BaseException):
        error = described(error)
    error = _first_line(error) if error is not None else None
    # Read before this run changes the top-level fields: changed, they would read as a run
    # of an earlier version, and every channel would take this run's time and error.
    runs = _channel_notes(note)
    # The top-level fields are the runs of every channel (what versions before the
    # per-channel notes read): a failure of any run is noted there, a success of all only.
    note["last_run"] = now
    if error is not None or every:
        note["last_error"] = error
    if error is None and every:
        note["last_success"] = now
    for name in channels:
        run = runs.get(name, {})
        run["last_run"], run["last_error"] = now, error
        if error is None:
            run["last_success"] = now
        runs[name] = run
    note["channels"] = runs
    note[CHANNELS_WITH] = _top(note)
    _write(repository, note, "the publish run")


# The top-level fields as the run that last wrote the per-channel notes left them. A version
# before those notes keeps "channels" as it reads it but writes only the top-level fields (a
# `publish --interval` loop not restarted since the upgrade): top-level fields that differ
# are a run of such a version, newer than every per-channel note. (Not the time alone: two
# runs in one second have the same.)
CHANNELS_WITH = "channels_written_with"


def _top(note: dict[str, object]) -> list[object]:
    return [note.get("last_run"), note.get("last_error"), note.get("last_success")]


def _channel_notes(note: dict[str, object]) -> dict[str, dict[str, object]]:
    """Each channel's own note of its runs (``last_run``, ``last_success``, ``last_error``),
    a copy. Runs an earlier version noted since (see :data:`CHANNELS_WITH`) are folded in as
    that version noted them, as runs of every channel: its last run and error, and its last
    success where newer. (A note written today before :data:`CHANNELS_WITH` has none: its
    per-channel notes are taken as they are.)"""
    found = note.get("channels")
    runs = {
        name: dict(run)
        for name, run in (found.items() if isinstance(found, dict) else ())
        if isinstance(run, dict)
    }
    if not runs or note.get(CHANNELS_WITH, _top(note)) == _top(note):
        return runs
    success = _stamp(note, "last_success")
    for run in runs.values():
        run["last_run"], run["last_error"] = note.get("last_run"), note.get("last_error")
        own = _stamp(run, "last_success")
        if success is not None and (own is None or success > own):
            run["last_success"] = note["last_success"]
    return runs


def _write(repository: Path, note: dict[str, object], what: str) -> None:
    write_note(repository / RUNLOG, note, what, _log)


def record_pushes(repository: Path, failed: dict[str, str | None]) -> None:
    """Note how the pushes of the channels in ``failed`` went (channel → what failed; None:
    every destination has the release): a publish that succeeded while its pushes fail is
    still a WARNING, or a node that never gets pushes would look fine from here. The other
    channels' notes stay (a run of one channel says nothing of the others'; one removed, or
    no longer pushing, is not reported: see :func:`publisher_status`). Never fails the run."""
    note = _read(repository)
    old = note.get("push_failed")
    notes = dict(old) if isinstance(old, dict) else {}
    for channel, what in failed.items():
        if what is None:
            notes.pop(channel, None)
        else:
            notes[channel] = _first_line(what)
    if notes == (old if isinstance(old, dict) else {}):
        return
    note["push_failed"] = notes
    _write(repository, note, "the pushes")


_METRICS = (
    ("mapsync_publisher_status", "Publisher status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."),
    ("mapsync_publisher_last_run_timestamp_seconds", "Unix time of the last publish run."),
    (
        "mapsync_publisher_last_success_timestamp_seconds",
        "Unix time of the last successful publish run.",
    ),
    ("mapsync_publisher_serial", "Serial of the release LATEST names, per channel."),
)


def publisher_metrics(cfg: PublisherConfig, st: PublisherStatus) -> str:
    """node_exporter textfile metrics of the publisher: its status and each channel's
    current serial (nodes behind it: ``mapsync_publisher_serial - mapsync_release_serial``)."""
    from mapsync.metrics import exposition
    from mapsync.publish.repository import Repository

    samples: dict[str, list[str]] = {name: [] for name, _ in _METRICS}
    samples["mapsync_publisher_status"].append(f" {st.code}")
    for key, name in (
        ("last_run", "mapsync_publisher_last_run_timestamp_seconds"),
        ("last_success", "mapsync_publisher_last_success_timestamp_seconds"),
    ):
        stamp = getattr(st, key)
        if stamp:
            samples[name].append(f" {int(parse_iso(stamp).timestamp())}")
    repo = Repository(cfg.repository, read_only=True)
    for channel in sorted(cfg.channels):
        try:
            latest = repo.latest(channel)
        except MapsyncError:
            continue  # a damaged LATEST: the next publish repairs it; no serial to show
        if latest is not None:
            samples["mapsync_publisher_serial"].append(f'{{channel="{channel}"}} {latest.serial}')
    return exposition(_METRICS, samples)


@dataclass
class PublisherStatus:
    """The publisher's health as ``mapsync status --publisher`` reports it, from its last run
    note."""

    code: int
    message: str
    last_run: str | None = None
    last_success: str | None = None
    last_error: str | None = None
    push_failed: str | None = None


def _runs(note: dict[str, object], names: Collection[str]) -> dict[str, _Run]:
    """Each channel's last run, success and error: its own note (with the runs an earlier
    version noted since, :func:`_channel_notes`), else (a note written before the
    per-channel notes, or a channel no run has named yet) the runs of every channel."""
    runs = _channel_notes(note)
    out = {}
    for name in names:
        run = runs.get(name, note)
        error = run.get("last_error")
        out[name] = _Run(
            _stamp(run, "last_run"),
            _stamp(run, "last_success"),
            error if isinstance(error, str) else None,
        )
    return out


def _oldest(stamps: list[datetime | None]) -> datetime | None:
    """The oldest of ``stamps``; None if any is None (never) or there are none."""
    known = [s for s in stamps if s is not None]
    return min(known) if known and len(known) == len(stamps) else None


@dataclass(frozen=True)
class _Run:
    last_run: datetime | None
    last_success: datetime | None
    error: str | None


def publisher_status(cfg: PublisherConfig) -> PublisherStatus:
    """OK while publish runs succeed; WARNING when the last run of a channel failed, its
    pushes failed, no run of it finished within ``full_check``, or a recorded time lies in
    the future (a clock stepped back); CRITICAL when none of a
    channel succeeded for half of ``expires`` (its releases then go unrenewed and start to
    expire on the nodes); UNKNOWN before the first run. A run of some channels (``publish
    --channel``) tells nothing of the others: each channel is judged by its own runs."""
    note = _read(cfg.repository)
    now = utcnow()
    runs = _runs(note, sorted(cfg.channels))
    last_run = max(filter(None, (r.last_run for r in runs.values())), default=None)
    last_success = _oldest([r.last_success for r in runs.values()])

    def scope(names: list[str]) -> str:
        """Which channels a finding is of: none named when it is of every one."""
        return "" if len(names) == len(runs) else f"channel(s) {', '.join(names)}: "

    def errors(names: list[str]) -> str | None:
        return "; ".join(dict.fromkeys(filter(None, (runs[n].error for n in names)))) or None

    notes = note.get("push_failed")
    pushing = {name for name, ch in cfg.channels.items() if ch.push}  # as configured now
    pushes = (
        "; ".join(str(v) for k, v in sorted(notes.items()) if k in pushing) or None
        if isinstance(notes, dict)
        else None
    )
    failed = [n for n, r in runs.items() if r.error]
    fields = {
        "last_run": iso(last_run) if last_run else None,
        "last_success": iso(last_success) if last_success else None,
        "last_error": errors(failed)
        if len(failed) == len(runs)
        else ("; ".join(f"{n}: {runs[n].error}" for n in failed) or None),
        "push_failed": pushes,
    }
    if last_run is None:
        return PublisherStatus(
            EXIT_UNKNOWN, f"no publish run recorded in {cfg.repository / RUNLOG}", **fields
        )
    stale = [
        n
        for n, r in runs.items()
        if r.last_success is None or (now - r.last_success).total_seconds() > cfg.expires / 2
    ]
    if stale:
        oldest = _oldest([runs[n].last_success for n in stale])
        success = f"last successful run {_ago(oldest, now)}"
        error = errors(stale)
        why = f"; last run failed: {error}" if error else ""
        return PublisherStatus(
            EXIT_ERROR, f"{scope(stale)}{success}, releases are not being renewed{why}", **fields
        )
    success = f"last successful run {_ago(last_success, now)}"
    newest_success = max(filter(None, (r.last_success for r in runs.values())), default=None)
    ahead = [
        f"the {what} is recorded {_ago(stamp, now)}"
        for what, stamp in (("last run", last_run), ("last successful run", newest_success))
        if stamp is not None and in_future(stamp, now)
    ]
    if ahead:
        # This host's clock was stepped back since (or was ahead then): until a run records
        # the time again, no age here means anything: a publisher stopped for a month would
        # read as one that ran "0s ago".
        error = errors(failed)
        why = f"; last run failed: {error}" if error else ""
        return PublisherStatus(
            EXIT_WARNING,
            "; ".join(ahead) + ": this host's clock was stepped back or was ahead when it "
            f"ran; ages are known again after the next successful run{why}",
            **fields,
        )
    if failed:
        when = max(filter(None, (runs[n].last_run for n in failed)), default=None)
        return PublisherStatus(
            EXIT_WARNING,
            f"{scope(failed)}last run failed {_ago(when, now)}: {errors(failed)}; {success}",
            **fields,
        )
    idle = [
        n
        for n, r in runs.items()
        if r.last_run is None or (now - r.last_run).total_seconds() > cfg.full_check
    ]
    if idle:
        when = min(filter(None, (runs[n].last_run for n in idle)), default=None)
        return PublisherStatus(
            EXIT_WARNING,
            f"{scope(idle)}no publish run for {_ago(when, now)[:-4]}; {success}",
            **fields,
        )
    if pushes:
        return PublisherStatus(EXIT_WARNING, f"{pushes}; {success}", **fields)
    stepped = _clock_behind(cfg, now)
    if stepped:
        return PublisherStatus(EXIT_WARNING, f"{stepped}; {success}", **fields)
    left = _unconfigured(cfg)
    if left:
        return PublisherStatus(EXIT_WARNING, f"{left}; {success}", **fields)
    return PublisherStatus(EXIT_OK, success, **fields)


def _clock_behind(cfg: PublisherConfig, now: datetime) -> str | None:
    """The channels whose release ``LATEST`` names was created before the one it follows, or
    lies in the future: this host's clock was stepped back (or was ahead then). Its release
    then expires early (already expired, stepped back by ``expires`` or more: every node
    refuses it), and its renewal comes late. None when there are none."""
    from mapsync.publish.repository import Repository

    repo = Repository(cfg.repository, read_only=True)
    found = []
    for name in sorted(cfg.channels):
        try:
            manifest = repo.latest_manifest(name)
            if manifest is None:
                continue
            created = manifest.created_at()
            if in_future(created, now):
                found.append(
                    f"channel {name}: serial {manifest.serial} created "
                    f"{_ago(created, now)} ({manifest.created})"
                )
                continue
            if manifest.previous is None:
                continue
            before = repo.manifest(name, manifest.previous)
        except (MapsyncError, OSError, ValueError):
            continue
        if in_future(before.created_at(), created):
            found.append(
                f"channel {name}: serial {manifest.serial} is created {manifest.created}, "
                f"before serial {before.serial} ({before.created}), and expires "
                f"{manifest.expires}"
            )
    if not found:
        return None
    return (
        "; ".join(found) + ": this host's clock was stepped back or was ahead (releases expire "
        "early, their renewals come late; one already expired is refused by every node)"
    )


def _unconfigured(cfg: PublisherConfig) -> str | None:
    """The channels the repository still serves that the config no longer lists (renamed or
    removed): nobody renews them, and every node still pulling one goes CRITICAL when its
    release expires. None when there are none."""
    from mapsync.publish.repository import Repository

    repo = Repository(cfg.repository, read_only=True)
    try:
        names = sorted(p.name for p in cfg.repository.iterdir() if p.is_dir())
    except OSError:
        return None
    found = []
    for name in names:
        if name in cfg.channels or name.startswith("."):
            continue
        try:
            manifest = repo.latest_manifest(name)
        except MapsyncError:
            manifest = None
        if manifest is not None:
            found.append(f"{name} (serial {manifest.serial}, expires {manifest.expires})")
    if not found:
        return None
    return (
        f"channel(s) in {cfg.repository} no longer in the config, not renewed: "
        + ", ".join(found)
        + " (nodes still pulling one go CRITICAL when it expires; remove its directory when none"
        " does)"
    )

"""Push: each channel's current release into the inboxes of its nodes (``push = [...]``).

A push is a shortcut, not the delivery guarantee: agents poll the repository anyway. So a
failed push never undoes or fails the publish; it is logged (channel, destination, rsync's
message), makes ``mapsync publish`` exit 2 once everything else is done, and is retried by
every later ``publish`` run, changed database or not, until the destination has the serial
LATEST names. What each destination last received is recorded in ``REPO/<channel>/.pushed.json``
(written atomically; agents never fetch it)::

    {"destinations": {"rsync://mx1.example.net/inbox/mx": {
        "serial": 41, "delivered": "2026-05-01T10:00:00Z", "bytes": 2113,
        "error": "rsync failed (exit 10): ...", "failed_serial": 42, "failed_at": "..."}}}

The inbox keeps the delivered release and the one before it (an agent may be fetching that
one at the moment of the push); the push removes older ones, so agents need not prune.
Deleting ``.pushed.json`` (or one destination's entry) makes the next run push again.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapsync import log
from mapsync.atomic import atomic_write
from mapsync.config import PublisherChannel, PublisherConfig
from mapsync.errors import LockBusy, MapsyncError, TransportError
from mapsync.publish.plan import ChannelPlan
from mapsync.publish.repository import Repository
from mapsync.release import LATEST, iso, parse_latest, utcnow
from mapsync.transport.inbox import Inbox

_log = log.get("publisher")

PUSHED = ".pushed.json"
PUSH_LOCK = ".push.lock"
MAX_PARALLEL = 16  # destinations of one channel pushed at once (each an rsync process)


@dataclass(frozen=True)
class Push:
    """What one publish run did for one destination of one channel.

    ``action``: ``pushed``, ``current`` (it already had ``serial``), ``failed``, or
    ``would push`` (dry run)."""

    channel: str
    destination: str
    serial: int | None  # None: the channel's LATEST could not be read
    action: str
    bytes: int = 0
    error: str | None = None


class PushFailed(TransportError):
    """The release is published, but pushing it to some node inboxes failed (exit 2)."""

    def __init__(self, failed: list[Push]) -> None:
        self.failed = failed
        where = ", ".join(
            f"channel {p.channel}"
            + (f" serial {p.serial}" if p.serial else "")
            + f" → {p.destination}"
            for p in failed
        )
        super().__init__(
            f"published, but the push failed for {len(failed)} destination(s) ({where}); "
            "agents still poll the repository, and the push is retried on the next publish run"
        )


def read_record(repo: Repository, channel: str) -> dict[str, dict[str, Any]]:
    """``REPO/<channel>/.pushed.json``: destination → what it last received (empty if none)."""
    try:
        data = json.loads((repo.channel(channel) / PUSHED).read_bytes())
    except (FileNotFoundError, ValueError):
        return {}
    dests = data.get("destinations") if isinstance(data, dict) else None
    if not isinstance(dests, dict):
        return {}
    return {k: v for k, v in dests.items() if isinstance(v, dict)}


def delivered(record: dict[str, dict[str, Any]], destination: str) -> int | None:
    serial = record.get(destination, {}).get("serial")
    return serial if isinstance(serial, int) else None


def push_channels(
    cfg: PublisherConfig,
    names: list[str] | None = None,
    *,
    dry_run: bool = False,
    plans: list[ChannelPlan] | None = None,
) -> list[Push]:
    """Push the current release of every selected channel to each destination that does not
    have it yet. A dry run pushes nothing: it reports what would be pushed, counting the
    serial ``plans`` would publish."""
    repo = Repository(cfg.repository)
    channels = [ch for ch in cfg.channels.values() if ch.push and (not names or ch.name in names)]
    planned = {p.channel: p.serial for p in plans or [] if p.pending and p.serial}
    outcomes: list[Push] = []
    for ch in channels:
        if dry_run:
            outcomes += _would_push(repo, ch, planned.get(ch.name))
            continue
        try:
            outcomes += _push_channel(cfg, repo, ch)
        except (MapsyncError, OSError) as exc:
            # The channel could not start or finish (LATEST unreadable, another run pushing,
            # the record not written): every destination counts as failed and is retried.
            _log.error("push failed", channel=ch.name, error=str(exc))
            outcomes += [Push(ch.name, d, None, "failed", error=str(exc)) for d in ch.push]
    return outcomes


def _would_push(repo: Repository, ch: PublisherChannel, planned: int | None) -> list[Push]:
    latest = repo.latest(ch.name)
    serial = planned or (latest.serial if latest else None)
    if serial is None:
        return []
    record = read_record(repo, ch.name)
    return [
        Push(ch.name, d, serial, "current" if delivered(record, d) == serial else "would push")
        for d in ch.push
    ]


def _push_channel(cfg: PublisherConfig, repo: Repository, ch: PublisherChannel) -> list[Push]:
    if not repo.channel(ch.name).is_dir():
        return []  # nothing published yet
    with _push_lock(repo.channel(ch.name) / PUSH_LOCK, cfg.lock_wait):
        path = repo.channel(ch.name) / LATEST
        try:
            latest_bytes = path.read_bytes()
        except FileNotFoundError:
            return []  # nothing published yet
        serial = parse_latest(latest_bytes, str(path)).serial
        release = repo.release(ch.name, serial)
        record = read_record(repo, ch.name)
        todo = [d for d in ch.push if delivered(record, d) != serial]
        done = [Push(ch.name, d, serial, "current") for d in ch.push if d not in todo]
        if not todo:
            return done

        def deliver(dest: str) -> Push:
            started = time.monotonic()
            try:
                basis = delivered(record, dest)
                fresh = basis is None or "error" in record.get(dest, {})
                moved = Inbox(dest, cfg.push_timeout, cfg.ssh).deliver(
                    release, serial, latest_bytes, basis, prepare=fresh
                )
            except (MapsyncError, OSError) as exc:
                _log.error(
                    "push failed", channel=ch.name, destination=dest, serial=serial, error=str(exc)
                )
                return Push(ch.name, dest, serial, "failed", error=str(exc))
            _log.info(
                "pushed release",
                channel=ch.name,
                destination=dest,
                serial=serial,
                bytes=moved,
                seconds=round(time.monotonic() - started, 3),
            )
            return Push(ch.name, dest, serial, "pushed", moved)

        if len(todo) == 1:
            pushed = [deliver(todo[0])]
        else:
            with ThreadPoolExecutor(min(MAX_PARALLEL, len(todo))) as pool:
                pushed = list(pool.map(deliver, todo))
        _write_record(repo, ch, record, pushed)
        return done + pushed


def _write_record(
    repo: Repository, ch: PublisherChannel, record: dict[str, dict[str, Any]], pushed: list[Push]
) -> None:
    now = iso(utcnow())
    # Only configured destinations: one removed from the config is forgotten.
    new = {d: dict(record[d]) for d in ch.push if d in record}
    for p in pushed:
        entry = new.setdefault(p.destination, {"serial": None})
        if p.action == "pushed":
            entry.update(serial=p.serial, delivered=now, bytes=p.bytes)
            for key in ("error", "failed_serial", "failed_at"):
                entry.pop(key, None)
        else:
            entry.update(error=p.error, failed_serial=p.serial, failed_at=now)
    data = json.dumps({"destinations": new}, indent=2, sort_keys=True) + "\n"
    atomic_write(repo.channel(ch.name) / PUSHED, data.encode())


@contextmanager
def _push_lock(path: Path, wait: float) -> Iterator[None]:
    """One push per channel at a time, so two runs never write an inbox's LATEST out of order
    (each reads LATEST only once it holds the lock, and LATEST only moves forward)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"{path}: another mapsync publish is pushing this channel (waited {wait:.0f}s)"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # closing drops the lock; a killed run's lock dies with it

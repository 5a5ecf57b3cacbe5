"""``mapsync rollback --publisher SERIAL``: publish an old release's maps again, as a new serial.

Agents refuse a lower serial (rollback attack), so the publisher does not move LATEST back:
it copies release SERIAL's text maps into a new release with the next serial, ``previous`` =
the current LATEST, a fresh ``created``/``expires``, signed with the publisher's key, and
commits it as ``publish`` does (:meth:`~mapsync.publish.repository.Repository.stage`, then
:meth:`~mapsync.publish.repository.Repository.commit`: staging → rename → LATEST), so every agent
follows on its next pull. The old release is checked first — verified with the publisher's
own key (:func:`mapsync.release.verify.verify_release`) and every file's sha256 — so content
altered in the repository is never signed again.

The database still holds whatever made the bad release: the next ``publish`` renders it
again. Stop the publisher's timer until the database is fixed (docs/operator-guide.md).
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import replace
from datetime import timedelta

from mapsync import GENERATOR, log
from mapsync.access import check_owner
from mapsync.config import PublisherConfig
from mapsync.errors import ConfigError, MapsyncError, VerificationError
from mapsync.publish.plan import ChannelPlan, MapPlan, diff_files
from mapsync.publish.repository import Repository
from mapsync.release import Manifest, MapEntry, iso, separator, utcnow
from mapsync.release.verify import check_map_files, verify_release
from mapsync.signing import key_id, load_private

_log = log.get("publisher")


def republish(cfg: PublisherConfig, channel: str, serial: int) -> ChannelPlan:
    """Publish the maps of release ``serial`` of ``channel`` as a new release; return its plan."""
    if channel not in cfg.channels:
        raise ConfigError(f"unknown channel {channel} (configured: {', '.join(cfg.channels)})")
    key = load_private(cfg.signing_key)
    public = key.public_key()
    repo = Repository(cfg.repository)
    check_owner(cfg.repository, "the repository")
    with repo.lock(cfg.lock_wait):
        kept = repo.serials(channel)
        last, _ = repo.current(channel)  # a damaged LATEST: the newest kept release; rewritten
        listed = ", ".join(map(str, kept)) or "none"
        if last is None:
            raise MapsyncError(f"channel {channel}: nothing is published yet; nothing changed")
        if serial == last.serial:
            raise MapsyncError(
                f"channel {channel}: release {serial} is LATEST already; nothing changed"
            )
        if serial not in kept:
            raise MapsyncError(
                f"channel {channel}: release {serial} is not kept (kept: {listed}); nothing changed"
            )
        old_dir = repo.release(channel, serial)
        where = str(old_dir)
        try:
            release = verify_release(
                old_dir, {key_id(public): public}, where, channel=channel, serial=serial
            )
            check_map_files(release, where)
        except VerificationError as exc:
            raise VerificationError(f"{exc}; nothing changed") from None
        old = release.manifest
        # The channel's maps as configured now: one it no longer lists (a secret map taken
        # back out of an MX channel) is never published again; one it lists that the old
        # release lacks would vanish from every node (Postfix then fails its lookups).
        wanted = cfg.channels[channel].maps
        missing = [name for name in wanted if name not in old.maps]
        if missing:
            raise MapsyncError(
                f"channel {channel}: release {serial} has no map {', '.join(missing)}, which "
                "the channel lists now: re-published, it would vanish from every node; nothing "
                "changed"
            )
        left_out = sorted(set(old.maps) - set(wanted))
        if left_out:
            _log.warning(
                "maps of the old release the channel no longer lists are left out",
                channel=channel,
                serial=serial,
                maps=",".join(left_out),
            )
        carried = {name: m for name, m in old.maps.items() if name in wanted}

        with ExitStack() as stack:
            stack.callback(repo.unstage, channel)  # first: see Publisher._staged
            staging = stack.enter_context(repo.stage(channel, last))
            new_serial = staging.serial
            last_dir = repo.release(channel, last.serial)
            plan = ChannelPlan(channel, last.serial, new_serial, "publish")
            for name, m in sorted(carried.items()):
                # Byte for byte (and mtime, for rsync's quick check): agents prove equal hashes.
                shutil.copy2(old_dir / m.file, staging.path / m.file)
                before = last.maps.get(name)
                plan.maps.append(
                    diff_files(
                        name,
                        last_dir / before.file if before else None,
                        staging.path / m.file,
                        before.entries if before else 0,
                        m.entries,
                        separator(name, m),
                    )
                )
            for name in sorted(set(last.maps) - set(carried)):
                gone = last.maps[name].entries
                plan.maps.append(MapPlan(name, gone, 0, 0, gone, 0, dropped=True))
            now = utcnow()
            manifest = Manifest(
                channel=channel,
                serial=new_serial,
                previous=last.serial,
                created=iso(now),
                expires=iso(now + timedelta(seconds=cfg.expires)),
                generator=GENERATOR,
                source={**old.source, "rollback_of": str(serial)},
                maps={n: _as_configured(cfg, n, e) for n, e in carried.items()},
                skipped=list(old.skipped),
                dropped=sorted(set(last.maps) - set(carried)),
            )
            repo.commit(staging, manifest, key, keep=cfg.keep)
        _log.warning(
            "re-published an old release as a new serial",
            channel=channel,
            serial=new_serial,
            content_of=serial,
            previous=last.serial,
        )
        return plan


def _as_configured(cfg: PublisherConfig, name: str, entry: MapEntry) -> MapEntry:
    """Map ``name`` of the old release as the new one carries it: its content as it was (a
    map of the operator's own keeps the separator its lines are split at), handled as the
    config says now. A map marked ``secret`` since that release is secret in the new one
    too, or the nodes would install it world-readable again (0644, not 0640)."""
    own = cfg.maps.get(name)
    custom = entry.custom
    if custom is not None and own is not None:
        custom = replace(custom, secret=own.secret)
    return replace(entry, forced=False, custom=custom)

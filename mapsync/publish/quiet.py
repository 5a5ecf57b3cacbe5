"""A publish run that finds nothing changed: the one decision, and a run that makes it
without the publisher's machinery.

:func:`quiet_plan` decides for one channel whether the database and the channel are as last
published (then nothing is read, rendered or written), for the publisher
(:meth:`mapsync.publish.publisher.Publisher.run`) and for :func:`quiet_run`.

:func:`quiet_run` is ``mapsync publish`` (once, every channel, no option) as far as that
decision, without importing SQLAlchemy, the maps or the formats: at 1M accounts those imports
were two thirds of a run that finds nothing changed. For mapsync's own schema in a SQLite file
it reads the fingerprint with the standard library (:mod:`mapsync.sources.sqlite_fingerprint`)
and, when every channel is quiet, notes the run as the publisher does and returns the same
result. Any doubt (another database or schema, maps of the operator's own, a damaged LATEST
or note of the last check, a channel that is not quiet) returns None with nothing logged or
noted, and the publisher then runs as ever.

Kept free of heavy imports: cryptography only to check our signature, SQLAlchemy never.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING

from mapsync import GENERATOR, log
from mapsync.access import check_owner
from mapsync.config import MapConfig, PublisherChannel, PublisherConfig
from mapsync.errors import MapsyncError, VerificationError
from mapsync.publish.plan import ChannelPlan, PublishResult
from mapsync.publish.repository import Repository
from mapsync.publish.runlog import record_run
from mapsync.release import Manifest, parse_iso, utcnow
from mapsync.release.verify import verify_release
from mapsync.signing import key_id, load_private
from mapsync.snapshot import Fingerprint
from mapsync.sources.sqlite_fingerprint import read_fingerprint, sqlite_file

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

_log = log.get("publisher")


def channel_digest(ch: PublisherChannel, own: dict[str, MapConfig] | None = None) -> str:
    """What, besides the database, decides a channel's content: its definition and generator,
    and the definitions of the maps of the operator's own it lists (``own``)."""
    data: dict[str, object] = {
        "maps": ch.maps,
        "mailstore": ch.mailstore,
        "uid": ch.uid,
        "gid": ch.gid,
        "generator": GENERATOR,
    }
    if ch.customer_field:  # only when set: a channel without it keeps its digest
        data["customer_field"] = ch.customer_field
    listed = [own[m] for m in ch.maps if own and m in own]
    if listed:  # absent otherwise: a channel of built-in maps keeps the digest it had
        from mapsync.sources.builtin import safe_url  # never a password, even hashed

        # What shapes the map's content; not its fingerprint query nor its description, whose
        # change leaves the content as it was (and a release whose content is unchanged keeps
        # the digest it was signed with, so such a change would never go quiet again).
        data["own_maps"] = [
            {
                "name": spec.name,
                "query": spec.query,
                "separator": spec.separator,
                "cdb": spec.cdb,
                "keys": spec.keys,
                "secret": spec.secret,
                "database": safe_url(spec.database) if spec.database else None,
            }
            for spec in listed
        ]
    blob = json.dumps(data)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def channel_fingerprint(tables: dict[str, tuple[int, str | None]], ch: PublisherChannel) -> str:
    """The fingerprint digest of what ``ch`` is made of: the source's tables, and of the
    maps of the operator's own (``map:NAME``) only those ``ch`` lists, so publishing another
    channel alone does not make this one look changed."""
    return Fingerprint(
        {k: v for k, v in tables.items() if not k.startswith("map:") or k[4:] in ch.maps}
    ).digest()


def renew_after(cfg: PublisherConfig, last: Manifest) -> datetime:
    """When release ``last`` is due for renewal: half of [publisher] expires before it expires."""
    return last.expires_at() - timedelta(seconds=cfg.expires / 2)


def signed_by(repo: Repository, public: Ed25519PublicKey | None, channel: str, serial: int) -> bool:
    """Whether release ``serial`` of ``channel`` carries the signature of ``public`` (our
    key; None: not known, taken for yes). After a key rotation it does not, and the release is
    renewed (same maps, new signature) so agents can drop the old key."""
    if public is None:
        return True
    release = repo.release(channel, serial)
    try:
        verify_release(release, {key_id(public): public}, str(release))
    except VerificationError:
        return False
    return True


def quiet_plan(
    cfg: PublisherConfig,
    ch: PublisherChannel,
    fingerprint: str,
    last: Manifest | None,
    checked: dict[str, object] | None,
    signed: Callable[[int], bool],
    stamp_resolution: float = 0.0,
) -> ChannelPlan | None:
    """A no-change plan for ``ch`` if the database (``fingerprint``, its
    :func:`channel_fingerprint`) and the channel are as last published: ``last`` the release
    LATEST names (a sound one: a damaged LATEST is never quiet), ``checked`` the note of the last
    full check, ``signed`` whether a serial carries our signature (asked last: it reads and
    verifies the manifest). None when the publisher must read the database.
    ``stamp_resolution`` (the source's, see :class:`~mapsync.sources.base.Source`): the
    fingerprint is trusted only once a full read came that long after it was first seen."""
    now = utcnow()
    if (
        last is None
        or checked is None
        or (
            stamp_resolution
            and parse_iso(str(checked.get("at")))
            < parse_iso(str(checked.get("since", checked.get("at"))))
            + timedelta(seconds=stamp_resolution)
        )
        or last.skipped  # rows were left out: validate them again, they must not go quiet
        or checked.get("fingerprint") != fingerprint
        or checked.get("serial") != last.serial
        or last.source.get("channel") != channel_digest(ch, cfg.maps)
        # A write whose updated_at is not newer than the table's newest (clock skew, a
        # late commit, a bulk import) is invisible to the fingerprint: trust it only so long.
        or now >= parse_iso(str(checked.get("at"))) + timedelta(seconds=cfg.full_check)
        or now >= renew_after(cfg, last)
        or not signed(last.serial)
    ):
        return None
    return ChannelPlan(ch.name, last.serial, None, "none")


def quiet_run(cfg: PublisherConfig) -> PublishResult | None:
    """``mapsync publish`` of every channel of ``cfg`` when the database of mapsync's own
    schema in a SQLite file has not changed since their releases: the run noted (``status
    --publisher``) and its result, as the publisher would. None, with nothing logged or
    noted, when that is not certain: then the publisher runs. Errors before the database is
    read (the repository's owner, the signing key, the repository lock) are the publisher's,
    raised as it raises them."""
    path = sqlite_file(cfg.database) if cfg.schema == "mapsync" and not cfg.maps else None
    if path is None:
        return None
    # What Publisher.run does before it reads the database, in its order.
    check_owner(cfg.repository, "the repository")
    try:
        public = load_private(cfg.signing_key).public_key()
        repo = Repository(cfg.repository)
        with repo.lock(cfg.lock_wait):
            found = read_fingerprint(path)
            if found is None:
                return None
            plans = []
            for ch in cfg.channels.values():
                settled = repo.settled(ch.name)
                if settled is None:
                    return None
                last, checked = settled
                fingerprint = channel_fingerprint(found.tables, ch)
                signed = partial(signed_by, repo, public, ch.name)
                plan = quiet_plan(cfg, ch, fingerprint, last, checked, signed)
                if plan is None:
                    return None
                plans.append(plan)
            _log.debug("database unchanged since the last releases", fingerprint=found.digest())
    except (MapsyncError, OSError) as exc:  # noted as Publisher.run notes it
        record_run(cfg.repository, exc, list(cfg.channels))
        raise
    record_run(cfg.repository, None, list(cfg.channels))
    return PublishResult(plans, [], False)

"""Publishing: one snapshot, every channel rendered, planned and guarded, then written.

Order matters for safety. Every channel is rendered into ``REPO/<channel>/.staging/`` and
every plan checked against the guards *before* any release is made visible; a release
becomes visible only by the rename of its finished directory and then the atomic replace of
``LATEST``. A crash at any instant leaves either the old LATEST or the new one, each pointing
at a complete, signed release.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mapsync import GENERATOR, log
from mapsync.access import check_owner
from mapsync.atomic import remove_tree, scratch_dir
from mapsync.config import MapConfig, PublisherChannel, PublisherConfig, exception_guards
from mapsync.errors import (
    ConfigError,
    InvalidData,
    MapsyncError,
    SourceError,
    UnsafePlan,
)
from mapsync.formats import cdb, text
from mapsync.formats.cdbpatch import buffer
from mapsync.formats.mapfile import write_map
from mapsync.formats.splice import Change, Mismatch, splice
from mapsync.maps import CATALOGUE, Directory, Map
from mapsync.maps.custom import catalogue, check_rows
from mapsync.progress import track
from mapsync.publish.incremental import State, deltas
from mapsync.publish.patches import MAX_SHARE, write_patch
from mapsync.publish.plan import (
    ChannelPlan,
    MapPlan,
    PublishResult,
    Violation,
    check,
    diff_files,
)
from mapsync.publish.quiet import (
    channel_digest,
    channel_fingerprint,
    quiet_plan,
    renew_after,
    signed_by,
)
from mapsync.publish.repository import Repository, Staging
from mapsync.publish.runlog import record_run
from mapsync.release import (
    CdbInfo,
    CustomInfo,
    Manifest,
    MapEntry,
    PatchInfo,
    check_manifest_size,
    iso,
    parse_iso,
    patch_file,
    same_maps,
    utcnow,
)
from mapsync.release.patch import KeyCounts
from mapsync.runnote import in_future
from mapsync.signing import key_id, load_private, load_public, public_path
from mapsync.snapshot import (
    Account,
    Domain,
    Fingerprint,
    NotIncremental,
    Snapshot,
    paused_gc,
)
from mapsync.sources import Source
from mapsync.sources.changes import SKEW
from mapsync.validate import Problem
from mapsync.validate import check as validate

_log = log.get("publisher")
# The full check's scratch directories, in the repository (the old release's filesystem).
CHECK_PREFIX = ".check-"


@dataclass
class _Staged:
    """A channel rendered into its staging directory, not yet visible."""

    plan: ChannelPlan
    staging: Staging
    manifest: Manifest | None = None
    dropped: list[str] = field(default_factory=list)  # maps of the previous release not kept
    entries: dict[str, MapEntry] = field(default_factory=dict)  # as rendered, released or not
    rival: str | None = None  # another publisher's key renewed our release (_rival_renewal)


# The maps of an MX: every domain, address and route of the cluster (not ``senders``, which
# the submission relay carries beside its hashes).
MX_MAPS = frozenset({"domains", "recipients", "virtual", "transport", "exim_routes"})


def drop_invalid(snap: Snapshot, problems: list[Problem]) -> Snapshot:
    """``snap`` without the rows named in ``problems`` (for ``publish --skip-invalid``)."""
    bad = {(p.table, p.row) for p in problems if not p.login and not p.quota}
    # A bad password hash costs the account its login, not its mail: on a mailstore its
    # userdb line stays (nologin), so LMTP still delivers to it. A bad quota costs it only
    # its quota rule, for the same reason.
    logins = {p.row for p in problems if p.login}
    quotas = {p.row for p in problems if p.quota}
    # A sender grant's row is its account's id: the grant is the (account, address) pair.
    bad_grants = {(p.row, p.key) for p in problems if p.table == "sender_grant"}
    # A bad ext_id costs the accounts of that customer only their customer field.
    # The rows of a domain left out go with it (named once, as the domain; else each would be
    # named again as a row of no domain).
    gone = {d.id for d in snap.domains if ("domain", d.id) in bad}
    return replace(
        snap,
        customers={c: e for c, e in snap.customers.items() if ("customer", c) not in bad},
        mailstores=[m for m in snap.mailstores if ("mailstore", m.id) not in bad],
        domains=[d for d in snap.domains if d.id not in gone],
        accounts=[
            _without(a, a.id in logins, a.id in quotas)
            for a in snap.accounts
            if ("account", a.id) not in bad and a.domain_id not in gone
        ],
        aliases=[a for a in snap.aliases if ("alias", a.id) not in bad and a.domain_id not in gone],
        forwards=[
            f for f in snap.forwards if ("forward", f.id) not in bad and f.domain_id not in gone
        ],
        sender_grants=[
            g for g in snap.sender_grants if (g.account_id, g.address) not in bad_grants
        ],
        problems=[p for p in snap.problems if (p.table, p.row) not in bad],
    )


def _without(account: Account, login: bool, quota: bool) -> Account:
    if login:
        account = account._replace(status="login_disabled", password_hash=None)
    if quota:
        account = account._replace(quota_bytes=None)
    return account


def _row(p: Problem) -> dict[str, object]:
    """A problem's fields for a log line; the source's own row name only where it has one."""
    fields: dict[str, object] = {"table": p.table, "row": p.row, "key": p.key, "reason": p.reason}
    if p.where is not None:
        fields["where"] = p.where
    return fields


def reads(ch: PublisherChannel, maps: dict[str, Map] = CATALOGUE) -> frozenset[str]:
    """What the maps of ``ch`` read (see :attr:`mapsync.maps.base.Map.reads`), of those in
    ``maps``: by default the built-in ones; with the operator's own, their rows as well."""
    return frozenset().union(*(maps[m].reads for m in ch.maps if m in maps))


def affects(problem: Problem, read: frozenset[str]) -> bool:
    """Whether ``problem`` is in something a channel reading ``read`` carries: a problem in
    one field (a password hash, an IMAP host) only where that field is read; any other
    problem of a row wherever its table is read."""
    return (f"{problem.table}.{problem.field}" if problem.field else problem.table) in read


class Scope:
    """Which mailstores the rows of a snapshot are housed on, to tell a mailstore's channel
    the invalid rows that are its own from another mailstore's (built on first use: only a
    run that skips rows needs it)."""

    def __init__(self, snap: Snapshot, maps: dict[str, Map] = CATALOGUE) -> None:
        self._snap = snap
        self._maps = maps

    @cached_property
    def _names(self) -> dict[int, str]:
        return {m.id: m.name for m in self._snap.mailstores}

    @cached_property
    def _domains(self) -> dict[int, Domain]:
        return {d.id: d for d in self._snap.domains}

    @cached_property
    def _accounts(self) -> dict[int, Account]:
        return {a.id: a for a in self._snap.accounts}

    @cached_property
    def _own_stores(self) -> dict[int, set[str]]:
        """Domain id → the mailstores its accounts with a mailstore of their own are on."""
        out: dict[int, set[str]] = {}
        for a in self._snap.accounts:
            if a.mailstore_id is not None and a.mailstore_id in self._names:
                out.setdefault(a.domain_id, set()).add(self._names[a.mailstore_id])
        return out

    def _default(self, domain_id: int) -> set[str]:
        d = self._domains.get(domain_id)
        store = d.default_mailstore_id if d else None
        return {self._names[store]} if store in self._names else set()

    def mailstores(self, problem: Problem) -> frozenset[str] | None:
        """The mailstores whose rows ``problem`` concerns: an account's own mailstore, else
        its domain's default; a domain's default and its accounts' own; a mailstore itself.
        None for a row no mailstore houses (an alias, a forward, a sender grant)."""
        if problem.table == "mailstore":
            name = self._names.get(problem.row)
            return frozenset({name} if name else ())
        if problem.table == "domain":
            return frozenset(self._default(problem.row) | self._own_stores.get(problem.row, set()))
        if problem.table == "account":
            a = self._accounts.get(problem.row)
            if a is None:
                return frozenset()
            if a.mailstore_id is not None:
                name = self._names.get(a.mailstore_id)
                return frozenset({name} if name else ())
            return frozenset(self._default(a.domain_id))
        return None

    def concerns(self, problem: Problem, ch: PublisherChannel) -> bool:
        """Whether skipping ``problem``'s row is ``ch``'s business: a map of ``ch`` reads what
        is wrong (:func:`affects`) and, for a map holding only the channel's mailstore, the
        row is housed there."""
        for name in ch.maps:
            spec = self._maps[name]
            if not affects(problem, spec.reads):
                continue
            if ch.mailstore is None or not spec.per_mailstore:
                return True
            stores = self.mailstores(problem)
            if stores is None or ch.mailstore in stores:
                return True
        return False


MAX_SKIPPED_LISTED = 100  # rows a manifest names; the rest are counted (the log names each)
MAX_SKIPPED_CHARS = 300  # per row: a key or an alias cycle can be long


def skipped_note(problems: list[Problem]) -> list[str]:
    """The ``skipped`` list of a manifest: the first rows, each cut short, then a count, so
    no number of invalid rows makes a manifest larger than agents accept."""
    out = []
    for p in problems[:MAX_SKIPPED_LISTED]:
        line = p.note()  # nothing of the row that not every node pulling it may read
        out.append(line if len(line) <= MAX_SKIPPED_CHARS else line[: MAX_SKIPPED_CHARS - 1] + "…")
    if len(problems) > MAX_SKIPPED_LISTED:
        out.append(
            f"... and {len(problems) - MAX_SKIPPED_LISTED} more: {len(problems)} invalid row(s) "
            "skipped in all (the publisher's log names each)"
        )
    return out


@dataclass
class _View:
    """What a channel is rendered from: the snapshot without the invalid rows its kind of
    channel reads (shared by the channels of that kind), and the skipped rows that are this
    channel's own (:meth:`Scope.concerns`), which its manifest records."""

    directory: Directory
    skipped: list[Problem]


class Publisher:
    """Publishes the channels of one publisher configuration."""

    def __init__(self, cfg: PublisherConfig, source: Callable[[], Source]) -> None:
        self.cfg = cfg
        self._public: Ed25519PublicKey | None = None
        self._proxy = False
        self._customers = False
        self.repo = Repository(cfg.repository)
        self._source = source
        self.maps = catalogue(cfg.maps)  # the built-in maps and the operator's own
        self._own_problems: list[Problem] = []  # rows refused in the operator's own maps
        # ``publish --interval`` sets it: keep the last snapshot and publish what changed
        # since (mapsync.publish.incremental), with a full read every full_check.
        self.incremental = False
        self._state: State | None = None
        self._state_for: tuple[object, ...] = ()  # what the state was read for
        self._serials: dict[str, int] = {}  # channel → the serial the state renders as
        # Until then (time.monotonic()) a kept state reads the changes even when the
        # fingerprint is unchanged: for the skew after a change, a transaction that stamped
        # its rows before the newest stamp and commits late moves no fingerprint.
        self._watch_until = 0.0
        # Whether a run read the database since this publisher was made: the first run of an
        # incremental one reads in full even when the fingerprint is unchanged, so that the
        # first change after a (re)start is read incrementally too.
        self._primed = False
        # (channel, map) → (sha256, bytes) of the cdb the last run made (a full one built,
        # an incremental one changed in place): the next incremental run changes it again
        # without reading a kept file back and hashing it (at 1M accounts ~1 s for the two
        # MX maps), for the memory it takes.
        self._cdb_data: dict[tuple[str, str], tuple[str, memoryview]] = {}
        # (channel, map) → the buffer of the cdb the last incremental run changed (its
        # memory already faulted in): the next one writes its cdb there (formats.cdbpatch).
        self._cdb_spare: dict[tuple[str, str], memoryview] = {}
        # (channel, map) → the memory the last release's text is read into (formats.splice).
        self._text_buffers: dict[tuple[str, str], bytearray] = {}
        # How the last run read the database: "unchanged" (the fingerprint), "incremental" or
        # "full" (for the loop's log and the tests).
        self.last_read = ""
        # (key id, public key file's bytes) last compared by _check_public_half.
        self._public_checked: tuple[str, bytes] | None = None
        self._mixed_warned: set[str] = set()  # channels _warn_of_mixed_secrets looked at

    def run(
        self,
        channels: list[str] | None = None,
        *,
        dry_run: bool = False,
        force: bool = False,
        skip_invalid: bool = False,
    ) -> PublishResult:
        """One publish run under the repository lock: snapshot, render, plan, guard and
        commit the selected channels (all when None); the run is noted for ``status
        --publisher``."""
        selected = self._select(channels)
        if not dry_run:
            # Another user's run is not the publisher's: it writes nothing, not even its note.
            check_owner(self.cfg.repository, "the repository")
        self.repo.read_only = dry_run
        try:
            key = None if dry_run else load_private(self.cfg.signing_key)
            self._public = key.public_key() if key else self._public_half()
            with self.repo.lock(self.cfg.lock_wait):
                result = self._sourced_run(selected, key, dry_run, force, skip_invalid)
        except (MapsyncError, OSError) as exc:
            # For `mapsync status --publisher`: a signing key gone, a lock never free or a
            # full disk fails every run as surely as the database down.
            if not dry_run:
                record_run(self.cfg.repository, exc, *self._covered(selected))
            raise
        finally:
            self.repo.read_only = False
        if not dry_run:
            record_run(self.cfg.repository, None, *self._covered(selected))
        return result

    def _covered(self, selected: list[PublisherChannel]) -> tuple[list[str], bool]:
        """The channels a run covered, and whether that is every configured one (for
        :func:`record_run`)."""
        names = [ch.name for ch in selected]
        return names, set(names) >= set(self.cfg.channels)

    def _sourced_run(
        self,
        selected: list[PublisherChannel],
        key: Ed25519PrivateKey | None,
        dry_run: bool,
        force: bool,
        skip_invalid: bool,
    ) -> PublishResult:
        source = self._source()
        others: list[Source] = []
        try:
            source.bound(self.cfg.lock_wait, self.cfg.statement_timeout)
            others = self._own_map_sources(source, selected)
            # The repository lock covers publishers sharing a disk; the source's lock (a
            # database session lock) covers a standby publisher host on its own disk.
            with source.lock(self.cfg.lock_wait):
                return self._locked_run(source, selected, key, dry_run, force, skip_invalid, others)
        finally:
            for other in others:
                other.close()
            source.close()

    def _own_map_sources(self, source: Source, selected: list[PublisherChannel]) -> list[Source]:
        """Give ``source`` the maps of the operator's own that ``selected`` list and that live
        in its database; a source of each second ``database`` for the others. A map no
        selected channel lists is never read (a secret one least of all)."""
        from mapsync.sources.mapdatabase import MapDatabase

        listed = dict.fromkeys(m for ch in selected for m in ch.maps)
        wanted = [self.cfg.maps[m] for m in listed if m in self.cfg.maps]
        source.maps = tuple(spec for spec in wanted if spec.database is None)
        by_url: dict[str, list[MapConfig]] = {}
        for spec in wanted:
            if spec.database is not None:
                by_url.setdefault(spec.database, []).append(spec)
        others: list[Source] = []
        try:
            for url, specs in by_url.items():
                others.append(MapDatabase(url, tuple(specs)))
                others[-1].bound(self.cfg.lock_wait, self.cfg.statement_timeout)
        except BaseException:
            for made in others:
                made.close()
            raise
        return others

    def _locked_run(
        self,
        source: Source,
        selected: list[PublisherChannel],
        key: Ed25519PrivateKey | None,
        dry_run: bool,
        force: bool,
        skip_invalid: bool,
        others: list[Source],
    ) -> PublishResult:
        # Least privilege starts here: password hashes are not even read unless a channel
        # being published carries a map that needs them.
        secrets = any(m in CATALOGUE and CATALOGUE[m].secrets for ch in selected for m in ch.maps)
        moved = True
        if not force and not skip_invalid:
            # Cheap path: counts and newest updated_at equal to what the last full check
            # recorded, same channel definition, not due for renewal → nothing to do. The
            # operator's own maps: their fingerprint queries, or their rows hashed.
            tables = dict(source.fingerprint(secrets=secrets).tables)
            for reader in (source, *others):
                tables.update(reader.maps_fingerprint())
            quiet = [
                self._quiet(ch, channel_fingerprint(tables, ch), source.stamp_resolution)
                for ch in selected
            ]
            moved = not all(plan is not None for plan in quiet)
            watching = self._state is not None and time.monotonic() < self._watch_until
            if not moved and not watching and (self._primed or not self.incremental):
                self.last_read = "unchanged"
                _log.debug(
                    "database unchanged since the last releases",
                    fingerprint=Fingerprint(tables).digest(),
                )
                return PublishResult([p for p in quiet if p is not None], [], dry_run)
        self._primed = True
        if self.incremental and moved:
            self._watch_until = time.monotonic() + SKEW.total_seconds()
        self._proxy = any("dovecot_proxy" in ch.maps for ch in selected)
        self._customers = any(ch.customer_field for ch in selected)
        source.customers = self._customers
        wanted = (tuple(ch.name for ch in selected), secrets, self._proxy, self._customers)
        state = self._state if self._state_for == wanted and not dry_run else None
        proving = state is not None and (force or skip_invalid or self._due(selected))
        if state is not None and not proving:
            done = self._incremental(state, source, selected, key)
            if done is not None:
                self.last_read = "incremental"
                return done
            state = None
        _log.info("reading snapshot", database=source.safe_url)
        # Before the read: what it saw is the database as of no earlier than this (the note
        # of the check says so; Source.stamp_resolution counts from it).
        read_at = utcnow()
        snap = None
        if state is not None:
            try:
                snap = source.snapshot_since(state.mark, secrets=secrets)
            except NotIncremental:
                proving = False
        if snap is None:
            snap = source.snapshot(secrets=secrets)
        self._state = None  # the full run's snapshot replaces it (see _keep)
        self.last_read = "full"
        self._own_maps(snap, source, others)
        stores = {m.name for m in snap.mailstores}
        for ch in selected:
            if ch.mailstore is not None and ch.mailstore not in stores:
                raise ConfigError(
                    f"[publisher.channels.{ch.name}] mailstore: no mailstore named {ch.mailstore!r} "
                    f"in the database (known: {', '.join(sorted(stores)) or 'none'})"
                )
        views = self._views(snap, selected, skip_invalid)
        skipped = list(dict.fromkeys(p for v in views.values() for p in v.skipped))
        # Each channel's staging directory is removed on the way out, committed or not (a
        # signal while a channel is rendered included).
        with ExitStack() as stagings:
            staged = [self._stage(ch, views[ch.name], snap, source, stagings) for ch in selected]
            if proving and state is not None and snap.changes is not None:
                self._compare(staged, self._prove(state, snap, selected))
            violations = self._write(
                staged, source, key, dry_run, force, snap.fingerprint, read_at=read_at
            )
        if self.incremental and not dry_run and not skipped and not self._own_problems:
            self._keep(snap, staged, wanted)
        return PublishResult([s.plan for s in staged], skipped, dry_run, violations)

    # -- incremental publishing (publish --interval) --------------------------------------------

    def _due(self, selected: list[PublisherChannel]) -> bool:
        """Whether a full read is due for any of ``selected`` ([publisher] full_check)."""
        now = utcnow()
        for ch in selected:
            checked = self.repo.checked(ch.name)
            if checked is None:
                return True
            if now >= parse_iso(str(checked.get("at"))) + timedelta(seconds=self.cfg.full_check):
                return True
        return False

    def _keep(self, snap: Snapshot, staged: list[_Staged], wanted: tuple[object, ...]) -> None:
        """Keep ``snap``, just published in full, as the state the next runs change."""
        if snap.mark is None or any(m not in CATALOGUE for s in staged for m in s.entries):
            return
        serials = {}
        for s in staged:
            serial = s.manifest.serial if s.manifest else s.plan.previous
            if serial is None:
                return
            serials[s.plan.channel] = serial
        started = time.monotonic()
        try:
            self._state = State(snap, snap.mark)
        except NotIncremental as exc:
            _log.info("next runs read in full", reason=str(exc))
            return
        self._state_for, self._serials = wanted, serials
        self._prune_kept(staged)
        _log.debug(
            "kept the snapshot for incremental runs",
            seconds=round(time.monotonic() - started, 3),
        )

    def _incremental(
        self,
        state: State,
        source: Source,
        selected: list[PublisherChannel],
        key: Ed25519PrivateKey | None,
    ) -> PublishResult | None:
        """Publish what changed since the state's mark, or None (the state dropped, the
        reason logged) when only a full run can."""
        self._state = None  # until the change is published: a failure leaves no half state
        started = time.monotonic()
        try:
            for ch in selected:
                last, damaged = self.repo.current(ch.name)
                if last is None or damaged is not None or last.serial != self._serials.get(ch.name):
                    raise NotIncremental(f"channel {ch.name} was published by another run")
                if last.source.get("channel") != channel_digest(ch, self.cfg.maps):
                    raise NotIncremental(f"channel {ch.name} is defined anew")
            change = source.changes(state.mark, secrets=state.snap.secrets)
            per: dict[str, dict[str, list[Change]]] = defaultdict(dict)
            for channel, name, delta in deltas(
                state, change, selected, self._proxy, self._customers
            ):
                per[channel][name] = delta
        except NotIncremental as exc:
            _log.info("publishing in full", reason=str(exc))
            return None
        try:
            with ExitStack() as stagings:
                staged = [
                    self._staged(
                        ch,
                        partial(self._splice, ch, per[ch.name]),
                        [],
                        change.fingerprint,
                        source,
                        stagings,
                    )
                    for ch in selected
                ]
                violations = self._write(
                    staged, source, key, False, False, change.fingerprint, full=False
                )
        except Mismatch as exc:
            _log.error(
                "incremental state differs from the last release; publishing in full",
                detail=str(exc),
            )
            return None
        for s in staged:
            self._serials[s.plan.channel] = (
                s.manifest.serial if s.manifest else s.plan.previous or 0
            )
        self._prune_kept(staged)
        self._state = state
        published = any(s.manifest for s in staged)
        (_log.info if published else _log.debug)(
            "published incrementally" if published else "nothing to publish",
            accounts=len(change.accounts),
            aliases=len(change.aliases),
            grants=len(change.grants),
            seconds=round(time.monotonic() - started, 3),
        )
        return PublishResult([s.plan for s in staged], [], False, violations)

    def _splice(
        self,
        ch: PublisherChannel,
        delta: dict[str, list[Change]],
        name: str,
        staging: Staging,
        last: Manifest | None,
        last_dir: Path | None,
    ) -> tuple[MapEntry, MapPlan, PatchInfo | None]:
        """Map ``name`` of ``ch``: the last release's with ``delta`` applied
        (:func:`mapsync.formats.splice.splice`), its patch, its plan."""
        assert last is not None and last_dir is not None  # checked by _incremental
        old = last.maps[name]
        old_path = last_dir / old.file
        changes = delta.get(name, [])
        if not changes:
            # The previous file, byte for byte: copied by _staged if the channel publishes
            # (not here: a run of the loop that changes no map copies no text, 110 MB at 1M).
            return (
                replace(old, forced=False),
                MapPlan(name, old.entries, old.entries, 0, 0, 0),
                None,
            )
        spec = self.maps[name]
        staging.patches.mkdir(exist_ok=True)
        patch = staging.patches / patch_file(name)
        kept = self._kept_cdbs(ch.name)
        old_cdb = None
        spare = self._cdb_spare.pop((ch.name, name), None)
        if old.cdb is not None:
            held = self._cdb_data.pop((ch.name, name), None)
            old_cdb = held[1] if held and held[0] == old.cdb.sha256 else None
            if old_cdb is None:
                old_cdb = self._kept_cdb(kept, old.cdb.sha256)
        done = splice(
            old_path,
            old.entries,
            text.header(name, ch.name, staging.serial),
            changes,
            staging.path / name,
            spec.separator,
            patch,
            staging.path / f"{name}.cdb" if spec.cdb else None,
            old_cdb,
            spare,
            self._text_buffers.setdefault((ch.name, name), bytearray()),
        )
        info = done.text
        cdb_info = None
        if done.cdb is not None:
            cdb_info = CdbInfo(done.cdb.file, done.cdb.sha256, done.cdb.size)
            whole = staging.path / done.cdb.file
            if whole.exists():  # built whole from the text: kept on disk as a full run's is
                os.replace(whole, kept / f"{done.cdb.sha256}.cdb")
            # Changed in place: held in memory only (160 MB not written per change at 1M
            # accounts); a restart reads in full, which builds and keeps it anew.
            if done.cdb_data is not None:
                self._cdb_data[(ch.name, name)] = (done.cdb.sha256, done.cdb_data)
                if old_cdb is not None:
                    self._cdb_spare[(ch.name, name)] = old_cdb  # the next run's buffer
        entry = MapEntry(name, info.entries, info.sha256, info.size, info.content_sha256, cdb_info)
        found = None
        if patch.exists():
            digest, size = text.sha256_file(patch)
            if size * MAX_SHARE > entry.size:
                patch.unlink()
            else:
                found = PatchInfo(last.serial, patch.name, digest, size)
        plan = MapPlan(name, old.entries, entry.entries, done.added, done.removed, done.changed)
        return entry, plan, found

    def _kept_cdbs(self, channel: str) -> Path:
        """Where the long-running publisher keeps the cdb of each map of ``channel``'s last
        release, named by its sha256, to change in place for the next (formats.cdbpatch)."""
        kept = self.repo.private(channel, "cdb")
        kept.mkdir(mode=0o700, parents=True, exist_ok=True)
        return kept

    @staticmethod
    def _kept_cdb(kept: Path, sha256: str) -> memoryview | None:
        """The kept cdb whose sha256 is ``sha256``, if it is there and still has it."""
        try:
            data = cdb.load(kept / f"{sha256}.cdb")
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            _log.warning("kept cdb damaged; building it whole", file=str(kept / f"{sha256}.cdb"))
            return None
        return data

    def _prune_kept(self, staged: list[_Staged]) -> None:
        """Remove the kept cdbs no map of the channels' current releases has (on disk, and
        those held in memory)."""
        for s in staged:
            for name, e in s.entries.items():
                held = self._cdb_data.get((s.plan.channel, name))
                if held is not None and (e.cdb is None or held[0] != e.cdb.sha256):
                    del self._cdb_data[(s.plan.channel, name)]
                    self._cdb_spare.pop((s.plan.channel, name), None)
            kept = self.repo.private(s.plan.channel, "cdb")
            if not kept.is_dir():
                continue
            wanted = {f"{e.cdb.sha256}.cdb" for e in s.entries.values() if e.cdb is not None}
            for path in kept.iterdir():
                if path.name not in wanted:
                    path.unlink(missing_ok=True)

    def _prove(
        self, state: State, snap: Snapshot, selected: list[PublisherChannel]
    ) -> dict[tuple[str, str], str]:
        """The full check's other half: the changes read with the full snapshot ``snap``
        applied to the incremental state, each map's content hash as the incremental run would
        have published it ((channel, map) → content_sha256; empty when it cannot be applied);
        the state's rows then compared with the snapshot's, logged loudly if they differ."""
        expected: dict[tuple[str, str], str] = {}
        change = snap.changes
        assert change is not None
        for left in self.cfg.repository.glob(f"{CHECK_PREFIX}*"):  # a killed run's (locked)
            remove_tree(left, ignore_errors=True)
        try:
            with scratch_dir(self.cfg.repository, CHECK_PREFIX) as scratch:
                for channel, name, delta in deltas(
                    state, change, selected, self._proxy, self._customers
                ):
                    last = self.repo.latest_manifest(channel)
                    if last is None or name not in last.maps:
                        continue
                    old = self.repo.release(channel, last.serial) / last.maps[name].file
                    done = splice(
                        old,
                        last.maps[name].entries,
                        "",
                        delta,
                        scratch / "map",
                        self.maps[name].separator,
                        None,
                        None,
                    )
                    expected[(channel, name)] = done.text.content_sha256
        except NotIncremental as exc:  # a change no incremental run takes: nothing to prove
            _log.info("full check: the incremental state cannot be compared", reason=str(exc))
            return {}
        except Mismatch as exc:
            _log.error(
                "full check: the incremental state renders entries the last release does not "
                "hold (the full render is published; please report this as a bug)",
                detail=str(exc),
            )
            expected = {}
        differ = state.differs(snap)
        if differ:
            _log.error(
                "full check: the incremental state's rows differ from the database's (the "
                "full read is kept; please report this as a bug)",
                tables=",".join(differ),
            )
        return expected

    def _compare(self, staged: list[_Staged], expected: dict[tuple[str, str], str]) -> None:
        """Log loudly each map whose full render differs from what the incremental state
        made of the same database (the full render is what is published)."""
        if not expected:
            return
        differ = [
            f"{s.plan.channel}/{name}"
            for s in staged
            for name, entry in s.entries.items()
            if (s.plan.channel, name) in expected
            and expected[(s.plan.channel, name)] != entry.content_sha256
        ]
        if differ:
            _log.error(
                "full check: the incremental state differs from a full render (the full "
                "render is published; please report this as a bug)",
                maps=",".join(differ),
            )
        else:
            _log.info("full check: the incremental state equals a full render", maps=len(expected))

    def _write(
        self,
        staged: list[_Staged],
        source: Source,
        key: Ed25519PrivateKey | None,
        dry_run: bool,
        force: bool,
        fingerprint: Fingerprint,
        full: bool = True,
        read_at: datetime | None = None,
    ) -> list[Violation]:
        """Guard, then (unless ``dry_run``) commit ``staged`` and note each channel's check
        of the database at ``fingerprint`` (``full``: every row was read); the guards'
        refusals of a dry run."""
        violations = [v for s in staged for v in self._guard(s, force)]
        if violations and not dry_run:
            raise UnsafePlan(
                "publish refused by guards; nothing was written (use --force if the change is intended):\n  "
                + "\n  ".join(str(v) for v in violations)
            )
        for s in staged:
            if s.manifest is not None:
                check_manifest_size(s.manifest.to_bytes(), f"channel {s.plan.channel}")
        if not dry_run:
            assert key is not None
            committed: list[str] = []
            for s in staged:
                # The lock's session may have died under us (killed, a pooler, the
                # network): then another publisher may be in, and nothing more is
                # committed.
                try:
                    source.check_lock()
                except SourceError as exc:
                    done = (
                        f"channel(s) {', '.join(committed)} were published before; "
                        f"{s.plan.channel} and the rest were not"
                        if committed
                        else "nothing was published"
                    )
                    raise SourceError(f"{exc}: {done}") from None
                self._commit(s, key)
                committed.append(s.plan.channel)
                serial = s.manifest.serial if s.manifest else s.plan.previous
                ch = self.cfg.channels[s.plan.channel]
                self.repo.record_check(
                    s.plan.channel,
                    channel_fingerprint(fingerprint.tables, ch),
                    serial,
                    full=full,
                    at=read_at,
                )
        return violations

    def _own_maps(self, snap: Snapshot, source: Source, others: list[Source]) -> None:
        """The operator's own maps of ``snap``: rows from the second databases added (each
        read in its own read-only transaction), every row checked into ``snap.map_entries``;
        the refused rows kept for :meth:`_views`."""
        tables = dict(snap.fingerprint.tables)
        for other in others:
            _log.info("reading maps of your own", database=other.safe_url)
            extra = other.snapshot()
            snap.map_rows.update(extra.map_rows)
            tables.update(extra.fingerprint.tables)
        snap.fingerprint = Fingerprint(tables)
        self._own_problems = []
        for name, rows in snap.map_rows.items():
            entries, problems = check_rows(self.cfg.maps[name], rows)
            snap.map_entries[name] = entries
            self._own_problems += problems
        wanted = {spec.name for reader in (source, *others) for spec in reader.maps}
        missing = sorted(wanted - set(snap.map_rows))
        if missing:  # a source that does not read [publisher.maps] (Source.maps_fingerprint)
            raise SourceError(f"map(s) {', '.join(missing)} were not read")

    def _public_half(self) -> Ed25519PublicKey | None:
        """For a dry run, which needs no private key: the public half beside it, if readable."""
        try:
            return load_public(public_path(self.cfg.signing_key))
        except MapsyncError:
            return None

    def _check_public_half(self, key: Ed25519PrivateKey) -> None:
        """Warn if the public key file beside the signing key (what an operator copies to the
        nodes' ``trusted_keys``) is not its public half: a key replaced without its ``.pub``,
        whose releases every node given that file refuses. A warning, not a refusal: the
        nodes may trust the right key from elsewhere. Once per key and file content."""
        path = public_path(self.cfg.signing_key)
        try:
            data = path.read_bytes()
        except OSError:
            return  # none beside it: the operator keeps the public half elsewhere
        ours = key_id(key.public_key())
        if self._public_checked == (ours, data):
            return
        self._public_checked = (ours, data)
        try:
            theirs = key_id(load_public(path))
        except MapsyncError as exc:
            theirs = f"unreadable ({exc})"
        if theirs != ours:
            _log.warning(
                "the public key beside the signing key is not its public half: a node that "
                "trusts that file refuses every release signed now",
                public_key=str(path),
                its_key_id=theirs,
                signing_key_id=ours,
            )

    def _warn_of_mixed_secrets(self, channel: str) -> None:
        """Warn (once per channel and process) when a release about to be published carries
        password hashes beside maps of every domain (an MX's): every node pulling the channel
        gets every hash. Legitimate on a host that is MX and mailstore in one; a mistake in
        the MX channel of a cluster."""
        if channel in self._mixed_warned:
            return
        self._mixed_warned.add(channel)
        ch = self.cfg.channels[channel]
        hashes = [m for m in ch.maps if m in self.maps and self.maps[m].secrets]
        wide = [m for m in ch.maps if m in MX_MAPS]
        if hashes and wide:
            _log.warning(
                "a channel carries password hashes beside MX maps: every node pulling it gets "
                "them (least privilege: give the hashes a channel of their own, served to the "
                "mailstores only; docs/security.md)",
                channel=channel,
                hashes=",".join(hashes),
                mx_maps=",".join(wide),
            )

    def _signed_by_us(self, channel: str, serial: int) -> bool:
        """Whether release ``serial`` carries our key's signature (:func:`signed_by`)."""
        return signed_by(self.repo, self._public, channel, serial)

    def _quiet(
        self, ch: PublisherChannel, fingerprint: str, stamp_resolution: float = 0.0
    ) -> ChannelPlan | None:
        """A no-change plan for ``ch`` if the database and the channel are as last published
        (:func:`quiet_plan`, the decision ``mapsync publish`` also makes without the publisher)."""
        settled = self.repo.settled(ch.name)
        if settled is None:
            # Moves an earlier mapsync's notes, and says what is wrong with a damaged one.
            self.repo.checked(ch.name)
            settled = self.repo.settled(ch.name)
        if settled is None:
            # A damaged LATEST (or note): not quiet. The run that follows says so, once, as
            # it builds on the newest kept release (Repository.current).
            return None
        last, checked = settled
        signed = partial(self._signed_by_us, ch.name)
        return quiet_plan(self.cfg, ch, fingerprint, last, checked, signed, stamp_resolution)

    def _select(self, names: list[str] | None) -> list[PublisherChannel]:
        if not names:
            return list(self.cfg.channels.values())
        unknown = [n for n in names if n not in self.cfg.channels]
        if unknown:
            raise ConfigError(
                f"unknown channel(s) {', '.join(unknown)} (configured: {', '.join(self.cfg.channels)})"
            )
        return [self.cfg.channels[n] for n in names]

    def _views(
        self, snap: Snapshot, selected: list[PublisherChannel], skip_invalid: bool
    ) -> dict[str, _View]:
        """Each selected channel's :class:`_View`, by channel name.

        With ``skip_invalid``, each kind of channel (what its maps read, whether it proxies)
        drops only the invalid rows its maps would use: a refused password hash leaves a
        mailstore's ``dovecot_users`` without that login but the MX's ``recipients``
        unchanged, whichever channels the run publishes. Each channel records only the rows
        that are its own: a mailstore's channel not another mailstore's accounts.
        """
        problems = validate(snap, self._proxy, self._customers)
        own = self._own_problems  # already left out of their maps' entries
        if (problems or own) and not skip_invalid:
            raise InvalidData([str(p) for p in problems + own])
        if not problems:
            shared = Directory(snap)
            views = {ch.name: _View(shared, []) for ch in selected}
        else:
            views = self._skipping(snap, selected, problems)
        for p in own:  # in every channel that lists its map, and only there
            channels = [ch.name for ch in selected if affects(p, reads(ch, self.maps))]
            for name in channels:
                views[name].skipped.append(p)
            _log.warning("skipping invalid row", **_row(p), channels=",".join(channels))
        return views

    def _skipping(
        self, snap: Snapshot, selected: list[PublisherChannel], problems: list[Problem]
    ) -> dict[str, _View]:
        """:meth:`_views` when rows of the snapshot are skipped."""
        kinds: dict[tuple[frozenset[str], bool], tuple[Directory, list[Problem]]] = {}
        # The built-in maps' reads: the operator's own maps' rows are not in the snapshot's tables.
        for ch in selected:
            kind = (reads(ch), "dovecot_proxy" in ch.maps)
            if kind not in kinds:
                kinds[kind] = self._view(snap, problems, *kind)
        scope = Scope(snap, self.maps)
        views = {}
        for ch in selected:
            directory, dropped = kinds[(reads(ch), "dovecot_proxy" in ch.maps)]
            views[ch.name] = _View(directory, [p for p in dropped if scope.concerns(p, ch)])
        for p in dict.fromkeys(p for _, dropped in kinds.values() for p in dropped):
            channels = [ch.name for ch in selected if p in views[ch.name].skipped]
            if channels:
                _log.warning("skipping invalid row", **_row(p), channels=",".join(channels))
            else:
                _log.warning("invalid row not used by any channel published", **_row(p))
        for p in problems:
            if not any(p in dropped for _, dropped in kinds.values()):
                _log.warning("invalid row not used by any channel published", **_row(p))
        return views

    def _view(
        self, snap: Snapshot, problems: list[Problem], read: frozenset[str], proxy: bool
    ) -> tuple[Directory, list[Problem]]:
        """The snapshot of the channels reading ``read`` without the invalid rows they use,
        and those rows."""
        skipped: list[Problem] = []
        relevant = [p for p in problems if affects(p, read)]
        # Dropping a row can orphan others (an alias domain whose target went): repeat.
        while relevant:
            again = [p for p in relevant if p in skipped]
            if again:  # dropping the row did not remove the problem: never loop on it
                raise InvalidData([f"{p} (cannot be skipped)" for p in again])
            skipped += relevant
            snap = drop_invalid(snap, relevant)
            relevant = [p for p in validate(snap, proxy, self._customers) if affects(p, read)]
        return Directory(snap), skipped

    def _stage(
        self,
        ch: PublisherChannel,
        view: _View,
        snap: Snapshot,
        source: Source,
        stagings: ExitStack,
    ) -> _Staged:
        """Render ``ch`` into a staging directory (removed when ``stagings`` closes) and plan
        it against the current release: publish, renew, or nothing to do."""

        def render(
            name: str, staging: Staging, last: Manifest | None, last_dir: Path | None
        ) -> tuple[MapEntry, MapPlan, PatchInfo | None]:
            entry, old_path = self._render(
                name, ch, view.directory, staging.path, staging.serial, last, last_dir
            )
            found, counts = None, None
            if last is not None and last_dir is not None:
                sep = self.maps[name].separator
                found, counts = write_patch(name, entry, last, last_dir, staging, sep)
            old = last.maps.get(name) if last else None
            return entry, self._plan(name, entry, old, old_path, staging.path, counts), found

        return self._staged(ch, render, view.skipped, snap.fingerprint, source, stagings)

    def _staged(
        self,
        ch: PublisherChannel,
        render: Callable[
            [str, Staging, Manifest | None, Path | None],
            tuple[MapEntry, MapPlan, PatchInfo | None],
        ],
        skipped: list[Problem],
        fingerprint: Fingerprint,
        source: Source,
        stagings: ExitStack,
    ) -> _Staged:
        """``ch`` staged (removed when ``stagings`` closes) with each map made by ``render``,
        and planned against the current release: publish, renew, or nothing to do."""
        last, damaged = self.repo.current(ch.name)
        # First, so it runs even if a signal lands between stage()'s __enter__ and
        # enter_context keeps its __exit__ (the directory would outlive the run).
        stagings.callback(self.repo.unstage, ch.name)
        staging = stagings.enter_context(self.repo.stage(ch.name, last))
        serial = staging.serial
        last_dir = self.repo.release(ch.name, last.serial) if last else None

        entries: dict[str, MapEntry] = {}
        patches: dict[str, PatchInfo] = {}
        plan = ChannelPlan(
            ch.name, last.serial if last else None, serial, "none", skipped=len(skipped)
        )
        for name in ch.maps:
            entries[name], map_plan, found = render(name, staging, last, last_dir)
            plan.maps.append(map_plan)
            if found is not None:
                patches[name] = found
        # A map the previous release carried and this one does not: every node would lose
        # it (Postfix then fails each lookup). A change like any other, refused by a guard.
        dropped = sorted(set(last.maps) - set(entries)) if last else []
        for name in dropped:
            assert last is not None
            gone = last.maps[name].entries
            plan.maps.append(MapPlan(name, gone, 0, 0, gone, 0, dropped=True))

        now = utcnow()
        if last is not None and in_future(last.created_at(), now):
            _log.warning(
                "this host's clock is behind the previous release's creation (stepped back, or "
                "ahead then): this release expires early and its renewal comes late; one "
                "already expired is refused by every node",
                channel=ch.name,
                previous=last.serial,
                previous_created=last.created,
                now=iso(now),
            )
        same_set = last is not None and same_maps(entries, last.maps)
        rival = None
        if same_set:
            assert last is not None
            if (
                damaged is None
                and now < renew_after(self.cfg, last)
                and self._signed_by_us(ch.name, last.serial)
            ):
                plan.serial = None
                return _Staged(plan, staging, entries=entries)
            plan.action = "renew"  # also rewrites a damaged LATEST
            rival = self._rival_renewal(ch.name, last) if damaged is None else None
        else:
            plan.action = "publish"
        if last is not None and last_dir is not None:
            for name in entries:
                if name in last.maps and not (staging.path / name).exists():  # see _splice
                    # byte for byte, mtime too (see _render)
                    shutil.copy2(last_dir / last.maps[name].file, staging.path / name)
        manifest = Manifest(
            channel=ch.name,
            serial=serial,
            previous=last.serial if last else None,
            created=iso(now),
            expires=iso(now + timedelta(seconds=self.cfg.expires)),
            generator=GENERATOR,
            source={
                "url": source.safe_url,
                "schema": source.schema,
                "fingerprint": channel_fingerprint(fingerprint.tables, ch),
                "channel": channel_digest(ch, self.cfg.maps),
            },
            maps=entries,
            skipped=skipped_note(skipped),
            patches=patches,
        )
        return _Staged(plan, staging, manifest, dropped, entries, rival)

    def _rival_renewal(self, channel: str, last: Manifest) -> str | None:
        """Why renewing ``last`` would fight another publisher, or None: ``last`` renews (the
        same maps) a release our key signed, with a key that is not ours. A rotation renews
        the old key's release once; two publishers with different keys writing one
        repository (a standby promoted while this one runs) would renew each other's release
        on every run, a new serial each time, every node trusting only one of them refusing
        half."""
        if last.previous is None or self._public is None:
            return None
        try:
            previous = self.repo.manifest(channel, last.previous)
        except MapsyncError:
            return None  # pruned or unreadable: nothing to tell from
        if not same_maps(last.maps, previous.maps):
            return None
        if self._signed_by_us(channel, last.serial) or not self._signed_by_us(
            channel, previous.serial
        ):
            return None
        return (
            f"serial {last.serial} renews serial {previous.serial}, which this publisher's key "
            f"{key_id(self._public)} signed, with key {last.signer or '(not named)'}: another "
            "publisher with another signing_key writes this repository (a standby promoted "
            "while this one runs?), and each would renew the other's release on every run; "
            "stop one of them (switching signing_key back on purpose: --force)"
        )

    def _render(
        self,
        name: str,
        ch: PublisherChannel,
        directory: Directory,
        staging: Path,
        serial: int,
        last: Manifest | None,
        last_dir: Path | None,
    ) -> tuple[MapEntry, Path | None]:
        """Map ``name`` of ``ch`` written into ``staging`` (text and cdb): its manifest entry
        (the previous release's when the content is the same, its file copied as it is), and
        the previous release's text of it, if any."""
        spec = self.maps[name]
        path = staging / name
        value = spec.constant_value  # one value for all: rendered from the keys alone
        rows: Iterable[Any] = (
            spec.entries(directory, ch) if value is None else spec.keys(directory, ch)
        )
        with paused_gc():  # millions of short-lived tuples: see paused_gc
            info, built = write_map(
                track(rows, f"render {ch.name}/{name}"),
                path,
                text.header(name, ch.name, serial),
                spec.separator,
                f"cdb {ch.name}/{name}" if spec.cdb else None,
                value,
                self._kept_cdbs(ch.name) if self.incremental and spec.cdb else None,
            )
        cdb_info = CdbInfo(built.file, built.sha256, built.size) if built is not None else None
        if self.incremental and len(self._text_buffers.get((ch.name, name), b"")) < info.size:
            # The memory the first incremental run reads this text into, faulted in here.
            self._text_buffers[(ch.name, name)] = bytearray(info.size)
        if built is not None and built.data is not None:  # the publisher keeps it (incremental)
            held = (ch.name, name)
            self._cdb_data[held] = (built.sha256, built.data)
            # The buffer the first incremental run changes it into, faulted in here, not in
            # that run (at 1M accounts 0.1 to 0.3 s for the two MX cdbs).
            self._cdb_spare[held] = buffer(
                len(built.data), self._cdb_spare.get(held), built.data, fault_in=True
            )
        own = self.cfg.maps.get(name)
        custom = CustomInfo(own.separator, own.secret) if own is not None else None
        entry = MapEntry(
            name, info.entries, info.sha256, info.size, info.content_sha256, cdb_info, custom=custom
        )
        old = last.maps.get(name) if last else None
        old_path = last_dir / old.file if last_dir and old else None
        if old is not None and entry.same_content(old) and old_path is not None:
            # Same content: ship the previous file byte for byte (and mtime, so rsync's quick
            # check skips it against the agent's basis), so agents see equal hashes.
            shutil.copy2(old_path, path)
            entry = replace(old, forced=False)
        _log.debug("rendered map", channel=ch.name, map=name, entries=entry.entries)
        return entry, old_path

    def _plan(
        self,
        name: str,
        entry: MapEntry,
        old: MapEntry | None,
        old_path: Path | None,
        staging: Path,
        counts: KeyCounts | None,
    ) -> MapPlan:
        """Map ``name``'s plan: entries before and after, and the keys added, removed and
        changed — as the patch's walk over both texts counted them (``counts``), else by
        comparing the two files."""
        if old is not None and entry.same_content(old):
            return MapPlan(name, old.entries, entry.entries, 0, 0, 0)
        if old is not None and counts is not None:
            return MapPlan(
                name, old.entries, entry.entries, counts.added, counts.removed, counts.changed
            )
        separator = self.maps[name].separator
        before = old.entries if old else 0
        return diff_files(name, old_path, staging / name, before, entry.entries, separator)

    def _guard(self, staged: _Staged, force: bool) -> list[Violation]:
        if staged.rival is not None:
            if not force:
                staged.plan.violations = [staged.rival]
                return [Violation(staged.plan.channel, "", staged.rival)]
            _log.warning("renewal overridden by --force", channel=staged.plan.channel)
        if staged.plan.action != "publish":
            return []
        violations = []
        for map_plan in staged.plan.maps:
            guards = self.cfg.map_guards.get(map_plan.name, self.cfg.guards)
            spec = CATALOGUE.get(map_plan.name)
            if spec is not None and spec.exceptions and map_plan.name not in self.cfg.map_guards:
                # A deny list: empty denies no one, and allowing a few again is no outage.
                guards = exception_guards(guards)
            v = check(map_plan, guards, staged.plan.channel)
            if v is None:
                continue
            if force:
                _log.warning(
                    "guard overridden by --force", channel=v.channel, map=v.map, detail=v.message
                )
                staged.plan.forced.append(map_plan.name)
            else:
                violations.append(v)
        if staged.plan.forced and staged.manifest is not None:
            maps = dict(staged.manifest.maps)
            for name in staged.plan.forced:
                if name in maps:  # a dropped map is recorded in ``dropped`` below
                    maps[name] = replace(maps[name], forced=True)
            staged.manifest = replace(staged.manifest, maps=maps)
        if staged.manifest is not None:
            staged.manifest = replace(staged.manifest, dropped=staged.dropped)
        staged.plan.violations = [str(v) for v in violations]
        return violations

    def _commit(self, staged: _Staged, key: Ed25519PrivateKey) -> None:
        if staged.manifest is None:
            return
        self._check_public_half(key)
        self._warn_of_mixed_secrets(staged.plan.channel)
        self.repo.commit(
            staged.staging,
            staged.manifest,
            key,
            keep=self.cfg.keep,
            renewal=staged.plan.action != "publish",
        )

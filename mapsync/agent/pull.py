"""One agent run for one channel: fetch, verify, build, swap, reload, record.

Nothing unverified is ever installed. The order is: LATEST (refuse a lower serial), the
release into a private staging area, exactly the expected files, the manifest's sha256
against LATEST, its signature against the trusted keys, channel/serial/expiry, every text
file's sha256, then each cdb built locally and proved equal to the publisher's by sha256.
Only then is the set swapped in, in one rename.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from mapsync import log
from mapsync.agent.damage import stat_files
from mapsync.agent.hooks import reload_failure, run_check
from mapsync.agent.kept import KEPT, KeptReleases
from mapsync.agent.liveset import LiveSet, NotOurs, SwapUnfinished
from mapsync.agent.state import (
    ChannelState,
    StateDamaged,
    channel_lock,
    remove_stray_temp_files,
    secure_dir,
    secure_file,
)
from mapsync.config import AgentChannel, AgentConfig, FileMode, unauthenticated_rsync
from mapsync.errors import InstallError, MapsyncError, TransportError, VerificationError
from mapsync.formats import cdb, text
from mapsync.progress import track
from mapsync.release import (
    LATEST,
    MANIFEST,
    MAX_LATEST_BYTES,
    MAX_MANIFEST_BYTES,
    SECRET_MAPS,
    SIGNATURE,
    Latest,
    Manifest,
    MapEntry,
    is_secret,
    iso,
    manifest_sha256,
    parse_latest,
    parse_manifest,
    release_dir,
    separator,
    utcnow,
)
from mapsync.release.verify import FileAltered, VerifiedRelease, check_map_files, verify_release
from mapsync.signing import Keyring, load_public
from mapsync.transport import Remote, parse_source
from mapsync.transport.rsync import block_size

if TYPE_CHECKING:  # cryptography only where a key is used (mapsync.signing)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

_log = log.get("agent")


@dataclass
class PullResult:
    channel: str
    action: str  # installed | renewed | current | pinned
    serial: int
    previous: int | None
    bytes: int = 0
    latest: int | None = None  # LATEST's serial, when pinned to an older one
    source: str | None = None  # the source (or mirror) that answered
    failed_sources: dict[str, str] = field(default_factory=dict)  # tried before it: source → error
    repaired: list[str] | None = None  # damage found in the live set and repaired from STATE


class ChannelPaths:
    def __init__(self, cfg: AgentConfig, ch: AgentChannel) -> None:
        self.root = cfg.state / ch.name
        self.state = self.root / "state.json"
        self.public = cfg.public_status / f"{ch.name}.json"  # world-readable copy of it
        self.lock = self.root / "lock"
        self.incoming = self.root / "incoming"
        self.basis = (
            self.root / "basis"
        )  # verified text of the installed release: rsync's delta basis
        self.kept = KeptReleases(self.root / KEPT)  # verified releases kept for rollback


def trusted_keys(cfg: AgentConfig) -> Keyring:
    """The node's trusted public keys, by key id (messages name each key's file)."""
    keys = Keyring()
    for path in cfg.trusted_keys:
        keys.add(load_public(path), path)
    return keys


def installed(live: LiveSet, where: str) -> Manifest | None:
    """The manifest of the installed set (its signature was verified when it was installed)."""
    pair = live.installed_manifest()
    if pair is None:
        return None
    return parse_manifest(pair[0], f"{where}/{MANIFEST}")


def settled(ch: AgentChannel) -> LiveSet:
    """The live set of ``ch``, after finishing what a run killed right after its swap left."""
    live = LiveSet(ch.target)
    if live.sets.is_dir():
        try:
            live.settle()
        except NotOurs as exc:
            raise InstallError(
                f"channel {ch.name}: {exc}; nothing changed, the installed set keeps serving"
            ) from None
        except OSError as exc:
            raise InstallError(
                f"channel {ch.name}: finishing the last swap in {ch.target} failed: {exc}"
            ) from None
    return live


def pull(
    cfg: AgentConfig, ch: AgentChannel, *, unpin: bool = False, pushed: bool = False
) -> PullResult:
    """Bring ``ch`` up to date; record the outcome in its state file whatever happens.

    The channel's sources are tried in order (``source``, then its mirrors): a source that
    cannot be reached or serves something that fails verification is logged and the next one
    is tried. A local failure (the lock, a full disk, the ``check`` command) is not the
    source's fault and ends the run at once. While the channel is pinned by ``rollback`` the
    source is checked but nothing newer is installed; ``unpin`` clears the pin first, so the
    pull installs what LATEST names.

    ``pushed``: ``ch`` is the push inbox standing in for the source (``mapsync agent
    --watch``). Success then records ``last_push`` and the install but is no check of the
    source: ``last_success``, ``last_source`` and ``failed_sources`` stay as the last poll
    left them, and ``last_error`` is cleared only if a pushed pull made it.
    """
    with taken_channel(cfg, ch) as (paths, state):
        state.last_attempt = iso(utcnow())
        if unpin and state.pinned is not None:
            _log.info("unpinned", channel=ch.name, serial=state.pinned)
            state.pinned = None
        try:
            try:
                result = _pull(cfg, ch, paths, state)
            except OSError as exc:
                raise InstallError(f"channel {ch.name}: {exc}") from None
        except MapsyncError as exc:
            state.last_error = str(exc)
            state.last_error_at = iso(utcnow())
            state.last_error_origin = "inbox" if pushed else "source"
            raise
        finally:
            shutil.rmtree(paths.incoming, ignore_errors=True)
            save_state(ch, paths, state)
        now = iso(utcnow())
        if pushed:
            state.last_push = now
        else:
            state.last_success = now
            state.last_source = result.source
            state.failed_sources = dict(result.failed_sources)
        if not pushed or state.last_error_origin == "inbox":
            state.last_error = state.last_error_at = state.last_error_origin = None
        if result.action == "installed":
            state.last_install = now
            state.last_bytes = result.bytes
            state.reload_pending = bool(ch.reload)
        failure = reload_failure(ch) if state.reload_pending else None
        state.reload_pending = failure is not None
        save_state(ch, paths, state)
        if failure is not None:
            raise InstallError(
                f"channel {ch.name}: serial {result.serial} is installed but the reload hook "
                f"failed ({failure.splitlines()[0]}); it is retried on the next run"
            )
        return result


@contextlib.contextmanager
def taken_channel(
    cfg: AgentConfig, ch: AgentChannel
) -> Iterator[tuple[ChannelPaths, ChannelState]]:
    """Channel ``ch`` taken for a change: its state directory secured, its lock held, what a
    killed run left (temp files in STATE and the kept copies) removed, and its state loaded
    (rebuilt when damaged). The lock is released when the block ends."""
    paths = ChannelPaths(cfg, ch)
    open_state_dir(cfg, paths)
    with channel_lock(paths.lock):
        remove_stray_temp_files(paths.root)
        remove_stray_temp_files(paths.kept.root)  # a killed copy for rollback
        yield paths, load_state(ch, paths)


def open_state_dir(cfg: AgentConfig, paths: ChannelPaths) -> None:
    """Create STATE and STATE/<channel> 0700 (and bring older ones back to it), state.json 0600."""
    try:
        secure_dir(cfg.state)
        secure_dir(paths.root)
        secure_file(paths.state)
    except OSError as exc:
        raise InstallError(f"state directory {paths.root}: {exc}") from None


def load_state(ch: AgentChannel, paths: ChannelPaths) -> ChannelState:
    """The channel's state; a damaged file is reported (naming it), moved aside and rebuilt
    from the live set and the kept releases, so one bad file never stops the agent."""
    try:
        return ChannelState.load(paths.state)
    except StateDamaged as exc:
        from mapsync.agent.repair import discard_state, rebuilt_state

        state = rebuilt_state(paths, LiveSet(ch.target))
        aside = discard_state(paths.state)
        _log.error(
            "the state file is damaged; rebuilt from the live set and the kept releases",
            channel=ch.name,
            error=str(exc),
            moved_to=str(aside),
            highest_serial=state.highest_serial,
            pinned=state.pinned,
        )
        state.last_damage = str(exc)
        state.last_repair = iso(utcnow())
        return state


def save_state(ch: AgentChannel, paths: ChannelPaths, state: ChannelState) -> None:
    """Save the state. On a full disk the atomic write (a new file) fails; the outcome is then
    written over the old file's own blocks, so ``status`` still learns what happened (a kill
    in that instant leaves a damaged file, which the next run rebuilds)."""
    try:
        state.save(paths.state, paths.public)
        return
    except OSError as exc:
        first = exc
    try:
        state.save_in_place(paths.state)
        state.publish_copy(paths.public)
    except OSError as exc:
        raise InstallError(
            f"channel {ch.name}: cannot record the outcome in {paths.state}: {first.strerror}"
            f" (in place: {exc.strerror})"
        ) from None
    _log.warning(
        "state written in place: the atomic write failed",
        channel=ch.name,
        path=str(paths.state),
        error=first.strerror,
    )


@dataclass
class _Fetched:
    """A release fetched from ``remote`` and verified in ``release.path``, not yet installed."""

    remote: Remote
    release: VerifiedRelease
    received: int


def _pull(
    cfg: AgentConfig, ch: AgentChannel, paths: ChannelPaths, state: ChannelState
) -> PullResult:
    for source in ch.sources:
        parse_source(source, ch.ssh)  # a malformed mirror is a config error, whatever the others do
    live = settled(ch)
    # A local import: repair installs through this module.
    from mapsync.agent.repair import check_and_repair

    outcome = check_and_repair(cfg, ch, paths, state, live)
    current = outcome.manifest
    failed: dict[str, str] = {}
    errors: list[MapsyncError] = []
    for i, source in enumerate(ch.sources):
        try:
            got = _fetch(cfg, ch, paths, state, live, current, source)
        except (TransportError, VerificationError) as exc:
            if len(ch.sources) == 1:
                raise
            failed[source] = str(exc)
            errors.append(exc)
            _log.warning(
                "source failed" + ("; trying the next" if i + 1 < len(ch.sources) else ""),
                channel=ch.name,
                source=source,
                error=str(exc),
            )
            continue
        if failed:
            _log.warning("served by a mirror", channel=ch.name, source=source, failed=list(failed))
        if isinstance(got, PullResult):
            got.source, got.failed_sources = source, failed
        else:
            got = _install_fetched(ch, paths, state, live, current, got, failed)
        if outcome.problems:
            got.repaired = outcome.problems
        return got
    raise _every_source_failed(ch, failed, errors)


def _every_source_failed(
    ch: AgentChannel, failed: dict[str, str], errors: list[MapsyncError]
) -> MapsyncError:
    """One error naming every source and why it failed. Exit 5 (verification) when any
    source served something that was refused, else exit 2 (transport)."""
    lines = [
        f"channel {ch.name}: all {len(failed)} sources failed ({', '.join(failed)}); "
        "the installed set keeps serving"
    ]
    lines += [f"  {source}: {' '.join(error.split())}" for source, error in failed.items()]
    kind = (
        VerificationError
        if any(isinstance(e, VerificationError) for e in errors)
        else TransportError
    )
    return kind("\n".join(lines))


def _remote(ch: AgentChannel, source: str) -> Remote:
    # One password_file serves the rsync:// sources; an ssh:// or local mirror takes none.
    password = ch.password_file if parse_source(source, ch.ssh).daemon else None
    return Remote(source, ch.timeout, ch.ssh, password)


def _fetch(
    cfg: AgentConfig,
    ch: AgentChannel,
    paths: ChannelPaths,
    state: ChannelState,
    live: LiveSet,
    current: Manifest | None,
    source: str,
) -> PullResult | _Fetched:
    """Ask ``source`` for LATEST; return the outcome when nothing is to be installed (current,
    pinned), else the release fetched and verified in ``paths.incoming``."""
    try:
        return _fetch_from(cfg, ch, paths, state, live, current, _remote(ch, source))
    except OSError as exc:
        raise InstallError(f"channel {ch.name} (source {source}): {exc}") from None


def _fetch_from(
    cfg: AgentConfig,
    ch: AgentChannel,
    paths: ChannelPaths,
    state: ChannelState,
    live: LiveSet,
    current: Manifest | None,
    remote: Remote,
) -> PullResult | _Fetched:
    shutil.rmtree(paths.incoming, ignore_errors=True)
    paths.incoming.mkdir(mode=0o700)

    received = remote.fetch_file(LATEST, paths.incoming / LATEST, max_size=MAX_LATEST_BYTES)
    where = f"{remote.source}/{LATEST}"
    try:
        data = (paths.incoming / LATEST).read_bytes()
    except FileNotFoundError:
        # rsync skips a symlink, a FIFO or a file over --max-size, says so and exits 0: the
        # source served no usable LATEST. Its fault, not this node's, so the next one is asked.
        raise VerificationError(
            f"{where}: missing, not a regular file, or larger than {MAX_LATEST_BYTES} bytes"
        ) from None
    latest = parse_latest(data, where)
    floor = serial_floor(state, paths, current)
    below_live = current is not None and latest.serial < current.serial  # refused below
    if floor is not None and latest.serial < floor and not below_live:
        raise VerificationError(
            f"{where}: serial {latest.serial} is lower than {floor}, the highest this node has "
            "installed (a stale mirror, a rollback attack or a restored publisher); nothing changed"
        )
    if current is not None:
        if state.pinned is not None and latest.serial >= current.serial:
            return _pinned(ch, current, latest, received)
        if latest.serial < current.serial:
            raise VerificationError(
                f"{where}: serial {latest.serial} is lower than the installed {current.serial} "
                "(a stale mirror, a rollback attack or a restored publisher); nothing changed"
            )
        if latest.serial == current.serial:
            pair = live.installed_manifest()
            assert pair is not None
            if manifest_sha256(pair[0]) != latest.manifest_sha256:
                raise VerificationError(
                    f"{where}: serial {latest.serial} is installed with a different manifest; refusing"
                )
            if current.expires_at() <= datetime.now(UTC):
                raise VerificationError(
                    f"channel {ch.name}: installed serial {current.serial} expired at {current.expires} "
                    "and the publisher has not renewed it (maps keep serving)"
                )
            _log.info("up to date", channel=ch.name, serial=current.serial)
            cur = live.current()
            if cur is not None and not paths.kept.has(current.serial):
                # Installed by a mapsync that kept nothing: keep it now, so it can be rolled back to.
                _keep(ch, paths, cur, current)
            return PullResult(ch.name, "current", current.serial, current.serial, received)

    staging = paths.incoming / "release"
    staging.mkdir(mode=0o700)
    where = f"{remote.source}/{release_dir(latest.serial)}"
    keys = trusted_keys(cfg)
    release, moved = fetch_release(remote, latest, ch, keys, staging, paths.basis, where)
    received += moved
    try:
        _check_fetched(release, latest, ch, current, where)
    except FileAltered as exc:
        if not paths.basis.exists():
            raise
        # rsync's quick check (size, mtime) trusts the local basis; if that copy was damaged on
        # this node, the damage would come back on every run. Fetch once more without it. The
        # basis is dropped only if that works: if the source itself is altered, a mirror may
        # still use the basis.
        _log.warning(
            "fetching again without the local rsync basis",
            channel=ch.name,
            source=remote.source,
            reason=str(exc),
        )
        shutil.rmtree(staging)
        staging.mkdir(mode=0o700)
        release, moved = fetch_release(remote, latest, ch, keys, staging, None, where)
        received += moved
        _check_fetched(release, latest, ch, current, where)
        _log.warning(
            "discarding the local rsync basis: it was damaged on this node", channel=ch.name
        )
        shutil.rmtree(paths.basis)
    return _Fetched(remote, release, received)


def serial_floor(state: ChannelState, paths: ChannelPaths, current: Manifest | None) -> int | None:
    """The lowest serial a source may offer: the highest this node ever installed, from its
    own state and kept releases as well as the live set, so wiping ``target`` (or losing the
    state file) does not open the door to an old release. A rollback pins instead."""
    serials = [*paths.kept.serials(), *([current.serial] if current else [])]
    if state.highest_serial is not None:
        serials.append(state.highest_serial)
    return max(serials, default=None)


def _install_fetched(
    ch: AgentChannel,
    paths: ChannelPaths,
    state: ChannelState,
    live: LiveSet,
    current: Manifest | None,
    got: _Fetched,
    failed: dict[str, str],
) -> PullResult:
    manifest, staging = got.release.manifest, got.release.path
    _warn_if_exposed(ch, manifest, got.remote.source)
    same = (
        current is not None
        and set(current.maps) == set(manifest.maps)
        and all(
            current.maps[n] == replace(m, forced=current.maps[n].forced)
            for n, m in manifest.maps.items()
        )
    )
    same = install(live, staging, manifest, ch, paths, state, renewal=same)
    _keep(ch, paths, staging, manifest)
    # Promote the verified text to be the next run's rsync basis.
    old_basis = paths.root / "basis.old"
    shutil.rmtree(old_basis, ignore_errors=True)
    if paths.basis.exists():
        os.rename(paths.basis, old_basis)
    os.rename(staging, paths.basis)
    shutil.rmtree(old_basis, ignore_errors=True)
    action = "renewed" if same else "installed"
    _log.info(
        f"{action} release",
        channel=ch.name,
        serial=manifest.serial,
        previous=current.serial if current else None,
        bytes_on_wire=got.received,
        source=got.remote.source,
    )
    return PullResult(
        ch.name,
        action,
        manifest.serial,
        current.serial if current else None,
        got.received,
        source=got.remote.source,
        failed_sources=failed,
    )


def _warn_if_exposed(ch: AgentChannel, manifest: Manifest, source: str) -> None:
    """Password hashes just came from an rsync module anyone may read. Config load warns
    when the node's ``maps`` name such a map; a node that does not list its maps learns it
    only here, from the release itself."""
    secret = sorted(n for n, m in manifest.maps.items() if is_secret(n, m))
    # Config load warned of the built-in ones the node lists; a secret map of the publisher's
    # own is known to be secret only from the release.
    warned = set(ch.maps) & SECRET_MAPS
    if secret and not set(secret) <= warned and unauthenticated_rsync(ch, source):
        _log.warning(
            "channel carries password hashes but is pulled without authentication",
            channel=ch.name,
            source=source,
            maps=",".join(secret),
            fix="serve it from a module with `auth users` and set "
            "rsync://USER@host/... and password_file (docs/security.md)",
        )


def install(
    live: LiveSet,
    src: Path,
    manifest: Manifest,
    ch: AgentChannel,
    paths: ChannelPaths,
    state: ChannelState,
    *,
    renewal: bool = False,
    pin: int | None = None,
) -> bool:
    """Build the set of a verified ``manifest`` from the text in ``src`` and swap it in.

    ``renewal`` (same maps as the live set): hard links keep the live inodes, so no daemon
    reloads; returns whether it stayed a renewal. A map whose live files no longer have the
    owner, group or mode the ``files`` settings give is built again from ``src`` instead, as
    a new file: a hard link *is* the live inode, and changing it would change the live map
    before the swap (and for good, if the swap then failed). ``pin`` records a rollback's pin
    in the state before the swap, so a run killed after the swap cannot forget it.
    """
    same = renewal
    was_pinned = state.pinned
    owners = ownership(ch, manifest)  # an unknown user or group stops here, before anything
    theirs = live.foreign(live_names(manifest))
    if theirs:
        raise InstallError(
            f"channel {ch.name}: {', '.join(map(str, theirs))}: not a link mapsync made (the "
            f"operator's own file?); mapsync never replaces it. Move it away or give the channel "
            f"a target of its own; serial {manifest.serial} not installed, the old set keeps serving"
        )
    built = live.new_set_dir(manifest.serial)
    try:
        if same:
            cur = live.current()
            assert cur is not None
            # A renewal: identical maps. Hard links keep the live inodes, so no daemon reloads.
            try:
                now = time.time()
                for name, m in sorted(manifest.maps.items()):
                    files = [m.file] + ([m.cdb.file] if m.cdb else [])
                    intact = _intact(cur, m)
                    if not intact:
                        # Never carry a damaged inode forward: this map is built anew, and
                        # the install is a real swap (reload) so every daemon notices.
                        _log.warning(
                            "a live file differs from its manifest; rebuilt, not reused",
                            channel=ch.name,
                            map=name,
                            serial=manifest.serial,
                        )
                        same = False
                    if intact and all(_has_ownership(cur / f, owners[name], built) for f in files):
                        for f in files:
                            os.link(cur / f, built / f)
                    else:
                        # New files settings (or the live file's owner changed its mode): a
                        # new inode from the verified text, never the live file or its copy.
                        build_map(src, name, m, built, cur, owners[name], ch, now)
            except FileNotFoundError:  # the live set lost a file: rebuild it from the text
                shutil.rmtree(built)
                built = live.new_set_dir(manifest.serial)
                build_set(src, manifest, built, cur, owners, ch)
                same = False
        else:
            build_set(src, manifest, built, live.current(), owners, ch)
        for f in (MANIFEST, SIGNATURE):
            shutil.copyfile(src / f, built / f)
            os.chmod(built / f, 0o644)
        # Built in a directory only the agent may enter; opened to readers (and to a check
        # running as another user) once every file has its final mode.
        os.chmod(built, 0o755)
        if not same:
            # The maps exactly as they will go live; a renewal's are the live ones already.
            before = os.lstat(built)
            run_check(ch, built, manifest.serial)
            if ch.check:
                # A check runs with the agent's rights: what it changed must not go live.
                verify_built(built, before, src, manifest, owners, ch)
        if (ch.reload and not same) or pin is not None:
            # The hook (and the pin) are owed from the swap on: a run killed before it ran
            # must not lose them.
            state.reload_pending = state.reload_pending or bool(ch.reload and not same)
            state.pinned = pin if pin is not None else state.pinned
            state.save(paths.state, paths.public)
        try:
            live.swap(built, manifest.serial)
        finally:
            _note_live(live, manifest, state)
    except SwapUnfinished as exc:
        raise InstallError(
            f"channel {ch.name}: serial {manifest.serial} is live, but finishing the swap failed: "
            f"{exc}; the next run finishes it"
        ) from None
    except OSError as exc:
        shutil.rmtree(built, ignore_errors=True)
        state.pinned = was_pinned
        raise InstallError(
            f"channel {ch.name}: installing serial {manifest.serial} failed: {exc}"
            + ("" if getattr(exc, "filename", None) else f" (in {live.sets})")
            + "; the old set keeps serving"
        ) from None
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        state.pinned = was_pinned
        raise
    return same


def _note_live(live: LiveSet, manifest: Manifest, state: ChannelState) -> None:
    """Record the size and mtime of the set just swapped in (if it is live): what the cheap
    check of every later run compares against. Its files were all verified moments ago."""
    cur = live.current()
    serial = str(manifest.serial)
    if cur is None or not (cur.name == serial or cur.name.startswith(serial + ".")):
        return  # the swap did not happen
    try:
        files = stat_files(cur, manifest)
    except OSError:
        return  # the next run finds no record for this serial and hashes every file
    state.note_installed(manifest.serial, cur.name, files, iso(utcnow()))


def _intact(live: Path, m: MapEntry) -> bool:
    """Whether map ``m``'s live files still have the manifest's sha256 and size: checked
    before a renewal reuses their inodes. A missing file raises FileNotFoundError."""
    checks = [(m.file, m.sha256, m.size)]
    if m.cdb is not None:
        checks.append((m.cdb.file, m.cdb.sha256, m.cdb.size))
    return all(text.sha256_file(live / f) == (want, size) for f, want, size in checks)


def _pinned(ch: AgentChannel, current: Manifest, latest: Latest, received: int) -> PullResult:
    """The source was reached and LATEST is sane, but ``rollback`` pinned the installed serial."""
    if current.expires_at() <= datetime.now(UTC):
        raise VerificationError(
            f"channel {ch.name}: pinned serial {current.serial} expired at {current.expires} "
            "(maps keep serving); `mapsync pull --unpin` installs LATEST, "
            "`mapsync rollback --publisher SERIAL` re-publishes old content with a fresh expiry"
        )
    _log.info("pinned by rollback", channel=ch.name, serial=current.serial, latest=latest.serial)
    return PullResult(
        ch.name, "pinned", current.serial, current.serial, received, latest=latest.serial
    )


def _keep(ch: AgentChannel, paths: ChannelPaths, src: Path, manifest: Manifest) -> None:
    """Keep a verified release for rollback. It is installed already: failing to keep a copy
    (a full disk) is logged, never turned into a failed install."""
    try:
        dropped = paths.kept.keep(src, manifest, ch.keep, manifest.serial)
    except OSError as exc:
        _log.warning(
            "could not keep a copy for rollback",
            channel=ch.name,
            serial=manifest.serial,
            error=str(exc),
        )
        return
    if dropped:
        _log.debug("dropped kept releases", channel=ch.name, serials=dropped)


def fetch_release(
    remote: Remote,
    latest: Latest,
    ch: AgentChannel,
    keys: dict[str, Ed25519PublicKey],
    staging: Path,
    basis: Path | None,
    where: str,
) -> tuple[VerifiedRelease, int]:
    """Fetch release ``latest.serial`` in three steps, so a hostile or broken repository
    cannot fill this node's disk before anything is checked: the manifest and its signature
    (at most 1 MiB, verified at once: the release returned), then a listing that must name
    exactly the manifest's files as regular files of the manifest's sizes, then exactly those
    files, none larger than the manifest says. Returns the release and the bytes rsync moved;
    its files are for :func:`verify_files` to check."""
    directory = release_dir(latest.serial)
    moved = remote.fetch_files(directory, [MANIFEST, SIGNATURE], staging, None, MAX_MANIFEST_BYTES)
    if not (staging / MANIFEST).exists():
        # rsync leaves out a file over --max-size and exits 0: tell "too large" from missing.
        try:
            kind, size = remote.list_dir(directory).get(MANIFEST, ("?", -1))
        except MapsyncError:
            kind, size = "?", -1
        if kind == "-" and size > MAX_MANIFEST_BYTES:
            raise VerificationError(
                f"{where}/{MANIFEST}: {size} bytes, too large (agents accept at most "
                f"{MAX_MANIFEST_BYTES}); not fetched"
            )
    release = read_signed(staging, ch, keys, where, latest)
    manifest = release.manifest
    listing = remote.list_dir(directory)
    expected = manifest.files() | {MANIFEST, SIGNATURE}
    extra = sorted(set(listing) - expected)
    if extra:
        raise VerificationError(
            f"{where}: unexpected file(s) not named by the manifest: {', '.join(extra)}"
        )
    for name, m in sorted(manifest.maps.items()):
        kind, size = listing.get(m.file, ("?", -1))
        if kind != "-":
            raise VerificationError(f"{where}/{m.file}: missing or not a regular file (map {name})")
        if size != m.size:
            raise VerificationError(
                f"{where}/{m.file}: size {size} does not match the manifest (size {m.size}); "
                "the file was altered"
            )
    files = sorted(manifest.files())
    largest = max((m.size for m in manifest.maps.values()), default=0)
    moved += remote.fetch_files(directory, files, staging, basis, largest + 1, block_size(largest))
    return release, moved


def read_signed(
    directory: Path,
    ch: AgentChannel,
    keys: Mapping[str, Ed25519PublicKey],
    where: str,
    latest: Latest | None = None,
    serial: int | None = None,
) -> VerifiedRelease:
    """The release in ``directory`` verified for channel ``ch``
    (:func:`mapsync.release.verify.verify_release`: the manifest's sha256 against ``latest``
    when given, its signature against the trusted keys, its channel, ``serial`` when given,
    its map names), and carrying no map that ``ch``'s ``maps`` does not list."""
    release = verify_release(directory, keys, where, channel=ch.name, serial=serial, latest=latest)
    for name in sorted(release.manifest.maps):
        if ch.maps and name not in ch.maps:
            raise VerificationError(
                f"{where}/{MANIFEST}: carries map {name!r}, which channel {ch.name} does not "
                f"(its maps: {', '.join(ch.maps)})"
            )
    return release


def verify_files(release: VerifiedRelease, where: str, *, check_expiry: bool = True) -> None:
    """Refuse an expired release (unless ``check_expiry`` is false: a repair restores the
    release that was live), any file its manifest does not name, and any text map whose
    sha256 or size differ from the manifest's."""
    manifest = release.manifest
    if check_expiry and manifest.expires_at() <= datetime.now(UTC):
        raise VerificationError(
            f"{where}/{MANIFEST}: expired at {manifest.expires}; not installing"
        )
    expected = manifest.files() | {MANIFEST, SIGNATURE}
    present = set(os.listdir(release.path))
    extra = sorted(present - expected)
    if extra:
        raise VerificationError(
            f"{where}: unexpected file(s) not named by the manifest: {', '.join(extra)}"
        )
    check_map_files(release, where)


def _check_fetched(
    release: VerifiedRelease,
    latest: Latest,
    ch: AgentChannel,
    current: Manifest | None,
    where: str,
) -> None:
    """Check everything else about a fetched, verified release (its serial against LATEST
    and the installed one, the maps the node must keep, its files); raise VerificationError."""
    manifest = release.manifest
    if manifest.serial != latest.serial:
        raise VerificationError(
            f"{where}/{MANIFEST}: serial {manifest.serial}, but LATEST says {latest.serial}"
        )
    if current is not None and manifest.serial <= current.serial:
        raise VerificationError(
            f"{where}/{MANIFEST}: serial {manifest.serial} is not newer than the installed {current.serial}"
        )
    check_keeps_maps(manifest, ch, current, where)
    verify_files(release, where)
    _log.debug("release verified", channel=ch.name, serial=manifest.serial, key=release.key_id)


def check_keeps_maps(
    manifest: Manifest, ch: AgentChannel, current: Manifest | None, where: str
) -> None:
    """Refuse a release that lacks a map this node must keep serving: one its config
    ``maps`` lists or, without that setting, one it serves now. A map dropped from the
    publisher's channel would otherwise vanish from every node while Postfix still reads it.
    The node's own config decides: once its ``maps`` no longer lists the map, the drop goes in.
    A release with no maps at all is never installed."""
    if not manifest.maps:
        raise VerificationError(
            f"{where}/{MANIFEST}: serial {manifest.serial} carries no maps; not installing, "
            "the old set keeps serving"
        )
    if ch.maps:
        required, why = set(ch.maps), f"[agent.channels.{ch.name}] maps lists"
    else:
        required = set(current.maps) if current is not None else set()
        why = "this node serves"
    missing = sorted(required - set(manifest.maps))
    if missing:
        raise VerificationError(
            f"{where}/{MANIFEST}: serial {manifest.serial} lacks map(s) {', '.join(missing)}, "
            f"which {why}; not installing, the old set keeps serving (if the channel dropped "
            f"them on purpose, set [agent.channels.{ch.name}] maps to the maps it still carries)"
        )


SECRET_GROUP = "dovecot"
_KEEP = -1  # os.chown: leave the owner or group as it is


@dataclass(frozen=True)
class Ownership:
    """Mode, uid and gid an installed map file gets (uid/gid -1: as the agent created it)."""

    mode: int
    uid: int = _KEEP
    gid: int = _KEEP


def ownership(ch: AgentChannel, manifest: Manifest) -> dict[str, Ownership]:
    """Per map of ``manifest``: ``[agent.channels.C.files.MAP]`` where set, else mapsync's
    default — maps with password hashes 0640, group ``dovecot`` where it exists (Dovecot must
    read them, nobody else may); every other map 0644. Users and groups are looked up now, on
    this node: an unknown one is an InstallError, raised before anything is built.

    An ``owner`` other than root never gets write permission (``0640`` becomes ``0440``): a
    daemon that owns a map must not rewrite what it serves (Dovecot its own passdb). That is
    not a guarantee — a file's owner may chmod it — so such an owner is warned about, once per
    map and process; ``group`` is the way to let a daemon read a map."""
    owners: dict[str, Ownership] = {}
    for name in sorted(manifest.maps):
        conf = ch.files.get(name, FileMode())
        secret = is_secret(name, manifest.maps[name])
        mode = conf.mode if conf.mode is not None else (0o640 if secret else 0o644)
        uid = gid = _KEEP
        if conf.owner is not None:
            uid = _lookup(ch, manifest, name, "owner", conf.owner)
            if uid != 0:
                mode &= ~0o200
                _warn_owner(ch, name, conf.owner, mode)
        if conf.group is not None:
            gid = _lookup(ch, manifest, name, "group", conf.group)
        elif secret:
            with contextlib.suppress(KeyError):  # no Dovecot on this node: root-only is safe
                gid = grp.getgrnam(SECRET_GROUP).gr_gid
        if secret and mode & 0o004:
            _log.warning(
                "a map with password hashes is configured readable by every user",
                channel=ch.name,
                map=name,
                mode=f"{mode:04o}",
            )
        owners[name] = Ownership(mode, uid, gid)
    return owners


_WARNED_OWNERS: set[tuple[str, str, str]] = set()  # (channel, map, owner) warned about


def _warn_owner(ch: AgentChannel, name: str, owner: str, mode: int) -> None:
    if (ch.name, name, owner) in _WARNED_OWNERS:
        return
    _WARNED_OWNERS.add((ch.name, name, owner))
    _log.warning(
        "the map's owner is not root: installed without owner write permission, but an owner "
        "can chmod its file and rewrite the live map; prefer owner root and a group",
        channel=ch.name,
        map=name,
        owner=owner,
        mode=f"{mode:04o}",
    )


def _lookup(ch: AgentChannel, manifest: Manifest, name: str, key: str, who: str) -> int:
    """uid of user ``who`` (key "owner") or gid of group ``who`` (key "group"); a number is
    taken as an id when no user or group has that name."""
    try:
        if key == "owner":
            return pwd.getpwnam(who).pw_uid
        return grp.getgrnam(who).gr_gid
    except KeyError:
        if who.isdigit():
            return int(who)
    kind = "user" if key == "owner" else "group"
    raise InstallError(
        f"channel {ch.name}: [agent.channels.{ch.name}.files.{name}] {key}: no {kind} {who!r} "
        f"on this node (map {name}); serial {manifest.serial} not installed, the old set keeps serving"
    )


def _has_ownership(path: Path, own: Ownership, directory: Path) -> bool:
    """Whether ``path`` has the mode, owner and group a file built in ``directory`` gets
    (uid/gid -1: what a file the agent creates there gets)."""
    st = path.stat()
    uid = own.uid if own.uid != _KEEP else os.geteuid()
    gid = own.gid
    if gid == _KEEP:
        # A new file takes the directory's group where it is set-group-ID, else the agent's.
        parent = directory.stat()
        gid = parent.st_gid if parent.st_mode & stat.S_ISGID else os.getegid()
    return stat.S_IMODE(st.st_mode) == own.mode and (st.st_uid, st.st_gid) == (uid, gid)


def _protect(path: Path, name: str, own: Ownership, ch: AgentChannel) -> None:
    """Give ``path`` (map ``name``, or its cdb), a new file not yet live, its owner, group and
    mode — before the swap makes it visible, so no reader ever sees it more open than
    configured. Never called on a live inode."""
    try:
        if own.uid != _KEEP or own.gid != _KEEP:
            os.chown(path, own.uid, own.gid)
        os.chmod(path, own.mode)
    except PermissionError as exc:
        raise InstallError(
            f"channel {ch.name}: map {name}: cannot give {path.name} owner/group/mode "
            f"{own.uid}:{own.gid} {own.mode:04o} ({exc.strerror}; the agent runs as uid "
            f"{os.geteuid()}); the old set keeps serving"
        ) from None


def build_set(
    staging: Path,
    manifest: Manifest,
    built: Path,
    previous: Path | None,
    owners: dict[str, Ownership],
    ch: AgentChannel,
) -> None:
    """Copy the verified text into ``built`` and build each cdb; prove cdb hashes equal.
    A map's cdb gets the same owner, group and mode as its text."""
    now = time.time()
    for name, m in sorted(manifest.maps.items()):
        build_map(staging, name, m, built, previous, owners[name], ch, now)


def build_map(
    staging: Path,
    name: str,
    m: MapEntry,
    built: Path,
    previous: Path | None,
    own: Ownership,
    ch: AgentChannel,
    now: float,
) -> None:
    """Map ``name`` of :func:`build_set`: its text copied from ``staging`` into ``built``,
    its cdb built and proved equal to the publisher's, both given ``own`` and an mtime later
    than the files they replace in ``previous``."""
    dst = built / m.file
    _create(dst, name, own, ch)
    # A new inode; fresh mtime, never the publisher's.
    with open(staging / m.file, "rb") as fin, open(dst, "r+b") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    files = [dst]
    if m.cdb is not None:
        cdb_path = built / m.cdb.file
        _create(cdb_path, name, own, ch)  # cdbx truncates and fills this inode, mode kept
        sep = separator(name, m).encode()
        digest, size = cdb.build(
            cdb_path, track(text.pairs(dst, sep), f"build {m.cdb.file}", m.entries)
        )
        if digest != m.cdb.sha256 or size != m.cdb.size:
            raise VerificationError(
                f"map {name}: the cdb built here (sha256 {digest[:16]}…, {size} bytes) differs from "
                f"the publisher's ({m.cdb.sha256[:16]}…, {m.cdb.size} bytes); not installing"
            )
        files.append(cdb_path)
    for f in files:
        _fresh_mtime(f, previous / f.name if previous else None, now)


def _create(path: Path, name: str, own: Ownership, ch: AgentChannel) -> None:
    """Create ``path`` empty, owner-only, then give it its final owner, group and mode —
    before a byte is written, so a map with password hashes is never readable by anyone it
    is not meant for, not even for an instant (a reader's open handle would outlive a chmod)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    _protect(path, name, own, ch)


def live_names(manifest: Manifest) -> set[str]:
    """The names the live set of ``manifest`` links into the target: text maps and cdbs."""
    names = manifest.files()
    names |= {m.cdb.file for m in manifest.maps.values() if m.cdb is not None}
    return names


def verify_built(
    built: Path,
    before: os.stat_result,
    src: Path,
    manifest: Manifest,
    owners: dict[str, Ownership],
    ch: AgentChannel,
) -> None:
    """Check the built set once more after the ``check`` command, before the swap: the same
    directory (``before``: its lstat then) with the same owner and mode, exactly the
    manifest's files, each a regular file with its owner, group and mode, and the sha256 and
    size of the text and of the cdb the manifest names; manifest and signature as verified.
    Raise VerificationError naming the first path that differs."""
    where = (
        f"channel {ch.name}: the check command changed the built set of serial {manifest.serial}"
    )
    tail = "; not installed, the old set keeps serving"
    try:
        now = os.lstat(built)
    except FileNotFoundError:
        raise VerificationError(f"{where}: {built} removed{tail}") from None
    same = (now.st_dev, now.st_ino, now.st_mode, now.st_uid, now.st_gid)
    if same != (before.st_dev, before.st_ino, before.st_mode, before.st_uid, before.st_gid):
        raise VerificationError(f"{where}: {built} replaced or its owner or mode changed{tail}")
    expected = live_names(manifest) | {MANIFEST, SIGNATURE}
    present = set(os.listdir(built))
    if present != expected:
        changed = sorted(present ^ expected)
        raise VerificationError(
            f"{where}: {', '.join(str(built / f) for f in changed)} added or removed{tail}"
        )
    for f in (MANIFEST, SIGNATURE):
        if (built / f).is_symlink() or (built / f).read_bytes() != (src / f).read_bytes():
            raise VerificationError(f"{where}: {built / f} altered{tail}")
    for name, m in sorted(manifest.maps.items()):
        checks = [(m.file, m.sha256, m.size)]
        if m.cdb is not None:
            checks.append((m.cdb.file, m.cdb.sha256, m.cdb.size))
        for file, want, want_size in checks:
            path = built / file
            if not stat.S_ISREG(path.lstat().st_mode):
                raise VerificationError(f"{where}: {path} is no longer a regular file{tail}")
            if not _has_ownership(path, owners[name], built):
                raise VerificationError(
                    f"{where}: {path} has another owner or mode (map {name}){tail}"
                )
            digest, size = text.sha256_file(path)
            if digest != want or size != want_size:
                raise VerificationError(
                    f"{where}: {path} (map {name}) has sha256 {digest[:16]}… size {size}, the "
                    f"manifest {want[:16]}… size {want_size}{tail}"
                )


def _fresh_mtime(path: Path, old: Path | None, now: float) -> None:
    """Give ``path`` an mtime later than the file it replaces, in whole seconds.

    Dovecot re-reads a passwd-file only when mtime (seconds) or size changes; two installs in
    the same second with equal sizes would otherwise go unnoticed.
    """
    stamp = int(now)
    if old is not None:
        with contextlib.suppress(FileNotFoundError):
            stamp = max(stamp, int(old.stat().st_mtime) + 1)
    os.utime(path, (stamp, stamp))

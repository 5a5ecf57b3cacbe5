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
import shutil
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mapsync import log
from mapsync.agent.hooks import run_reload
from mapsync.agent.kept import KEPT, KeptReleases
from mapsync.agent.liveset import LiveSet, SwapUnfinished
from mapsync.agent.state import ChannelState, channel_lock
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import InstallError, MapsyncError, VerificationError
from mapsync.formats import cdb, text
from mapsync.maps import CATALOGUE
from mapsync.release import (
    LATEST,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SIGNATURE,
    Latest,
    Manifest,
    iso,
    manifest_sha256,
    parse_latest,
    parse_manifest,
    utcnow,
)
from mapsync.signing import load_public, verify
from mapsync.transport import Remote

_log = log.get("agent")


@dataclass
class PullResult:
    channel: str
    action: str  # installed | renewed | current | pinned
    serial: int
    previous: int | None
    bytes: int = 0
    latest: int | None = None  # LATEST's serial, when pinned to an older one


class FileAltered(VerificationError):
    """A fetched map file does not have the manifest's sha256 and size."""


class ChannelPaths:
    def __init__(self, cfg: AgentConfig, ch: AgentChannel) -> None:
        self.root = cfg.state / ch.name
        self.state = self.root / "state.json"
        self.lock = self.root / "lock"
        self.incoming = self.root / "incoming"
        self.basis = (
            self.root / "basis"
        )  # verified text of the installed release: rsync's delta basis
        self.kept = KeptReleases(self.root / KEPT)  # verified releases kept for rollback


def trusted_keys(cfg: AgentConfig) -> dict[str, Ed25519PublicKey]:
    from mapsync.signing import key_id

    keys: dict[str, Ed25519PublicKey] = {}
    for path in cfg.trusted_keys:
        key = load_public(path)
        keys[key_id(key)] = key
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
        except OSError as exc:
            raise InstallError(
                f"channel {ch.name}: finishing the last swap in {ch.target} failed: {exc}"
            ) from None
    return live


def pull(cfg: AgentConfig, ch: AgentChannel, *, unpin: bool = False) -> PullResult:
    """Bring ``ch`` up to date; record the outcome in its state file whatever happens.

    While the channel is pinned by ``rollback`` the source is checked but nothing newer is
    installed; ``unpin`` clears the pin first, so the pull installs what LATEST names.
    """
    paths = ChannelPaths(cfg, ch)
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with channel_lock(paths.lock):
        state = ChannelState.load(paths.state)
        state.last_attempt = iso(utcnow())
        if unpin and state.pinned is not None:
            _log.info("unpinned", channel=ch.name, serial=state.pinned)
            state.pinned = None
        try:
            try:
                result = _pull(cfg, ch, paths, state)
            except OSError as exc:
                raise InstallError(f"channel {ch.name} (source {ch.source}): {exc}") from None
        except MapsyncError as exc:
            state.last_error = str(exc)
            state.last_error_at = iso(utcnow())
            raise
        finally:
            shutil.rmtree(paths.incoming, ignore_errors=True)
            state.save(paths.state)
        state.last_success = iso(utcnow())
        state.last_error = None
        state.last_error_at = None
        if result.action == "installed":
            state.last_install = state.last_success
            state.last_bytes = result.bytes
            state.reload_pending = bool(ch.reload)
        if state.reload_pending:
            state.reload_pending = not run_reload(ch)
        state.save(paths.state)
        if state.reload_pending:
            raise InstallError(
                f"channel {ch.name}: serial {result.serial} is installed but the reload hook failed; it is retried on the next run"
            )
        return result


def _pull(
    cfg: AgentConfig, ch: AgentChannel, paths: ChannelPaths, state: ChannelState
) -> PullResult:
    remote = Remote(ch.source, ch.timeout, ch.ssh, ch.password_file)
    live = settled(ch)
    current = installed(live, str(ch.target))
    shutil.rmtree(paths.incoming, ignore_errors=True)
    paths.incoming.mkdir(mode=0o700)

    received = remote.fetch_file(LATEST, paths.incoming / LATEST, max_size=MAX_LATEST_BYTES)
    where = f"{ch.source}/{LATEST}"
    latest = parse_latest((paths.incoming / LATEST).read_bytes(), where)
    if current is not None:
        if state.pinned is not None and latest.serial >= current.serial:
            return _pinned(ch, current, latest, received)
        if latest.serial < current.serial:
            raise VerificationError(
                f"{where}: serial {latest.serial} is lower than the installed {current.serial} "
                "(rollback attack or a restored publisher); nothing changed"
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
    where = f"{ch.source}/releases/{latest.serial}"
    keys = trusted_keys(cfg)
    received += fetch_release(remote, latest, ch, keys, staging, paths.basis, where)
    try:
        manifest = verify_release(staging, latest, ch, keys, current, where)
    except FileAltered as exc:
        if not paths.basis.exists():
            raise
        # rsync's quick check (size, mtime) trusts the local basis; if that copy was damaged
        # on this node, the damage would come back on every run. Fetch once more without it.
        _log.warning(
            "discarding the local rsync basis and fetching again", channel=ch.name, reason=str(exc)
        )
        shutil.rmtree(paths.basis)
        shutil.rmtree(staging)
        staging.mkdir(mode=0o700)
        received += fetch_release(remote, latest, ch, keys, staging, None, where)
        manifest = verify_release(staging, latest, ch, keys, current, where)

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
        bytes_on_wire=received,
    )
    return PullResult(
        ch.name, action, manifest.serial, current.serial if current else None, received
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
    reloads; returns whether it stayed a renewal. ``pin`` records a rollback's pin in the
    state before the swap, so a run killed after the swap cannot forget it.
    """
    same = renewal
    was_pinned = state.pinned
    built = live.new_set_dir(manifest.serial)
    try:
        if same:
            cur = live.current()
            assert cur is not None
            # A renewal: identical maps. Hard links keep the live inodes, so no daemon reloads.
            try:
                for m in manifest.maps.values():
                    for f in (m.file, m.cdb.file if m.cdb else None):
                        if f:
                            os.link(cur / f, built / f)
            except FileNotFoundError:  # the live set lost a file: rebuild it from the text
                shutil.rmtree(built)
                built = live.new_set_dir(manifest.serial)
                build_set(src, manifest, built, cur)
                same = False
        else:
            build_set(src, manifest, built, live.current())
        for f in (MANIFEST, SIGNATURE):
            shutil.copyfile(src / f, built / f)
            os.chmod(built / f, 0o644)
        _fsync_tree(built)
        if (ch.reload and not same) or pin is not None:
            # The hook (and the pin) are owed from the swap on: a run killed before it ran
            # must not lose them.
            state.reload_pending = state.reload_pending or bool(ch.reload and not same)
            state.pinned = pin if pin is not None else state.pinned
            state.save(paths.state)
        live.swap(built, manifest.serial)
    except SwapUnfinished as exc:
        raise InstallError(
            f"channel {ch.name}: serial {manifest.serial} is live, but finishing the swap failed: "
            f"{exc}; the next run finishes it"
        ) from None
    except OSError as exc:
        shutil.rmtree(built, ignore_errors=True)
        state.pinned = was_pinned
        raise InstallError(
            f"channel {ch.name}: installing serial {manifest.serial} failed: {exc}; the old set keeps serving"
        ) from None
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        state.pinned = was_pinned
        raise
    return same


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


MAX_LATEST_BYTES = 4096


def fetch_release(
    remote: Remote,
    latest: Latest,
    ch: AgentChannel,
    keys: dict[str, Ed25519PublicKey],
    staging: Path,
    basis: Path | None,
    where: str,
) -> int:
    """Fetch release ``latest.serial`` in three steps, so a hostile or broken repository
    cannot fill this node's disk before anything is checked: the manifest and its signature
    (at most 1 MiB, verified at once), then a listing that must name exactly the manifest's
    files as regular files of the manifest's sizes, then exactly those files, none larger
    than the manifest says. Returns the bytes rsync moved."""
    directory = f"releases/{latest.serial}"
    moved = remote.fetch_files(directory, [MANIFEST, SIGNATURE], staging, None, MAX_MANIFEST_BYTES)
    manifest, _ = read_signed(staging, ch, keys, where, latest)
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
    moved += remote.fetch_files(directory, files, staging, basis, largest + 1)
    return moved


def read_signed(
    directory: Path,
    ch: AgentChannel,
    keys: dict[str, Ed25519PublicKey],
    where: str,
    latest: Latest | None = None,
) -> tuple[Manifest, str]:
    """(manifest, key id) of the release in ``directory``, after checking the manifest's
    sha256 against ``latest`` (when given), its signature against the trusted keys, and that
    it is for channel ``ch``."""
    try:
        data = (directory / MANIFEST).read_bytes()
        sig = (directory / SIGNATURE).read_bytes()
    except FileNotFoundError as exc:
        raise VerificationError(f"{where}: {Path(exc.filename).name} is missing") from None
    if latest is not None and manifest_sha256(data) != latest.manifest_sha256:
        raise VerificationError(f"{where}/{MANIFEST}: sha256 differs from the one LATEST names")
    kid = verify(keys, data, sig, f"{where}/{SIGNATURE}")
    manifest = parse_manifest(data, f"{where}/{MANIFEST}")
    if manifest.channel != ch.name:
        raise VerificationError(
            f"{where}/{MANIFEST}: is for channel {manifest.channel!r}, not {ch.name!r}"
        )
    for name in sorted(manifest.maps):
        if name not in CATALOGUE:
            raise VerificationError(
                f"{where}/{MANIFEST}: names map {name!r}, which mapsync does not know"
            )
        if ch.maps and name not in ch.maps:
            raise VerificationError(
                f"{where}/{MANIFEST}: carries map {name!r}, which channel {ch.name} does not "
                f"(its maps: {', '.join(ch.maps)})"
            )
    return manifest, kid


def verify_files(directory: Path, manifest: Manifest, where: str) -> None:
    """Refuse an expired manifest, any file it does not name, and any text map whose sha256
    or size differ from the manifest's."""
    if manifest.expires_at() <= datetime.now(UTC):
        raise VerificationError(
            f"{where}/{MANIFEST}: expired at {manifest.expires}; not installing"
        )
    expected = manifest.files() | {MANIFEST, SIGNATURE}
    present = set(os.listdir(directory))
    extra = sorted(present - expected)
    if extra:
        raise VerificationError(
            f"{where}: unexpected file(s) not named by the manifest: {', '.join(extra)}"
        )
    for name, m in sorted(manifest.maps.items()):
        path = directory / m.file
        if not path.is_file() or path.is_symlink():
            raise VerificationError(f"{where}/{m.file}: missing or not a regular file (map {name})")
        digest, size = text.sha256_file(path)
        if size != m.size or digest != m.sha256:
            raise FileAltered(
                f"{where}/{m.file}: sha256 {digest[:16]}… size {size} does not match the manifest "
                f"({m.sha256[:16]}… size {m.size}); the file was altered"
            )


def verify_release(
    staging: Path,
    latest: Latest,
    ch: AgentChannel,
    keys: dict[str, Ed25519PublicKey],
    current: Manifest | None,
    where: str,
) -> Manifest:
    """Check everything about a fetched release; return its manifest or raise VerificationError."""
    manifest, kid = read_signed(staging, ch, keys, where, latest)
    if manifest.serial != latest.serial:
        raise VerificationError(
            f"{where}/{MANIFEST}: serial {manifest.serial}, but LATEST says {latest.serial}"
        )
    if current is not None and manifest.serial <= current.serial:
        raise VerificationError(
            f"{where}/{MANIFEST}: serial {manifest.serial} is not newer than the installed {current.serial}"
        )
    verify_files(staging, manifest, where)
    _log.debug("release verified", channel=ch.name, serial=manifest.serial, key=kid)
    return manifest


# The maps that carry password hashes, as the catalogue declares them (Map.secrets).
SECRET_MAPS = frozenset(name for name, spec in CATALOGUE.items() if spec.secrets)
SECRET_GROUP = "dovecot"


def _protect(path: Path, map_name: str) -> None:
    """Maps with password hashes: 0640, group ``dovecot`` where it exists (Dovecot must read
    them, nobody else may); every other map 0644. Set before the swap makes the file visible."""
    if map_name not in SECRET_MAPS:
        os.chmod(path, 0o644)
        return
    os.chmod(path, 0o640)
    try:
        gid = grp.getgrnam(SECRET_GROUP).gr_gid
    except KeyError:
        return  # no Dovecot on this node: root-only is the safe default
    os.chown(path, -1, gid)


def build_set(staging: Path, manifest: Manifest, built: Path, previous: Path | None) -> None:
    """Copy the verified text into ``built`` and build each cdb; prove cdb hashes equal."""
    now = time.time()
    for name, m in sorted(manifest.maps.items()):
        src = staging / m.file
        dst = built / m.file
        shutil.copyfile(src, dst)  # a new inode; fresh mtime, never the publisher's
        _protect(dst, name)
        files = [dst]
        if m.cdb is not None:
            cdb_path = built / m.cdb.file
            digest, size = cdb.build(cdb_path, text.pairs(dst))
            if digest != m.cdb.sha256 or size != m.cdb.size:
                raise VerificationError(
                    f"map {name}: the cdb built here (sha256 {digest[:16]}…, {size} bytes) differs from "
                    f"the publisher's ({m.cdb.sha256[:16]}…, {m.cdb.size} bytes); not installing"
                )
            os.chmod(cdb_path, 0o644)
            files.append(cdb_path)
        for f in files:
            _fresh_mtime(f, previous / f.name if previous else None, now)


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


def _fsync_tree(path: Path) -> None:
    for name in os.listdir(path):
        fd = os.open(path / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

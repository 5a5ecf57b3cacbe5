"""Fetching a channel's release from its sources, in order (``source``, then its mirrors).

Each source is parsed once when the pull starts (:class:`Source`; a malformed mirror is a
config error, whatever the others do) and gets one :class:`~mapsync.transport.Remote`, made
when it is first asked. A source that cannot be reached or serves something that fails
verification is logged and the next one is asked; a local failure (a full disk) is not the
source's fault and ends the run at once.

From each source: ``LATEST`` first (at most :data:`~mapsync.release.MAX_LATEST_BYTES`), which
the caller's decision looks at (the serial floor, a pin, the installed serial: ``pull``); only
when that decides nothing, the release it names into a private staging area, in steps
(:func:`fetch_release`), verified (:mod:`mapsync.agent.checks`) and returned as a
:class:`~mapsync.release.verify.VerifiedRelease`, not yet installed. With a basis, ``LATEST``
comes in one rsync with the signature and patches of the serial after the basis's, the
manifest's patch among them (:func:`_guess`), which the steps then take instead of fetching
them when ``LATEST`` names it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from mapsync import log
from mapsync.agent.inbox import note_basis
from mapsync.agent.node import NodeChannel, basis_manifest
from mapsync.atomic import atomic_write, remove_tree
from mapsync.config import AgentChannel, unauthenticated_rsync
from mapsync.errors import (
    InstallError,
    MapsyncError,
    TransferStopped,
    TransportError,
    VerificationError,
)
from mapsync.release import (
    LATEST,
    MANIFEST,
    MANIFEST_PATCH,
    MAX_LATEST_BYTES,
    MAX_MANIFEST_BYTES,
    SECRET_MAPS,
    SIGNATURE,
    Latest,
    Manifest,
    is_secret,
    manifest_sha256,
    parse_latest,
    patch_dir,
    patch_file,
    release_dir,
)
from mapsync.transport import Remote, parse_source
from mapsync.transport.rsync import block_size

if TYPE_CHECKING:  # cryptography only where a key is used (mapsync.signing)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from mapsync.release.verify import VerifiedRelease

# Checking and patching a release (mapsync.agent.checks, mapsync.agent.patching) are imported
# once LATEST names a release to fetch: a nothing-changed pull does without them.

_log = log.get("agent")

R = TypeVar("R")


class Source:
    """One source of a channel (``source`` or a mirror): its URL parsed once; its
    :class:`Remote` made once, when it is first asked (:meth:`remote`)."""

    def __init__(self, url: str, ch: AgentChannel) -> None:
        self.url = url
        self.endpoint = parse_source(url, ch.ssh)
        self._ch = ch
        self._remote: Remote | None = None

    def remote(self) -> Remote:
        """The rsync remote of this source (a bad ``password_file`` is found here)."""
        if self._remote is None:
            ch = self._ch
            # One password_file serves the rsync:// sources; an ssh:// or local mirror takes none.
            password = ch.password_file if self.endpoint.daemon else None
            self._remote = Remote(self.url, ch.timeout, ch.ssh, password, endpoint=self.endpoint)
        return self._remote


def sources(ch: AgentChannel) -> list[Source]:
    """``ch``'s sources in order, each parsed (ConfigError naming a malformed one)."""
    return [Source(url, ch) for url in ch.sources]


@dataclass
class Answer(Generic[R]):
    """What the sources answered: the decision taken on ``LATEST`` (``decided``), or else the
    ``release`` fetched and verified in the staging area; ``received``: bytes on the wire."""

    source: str  # the source (or mirror) that answered
    received: int
    decided: R | None = None
    release: VerifiedRelease | None = None
    failed: dict[str, str] = field(default_factory=dict)  # tried before it: source → error


# Given LATEST and where it came from: an outcome that ends the pull (nothing to fetch), or
# None to fetch the release it names. VerificationError refuses this source.
Decide = Callable[[Latest, str], R | None]


def fetch(
    node: NodeChannel, tried: list[Source], decide: Decide[R], *, pushed: bool = False
) -> Answer[R]:
    """Ask each source in ``tried`` in turn until one answers (see the module docstring);
    with every one failing, one error naming each. ``pushed``: the source is the push inbox,
    whose release may leave out the maps it carries patches for (:func:`fetch_release`)."""
    ch = node.ch
    failed: dict[str, str] = {}
    errors: list[MapsyncError] = []
    for i, source in enumerate(tried):
        try:
            got = _ask(node, source, decide, pushed)
        except TransferStopped:
            raise  # ended by this agent: no failure of the source, no reason to ask the next
        except (TransportError, VerificationError) as exc:
            if len(tried) == 1:
                raise
            failed[source.url] = str(exc)
            errors.append(exc)
            _log.warning(
                "source failed" + ("; trying the next" if i + 1 < len(tried) else ""),
                channel=ch.name,
                source=source.url,
                error=str(exc),
            )
            continue
        if failed:
            _log.warning(
                "served by a later source", channel=ch.name, source=source.url, failed=list(failed)
            )
        got.failed = failed
        return got
    raise _every_source_failed(ch, failed, errors)


def newer_elsewhere(
    node: NodeChannel, tried: list[Source], answered: str, decide: Decide[R]
) -> Answer[R] | None:
    """Ask the sources listed after ``answered`` (which found the node current) for LATEST:
    the first that serves a newer release, fetched and verified (``release``), or None. A
    mirror that stopped following its source is current to the nodes behind it, which would
    never learn otherwise (their release only expires). A source failing here is passed over
    (the pull has its answer); a failure on this node (InstallError: a full disk) is not."""
    first = next((i for i, s in enumerate(tried) if s.url == answered), len(tried))
    for source in tried[first + 1 :]:
        try:
            got = _ask(node, source, decide, False)
        except TransferStopped:
            raise
        except (TransportError, VerificationError) as exc:
            _log.info("source not asked further", source=source.url, error=str(exc))
            continue
        if got.release is not None:
            return got
    return None


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


def _ask(node: NodeChannel, source: Source, decide: Decide[R], pushed: bool) -> Answer[R]:
    """Ask ``source`` for LATEST and, unless ``decide`` settles the pull, for its release."""
    try:
        return _ask_remote(node, source.remote(), decide, pushed)
    except OSError as exc:
        raise InstallError(f"channel {node.name} (source {source.url}): {exc}") from None


def _ask_remote(node: NodeChannel, remote: Remote, decide: Decide[R], pushed: bool) -> Answer[R]:
    ch, paths = node.ch, node.paths
    remove_tree(paths.incoming, ignore_errors=True)
    paths.incoming.mkdir(mode=0o700)

    # Not over ssh: behind rrsync (docs/security.md), which vets the options and paths it is
    # given, asking this way is untried (named paths failed there whole). Not while pinned
    # by a rollback: the basis stays, and every poll would fetch the same guess again.
    guess = None if remote.endpoint.ssh or node.state.pinned else _guess(paths.basis)
    ahead = None
    if guess is None:
        received = remote.fetch_file(LATEST, paths.incoming / LATEST, max_size=MAX_LATEST_BYTES)
    else:
        # With LATEST, in the same rsync, what the next release needs if it is the one after
        # the basis (the common case: one new release): its signature and its patches, the
        # manifest's among them.
        ahead = paths.incoming / "ahead"
        ahead.mkdir(mode=0o700)
        received = remote.fetch_paths([LATEST, *guess[1]], ahead, MAX_MANIFEST_BYTES)
        got = ahead / LATEST
        if got.is_file() and os.lstat(got).st_size <= MAX_LATEST_BYTES:
            os.rename(got, paths.incoming / LATEST)
        else:  # missing or not what a LATEST can be: asked for alone, for its error
            received += remote.fetch_file(
                LATEST, paths.incoming / LATEST, max_size=MAX_LATEST_BYTES
            )
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
    decided = decide(latest, where)
    if decided is not None:
        return Answer(remote.source, received, decided=decided)

    from mapsync.agent.checks import trusted_keys
    from mapsync.release.verify import FileAltered

    current = node.current()
    staging = paths.incoming / "release"
    staging.mkdir(mode=0o700)
    where = f"{remote.source}/{release_dir(latest.serial)}"
    keys = trusted_keys(node.cfg)
    if guess is None or guess[0] != latest.serial:
        ahead = None
    release, moved = fetch_release(
        remote, latest, ch, keys, staging, paths.basis, where, pushed=pushed, ahead=ahead
    )
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
        remove_tree(staging)
        staging.mkdir(mode=0o700)
        release, moved = fetch_release(
            remote, latest, ch, keys, staging, None, where, pushed=pushed
        )
        received += moved
        _check_fetched(release, latest, ch, current, where)
        _log.warning(
            "discarding the local rsync basis: it was damaged on this node", channel=ch.name
        )
        remove_tree(paths.basis)
        note_basis(ch, None)
    return Answer(remote.source, received, release=release)


def _guess(basis: Path) -> tuple[int, list[str]] | None:
    """The release most likely next (the serial after the basis's) and what of it to ask for
    with LATEST (as :meth:`Remote.fetch_paths` patterns): its signature and patches, the
    manifest's (:data:`MANIFEST_PATCH`) among them, not the manifest: the basis has the
    manifest it applies to. Each patch by name, the basis's maps' only (not ``*.patch``):
    before anything is verified, a hostile source can land no more than those, none over
    the manifest's bound. None without a readable basis."""
    base = basis_manifest(basis)
    if base is None:
        return None
    serial = base.serial + 1
    patches = [MANIFEST_PATCH, *sorted(patch_file(m.file) for m in base.maps.values())]
    return serial, [f"{release_dir(serial)}/{SIGNATURE}"] + [
        f"{patch_dir(serial)}/{name}" for name in patches
    ]


def fetch_release(
    remote: Remote,
    latest: Latest,
    ch: AgentChannel,
    keys: dict[str, Ed25519PublicKey],
    staging: Path,
    basis: Path | None,
    where: str,
    *,
    pushed: bool = False,
    ahead: Path | None = None,
) -> tuple[VerifiedRelease, int]:
    """Fetch release ``latest.serial`` in steps, so a hostile or broken repository cannot
    fill this node's disk before anything is checked: the manifest and its signature (at
    most 1 MiB, verified at once: the release returned); where ``basis`` is the serial of the
    release's patches, the patches (each no larger than the manifest says) and the maps they
    give (:mod:`mapsync.agent.patching`); then, for any map still missing, a listing that must
    name exactly the manifest's files as regular files of the manifest's sizes, then exactly
    those files, none larger than the manifest says. Returns the release and the bytes rsync
    moved; its files are for :func:`verify_files` to check.

    ``pushed``: a push inbox, where a map the push carried a patch for is left out of the
    release (:mod:`mapsync.transport.inbox`): it must then come from its patch, or the
    release is refused as missing it (the next poll of the source fetches it).

    ``ahead``: where the files fetched with LATEST for this release lie (its signature and
    patches, the manifest's among them, each no larger than a manifest may be): taken from
    there, the manifest made from the basis's and its patch."""
    from mapsync.agent.checks import read_signed
    from mapsync.agent.patching import fetch_patched

    directory = release_dir(latest.serial)
    if ahead is not None and basis is not None:
        where_patches = f"{remote.source}/{patch_dir(latest.serial)}"
        _manifest_from_patch(ahead, basis, latest, where_patches, ch.name)
    missing = [MANIFEST, SIGNATURE]
    if ahead is not None:
        for f in (MANIFEST, SIGNATURE):
            if (ahead / f).is_file() and not (ahead / f).is_symlink():
                os.rename(ahead / f, staging / f)
                missing.remove(f)
    moved = 0  # what came ahead: counted with LATEST
    if missing:  # a source without the manifest's patch: the manifest itself
        moved = remote.fetch_files(directory, missing, staging, None, MAX_MANIFEST_BYTES)
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
    have: set[str] = set()
    if basis is not None and manifest.patches:
        # Patches against the basis where it is their serial (mapsync.agent.patching); what
        # they cannot give, rsync fetches below, delta-encoded against the basis as ever.
        patched = fetch_patched(
            remote, manifest, basis, staging, staging.with_name("patches"), ch.name, ahead
        )
        have, moved = patched.files, moved + patched.moved
        proven = frozenset(manifest.maps[name].file for name in patched.patched)
        release = replace(release, proven=proven, cdb_edits=patched.edits)
    rest = [m for _, m in sorted(manifest.maps.items()) if m.file not in have]
    if not rest:
        # Every map from the basis and the patches: nothing more is fetched from the release's
        # directory, so there is nothing to list before fetching (one rsync and its ~220 bytes
        # fewer in the common pull of one new release; a file there that the manifest does not
        # name is never fetched, so it is not looked for either).
        return release, moved
    _check_listing(remote.list_dir(directory), manifest, where, pushed, have)
    files = sorted(m.file for m in rest)
    largest = max(m.size for m in rest)
    moved += remote.fetch_files(directory, files, staging, basis, largest + 1, block_size(largest))
    return release, moved


def _manifest_from_patch(
    ahead: Path, basis: Path, latest: Latest, where: str, channel: str
) -> None:
    """Where the release's manifest patch came with LATEST (and the manifest did not), the
    manifest it makes of the basis's, written to ``ahead`` if its sha256 is the one LATEST
    names (the signature is checked after, as for a fetched one). Anything else leaves the
    manifest for rsync to fetch: a patch from another serial quietly, a faulty one with a
    warning naming it."""
    from mapsync.release.manifest_patch import apply_manifest_patch, patch_base

    patch = ahead / MANIFEST_PATCH
    if (ahead / MANIFEST).exists() or not patch.is_file() or patch.is_symlink():
        return
    where = f"{where}/{MANIFEST_PATCH}"
    # What came ahead is for the serial after the basis's (_guess), and is used only when
    # LATEST names that serial: the basis is the one before it.
    base = latest.serial - 1
    try:
        data = patch.read_bytes()
        if patch_base(data) not in (None, base):  # None: not a manifest patch, applying says
            return  # from a release this node does not hold
        made = apply_manifest_patch((basis / MANIFEST).read_bytes(), data, where)
        if manifest_sha256(made) != latest.manifest_sha256:
            raise VerificationError(
                f"{where}: applied to serial {base}'s manifest, does not give the "
                f"manifest LATEST names (sha256 {latest.manifest_sha256[:16]}…)"
            )
    except (OSError, VerificationError) as exc:
        _log.warning(
            "manifest patch not used; fetching the manifest", channel=channel, reason=str(exc)
        )
        return
    # Private, as rsync lands a fetched one (--chmod F600): the basis keeps it so.
    atomic_write(ahead / MANIFEST, made, 0o600, durable=False)


def _check_listing(
    listing: dict[str, tuple[str, int]],
    manifest: Manifest,
    where: str,
    pushed: bool,
    have: set[str],
) -> None:
    """The release directory's ``listing`` must name exactly the manifest's files, each a
    regular file of the manifest's size, before any of them is fetched. ``have``: the files
    the basis and the patches gave; in a push inbox (``pushed``) a map the push carried a
    patch for is left out of the directory, and must be one of them."""
    expected = manifest.files() | {MANIFEST, SIGNATURE}
    extra = sorted(set(listing) - expected)
    if extra:
        raise VerificationError(
            f"{where}: unexpected file(s) not named by the manifest: {', '.join(extra)}"
        )
    for name, m in sorted(manifest.maps.items()):
        kind, size = listing.get(m.file, ("?", -1))
        if pushed and m.file not in listing and name in manifest.patches:
            if m.file in have:
                continue  # from its patch, checked against the manifest once applied
            raise VerificationError(
                f"{where}/{m.file}: missing (map {name}): the push carried its patch "
                f"instead, from serial {manifest.patches[name].base}, which this node cannot "
                "apply (its basis is another serial); the next poll of the source fetches it"
            )
        if kind != "-":
            raise VerificationError(f"{where}/{m.file}: missing or not a regular file (map {name})")
        if size != m.size:
            raise VerificationError(
                f"{where}/{m.file}: size {size} does not match the manifest (size {m.size}); "
                "the file was altered"
            )


def _check_fetched(
    release: VerifiedRelease,
    latest: Latest,
    ch: AgentChannel,
    current: Manifest | None,
    where: str,
) -> None:
    """Check everything else about a fetched, verified release (its serial against LATEST
    and the installed one, the maps the node must keep, its files); raise VerificationError."""
    from mapsync.agent.checks import check_keeps_maps, verify_files

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


def warn_if_exposed(ch: AgentChannel, manifest: Manifest, source: str) -> None:
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

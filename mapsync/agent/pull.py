"""One agent run for one channel: the decision, from the channel's sources and its state.

Nothing unverified is ever installed. The order is: the live set checked (and repaired from
STATE when damaged, :mod:`mapsync.agent.repair`); LATEST from the first source that answers
(:mod:`mapsync.agent.fetch`), refused below the serial floor or the installed serial,
nothing fetched while pinned or current; else the release it names, verified (manifest
sha256 against LATEST, signature, channel, serial, expiry, every text file); then built,
each cdb proved equal to the publisher's, and swapped in, in one rename
(:mod:`mapsync.agent.install`) — as a renewal when its maps are the live ones. Whatever
happens, the outcome is recorded in the channel's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mapsync import log
from mapsync.agent.fetch import Answer, fetch, newer_elsewhere, sources, warn_if_exposed
from mapsync.agent.node import NodeChannel, taken
from mapsync.agent.repair import check_and_repair
from mapsync.atomic import remove_tree
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import InstallError, MapsyncError, TransferStopped, VerificationError
from mapsync.release import Latest, Manifest, iso, same_maps, utcnow

_log = log.get("agent")

# What only an install, a reload or a release fetched needs (mapsync.agent.install, hooks,
# checks, patching) is imported where it is used: a nothing-changed pull, every minute on
# every node, does without.


@dataclass
class PullResult:
    """What one pull of a channel did (``action``) and where it ended (``serial``)."""

    channel: str
    action: str  # installed | renewed | current | pinned
    serial: int
    previous: int | None
    bytes: int = 0
    latest: int | None = None  # LATEST's serial, when pinned to an older one
    source: str | None = None  # the source (or mirror) that answered
    failed_sources: dict[str, str] = field(default_factory=dict)  # tried before it: source → error
    repaired: list[str] | None = None  # damage found in the live set and repaired from STATE


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
    with taken(cfg, ch) as node:
        state = node.state
        state.last_attempt = iso(utcnow())
        if unpin and state.pinned is not None:
            _log.info("unpinned", channel=ch.name, serial=state.pinned)
            state.pinned = None
        done = False
        try:
            try:
                result = _pull(node, pushed)
                done = True
            except OSError as exc:
                raise InstallError(f"channel {ch.name}: {exc}") from None
        except TransferStopped:
            raise  # this process ended the rsync (stopping, or a push preempted the poll)
        except MapsyncError as exc:
            state.last_error = str(exc)
            state.last_error_at = iso(utcnow())
            state.last_error_origin = "inbox" if pushed else "source"
            raise
        finally:
            remove_tree(node.paths.incoming, ignore_errors=True)
            if not done:
                node.save()
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
        failure = None
        if state.reload_pending:
            from mapsync.agent.hooks import reload_failure

            # What this run did is on disk before the hook, which may hang or be killed.
            node.save()
            failure = reload_failure(ch)
            state.reload_pending = failure is not None
        # One write: a nothing-changed poll writes only the time of its check, without fsync.
        node.save_run()
        if failure is not None:
            raise InstallError(
                f"channel {ch.name}: serial {result.serial} is installed but the reload hook "
                f"failed ({failure.splitlines()[0]}); it is retried on the next run"
            )
        return result


def _pull(node: NodeChannel, pushed: bool) -> PullResult:
    tried = sources(node.ch)  # a malformed mirror is a config error, whatever the others do
    node.settle()
    outcome = check_and_repair(node)
    current = node.current()

    def decide(latest: Latest, where: str) -> PullResult | None:
        return _decide(node, current, latest, where)

    answer = fetch(node, tried, decide, pushed=pushed)
    behind = None
    if answer.decided is not None and answer.decided.action == "current" and outcome.checked_fully:
        # Once every full check: do the sources after the one that found the node current
        # serve something newer (that one a mirror that stopped following)?
        newer = newer_elsewhere(node, tried, answer.source, decide)
        if newer is not None:
            assert newer.release is not None
            serial = newer.release.manifest.serial
            behind = {
                **answer.failed,  # the sources before it, as the pull found them
                answer.source: f"behind: it serves serial {answer.decided.serial}, "
                f"{newer.source} serves {serial}",
            }
            _log.warning(
                "a source is behind the ones after it; installing from them",
                channel=node.ch.name,
                source=answer.source,
                serves=answer.decided.serial,
                newer=newer.source,
                serial=serial,
            )
            answer = newer
    if answer.decided is not None:
        result = answer.decided
        result.bytes = answer.received
        result.source, result.failed_sources = answer.source, answer.failed
    else:
        result = _install(node, current, answer)
    if behind is not None:
        result.failed_sources = behind
    if outcome.problems:
        result.repaired = outcome.problems
    return result


def _decide(
    node: NodeChannel, current: Manifest | None, latest: Latest, where: str
) -> PullResult | None:
    """What LATEST (from ``where``) means for this node: refused (VerificationError: the
    next source is asked), nothing to do (pinned, current), or None: fetch and install it."""
    ch, state = node.ch, node.state
    floor = serial_floor(node, current)
    below_live = current is not None and latest.serial < current.serial  # refused below
    if floor is not None and latest.serial < floor and not below_live:
        raise VerificationError(
            f"{where}: serial {latest.serial} is lower than {floor}, the highest this node has "
            "installed (a stale mirror, a rollback attack or a restored publisher); nothing changed"
        )
    if current is None:
        if state.pinned is not None:
            # Nothing of this channel is live and no verified copy of the pinned serial is
            # kept (check_and_repair would have restored it): LATEST goes live, and a pin
            # left on another serial would have status tell of a release that is not live.
            _log.warning(
                "no verified copy of the pinned serial is kept here; LATEST is installed and "
                "the pin lifted (`mapsync rollback` pins again)",
                channel=ch.name,
                pinned=state.pinned,
                latest=latest.serial,
            )
            state.pinned = None
        return None
    if state.pinned is not None and latest.serial >= current.serial:
        return _pinned(ch, current, latest)
    if latest.serial < current.serial:
        raise VerificationError(
            f"{where}: serial {latest.serial} is lower than the installed {current.serial} "
            "(a stale mirror, a rollback attack or a restored publisher); nothing changed"
        )
    if latest.serial > current.serial:
        return None
    found = node.installed()
    assert found is not None
    if found.sha256 != latest.manifest_sha256:
        raise VerificationError(
            f"{where}: serial {latest.serial} is installed with a different manifest; refusing"
        )
    if current.expired():
        raise VerificationError(
            f"channel {ch.name}: installed serial {current.serial} expired at {current.expires} "
            "and the publisher has not renewed it (maps keep serving)"
        )
    _log.info("up to date", channel=ch.name, serial=current.serial)
    if not node.paths.kept.has(current.serial):
        from mapsync.agent.install import keep

        # Installed by a mapsync that kept nothing: keep it now, so it can be rolled back to.
        keep(node, found.directory, current)
    return PullResult(ch.name, "current", current.serial, current.serial)


def serial_floor(node: NodeChannel, current: Manifest | None) -> int | None:
    """The lowest serial a source may offer: the highest this node ever installed, from its
    own state and kept releases as well as the live set, so wiping ``target`` (or losing the
    state file) does not open the door to an old release. A rollback pins instead."""
    serials = [*node.paths.kept.serials(), *([current.serial] if current else [])]
    if node.state.highest_serial is not None:
        serials.append(node.state.highest_serial)
    return max(serials, default=None)


def _pinned(ch: AgentChannel, current: Manifest, latest: Latest) -> PullResult:
    """The source was reached and LATEST is sane, but ``rollback`` pinned the installed serial."""
    if current.expired():
        raise VerificationError(
            f"channel {ch.name}: pinned serial {current.serial} expired at {current.expires} "
            "(maps keep serving); `mapsync pull --unpin` installs LATEST, "
            "`mapsync rollback --publisher SERIAL` re-publishes old content with a fresh expiry"
        )
    _log.info("pinned by rollback", channel=ch.name, serial=current.serial, latest=latest.serial)
    return PullResult(ch.name, "pinned", current.serial, current.serial, latest=latest.serial)


def _install(node: NodeChannel, current: Manifest | None, answer: Answer[PullResult]) -> PullResult:
    """Install the release ``answer`` fetched: a renewal when its maps are the live ones (the
    live inodes kept), else a new set; keep it, and make its text the next rsync basis."""
    from mapsync.agent.install import install, keep, promote_basis

    ch = node.ch
    release = answer.release
    assert release is not None
    manifest, staging = release.manifest, release.path
    warn_if_exposed(ch, manifest, answer.source)
    same = current is not None and same_maps(manifest.maps, current.maps, identical=True)
    same = install(node, release, renewal=same, reuse=True)
    keep(node, staging, manifest)
    promote_basis(node, staging, manifest)
    action = "renewed" if same else "installed"
    _log.info(
        f"{action} release",
        channel=ch.name,
        serial=manifest.serial,
        previous=current.serial if current else None,
        bytes_on_wire=answer.received,
        source=answer.source,
    )
    return PullResult(
        ch.name,
        action,
        manifest.serial,
        current.serial if current else None,
        answer.received,
        source=answer.source,
        failed_sources=answer.failed,
    )

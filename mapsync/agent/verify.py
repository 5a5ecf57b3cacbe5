"""``mapsync verify [--repair]``: re-check the installed set against its signed manifest,
and rebuild it from the verified copy kept in STATE when it is damaged."""

from __future__ import annotations

from mapsync.agent.checks import trusted_keys
from mapsync.agent.damage import check_live
from mapsync.agent.hooks import reload_failure
from mapsync.agent.liveset import strays
from mapsync.agent.node import NodeChannel, taken
from mapsync.agent.repair import check_and_repair
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import InstallError, VerificationError
from mapsync.formats import text
from mapsync.release.verify import verify_manifest


def verify_installed(cfg: AgentConfig, ch: AgentChannel) -> int:
    """Verify signature and every file hash of what ``ch`` has installed; return its serial.
    Without the channel's lock (a check from cron beside the pull timer): a failure while a
    pull swapped in a new set meanwhile is no failure, and the new set is verified instead."""
    node = NodeChannel.look(cfg, ch)
    try:
        return _verify(cfg, ch, node)
    except VerificationError:
        found = node.installed()
        if node.live.current() == (found.directory if found is not None else None):
            raise
    return _verify(cfg, ch, NodeChannel.look(cfg, ch))  # the set a pull swapped in meanwhile


def _verify(cfg: AgentConfig, ch: AgentChannel, node: NodeChannel) -> int:
    target = node.paths.target
    found = node.installed()
    if found is None:
        problems = check_live(target, (None, {}), expect_installed=False).problems
        raise VerificationError(
            f"channel {ch.name}: "
            + ("; ".join(problems) if problems else f"nothing installed in {target}")
        )
    where = str(found.directory)
    manifest = verify_manifest(
        found.directory, found.data, found.signature, trusted_keys(cfg), where, channel=ch.name
    ).manifest
    try:
        extra = strays(found.directory, manifest)
    except FileNotFoundError:  # swapped out and deleted meanwhile: see verify_installed
        raise VerificationError(f"{found.directory}: no longer there") from None
    if extra:
        raise VerificationError(
            f"{found.directory / extra[0]}: in the live set, but no file of its manifest "
            "(`mapsync verify --repair` or the next pull removes it)"
        )
    for name, m in sorted(manifest.maps.items()):
        checks = m.installed_files()
        for file, want, want_size in checks:
            path = target / file
            try:
                digest, size = text.sha256_file(path)
            except FileNotFoundError:
                raise VerificationError(
                    f"{path}: missing (map {name}, serial {manifest.serial})"
                ) from None
            if digest != want or size != want_size:
                raise VerificationError(
                    f"{path}: sha256/size do not match the installed manifest (map {name}, serial {manifest.serial})"
                )
    return manifest.serial


def repair_installed(cfg: AgentConfig, ch: AgentChannel) -> tuple[int, list[str]] | None:
    """Fully check ``ch``'s live set and rebuild it from STATE if damaged (a new swap, reload
    hook included): (serial, damage found) if repaired, None if nothing was damaged.
    VerificationError if it is damaged and no verified copy is kept here."""
    with taken(cfg, ch) as node:
        state = node.state
        try:
            node.settle()
            outcome = check_and_repair(node, full=True)
            if outcome.problems and not outcome.repaired:
                raise VerificationError(
                    f"channel {ch.name}: the live set is damaged ({'; '.join(outcome.problems)}) "
                    f"and no verified copy of it is kept in {node.paths.root}; `mapsync pull` "
                    "installs the source's release instead"
                )
            failure = reload_failure(ch) if state.reload_pending else None
            state.reload_pending = failure is not None
        finally:
            node.save()
        if failure is not None:
            raise InstallError(
                f"channel {ch.name}: repaired, but the reload hook failed "
                f"({failure.splitlines()[0]}); it is retried on the next run"
            )
        if outcome.repaired and outcome.manifest is not None:
            return outcome.manifest.serial, outcome.problems
        return None

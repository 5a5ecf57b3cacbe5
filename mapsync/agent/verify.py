"""``mapsync verify [--repair]``: re-check the installed set against its signed manifest,
and rebuild it from the verified copy kept in STATE when it is damaged."""

from __future__ import annotations

from mapsync.agent.damage import check_live
from mapsync.agent.liveset import LiveSet
from mapsync.agent.pull import (
    save_state,
    settled,
    taken_channel,
    trusted_keys,
)
from mapsync.agent.repair import check_and_repair
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import InstallError, VerificationError
from mapsync.formats import text
from mapsync.release.verify import verify_manifest


def verify_installed(cfg: AgentConfig, ch: AgentChannel) -> int:
    """Verify signature and every file hash of what ``ch`` has installed; return its serial."""
    live = LiveSet(ch.target)
    cur = live.current()
    pair = live.installed_manifest()
    if cur is None or pair is None:
        found = check_live(ch.target, (None, {}), expect_installed=False).problems
        raise VerificationError(
            f"channel {ch.name}: "
            + ("; ".join(found) if found else f"nothing installed in {ch.target}")
        )
    data, sig = pair
    manifest = verify_manifest(cur, data, sig, trusted_keys(cfg), str(cur)).manifest
    for name, m in sorted(manifest.maps.items()):
        checks = [(m.file, m.sha256, m.size)]
        if m.cdb is not None:
            checks.append((m.cdb.file, m.cdb.sha256, m.cdb.size))
        for file, want, want_size in checks:
            path = ch.target / file
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
    from mapsync.agent.hooks import reload_failure

    with taken_channel(cfg, ch) as (paths, state):
        try:
            live = settled(ch)
            outcome = check_and_repair(cfg, ch, paths, state, live, full=True)
            if outcome.problems and not outcome.repaired:
                raise VerificationError(
                    f"channel {ch.name}: the live set is damaged ({'; '.join(outcome.problems)}) "
                    f"and no verified copy of it is kept in {paths.root}; `mapsync pull` "
                    "installs the source's release instead"
                )
            failure = reload_failure(ch) if state.reload_pending else None
            state.reload_pending = failure is not None
        finally:
            save_state(ch, paths, state)
        if failure is not None:
            raise InstallError(
                f"channel {ch.name}: repaired, but the reload hook failed "
                f"({failure.splitlines()[0]}); it is retried on the next run"
            )
        if outcome.repaired and outcome.manifest is not None:
            return outcome.manifest.serial, outcome.problems
        return None

"""``mapsync verify``: re-check the installed set against its signed manifest."""

from __future__ import annotations

from mapsync.agent.liveset import LiveSet
from mapsync.agent.pull import trusted_keys
from mapsync.config import AgentChannel, AgentConfig
from mapsync.errors import VerificationError
from mapsync.formats import text
from mapsync.release import MANIFEST, SIGNATURE, parse_manifest
from mapsync.signing import verify


def verify_installed(cfg: AgentConfig, ch: AgentChannel) -> int:
    """Verify signature and every file hash of what ``ch`` has installed; return its serial."""
    live = LiveSet(ch.target)
    cur = live.current()
    pair = live.installed_manifest()
    if cur is None or pair is None:
        raise VerificationError(f"channel {ch.name}: nothing installed in {ch.target}")
    data, sig = pair
    verify(trusted_keys(cfg), data, sig, f"{cur}/{SIGNATURE}")
    manifest = parse_manifest(data, f"{cur}/{MANIFEST}")
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

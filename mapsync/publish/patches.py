"""The patches a release carries: per changed map, from the previous release's text
(docs/release-format.md, "Patches"). Written beside the staged release, committed with it."""

from __future__ import annotations

from pathlib import Path

from mapsync import log
from mapsync.formats import text
from mapsync.publish.repository import Staging
from mapsync.release import Manifest, MapEntry, PatchInfo, patch_file
from mapsync.release.patch import KeyCounts, NoPatch, make_patch

_log = log.get("publisher")

# A patch larger than this share of its map's text is not written: rsync's delta of the text
# then costs about as much, and the agent's patch path would save nothing.
MAX_SHARE = 4


def write_patch(
    name: str, entry: MapEntry, last: Manifest, last_dir: Path, staging: Staging, sep: str
) -> tuple[PatchInfo | None, KeyCounts | None]:
    """The patch of map ``name`` (``entry``, staged in ``staging``) from release ``last``
    (in ``last_dir``), written into ``staging.patches`` (None when the map is unchanged,
    new, the previous text is gone, or a patch would not pay), and the keys it adds,
    removes and changes, where the two texts were compared (the plan's counts)."""
    old = last.maps.get(name)
    if old is None or old.sha256 == entry.sha256:
        return None, None
    old_path = last_dir / old.file
    if not old_path.is_file():
        return None, None
    staging.patches.mkdir(exist_ok=True)
    path = staging.patches / patch_file(entry.file)
    try:
        with open(path, "wb") as out:
            counts = make_patch(old_path, staging.path / entry.file, out, sep.encode())
    except NoPatch as exc:
        _log.info("no patch for this map", channel=staging.channel, map=name, reason=str(exc))
        path.unlink()
        return None, None
    digest, size = text.sha256_file(path)
    if size * MAX_SHARE > entry.size:
        path.unlink()
        return None, counts
    return PatchInfo(last.serial, path.name, digest, size), counts

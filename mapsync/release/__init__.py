"""The release contract both halves stand on (docs/release-format.md).

- :mod:`mapsync.release.format`: the layout and its names (``LATEST``, ``releases/``,
  ``.staging``, ``MANIFEST.json`` and its signature), the manifest and its parsing;
- :mod:`mapsync.release.catalogue`: the map catalogue as plain data (:class:`MapSpec`);
- :mod:`mapsync.release.verify`: the one way to a manifest that is trusted
  (:class:`~mapsync.release.verify.VerifiedRelease`). Imported on its own, not from here:
  it needs ``cryptography``, which loading a config or ``mapsync status`` does without.

Publisher, agent and config import from here; nothing here imports them, or a renderer.
"""

from __future__ import annotations

from mapsync.release.catalogue import (
    BUILTIN_MAPS,
    SECRET_MAPS,
    MapSpec,
    check_map_names,
    is_secret,
    map_spec,
    secrets_beyond,
    separator,
)
from mapsync.release.format import (
    FILE_NAME,
    FORMAT,
    LATEST,
    MANIFEST,
    MANIFEST_PATCH,
    MAX_LATEST_BYTES,
    MAX_MANIFEST_BYTES,
    PATCHES,
    RELEASES,
    SEPARATORS,
    SERIAL_NAME,
    SIGNATURE,
    STAGING,
    CdbInfo,
    CustomInfo,
    Latest,
    Manifest,
    MapEntry,
    PatchInfo,
    check_manifest_size,
    is_serial_name,
    iso,
    manifest_sha256,
    parse_iso,
    parse_latest,
    parse_manifest,
    patch_dir,
    patch_file,
    release_dir,
    same_maps,
    serial_names,
    utcnow,
)

__all__ = [
    "BUILTIN_MAPS",
    "FILE_NAME",
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "MANIFEST_PATCH",
    "MAX_LATEST_BYTES",
    "MAX_MANIFEST_BYTES",
    "PATCHES",
    "RELEASES",
    "SECRET_MAPS",
    "SEPARATORS",
    "SERIAL_NAME",
    "SIGNATURE",
    "STAGING",
    "CdbInfo",
    "CustomInfo",
    "Latest",
    "Manifest",
    "MapEntry",
    "MapSpec",
    "PatchInfo",
    "check_manifest_size",
    "check_map_names",
    "is_secret",
    "is_serial_name",
    "iso",
    "manifest_sha256",
    "map_spec",
    "parse_iso",
    "parse_latest",
    "parse_manifest",
    "patch_dir",
    "patch_file",
    "release_dir",
    "same_maps",
    "secrets_beyond",
    "separator",
    "serial_names",
    "utcnow",
]

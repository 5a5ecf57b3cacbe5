"""The map catalogue as plain data: what publisher and agent both know of each map.

A :class:`MapSpec` says what a map *is* — its name (also its file name), whether a cdb is
built beside the text, whether it carries password hashes, where a text line splits into key
and value, whether its entries are exceptions (a deny list) — and nothing of how its entries
are rendered: the renderers (:data:`mapsync.maps.CATALOGUE`) take their facts from here and
only the publisher imports them. A map of the operator's own (``[publisher.maps.NAME]``) is
not in :data:`BUILTIN_MAPS`: its manifest entry gives the same facts (``custom`` and ``cdb``),
read by :func:`map_spec`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from mapsync.errors import VerificationError
from mapsync.release.format import MANIFEST, Manifest, MapEntry


@dataclass(frozen=True)
class MapSpec:
    """The facts of one map, without a renderer behind it.

    ``cdb``: a cdb is built beside the text (Postfix/Exim maps), or it is text only (Dovecot
    passwd-files). ``secret``: it carries password hashes (installed 0640, group ``dovecot``;
    only channels that list it get them). ``separator``: between key and value on a text line:
    ``" "`` (Postfix source format), ``"\\t"`` or ``":"`` (Dovecot passwd-file).
    ``exceptions``: its entries are exceptions (a deny list), guarded as such by default.
    """

    name: str
    cdb: bool = True
    secret: bool = False
    separator: str = " "
    exceptions: bool = False


# Every built-in map a channel may list, by name (docs/maps.md describes each).
BUILTIN_MAPS: dict[str, MapSpec] = {
    s.name: s
    for s in (
        MapSpec("domains"),
        MapSpec("recipients"),
        MapSpec("virtual"),
        MapSpec("transport"),
        MapSpec("senders"),
        MapSpec("exim_routes"),
        MapSpec("dovecot_users", cdb=False, secret=True, separator=":"),
        MapSpec("dovecot_proxy", cdb=False, separator=":"),
        # A deny list: usually few entries, often none.
        MapSpec("dovecot_deny", cdb=False, separator=":", exceptions=True),
        MapSpec("dovecot_submission", cdb=False, secret=True, separator=":"),
    )
}

# The built-in maps that carry password hashes.
SECRET_MAPS = frozenset(name for name, s in BUILTIN_MAPS.items() if s.secret)


def map_spec(name: str, entry: MapEntry | None = None) -> MapSpec | None:
    """The facts of map ``name``: a map of the operator's own from its manifest ``entry``
    (``custom``, and ``cdb`` set or not), a built-in map from :data:`BUILTIN_MAPS`; None for
    a name neither knows."""
    if entry is not None and entry.custom is not None:
        return MapSpec(
            name,
            cdb=entry.cdb is not None,
            secret=entry.custom.secret,
            separator=entry.custom.separator,
        )
    return BUILTIN_MAPS.get(name)


def separator(name: str, entry: MapEntry | None = None) -> str:
    """Where a line of map ``name`` splits into key and value: a map of the operator's own
    says so in its manifest ``entry``; a built-in map in the catalogue."""
    found = map_spec(name, entry)
    return found.separator if found is not None else " "


def is_secret(name: str, entry: MapEntry | None) -> bool:
    """Whether map ``name`` is handled like password hashes: a built-in map that carries them,
    or a map of the operator's own that its manifest ``entry`` marks ``secret``."""
    return name in SECRET_MAPS or (
        entry is not None and entry.custom is not None and entry.custom.secret
    )


def secrets_beyond(manifest: Manifest, carried: Collection[str]) -> list[str]:
    """The maps of ``manifest`` that carry password hashes and are not among ``carried`` (the
    maps of the release a channel's LATEST names now), sorted: a kept copy of that release
    would still serve hashes the channel no longer carries (a ``dovecot_users`` put into the
    MX channel by mistake, then taken out). The publisher's repository, a mirror and a node's
    kept releases drop such a release."""
    return sorted(n for n, m in manifest.maps.items() if n not in carried and is_secret(n, m))


def check_map_names(manifest: Manifest, where: str) -> None:
    """Refuse a manifest naming a map this mapsync cannot install: a name that is neither a
    built-in map nor marked ``custom`` (a map of the publisher's own, with what installing it
    takes), or a built-in map's name marked ``custom``."""
    for name, m in sorted(manifest.maps.items()):
        if m.custom is None and name not in BUILTIN_MAPS:
            raise VerificationError(
                f"{where}/{MANIFEST}: names map {name!r}, which mapsync does not know"
            )
        if m.custom is not None and name in BUILTIN_MAPS:
            raise VerificationError(
                f"{where}/{MANIFEST}: map {name!r} is a built-in map, not one of the publisher's own"
            )

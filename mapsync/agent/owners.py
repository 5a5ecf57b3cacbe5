"""The owner, group and mode each installed map file gets (``[agent.channels.C.files.MAP]``,
else mapsync's defaults), and whether a file has them: what an install gives a new file, and
what every pull compares the live files with (:mod:`mapsync.agent.repair`). Light: a pull
that finds nothing to do imports this, not the install."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from mapsync import log
from mapsync.config import AgentChannel, FileMode
from mapsync.errors import InstallError
from mapsync.release import Manifest, is_secret

_log = log.get("agent")


SECRET_GROUP = "dovecot"
KEEP = -1  # os.chown: leave the owner or group as it is


@dataclass(frozen=True)
class Ownership:
    """Mode, uid and gid an installed map file gets (uid/gid -1: as the agent created it)."""

    mode: int
    uid: int = KEEP
    gid: int = KEEP


def ownership(ch: AgentChannel, manifest: Manifest, *, live: bool = False) -> dict[str, Ownership]:
    """Per map of ``manifest``: ``[agent.channels.C.files.MAP]`` where set, else mapsync's
    default — maps with password hashes 0640, group ``dovecot`` where it exists (Dovecot must
    read them, nobody else may); every other map 0644. Users and groups are looked up now, on
    this node: an unknown one is an InstallError, raised before anything is built.

    An ``owner`` other than root never gets write permission (``0640`` becomes ``0440``): a
    daemon that owns a map must not rewrite what it serves (Dovecot its own passdb). That is
    not a guarantee — a file's owner may chmod it — so such an owner is warned about, once per
    map and process (not by a check of the ``live`` set); ``group`` is the way to let a
    daemon read a map."""
    owners: dict[str, Ownership] = {}
    for name in sorted(manifest.maps):
        conf = ch.files.get(name, FileMode())
        secret = is_secret(name, manifest.maps[name])
        mode = conf.mode if conf.mode is not None else (0o640 if secret else 0o644)
        uid = gid = KEEP
        if conf.owner is not None:
            uid = _lookup(ch, manifest, name, "owner", conf.owner, live)
            if uid != 0:
                mode &= ~0o200
                if not live:
                    _warn_owner(ch, name, conf.owner, mode)
        if conf.group is not None:
            gid = _lookup(ch, manifest, name, "group", conf.group, live)
        elif secret:
            with contextlib.suppress(KeyError):  # no Dovecot on this node: root-only is safe
                gid = grp.getgrnam(SECRET_GROUP).gr_gid
        if not live and secret and mode & 0o004:
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


def _lookup(ch: AgentChannel, manifest: Manifest, name: str, key: str, who: str, live: bool) -> int:
    """uid of user ``who`` (key "owner") or gid of group ``who`` (key "group"); a number is
    taken as an id when no user or group has that name. ``live``: looked up for the set
    already live (its files are then left as they are)."""
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
        f"on this node (map {name}); "
        + (
            f"the live files of serial {manifest.serial} are left as they are"
            if live
            else f"serial {manifest.serial} not installed, the old set keeps serving"
        )
    )


def has_ownership(path: Path, own: Ownership, directory: Path) -> bool:
    """Whether ``path`` has the mode, owner and group a file built in ``directory`` gets
    (uid/gid -1: what a file the agent creates there gets)."""
    st = path.stat()
    uid = own.uid if own.uid != KEEP else os.geteuid()
    gid = own.gid
    if gid == KEEP:
        # A new file takes the directory's group where it is set-group-ID, else the agent's.
        parent = directory.stat()
        gid = parent.st_gid if parent.st_mode & stat.S_ISGID else os.getegid()
    return stat.S_IMODE(st.st_mode) == own.mode and (st.st_uid, st.st_gid) == (uid, gid)


def settings_differ(path: Path, own: Ownership) -> bool:
    """Whether ``path``'s mode differs from ``own``, or its owner or group where ``own``
    names one (a setting, or the ``dovecot`` group of a hash map, found): what every pull
    repairs. An owner or group left to how the agent creates files (-1) is not compared: a
    set-group-ID target, a filesystem that forces ids, or a group lookup failing this once
    (sssd, LDAP) must not have every pull build the set again."""
    st = path.stat()
    return (
        stat.S_IMODE(st.st_mode) != own.mode
        or (own.uid != KEEP and st.st_uid != own.uid)
        or (own.gid != KEEP and st.st_gid != own.gid)
    )


def drifted(ch: AgentChannel, manifest: Manifest, directory: Path) -> list[str]:
    """The files of ``manifest`` in ``directory`` whose owner, group or mode are not what the
    channel's ``files`` settings (or mapsync's defaults) give now (:func:`settings_differ`):
    changed by hand, or a setting changed since the set was built. A missing file is not
    one (the damage check's to find). Raises InstallError for a user or group this node
    does not have."""
    owners = ownership(ch, manifest, live=True)
    found = []
    for name, m in sorted(manifest.maps.items()):
        for file, _, _ in m.installed_files():
            with contextlib.suppress(OSError):
                if settings_differ(directory / file, owners[name]):
                    found.append(file)
    return found


def unmet_key(ch: AgentChannel, manifest: Manifest, directory: Path) -> str:
    """How ``ownership_unmet`` names the live set in ``directory`` with the files settings
    now: its name and inode (a name comes back) and a digest of the settings. A set built
    again whose files could not keep them either (a filesystem that forces modes) is not
    built again for them before the next release; ``status`` says so."""
    try:
        inode = directory.stat().st_ino
    except OSError:
        inode = 0
    owners = ownership(ch, manifest, live=True)
    wanted = hashlib.sha256(repr(sorted(owners.items())).encode()).hexdigest()[:16]
    return f"{directory.name} {inode} {wanted}"

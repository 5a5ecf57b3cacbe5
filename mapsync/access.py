"""Who runs mapsync and who owns its files: the words of a permission error.

A bare ``[Errno 13] Permission denied`` says neither which user was refused nor who may do
it. :func:`denied` names the path, the running user, the path's owner (or that of its
nearest existing parent) and the fix; :func:`check_owner` refuses, before anything is
written, a run by another user than the one that owns a directory mapsync writes into
(a release written as root could not be pruned by the ``mapsync`` user later).
"""

from __future__ import annotations

import errno
import os
import pwd
from pathlib import Path

from mapsync.errors import MapsyncError


def user_name(uid: int) -> str:
    """``mapsync (uid 998)``, or ``uid 998`` for a uid without a name."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def running_user() -> str:
    """The name of the user this process runs as (effective uid)."""
    return user_name(os.geteuid())


def _login(uid: int) -> str:
    """The name to run as: the login name, else ``#uid`` (what runuser/sudo accept)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def _owner(path: Path) -> tuple[Path, int] | None:
    """(path or its nearest existing parent, its owner's uid)."""
    for p in (path, *path.parents):
        try:
            return p, os.lstat(p).st_uid
        except OSError:
            continue
    return None


def is_denied(exc: OSError) -> bool:
    """Whether ``exc`` is a permission error (EACCES or EPERM)."""
    return exc.errno in (errno.EACCES, errno.EPERM)


def denied(path: Path | str, what: str = "") -> str:
    """``PATH: permission denied [what] (mapsync runs as X; PATH belongs to Y): fix``."""
    path = Path(path)
    doing = f" {what}" if what else ""
    me = running_user()
    found = _owner(path)
    if found is None:
        return f"{path}: permission denied{doing} (mapsync runs as {me})"
    where, uid = found
    if uid == os.geteuid():
        return (
            f"{path}: permission denied{doing} (mapsync runs as {me}, who owns {where}): "
            "check the modes of the path and its parent directories"
        )
    return (
        f"{path}: permission denied{doing} (mapsync runs as {me}; {where} belongs to "
        f"{user_name(uid)}): run mapsync as that user (`sudo -u {_login(uid)} mapsync ...`) "
        f"or give {_login(os.geteuid())} access"
    )


def check_owner(directory: Path, what: str) -> None:
    """Refuse to write into ``directory`` (when it exists) as another user than its owner."""
    try:
        uid = os.stat(directory).st_uid
    except OSError:
        return  # created by this run, as this user
    if uid != os.geteuid():
        raise MapsyncError(
            f"{directory}: {what} belongs to {user_name(uid)}, but mapsync runs as "
            f"{running_user()}; nothing was written. Run it as that user (`sudo -u "
            f"{_login(uid)} mapsync ...`, or the systemd unit), or hand the directory over "
            "(`chown -R`) if this user should own it: files written by another user could not "
            "be replaced or pruned later"
        )

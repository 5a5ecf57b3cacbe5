"""What the agent leaves in its push inbox for the publisher's push (mapsync.transport.inbox).

After every install of a channel with an ``inbox``: the release of that serial in the inbox
completed with the maps a push left out for their patches (copied from the verified text
just installed), so that the next push, whatever it sends, finds every map there to link
or delta-encode against; then ``INBOX/BASIS``, the serial of the text this node keeps, which
tells the push it may send that serial's patches instead of the changed maps.

The inbox belongs to the push account, so nothing is followed there: every directory is
opened without following a symlink and every file is made anew (O_EXCL) relative to its
directory's descriptor, owned like that directory (the push's rsync must read it), 0600 as
the push writes the maps. Best effort: a failure is logged, and the push then sends the
text as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from mapsync import log
from mapsync.atomic import copy_into, write_all
from mapsync.config import AgentChannel
from mapsync.release import RELEASES, Manifest

_log = log.get("agent")

BASIS = "BASIS"  # INBOX/BASIS, read by the push (mapsync.transport.inbox)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_inbox(ch: AgentChannel, what: str) -> int | None:
    """The inbox's descriptor; None where there is none (nothing pushed yet) or it is a
    symlink (never followed, as the agent's pruning does not follow it: the push then
    sends the text), or when it cannot be opened (logged)."""
    assert ch.inbox is not None
    try:
        return os.open(ch.inbox, _DIR)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            _log.debug(f"{what}: the inbox is a symlink, not followed", channel=ch.name)
        else:
            _failed(ch, what, exc)
        return None


def note_basis(ch: AgentChannel, serial: int | None) -> None:
    """Write ``serial`` into ``INBOX/BASIS`` (None: remove it: the basis is changing or
    gone). Only for a channel with an ``inbox`` that exists."""
    if ch.inbox is None:
        return
    top = _open_inbox(ch, "cannot tell the push this node's basis")
    if top is None:
        return
    tmp = f".{BASIS}.{os.getpid()}.tmp"
    try:
        if serial is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(BASIS, dir_fd=top)
            return
        _new_file(top, tmp, f"{serial}\n".encode(), 0o644, None)
        # No fsync: lost in a crash, the push sends the text instead of patches once.
        os.replace(tmp, BASIS, src_dir_fd=top, dst_dir_fd=top)
    except OSError as exc:
        _failed(ch, "cannot tell the push this node's basis; it sends the text", exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=top)
    finally:
        os.close(top)


def complete_release(ch: AgentChannel, manifest: Manifest, text: Path) -> list[str]:
    """Copy into ``INBOX/releases/<serial>/`` each map file of ``manifest`` it lacks (a push
    left it out for its patch) from ``text``, the verified text of that release; return the
    files added. Nothing when the inbox holds no such release."""
    if ch.inbox is None:
        return []
    added: list[str] = []
    top = _open_inbox(ch, "cannot complete the release in the inbox")
    if top is None:
        return []
    fds = [top]
    try:
        fds.append(os.open(RELEASES, _DIR, dir_fd=fds[-1]))
        fds.append(os.open(str(manifest.serial), _DIR, dir_fd=fds[-1]))
    except (FileNotFoundError, NotADirectoryError):
        for fd in fds:
            os.close(fd)
        return []
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        _failed(ch, "cannot complete the release in the inbox", exc)
        return []
    release = fds[-1]
    try:
        st = os.fstat(release)
        present = set(os.listdir(release))
        for m in sorted(manifest.maps.values(), key=lambda m: m.file):
            if m.file in present:
                continue
            tmp = f".{m.file}.{os.getpid()}.tmp"
            try:
                _new_file(release, tmp, text / m.file, 0o600, st)
                # A link, not a rename: a file the push wrote meanwhile stays.
                os.link(tmp, m.file, src_dir_fd=release, dst_dir_fd=release, follow_symlinks=False)
                added.append(m.file)
            except FileExistsError:
                pass
            finally:
                with contextlib.suppress(FileNotFoundError):  # never made: _new_file failed
                    os.unlink(tmp, dir_fd=release)
    except OSError as exc:
        _failed(ch, "cannot complete the release in the inbox", exc)
    finally:
        for fd in fds:
            os.close(fd)
    if added:
        _log.debug(
            "completed the release in the inbox",
            channel=ch.name,
            serial=manifest.serial,
            files=",".join(added),
        )
    return added


def _new_file(
    directory: int, name: str, data: bytes | Path, mode: int, owner: os.stat_result | None
) -> None:
    """Create ``name`` in ``directory`` (a descriptor) anew, holding ``data`` (bytes, or the
    file at that path, copied in the kernel: a map can be larger than the agent's whole
    memory budget): ``mode``, and owned as ``owner`` when given."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=directory)
    fd = os.open(name, _NEW, mode, dir_fd=directory)
    try:
        if owner is not None:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        os.fchmod(fd, mode)
        if isinstance(data, Path):
            copy_into(data, fd)
        else:
            write_all(fd, data)
    finally:
        os.close(fd)


def _failed(ch: AgentChannel, what: str, exc: OSError) -> None:
    _log.warning(what, channel=ch.name, inbox=str(ch.inbox), error=exc.strerror or str(exc))

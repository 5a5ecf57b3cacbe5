"""Is the live set still what was installed? The checks ``pull``, ``status`` and ``verify``
make before trusting it.

A live file can be deleted, truncated or edited by hand, ``TARGET/.mapsync/current`` replaced
by a directory, the live ``MANIFEST.json`` overwritten with garbage. Nothing of that is seen by
a pull that only asks the source for something newer, and a renewal would hard-link the
damaged inode into the next set. Two levels of checking:

- cheap (every pull, every ``status``): ``current`` is mapsync's link, the live manifest
  parses, every file it names exists as a regular file of the manifest's size, and has the
  size and mtime recorded in the state when it was installed; a file with a new inode or
  ctime but its old size and mtime (rewritten in place with the mtime put back, or the set
  copied with ``cp -a``) is hashed at once;
- full (every ``[agent] full_check``, before a renewal reuses an inode, and ``verify``): the
  sha256 of every file against the manifest.

Kept free of heavy imports (no cryptography): ``status`` runs it every minute.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mapsync.agent.liveset import CURRENT, SETS, Installed, LiveSet, read_installed, strays
from mapsync.agent.state import LiveFile
from mapsync.errors import MapsyncError, VerificationError
from mapsync.formats import text
from mapsync.release import MANIFEST, SIGNATURE, Manifest
from mapsync.signing import public_key_id


@dataclass
class LiveCheck:
    """What a check of a channel's live set found."""

    manifest: Manifest | None = None  # the live manifest, when it could be read
    installed: Installed | None = None  # its bytes and signature, when they could be read
    directory: Path | None = None  # the live set's directory (``current`` resolved)
    problems: list[str] = field(default_factory=list)  # empty: the set is intact
    files: dict[str, LiveFile] = field(default_factory=dict)  # size/mtime of each live file
    # Whether a size/mtime record of this very set was compared (False: none, or of another
    # set — a run that swapped but had not yet saved its state, or was killed in between).
    record_used: bool = False
    # Files found as new inodes with their recorded size and mtime (the set copied or restored
    # with ``cp -a``) whose sha256 still matched: the record should be taken again.
    rerecord: bool = False
    # Names in the set's directory that its manifest does not name (each one of ``problems``,
    # the last ones): no map is changed by them, and a pull removes them (agent.repair).
    strays: list[str] = field(default_factory=list)
    # The manifest or its signature has another mtime but its size: no hash in the manifest to
    # tell, so a pull makes this a full check (the signature verified again, every file hashed).
    recheck: bool = False

    @property
    def damaged(self) -> bool:
        """Whether anything was found wrong."""
        return bool(self.problems)

    @property
    def only_strays(self) -> bool:
        """Whether all that was found wrong is stray files (no map changed)."""
        return bool(self.strays) and len(self.problems) == len(self.strays)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "a special file"


def set_files(manifest: Manifest) -> set[str]:
    """Every file of a live set: manifest, signature, text maps and their cdb files."""
    names = {MANIFEST, SIGNATURE}
    for m in manifest.maps.values():
        names.add(m.file)
        if m.cdb is not None:
            names.add(m.cdb.file)
    return names


def _live_file(st: os.stat_result) -> LiveFile:
    return LiveFile(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def stat_files(directory: Path, manifest: Manifest) -> dict[str, LiveFile]:
    """Size, mtime, inode and ctime of every file of ``manifest``'s set in ``directory`` (just made live)."""
    out = {}
    for name in sorted(set_files(manifest)):
        st = os.lstat(directory / name)
        out[name] = _live_file(st)
    return out


def check_live(
    target: Path,
    recorded: tuple[str | None, dict[str, LiveFile]],
    expect_installed: bool,
    *,
    full: bool = False,
) -> LiveCheck:
    """Check the live set in ``target`` against its manifest and against ``recorded`` (the set
    directory and the size and mtime of each of its files as installed; compared only if that
    directory is the live one). ``expect_installed``: the state says a set was installed, so a
    missing one is damage, not a fresh node. ``full``: also compare every sha256."""
    out = LiveCheck()
    link = target / SETS / CURRENT
    try:
        st = os.lstat(link)
    except FileNotFoundError:
        if expect_installed:
            out.problems.append(f"{link}: missing (a set was installed; the target was removed?)")
        return out
    except NotADirectoryError:
        out.problems.append(f"{target / SETS}: not a directory")
        return out
    if not stat.S_ISLNK(st.st_mode):
        out.problems.append(f"{link}: is {_kind(st.st_mode)}, not mapsync's link to the live set")
        return out
    cur = LiveSet(target).current()
    if cur is None:
        out.problems.append(f"{link}: points at {os.readlink(link)!r}, which is not a set")
        return out
    out.directory = cur
    record = recorded[1] if recorded[0] == cur.name else {}
    out.record_used = bool(record)
    try:
        out.installed = read_installed(cur)
    except OSError as exc:
        out.problems.append(
            f"{cur / Path(str(exc.filename)).name}: cannot be read ({exc.strerror})"
        )
        return out
    try:
        out.manifest = out.installed.manifest
    except VerificationError as exc:
        out.problems.append(f"live manifest unreadable: {exc}")
        return out
    expected: dict[str, tuple[str, int, str | None]] = {}  # file → (map, size, sha256)
    for name, m in out.manifest.maps.items():
        expected[m.file] = (name, m.size, m.sha256)
        if m.cdb is not None:
            expected[m.cdb.file] = (name, m.cdb.size, m.cdb.sha256)
    serial = out.manifest.serial
    for file in sorted([*expected, MANIFEST, SIGNATURE]):
        path = cur / file
        what = f" (map {expected[file][0]}, serial {serial})" if file in expected else ""
        try:
            fst = os.lstat(path)
        except FileNotFoundError:
            out.problems.append(f"{target / file}: missing{what}")
            continue
        if not stat.S_ISREG(fst.st_mode):
            out.problems.append(f"{target / file}: is {_kind(fst.st_mode)}{what}")
            continue
        out.files[file] = _live_file(fst)
        if file in expected and fst.st_size != expected[file][1]:
            out.problems.append(
                f"{target / file}: {fst.st_size} bytes, the manifest says {expected[file][1]}{what}"
            )
            continue
        rec = record.get(file)
        now = out.files[file]
        if rec is not None and rec.differs(now):
            if rec.size != now.size:
                out.problems.append(
                    f"{target / file}: changed since it was installed (size or mtime){what}"
                )
                continue
            if file not in expected:  # MANIFEST, SIGNATURE: see recheck
                out.recheck = out.rerecord = True
                continue
            # The same size, but another mtime (`touch`, a backup tool restoring times), or
            # the same mtime with another inode or ctime (rewritten in place with its mtime
            # put back, the whole set copied with ``cp -a``): the hash tells; unchanged
            # content is no damage (verify agrees), and is recorded anew.
            if not full:
                digest, _ = text.sha256_file(path)
                if digest != expected[file][2]:
                    how = (
                        "a new mtime"
                        if rec.mtime_ns != now.mtime_ns
                        else "the same mtime, a new ctime"
                    )
                    out.problems.append(
                        f"{target / file}: rewritten since it was installed (the same size, "
                        f"{how}) and its sha256 differs from the manifest{what}"
                    )
                    continue
            out.rerecord = True
        if full and file in expected:
            digest, _ = text.sha256_file(path)
            if digest != expected[file][2]:
                out.problems.append(f"{target / file}: sha256 differs from the manifest{what}")
    with contextlib.suppress(OSError):
        # Never linked into TARGET (agent.liveset); a pull removes them (agent.repair).
        out.strays = strays(cur, out.manifest)
    out.problems += [
        f"{cur / name}: in the live set, but no file of its manifest" for name in out.strays
    ]
    for file in sorted(expected):
        # What the daemons open: the link in TARGET (pull re-creates a lost one at once).
        if file in out.files and not os.path.exists(target / file):
            out.problems.append(f"{target / file}: the link to the live set is missing")
    return out


def untrusted_signer(manifest: Manifest, trusted: Iterable[Path]) -> str | None:
    """Why the live ``manifest`` is no longer trusted, or None: the key it names as its signer
    (covered by the signature verified at install) is none of ``trusted`` — removed from
    ``trusted_keys`` after a rotation, or revoked as compromised, or a ``trusted_keys`` path
    that names no file or no ed25519 public key (a typo in the new key's path, an empty copy,
    the private key or an RSA key copied instead: the signer's key then is none that can be
    read either). Cheap (key ids, no signature), so ``status`` and every pull see it, not
    only the next full check. None when it cannot tell: a manifest naming no signer, or a key
    file this process may not read (a monitoring user; the pull that needs it says so)."""
    if manifest.signer is None:
        return None
    ids: list[str] = []
    missing: list[str] = []
    unreadable = False
    for path in trusted:
        try:
            ids.append(public_key_id(path))
        except MapsyncError as exc:
            if os.path.lexists(path) and not os.access(path, os.R_OK):
                unreadable = True
            else:  # gone, or read and no ed25519 public key: it holds no key either way
                missing.append(str(exc))
    if manifest.signer in ids or unreadable:
        return None
    if missing:
        return (
            f"serial {manifest.serial} is signed by key {manifest.signer}, which no trusted key "
            f"that exists holds ({'; '.join(missing)}); its maps keep serving, and no release "
            "is installed until trusted_keys names the key files as they are"
        )
    return (
        f"serial {manifest.serial} is signed by key {manifest.signer}, which trusted_keys no "
        "longer lists; its maps keep serving until a release signed with a trusted key "
        "replaces it"
    )

"""A map with password hashes is never readable by others, not even while it is written.

A reader who opens a file in the instant it is readable keeps the handle after any chmod,
so what matters is every state the file passes through. An audit hook (``sys.addaudithook``)
looks at the files in the directories being written at every audited call the build makes
(open, chmod, chown, utime, rename...) and records any file that already holds bytes while
its mode is not the final one. The umask is 0 throughout: nothing may rely on it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mapsync.agent.install import build_map
from mapsync.agent.kept import KeptReleases
from mapsync.agent.liveset import LiveSet
from mapsync.agent.owners import Ownership
from mapsync.config import AgentChannel
from mapsync.release import MANIFEST, SIGNATURE, Manifest, MapEntry

USERS = b"# mapsync\nann@example.org:{SHA512-CRYPT}$6$salt$hash:1000:1000::/var/vmail/ann::\n"

_watched: list[tuple[Path, int]] = []  # (directory, the mode its files must have once written)
_seen: list[str] = []
_busy = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    global _busy
    if not _watched or _busy:
        return
    _busy = True  # the hook's own scandir and stat are audited events too
    try:
        for directory, final in _watched:
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISREG(st.st_mode) and st.st_size and mode != final:
                    _seen.append(f"at {event}: {entry.path} holds bytes with mode {mode:04o}")
    finally:
        _busy = False


sys.addaudithook(_audit)  # cannot be removed: it does nothing while nothing is watched


@pytest.fixture
def watch() -> Iterator[list[tuple[Path, int]]]:
    """Directories to watch during the test, under umask 0; yields the list to append to."""
    old = os.umask(0)
    _seen.clear()
    try:
        yield _watched
    finally:
        _watched.clear()
        os.umask(old)


def _entry(data: bytes) -> MapEntry:
    digest = hashlib.sha256(data).hexdigest()
    return MapEntry("dovecot_users", 1, digest, len(data), digest)


def test_a_secret_map_is_built_with_its_final_mode_in_a_private_directory(
    tmp_path: Path, watch: list[tuple[Path, int]]
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "dovecot_users").write_bytes(USERS)
    ch = AgentChannel("store-1", "/nowhere", tmp_path / "target")
    built = LiveSet(ch.target).new_set_dir(1)
    watch.append((built, 0o640))
    build_map(
        staging, "dovecot_users", _entry(USERS), built, None, Ownership(0o640), ch, time.time()
    )
    assert _seen == []
    assert (built / "dovecot_users").read_bytes() == USERS
    assert stat.S_IMODE((built / "dovecot_users").stat().st_mode) == 0o640
    assert stat.S_IMODE(built.stat().st_mode) == 0o700  # opened to readers only at the swap


def test_a_kept_copy_is_readable_by_the_agent_only_from_its_first_byte(
    tmp_path: Path, watch: list[tuple[Path, int]]
) -> None:
    src = tmp_path / "verified"
    src.mkdir()
    (src / "dovecot_users").write_bytes(USERS)
    (src / MANIFEST).write_bytes(b"{}\n")
    (src / SIGNATURE).write_bytes(b"sig")
    manifest = Manifest("store-1", 7, None, "", "", "", {}, {"dovecot_users": _entry(USERS)})
    kept = KeptReleases(tmp_path / "releases")
    watch += [(kept.root / ".7.tmp", 0o600), (kept.path(7), 0o600)]
    kept.keep(src, manifest, keep=5, installed=7)
    assert _seen == []
    for name in ("dovecot_users", MANIFEST, SIGNATURE):
        assert stat.S_IMODE(kept.path(7).joinpath(name).stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.path(7).stat().st_mode) == 0o700

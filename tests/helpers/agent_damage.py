"""Helpers for the tests of a damaged node: lookups through real postmap that show what
Postfix says, damage to a live file, a full disk (the node's state and a changed
database: :mod:`tests.helpers.agent`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import Cluster
from tests.helpers.agent import read_state, state_file


def lookup(cluster: Cluster, key: str, map_name: str = "recipients") -> tuple[int, str]:
    """``postmap -q KEY cdb:TARGET/MAP`` as Postfix would: (exit code, stdout + stderr)."""
    p = subprocess.run(
        ["postmap", "-q", key, f"cdb:{cluster.target / map_name}"],
        capture_output=True,
        text=True,
    )
    return p.returncode, (p.stdout + p.stderr).strip()


def live_file(cluster: Cluster, name: str) -> Path:
    """The file of the live set behind ``TARGET/name`` (not the link)."""
    return cluster.target / ".mapsync" / os.readlink(cluster.target / ".mapsync" / "current") / name


def forget_live_record(cluster: Cluster) -> None:
    """Drop the record of the live files from the state, as a mapsync that kept none left it:
    only a full check can then find damage that keeps size and mtime."""
    data = read_state(cluster)
    data["live_files"] = {}
    state_file(cluster).write_text(json.dumps(data))


def flip_byte_keep_stat(path: Path) -> None:
    """Change one byte of ``path`` in place and put its mtime back: damage a size and mtime
    check cannot see (bit rot, or an edit that restored the mtime); its ctime changes."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(path, "r+b") as fh:
        fh.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass

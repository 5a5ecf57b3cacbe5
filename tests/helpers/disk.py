"""A full disk, for real: a small tmpfs mounted on a directory (root with mount permission;
the test is skipped when not root, a failure as root, where the mount must work), and a file that fills it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs_mounts() -> Iterator[Callable[[Path, str], None]]:
    """A function that mounts a small tmpfs of a size on a directory (needs root and mount
    permission; the test is skipped otherwise); each is unmounted on leaving."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            why = f"cannot mount a tmpfs here ({p.stderr.strip()})"
            if os.geteuid() == 0:  # scripts/test and CI run as root: a real failure there
                pytest.fail(f"{why}: the full-disk tests need it")
            pytest.skip(f"{why}: full-disk test not run")
        mounted.append(path)

    try:
        yield mount
    finally:
        for path in mounted:
            if subprocess.run(["umount", str(path)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> int:
    """Write ``path`` until its file system is full; return the bytes written."""
    chunk = b"\0" * 4096
    written = 0
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                written += fh.write(chunk)
        except OSError:
            pass
    return written

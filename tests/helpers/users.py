"""Running mapsync as an unprivileged user, as a deployment does (the publisher as
``mapsync``, monitoring as ``nagios``). The tests run as root; ``nobody`` stands in.

The test virtualenv's interpreter lives under /root (mode 0700 on this machine), so another
user runs the system Python 3 of the same minor version with the virtualenv's packages and
this checkout on its path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

USER = "nobody"
SYSTEM_PYTHON = "/usr/bin/python3"
CHECKOUT = Path(__file__).resolve().parents[2]


def uid(user: str = USER) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def chown(path: Path, user: str = USER, recursive: bool = True) -> None:
    import pwd

    pw = pwd.getpwnam(user)
    paths = [path, *path.rglob("*")] if recursive and path.is_dir() else [path]
    for p in paths:
        os.lchown(p, pw.pw_uid, pw.pw_gid)


@contextmanager
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="mapsync-users-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_as(user: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``mapsync --config CONFIG ARGS`` as ``user`` (runuser, no shell, a clean HOME)."""
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.fail(f"{SYSTEM_PYTHON} is Python {version}, the test virtualenv's is not")
    path = os.pathsep.join([sysconfig.get_paths()["purelib"], str(CHECKOUT)])
    return subprocess.run(
        [
            "runuser",
            "-u",
            user,
            "--",
            "env",
            "-i",
            f"PYTHONPATH={path}",
            "HOME=/",
            "PATH=/usr/bin:/bin",
            SYSTEM_PYTHON,
            "-m",
            "mapsync",
            "--config",
            str(config),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

"""How the real rsync is run (through mapsync.process): what it prints is read back only up to
a limit, and a missing rsync is a TransportError that says how to install it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapsync.errors import TransportError
from mapsync.transport import rsync
from mapsync.transport.rsync import Remote


def _release(tmp_path: Path, files: int) -> Path:
    release = tmp_path / "repo" / "releases" / "1"
    release.mkdir(parents=True)
    for i in range(files):
        (release / f"map{i:03d}").write_text("x\n")
    return tmp_path / "repo"


def test_a_listing_is_read_back_whole(tmp_path: Path) -> None:
    remote = Remote(str(_release(tmp_path, 40)), timeout=10)
    listing = remote.list_dir("releases/1")
    assert sorted(listing) == [f"map{i:03d}" for i in range(40)]
    assert listing["map000"] == ("-", 2)


def test_a_listing_larger_than_the_limit_is_refused_not_read_into_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = Remote(str(_release(tmp_path, 40)), timeout=10)
    monkeypatch.setattr(rsync, "OUTPUT_LIMIT", 1000)  # 40 lines of listing are ~2,400 bytes
    with pytest.raises(TransportError, match=r"^rsync printed more than 1000 bytes: rsync "):
        remote.list_dir("releases/1")


def test_without_rsync_the_error_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = Remote(str(_release(tmp_path, 1)), timeout=10)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(TransportError, match=r"^rsync is not installed \(apt-get install rsync\)$"):
        remote.fetch_file("LATEST", tmp_path / "LATEST")

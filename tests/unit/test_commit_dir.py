"""The one directory commit (a published release, an agent's kept release, its live set):
every file is on disk before the directory appears under its final name, and the rename is
on disk before the caller goes on (LATEST, the ``current`` link)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mapsync.atomic import commit_dir


def _staged(parent: Path) -> Path:
    staging = parent / ".staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "recipients").write_text("a@example.org OK\n")
    (staging / "MANIFEST.json").write_text("{}\n")
    (staging / "sub" / "nested").write_bytes(b"x" * 10)
    os.symlink("recipients", staging / "link")  # not followed, not fsynced twice
    return staging


def test_the_directory_appears_whole_under_its_final_name(tmp_path: Path) -> None:
    staging = _staged(tmp_path)
    final = tmp_path / "releases" / "7"
    final.parent.mkdir()
    commit_dir(staging, final)
    assert not staging.exists()
    assert sorted(p.name for p in final.rglob("*")) == [
        "MANIFEST.json",
        "link",
        "nested",
        "recipients",
        "sub",
    ]
    assert (final / "recipients").read_text() == "a@example.org OK\n"
    assert (final / "sub" / "nested").read_bytes() == b"x" * 10


def test_every_file_is_fsynced_before_the_rename_and_the_parent_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Watched through the real calls: which inode each fsync reached, and when the rename
    came. A commit that renamed before its files were durable could publish empty files after
    a power loss."""
    staging = _staged(tmp_path)
    parent = tmp_path / "releases"
    parent.mkdir()
    inodes = {os.stat(p).st_ino: p.name for p in [staging, *staging.rglob("*"), parent]}
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(inodes[os.fstat(fd).st_ino])
        real_fsync(fd)

    def rename(src: Path, dst: Path) -> None:
        events.append("RENAME")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    commit_dir(staging, parent / "7")
    before, after = events[: events.index("RENAME")], events[events.index("RENAME") + 1 :]
    assert sorted(before) == [".staging", "MANIFEST.json", "nested", "recipients", "sub"]
    assert before[-1] == ".staging"  # the directory after its files
    assert before.index("nested") < before.index("sub")
    assert after == ["releases"]


def test_a_commit_that_cannot_rename_leaves_the_staging_directory_for_the_caller(
    tmp_path: Path,
) -> None:
    staging = _staged(tmp_path)
    final = tmp_path / "releases" / "7"
    final.mkdir(parents=True)
    (final / "other").write_text("a release already here\n")
    with pytest.raises(OSError, match="not empty"):
        commit_dir(staging, final)
    assert (staging / "recipients").read_text() == "a@example.org OK\n"
    assert [p.name for p in final.iterdir()] == ["other"]

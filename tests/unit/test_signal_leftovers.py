"""SIGTERM/SIGHUP at the wrong instant leaves nothing half done: every tree mapsync removes
(a staging directory, an old release, a half-built live set) goes whole, and an atomic write's
temporary file never outlives it; the signal is handled once that is so."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mapsync import signals
from mapsync.atomic import atomic_write, remove_tree


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    signals.install()
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _tree(root: Path) -> Path:
    for d in ("a", "b/c"):
        (root / "tree" / d).mkdir(parents=True)
        for i in range(20):
            (root / "tree" / d / f"f{i}").write_bytes(b"x")
    (root / "tree" / "MANIFEST.json.sig").write_bytes(b"sig")
    return root / "tree"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_the_removal_is_handled_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers: None, sig: int
) -> None:
    tree = _tree(tmp_path)
    real = os.unlink
    sent: list[str] = []

    def unlink(path: Any, *args: Any, **kw: Any) -> None:
        if not sent:  # the signal arrives as the first file goes
            sent.append(str(path))
            os.kill(os.getpid(), sig)
        real(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(SystemExit) as exc:
        remove_tree(tree)
    assert sent  # the signal came while files were being removed
    assert exc.value.code == 128 + sig
    assert not tree.exists()  # all of it, the signal notwithstanding


def test_errors_are_raised_or_ignored_as_asked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        remove_tree(tmp_path / "missing")
    remove_tree(tmp_path / "missing", ignore_errors=True)
    tree = _tree(tmp_path)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree(tree.name, dir_fd=fd)
    finally:
        os.close(fd)
    assert not tree.exists()


def test_a_signal_as_an_atomic_writes_temporary_file_is_made_leaves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers: None
) -> None:
    real = tempfile.mkstemp

    def mkstemp(*args: Any, **kw: Any) -> tuple[int, str]:
        made = real(*args, **kw)
        os.kill(os.getpid(), signal.SIGTERM)  # lands as mkstemp returns
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    (tmp_path / "LATEST").write_bytes(b"old")
    with pytest.raises(SystemExit) as exc:
        atomic_write(tmp_path / "LATEST", b"new")
    assert exc.value.code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST"]
    assert (tmp_path / "LATEST").read_bytes() == b"old"

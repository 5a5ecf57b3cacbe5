"""SIGTERM/SIGHUP (and ^C) at the wrong instant leave nothing half done: every tree mapsync
removes (a staging directory, an old release, a half-built live set) goes whole, an atomic
write's temporary file and a scratch directory never outlive their step; the signal is handled
once that is so, and the handlers stay in place for the next."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mapsync import signals
from mapsync.atomic import atomic_write, remove_tree, scratch_dir


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
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


def test_a_signal_as_a_scratch_directory_is_made_leaves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers: None
) -> None:
    real = tempfile.mkdtemp

    def mkdtemp(*args: Any, **kw: Any) -> str:
        made = real(*args, **kw)
        os.kill(os.getpid(), signal.SIGHUP)
        return made

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(SystemExit) as exc, scratch_dir(tmp_path, ".check-"):
        pytest.fail("the block must not run: the signal ends the step first")
    assert exc.value.code == 129
    assert list(tmp_path.iterdir()) == []


def test_held_signals_wait_for_the_outermost_block_and_the_first_is_handled(
    handlers: None,
) -> None:
    ran = []
    with pytest.raises(SystemExit) as exc:
        with signals.held():
            os.kill(os.getpid(), signal.SIGTERM)
            with signals.held():
                os.kill(os.getpid(), signal.SIGINT)
                ran.append("inner")
            ran.append("outer")  # the inner block's end handles nothing
        ran.append("after")
    assert ran == ["inner", "outer"]
    assert exc.value.code == 143
    # No handler was swapped to hold them: the next signal is handled at once, as before.
    assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGHUP)
    with pytest.raises(SystemExit) as again:
        os.kill(os.getpid(), signal.SIGHUP)
        ran.append("not reached")
    assert again.value.code == 129
    with pytest.raises(KeyboardInterrupt), signals.held():
        os.kill(os.getpid(), signal.SIGINT)  # ^C waits too, and stays KeyboardInterrupt
        ran.append("held ^C")
    assert ran[-1] == "held ^C"

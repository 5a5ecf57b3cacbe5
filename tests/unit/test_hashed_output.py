"""HashedOutput: a file written from new bytes and ranges of another file (copied in the
kernel where it can), hashed as it goes; the same bytes whichever way they travel."""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path

import pytest

from mapsync.atomic import HashedOutput, SourceChanged

REAL_COPY = os.copy_file_range


def _write(out: HashedOutput, src: Path, fd: int) -> bytes:
    """A mix of new bytes and adjacent and separate ranges of ``src``; what it must give."""
    data = src.read_bytes()
    want = b""
    for new, (start, end) in [(b"head\n", (0, 10)), (b"", (10, 25)), (b"mid\n", (40, 100))]:
        out.write(new)
        out.copy(fd, start, data[start:end])
        want += new + data[start:end]
    out.write(b"tail\n" * 3)
    return want + b"tail\n" * 3


@pytest.mark.parametrize("copy", ["kernel", "refused", "short"])
def test_file_and_memory_outputs_are_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy: str
) -> None:
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 2)
    if copy == "refused":  # a file system or kernel without it: written from the process

        def refuse(*args: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    elif copy == "short":  # the kernel may copy less than asked: the rest follows
        monkeypatch.setattr(os, "copy_file_range", lambda s, d, n, o: REAL_COPY(s, d, min(n, 7), o))
    with open(src, "rb") as fin:
        memory = io.BytesIO()
        in_memory = HashedOutput(memory)
        want = _write(in_memory, src, fin.fileno())
        assert in_memory.finish() == (hashlib.sha256(want).hexdigest(), len(want))
        assert memory.getvalue() == want
        with open(tmp_path / "out", "wb") as fh:
            fh.write(b"the caller's own bytes\n")  # buffered: written first, not lost
            to_file = HashedOutput(fh)
            _write(to_file, src, fin.fileno())
            assert to_file.finish() == (hashlib.sha256(want).hexdigest(), len(want))
    assert (tmp_path / "out").read_bytes() == b"the caller's own bytes\n" + want


@pytest.mark.parametrize(
    "change", ["written after its first copy", "written after it was read", "cut short"]
)
def test_a_source_changed_while_copied_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """What was copied may no longer be what was hashed: finish() raises SourceChanged (a
    caller's fallback, never a bare OSError), from the moment the source was watched (before
    the caller read it), whichever way the copy goes."""
    if change == "cut short":
        monkeypatch.setattr(os, "copy_file_range", lambda *a: 0)  # as at the end of a file
    src = tmp_path / "src"
    src.write_bytes(b"a" * 100)
    with open(src, "rb") as fin, open(tmp_path / "out", "wb") as fh:
        out = HashedOutput(fh)
        out.watch(fin.fileno())
        data = os.pread(fin.fileno(), 50, 0)
        if change == "written after its first copy":
            out.copy(fin.fileno(), 0, data)
            data = os.pread(fin.fileno(), 50, 50)
        if change == "cut short":
            os.truncate(src, 10)
        else:
            with open(src, "r+b") as other:
                other.write(b"b" * 100)  # the same size
        out.copy(fin.fileno(), 50 if change == "written after its first copy" else 0, data)
        with pytest.raises(SourceChanged):
            out.finish()

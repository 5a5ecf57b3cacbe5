"""What the run notes of long-lived commands share: ``REPO/.publisher.json``
(:mod:`mapsync.publish.runlog`) and ``DEST/.mirror.json`` (:mod:`mapsync.mirrorlog`), each
rewritten by every run so that ``mapsync status`` can tell a run that keeps failing.

Kept free of heavy imports (no SQLAlchemy, no cryptography): monitoring reads the notes every
minute. Neither the publisher's nor the mirror's: both stand on it.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

from mapsync.atomic import atomic_write
from mapsync.errors import described
from mapsync.release import parse_iso

# How far in the future a recorded time may lie before status calls it a problem (on a
# node, a publisher and a mirror alike): clocks are never exactly in step.
CLOCK_SKEW = 60


def in_future(when: datetime, now: datetime) -> bool:
    """Whether ``when`` lies further after ``now`` than clocks out of step explain."""
    return (when - now).total_seconds() > CLOCK_SKEW


def first_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters: its lines joined, so a message
    whose first line only introduces the rest (a guard's refusal) still names what and where."""
    line = " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# A note names each channel once: far less than this. A larger file is not one.
MAX_NOTE_BYTES = 4 << 20


def read_small(path: Path, limit: int, *, follow: bool = True) -> bytes | None:
    """``path``'s bytes, at most ``limit`` + 1 (a caller refuses more); None when it is not a
    regular file. Never waits: a FIFO there would hang every status that monitoring starts.
    ``follow=False``: a symlink is refused (OSError), not read through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(limit + 1)
    finally:
        os.close(fd)


def read_note(path: Path) -> dict[str, object]:
    """The note at ``path``; empty when there is none, or it is not a JSON object, or not a
    regular file, or larger than :data:`MAX_NOTE_BYTES` (damaged: the next run writes a good
    one)."""
    try:
        raw = read_small(path, MAX_NOTE_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    if raw is None or len(raw) > MAX_NOTE_BYTES:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def write_note(path: Path, note: dict[str, object], what: str, logger: Any) -> None:
    """Replace the note at ``path`` atomically. Never fails the run it records: a note that
    cannot be written is a warning in ``logger``'s log (``what``: the run, in its words)."""
    try:
        atomic_write(path, (json.dumps(note, sort_keys=True) + "\n").encode())
    except OSError as exc:
        logger.warning(f"could not record {what}", path=str(path), error=described(exc))


def stamp(note: dict[str, object], key: str) -> datetime | None:
    """The time recorded under ``key`` (None: none, or not one :func:`iso` wrote)."""
    value = note.get(key)
    if not isinstance(value, str):
        return None
    try:
        return parse_iso(value)
    except ValueError:
        return None


def span(seconds: int) -> str:
    """``3d``, ``5h``, ``12m``, ``40s``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def ago(then: datetime | None, now: datetime) -> str:
    """``"5m ago"``, ``"never"``, or ``"5m in the future"``: never a negative age, nor a time
    to come shown as "0s ago"."""
    if then is None:
        return "never"
    seconds = int((now - then).total_seconds())
    return f"{span(-seconds)} in the future" if seconds < 0 else f"{span(seconds)} ago"

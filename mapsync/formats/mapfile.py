"""Writing one map: checked ``key SEP value`` lines, written as the text map and, beside it,
built as a cdb from the same bytes.

The checks here are the publisher's last line of defence behind ``validate.check``: no line
may parse back as another key (or as none), no key may appear twice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import islice, repeat
from operator import eq, itemgetter
from pathlib import Path
from typing import Any

from mapsync.errors import InvalidData
from mapsync.formats import cdb, text
from mapsync.progress import track

BAD_KEY = re.compile(r"[\s,\0]|^#|^$")
BAD_VALUE = re.compile(r"[\r\n\0]")
BAD_PASSWD_KEY = re.compile(r"[\s,\0:]|^#|^$")  # a passwd-file user name also ends at ':'


@dataclass(frozen=True)
class CdbFile:
    """The cdb built beside a text map: its file name, sha256 and size."""

    file: str
    sha256: str
    size: int
    # The cdb's bytes where the caller keeps them (the long-running publisher: changed in
    # place for its next release); the sha256 is theirs.
    data: memoryview | None = field(default=None, repr=False, compare=False)


def lines(entries: Iterable[tuple[str, str]], map_name: str, sep: str = " ") -> Iterator[str]:
    """The text-map line of each (key, value), checked row by row: :class:`InvalidData`
    naming the first key that is a duplicate of the one before or would not parse back."""
    previous = None
    bad_key, bad_value = BAD_KEY.search, BAD_VALUE.search
    if sep == ":":  # a passwd-file: the user name is the first field
        bad_key = BAD_PASSWD_KEY.search
    for key, value in entries:
        if key == previous:
            raise InvalidData([f"map {map_name}: duplicate key {key!r}"])
        # Belt and braces behind validate.check: no line may parse as another key.
        if bad_key(key):
            raise InvalidData([f"map {map_name}: key {key!r} would not parse back as one key"])
        if bad_value(value):
            raise InvalidData([f"map {map_name}: value of {key!r} contains a line break or NUL"])
        previous = key
        yield f"{key}{sep}{value}\n"


BLOCK = 8192  # rows joined, checked and encoded at a time: C-speed loops, bounded memory
_key = itemgetter(0)
# What [\s,\0] of BAD_KEY matches but "\n" (counted apart): re's \s is str.isspace, these
# 29 characters (tests/unit/test_render_blocks.py checks the list against re).
KEY_BREAKERS = (
    " \t\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000,\0"
)


def blocks(
    rows: Iterable[tuple[str, str]], map_name: str, sep: str = " ", size: int = BLOCK
) -> Iterator[tuple[list[tuple[str, str]], str]]:
    """``rows`` (sorted) in blocks of ``size``, each with its text: the :func:`lines` of the
    block, joined.

    The same refusals as :func:`lines`, checked a block at a time at C speed: the keys joined
    by newlines and searched for each character ``BAD_KEY`` refuses, adjacent keys compared
    by ``map``, the block's text counted for line breaks. Only a block where a check fires
    goes through :func:`lines` row by row, which raises with its message naming the first
    offending key (per-line checks cost as much as everything else of rendering a map).
    """
    breakers = KEY_BREAKERS + (":" if sep == ":" else "")
    join = sep.join
    it = iter(rows)
    last: tuple[str, str] | None = None
    while block := list(islice(it, size)):
        keys = list(map(_key, block))
        joined = "\n".join(keys)
        body = "\n".join(map(join, block)) + "\n"
        if (
            body.count("\n") != len(block)  # a line break in a key or a value
            or "\r" in body
            or "\0" in body
            or not all(keys)  # an empty key
            or joined.startswith("#")
            or "\n#" in joined
            or any(c in joined for c in breakers)
            or (last is not None and last[0] == keys[0])
            or any(map(eq, keys, keys[1:]))  # sorted: a duplicate is its neighbour
        ):
            for _ in lines([last, *block] if last else block, map_name, sep):
                pass  # raises InvalidData for the first offending row
        last = block[-1]
        yield block, body


def key_blocks(
    keys: Iterable[str], value: str, map_name: str, sep: str = " ", size: int = BLOCK
) -> Iterator[tuple[list[str], str]]:
    """:func:`blocks` of a map whose every value is ``value``, from its (sorted) keys alone:
    the same text, the same refusals (a refused block goes through :func:`lines` as pairs)."""
    breakers = KEY_BREAKERS + (":" if sep == ":" else "")
    tail = f"{sep}{value}\n"
    bad_value = any(c in value for c in "\r\n\0")
    it = iter(keys)
    last: str | None = None
    while block := list(islice(it, size)):
        joined = "\n".join(block)
        if (
            bad_value
            or "\r" in joined
            or "\0" in joined
            or joined.count("\n") != len(block) - 1  # a line break in a key
            or not all(block)  # an empty key
            or joined.startswith("#")
            or "\n#" in joined
            or any(c in joined for c in breakers)
            or (last is not None and last == block[0])
            or any(map(eq, block, block[1:]))  # sorted: a duplicate is its neighbour
        ):
            rows = zip([last, *block] if last is not None else block, repeat(value))
            for _ in lines(rows, map_name, sep):
                pass  # raises InvalidData for the first offending row
        last = block[-1]
        yield block, tail.join(block) + tail


def write_map(
    entries: Iterable[tuple[str, str]] | Iterable[str],
    path: Path,
    head: str,
    sep: str = " ",
    cdb_stage: str | None = None,
    value: str | None = None,
    keep_cdb: Path | None = None,
) -> tuple[text.TextInfo, CdbFile | None]:
    """Sort ``entries``, write them as the text map ``path`` after ``head`` and, given
    ``cdb_stage`` (its progress stage), build the cdb beside it to record its hash (the file
    itself is removed: agents build their own); refuse as :func:`lines` does. Given
    ``value``, ``entries`` are the keys alone and every value is ``value`` (a map of one
    value holds no pair per row: at 1.6M keys, 90 MB less, and a plain sort of strings).
    ``keep_cdb``: a directory the cdb is moved to as ``<sha256>.cdb`` instead of removed, its
    bytes returned as well (:attr:`CdbFile.data`: the long-running publisher changes them in
    place for the next release, formats.cdbpatch).

    One pass over the sorted rows, a block at a time (:func:`blocks`), writes the text and
    feeds the cdb the same bytes: each block is joined and encoded once, for both files.
    """
    rows: list[Any] = list(entries)
    if value is None:
        # By key alone: half the time of comparing whole pairs, and the same order whenever
        # the keys are unique, which is all that may be published.
        rows.sort(key=_key)
    else:
        rows.sort()
    map_name = path.name
    cdb_file = None
    with open(path, "wb") as fh, ExitStack() as stack:
        writer = text.Writer(fh, head)
        maker = None
        if cdb_stage is not None:
            maker = stack.enter_context(cdb.Maker(path.with_name(f"{map_name}.cdb")))
        feed = track(rows, cdb_stage, len(rows)) if cdb_stage is not None else rows
        bsep = sep.encode()
        made = (
            blocks(feed, map_name, sep) if value is None else key_blocks(feed, value, map_name, sep)
        )
        try:
            for block, body in made:
                data = body.encode()
                writer.add(data, len(block))
                if maker is not None:
                    maker.add_lines(data, bsep)
        except InvalidData:
            # Refused. The pairs of a duplicated key are still in the order the map made
            # them: name the first offending row as the pairs sorted whole do.
            pairs = rows if value is None else list(zip(rows, repeat(value)))
            pairs.sort()
            for _ in lines(pairs, map_name, sep):
                pass
            raise
        if maker is not None:
            held = None
            if keep_cdb is not None:
                digest, held = maker.commit_held()
                size = len(held)
                os.replace(maker.path, keep_cdb / f"{digest}.cdb")
            else:
                digest, size = maker.commit()
                maker.path.unlink()  # agents build their own and prove it equal by this hash
            cdb_file = CdbFile(maker.path.name, digest, size, held)
    return writer.info(), cdb_file

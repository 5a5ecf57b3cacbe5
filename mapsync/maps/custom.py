"""Maps of the operator's own: ``[publisher.maps.NAME] query = "SELECT key, value FROM ..."``.

The source runs each map's query (in the snapshot's transaction, or in a read-only transaction
of the map's own ``database``) and hands over the rows as read; :func:`check_rows` turns them
into entries, or into problems naming ``[publisher.maps.NAME]``, the row and the key. The
same guarantees as the built-in maps: no row can put a second line, a second key or a comment
into the map, and no two rows can give one key two values.

Per row, the key and the value must be text (a string, an integer, or UTF-8 bytes), not NULL,
not empty, without a line break, CR, NUL or other control character (a tab is allowed in a
value). The key has no whitespace (a text line ends the key
at the separator), no comma, no leading ``#``, and not the separator itself; with
``keys = "lower"`` its case is folded first, as Postfix folds every key (to lowercase, and
``ß`` to ``ss``: full Unicode case folding), so two rows differing only in case are a
duplicate. The value may hold spaces, but neither starts nor
ends with whitespace: ``postmap`` drops it, so the text and the cdb would disagree. A line is
at most :data:`MAX_LINE` bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from mapsync.config import MapConfig, PublisherChannel
from mapsync.maps.base import Map
from mapsync.maps.directory import Directory
from mapsync.validate import Problem

MAX_LINE = 4096  # bytes of one ``key SEP value`` line: more is a query gone wrong
# C0 and C1 control characters but the tab, DEL, and Unicode's line and paragraph separators:
# no reader splits a line at them, but an ESC sequence in a value reached the operator's
# terminal through `mapsync diff --keys` (and a client through a reply text).
_CONTROL = re.compile("[\x01-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def table(name: str) -> str:
    """What a problem in map ``name``'s rows names as its table (and what the map reads)."""
    return f"[publisher.maps.{name}]"


class CustomMap(Map):
    """One ``[publisher.maps.NAME]``: its entries are the checked rows of its query."""

    def __init__(self, config: MapConfig) -> None:
        self.config = config
        self.spec = config.spec
        self.reads = frozenset({table(config.name)})
        self.description = config.description or "a map of your own ([publisher.maps])"

    def entries(self, directory: Directory, channel: PublisherChannel) -> Iterable[tuple[str, str]]:
        return directory.snapshot.map_entries.get(self.name, [])


def catalogue(own: dict[str, MapConfig]) -> dict[str, Map]:
    """The built-in catalogue and the maps of ``own`` (``[publisher.maps]``), by name."""
    from mapsync.maps import CATALOGUE

    return {**CATALOGUE, **{name: CustomMap(spec) for name, spec in own.items()}}


def _text(value: Any, what: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, why it is refused) for one column of a row."""
    if value is None:
        return None, f"{what} is NULL"
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, f"{what} is not valid UTF-8"
    elif isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    elif not isinstance(value, str):
        return None, f"{what} is {type(value).__name__}, not text (cast it in the query)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None, f"{what} is not valid UTF-8"
    if not value:
        return None, f"{what} is empty"
    if "\n" in value or "\r" in value:
        return None, f"{what} contains a line break (it would start another line of the map)"
    if "\0" in value:
        return None, f"{what} contains a NUL byte"
    bad = _CONTROL.search(value)
    if bad is not None:
        return None, (
            f"{what} contains the control character U+{ord(bad.group()):04X} (a terminal showing "
            "`mapsync diff --keys`, or a client reading the reply, would act on it)"
        )
    return value, None


def _key_problem(key: str, sep: str) -> str | None:
    if any(c.isspace() for c in key):
        return "key contains whitespace (a map line ends its key at the first space)"
    if sep in key:
        return f"key contains the separator {sep!r} (it would split into another key)"
    if "," in key:
        return "key contains a comma"
    if key.startswith("#"):
        return "key starts with '#' (every reader takes the line for a comment)"
    return None


def check_rows(
    spec: MapConfig, rows: Sequence[Sequence[Any]]
) -> tuple[list[tuple[str, str]], list[Problem]]:
    """The entries of map ``spec`` from its query's ``rows`` (key, value), and the problems of
    the rows left out: every refused row, and every row of a key given more than once (which
    value is right cannot be told, so none is published)."""
    where = table(spec.name)
    sep = spec.separator
    good: dict[str, tuple[int, str, str]] = {}  # key → (row, key as read, value)
    problems: list[Problem] = []
    seen: dict[str, list[tuple[int, str]]] = {}  # key → every (row, key as read) giving it

    def refuse(n: int, shown: str, reason: str) -> None:
        problems.append(Problem(where, n, shown, reason, where=f"{where} row {n} key {shown!r}"))

    for n, row in enumerate(rows, 1):
        raw_key, raw_value = row[0], row[1]
        read, why = _text(raw_key, "key")
        shown = read if read is not None else str(raw_key)
        if why is None:
            assert read is not None
            why = _key_problem(read, sep)
        value, bad_value = _text(raw_value, "value")
        why = why or bad_value
        if why is None:
            assert read is not None and value is not None
            if value != value.strip():
                why = (
                    "value starts or ends with whitespace (postmap drops it, so the text and "
                    "the cdb would differ; trim it in the query)"
                )
            elif len(read.encode()) + len(sep) + len(value.encode()) > MAX_LINE:
                why = f"the line would be longer than {MAX_LINE} bytes"
        if why is not None:
            refuse(n, shown, why)
            continue
        assert read is not None and value is not None
        key = read.casefold() if spec.keys == "lower" else read
        seen.setdefault(key, []).append((n, read))
        good[key] = (n, read, value)
    entries = []
    for key, (_, _, value) in good.items():
        rows_of = seen[key]
        if len(rows_of) == 1:
            entries.append((key, value))
            continue
        for n, read in rows_of:
            others = ", ".join(f"row {m} key {k!r}" for m, k in rows_of if m != n)
            folded = " once lowercased" if any(k != key for _, k in rows_of) else ""
            refuse(n, read, f"duplicate key {key!r}{folded}: also {others}")
    problems.sort(key=lambda p: p.row)
    return entries, problems

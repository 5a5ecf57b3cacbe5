"""What every ``status`` shares: the Nagios levels, and the Prometheus text format
(node_exporter's textfile collector) that the node's, the publisher's and the mirror's
``status --prometheus`` write, and its writing."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from mapsync.atomic import atomic_write
from mapsync.errors import EXIT_ERROR, EXIT_OK, EXIT_UNKNOWN, EXIT_WARNING, MapsyncError

LEVELS = {EXIT_OK: "OK", EXIT_WARNING: "WARNING", EXIT_ERROR: "CRITICAL", EXIT_UNKNOWN: "UNKNOWN"}


def exposition(metrics: Iterable[tuple[str, str]], samples: Mapping[str, list[str]]) -> str:
    """The text format: HELP and TYPE (gauge) of each metric (name, help), then its samples
    (each the label set and value that follow the name)."""
    lines = []
    for name, help_text in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f"{name}{sample}" for sample in samples.get(name, [])]
    return "\n".join(lines) + "\n"


def label(name: str, value: str) -> str:
    """``name="value"``, the value escaped as the text format wants (a backslash, a double
    quote, a line break): a path is the operator's, and may hold any of them."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{name}="{escaped}"'


class MetricsNotWritten(MapsyncError):
    """``status --prometheus PATH`` could not (or would not) write PATH."""


def write_textfile(path: Path, metrics: str) -> None:
    """Write ``metrics`` to ``path`` atomically, 0644. Only ever replaces a regular file (or
    creates one): a device node, a symlink, a directory or a FIFO there is refused, not
    replaced — the path may be mistyped, or point at something that is not ours."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise MetricsNotWritten(
                f"--prometheus {path}: directory {path.parent} does not exist"
            ) from None
    except OSError as exc:
        raise MetricsNotWritten(f"--prometheus {path}: {exc.strerror}") from None
    else:
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a symlink"
                if stat.S_ISLNK(st.st_mode)
                else "a directory"
                if stat.S_ISDIR(st.st_mode)
                else "a device, FIFO or socket"
            )
            raise MetricsNotWritten(
                f"--prometheus {path}: is {kind}, not a regular file; only a regular file is "
                "replaced (name the textfile collector's .prom file)"
            )
    try:
        atomic_write(path, metrics.encode(), mode=0o644)
    except OSError as exc:
        raise MetricsNotWritten(f"--prometheus {path}: {exc.strerror or exc}") from None

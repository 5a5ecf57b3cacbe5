"""Where releases come from or go: a channel ``source`` (or mirror) or a ``push`` destination.

A location is a local path, ``file://PATH``, ``rsync://[USER@]HOST[:PORT]/MODULE/...`` or
``ssh://[USER@]HOST[:PORT]/PATH``. The config writes each in one spelling (:func:`normal`);
whatever then asks what a location names (the config's checks, the transport) asks
:func:`parse`, which splits each one once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

# ``scheme://``: a URL, not a relative path (which may contain a ':').
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
DEFAULT_PORTS = {"rsync": 873, "ssh": 22}


@dataclass(frozen=True)
class Location:
    """A location split into its parts, as :func:`urllib.parse.urlsplit` reads them.

    ``invalid``: why the URL does not parse (an unclosed ``[IPv6``, a port out of range);
    the transport refuses it, naming it. ``split``: whether the parts are known at all (a
    bad port leaves them known, without a port)."""

    text: str
    scheme: str = ""  # "" for a path
    username: str | None = None  # as written, %-escaped
    hostname: str | None = None  # lower case, without the brackets of an IPv6 literal
    port: int | None = None
    path: str = ""
    invalid: str | None = None
    split: bool = True

    @property
    def local(self) -> Path | None:
        """The directory a path or ``file://`` location names on this machine; None: remote."""
        if self.text.startswith("file://"):
            return Path(self.text[len("file://") :])
        return None if URL.match(self.text) else Path(self.text)

    @property
    def place(self) -> tuple[str, str]:
        """(host, path) of a remote location, the host as the network sees it: case folded,
        with its default port, without the user (``ssh://a@H.example:22/x`` and
        ``ssh://h.example/x`` are one place)."""
        if not self.split:
            return self.text, ""
        port = self.port or (None if self.invalid else DEFAULT_PORTS.get(self.scheme))
        return f"{self.scheme}://{(self.hostname or '').lower()}:{port}", self.path.lstrip("/")


@lru_cache(maxsize=1024)
def parse(text: str) -> Location:
    """``text`` split into a :class:`Location` (once: the result is kept)."""
    if text.startswith("/"):
        return Location(text, path=text)
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # "Invalid IPv6 URL"
        return Location(text, invalid=str(exc), split=False)
    try:
        port, invalid = parts.port, None
    except ValueError as exc:  # "Port out of range 0-65535", "Port could not be cast ..."
        port, invalid = None, str(exc)
    return Location(
        text, parts.scheme, parts.username, parts.hostname, port, parts.path, invalid=invalid
    )


def normal(url: str) -> str:
    """One spelling per location: ``rsync://h/m/mx/./`` → ``rsync://h/m/mx``. Only the path
    is touched (empty and ``.`` segments); the host part, with any ``[IPv6]``, is kept as written."""
    scheme, rest = url.split("://", 1)
    host, slash, path = rest.partition("/")
    if not slash:
        return url
    segments = [s for s in path.split("/") if s not in ("", ".")]
    return f"{scheme}://{host}/" + "/".join(segments)

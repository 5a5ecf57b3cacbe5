"""rsync, wrapped with ``sh``: local paths, ``rsync://`` daemon modules and ``ssh://``.

Only regular files and directories are ever transferred: rsync runs without ``-l``/``-D``,
so a symlink or device file in a hostile repository is skipped here and then missed by
verification, never created on the node. Files land private (0600, dirs 0700) in the
agent's staging area. Text is delta-transferred against the previously installed copy
(``--link-dest``), which is what makes a one-entry change cost about a kilobyte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import sh

from mapsync import log
from mapsync.errors import ConfigError, TransportError

_log = log.get("transport")
MAX_FILE_SIZE = "4g"


@dataclass(frozen=True)
class Endpoint:
    """Where a channel lives: ``base`` is what rsync is told, ``ssh`` the remote shell if any."""

    base: str
    ssh: tuple[str, ...] | None = None
    daemon: bool = False


DEFAULT_SSH = ("ssh", "-o", "BatchMode=yes")


def parse_source(source: str, ssh: tuple[str, ...] = DEFAULT_SSH) -> Endpoint:
    """Turn a channel ``source`` (path, ``file://``, ``rsync://``, ``ssh://``) into an Endpoint."""
    if source.startswith("/"):
        return Endpoint(source.rstrip("/"))
    parts = urlsplit(source)
    if parts.scheme == "file":
        return Endpoint(parts.path.rstrip("/"))
    if parts.scheme == "rsync":
        if not parts.hostname:
            raise ConfigError(f"source {source!r}: rsync:// URL needs a host")
        return Endpoint(source.rstrip("/"), daemon=True)
    if parts.scheme == "ssh":
        if not parts.hostname or not parts.path:
            raise ConfigError(f"source {source!r}: ssh:// URL needs a host and a path")
        shell = list(ssh)
        if parts.port:
            shell += ["-p", str(parts.port)]
        user = f"{parts.username}@" if parts.username else ""
        return Endpoint(f"{user}{parts.hostname}:{parts.path.rstrip('/')}", ssh=tuple(shell))
    raise ConfigError(f"source {source!r}: use a path, file://, rsync:// or ssh://")


def run(argv: list[str], timeout: int) -> str:
    """Run rsync ``argv`` (without the program name); the one subprocess call of mapsync's transport."""
    _log.debug("rsync", argv=argv)
    try:
        out = sh.Command("rsync")(*argv, _tty_out=False, _timeout=timeout)
    except sh.TimeoutException:
        raise TransportError(f"rsync timed out after {timeout}s: rsync {' '.join(argv)}") from None
    except sh.ErrorReturnCode as exc:
        err = exc.stderr.decode("utf-8", "replace").strip()
        raise TransportError(
            f"rsync failed (exit {exc.exit_code}): {err or 'no message'}"
        ) from None
    except sh.CommandNotFound:
        raise TransportError("rsync is not installed (apt-get install rsync)") from None
    return str(out)


_BYTES = re.compile(r"Total bytes (?:sent|received): ([\d,.]+)")


class Remote:
    """One channel's source, fetched with rsync."""

    def __init__(self, source: str, timeout: int = 300, ssh: tuple[str, ...] = DEFAULT_SSH) -> None:
        self.source = source
        self.endpoint = parse_source(source, ssh)
        self.timeout = timeout

    def _argv(self, *extra: str) -> list[str]:
        argv = [
            "--recursive",
            "--times",
            # Quick check in nanoseconds: two releases written in the same second give files of
            # equal size (the signature always) that whole seconds cannot tell apart.
            "--modify-window=-1",
            "--perms",
            "--chmod=D700,F600",
            "--compress",
            "--stats",
            f"--max-size={MAX_FILE_SIZE}",
            f"--timeout={max(self.timeout, 1)}",
        ]
        if self.endpoint.daemon:
            argv += [f"--contimeout={max(min(self.timeout, 60), 1)}", "--no-motd"]
        if self.endpoint.ssh:
            argv += ["-e", " ".join(self.endpoint.ssh)]
        return argv + list(extra)

    def fetch_file(self, name: str, dest: Path) -> int:
        """Copy the remote file ``name`` (e.g. ``LATEST``) to ``dest``; return bytes on the wire."""
        out = run(self._argv(f"{self.endpoint.base}/{name}", str(dest)), self.timeout)
        return wire_bytes(out)

    def fetch_tree(self, name: str, dest: Path, basis: Path | None = None) -> int:
        """Mirror the remote directory ``name`` into ``dest``, delta-encoded against ``basis``."""
        extra = ["--delete"]
        if basis is not None and basis.is_dir():
            extra.append(f"--link-dest={basis.resolve()}")
        out = run(self._argv(*extra, f"{self.endpoint.base}/{name}/", f"{dest}/"), self.timeout)
        return wire_bytes(out)


def wire_bytes(stats: str) -> int:
    """Bytes rsync moved in both directions, from its ``--stats`` output.

    Both count: the receiver sends block checksums of its basis, the sender literal data.
    (For a local path the client is the sender, so "received" alone would show almost nothing.)
    """
    return sum(int(re.sub(r"[,.]", "", m)) for m in _BYTES.findall(stats))

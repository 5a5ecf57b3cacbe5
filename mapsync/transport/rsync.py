"""rsync, run by :mod:`mapsync.process`: local paths, ``rsync://`` daemon modules and ``ssh://``.

Access per channel is the server's job (see docs/security.md): an rsync daemon module per
channel with ``auth users`` (the agent sends ``--password-file``), or an ssh key restricted
with ``rrsync -ro`` to one channel's directory. A refusal is an ordinary rsync failure here.

Only regular files and directories are ever transferred: rsync runs without ``-l``/``-D``,
so a symlink or device file in a hostile repository is skipped here and then missed by
verification, never created on the node. Files land private (0600, dirs 0700) in the
agent's staging area. Text is delta-transferred against the previously installed copy
(``--link-dest``), which is what makes a one-entry change cost about a kilobyte.

An rsync never outlives the run that started it: one that passes its timeout is killed, and
one still running when SIGTERM/SIGHUP (or ^C) ends the run is ended first, with the ssh it
started (see :func:`run` and :class:`Transfers`), so it cannot write into a staging area or
inbox after the run has let go of its lock.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
import shlex
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from mapsync import location, log, process
from mapsync.atomic import remove_tree
from mapsync.errors import ConfigError, TransferStopped, TransportError

_log = log.get("transport")
MAX_FILE_SIZE = "4g"


@dataclass(frozen=True)
class Endpoint:
    """Where a channel lives: ``base`` is what rsync is told, ``ssh`` the remote shell if any."""

    base: str
    ssh: tuple[str, ...] | None = None
    daemon: bool = False
    path: str = ""  # the directory as the rsync at the far end sees it (for a daemon: unused)


DEFAULT_SSH = ("ssh", "-o", "BatchMode=yes")


def connection_options(
    endpoint: Endpoint, timeout: int, password_file: Path | None = None
) -> list[str]:
    """The rsync options that reach ``endpoint`` and give up after ``timeout`` seconds without
    ever prompting, for a fetch and a push alike: ``--timeout``; for a daemon ``--contimeout``,
    ``--no-motd``, ``TCP_NODELAY`` and where the password comes from; for ssh the remote shell
    (``-e``)."""
    timeout = max(timeout, 1)
    argv = [f"--timeout={timeout}"]
    if endpoint.daemon:
        # TCP_NODELAY: the daemon protocol's opening exchange (the timeout, the compression
        # choice) is small writes each waiting for the other side's delayed ACK, 40 ms apiece.
        # Fetching LATEST from a loopback daemon: 0.18-0.20 s with Nagle, 0.115 s without.
        argv += [f"--contimeout={min(timeout, 60)}", "--no-motd", "--sockopts=TCP_NODELAY"]
        if password_file is not None:
            argv.append(f"--password-file={password_file}")
        elif "RSYNC_PASSWORD" not in os.environ:
            # Never prompt: rsync would ask on the terminal and hang until the timeout.
            # "-" reads stdin, which is empty; a module without `auth users` never asks.
            # (A module with `auth users` takes RSYNC_PASSWORD from the environment, e.g. a
            # systemd EnvironmentFile=.)
            argv.append("--password-file=-")
    if endpoint.ssh:
        # rsync splits -e itself, honouring quotes: shlex.join keeps an argument with a space
        # (a key or known-hosts path) one argument of ssh's.
        argv += ["-e", shlex.join(endpoint.ssh)]
    return argv


def parse_source(source: str, ssh: tuple[str, ...] = DEFAULT_SSH) -> Endpoint:
    """Turn a channel ``source`` (path, ``file://``, ``rsync://``, ``ssh://``) into an Endpoint.

    An IPv6 literal keeps its brackets (``ssh://u@[2001:db8::10]/path`` → ``u@[2001:db8::10]:/path``,
    which rsync unwraps before calling ssh): without them rsync would take the host for
    everything up to the first colon."""
    if source.startswith("/"):
        return Endpoint(source.rstrip("/"), path=source.rstrip("/"))
    parts = location.parse(source)
    if parts.invalid is not None:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
        raise ConfigError(f"source {source!r}: not a valid URL ({parts.invalid})")
    host, port = parts.hostname, parts.port
    if parts.scheme == "file":
        return Endpoint(parts.path.rstrip("/"), path=parts.path.rstrip("/"))
    if parts.scheme == "rsync":
        if not host:
            raise ConfigError(f"source {source!r}: rsync:// URL needs a host")
        return Endpoint(source.rstrip("/"), daemon=True)
    if parts.scheme == "ssh":
        if not host or not parts.path:
            raise ConfigError(f"source {source!r}: ssh:// URL needs a host and a path")
        shell = list(ssh)
        if port:
            shell += ["-p", str(port)]
        user = f"{unquote(parts.username)}@" if parts.username else ""
        host = unquote(host)  # a zone id's "%" is "%25" in a URL
        if ":" in host:
            host = f"[{host}]"
        path = parts.path.rstrip("/")
        return Endpoint(f"{user}{host}:{path}", ssh=tuple(shell), path=path)
    raise ConfigError(f"source {source!r}: use a path, file://, rsync:// or ssh://")


# The rsyncs of one job that runs several at once (a channel's push to its nodes, one thread
# each; one poll of the agent), so that an interrupted job can end them all.
Transfers = process.Job

# The job an rsync started in this thread (or context) belongs to when the caller names none:
# set with stoppable(), e.g. by the agent around a poll it may have to stop.
_job: contextvars.ContextVar[Transfers | None] = contextvars.ContextVar("rsync_job", default=None)


@contextlib.contextmanager
def stoppable(transfers: Transfers) -> Iterator[None]:
    """Every rsync that code run inside this block starts (in this thread) belongs to
    ``transfers``, so that another thread can end them with :meth:`Transfers.stop`."""
    token = _job.set(transfers)
    try:
        yield
    finally:
        _job.reset(token)


OUTPUT_LIMIT = 8 * 1024 * 1024  # bytes of rsync's output read back (a listing, --stats)


PARTIAL = 23  # rsync's exit code when some of the files asked for could not be sent


def run(
    argv: list[str], timeout: int, transfers: Transfers | None = None, *, partial: bool = False
) -> str:
    """Run rsync ``argv`` (without the program name) with :func:`mapsync.process.run`; the one
    rsync call of mapsync's transport. ``transfers``: the job this rsync belongs to, which may
    stop it (by default the one :func:`stoppable` set, if any). An rsync interrupted by a
    signal gets SIGTERM (it removes its temporary file), then SIGKILL after 2 seconds.
    ``partial``: exit 23 (a file or its directory missing at the source: what was there
    came) is no error; the caller looks at what came."""
    if transfers is None:
        transfers = _job.get()
    _log.debug("rsync", argv=argv)
    try:
        done = process.run(["rsync", *argv], timeout, keep=OUTPUT_LIMIT, grace=2.0, job=transfers)
    except FileNotFoundError:
        raise TransportError("rsync is not installed (apt-get install rsync)") from None
    except OSError as exc:
        raise TransportError(f"rsync could not be started ({exc.strerror or exc})") from None
    if done.returncode == 0 or (partial and done.returncode == PARTIAL and not done.timed_out):
        if done.stdout_size > OUTPUT_LIMIT:
            # A listing no release has: a hostile or broken source, not read into memory.
            raise TransportError(
                f"rsync printed more than {OUTPUT_LIMIT} bytes: rsync {' '.join(argv)}"
            )
        return done.stdout
    if done.timed_out:
        raise TransportError(f"rsync timed out after {timeout}s: rsync {' '.join(argv)}")
    if transfers is not None and transfers.stopped:
        raise TransferStopped(f"rsync stopped: {transfers.reason}")
    err = done.stderr.strip()
    if "failed to read a password from -" in err:
        err = (
            "the rsync daemon module asks for a password and this channel has no "
            "password_file (nor RSYNC_PASSWORD in the environment)\n" + err
        )
    elif "@ERROR: auth failed on module" in err:
        # The daemon does not say why (wrong password, user not in `auth users` of this
        # module, no password sent); its log does. Point at what the operator can check.
        err += (
            "\n(the rsync daemon refused the credentials for this module: check the user in "
            "the source URL, the channel's password_file, and the module's `auth users` and "
            "`secrets file`)"
        )
    raise TransportError(f"rsync failed ({done.how}): {err or 'no message'}")


def check_password_file(path: Path, source: str) -> None:
    """Refuse a ``password_file`` rsync would refuse, with a message that names it and the fix.

    rsync itself rejects a file others may read, and one not owned by root when run as root;
    a secret is also refused when its group may read it (mode 0600 or 0400 is what works).
    """
    where = f"password_file {path}"
    if not location.parse(source).username:
        raise ConfigError(
            f"{where}: the source {source!r} names no user; write rsync://USER@host/module/... "
            "(the user of the module's `auth users`)"
        )
    try:
        st = path.stat()
    except OSError as exc:
        raise TransportError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TransportError(f"{where}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise TransportError(
            f"{where}: mode {mode:04o} lets others read the rsync password; "
            f"rsync requires 0600 (chmod 600 {path})"
        )
    if os.geteuid() == 0 and st.st_uid != 0:
        raise TransportError(
            f"{where}: owned by uid {st.st_uid}, but rsync running as root requires it to be "
            f"owned by root (chown root {path})"
        )


MIN_BLOCK, MAX_BLOCK = 700, 128 * 1024  # rsync's default minimum; its protocol maximum


def not_at_source(exc: TransportError) -> bool:
    """Whether the rsync that raised ``exc`` failed because a directory it was to copy from
    is not at the source (``change_dir ... failed: No such file or directory``): what a
    source of an earlier version, or one not yet in step, lacks."""
    return "No such file or directory" in str(exc)


def block_size(largest: int) -> int:
    """The rsync block size for files up to ``largest`` bytes: sqrt(24 x size), not rsync's sqrt.

    On sorted text a one-entry change dirties one block, so what moves is the block checksums
    (~6 bytes a block, receiver to sender) plus one block of literal data (compressed to about
    a quarter). sqrt(24 x size) balances the two. Measured on a 1,000,000-entry map (33 MB) with
    one entry added: rsync's default 5.7 KB blocks move 35.6 KB, 28 KB blocks move 12.5 KB.
    """
    return min(max(math.isqrt(24 * largest) // 8 * 8, MIN_BLOCK), MAX_BLOCK)


_BYTES = re.compile(r"Total bytes (?:sent|received): ([\d,.]+)")


class Remote:
    """One channel's source, fetched with rsync."""

    def __init__(
        self,
        source: str,
        timeout: int = 300,
        ssh: tuple[str, ...] = DEFAULT_SSH,
        password_file: Path | None = None,
        modes: str = "D700,F600",
        endpoint: Endpoint | None = None,
    ) -> None:
        """``endpoint``: ``source`` already parsed (:func:`parse_source` with ``ssh``)."""
        self.source = source
        self.modes = modes  # rsync --chmod of what lands: private on a node, 755/644 on a mirror
        self.endpoint = endpoint if endpoint is not None else parse_source(source, ssh)
        self.timeout = timeout
        if password_file is not None:
            if not self.endpoint.daemon:
                raise ConfigError(
                    f"password_file {password_file}: only an rsync:// source takes a password "
                    f"(this source is {source!r}; ssh:// authenticates with the ssh key)"
                )
            check_password_file(password_file, source)
        self.password_file = password_file

    def _argv(self, *extra: str, max_size: str = MAX_FILE_SIZE) -> list[str]:
        return [
            "--recursive",
            "--times",
            # Quick check in nanoseconds: two releases written in the same second give files of
            # equal size (the signature always) that whole seconds cannot tell apart.
            "--modify-window=-1",
            "--perms",
            f"--chmod={self.modes}",
            "--compress",
            "--stats",
            f"--max-size={max_size}",
            *connection_options(self.endpoint, self.timeout, self.password_file),
            *extra,
        ]

    def fetch_file(self, name: str, dest: Path, max_size: int | None = None) -> int:
        """Copy the remote file ``name`` (e.g. ``LATEST``) to ``dest``; return bytes on the wire.
        A file larger than ``max_size``, or a directory of that name (not recursive), is not
        copied: the caller then finds it missing, the source's fault, not the node's."""
        size = str(max_size) if max_size is not None else MAX_FILE_SIZE
        argv = self._argv(
            "--no-recursive", f"{self.endpoint.base}/{name}", str(dest), max_size=size
        )
        out = run(argv, self.timeout)
        return wire_bytes(out)

    def list_dir(self, name: str) -> dict[str, tuple[str, int]]:
        """Entries of the remote directory ``name``: file name → (type letter, size).
        Nothing is downloaded; type is ``-`` for a regular file, ``d``, ``l``, ... otherwise."""
        out = run(["--list-only", *self._argv(f"{self.endpoint.base}/{name}/")[1:]], self.timeout)
        entries: dict[str, tuple[str, int]] = {}
        for line in out.splitlines():
            m = _LISTING.match(line)
            if m and m.group(3) != ".":
                entries[m.group(3)] = (m.group(1)[0], int(re.sub(r"[,.]", "", m.group(2))))
        return entries

    def fetch_files(
        self,
        name: str,
        files: list[str],
        dest: Path,
        basis: Path | None,
        max_size: int,
        block: int | None = None,
    ) -> int:
        """Copy exactly ``files`` of the remote directory ``name`` into ``dest`` (nothing else a
        hostile repository might hold), delta-encoded against ``basis`` in blocks of ``block``
        bytes (rsync's default if None); none above ``max_size``."""
        # Explicit source arguments, not --files-from: through an rsync daemon, rsync 3.5.0
        # reports --files-from entries as "vanished". A missing file is for verification to
        # name, not an rsync error (--ignore-missing-args). Not recursive: a directory served
        # under a file's name is skipped, not copied file by file (each under --max-size) until
        # the disk is full.
        return self._fetch([f"{name}/{f}" for f in files], dest, basis, max_size, block)

    def fetch_paths(self, patterns: list[str], dest: Path, max_size: int) -> int:
        """Copy the remote files that ``patterns`` name (paths relative to the source, the
        last part of each an rsync wildcard pattern, as ``releases/5/MANIFEST.json.sig``) into
        ``dest``, side by side under their own names, in one rsync; what is not there is left
        out. For what may or may not be there yet (the agent's guess at the next release,
        asked for with ``LATEST``).

        One rsync of the source's root narrowed by a filter (each pattern's directories, then
        the pattern), not each path named on its own: a daemon logs every named path that is
        not there as a failure (``change_dir ... failed``), and on every poll that finds
        nothing new the next release's are not there. The rules travel to the source with
        the pull's other bytes (about 30 bytes each)."""
        rules = []
        for pattern in patterns:
            parts = pattern.split("/")
            rules += [f"--include=/{'/'.join(parts[:i])}/" for i in range(1, len(parts))]
            rules.append(f"--include=/{pattern}")
        area = dest / ".fetched"
        area.mkdir(mode=0o700)
        try:
            argv = self._argv(
                # Small files in a few directories: the whole file list at once (incremental
                # recursion sends each directory's as its own, ~50 bytes more here), the best
                # compression (~50 bytes less of a manifest, for no time worth measuring).
                "--no-inc-recursive",
                "--compress-level=9",
                *dict.fromkeys(rules),
                "--exclude=*",
                f"{self.endpoint.base}/",
                f"{area}/",
                max_size=str(max_size),
            )
            # Exit 23: the source's root itself is missing; the caller asks for LATEST alone.
            received = wire_bytes(run(argv, self.timeout, partial=True))
            for directory, _, files in os.walk(area):
                for name in files:
                    got = Path(directory, name)
                    if got.is_file() and not got.is_symlink():
                        os.rename(got, dest / name)
        finally:
            remove_tree(area, ignore_errors=True)
        return received

    def _fetch(
        self,
        paths: list[str],
        dest: Path,
        basis: Path | None,
        max_size: int,
        block: int | None,
    ) -> int:
        extra = ["--no-recursive", "--ignore-missing-args"]
        if basis is not None and basis.is_dir():
            extra.append(f"--link-dest={basis.resolve()}")
            if block is not None:
                extra.append(f"--block-size={block}")
        sources = [f"{self.endpoint.base}/{p}" for p in paths]
        argv = self._argv(*extra, *sources, f"{dest}/", max_size=str(max_size))
        return wire_bytes(run(argv, self.timeout))


# `rsync --list-only`: "-rw-r--r--          2,209 2026/11/22 06:53:38 MANIFEST.json"
_LISTING = re.compile(r"^(\S{10})\s+([\d,.]+)\s+\S+\s+\S+\s+(.+)$")


def wire_bytes(stats: str) -> int:
    """Bytes rsync moved in both directions, from its ``--stats`` output.

    Both count: the receiver sends block checksums of its basis, the sender literal data.
    (For a local path the client is the sender, so "received" alone would show almost nothing.)
    """
    return sum(int(re.sub(r"[,.]", "", m)) for m in _BYTES.findall(stats))

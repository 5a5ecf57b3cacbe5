"""Pushing a release into a node's inbox with rsync: a local path, an ``rsync://`` daemon
module with write access, or ``ssh://`` (the publisher's ``[publisher] ssh`` argv).

The inbox layout is a contract with the agent's watcher (``mapsync agent --watch``)::

    INBOX/releases/<serial>/    MANIFEST.json, MANIFEST.json.sig, text maps (as in the repository,
                                but for the maps a patch gives, see below)
    INBOX/patches/<serial>/     the release's patches, when the push carries them
    INBOX/LATEST                the repository's LATEST, written last
    INBOX/BASIS                 written by the agent, never by a push: the serial of the text
                                the agent keeps as its basis (``mapsync.agent.install``)

A push carries patches instead of the changed maps' text only where the node can use them:
the serial the destination last received is the one the patches are from, and the node's
agent says in ``BASIS`` that it keeps that serial's text. It then copies the patches into
``patches/<serial>/`` and leaves the patched maps out of ``releases/<serial>/``: a one-entry
change moves about a patch's bytes. The agent rebuilds those maps from its basis and checks
each against the signed manifest (docs/release-format.md, "Patches").

A delivery runs rsync two to four times, in this order:

1. only for a first delivery, or after a failed one: make ``INBOX/``, ``INBOX/releases/`` and
   ``INBOX/patches/`` (rsync creates one missing level at a time, and ``--mkpath`` needs rsync
   3.2.3 on the node);
2. with patches, copy them into ``INBOX/patches/<serial>/``;
3. copy the release into ``INBOX/releases/<serial>/``, delta-encoded against
   ``INBOX/releases/<basis>/``, the release delivered before (``--link-dest``: unchanged maps
   become hard links, a changed one moves only the blocks that differ; see :func:`block_size`).
   The options are ones ``rrsync`` (without ``-ro``) lets through, so a push key confined to
   the inbox with ``command="rrsync INBOX",restrict`` works (docs/security.md);
4. copy ``LATEST`` and remove the releases (and patches) other than the new one's and the
   basis's, which an agent may be fetching right now. rsync writes LATEST to a temporary file beside it and
   renames it, so a watcher sees the old LATEST or the new one, and the new one only once
   its release is complete.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection
from pathlib import Path

from mapsync import log
from mapsync.errors import MapsyncError, TransportError
from mapsync.release import LATEST, PATCHES, RELEASES
from mapsync.transport.rsync import (
    DEFAULT_SSH,
    Transfers,
    connection_options,
    parse_source,
    run,
    wire_bytes,
)
from mapsync.transport.rsync import block_size as rsync_block_size

_log = log.get("transport")

BASIS = "BASIS"  # INBOX/BASIS: the agent's basis serial, for the push to read
MAX_BASIS_BYTES = 64


def block_size(release: Path) -> int:
    """The rsync block size for pushing ``release`` (see :func:`rsync.block_size`)."""
    return rsync_block_size(
        max((f.stat().st_size for f in release.iterdir() if f.is_file()), default=0)
    )


class Inbox:
    """One push destination (a node's inbox for one channel)."""

    def __init__(
        self,
        destination: str,
        timeout: int = 60,
        ssh: tuple[str, ...] = DEFAULT_SSH,
        transfers: Transfers | None = None,
    ) -> None:
        self.destination = destination
        self.endpoint = parse_source(destination, ssh)
        self.timeout = max(timeout, 1)
        self.transfers = transfers  # the push this delivery is part of, which may stop it

    def _argv(self, *extra: str) -> list[str]:
        return [
            "--recursive",
            "--times",
            # Whole-file checksums decide what is unchanged against the basis, not size and
            # mtime: two releases written in the same second have files of equal size (the
            # signature always) that whole seconds cannot tell apart, and rrsync refuses the
            # nanosecond window (--modify-window=-1, sent as "-@-1") the agent's fetch uses.
            "--checksum",
            # No --perms: directories the node's operator made (the inbox itself) keep their
            # mode; what the push creates is private to the receiving user (maps may carry
            # password hashes), which is the agent's (root's) to read.
            "--chmod=D700,F600",
            "--compress",
            "--stats",
            *connection_options(self.endpoint, self.timeout),
            *extra,
        ]

    def deliver(
        self,
        release: Path,
        serial: int,
        latest: bytes,
        basis: int | None,
        prepare: bool = True,
        patches: Path | None = None,
        patched: Collection[str] = (),
        agent_basis: int | None = None,
    ) -> int:
        """Put ``release`` (the directory of release ``serial``) and then ``latest`` (the
        exact LATEST bytes naming it) into the inbox; return the bytes rsync moved.

        ``basis``: the serial this inbox received before (delta basis, kept); ``prepare``:
        create the inbox directories first (a first delivery, or one after a failure).
        ``patches``: the release's patch directory, copied first, and ``patched``: the map
        files it gives, left out of the release (see the module docstring). ``agent_basis``:
        the serial the node's agent keeps, whose copy in the inbox (complete: the agent
        completes what it installs) is a second delta basis: the release of ``basis`` may
        lack the maps it got as patches, if the agent has not installed it yet."""
        base = self.endpoint.base
        if basis == serial:
            basis = None
        moved = 0
        with tempfile.TemporaryDirectory(prefix="mapsync-push-") as tmp:
            skeleton = Path(tmp) / "inbox"
            (skeleton / RELEASES).mkdir(parents=True)
            (skeleton / PATCHES).mkdir()
            if prepare:
                moved += self._rsync("--omit-dir-times", f"{skeleton}/", f"{base}/")
            extra = ["--delete", f"--block-size={block_size(release)}"]
            if basis is not None:
                # A basis the agent removed costs a warning and a full copy, not a failure.
                extra.append(f"--link-dest={self._basis_path(basis)}")
                if agent_basis is not None and agent_basis not in (basis, serial):
                    extra.append(f"--link-dest={self._basis_path(agent_basis)}")
            try:
                if patches is not None:
                    moved += self._rsync("--delete", f"{patches}/", f"{base}/{PATCHES}/{serial}/")
                    extra += [f"--exclude=/{f}" for f in sorted(patched)]
                moved += self._rsync(*extra, f"{release}/", f"{base}/{RELEASES}/{serial}/")
            except TransportError as exc:
                if prepare or not _no_such_directory(exc):
                    raise
                # The inbox was emptied or made anew since the delivery before (config
                # management, an operator), or made by an earlier mapsync (no patches/): make
                # its directories and deliver once more.
                _log.info("the inbox lost its directories; making them", destination=base)
                return moved + self.deliver(
                    release,
                    serial,
                    latest,
                    basis,
                    True,
                    patches=patches,
                    patched=patched,
                    agent_basis=agent_basis,
                )
            # LATEST, last: the bytes read with the release, not the repository's file, which
            # a concurrent publish may already have moved on.
            (skeleton / LATEST).write_bytes(latest)
            keep = [
                f"--filter=P /{RELEASES}/{serial}/",
                f"--filter=P /{PATCHES}/{serial}/",
                "--filter=P /*",
            ]
            if basis is not None:
                keep[:0] = [f"--filter=P /{RELEASES}/{basis}/", f"--filter=P /{PATCHES}/{basis}/"]
            moved += self._rsync("--delete", "--omit-dir-times", *keep, f"{skeleton}/", f"{base}/")
        _log.debug("pushed", destination=self.destination, serial=serial, bytes=moved)
        return moved

    def agent_basis(self) -> tuple[int | None, int]:
        """The serial the node's agent keeps as its basis (``INBOX/BASIS``; None: none, or
        not readable: a write-only module, an agent of an earlier version), and the bytes
        rsync moved to learn it."""
        with tempfile.TemporaryDirectory(prefix="mapsync-push-") as tmp:
            dest = Path(tmp) / BASIS
            argv = [
                f"--max-size={MAX_BASIS_BYTES}",
                "--ignore-missing-args",  # no BASIS: an agent that does not take patches
                f"{self.endpoint.base}/{BASIS}",
                str(dest),
            ]
            try:
                moved = self._rsync(*argv)
            except MapsyncError as exc:
                _log.debug(
                    "no agent basis in the inbox", destination=self.destination, error=str(exc)
                )
                return None, 0
            try:
                text = dest.read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                return None, moved
        return (int(text) if text.isdigit() and len(text) < 19 else None), moved

    def _basis_path(self, basis: int) -> str:
        """``--link-dest`` for release ``basis``, as the receiving rsync must be told it.

        Over ssh, the inbox path of the URL, absolute: rrsync refuses ".." in any path and
        maps a leading "/" to its restricted directory exactly as it maps the destination, so
        ``ssh://node/`` through ``rrsync INBOX`` and ``ssh://node/INBOX`` without it both
        name INBOX/releases/<basis>. An rsync daemon resolves an absolute path against the
        module, not the inbox: there it stays relative to the destination directory."""
        if self.endpoint.daemon:
            return f"../{basis}"
        return f"{self.endpoint.path}/releases/{basis}"

    def _rsync(self, *args: str) -> int:
        return wire_bytes(run(self._argv(*args), self.timeout, self.transfers))


def _no_such_directory(exc: TransportError) -> bool:
    """rsync could not make ``releases/<serial>`` because ``releases`` (or the inbox) is
    missing: ``mkdir "…/releases/42" failed: No such file or directory (2)``."""
    return "mkdir" in str(exc) and "No such file or directory" in str(exc)

"""The exception hierarchy. Every class carries the exit code the CLI returns for it.

One handler in :func:`mapsync.cli.main.main` turns these into a message and an exit code;
the exit-code table in ``mapsync --help`` and docs is generated from :data:`EXIT_CODES`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_ERROR = 2
EXIT_UNKNOWN = 3
EXIT_UNSAFE = 4
EXIT_VERIFY = 5


class MapsyncError(Exception):
    """Base of every error mapsync reports to the operator (exit 2)."""

    exit_code = EXIT_ERROR


class ConfigError(MapsyncError):
    """The configuration file is missing, unreadable or invalid; names file and key."""


class SourceError(MapsyncError):
    """The central database could not be read; nothing was published."""


class InvalidData(MapsyncError):
    """Rows in the database break the mail-correctness rules; lists each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        head = f"{len(problems)} invalid row(s) in the database; nothing was published"
        shown = problems[:50]
        more = [f"... and {len(problems) - 50} more"] if len(problems) > 50 else []
        super().__init__("\n  ".join([head, *shown, *more]))


class TransportError(MapsyncError):
    """rsync failed or timed out; the installed set was kept."""


class TransferStopped(TransportError):
    """An rsync this process ended itself (the agent stopping, or stopping a poll to install
    a pushed release): no failure of the source, and not recorded as one."""


class LockBusy(MapsyncError):
    """Another run holds the lock for this channel or repository."""


class InstallError(MapsyncError):
    """Installing a verified release failed (disk full, permissions); old set kept."""


class UnsafePlan(MapsyncError):
    """A guard refused the publish plan; nothing was written (exit 4)."""

    exit_code = EXIT_UNSAFE


class VerificationError(MapsyncError):
    """A release failed verification (signature, serial, expiry, hash); nothing installed (exit 5)."""

    exit_code = EXIT_VERIFY


EXIT_CODES: list[tuple[int, str]] = [
    (EXIT_OK, "ok"),
    (
        EXIT_WARNING,
        "warning: status WARNING, a dry run with pending changes, or compare found differences",
    ),
    (EXIT_ERROR, "error (config, database, rsync, install), or status CRITICAL"),
    (EXIT_UNKNOWN, "status UNKNOWN"),
    (UnsafePlan.exit_code, "unsafe plan refused by a guard"),
    (VerificationError.exit_code, "verification failed (signature, serial, expiry, hash)"),
]


def described(exc: BaseException) -> str:
    """``exc`` in words, an OSError with the path it concerns (not a bare "[Errno 28]")."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)

"""``mapsync`` entry point. Heavy modules are imported inside the commands that need them,
so ``mapsync status`` (run by monitoring every minute) never loads SQLAlchemy."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import textwrap
import traceback
from collections.abc import Sequence

from mapsync import __version__, log, signals
from mapsync.access import denied, is_denied
from mapsync.cli.output import printable, report_error
from mapsync.errors import EXIT_CODES, EXIT_ERROR, MapsyncError

_EPILOG = (
    "exit codes:\n"
    + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES)
    + ("\n\nconfig: --config FILE, else $MAPSYNC_CONFIG, else /etc/mapsync/mapsync.toml")
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs filled to the terminal (at most 88 columns): a paragraph of
    prose (blank lines part them) is refilled whole; one of indented lines (the exit codes)
    keeps its lines, a long one continued under its own text, not under its number."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        width = min(width, _PROSE)
        out = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if not any(line[:1].isspace() for line in lines):
                lines = [" ".join(lines)]
            out.append(
                "\n".join(
                    textwrap.fill(
                        line,
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent + " " * _hanging(line),
                        break_on_hyphens=False,
                        break_long_words=False,
                    )
                    for line in lines
                )
            )
        return "\n\n".join(out)


# The widest a help text's prose is filled to, however wide the terminal.
_PROSE = 88


def _hanging(line: str) -> int:
    """Where a wrapped line's continuation starts: under its text, past its indentation and
    an exit code's number ("  1  warning: ...")."""
    lead = re.match(r"\s*(\d+\s+)?", line)
    return lead.end() if lead else 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand with its options and help."""
    p = argparse.ArgumentParser(
        prog="mapsync",
        description="Publish and install signed, versioned Postfix/Exim/Dovecot maps for a mail cluster.",
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=f"mapsync {__version__}")
    p.add_argument("--config", metavar="FILE", help="configuration file (TOML)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only"
    )
    p.add_argument(
        "--log-format",
        choices=("console", "json"),
        help="console for people (the default), json for machines (the default under systemd)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=description or help,
            epilog=_EPILOG,
            formatter_class=_Formatter,
        )

    s = add(
        "init-db",
        "create mapsync's own schema in [publisher].database (or --database)",
        "Create mapsync's tables and indexes (idempotent). The publisher reads with a\n"
        "read-only user; create the schema as its owner with --database OWNER_URL and grant\n"
        "the reader SELECT (docs/database.md has the SQL for PostgreSQL and MariaDB).",
    )
    s.add_argument(
        "--database",
        metavar="URL",
        help="connect as this URL (the schema's owner) instead of [publisher].database",
    )

    s = add(
        "seed",
        "fill the database with realistic synthetic data (demo, tests, benchmarks)",
        "Fill an empty database with deterministic synthetic domains, accounts and aliases.",
    )
    s.add_argument("--accounts", type=int, default=200, metavar="N", help="accounts (default 200)")
    s.add_argument(
        "--domains", type=int, default=10, metavar="N", help="hosted domains (default 10)"
    )
    s.add_argument("--aliases", type=int, default=50, metavar="N", help="aliases (default 50)")
    s.add_argument(
        "--mailstores", type=int, default=2, metavar="N", help="mailstores store-1..N (default 2)"
    )
    s.add_argument(
        "--seed", type=int, default=1, metavar="S", help="random seed; same seed, same data"
    )
    s.add_argument(
        "--password", metavar="PW", help="give every account this password (SHA512-CRYPT)"
    )
    s.add_argument(
        "--database",
        metavar="URL",
        help="write as this URL (a user who may write) instead of [publisher].database",
    )

    s = add(
        "publish",
        "render, plan, guard, write and sign new releases; prints the plan",
        "Read one snapshot of the database, render every channel's maps, compare with the last "
        "release, check the guards and publish a new signed release where anything changed. "
        "Then push each channel's current release to its `push` destinations (node inboxes) "
        "that do not have it yet; a failed push is retried on every later run.",
    )
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan only; exit 1 if changes are pending, 4 if a guard would refuse them",
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="publish even if a guard refuses (recorded in the manifest)",
    )
    s.add_argument(
        "--skip-invalid",
        action="store_true",
        help="publish without invalid rows, each left out only of the channels whose maps use "
        "it (recorded in their manifests)",
    )
    s.add_argument("--channel", action="append", metavar="C", help="only this channel (repeatable)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.add_argument(
        "--interval",
        type=float,
        metavar="SECONDS",
        help="keep running: publish (and push) every SECONDS (0.1 to a week), and at once "
        "after a commit to a SQLite database (its file is watched; with another engine a "
        "fraction such as 0.25 makes a commit wait less); errors are logged and the next "
        "run goes on; SIGTERM ends it (exit 143); SIGHUP too (129), if the config still loads "
        "(else the error is logged and it runs on). An unchanged database costs a fingerprint query; "
        "a changed one, with mapsync's own schema, only the changed rows and the entries they "
        "reach (docs/incremental.md), with a full read every [publisher] full_check",
    )

    s = add("pull", "agent, once: fetch, verify, install (what a systemd timer runs)")
    s.add_argument("--channel", action="append", metavar="C", help="only this channel (repeatable)")
    s.add_argument(
        "--unpin",
        action="store_true",
        help="end a rollback's pin first, then install what LATEST names",
    )

    s = add(
        "agent",
        "agent, long-running: schedule-driven polling and/or watchdog on a push inbox",
        "Run until stopped. Every channel is pulled at start, then polled every --interval\n"
        "seconds (default: [agent] interval) plus a random 0..[agent] jitter seconds per run,\n"
        "so the nodes of a cluster do not poll the publisher in step.\n\n"
        "With --watch, each channel's push inbox ([agent.channels.C] inbox) is watched too:\n"
        "a release the publisher pushes there is installed as soon as its LATEST arrives\n"
        "(and on each poll, if it came while the agent was down), even while a poll waits on\n"
        "a source that does not answer; an inbox that is replaced is watched again.\n"
        "Whichever way a release comes, it is verified exactly as by `pull`.\n\n"
        "A failed pull is logged and recorded for `mapsync status`; the agent keeps running.\n"
        "SIGTERM ends it (exit 143). SIGHUP ends it (exit 129: systemd starts it again, with\n"
        "the config read anew) if the config still loads; if not, the error is logged and the\n"
        "agent runs on with the config it has. Run this (mapsync-agent.service) or the\n"
        "mapsync-pull timer, not both.",
    )
    s.add_argument(
        "--interval",
        type=int,
        metavar="SECONDS",
        help="seconds between polls of every channel's source (default: [agent] interval, 5 min)",
    )
    s.add_argument(
        "--watch",
        action="store_true",
        help="also watch each channel's inbox and install a pushed release at once "
        "(channels without an inbox are only polled; exit 2 if none has one)",
    )

    s = add(
        "mirror",
        "keep a copy of a repository in step, for an rsync daemon to serve to nodes",
        "Copy each channel's release that LATEST names from SOURCE (a repository: path,\n"
        "rsync://host/module, ssh://host/path) into DEST (a local directory), then LATEST, then\n"
        "the older releases SOURCE keeps (one that fails is a warning), then prune. A release\n"
        "appears whole (staging, checked against its manifest: sha256 and size of every file,\n"
        "rename) before the LATEST that names it; LATEST is written atomically and never moves\n"
        "to a lower serial (refused: exit 5, DEST unchanged). An error in one channel leaves it\n"
        "serving what it served; the others go on. No config file is read (docs/scaling.md).",
    )
    s.add_argument("source", metavar="SOURCE", help="the repository to copy (the publisher's)")
    s.add_argument("dest", metavar="DEST", help="the local directory nodes are served from")
    s.add_argument(
        "--channel",
        action="append",
        metavar="C",
        help="only this channel (repeatable; default every channel SOURCE has)",
    )
    s.add_argument(
        "--keep",
        type=int,
        metavar="N",
        help="releases kept per channel, at least 2 (default: those SOURCE has)",
    )
    s.add_argument(
        "--trusted-key",
        action="append",
        metavar="FILE",
        help="also verify each copied manifest's signature with this public key (repeatable; "
        "the nodes verify anyway)",
    )
    s.add_argument(
        "--password-file",
        metavar="FILE",
        help="password for an rsync:// SOURCE whose module has `auth users` (mode 0600)",
    )
    s.add_argument(
        "--ssh",
        metavar="COMMAND",
        help="remote shell for an ssh:// SOURCE, split as a shell would (default "
        "'ssh -o BatchMode=yes'), e.g. 'ssh -i /etc/mapsync/mirror.key'",
    )
    s.add_argument(
        "--timeout", type=int, default=300, metavar="SECONDS", help="rsync timeout (default 300)"
    )
    s.add_argument(
        "--interval",
        type=int,
        metavar="SECONDS",
        help="keep running: mirror every SECONDS; errors are logged and the next run goes on; "
        "SIGTERM ends it (exit 143); SIGHUP too (129), if the options (--trusted-key files) "
        "still load (else the error is logged and it runs on)",
    )
    s.add_argument(
        "--verify",
        action="store_true",
        help="this run first hashes every file of every release DEST serves against its "
        "manifest (with --trusted-key, every signature too) and copies a damaged one again "
        "from SOURCE (bit rot, an edit by hand, which the quick check of sizes misses); one "
        "run only (with --interval: --full-check)",
    )
    s.add_argument(
        "--full-check",
        type=int,
        metavar="SECONDS",
        help="with --interval: a run every SECONDS (and the first) is a --verify run "
        "(default 3600; 0: never)",
    )

    s = add(
        "status",
        "freshness of every channel on this node (Nagios exit codes)",
        "Installed serial, its age and the last good check of every channel. With\n"
        "--publisher (or a config without [agent]): the publisher's last run and last\n"
        "successful run. With --mirror DEST (no config read): the last run of\n"
        "`mapsync mirror` into DEST (DEST/.mirror.json) and what DEST serves: WARNING when\n"
        "the last run failed, a channel has a warning (SOURCE no longer has it, older\n"
        "releases not copied) or, for a mirror run with --interval, no run finished for\n"
        "3 intervals plus its --timeout; CRITICAL when a release served expires within a\n"
        "quarter of its lifetime, or a channel serves nothing nodes can use.\n"
        "Exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    whose = s.add_mutually_exclusive_group()
    whose.add_argument(
        "--publisher",
        action="store_true",
        help="the publisher's health (last run, last success, last error), not the node's",
    )
    whose.add_argument(
        "--mirror",
        metavar="DEST",
        help="the health of the mirror in DEST (its runs, from DEST/.mirror.json; each "
        "channel's serial and expiry as DEST serves them), not the node's",
    )
    s.add_argument(
        "--prometheus",
        metavar="FILE",
        help="also write node_exporter textfile-collector metrics to FILE (atomically); with "
        "--publisher, the publisher's status and each channel's current serial; with "
        "--mirror, the mirror's status and each channel's serial and expiry",
    )

    s = add(
        "check-config",
        "check the config file without acting on it (before a restart, or systemctl reload)",
        "Read and check the config file as every command does (TOML syntax, unknown keys,\n"
        "types, values) and say what it holds; nothing else is read (with --agent the trusted\n"
        "keys and password files, with --publisher the signing key, with --watch where the\n"
        "inboxes are) and\n"
        "nothing is written. Exit 0 if it loads, 2 with the error\n"
        "(file and line or key) if not. The long-running units run it as their ExecReload=\n"
        "before the SIGHUP: `systemctl reload` fails on a broken file and the running process\n"
        "goes on. Run it before `systemctl restart`, which stops the process first.",
    )
    s.add_argument(
        "--agent",
        action="store_true",
        help="also require an [agent] section (what pull, agent, status and verify need) "
        "and read its trusted_keys and password_file files as a pull does",
    )
    s.add_argument(
        "--publisher",
        action="store_true",
        help="also require a [publisher] section (what publish needs) and read its "
        "signing key as a publish does (its mode and owner)",
    )
    s.add_argument(
        "--watch",
        action="store_true",
        help="also what `agent --watch` needs (mapsync-agent.service): an [agent] section "
        "with a channel that has an inbox, each inbox a directory or one the agent can make",
    )

    s = add(
        "verify",
        "re-check what is installed against its signed manifest",
        "Check the signature of every channel's live manifest and the sha256 of every live file "
        "(also: `current` is mapsync's link, the manifest parses). Exit 5 if anything differs. "
        "With --repair, a damaged live set is first rebuilt from the verified copy kept in the "
        "state directory (signature and hashes checked, cdb files rebuilt and proved) by a new "
        "swap, and the reload hook runs; `mapsync pull` does the same when it finds damage.",
    )
    s.add_argument(
        "--repair",
        action="store_true",
        help="rebuild a damaged live set from the verified copy kept in the state, then verify",
    )

    s = add("history", "releases with serial, time, entry counts, change summary")
    s.add_argument("--channel", action="append", metavar="C", help="only this channel (repeatable)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument(
        "--agent", action="store_true", help="the releases kept on this node, not the repository's"
    )

    s = add(
        "diff",
        "what changed between two releases, per map",
        "Keys added, removed and changed per map between releases A and B of a channel.",
    )
    s.add_argument(
        "--channel", metavar="C", help="the channel (needed when several are configured)"
    )
    s.add_argument(
        "--keys",
        action="store_true",
        help="list the keys with their old and new values, not only the counts (a password "
        "hash only as 'password changed')",
    )
    s.add_argument(
        "--agent", action="store_true", help="the releases kept on this node, not the repository's"
    )
    s.add_argument("a", type=int, metavar="A", help="older serial")
    s.add_argument("b", type=int, metavar="B", help="newer serial")

    s = add(
        "rollback",
        "agent: reinstall an earlier verified release; publisher: re-publish it as a new serial",
        "On a node: reinstall a release this node kept (default: the newest older one whose maps "
        "differ), after verifying its signature and every hash and rebuilding the cdb files; the "
        "channel then stays pinned to it until `mapsync pull --unpin`. With --publisher: publish "
        "the maps of release SERIAL again as a new serial, so every node follows.",
    )
    s.add_argument(
        "--channel", metavar="C", help="the channel (needed when several are configured)"
    )
    s.add_argument(
        "--publisher",
        action="store_true",
        help="re-publish SERIAL's maps as a new serial instead of acting on this node",
    )
    s.add_argument(
        "serial", type=int, nargs="?", metavar="SERIAL", help="the release to go back to"
    )

    s = add(
        "compare",
        "before switching over: the live SQL lookups against the published maps, per address",
        "Ask the operator's current live SQL lookups (Postfix's mysql/pgsql/sqlite tables as\n"
        "main.cf names them, Dovecot's dovecot-sql.conf.ext) and the latest published release of\n"
        "each channel the same questions for every address either side names (and, for\n"
        'schema = "postfixadmin", every row\'s address), plus a probe in every domain: is the\n'
        "domain ours, is the recipient accepted, where does its mail end up after alias\n"
        "expansion, who may send as it, and for Dovecot: login, password (compared, never\n"
        "printed), home, uid, gid, quota. Prints each difference; those mapsync makes on purpose\n"
        "(docs/postfixadmin.md) are labelled 'expected' with the reason.\n"
        "Exit 0: no other differences; 1: differences; 2: an error. Read-only on both sides.",
    )
    s.add_argument(
        "--postfix", metavar="MAIN_CF", help="Postfix's main.cf (e.g. /etc/postfix/main.cf)"
    )
    s.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="PARAM=TYPE:FILE",
        help="a Postfix parameter's table list, instead of main.cf's "
        "(e.g. virtual_alias_maps=mysql:/etc/postfix/sql/alias.cf; repeatable, in order)",
    )
    s.add_argument(
        "--dovecot", metavar="FILE", help="Dovecot's SQL passdb/userdb (dovecot-sql.conf.ext)"
    )
    s.add_argument(
        "--database",
        metavar="URL",
        help="connect every live lookup to this SQLAlchemy URL instead of the files' settings",
    )
    s.add_argument(
        "--channel",
        action="append",
        metavar="C",
        help="compare this channel (repeatable; default all)",
    )
    s.add_argument(
        "--address", action="append", default=[], metavar="A", help="also compare this address"
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = add(
        "keygen", "create an ed25519 signing key pair: PATH (0600) and its public half beside it"
    )
    s.add_argument("path", metavar="PATH", help="private key file (signing.key → signing.pub)")

    s = add(
        "demo",
        "the whole system on one machine: SQLite, sample data, publisher, seven nodes",
        "Build a whole mail cluster in DIR: a SQLite database with sample data, a publisher\n"
        "with signed releases of seven channels, and seven nodes - mx (Postfix MX), exim-mx,\n"
        "scanner, imap-proxy, store-1, store-2 and submission (the relay users send\n"
        "through) - whose agents pull their channel with rsync, verify it and install it. Prints each node's status and postmap commands\n"
        "to try a lookup. Run again with the same DIR to re-publish (an unchanged database\n"
        "makes no release) and re-pull.\n\n"
        "Configs: DIR/mapsync.toml holds the publisher and node mx's agent; every other\n"
        "node's agent is DIR/nodes/<node>/mapsync.toml. Each node's state and live maps are\n"
        "under DIR/nodes/<node>/.",
    )
    s.add_argument(
        "--dir", metavar="DIR", help="where to build it (default: a new directory under /tmp)"
    )
    s.add_argument(
        "--schema",
        choices=("mapsync", "postfixadmin"),
        default="mapsync",
        help="the database to start from: mapsync's own schema (default) or a PostfixAdmin "
        "database as PostfixAdmin fills it, read as it is",
    )
    return p


def _unexpected(exc: Exception, fmt: str, verbose: bool) -> None:
    lines = [line.strip() for line in printable(str(exc)).splitlines() if line.strip()]
    what = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    hint = "" if verbose else " (run with -v for the traceback)"
    if fmt == "json":
        log.get("cli").error(
            f"unexpected error: {what}", error=type(exc).__name__, exit=EXIT_ERROR, exc_info=verbose
        )
        return
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"mapsync: unexpected error: {what}{hint}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names; return its exit code (an error as one line with its
    class's exit code, a signal as 128+n)."""
    args = build_parser().parse_args(argv)
    fmt = args.log_format or ("json" if os.environ.get("JOURNAL_STREAM") else "console")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    log.configure(level, fmt)
    signals.install()
    if fmt == "console" and not args.quiet:
        from mapsync.cli.progress import on_terminal

        on_terminal()  # progress of long operations, when standard error is a terminal
    from mapsync.cli import commands

    try:
        code = int(getattr(commands, "cmd_" + args.command.replace("-", "_"))(args))
        sys.stdout.flush()  # here, where a reader gone is caught, not as the process exits
    except BrokenPipeError:
        # The reader of the output went away (`mapsync status --json | head -1`): ended as
        # a command killed by SIGPIPE is, without a word; nothing more is written there.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (MapsyncError, OSError) as exc:
        if (got := signals.received()) is not None:
            return 128 + got  # the run was ended; its error is a symptom
        # OSError: disk full, a repository path that is not a directory, ...: exit 2 (error)
        # with one line, not a traceback and exit 1, which would read as WARNING to monitoring.
        code = exc.exit_code if isinstance(exc, MapsyncError) else EXIT_ERROR
        if isinstance(exc, OSError) and is_denied(exc) and exc.filename:
            exc = MapsyncError(denied(os.fsdecode(exc.filename)))
        report_error(str(exc), type(exc).__name__, exit=code)
        return code
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception as exc:
        if (got := signals.received()) is not None:
            # The handler's SystemExit, turned into another error by a C extension.
            return 128 + got
        # A bug, or a case no check foresaw: still an error (exit 2), never the exit 1 of an
        # uncaught traceback, which monitoring would read as WARNING. The traceback is for -v.
        _unexpected(exc, fmt, args.verbose)
        return EXIT_ERROR
    # A signal whose SystemExit was swallowed (in a gc callback) still ends the run as signalled.
    got = signals.received()
    return code if got is None else 128 + got

"""The commands: each parses nothing, calls the core, prints, and returns an exit code."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mapsync import config
from mapsync.cli.output import print_plan, print_push, report_error
from mapsync.errors import (
    EXIT_OK,
    EXIT_WARNING,
    ConfigError,
    MapsyncError,
    UnsafePlan,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from mapsync.mirror import Mirror
    from mapsync.publish.history import MapDiff
    from mapsync.publish.plan import PublishResult
    from mapsync.publish.push import Push


def _config(args: argparse.Namespace) -> config.Config:
    return config.load(config.resolve_path(args.config))


def cmd_init_db(args: argparse.Namespace) -> int:
    """``mapsync init-db``: create mapsync's schema (as the owner's ``--database`` URL, or the publisher's)."""
    from mapsync.sources.builtin import safe_url
    from mapsync.sources.seed import init_db

    # the owner's URL (the publisher's user only reads): no config file needed with it, so
    # init-db runs before the publisher's config exists, or on the database host
    url = args.database or _config(args).need_publisher().database
    init_db(url)
    print(f"schema ready in {safe_url(url)}")
    return EXIT_OK


def cmd_seed(args: argparse.Namespace) -> int:
    """``mapsync seed``: fill an empty database with deterministic synthetic rows."""
    from mapsync import progress
    from mapsync.sources.seed import SeedCounts, seed

    made = seed(
        args.database or _config(args).need_publisher().database,
        SeedCounts(args.accounts, args.domains, args.aliases, args.mailstores),
        seed=args.seed,
        password=args.password,
        progress=progress.report,
    )
    print("seeded " + ", ".join(f"{n} {table}" for table, n in made.items()))
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    """``mapsync publish``: one run and its pushes, or with ``--interval`` a run every N seconds."""
    if args.interval is not None:
        return _publish_every(args)
    return publish_once(args)


def publish_once(
    args: argparse.Namespace, *, loop: bool = False, kept: dict[str, Any] | None = None
) -> int:
    """One publish run, then the pushes; ``loop``: print only what changed. ``kept``: the
    loop's publisher between runs (its incremental state), made anew when the configuration
    read for this run differs from the one it was made with."""
    pub = _config(args).need_publisher() if kept is None else _loop_config(args, kept)
    result: PublishResult | None = None
    failure: MapsyncError | None = None
    if kept is None and not (args.dry_run or args.force or args.skip_invalid or args.channel):
        from mapsync.publish.quiet import quiet_run

        # Nothing changed, told without loading the publisher's machinery (SQLAlchemy above
        # all); None when in any doubt, and the publisher runs.
        try:
            result = quiet_run(pub)
        except ConfigError:
            raise
        except MapsyncError as exc:  # as the publisher's run would have failed
            failure = exc
    if result is None and failure is None:
        result, failure = _run_publisher(args, pub, kept)
    pushes: list[Push] = []
    if any(ch.push for ch in pub.channels.values()):
        from mapsync.publish.push import LOOP_GRACE, push_channels

        pushes = push_channels(
            pub,
            args.channel,
            dry_run=args.dry_run,
            plans=result.plans if result else None,
            grace=min(LOOP_GRACE, pub.push_timeout) if loop else None,
        )
        if not args.dry_run:
            _record_pushes(pub, args.channel, pushes)
    if loop:  # every few seconds: only news, nothing about what stayed the same
        pushes = [p for p in pushes if p.action not in ("current", "in flight")]
        if result is not None:
            result = replace(result, plans=[p for p in result.plans if p.pending])
    if result is not None and result.violations:
        # A dry run the real publish would refuse: say so, and exit as that run would (4).
        failure = UnsafePlan(
            "the real publish would be refused by guards (use --force if the change is "
            "intended):\n  " + "\n  ".join(str(v) for v in result.violations)
        )
    if args.json and (result is not None or pushes):
        out: dict[str, Any] = {"push": [asdict(p) for p in pushes]}
        if result is not None:
            out = {
                "dry_run": result.dry_run,
                "pending": result.pending,
                "violations": [str(v) for v in result.violations],
                "channels": [asdict(p) for p in result.plans],
                "skipped": [str(p) for p in result.skipped],
                **out,
            }
        if not loop or out["push"] or out.get("channels") or out.get("skipped"):
            print(json.dumps(out, indent=None if loop else 2), flush=True)
    elif not args.json:
        if result is not None:
            print_plan(result)
        # A failed run ("has serial 3" would read as "up to date"): only what was done.
        print_push([p for p in pushes if failure is None or p.action != "current"])
        sys.stdout.flush()
    if failure is not None:
        raise failure
    failed = [p for p in pushes if p.action == "failed"]
    if failed:
        from mapsync.publish.push import PushFailed

        raise PushFailed(failed)
    return EXIT_WARNING if args.dry_run and result is not None and result.pending else EXIT_OK


def _record_pushes(
    pub: config.PublisherConfig, channels: list[str] | None, pushes: list[Push]
) -> None:
    """Note in the run note how each channel this run pushed fared (for ``status
    --publisher``)."""
    from mapsync.publish.push import PushFailed
    from mapsync.publish.runlog import record_pushes

    failed: dict[str, str | None] = {}
    for name in channels or pub.channels:
        mine = [p for p in pushes if p.channel == name and p.action == "failed"]
        failed[name] = str(PushFailed(mine)) if mine else None
    record_pushes(pub.repository, failed)


def _loop_config(args: argparse.Namespace, kept: dict[str, Any]) -> config.PublisherConfig:
    """The config for a run of ``publish --interval``, read anew each run: an edit takes
    effect at the next run. An edit that does not load (a TOML syntax error, an unknown key,
    a wrong type) is logged, naming file and key, and the run goes on with the config last
    read: a typo must not stop renewals and new addresses until someone reads the log."""
    try:
        pub = _config(args).need_publisher()
    except ConfigError as exc:
        last: config.PublisherConfig | None = kept.get("config")
        if last is None:
            raise
        from mapsync import log

        log.get("publisher").error(
            "the config file no longer loads; this run publishes with the one last read "
            "(fix the file; `mapsync status --publisher` fails until then)",
            error=str(exc),
        )
        return last
    kept["config"] = pub
    return pub


def _run_publisher(
    args: argparse.Namespace, pub: config.PublisherConfig, kept: dict[str, Any] | None
) -> tuple[PublishResult | None, MapsyncError | None]:
    """The publisher's run for :func:`publish_once` (``kept``: the loop's publisher, see
    there): its result, or the error that ended it (ConfigError raised)."""
    from mapsync.publish.publisher import Publisher
    from mapsync.sources import open_source

    publisher = kept.get("publisher") if kept is not None else None
    if publisher is None or publisher.cfg != pub:
        publisher = Publisher(
            pub,
            lambda: open_source(
                pub.database, pub.schema, postfixadmin=pub.postfixadmin, sql=pub.sql
            ),
        )
        if kept is not None:
            publisher.incremental = True
            kept["publisher"] = publisher
    try:
        result = publisher.run(
            args.channel, dry_run=args.dry_run, force=args.force, skip_invalid=args.skip_invalid
        )
    except ConfigError:
        raise
    except MapsyncError as exc:
        # Database down, a guard refused, ...: what is already published still goes to the
        # nodes that lack it; then the error is reported as ever.
        return None, exc
    return result, None


# A run of the loop when nothing changed costs a fingerprint query (0.04 s at 1M accounts on
# SQLite: docs/benchmarks.md); below this, the loop would be little but queries.
MIN_PUBLISH_INTERVAL = 0.1
# A week: releases expire after [publisher] expires (7 days by default) unless a run renews
# them; and the loop sleeps with time.sleep, which refuses what time_t cannot hold ("inf").
MAX_PUBLISH_INTERVAL = 7 * 24 * 3600


def _publish_every(args: argparse.Namespace) -> int:
    """``publish --interval``: the checks of its options, then :func:`publish.loop.run_every`."""
    from mapsync.publish.loop import run_every

    if not args.interval >= MIN_PUBLISH_INTERVAL:  # NaN too
        raise ConfigError(
            f"publish --interval: must be at least {MIN_PUBLISH_INTERVAL} (seconds), "
            f"not {args.interval:g}"
        )
    if args.interval > MAX_PUBLISH_INTERVAL:
        raise ConfigError(
            f"publish --interval: must be at most {MAX_PUBLISH_INTERVAL} (seconds, a week), "
            f"not {args.interval:g}"
        )
    if args.dry_run or args.force:
        raise ConfigError(
            "publish --interval publishes for real and cannot override guards: "
            "not with --dry-run or --force (run those by hand, once)"
        )
    publisher = _config(args).need_publisher()  # a broken config at start: exit 2, systemd shows it
    _restart_on_hangup(lambda: _config(args).need_publisher(), "publisher")
    # The publisher kept between runs (see publish_once), and the config last read (_loop_config).
    kept: dict[str, Any] = {"config": publisher}
    try:
        run_every(
            args.interval, lambda: publish_once(args, loop=True, kept=kept), publisher.database
        )
    finally:
        if "mapsync.publish.push" in sys.modules:  # deliveries still running: end their rsyncs
            from mapsync.publish.push import stop_pushes

            stop_pushes()


def _agent_channels(
    agent: config.AgentConfig, names: list[str] | None
) -> list[config.AgentChannel]:
    if not names:
        return list(agent.channels.values())
    unknown = [n for n in names if n not in agent.channels]
    if unknown:
        raise ConfigError(
            f"unknown channel(s) {', '.join(unknown)} (configured: {', '.join(agent.channels)})"
        )
    return [agent.channels[n] for n in names]


def cmd_pull(args: argparse.Namespace) -> int:
    """``mapsync pull``: each channel once; every channel is tried, the worst exit code returned."""
    from mapsync.agent.pull import pull

    agent = _config(args).need_agent()
    worst = EXIT_OK
    for ch in _agent_channels(agent, args.channel):
        try:
            r = pull(agent, ch, unpin=args.unpin)
        except MapsyncError as exc:
            # One broken channel must not keep the others stale: report, go on, fail at the end.
            msg = str(exc)
            prefix = (
                ""
                if msg.startswith((f"channel {ch.name}:", f"channel {ch.name} ("))
                else f"channel {ch.name}: "
            )
            report_error(prefix + msg, type(exc).__name__, channel=ch.name, exit=exc.exit_code)
            worst = max(worst, exc.exit_code)
            continue
        if r.repaired:
            print(f"{ch.name}: the live set is repaired: " + "; ".join(r.repaired))
        if r.action == "current":
            print(f"{ch.name}: serial {r.serial} is current")
        elif r.action == "pinned":
            # Pinned to LATEST itself (`rollback` forward again to it): nothing is held back.
            latest = (
                "LATEST names it too"
                if r.latest == r.serial
                else f"LATEST is {r.latest}, not installed"
            )
            print(
                f"{ch.name}: pinned to serial {r.serial} by rollback; {latest} "
                "(`mapsync pull --unpin` follows the publisher again)"
            )
        elif r.action == "renewed":
            print(f"{ch.name}: serial {r.serial} renews {r.previous} (same maps, no swap)")
        else:
            was = f" (was {r.previous})" if r.previous else ""
            print(f"{ch.name}: installed serial {r.serial}{was}, {r.bytes:,} bytes on the wire")
    return worst


def cmd_agent(args: argparse.Namespace) -> int:
    """``mapsync agent``: poll and install until a signal ends the process."""
    from mapsync.agent.loop import run

    cfg, agent = _agent_config(args)
    _restart_on_hangup(lambda: _agent_config(args), "agent")
    # Runs until SIGTERM or SIGHUP ends the process with exit 128+n.
    run(agent, cfg.path, interval=args.interval, watch=args.watch)


def _agent_config(args: argparse.Namespace) -> tuple[config.Config, config.AgentConfig]:
    """What ``mapsync agent`` checks of its config and options before it starts."""
    from mapsync.agent.loop import watched_inboxes

    cfg = _config(args)
    agent = cfg.need_agent()
    if args.interval is not None and args.interval < 1:
        raise ConfigError(f"agent --interval: must be at least 1 second, not {args.interval}")
    watched_inboxes(agent, cfg.path, args.watch)
    return cfg, agent


def _restart_on_hangup(start: Callable[[], object], logger: str) -> None:
    """SIGHUP to this long-running process: exit 129 (systemd's ``Restart=on-failure`` starts
    it again, reading the config anew) only if ``start()``, the checks of the config and
    options the process made when it started, pass now. If they fail (a TOML syntax error, an
    unknown key, a wrong type), the error is logged, naming file and line or key, and the
    process runs on with the config it has: restarted, it would fail at every start until
    someone fixed the file, and no map would be updated meanwhile."""
    from mapsync import log, signals

    def check() -> bool:
        _log = log.get(logger)
        try:
            start()
        except MapsyncError as exc:
            _log.error(
                f"config not reloaded: {exc}; running on with the config loaded before",
                error=type(exc).__name__,
            )
            return False
        except Exception:
            _log.exception(
                "config not reloaded: checking it crashed; running on with the config loaded before"
            )
            return False
        _log.info("SIGHUP: the config loads; exiting (129) to be started with it")
        return True

    signals.on_hangup(check)


def cmd_mirror(args: argparse.Namespace) -> int:
    """``mapsync mirror SOURCE DEST``: one pass (or one every ``--interval`` seconds)."""
    from mapsync.cli.output import print_mirrored
    from mapsync.interval import run_every
    from mapsync.mirror import MirrorFailed, mirror_channels

    m, full_check = _mirror_setup(args)
    last_full: list[float] = []  # when the loop's last full check started

    def once(loop: bool = False) -> int:
        full = args.verify
        if loop and full_check and (not last_full or time.monotonic() - last_full[0] >= full_check):
            full = True
            last_full[:] = [time.monotonic()]
        done, failed = mirror_channels(
            m, args.channel, full=full, interval=args.interval if loop else None
        )
        print_mirrored([d for d in done if not loop or d.action != "current" or d.damaged])
        sys.stdout.flush()
        if failed:
            raise MirrorFailed(failed)
        return EXIT_OK

    if args.interval is None:
        return once()
    # The trusted keys are read again (under systemd, mirror.env too).
    _restart_on_hangup(lambda: _mirror_setup(args), "mirror")
    with m.looping():
        run_every(args.interval, lambda: once(loop=True), logger="mirror", what="mirror")


def _mirror_setup(args: argparse.Namespace) -> tuple[Mirror, int]:
    """What ``mapsync mirror`` checks of its options (and reads: the trusted keys) before it
    starts: the mirror, and the seconds between full checks of ``--interval``."""
    from mapsync.mirror import Mirror
    from mapsync.signing import Keyring, load_public
    from mapsync.transport.rsync import DEFAULT_SSH

    if args.ssh is not None and not shlex.split(args.ssh):
        raise ConfigError("mirror --ssh: an empty command")
    keys = None
    if args.trusted_key:
        keys = Keyring()
        for path in args.trusted_key:
            keys.add(load_public(Path(path)), Path(path))
    m = Mirror(
        args.source,
        Path(args.dest),
        keep=args.keep,
        keys=keys,
        timeout=args.timeout,
        password_file=Path(args.password_file) if args.password_file else None,
        ssh=tuple(shlex.split(args.ssh)) if args.ssh else DEFAULT_SSH,
    )
    if args.verify and args.interval is not None:
        # Every pass would hash every release DEST serves (seconds at 1M accounts, each time).
        raise ConfigError(
            "mirror --verify: one run only; with --interval, --full-check SECONDS checks "
            "every file every SECONDS (the first run too; 3600 by default)"
        )
    if args.full_check is not None and args.interval is None:
        raise ConfigError("mirror --full-check: only with --interval (one run: --verify)")
    full_check = 3600 if args.full_check is None else args.full_check
    if full_check < 0:
        raise ConfigError(f"mirror --full-check: must be 0 (never) or more, not {full_check}")
    if args.interval is not None and args.interval < 1:
        raise ConfigError("mirror --interval: must be at least 1 (seconds)")
    return m, full_check


def cmd_status(args: argparse.Namespace) -> int:
    """``mapsync status``: the agent's channels (or ``--publisher``) as Nagios text, JSON or metrics; exits with the worst level."""
    if args.mirror is not None:
        return _mirror_status(args)  # no config: the mirror reads none
    cfg = _config(args)
    if args.publisher or (cfg.agent is None and cfg.publisher is not None):
        return _publisher_status(args, cfg.need_publisher())
    from mapsync.agent.status import (
        channel_status,
        overall,
        perfdata,
        summary,
        write_prometheus,
    )
    from mapsync.metrics import LEVELS, MetricsNotWritten

    agent = cfg.need_agent()
    statuses = [channel_status(agent, ch) for ch in agent.channels.values()]
    code = overall(statuses)
    if args.prometheus:
        try:
            write_prometheus(Path(args.prometheus), statuses)
        except MetricsNotWritten as exc:
            # The metrics are a side output: the channels' own result stays what Nagios sees.
            report_error(f"{exc}; the metrics were not written", type(exc).__name__)
    if args.json:
        print(
            json.dumps(
                {
                    "status": LEVELS[code],
                    "exit": code,
                    "channels": [{**asdict(s), "status": s.level} for s in statuses],
                },
                indent=2,
            )
        )
        return code
    perf = perfdata(statuses)  # none before a first pull: no "|" (Nagios' empty perfdata)
    print(f"MAPSYNC {LEVELS[code]} - {summary(statuses)}" + (f" | {perf}" if perf else ""))
    for s in statuses:
        print(f"{s.channel}: {s.level} {s.message}")
    return code


def _publisher_status(args: argparse.Namespace, pub: config.PublisherConfig) -> int:
    from mapsync.metrics import LEVELS, MetricsNotWritten, write_textfile
    from mapsync.publish.runlog import publisher_metrics, publisher_status

    st = publisher_status(pub)
    if args.prometheus:
        try:
            write_textfile(Path(args.prometheus), publisher_metrics(pub, st))
        except MetricsNotWritten as exc:
            report_error(f"{exc}; the metrics were not written", type(exc).__name__)
    if args.json:
        print(json.dumps({"status": LEVELS[st.code], "exit": st.code, **asdict(st)}, indent=2))
    else:
        print(f"MAPSYNC PUBLISHER {LEVELS[st.code]} - {st.message}")
    return st.code


def cmd_check_config(args: argparse.Namespace) -> int:
    """``mapsync check-config``: load the config file (and nothing else); say what it holds."""
    cfg = _config(args)
    if args.agent or args.watch:
        from mapsync.agent.checks import trusted_keys
        from mapsync.transport.rsync import check_password_file

        agent = cfg.need_agent()
        trusted_keys(agent)  # each file read as a pull reads it: a key, not writable by others
        for ch in agent.channels.values():
            if ch.password_file is not None:  # as a pull checks it: a file rsync would take
                daemon = next(s for s in ch.sources if s.startswith("rsync://"))
                check_password_file(ch.password_file, daemon)
        if args.watch:
            from mapsync.agent.loop import watched_inboxes

            watched_inboxes(agent, cfg.path, True)
    if args.publisher:
        from mapsync.signing import load_private

        load_private(cfg.need_publisher().signing_key)  # its mode and owner, as a publish
    print(f"{cfg.path}: the config loads")
    if cfg.publisher is not None:
        pub = cfg.publisher
        print(
            f"  [publisher]: {len(pub.channels)} channel(s) ({', '.join(pub.channels)}), "
            f"repository {pub.repository}"
        )
    if cfg.agent is not None:
        agent = cfg.agent
        inboxes = [n for n, ch in agent.channels.items() if ch.inbox is not None]
        watched = (
            f"inbox watched by `agent --watch`: {', '.join(inboxes)}"
            if inboxes
            else "no inbox (`agent --watch` would not start)"
        )
        print(
            f"  [agent]: {len(agent.channels)} channel(s) ({', '.join(agent.channels)}), "
            f"state {agent.state}; {watched}"
        )
    return EXIT_OK


def _mirror_status(args: argparse.Namespace) -> int:
    from mapsync.cli.output import printable
    from mapsync.metrics import LEVELS, MetricsNotWritten, write_textfile
    from mapsync.mirrorlog import mirror_metrics, mirror_status

    st = mirror_status(Path(args.mirror))
    if args.prometheus:
        try:
            write_textfile(Path(args.prometheus), mirror_metrics(st))
        except MetricsNotWritten as exc:
            report_error(f"{exc}; the metrics were not written", type(exc).__name__)
    if args.json:
        print(json.dumps({"status": LEVELS[st.code], "exit": st.code, **asdict(st)}, indent=2))
    else:
        print(printable(f"MAPSYNC MIRROR {LEVELS[st.code]} - {st.message}"))
    return st.code


def cmd_verify(args: argparse.Namespace) -> int:
    """``mapsync verify``: check each installed set against its signed manifest (``--repair`` rebuilds a damaged one)."""
    from mapsync.agent.verify import repair_installed, verify_installed

    agent = _config(args).need_agent()
    worst = EXIT_OK
    for ch in agent.channels.values():
        try:
            if args.repair:
                repaired = repair_installed(agent, ch)
                if repaired is not None:
                    serial, problems = repaired
                    print(f"{ch.name}: repaired serial {serial}: " + "; ".join(problems))
            serial = verify_installed(agent, ch)
        except MapsyncError as exc:
            # Each channel is checked (and repaired) whatever became of the others.
            report_error(str(exc), type(exc).__name__, channel=ch.name, exit=exc.exit_code)
            worst = max(worst, exc.exit_code)
            continue
        print(f"{ch.name}: serial {serial} verified (signature and every file)")
    return worst


def _one_channel(names: list[str], name: str | None) -> str:
    """The channel a single-channel command acts on: ``--channel``, or the only one configured."""
    if name:
        if name not in names:
            raise ConfigError(f"unknown channel {name} (configured: {', '.join(names)})")
        return name
    if len(names) == 1:
        return names[0]
    raise ConfigError(
        f"several channels are configured ({', '.join(names)}): name one with --channel"
    )


def _releases(args: argparse.Namespace, name: str) -> tuple[Path, int | None, int | None]:
    """(directory of releases, LATEST serial, installed serial) for ``history``/``diff``:
    the publisher's repository, or with ``--agent`` this node's kept releases."""
    cfg = _config(args)
    if args.agent:
        from mapsync.agent.node import NodeChannel

        agent = cfg.need_agent()
        node = NodeChannel.look(agent, agent.channels[name])
        current = node.current()
        if current is not None and current.channel != name:
            current = None  # another channel's set (the channel renamed, the node moved)
        return node.paths.kept.root, None, current.serial if current else None
    from mapsync.publish.history import latest_or_none
    from mapsync.publish.repository import Repository

    repo = Repository(cfg.need_publisher().repository, read_only=True)
    return repo.releases(name), latest_or_none(repo, name), None


def _channel_names(args: argparse.Namespace) -> list[str]:
    cfg = _config(args)
    if args.agent:
        return list(cfg.need_agent().channels)
    return list(cfg.need_publisher().channels)


def cmd_history(args: argparse.Namespace) -> int:
    """``mapsync history``: the releases of each channel, on the publisher or kept on this node (``--agent``)."""
    from mapsync.publish.history import history_of

    configured = _channel_names(args)
    names = args.channel or configured
    unknown = [n for n in names if n not in configured]
    if unknown:
        raise ConfigError(
            f"unknown channel(s) {', '.join(unknown)} (configured: {', '.join(configured)})"
        )
    result = {}
    for name in names:
        releases, latest, current = _releases(args, name)
        result[name] = history_of(releases, name, latest, current)
    if args.json:
        print(json.dumps({n: [asdict(h) for h in hs] for n, hs in result.items()}, indent=2))
        return EXIT_OK
    for name, entries in result.items():
        print(f"channel {name}:" + (" (kept on this node)" if args.agent else ""))
        if not entries:
            print("  no releases")
        for h in entries:
            counts = " ".join(f"{m}={n}" for m, n in h.entries.items())
            what = "changed: " + ",".join(h.changed) if h.changed else "renewal (same maps)"
            if h.dropped and not h.changed:
                what = ""  # not a renewal: a map left the channel
            flags = (" forced: " + ",".join(h.forced)) if h.forced else ""
            flags += (" dropped: " + ",".join(h.dropped)) if h.dropped else ""
            mark = " <- LATEST" if h.latest else " <- installed" if h.installed else ""
            print(f"  {h.serial:>6}  {h.created}  {counts}  {what}{flags}{mark}")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    """``mapsync diff A B``: per map, the keys added, removed and changed between two releases."""
    from mapsync.publish.history import diff_releases

    name = _one_channel(_channel_names(args), args.channel)
    releases, _, _ = _releases(args, name)
    for d in diff_releases(releases, name, args.a, args.b):
        print(f"{d.name}: +{len(d.added)} -{len(d.removed)} ~{len(d.changed)}")
        if args.keys:
            for sign, keys in (("+", d.added), ("-", d.removed), ("~", d.changed)):
                for key in keys:
                    print(f"  {sign} {key}{_diff_value(d, key, sign)}")
    return EXIT_OK


def _diff_value(d: MapDiff, key: str, sign: str) -> str:
    """What ``diff --keys`` shows after a key: its value (``+``/``-``), old → new (``~``), or
    for a passwd-file user the fields that changed (a password hash only as "changed")."""
    if key in d.fields:
        shown = d.field_values.get(key, {})
        parts = [
            f"{f}: {shown[f][0]!r} → {shown[f][1]!r}" if f in shown else f"{f} changed"
            for f in d.fields[key]
        ]
        return f" ({', '.join(parts)})"
    if key not in d.values:
        return ""  # a map that carries secrets: the key alone
    old, new = d.values[key]
    if sign == "~":
        return f" {old} → {new}"
    return f" {new if sign == '+' else old}"


def cmd_rollback(args: argparse.Namespace) -> int:
    """``mapsync rollback``: pin this node to an older kept release, or with ``--publisher`` re-publish one as a new serial."""
    cfg = _config(args)
    if args.publisher:
        from mapsync.publish.plan import PublishResult
        from mapsync.publish.rollback import republish

        pub = cfg.need_publisher()
        if args.serial is None:
            raise ConfigError("rollback --publisher needs the SERIAL whose content to re-publish")
        name = _one_channel(list(pub.channels), args.channel)
        plan = republish(pub, name, args.serial)
        print_plan(PublishResult([plan]))
        print(
            f"channel {name}: serial {plan.serial} carries the maps of serial {args.serial}; "
            "agents install it on their next pull. The next publish renders the database "
            "again: fix it (or stop the publish timer) first."
        )
        return EXIT_OK
    from mapsync.agent.rollback import rollback

    agent = cfg.need_agent()
    name = _one_channel(list(agent.channels), args.channel)
    r = rollback(agent, agent.channels[name], args.serial)
    print(
        f"{name}: rolled back to serial {r.serial} (was {r.previous}), re-verified; pinned until "
        "`mapsync pull --unpin`"
    )
    return EXIT_OK


def _files(paths: list[str]) -> str:
    """main.cf, its N table files and the Dovecot file, briefly."""
    tables = [p for p in paths if p.endswith(".cf") and not p.endswith("main.cf")]
    rest = [p for p in paths if p not in tables]
    return ", ".join(rest + ([f"{len(tables)} table file(s)"] if tables else []))


def cmd_compare(args: argparse.Namespace) -> int:
    """``mapsync compare``: the live Postfix/Dovecot lookups against the published maps; exit 1 on an unexpected difference."""
    from mapsync.publish.compare import compare

    pub = _config(args).need_publisher()
    if not args.postfix and not args.table:
        raise ConfigError("compare needs --postfix MAIN_CF or --table PARAM=TYPE:FILE")
    result = compare(
        pub,
        main_cf=Path(args.postfix) if args.postfix else None,
        tables=args.table,
        dovecot=Path(args.dovecot) if args.dovecot else None,
        database=args.database,
        channels=args.channel,
        addresses=args.address,
    )
    code = EXIT_WARNING if result.unexpected else EXIT_OK
    if args.json:
        out = {
            "addresses": result.addresses,
            "domains": result.domains,
            "users": result.users,
            "before": result.before,
            "after": result.after,
            "unexpected": len(result.unexpected),
            "expected": len(result.expected),
            "differences": [asdict(d) for d in result.differences],
            "exit": code,
        }
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return code
    after = ", ".join(f"{c} serial {s}" for c, s in result.after.items())
    print(
        f"compared {result.addresses} addresses in {result.domains} domains"
        + (f" and {result.users} Dovecot users" if result.users else "")
        + f": live lookups ({_files(result.before)}) against the published maps ({after})"
    )
    for d in result.differences:
        mark = "expected " if d.expected else "DIFFERENT"
        why = f"  [{d.expected}]" if d.expected else ""
        print(f"{mark} {d.address}  {d.check}: before {d.before} | after {d.after}{why}")
    print(
        f"{len(result.unexpected)} difference(s), {len(result.expected)} expected "
        "(mapsync differs on purpose: docs/postfixadmin.md)"
    )
    return code


def cmd_keygen(args: argparse.Namespace) -> int:
    """``mapsync keygen PATH``: a new signing key pair."""
    from mapsync.signing import keygen

    public, kid = keygen(Path(args.path))
    print(f"private key {args.path} (mode 0600), public key {public}, key id {kid}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """``mapsync demo``: build (or re-run) a publisher and an agent on this machine in one directory."""
    from mapsync.cli.demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None, args.schema)

"""What publish, rollback, mirror and demo print: the plan of a run, what its pushes did, what a
mirror copied; and how any command tells an error on standard error."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from mapsync import log

if TYPE_CHECKING:
    from mapsync.mirror import Mirrored
    from mapsync.publish.plan import PublishResult
    from mapsync.publish.push import Push


def printable(text: str) -> str:
    """A path's undecodable bytes (a directory name that is not UTF-8) as ``\\xff``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no byte decoded to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def report_error(message: str, error: str, **fields: Any) -> None:
    """An error on standard error: ``mapsync: MESSAGE`` for people, or with ``--log-format
    json`` one JSON log line (``error``: its class; ``fields``: ``exit``, ``channel``, ...),
    so that a reader of the journal's JSON finds no line that is not JSON: the error that
    ends a command, and those of one channel of several that the command goes on past."""
    if log.is_json():
        log.get("cli").error(printable(message), error=error, **fields)
    else:
        print(f"mapsync: {printable(message)}", file=sys.stderr)


def print_plan(result: PublishResult) -> None:
    """Each channel of a publish run: what it did (or would do), and its maps' counts."""
    for plan in result.plans:
        if plan.action == "none":
            print(f"channel {plan.channel}: unchanged (serial {plan.previous})")
            continue
        verb = "would publish" if result.dry_run else "published"
        if plan.action == "renew":
            verb = "would renew" if result.dry_run else "renewed"
        if plan.violations:  # a dry run: the real publish would be refused
            verb = "would REFUSE (guards) to publish"
        prev = f" (previous {plan.previous})" if plan.previous else " (first release)"
        print(f"channel {plan.channel}: {verb} serial {plan.serial}{prev}")
        print(f"  {'map':<16}{'before':>10}{'after':>10}{'added':>9}{'removed':>9}{'changed':>9}")
        for m in plan.maps:
            marks = ["dropped from the channel"] if m.dropped else []
            marks += ["forced"] if m.name in plan.forced else []
            mark = "".join(f"  {x}" for x in marks)
            print(
                f"  {m.name:<16}{m.before:>10}{m.after:>10}{m.added:>9}{m.removed:>9}{m.changed:>9}{mark}"
            )
    if result.skipped:
        print(f"skipped {len(result.skipped)} invalid row(s):")
        for p in result.skipped:
            print(f"  {p}")


def print_push(pushes: list[Push]) -> None:
    """One line per push: pushed, would push, already there, or failed and when it is next tried."""
    for p in pushes:
        if p.action == "pushed":
            print(
                f"channel {p.channel}: pushed serial {p.serial} to {p.destination}, "
                f"{p.bytes:,} bytes on the wire"
            )
        elif p.action == "would push":
            print(f"channel {p.channel}: would push serial {p.serial} to {p.destination}")
        elif p.action == "current":
            print(f"channel {p.channel}: {p.destination} has serial {p.serial}")
        elif p.action == "in flight":
            print(f"channel {p.channel}: {p.destination} is still being pushed an earlier serial")
        else:
            first = (p.error or "").splitlines()[0] if p.error else "no message"
            serial = f" serial {p.serial}" if p.serial else ""
            when = f"next try at {p.retry_at}" if p.retry_at else "retried by a later run"
            verb = "NOT TRIED (backing off)" if p.deferred else "FAILED"
            print(f"channel {p.channel}: push{serial} to {p.destination} {verb} ({when}): {first}")


def print_mirrored(done: list[Mirrored]) -> None:
    """One line per channel a mirror run looked at: what it copied, moved and pruned."""
    for d in done:
        checked = f"; {d.checked} release(s) checked, every file hashed" if d.checked else ""
        if d.action == "current":
            extra = f"; pruned {_serials(d.pruned)}" if d.pruned else ""
            print(f"{d.channel}: serial {d.serial} is current{extra}{checked}")
            _print_damaged(d)
            continue
        was = f" (was {d.previous})" if d.previous else ""
        line = f"{d.channel}: serial {d.serial} mirrored{was}"
        if d.copied:
            line += f", copied {_serials(d.copied)}"
        if d.pruned:
            line += f", pruned {_serials(d.pruned)}"
        print(f"{line}; {d.bytes:,} bytes on the wire{checked}")
        if d.repaired:
            print(f"  the copy here was damaged and is replaced: {d.repaired}")
        for serial, why in sorted(d.skipped.items()):
            print(f"  older release {serial} not copied: {' '.join(why.split())}")
        _print_damaged(d)


def _print_damaged(d: Mirrored) -> None:
    for what, why in sorted(d.damaged.items()):
        print(f"  {what} was damaged here: {' '.join(why.split())}")


def _serials(serials: list[int]) -> str:
    return ("release " if len(serials) == 1 else "releases ") + ", ".join(map(str, serials))

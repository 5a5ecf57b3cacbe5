"""What a publish would change, per channel and map, and the guards that may refuse it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mapsync.config import Guards
from mapsync.release import separator

if TYPE_CHECKING:
    from mapsync.validate import Problem


@dataclass(frozen=True)
class MapPlan:
    """Entries before → after, and how many keys were added, removed or changed."""

    name: str
    before: int
    after: int
    added: int
    removed: int
    changed: int
    dropped: bool = False  # the map itself left the channel (it is in the previous release only)

    @property
    def unchanged(self) -> bool:
        """Whether the map stays as it is: no key added, removed or changed, not dropped."""
        return not (self.added or self.removed or self.changed or self.dropped)


@dataclass
class ChannelPlan:
    """The plan of one channel; ``action`` is ``publish``, ``renew`` or ``none``."""

    channel: str
    previous: int | None
    serial: int | None
    action: str
    maps: list[MapPlan] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)
    skipped: int = 0  # invalid rows left out of this channel (``--skip-invalid``)
    violations: list[str] = field(default_factory=list)  # guards that refuse the plan

    @property
    def pending(self) -> bool:
        """Whether the run writes (or, dry, would write) a release for the channel."""
        return self.action != "none"


@dataclass(frozen=True)
class Violation:
    """A guard's refusal of one map of one channel."""

    channel: str
    map: str
    message: str

    def __str__(self) -> str:
        if not self.map:  # the whole release (a rival publisher's renewal)
            return f"channel {self.channel}: {self.message}"
        return f"channel {self.channel}, map {self.map}: {self.message}"


@dataclass
class PublishResult:
    """What a publish run did (or, dry, would do): one plan per channel, the rows it skipped, the
    guards' refusals."""

    plans: list[ChannelPlan]
    skipped: list[Problem] = field(default_factory=list)
    dry_run: bool = False
    # A dry run's guard refusals (a real run raises UnsafePlan with them instead).
    violations: list[Violation] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        """Whether any channel has a release to write (a dry run then exits 1)."""
        return any(p.pending for p in self.plans)


def merge_diff(
    old: Iterator[tuple[str, str]], new: Iterator[tuple[str, str]]
) -> Iterator[tuple[str, str, str | None, str | None]]:
    """Walk two key-sorted streams; yield (kind, key, old value, new value) for differences.

    ``kind`` is ``added``, ``removed`` or ``changed``. Linear time, constant memory.
    """
    sentinel = ("\U0010ffff" * 2, "")
    o = next(old, None)
    n = next(new, None)
    while o is not None or n is not None:
        ok, ov = o if o is not None else sentinel
        nk, nv = n if n is not None else sentinel
        if o is not None and (n is None or ok < nk):
            yield "removed", ok, ov, None
            o = next(old, None)
        elif n is not None and (o is None or nk < ok):
            yield "added", nk, None, nv
            n = next(new, None)
        else:
            if ov != nv:
                yield "changed", ok, ov, nv
            o = next(old, None)
            n = next(new, None)


def _body_lines(path: Path) -> set[bytes]:
    with open(path, "rb") as fh:
        return {line for line in fh.read().split(b"\n") if line and not line.startswith(b"#")}


def diff_files(
    name: str, old: Path | None, new: Path, before: int, after: int, sep: str | None = None
) -> MapPlan:
    """Count the differences between two text maps (``old`` None: everything is added).
    Keys are split off at map ``name``'s own separator (``:`` in a passwd-file), so a
    changed password is one changed key, not one removed and one added.

    Whole lines are compared as sets (C speed, the publisher has the memory); only the few
    differing lines are split into keys to tell a changed value from an add or remove.
    ``sep``: the separator of a map of the operator's own (a built-in map's is known).
    """
    sep = sep or separator(name)
    if old is None:
        return MapPlan(name, 0, after, after, 0, 0)
    old_lines, new_lines = _body_lines(old), _body_lines(new)
    bsep = sep.encode()
    gone = {line.partition(bsep)[0] for line in old_lines - new_lines}
    came = {line.partition(bsep)[0] for line in new_lines - old_lines}
    changed = len(gone & came)
    return MapPlan(name, before, after, len(came) - changed, len(gone) - changed, changed)


def check(plan: MapPlan, guards: Guards, channel: str) -> Violation | None:
    """The guard ``plan`` violates, if any. Shrink, growth and change apply from 10 entries up.

    Each guard counts keys, never the net entry count: ``max_shrink`` the keys removed,
    ``max_growth`` the keys added, ``max_change`` the keys whose value changed, each as a share
    of the entries before. A release that replaces every key (a botched migration, ``database``
    pointed at another database of the same size) keeps its size but removes every key.
    """
    if plan.dropped:
        return Violation(
            channel,
            plan.name,
            f"the map is dropped from the channel ({plan.before} entries in the previous release, "
            f"not in [publisher.channels.{channel}] maps); every node would lose it",
        )
    if plan.after < guards.min_entries:
        return Violation(
            channel,
            plan.name,
            f"{plan.after} entries, fewer than min_entries = {guards.min_entries}",
        )
    if plan.before >= 10:
        counts = f"{plan.before} → {plan.after} entries"
        shrink = plan.removed / plan.before
        if shrink > guards.max_shrink:
            return Violation(
                channel,
                plan.name,
                f"removes {shrink:.1%} of its keys ({plan.removed} of {plan.before}; {counts}), "
                f"more than max_shrink = {guards.max_shrink:.0%}",
            )
        growth = plan.added / plan.before
        if growth > guards.max_growth:
            return Violation(
                channel,
                plan.name,
                f"adds {growth:.1%} new keys ({plan.added} to {plan.before}; {counts}), "
                f"more than max_growth = {guards.max_growth:.0%}",
            )
        change = plan.changed / plan.before
        if change > guards.max_change:
            return Violation(
                channel,
                plan.name,
                f"changes the value of {change:.1%} of its entries ({plan.changed} of {plan.before}), more than max_change = {guards.max_change:.0%}",
            )
    return None

"""The alias graph check (fan-out, targets that lead nowhere, cycles) gives the same problems,
in the same order, as the straightforward search over every alias that it replaced (kept here
as the reference): random graphs with cycles, duplicate addresses, mixed case, alias domains,
catch-alls, disabled domains (a target there is refused) and targets outside the cluster."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from mapsync.snapshot import Alias, Domain, Fingerprint, Snapshot
from mapsync.validate import MAX_FANOUT, Problem, alias_graph

DOMAINS = [
    Domain(1, "a.org", None, "hosted", None, 1, None, "active"),
    Domain(2, "b.org", None, "hosted", None, 1, None, "active"),
    Domain(3, "c.org", None, "alias", 1, None, None, "active"),
    Domain(4, "off.org", None, "hosted", None, 1, None, "disabled"),
    Domain(5, "r.org", None, "relay", None, None, "mx.r.org", "active"),
]
ADDRESS = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.sampled_from(["x", "y", "z", "w", "X", "acc", "nope"]),
    st.sampled_from(["a.org", "b.org", "c.org", "off.org", "r.org", "ext.net", "A.org"]),
)
ALIASES = st.lists(
    st.tuples(
        st.sampled_from([1, 2, 3, 4, 5, 9]),
        st.sampled_from(["x", "y", "z", "w", "X", ""]),
        st.lists(ADDRESS, max_size=4),
    ),
    max_size=14,
)


def _reference(
    snap: Snapshot,
    domains: dict[int, Domain],
    seen: dict[str, tuple[str, int]],
    bad_targets: set[str],
) -> Iterator[Problem]:
    """Fan-out, targets inside our own domains that lead nowhere, and alias cycles."""
    live = {d.id: d for d in domains.values() if d.status != "disabled"}
    alias_of = {
        d.name: live[d.target_domain_id].name
        for d in live.values()
        if d.kind == "alias" and d.target_domain_id in live
    }
    hosted = {d.name for d in live.values() if d.kind == "hosted"}
    dead = {d.name for d in domains.values() if d.id not in live}
    catchall = {key[1:] for key in seen if key.startswith("@")}
    edges: dict[str, list[str]] = {}
    where: dict[str, int] = {}
    for al in snap.aliases:
        dom = live.get(al.domain_id)
        if dom is None or dom.kind != "hosted" or not al.local_part:
            continue
        address = f"{al.local_part}@{dom.name}"
        if len(al.targets) > MAX_FANOUT:
            yield Problem(
                "alias", al.id, address, f"{len(al.targets)} targets, more than {MAX_FANOUT}"
            )
        internal = []
        for target in al.targets:
            if target in bad_targets:
                continue  # reported as a syntax problem already
            local, _, tdomain = target.lower().rpartition("@")
            tdomain = alias_of.get(tdomain, tdomain)
            if tdomain in dead:
                yield Problem(
                    "alias",
                    al.id,
                    address,
                    f"target {target!r} is in domain {tdomain!r}, which is disabled "
                    "(nothing here receives it)",
                )
            if tdomain not in hosted:
                continue  # mail leaves the cluster: not ours to check
            resolved = f"{local}@{tdomain}"
            if resolved not in seen and tdomain not in catchall:
                yield Problem(
                    "alias",
                    al.id,
                    address,
                    f"target {target!r} is in a hosted domain but is no account or alias there",
                )
            internal.append(resolved)
        edges[address] = internal
        where[address] = al.id
    # Postfix gives up at recursion depth 1000 with a deferral (4.6.0): refuse cycles here.
    state: dict[str, int] = {}
    for start in edges:
        if state.get(start):
            continue
        stack = [(start, iter(edges[start]))]
        state[start] = 1
        path = [start]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                yield Problem("alias", where[nxt], nxt, "alias cycle: " + " → ".join(cycle))
                continue
            if not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(edges[nxt])))
                path.append(nxt)


@settings(max_examples=500, deadline=None)
@given(rows=ALIASES, bad=st.sets(ADDRESS, max_size=2), catchall=st.booleans())
def test_same_problems_in_the_same_order_as_the_plain_search(
    rows: list[tuple[int, str, list[str]]], bad: set[str], catchall: bool
) -> None:
    aliases = [Alias(i + 1, d, local, tuple(t)) for i, (d, local, t) in enumerate(rows)]
    snap = Snapshot([], DOMAINS, [], aliases, Fingerprint({}), datetime.now(UTC))
    seen: dict[str, tuple[str, int]] = {"acc@a.org": ("account", 1), "acc@b.org": ("account", 2)}
    for al in aliases:
        d = next((d for d in DOMAINS if d.id == al.domain_id), None)
        if d is not None:
            seen.setdefault(f"{al.local_part}@{d.name}".lower(), ("alias", al.id))
    if catchall:
        seen["@b.org"] = ("alias", 99)
    domains = {d.id: d for d in DOMAINS}
    expected = list(_reference(snap, domains, seen, bad))
    # The same claims as validate.check keeps them: by domain, then local part.
    claims: dict[str, dict[str, Any]] = {}
    for address, row in seen.items():
        local, _, domain = address.rpartition("@")
        claims.setdefault(domain, {})[local] = row
    assert list(alias_graph(snap, domains, claims, bad)) == expected
    event("a cycle" if any(p.reason.startswith("alias cycle") for p in expected) else "no cycle")

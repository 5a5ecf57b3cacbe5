"""Plans and guards: counting differences, the limits, and what the CLI does when one trips.

A refused plan must write nothing at all: the repository is compared file by file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete, select

from mapsync.config import Guards
from mapsync.publish.plan import MapPlan, check, diff_files, merge_diff
from mapsync.sources import schema as t
from tests.conftest import Cluster
from tests.helpers.agent import add_account
from tests.helpers.publisher import manifest

# --- merge_diff and diff_files ---------------------------------------------------------------


def test_merge_diff_reports_each_kind_in_key_order() -> None:
    old = [("a", "1"), ("b", "2"), ("c", "3"), ("e", "5")]
    new = [("a", "1"), ("b", "two"), ("d", "4"), ("e", "5"), ("f", "6")]
    assert list(merge_diff(iter(old), iter(new))) == [
        ("changed", "b", "2", "two"),
        ("removed", "c", "3", None),
        ("added", "d", None, "4"),
        ("added", "f", None, "6"),
    ]


def test_merge_diff_edges() -> None:
    assert list(merge_diff(iter([]), iter([]))) == []
    assert list(merge_diff(iter([("a", "1")]), iter([]))) == [("removed", "a", "1", None)]
    assert list(merge_diff(iter([]), iter([("a", "1")]))) == [("added", "a", None, "1")]
    same = [("k", "v"), ("\U0010ffff", "x")]
    assert list(merge_diff(iter(same), iter(same))) == []


def _map(path: Path, pairs: dict[str, str]) -> Path:
    body = "".join(f"{k} {v}\n" for k, v in sorted(pairs.items()))
    path.write_text(f"# header for {path.name}\n# serial whatever\n{body}")
    return path


def test_diff_files_counts(tmp_path: Path) -> None:
    old = _map(tmp_path / "old", {"a@x.org": "OK", "b@x.org": "1", "c@x.org": "OK", "z": "z"})
    new = _map(
        tmp_path / "new", {"a@x.org": "OK", "b@x.org": "2", "d@x.org": "OK", "e": "e", "z": "z"}
    )
    plan = diff_files("recipients", old, new, 4, 5)
    assert plan == MapPlan("recipients", 4, 5, added=2, removed=1, changed=1)
    assert not plan.unchanged
    # Headers differ between releases (serial); they are not entries.
    same = _map(tmp_path / "same", {"a@x.org": "OK", "b@x.org": "1", "c@x.org": "OK", "z": "z"})
    assert diff_files("recipients", old, same, 4, 4).unchanged


def test_diff_files_first_release_is_all_added(tmp_path: Path) -> None:
    new = _map(tmp_path / "new", {"a": "1", "b": "2"})
    assert diff_files("domains", None, new, 0, 2) == MapPlan("domains", 0, 2, 2, 0, 0)


# --- guards ----------------------------------------------------------------------------------

G = Guards(min_entries=1, max_shrink=0.10, max_growth=1.00)


def plan(before: int, after: int) -> MapPlan:
    return MapPlan("recipients", before, after, max(0, after - before), max(0, before - after), 0)


@pytest.mark.parametrize(
    ("before", "after", "violated"),
    [
        (10, 9, False),  # exactly 10 % shrink is allowed
        (10, 8, True),
        (1000, 900, False),
        (1000, 899, True),
        (10, 20, False),  # exactly 100 % growth is allowed
        (10, 21, True),
        (9, 1, False),  # below 10 entries shrink and growth are not judged
        (9, 500, False),
        (0, 100000, False),  # a first release
        (5, 0, True),  # min_entries still applies
        (100, 100, False),
    ],
)
def test_shrink_and_growth_limits(before: int, after: int, violated: bool) -> None:
    v = check(plan(before, after), G, "mx")
    assert (v is not None) == violated
    if v is not None:
        assert (v.channel, v.map) == ("mx", "recipients")
        assert str(v).startswith("channel mx, map recipients: ")


def test_violation_messages_name_figure_and_limit() -> None:
    shrink = check(plan(200, 100), G, "mx")
    assert shrink is not None
    assert shrink.message == (
        "removes 50.0% of its keys (100 of 200; 200 → 100 entries), more than max_shrink = 10%"
    )
    grow = check(plan(10, 35), G, "mx")
    assert grow is not None
    assert grow.message == (
        "adds 250.0% new keys (25 to 10; 10 → 35 entries), more than max_growth = 100%"
    )
    few = check(plan(0, 3), Guards(min_entries=5), "mx")
    assert few is not None
    assert few.message == "3 entries, fewer than min_entries = 5"


def test_a_same_size_replacement_of_every_key_is_refused() -> None:
    """329 keys renamed (a botched migration, ``database`` pointed at another database):
    the count stays, every key is removed. Guards count keys, not the net change."""
    v = check(MapPlan("recipients", 329, 329, 329, 329, 0), G, "mx")
    assert v is not None
    assert v.message == (
        "removes 100.0% of its keys (329 of 329; 329 → 329 entries), more than max_shrink = 10%"
    )
    # Half the keys replaced while the map grows: within max_growth by count, not by keys.
    grow = check(MapPlan("recipients", 100, 150, 150, 100, 0), Guards(max_shrink=1.0), "mx")
    assert grow is not None and grow.message.startswith("adds 150.0% new keys (150 to 100;")
    # A few renamed keys stay within both limits.
    assert check(MapPlan("recipients", 100, 100, 10, 10, 0), G, "mx") is None


def test_a_map_dropped_from_the_channel_is_refused_whatever_the_limits() -> None:
    loose = Guards(min_entries=0, max_shrink=1.0, max_growth=10.0, max_change=1.0)
    for before in (3, 300):
        v = check(MapPlan("virtual", before, 0, 0, before, 0, dropped=True), loose, "mx")
        assert v is not None
        assert str(v) == (
            f"channel mx, map virtual: the map is dropped from the channel ({before} entries "
            "in the previous release, not in [publisher.channels.mx] maps); every node would "
            "lose it"
        )


def test_custom_limits() -> None:
    loose = Guards(min_entries=0, max_shrink=0.9, max_growth=10.0)
    assert check(plan(100, 11), loose, "mx") is None
    assert check(plan(100, 9), loose, "mx") is not None
    assert check(plan(10, 110), loose, "mx") is None
    assert check(plan(10, 111), loose, "mx") is not None
    assert check(plan(5, 0), loose, "mx") is None


# --- through the CLI ---------------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (the repository's whole state)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".publisher.json"  # the run note every run rewrites
    }


def delete_most_accounts(cluster: Cluster) -> None:
    engine = create_engine(cluster.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(delete(t.account).where(t.account.c.local_part != "postmaster"))
            # as an admin tool would: aliases lose the targets that were deleted with them,
            # and aliases left with no target go too (dangling targets are invalid rows)
            conn.execute(
                delete(t.alias_target).where(
                    t.alias_target.c.target.like("%@example-%.org"),
                    t.alias_target.c.target.not_like("postmaster@%"),
                )
            )
            remaining = select(t.alias_target.c.alias_id)
            conn.execute(delete(t.alias).where(t.alias.c.id.not_in(remaining)))
    finally:
        engine.dispose()


def test_guard_refuses_mass_deletion_and_writes_nothing(cluster: Cluster) -> None:
    cluster.publish()
    before = tree(cluster.repo)
    first = manifest(cluster, "mx", 1)
    delete_most_accounts(cluster)

    # The dry run the operator guide says to read first: the refusal, and the real run's exit.
    dry = cluster.cli("publish", "--dry-run", "--json")
    assert dry.returncode == 4, dry.stderr
    doc = json.loads(dry.stdout)
    planned = {m["name"]: m for m in doc["channels"][0]["maps"]}
    assert tree(cluster.repo) == before

    proc = cluster.cli("publish")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "nothing was written" in proc.stderr
    r = planned["recipients"]
    assert r["before"] == first["maps"]["recipients"]["entries"] and r["after"] < r["before"] / 2
    shrink = r["removed"] / r["before"]
    refusal = (
        f"channel mx, map recipients: removes {shrink:.1%} of its keys ({r['removed']} of "
        f"{r['before']}; {r['before']} → {r['after']} entries), more than max_shrink = 10%"
    )
    assert refusal in proc.stderr
    assert refusal in doc["violations"] and refusal in doc["channels"][0]["violations"]
    assert [line for line in proc.stderr.splitlines() if "channel mx, map" in line] == [
        f"  {v}" for v in doc["violations"]
    ]
    human = cluster.cli("publish", "--dry-run")
    assert human.returncode == 4
    assert "channel mx: would REFUSE (guards) to publish serial 2 (previous 1)" in human.stdout
    assert "would publish" not in human.stdout
    assert refusal in human.stderr and "the real publish would be refused" in human.stderr
    assert tree(cluster.repo) == before
    assert json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"] == 1
    assert not (cluster.repo / "mx" / ".staging").exists()


def test_force_publishes_and_records_forced_maps(cluster: Cluster) -> None:
    cluster.publish()
    delete_most_accounts(cluster)
    refused = cluster.cli("publish")
    assert refused.returncode == 4
    named = {
        line.split("map ", 1)[1].split(":", 1)[0]
        for line in refused.stderr.splitlines()
        if line.strip().startswith("channel mx, map ")
    }
    assert "recipients" in named

    out = cluster.publish("--force").stdout
    assert "published serial 2 (previous 1)" in out
    m = manifest(cluster, "mx", 2)
    assert {name for name, e in m["maps"].items() if e["forced"]} == named
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert {name for name, cols in rows.items() if cols[-1] == "forced"} == named
    assert json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"] == 2
    # The next ordinary change is judged against the forced release, not the old one.
    add_account(cluster, "newcomer", "example-2.org")
    again = cluster.publish().stdout
    assert "published serial 3" in again
    assert not any(e["forced"] for e in manifest(cluster, "mx", 3)["maps"].values())


def test_dry_run_exit_codes_and_writes_nothing(cluster: Cluster) -> None:
    first = cluster.cli("publish", "--dry-run")
    assert first.returncode == 1
    assert "would publish serial 1 (first release)" in first.stdout
    assert not (cluster.repo / "mx").exists() or tree(cluster.repo / "mx") == {}

    cluster.publish()
    before = tree(cluster.repo)
    none = cluster.cli("publish", "--dry-run")
    assert none.returncode == 0
    assert "unchanged (serial 1)" in none.stdout

    add_account(cluster, "pending", "example-2.org")
    pending = cluster.cli("publish", "--dry-run")
    assert pending.returncode == 1
    assert "would publish serial 2 (previous 1)" in pending.stdout
    recip = next(
        line for line in pending.stdout.splitlines() if line.strip().startswith("recipients")
    )
    before_n, after_n, added, removed, changed = map(int, recip.split()[1:6])
    assert (after_n - before_n, added, removed, changed) == (1, 1, 0, 0)
    assert tree(cluster.repo) == before


def test_json_plan_is_parseable(cluster: Cluster) -> None:
    proc = cluster.cli("publish", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["dry_run"] is False and data["pending"] is True and data["skipped"] == []
    (ch,) = data["channels"]
    assert (ch["channel"], ch["serial"], ch["previous"], ch["action"]) == ("mx", 1, None, "publish")
    m = manifest(cluster, "mx", 1)
    assert {x["name"]: x["after"] for x in ch["maps"]} == {
        name: e["entries"] for name, e in m["maps"].items()
    }
    again = json.loads(cluster.cli("publish", "--json").stdout)
    assert again["pending"] is False
    assert again["channels"][0]["action"] == "none"


def test_per_map_guard_from_config(cluster: Cluster) -> None:
    cluster.write_config(extra_publisher="[publisher.guards.domains]\nmin_entries = 1000\n")
    proc = cluster.cli("publish")
    assert proc.returncode == 4
    assert "map domains: " in proc.stderr and "fewer than min_entries = 1000" in proc.stderr
    assert "map recipients" not in proc.stderr
    assert not (cluster.repo / "mx" / "LATEST").exists()
    assert not (cluster.repo / "mx" / "releases").exists()

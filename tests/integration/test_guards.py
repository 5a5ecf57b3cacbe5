"""Guards on value changes: a typo in a mailstore's address must not reroute a cluster's mail."""

from __future__ import annotations

import json

from sqlalchemy import create_engine, update

from mapsync.config import Guards
from mapsync.publish.plan import MapPlan, check
from mapsync.sources import schema as t
from tests.conftest import Cluster


def test_max_change_counts_changed_values_from_ten_entries_up() -> None:
    g = Guards(max_change=0.30)
    assert check(MapPlan("transport", 20, 20, 0, 0, 6), g, "mx") is None
    v = check(MapPlan("transport", 20, 20, 0, 0, 7), g, "mx")
    assert v is not None
    assert (
        v.message
        == "changes the value of 35.0% of its entries (7 of 20), more than max_change = 30%"
    )
    assert check(MapPlan("transport", 9, 9, 0, 0, 9), g, "mx") is None


def test_a_mailstore_address_typo_is_refused_with_exit_4_and_nothing_written(
    cluster: Cluster,
) -> None:
    cluster.publish()
    latest_before = (cluster.repo / "mx" / "LATEST").read_bytes()
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(
            update(t.mailstore).where(t.mailstore.c.id == 1).values(lmtp_host="10.0.1.111")
        )
    engine.dispose()

    proc = cluster.cli("publish")
    assert proc.returncode == 4
    assert "channel mx, map transport: changes the value of" in proc.stderr
    assert "max_change = 30%" in proc.stderr
    assert (cluster.repo / "mx" / "LATEST").read_bytes() == latest_before
    assert sorted(p.name for p in (cluster.repo / "mx" / "releases").iterdir()) == ["1"]
    # The status line names the channel, the map and the guard, not only "refused by guards:".
    st = cluster.cli("status", "--publisher")
    assert st.returncode == 1 and "channel mx, map transport: changes the value of" in st.stdout

    cluster.write_config(extra_publisher='[publisher.guards.transport]\nmax_change = "100%"\n')
    out = cluster.publish().stdout
    assert "published serial 2" in out
    assert json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"] == 2


def _rename_every_local_part(cluster: Cluster) -> None:
    """A botched migration: every account and alias renamed, alias targets following."""
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(update(t.account).values(local_part="m-" + t.account.c.local_part))
        conn.execute(
            update(t.alias)
            .where(t.alias.c.local_part != "")
            .values(local_part="m-" + t.alias.c.local_part)
        )
        conn.execute(update(t.alias_target).values(target="m-" + t.alias_target.c.target))
    engine.dispose()


def test_a_release_that_replaces_every_key_at_the_same_size_is_refused(
    cluster: Cluster,
) -> None:
    cluster.publish()
    latest_before = (cluster.repo / "mx" / "LATEST").read_bytes()
    _rename_every_local_part(cluster)

    dry = cluster.cli("publish", "--dry-run", "--json")
    assert dry.returncode == 4, dry.stdout + dry.stderr
    recipients = next(
        m for m in json.loads(dry.stdout)["channels"][0]["maps"] if m["name"] == "recipients"
    )
    # Same size, every key replaced (catch-alls aside): what the net count hid.
    n, gone = recipients["before"], recipients["removed"]
    assert recipients["after"] == n and recipients["added"] == gone and gone > 0.9 * n
    assert recipients["changed"] == 0

    proc = cluster.cli("publish")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert (
        f"channel mx, map recipients: removes {gone / n:.1%} of its keys ({gone} of {n}; "
        f"{n} → {n} entries), more than max_shrink = 10%"
    ) in proc.stderr
    assert (cluster.repo / "mx" / "LATEST").read_bytes() == latest_before


def _mx_maps(cluster: Cluster, maps: str) -> None:
    text = cluster.config_path.read_text()
    old = 'maps = ["domains", "recipients", "virtual", "transport"]'
    cluster.config_path.write_text(text.replace(old, f"maps = {maps}", 1))


def test_dropping_a_map_from_a_channel_is_a_change_a_guard_refuses_until_forced(
    cluster: Cluster,
) -> None:
    cluster.publish()
    virtual = json.loads((cluster.repo / "mx" / "releases" / "1" / "MANIFEST.json").read_text())[
        "maps"
    ]["virtual"]["entries"]
    latest_before = (cluster.repo / "mx" / "LATEST").read_bytes()
    _mx_maps(cluster, '["domains", "recipients", "transport"]')

    # The plan shows the removal, as a table and as JSON; the dry run exits as the run would.
    dry = cluster.cli("publish", "--dry-run")
    assert dry.returncode == 4, dry.stdout + dry.stderr
    row = next(
        line.split() for line in dry.stdout.splitlines() if line.strip().startswith("virtual")
    )
    assert row == [
        "virtual",
        str(virtual),
        "0",
        "0",
        str(virtual),
        "0",
        "dropped",
        "from",
        "the",
        "channel",
    ]
    doc = json.loads(cluster.cli("publish", "--dry-run", "--json").stdout)
    (planned,) = [m for m in doc["channels"][0]["maps"] if m["name"] == "virtual"]
    assert planned["dropped"] is True and planned["removed"] == virtual and planned["after"] == 0

    refused = cluster.cli("publish")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert (
        f"channel mx, map virtual: the map is dropped from the channel ({virtual} entries in the "
        "previous release, not in [publisher.channels.mx] maps)"
    ) in refused.stderr
    assert (cluster.repo / "mx" / "LATEST").read_bytes() == latest_before

    # With --force: published and recorded, as any forced guard (log, plan, manifest, history).
    forced = cluster.cli("publish", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "guard overridden by --force" in forced.stderr and "map=virtual" in forced.stderr
    row = next(
        line.split() for line in forced.stdout.splitlines() if line.strip().startswith("virtual")
    )
    assert row[-1] == "forced" and "dropped" in row
    m = json.loads((cluster.repo / "mx" / "releases" / "2" / "MANIFEST.json").read_text())
    assert "virtual" not in m["maps"] and m["dropped"] == ["virtual"]
    history = cluster.cli("history", check=True).stdout
    assert "dropped: virtual" in next(
        line for line in history.splitlines() if line.split()[0] == "2"
    )

    # Dropped once: the next run judges the new map set, no further refusal.
    assert cluster.cli("publish").returncode == 0


def test_a_refused_run_says_nothing_untrue_about_its_pushes(cluster: Cluster) -> None:
    """Neither 'would push serial 2' for a serial the guards refuse, nor 'has serial 1' as if
    the node were up to date, on a run that failed."""
    inbox = cluster.root / "node" / "inbox" / "mx"
    inbox.parent.mkdir(parents=True)
    text = cluster.config_path.read_text()
    maps = 'maps = ["domains", "recipients", "virtual", "transport"]\n'
    cluster.config_path.write_text(text.replace(maps, maps + f'push = ["{inbox}"]\n', 1))
    first = cluster.publish().stdout
    assert f"pushed serial 1 to {inbox}" in first
    _rename_every_local_part(cluster)

    dry = cluster.cli("publish", "--dry-run")
    assert dry.returncode == 4, dry.stdout + dry.stderr
    assert "would push" not in dry.stdout and "has serial" not in dry.stdout

    refused = cluster.cli("publish")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "has serial" not in refused.stdout and "pushed" not in refused.stdout
    assert json.loads((inbox / "LATEST").read_text())["serial"] == 1

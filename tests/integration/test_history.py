"""`mapsync history` and `mapsync diff` on the publisher's repository."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sqlalchemy import create_engine, delete, insert, select, update

from mapsync.sources import schema as t
from tests.conftest import Cluster
from tests.helpers.agent import add_account


def test_history_and_diff_name_the_release_and_the_keys_that_changed(cluster: Cluster) -> None:
    cluster.publish()
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(
            insert(t.account).values(domain_id=2, local_part="new.person", status="active")
        )
        conn.execute(delete(t.alias_target).where(t.alias_target.c.alias_id == 1))
        conn.execute(delete(t.alias).where(t.alias.c.id == 1))
    engine.dispose()
    cluster.publish("--force")  # removing a catch-all may trip a guard on a small map

    hist = json.loads(cluster.cli("history", "--json", check=True).stdout)["mx"]
    assert [h["serial"] for h in hist] == [1, 2]
    assert hist[1]["latest"] and not hist[0]["latest"]
    assert "recipients" in hist[1]["changed"]
    assert hist[1]["changed"] == ["recipients", "virtual"]

    out = cluster.cli("diff", "1", "2", "--keys", check=True).stdout
    assert "  + new.person@example-2.org" in out
    assert "domains: +0 -0 ~0" in out
    # one account added, one alias removed: the alias's address leaves recipients and virtual
    assert out.count("\n  - ") >= 2
    assert "recipients: +1 -1 ~0" in out or "recipients: +2 -2 ~0" in out  # + alias-domain copy

    missing = cluster.cli("diff", "1", "9")
    assert missing.returncode == 2
    assert "release 9 is not kept" in missing.stderr


HASH_1 = "{SHA512-CRYPT}$6$saltsaltsalt$" + "a" * 86
HASH_2 = "{SHA512-CRYPT}$6$saltsaltsalt$" + "b" * 86


def test_diff_names_a_changed_password_and_never_prints_a_hash(cluster: Cluster) -> None:
    # A mailstore channel carries dovecot_users (user:hash:uid:gid::home::extra): a changed
    # password is one changed user, shown without either hash, by the publisher and the node.
    cluster.write_config(
        source=str(cluster.repo / "store"),
        extra_publisher='[publisher.channels.store]\nmaps = ["dovecot_users"]\n',
    )
    text = cluster.config_path.read_text().replace("[agent.channels.mx]", "[agent.channels.store]")
    cluster.config_path.write_text(text)
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(update(t.account).values(password_hash=HASH_1, home=None))
    cluster.publish("--channel", "store")
    cluster.pull()
    with engine.begin() as conn:
        conn.execute(update(t.account).where(t.account.c.id == 1).values(password_hash=HASH_2))
        user = "{}@{}".format(
            *conn.execute(
                select(t.account.c.local_part, t.domain.c.name)
                .join(t.domain, t.domain.c.id == t.account.c.domain_id)
                .where(t.account.c.id == 1)
            ).one()
        )
    engine.dispose()
    cluster.publish("--channel", "store")
    cluster.pull()

    for where in ([], ["--agent"]):
        store = [*where, "--channel", "store"]
        out = cluster.cli("diff", *store, "1", "2", "--keys", check=True).stdout
        assert out == f"dovecot_users: +0 -0 ~1\n  ~ {user} (password changed)\n", out
        out += cluster.cli("history", *store, check=True).stdout
        out += cluster.cli("history", *store, "--json", check=True).stdout
        assert "$6$" not in out and "aaaa" not in out and "bbbb" not in out, out

    # Re-publishing serial 1 is the same change backwards: one changed user, never +1 -1.
    back = cluster.cli("rollback", "--publisher", "--channel", "store", "1", check=True).stdout
    (row,) = [
        line.split() for line in back.splitlines() if line.strip().startswith("dovecot_users")
    ]
    assert row[-3:] == ["0", "0", "1"], back
    assert "$6$" not in back and "aaaa" not in back and "bbbb" not in back, back


def _three_kept(cluster: Cluster) -> Path:
    """Three releases published and pulled: the node's kept releases directory."""
    for local in ("", "kept.two", "kept.three"):
        if local:
            add_account(cluster, local)
        cluster.publish()
        cluster.pull()
    return cluster.state / "mx" / "releases"


def test_history_on_a_node_lists_the_kept_releases_around_a_damaged_one(
    cluster: Cluster,
) -> None:
    """One kept manifest damaged (a disk, a hand) made `history --agent` fail whole (exit 5):
    the others are listed, the damaged one named in a warning."""
    kept = _three_kept(cluster)
    (kept / "2" / "MANIFEST.json").write_text("{ damaged")
    p = cluster.cli("history", "--agent")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [line.split()[0] for line in p.stdout.splitlines()[1:]] == ["1", "3"]
    assert "release not listed: its manifest cannot be read" in p.stderr
    assert str(kept / "2" / "MANIFEST.json") in p.stderr


def test_history_and_diff_never_show_a_release_as_another_or_with_altered_files(
    cluster: Cluster,
) -> None:
    """A kept copy that is another release (copied by hand, another channel's) was listed as
    the one its directory names (release 1's maps as a "renewal" numbered 2), and diff showed
    an altered file's lines as the release's: both read the files unchecked."""
    kept = _three_kept(cluster)
    shutil.rmtree(kept / "2")
    shutil.copytree(kept / "1", kept / "2")  # release 1, as if it were 2
    p = cluster.cli("history", "--agent")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [line.split()[0] for line in p.stdout.splitlines()[1:]] == ["1", "3"], p.stdout
    assert "is release 1 of channel 'mx', not release 2 of 'mx'" in p.stderr
    d = cluster.cli("diff", "--agent", "2", "3")
    assert d.returncode == 5 and d.stdout == "", d.stdout + d.stderr
    assert f"mapsync: {kept / '2' / 'MANIFEST.json'}: is release 1 of channel 'mx'" in d.stderr

    recipients = cluster.repo / "mx" / "releases" / "2" / "recipients"
    recipients.write_text(recipients.read_text() + "injected@example-1.org OK\n")
    d = cluster.cli("diff", "--keys", "1", "2")
    assert d.returncode == 5 and "injected" not in d.stdout, d.stdout + d.stderr
    assert f"mapsync: {recipients}: sha256 " in d.stderr and "the file was altered" in d.stderr

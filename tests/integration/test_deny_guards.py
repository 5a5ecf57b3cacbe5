"""``dovecot_deny`` is a list of exceptions: a publish may empty it or allow a few accounts
again without ``--force``, while a mass denial (everyone's POP3 off at once: a botched
migration locks users out) is refused by ``max_growth`` like any other map's growth; a
``[publisher.guards.dovecot_deny]`` table takes the operator's own limits instead."""

from __future__ import annotations

from sqlalchemy import create_engine, update

from mapsync.sources import schema as t
from tests.conftest import Cluster

CHANNEL = '[publisher.channels.imap]\nmaps = ["dovecot_proxy", "dovecot_deny"]\n'


def _allow(cluster: Cluster, **values: bool) -> None:
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(update(t.account).values(**values))
    engine.dispose()


def _deny_lines(cluster: Cluster) -> list[str]:
    text = (cluster.repo / "imap" / "releases").glob("*/dovecot_deny")
    newest = max(text, key=lambda p: int(p.parent.name))
    return [line for line in newest.read_text().splitlines() if not line.startswith("#")]


def _deny_pop3(cluster: Cluster, ids: range) -> None:
    engine = create_engine(cluster.db_url)
    with engine.begin() as conn:
        conn.execute(update(t.account).where(t.account.c.id.in_(ids)).values(allow_pop3=False))
    engine.dispose()


def test_a_deny_list_may_empty_but_not_swell_without_force(cluster: Cluster) -> None:
    cluster.write_config(extra_publisher=CHANNEL)
    cluster.publish()
    seeded = _deny_lines(cluster)  # seed: one account in 25 IMAP-only, one in 50 may not send
    assert seeded and {line.split("/")[0] for line in seeded} <= {"pop3", "smtp", "submission"}

    _allow(cluster, allow_imap=True, allow_pop3=True, allow_submission=True)
    p = cluster.publish()  # 100 % shrink to 0 entries: no guard objects
    assert _deny_lines(cluster) == [], p.stdout

    _deny_pop3(cluster, range(2, 16))  # from an empty list: growth is not measured below 10
    cluster.publish()
    few = _deny_lines(cluster)
    assert 10 <= len(few) <= 14  # a disabled account is in no map

    _allow(cluster, allow_pop3=False)  # everyone's POP3 at once: max_growth refuses it
    p = cluster.cli("publish")
    assert p.returncode == 4, p.stdout + p.stderr
    assert "channel imap, map dovecot_deny: adds" in p.stderr
    assert "more than max_growth = 100%" in p.stderr
    assert _deny_lines(cluster) == few  # nothing written

    # The operator's own table for the map starts from the exception defaults ...
    cluster.write_config(
        extra_publisher='[publisher.guards.dovecot_deny]\nmax_growth = "1000%"\n' + CHANNEL
    )
    cluster.publish()
    assert len(_deny_lines(cluster)) > 100
    _allow(cluster, allow_pop3=True)
    cluster.publish()  # still may empty
    assert _deny_lines(cluster) == []
    # ... and sets what it names, shrink included.
    cluster.write_config(
        extra_publisher='[publisher.guards.dovecot_deny]\nmax_shrink = "10%"\n' + CHANNEL
    )
    _deny_pop3(cluster, range(2, 16))
    cluster.publish()
    _allow(cluster, allow_pop3=True)
    p = cluster.cli("publish")
    assert p.returncode == 4, p.stdout + p.stderr
    assert "channel imap, map dovecot_deny: removes 100.0% of its keys" in p.stderr

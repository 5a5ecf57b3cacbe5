"""A database outage is invisible to mail flow: with the central database unreachable, a
running Postfix on the published maps still accepts a known recipient and refuses an unknown
one, the publisher fails cleanly (exit 2, the database named, nothing published), the nodes'
status stays OK, and ``status --publisher`` says the publisher is failing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.daemons.postfix_instance import PostfixInstance, Reply
from tests.daemons.roles import Nodes, entries
from tests.helpers.dbtrouble import repo_tree
from tests.helpers.postfix import running_mx
from tests.helpers.transport import free_port

pytestmark = pytest.mark.daemons

ROLE = "postfix-mx"
ACCEPTED: Reply = (250, "2.1.5 Ok")


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    return free_port()


@pytest.fixture
def mx() -> Iterator[tuple[Nodes, PostfixInstance]]:
    """A seeded publisher, the ``postfix-mx`` node pulled once, and a Postfix started on it."""
    with running_mx("mapsync-out-", accounts=60, domains=5, aliases=10) as mx:
        yield mx


def test_a_database_outage_is_invisible_to_mail_flow(mx: tuple[Nodes, PostfixInstance]) -> None:
    nodes, postfix = mx
    c = nodes.cluster
    known = "postmaster@example-1.org"
    unknown = "nobody-here@example-1.org"
    assert known in entries(nodes.target(ROLE) / "recipients")
    assert c.cli("status").returncode == 0

    # The central database goes away: the publisher's URL now reaches nothing (a PostgreSQL
    # server that is down), with a password that must not be shown anywhere.
    url = f"postgresql+psycopg://mapsync:db-secret@127.0.0.1:{closed_port()}/mail"
    config = c.config_path.read_text()
    c.config_path.write_text(config.replace(c.db_url, url))
    before = repo_tree(c.repo)

    for _ in range(2):  # a timer keeps trying: each run fails the same clean way
        proc = c.cli("publish")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith(
            "mapsync: database postgresql+psycopg://mapsync:***@127.0.0.1:"
        ), proc.stderr
        assert "failed: connection failed" in proc.stderr and "Connection refused" in proc.stderr
        assert "db-secret" not in proc.stdout + proc.stderr
        assert repo_tree(c.repo) == before  # nothing published, nothing half-written

    # The nodes: a pull finds the release it has, status stays OK.
    assert c.cli("pull").returncode == 0
    status = c.cli("status")
    assert status.returncode == 0, status.stdout
    assert status.stdout.startswith("MAPSYNC OK")

    # Mail flows: a fresh SMTP connection (a fresh smtpd) answers from the installed maps.
    replies = postfix.rcpt(known, unknown)
    assert replies[known] == ACCEPTED
    assert replies[unknown][0] == 550, replies[unknown]
    assert "User unknown in relay recipient table" in replies[unknown][1]

    # The publisher's own status is where the outage shows.
    pub = c.cli("status", "--publisher")
    assert pub.returncode == 1, pub.stdout + pub.stderr
    assert pub.stdout.startswith("MAPSYNC PUBLISHER WARNING - last run failed ")
    assert "Connection refused" in pub.stdout
    assert "db-secret" not in pub.stdout

    # The database is back: the next run catches up and the publisher is OK again.
    c.config_path.write_text(config)
    assert c.cli("publish").returncode == 0
    assert c.cli("status", "--publisher").returncode == 0

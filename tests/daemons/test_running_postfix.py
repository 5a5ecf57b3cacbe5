"""A running Postfix, configured with the ``postfix-mx`` snippet, answers RCPT TO from the maps
the agent installed, and follows each publish and pull.

The agent swaps the live set and deletes the old set's files, so every Postfix daemon holding
them open sees ``st_nlink == 0``. What that buys (Postfix 3.7):

* ``smtpd`` (relay_recipient_maps) and ``cleanup`` (virtual_alias_maps) check their tables
  before accepting each new client: the very first SMTP connection after the swap is served
  by a fresh smtpd with the new maps. Account changes need no ``postfix reload`` (asserted).
* ``trivial-rewrite`` answers smtpd whether a domain is a relay domain (relay_domains) and
  where mail goes (transport_maps). Its clients keep their connections, so it checks its
  tables on a timer instead: 10 s after it started, then every 10 s
  (CHECK_TABLE_STATS_PERIODICALLY in trivial-rewrite.c). A new domain is refused with
  "Relay access denied" after the swap until the reload hook of
  ``agents/postfix-mx/agent.toml`` runs (asserted). Observed while writing this, not
  asserted (it takes longer than a test should): smtpd caches trivial-rewrite's answer per
  address for the life of the smtpd process, so an address refused in that window stays
  refused by that process (up to max_use 100 clients / max_idle 100 s) even after
  trivial-rewrite has restarted; ``postfix reload`` ends those processes too.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, delete, insert, select

from mapsync import config
from mapsync.sources import schema as t
from tests.daemons.postfix_instance import PostfixInstance, Reply
from tests.daemons.roles import Nodes, entries
from tests.helpers.agent import add_account
from tests.helpers.mailstore import update_account
from tests.helpers.postfix import running_mx, use_reload_hook

pytestmark = pytest.mark.daemons

ROLE = "postfix-mx"
ACCEPTED: Reply = (250, "2.1.5 Ok")


@dataclass
class Mx:
    nodes: Nodes
    postfix: PostfixInstance

    @property
    def target(self) -> Path:
        return self.nodes.target(ROLE)

    @property
    def channel(self) -> str:
        return self.nodes.roles[ROLE].channel

    def agent_channel(self) -> config.AgentChannel:
        return self.nodes.cluster.config().need_agent().channels[self.channel]


@pytest.fixture
def mx() -> Iterator[Mx]:
    """A seeded publisher, the ``postfix-mx`` node pulled once, and a Postfix started on it."""
    with running_mx("mapsync-pfx-", accounts=120, domains=8, aliases=20) as (nodes, postfix):
        yield Mx(nodes, postfix)


# -- the central database -------------------------------------------------------------------


def _domain_id(conn: Connection, name: str) -> int:
    return int(conn.execute(select(t.domain.c.id).where(t.domain.c.name == name)).scalar_one())


def delete_account(db_url: str, address: str) -> None:
    local, _, domain = address.partition("@")
    engine = create_engine(db_url)
    with engine.begin() as conn:
        did = _domain_id(conn, domain)
        done = conn.execute(
            delete(t.account).where(t.account.c.domain_id == did, t.account.c.local_part == local)
        )
        assert done.rowcount == 1, address
    engine.dispose()


def unreferenced_account(db_url: str, domain: str) -> str:
    """An active account of ``domain`` that no alias points to (deleting it breaks nothing)."""
    engine = create_engine(db_url)
    with engine.connect() as conn:
        targets = set(conn.execute(select(t.alias_target.c.target)).scalars())
        locals_ = conn.execute(
            select(t.account.c.local_part)
            .where(t.account.c.domain_id == _domain_id(conn, domain))
            .where(t.account.c.status == "active", t.account.c.local_part != "postmaster")
            .order_by(t.account.c.local_part)
        ).scalars()
        address = next(a for a in (f"{lp}@{domain}" for lp in locals_) if a not in targets)
    engine.dispose()
    return address


def add_hosted_domain(db_url: str, name: str) -> None:
    """A hosted domain on mailstore 1 with its ``postmaster@`` (every hosted domain has one)."""
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            insert(t.domain).values(name=name, kind="hosted", customer_id=1, default_mailstore_id=1)
        )
        did = _domain_id(conn, name)
        conn.execute(
            insert(t.account).values(
                domain_id=did,
                local_part="postmaster",
                customer_id=1,
                home=f"/var/vmail/{name}/postmaster",
                status="active",
            )
        )
    engine.dispose()


# -- what Postfix answers -------------------------------------------------------------------


def unknown_user(address: str) -> Reply:
    return (
        550,
        f"5.1.1 <{address}>: Recipient address rejected: User unknown in relay recipient table",
    )


def relay_denied(address: str) -> Reply:
    return (554, f"5.7.1 <{address}>: Relay access denied")


def restarted(mx: Mx, daemon: str, since: int) -> str:
    """The maillog line of a ``daemon`` that found one of the maps changed and exited. It
    names the first changed table it checks, whichever that is: every map is a new inode."""
    return mx.postfix.wait_for_log(
        rf"postfix/{daemon}\[\d+\]: table cdb:{mx.target}/\w+\(.*\) has changed -- restarting",
        since,
    )


def no_reload_since(mx: Mx, since: int, master: int | None) -> None:
    assert mx.postfix.master_pid() == master
    assert " reload -- version" not in mx.postfix.log(since), mx.postfix.log(since)


# -- the tests ------------------------------------------------------------------------------


def test_recipients_follow_each_pull_on_the_next_connection_without_a_reload(mx: Mx) -> None:
    assert mx.agent_channel().reload == ()  # nothing tells Postfix about the swap
    pf = mx.postfix
    recipients = entries(mx.target / "recipients")
    alias = next(k for k in entries(mx.target / "virtual") if k.endswith("@example-1.org"))
    assert "postmaster@example-1.org" in recipients and alias in recipients

    replies = pf.rcpt(
        "postmaster@example-1.org",
        "Postmaster+Tag@Example-1.ORG",  # recipient_delimiter, case folding
        alias,
        "anyone@relay-1.example.com",  # relay domain: any recipient
        "nobody@example-1.org",
        "someone@example.invalid",  # not hosted here
    )
    assert replies == {
        "postmaster@example-1.org": ACCEPTED,
        "Postmaster+Tag@Example-1.ORG": ACCEPTED,
        alias: ACCEPTED,
        "anyone@relay-1.example.com": ACCEPTED,
        "nobody@example-1.org": unknown_user("nobody@example-1.org"),
        "someone@example.invalid": relay_denied("someone@example.invalid"),
    }

    # A new account: refused by the running smtpd, accepted on the first new connection
    # after publish and pull.
    new = "new.hire@example-1.org"
    assert pf.rcpt(new) == {new: unknown_user(new)}
    add_account(mx.nodes.cluster, "new.hire", "example-1.org")
    master, mark = pf.master_pid(), pf.log_size()
    mx.nodes.publish_and_pull()
    assert new in entries(mx.target / "recipients")
    assert pf.rcpt(new, "new.hire+news@example-1.org") == {
        new: ACCEPTED,
        "new.hire+news@example-1.org": ACCEPTED,
    }
    # Postfix noticed by itself: the smtpd holding the deleted maps exited before
    # accepting that connection, and no reload happened.
    restarted(mx, "smtpd", mark)
    no_reload_since(mx, mark, master)

    # Disabled: in no map, refused on the next connection. Deleted: the same.
    update_account(mx.nodes.cluster.db_url, new, status="disabled")
    mark = pf.log_size()
    mx.nodes.publish_and_pull()
    assert new not in entries(mx.target / "recipients")
    assert pf.rcpt(new, "postmaster@example-1.org") == {
        new: unknown_user(new),
        "postmaster@example-1.org": ACCEPTED,
    }
    restarted(mx, "smtpd", mark)

    seeded = unreferenced_account(mx.nodes.cluster.db_url, "example-2.org")
    assert seeded in recipients
    assert pf.rcpt(seeded) == {seeded: ACCEPTED}
    delete_account(mx.nodes.cluster.db_url, seeded)
    mark = pf.log_size()
    mx.nodes.publish_and_pull()
    assert pf.rcpt(seeded) == {seeded: unknown_user(seeded)}
    restarted(mx, "smtpd", mark)
    no_reload_since(mx, 0, master)


def test_a_new_domain_is_refused_until_the_reload_hook_runs(mx: Mx) -> None:
    pf = mx.postfix
    assert pf.started_at is not None
    db_url = mx.nodes.cluster.db_url
    # This connection makes smtpd ask trivial-rewrite about an address, so both daemons are
    # running with the maps of serial 1 before the swap.
    assert pf.rcpt("postmaster@example-1.org") == {"postmaster@example-1.org": ACCEPTED}

    first = "postmaster@new-1.example"
    add_hosted_domain(db_url, "new-1.example")
    mark = pf.log_size()
    mx.nodes.publish_and_pull()
    assert "new-1.example" in entries(mx.target / "domains")
    # trivial-rewrite checks its tables 10 s after it started and every 10 s after that; it
    # started after ``postfix start``, so until then it surely still has serial 1's domains.
    elapsed = time.monotonic() - pf.started_at
    assert elapsed < 8, f"premise: trivial-rewrite's first table check is 10 s away ({elapsed=})"
    # smtpd did restart with the new recipients.cdb, and yet the domain is not a relay
    # domain: that answer comes from trivial-rewrite, still on the old domains.cdb.
    assert pf.rcpt(first, "nobody@new-1.example") == {
        first: relay_denied(first),
        "nobody@new-1.example": relay_denied("nobody@new-1.example"),
    }
    restarted(mx, "smtpd", mark)
    assert not re.search(r"trivial-rewrite\[\d+\]: table", pf.log(mark)), pf.log(mark)

    # The operator's agent.toml runs `postfix reload` after a swap; here `-c` names this
    # instance. With it, the next publish and pull brings in both new domains.
    assert use_reload_hook(mx.nodes, pf) == ("postfix", "-c", str(pf.conf), "reload")

    second = "postmaster@new-2.example"
    add_hosted_domain(db_url, "new-2.example")
    mark = pf.log_size()
    mx.nodes.publish_and_pull()
    pf.wait_for_log(r"postfix/master\[\d+\]: reload -- version", mark)
    # `postfix reload` only signals the master and returns; the old smtpd and trivial-rewrite
    # processes exit when they notice, a moment later. Poll, for at most 2 s.
    want = {first: ACCEPTED, second: ACCEPTED}
    deadline = time.monotonic() + 2
    while (got := pf.rcpt(first, second)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    assert got == want, pf.log(mark)


def test_a_u_label_address_is_refused_at_rcpt_not_accepted_and_bounced(mx: Mx) -> None:
    """The shipped main.cf offers no SMTPUTF8 (Dovecot 2.3's LMTP does not): mail to the
    U-label form of an IDN domain's address is refused at RCPT (the sender's own bounce),
    where accepting it meant a bounce from the MX after 250 (5.6.7 SMTPUTF8 is required);
    the A-label form of the same address is accepted."""
    entries_ = entries(mx.target / "recipients")
    a_label = next(key for key in entries_ if key.endswith("@xn--bcher-1-n2a.example"))
    local = a_label.partition("@")[0]
    with mx.postfix.smtp() as s:
        s.command_encoding = "utf-8"
        code, _ = s.ehlo()
        assert code == 250 and not s.has_extn("smtputf8"), s.esmtp_features
        assert s.mail("sender@example.net")[0] == 250
        code, text = s.rcpt(f"{local}@bücher-1.example")
        assert code >= 500, (code, text)
        assert s.rcpt(a_label) == (250, b"2.1.5 Ok")
        s.rset()

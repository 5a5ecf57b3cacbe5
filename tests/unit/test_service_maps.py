"""Every account column means something: per-service login rules (``dovecot_deny``), the
submission relay's passdb (``dovecot_submission``) and the customer id in a mailstore's userdb
(``customer_field``), over the hand-built snapshot of tests/helpers/maps.py and from the real
sources (mapsync's own schema in SQLite, a PostfixAdmin database with and without
``smtp_active``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, update
from structlog.testing import capture_logs

from mapsync.config import PublisherChannel, load
from mapsync.errors import ConfigError
from mapsync.maps import CATALOGUE, Directory
from mapsync.publish.publisher import drop_invalid
from mapsync.publish.quiet import channel_digest
from mapsync.snapshot import Fingerprint, Snapshot
from mapsync.sources import schema as t
from mapsync.sources.builtin import BuiltinSource
from mapsync.sources.postfixadmin import PostfixAdminSource
from mapsync.sources.seed import SeedCounts, init_db, seed
from mapsync.validate import check
from tests.helpers.maps import ACCOUNTS, ALIASES, DOMAINS, STORES
from tests.helpers.postfixadmin import build

HASH = "{SHA512-CRYPT}$6$salt$hash"
# Domains 1 and 4 belong to customer 10, domain 3 to customer 20; frank has his own customer.
CUSTOMERS = {10: "C-0010", 20: "C-0020", 30: "C-0030"}


def snapshot(**extra: object) -> Snapshot:
    domains = [d._replace(customer_id={1: 10, 4: 10, 3: 20}.get(d.id)) for d in DOMAINS]
    accounts = [
        a._replace(password_hash=HASH, home=f"/var/vmail/{a.id}", quota_bytes=1024)
        for a in ACCOUNTS
    ]
    accounts = [a._replace(customer_id=30) if a.local_part == "frank" else a for a in accounts]
    snap = Snapshot(
        STORES,
        domains,
        accounts,
        ALIASES,
        Fingerprint({}),
        datetime.now(UTC),
        secrets=True,
        customers=dict(CUSTOMERS),
        # alice: no IMAP, no POP3; erin (store-2): no submission; x@catch.org: no POP3.
        denied={
            2: frozenset({"imap", "pop3"}),
            6: frozenset({"submission"}),
            9: frozenset({"pop3"}),
        },
    )
    return replace(snap, **extra)  # type: ignore[arg-type]


def render(name: str, snap: Snapshot, **channel: object) -> dict[str, str]:
    ch = PublisherChannel("c", (name,), **channel)  # type: ignore[arg-type]
    rows = list(CATALOGUE[name].entries(Directory(snap), ch))
    assert len(rows) == len({k for k, _ in rows}), "duplicate keys"
    return dict(rows)


def test_the_deny_map_lists_each_denied_service_of_each_account_and_nothing_else() -> None:
    deny = render("dovecot_deny", snapshot())
    assert deny == {
        "imap/alice@example.org": "",
        "pop3/alice@example.org": "",
        # allow_submission covers Dovecot's submission service and Postfix's SASL (smtp)
        "smtp/erin@example.org": "",
        "submission/erin@example.org": "",
        "pop3/x@catch.org": "",
    }


def test_a_mailstore_channel_gets_only_its_own_accounts_denials() -> None:
    assert set(render("dovecot_deny", snapshot(), mailstore="store-2")) == {
        "smtp/erin@example.org",
        "submission/erin@example.org",
    }
    assert "smtp/erin@example.org" not in render("dovecot_deny", snapshot(), mailstore="store-1")


def test_no_denials_make_an_empty_deny_map_which_no_guard_refuses() -> None:
    assert render("dovecot_deny", snapshot(denied={})) == {}
    spec = CATALOGUE["dovecot_deny"]
    assert spec.exceptions and not spec.secrets and spec.per_mailstore


def test_the_submission_passdb_holds_every_account_that_may_send_with_its_hash_only() -> None:
    sub = render("dovecot_submission", snapshot())
    # every mailstore's accounts (erin is on store-2, anna's domain on store-2), but not erin
    # (allow_submission off), carol (login-disabled), bob/y (disabled), s (suspended domain),
    # d (disabled domain)
    assert set(sub) == {
        "postmaster@example.org",
        "alice@example.org",  # no IMAP, no POP3, but may send
        "dave@example.org",  # moving: the mailbox moves, sending goes on
        "frank@example.org",
        "anna@xn--bcher-kva.example",
        "x@catch.org",
        "mover@catch.org",
    }
    for line in sub.values():  # all seven colons, nothing after the hash: no uid, home, quota
        assert line == HASH + "::::::"


def test_the_customer_id_is_a_userdb_field_only_where_the_channel_names_it() -> None:
    plain = render("dovecot_users", snapshot())
    assert not any("C-00" in v for v in plain.values())  # off by default
    users = render("dovecot_users", snapshot(), customer_field="customer_id")
    extra = {k: v.split(":", 6)[6].split() for k, v in users.items()}
    assert "userdb_customer_id=C-0010" in extra["alice@example.org"]  # its domain's customer
    assert "userdb_customer_id=C-0030" in extra["frank@example.org"]  # its own customer
    assert "userdb_customer_id=C-0020" in extra["anna@xn--bcher-kva.example"]
    # Everything else on the line is as without the field: the format only grows.
    for key, value in users.items():
        without = [f for f in value.split(":", 6)[6].split() if not f.startswith("userdb_cust")]
        assert value.split(":", 6)[:6] == plain[key].split(":", 6)[:6]
        assert without == plain[key].split(":", 6)[6].split()


def test_a_bad_ext_id_is_a_problem_only_where_carried_and_skipping_drops_only_the_field() -> None:
    snap = snapshot(customers={**CUSTOMERS, 10: "ACME 10%"})
    assert check(snap) == []  # nobody carries customer ids: ext_id is not a map's business
    problems = check(snap, customers=True)
    assert [(p.table, p.row, p.field) for p in problems] == [("customer", 10, "ext_id")]
    assert "ext_id 'ACME 10%' cannot be a userdb field value" in str(problems[0])
    skipped = drop_invalid(snap, problems)
    assert check(skipped, customers=True) == []
    users = render("dovecot_users", skipped, customer_field="customer_id")
    assert "userdb_customer_id" not in users["alice@example.org"]  # the field only ...
    assert users["alice@example.org"].startswith(HASH)  # ... the login stays
    assert "userdb_customer_id=C-0030" in users["frank@example.org"]


def test_a_customer_id_of_no_customer_is_warned_not_dropped_silently() -> None:
    """A customer deleted without its domains (SQLite keeps no foreign key unless told): the
    userdb lines lost their customer field without a word."""
    snap = snapshot(customers={k: v for k, v in CUSTOMERS.items() if k != 10})
    with capture_logs() as logs:
        assert check(snap, customers=True) == []
    found = [e for e in logs if "customer_id of no customer" in e["event"]]
    assert [e["customer_id"] for e in found] == [10]
    users = render("dovecot_users", snap, customer_field="customer_id")
    assert "userdb_customer_id" not in users["alice@example.org"]
    with capture_logs() as logs:
        check(snap)  # no channel carries customer ids: nothing to say
    assert not [e for e in logs if "customer_id of no customer" in e["event"]]


def test_customer_field_in_config(tmp_path: Path) -> None:
    """(The refusals are fixtures of tests/unit/test_config.py: bad-customer-field-*.toml.)"""
    path = tmp_path / "mapsync.toml"
    path.write_text(
        '[publisher]\ndatabase = "sqlite:///c.db"\nrepository = "repo"\n'
        'signing_key = "k/signing.key"\n[publisher.channels.store-1]\n'
        'maps = ["dovecot_users"]\nmailstore = "store-1"\ncustomer_field = "customer_id"\n'
    )
    assert load(path).need_publisher().channels["store-1"].customer_field == "customer_id"
    for name in ("Customer-ID", "quota_rule2", "uid", "9lives"):
        path.write_text(path.read_text().replace('"customer_id"', f'"{name}"'))
        with pytest.raises(ConfigError, match="is not a free userdb field name"):
            load(path)
        path.write_text(path.read_text().replace(f'"{name}"', '"customer_id"'))


def test_a_channel_without_customer_field_keeps_its_digest() -> None:
    ch = PublisherChannel("store-1", ("dovecot_users",), mailstore="store-1")
    assert channel_digest(ch) != channel_digest(replace(ch, customer_field="customer_id"))
    # The digest of a channel without the option is what it was before the option existed.
    assert channel_digest(ch) == channel_digest(replace(ch, customer_field=None))


@pytest.mark.parametrize("db", ["sqlite_url", "pg_url", "mariadb_url"])
def test_the_builtin_source_reads_allow_columns_and_customers(
    request: pytest.FixtureRequest, db: str
) -> None:
    url = request.getfixturevalue(db)
    seed(url, SeedCounts(accounts=40, domains=4, aliases=5, mailstores=2), seed=3)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(update(t.account).where(t.account.c.id == 2).values(allow_imap=False))
        conn.execute(
            update(t.account)
            .where(t.account.c.id == 3)
            .values(allow_pop3=False, allow_submission=False)
        )
        ext = dict(conn.execute(select(t.customer.c.id, t.customer.c.ext_id)).all())
        owner = conn.execute(select(t.account.c.customer_id).where(t.account.c.id == 2)).scalar()
    engine.dispose()
    source = BuiltinSource(url)
    try:
        snap_without = source.snapshot(secrets=True)  # no channel carries customer ids
        source.customers = True  # as the publisher sets it for a customer_field channel
        snap = source.snapshot(secrets=True)
        lean = source.snapshot(secrets=False)
    finally:
        source.close()
    assert all(a.customer_id is None for a in snap_without.accounts)
    # seeded: ids divisible by 25 POP3-less, ids 7 mod 50 may not send (never a postmaster)
    assert snap.denied == {
        2: frozenset({"imap"}),
        3: frozenset({"pop3", "submission"}),
        7: frozenset({"submission"}),
        25: frozenset({"pop3"}),
    }
    assert lean.denied == snap.denied  # the proxy's run (no secrets) needs them too
    assert snap.customers == ext
    account = next(a for a in snap.accounts if a.id == 2)
    assert account.customer_id == owner is not None
    assert all(a.customer_id is None for a in lean.accounts)  # read with the secrets only
    assert all(d.customer_id in ext for d in snap.domains if d.kind == "hosted")


@pytest.mark.parametrize(("version", "denied"), [(1856, {"gus@example.com"}), (1847, set())])
def test_postfixadmin_smtp_active_denies_submission_where_the_column_exists(
    sqlite_url: str, version: int, denied: set[str]
) -> None:
    build(sqlite_url, version=version)
    source = PostfixAdminSource(sqlite_url)
    try:
        snap = source.snapshot(secrets=True)
    finally:
        source.close()
    domains = {d.id: d.name for d in snap.domains}
    names = {a.id: f"{a.local_part}@{domains[a.domain_id]}" for a in snap.accounts}
    assert {names[i] for i in snap.denied} == denied
    assert all(s == frozenset({"submission"}) for s in snap.denied.values())
    sub = render("dovecot_submission", snap)
    assert ("gus@example.com" in sub) == (not denied)


def test_init_db_on_an_existing_database_keeps_every_row(sqlite_url: str) -> None:
    made = seed(sqlite_url, SeedCounts(accounts=30, domains=3, aliases=5, mailstores=1), seed=2)
    init_db(sqlite_url)
    engine = create_engine(sqlite_url)
    with engine.connect() as conn:
        for table in (t.customer, t.mailstore, t.domain, t.account, t.alias):
            count = conn.execute(select(func.count()).select_from(table)).scalar_one()
            assert count == made[table.name], table.name
    engine.dispose()

"""Which mailstore's channel a skipped row belongs to (``publish --skip-invalid``)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mapsync.config import PublisherChannel
from mapsync.publish.publisher import Scope
from mapsync.snapshot import Account, Alias, Domain, Fingerprint, Mailstore, Snapshot
from mapsync.validate import Problem

STORES = [
    Mailstore(1, "store-1", "10.0.1.11", 24, "10.0.1.11", 143, True),
    Mailstore(2, "store-2", "10.0.1.12", 24, "10.0.1.12", 143, True),
]
DOMAINS = [
    Domain(1, "one.example", None, "hosted", None, 1, None, "active"),
    Domain(2, "two.example", None, "hosted", None, 2, None, "active"),
    Domain(3, "alias.example", None, "alias", 1, None, None, "active"),
]
ACCOUNTS = [
    Account(1, 1, "ann", None, "active"),  # store-1 by its domain
    Account(2, 1, "bob", 2, "active"),  # store-2 directly, in a store-1 domain
    Account(3, 2, "cy", None, "active"),  # store-2 by its domain
]
SNAP = Snapshot(
    STORES,
    DOMAINS,
    ACCOUNTS,
    [Alias(1, 1, "sales", ("ann@one.example",))],
    Fingerprint({}),
    datetime.now(UTC),
    secrets=True,
)
STORE_1 = PublisherChannel("store-1", ("dovecot_users",), mailstore="store-1")
STORE_2 = PublisherChannel("store-2", ("dovecot_users",), mailstore="store-2")
EVERY_STORE = PublisherChannel("all", ("dovecot_users",))
MX = PublisherChannel("mx", ("recipients", "virtual"))


def _account(row: int, field: str | None = "password_hash") -> Problem:
    return Problem("account", row, "x", "bad", field)


@pytest.mark.parametrize(
    ("problem", "stores"),
    [
        (_account(1), {"store-1"}),
        (_account(2), {"store-2"}),  # its own mailstore wins over its domain's
        (_account(3), {"store-2"}),
        (Problem("domain", 1, "one.example", "bad"), {"store-1", "store-2"}),
        (Problem("domain", 2, "two.example", "bad"), {"store-2"}),
        (Problem("domain", 3, "alias.example", "bad"), set()),
        (Problem("mailstore", 2, "store-2", "bad", "lmtp_host"), {"store-2"}),
    ],
)
def test_a_row_belongs_to_the_mailstores_that_house_it(problem: Problem, stores: set[str]) -> None:
    assert Scope(SNAP).mailstores(problem) == stores


def test_a_mailstore_channel_records_only_its_own_accounts() -> None:
    scope = Scope(SNAP)
    bad_hash = _account(2)
    assert not scope.concerns(bad_hash, STORE_1)
    assert scope.concerns(bad_hash, STORE_2)
    assert scope.concerns(bad_hash, EVERY_STORE)  # no mailstore named: every account
    assert not scope.concerns(bad_hash, MX)  # the MX does not carry hashes
    bad_home = _account(2, None)  # a row invalid as a whole
    assert scope.concerns(bad_home, MX) and scope.concerns(bad_home, STORE_2)
    assert not scope.concerns(bad_home, STORE_1)
    # A map the mailstore does not filter (recipients) carries every store's rows.
    mixed = PublisherChannel("mixed", ("dovecot_users", "recipients"), mailstore="store-1")
    assert scope.concerns(bad_home, mixed) and not scope.concerns(bad_hash, mixed)

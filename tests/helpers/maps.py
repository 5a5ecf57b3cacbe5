"""A hand-built snapshot for the map tests (pure logic): every kind of domain, account and
alias a renderer must handle, with an IDN domain, a catch-all, an off-store account."""

from __future__ import annotations

from mapsync.snapshot import Account, Alias, Domain, Mailstore

IDN = "xn--bcher-kva.example"
IDN_U = "bücher.example"

STORES = [
    Mailstore(1, "store-1", "10.0.1.11", 24, "10.0.1.11", 143, True),
    Mailstore(2, "store-2", "10.0.1.12", 2424, "10.0.1.12", 143, True),
]
DOMAINS = [
    Domain(1, "example.org", None, "hosted", None, 1, None, "active"),
    Domain(2, "example.net", None, "alias", 1, None, None, "active"),
    Domain(3, IDN, IDN_U, "hosted", None, 2, None, "active"),
    Domain(4, "catch.org", None, "hosted", None, 1, None, "active"),
    Domain(
        5, "relay.example.com", None, "relay", None, None, "[mx.relay.example.com]:25", "active"
    ),
    Domain(6, "suspended.org", None, "hosted", None, 1, None, "suspended"),
    Domain(7, "disabled.org", None, "hosted", None, 1, None, "disabled"),
    Domain(8, "catch-alias.org", None, "alias", 4, None, None, "active"),
    Domain(9, "off-alias.org", None, "alias", 1, None, None, "disabled"),
]
ACCOUNTS = [
    Account(1, 1, "postmaster", None, "active"),
    Account(2, 1, "alice", None, "active"),
    Account(3, 1, "bob", None, "disabled"),
    Account(4, 1, "carol", None, "login_disabled"),
    Account(5, 1, "dave", None, "moving"),
    Account(6, 1, "erin", 2, "active"),  # housed off its domain's default store
    Account(7, 1, "frank", 1, "active"),  # explicitly on the default store
    Account(8, 3, "anna", None, "active"),
    Account(9, 4, "x", None, "active"),
    Account(10, 4, "y", None, "disabled"),
    Account(11, 6, "s", None, "active"),
    Account(12, 7, "d", None, "active"),
    Account(13, 4, "mover", 2, "moving"),
]
ALIASES = [
    Alias(1, 1, "info", ("alice@example.org", "ext@other.example")),
    Alias(2, 4, "", ("x@catch.org",)),
    Alias(3, 3, "team", ("anna@xn--bcher-kva.example",)),
    Alias(4, 7, "gone", ("alice@example.org",)),
]

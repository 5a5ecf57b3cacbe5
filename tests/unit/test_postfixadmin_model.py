"""What the PostfixAdmin source needed from the neutral model, on hand-built snapshots:
forwards of accounts (PostfixAdmin's "forward" and "forward and keep a copy"), problems named
in the source's own tables, a bad password hash that costs only the login under
``--skip-invalid``, and PostfixAdmin's stored password formats with their Dovecot schemes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from mapsync.config import PostfixAdminConfig, PublisherChannel
from mapsync.maps import CATALOGUE, Directory
from mapsync.publish.publisher import drop_invalid
from mapsync.snapshot import Account, Alias, Domain, Fingerprint, Mailstore, Snapshot
from mapsync.sources.postfixadmin import _Reader, dovecot_password, relay_nexthop
from mapsync.validate import check

STORE = Mailstore(1, "local", "127.0.0.1", 24, "127.0.0.1", 143, True)
DOMAIN = Domain(1, "example.com", None, "hosted", None, 1, None, "active")
HASH = "{SHA512-CRYPT}$6$salt$hash"
ACCOUNTS = [
    Account(1, 1, "postmaster", None, "active", HASH, "/var/vmail/example.com/postmaster/"),
    Account(2, 1, "dave", None, "active", HASH, "/var/vmail/example.com/dave/"),
    Account(3, 1, "fay", None, "active", HASH, "/var/vmail/example.com/fay/"),
]
FORWARDS = [
    Alias(10, 1, "dave", ("dave@elsewhere.example", "dave@example.com")),  # keeps a copy
    Alias(11, 1, "fay", ("fay@elsewhere.example",)),  # forward only
]
MX = PublisherChannel("mx", ("recipients", "virtual"))
STORE_CHANNEL = PublisherChannel("store", ("dovecot_users",))


def snap(
    accounts: list[Account] = ACCOUNTS,
    aliases: list[Alias] | None = None,
    forwards: list[Alias] = FORWARDS,
) -> Snapshot:
    return Snapshot(
        mailstores=[STORE],
        domains=[DOMAIN],
        accounts=list(accounts),
        aliases=aliases or [],
        fingerprint=Fingerprint({}),
        taken_at=datetime.now(UTC),
        forwards=list(forwards),
        secrets=True,
    )


def render(name: str, s: Snapshot, channel: PublisherChannel = MX) -> dict[str, str]:
    entries = list(CATALOGUE[name].entries(Directory(s), channel))
    assert len(entries) == len({k for k, _ in entries}), f"duplicate keys in {name}"
    return dict(entries)


def test_a_forward_decides_where_the_accounts_mail_goes_and_keeps_its_login() -> None:
    s = snap(aliases=[Alias(20, 1, "", ("postmaster@example.com",))])  # with a catch-all
    assert check(s) == []
    virtual = render("virtual", s)
    assert virtual["dave@example.com"] == "dave@elsewhere.example,dave@example.com"
    assert virtual["fay@example.com"] == "fay@elsewhere.example"
    assert virtual["postmaster@example.com"] == "postmaster@example.com"  # identity line
    recipients = render("recipients", s)
    assert {"dave@example.com", "fay@example.com"} <= recipients.keys()
    users = render("dovecot_users", s, STORE_CHANNEL)
    assert {"dave@example.com", "fay@example.com"} <= users.keys()


def test_a_forward_of_no_account_or_twice_is_refused() -> None:
    stray = Alias(12, 1, "nobody", ("x@elsewhere.example",))
    again = Alias(13, 1, "fay", ("y@elsewhere.example",))
    got = {(p.table, p.row): p.reason for p in check(snap(forwards=[*FORWARDS, stray, again]))}
    assert got == {
        ("forward", 12): "forward of an address that is no account",
        ("forward", 13): "account forwarded twice",
    }


def test_an_alias_at_an_accounts_address_is_still_a_duplicate() -> None:
    # Only a forward may share an account's address; a plain alias there stays refused.
    s = snap(aliases=[Alias(20, 1, "dave", ("x@elsewhere.example",))], forwards=[])
    (p,) = check(s)
    assert (p.table, p.row) == ("alias", 20) and "also defined by account" in p.reason


def test_a_forward_into_a_loop_is_a_cycle_but_its_own_address_is_not() -> None:
    loop = [Alias(20, 1, "team", ("dave@example.com",))]
    forwards = [Alias(10, 1, "dave", ("team@example.com", "dave@example.com"))]
    (p,) = check(snap(aliases=loop, forwards=forwards))
    assert "alias cycle" in p.reason and p.table in ("alias", "forward")


def test_problems_carry_the_sources_own_names() -> None:
    s = snap(forwards=[Alias(12, 1, "nobody", ("x@elsewhere.example",))])
    s.describe = lambda table, row, key: f"alias {key!r}"
    (p,) = check(s)
    assert str(p) == "alias 'nobody@example.com': forward of an address that is no account"
    s.describe = None
    assert str(check(s)[0]).startswith("forward id=12 'nobody@example.com': ")


def test_skip_invalid_drops_only_the_login_of_a_bad_password() -> None:
    bad = ACCOUNTS[2]._replace(password_hash="{CLEARTEXT}secret")
    s = snap(accounts=[*ACCOUNTS[:2], bad])
    (p,) = check(s)
    assert p.login and "CLEARTEXT is not allowed" in p.reason
    kept = drop_invalid(s, [p])
    assert check(kept) == []  # and no second round: the login is gone, the account is not
    fay = next(a for a in kept.accounts if a.local_part == "fay")
    assert (fay.status, fay.password_hash) == ("login_disabled", None)
    assert "fay@example.com" in render("recipients", kept)
    line = render("dovecot_users", kept, STORE_CHANNEL)["fay@example.com"]
    assert line.startswith(":5000:5000::") and line.endswith("nologin=y")
    assert "secret" not in line


def test_a_bad_home_still_drops_the_whole_account() -> None:
    bad = ACCOUNTS[2]._replace(home="/var/vmail/../etc/")
    (p,) = check(snap(accounts=[*ACCOUNTS[:2], bad], forwards=[]))
    assert not p.login


@pytest.mark.parametrize(
    ("stored", "published"),
    [
        ("$2y$10$abc", "{BLF-CRYPT}$2y$10$abc"),
        ("$1$salt$hash", "{MD5-CRYPT}$1$salt$hash"),
        ("$5$salt$hash", "{SHA256-CRYPT}$5$salt$hash"),
        ("$6$salt$hash", "{SHA512-CRYPT}$6$salt$hash"),
        ("abNUttvdAqVOw", "{CRYPT}abNUttvdAqVOw"),
        ("93E8621C72995DBA43C2CFF6D64F3E93", "{PLAIN-MD5}93e8621c72995dba43c2cff6d64f3e93"),
        ("{SHA512-CRYPT.B64}JDYk", "{SHA512-CRYPT.B64}JDYk"),
        ("{ARGON2ID}$argon2id$v=19$x", "{ARGON2ID}$argon2id$v=19$x"),
        ("{CLEARTEXT}secret", "{CLEARTEXT}secret"),
        ("secret", "{CLEARTEXT}secret"),
        ("", None),
    ],
)
def test_postfixadmins_stored_passwords_get_dovecots_scheme(
    stored: str, published: str | None
) -> None:
    assert dovecot_password(stored) == published


@pytest.mark.parametrize(
    ("hash_", "refused"),
    [
        ("{SHA512-CRYPT.B64}JDYk", False),
        ("{PLAIN-MD5}93e8621c72995dba43c2cff6d64f3e93", False),  # weak: a warning
        ("{CLEARTEXT}a secret with spaces", True),
        ("{PLAIN}secret", True),
    ],
)
def test_encoded_and_weak_schemes_pass_cleartext_never(hash_: str, refused: bool) -> None:
    s = snap(accounts=[ACCOUNTS[0]._replace(password_hash=hash_)], forwards=[])
    problems = check(s)
    assert bool(problems) == refused
    if refused:
        assert "cleartext password is never published" in problems[0].reason


def test_relay_next_hops() -> None:
    assert relay_nexthop("relay.example", "smtp:[mx.customer.example]:25") == (
        "[mx.customer.example]:25"
    )
    assert relay_nexthop("backup.example", "relay") == "backup.example"
    assert relay_nexthop("backup.example", "relay:") == "backup.example"


def read_rows(
    aliases: list[tuple[str, str, int]],
    *,
    mailboxes: tuple[str, ...] = (),
    domains: tuple[str, ...] = (),
    alias_domains: tuple[tuple[str, str], ...] = (),
    settings: PostfixAdminConfig | None = None,
) -> Snapshot:
    """PostfixAdmin rows (example.com, old.example and ``domains``; ``mailboxes`` active, with
    their self-alias rows among ``aliases`` as the caller writes them) read into the model."""
    reader = _Reader(settings or PostfixAdminConfig(), secrets=False)
    return reader.build(
        domains=[(d, "virtual", 0, 1) for d in ("example.com", "old.example", *domains)],
        alias_domains=[(a, target, 1) for a, target in alias_domains],
        mailboxes=[(m, f"example.com/{m}/", 0, 1, "x") for m in mailboxes],
        aliases=aliases,
        fingerprint=Fingerprint({}),
    )


@pytest.mark.parametrize("lowercase_first", [True, False])
def test_aliases_differing_only_in_case_use_the_lowercase_row_whatever_the_row_order(
    lowercase_first: bool,
) -> None:
    """PostgreSQL's and SQLite's lookups find the row written in lowercase; which one mapsync
    used depended on the order the database returned them in."""
    rows = [("dup@example.com", "second@external.example", 1)]
    rows.insert(0 if not lowercase_first else 1, ("Dup@example.com", "first@external.example", 1))
    s = read_rows(rows)
    assert [(a.local_part, a.targets) for a in s.aliases] == [("dup", ("second@external.example",))]
    assert check(s) == []


def test_an_empty_goto_is_no_alias_and_a_mixed_case_self_alias_no_forward() -> None:
    s = read_rows(
        [("empty@example.com", "", 1), ("Bob@example.com", "Bob@Example.com", 1)],
        mailboxes=("bob@example.com",),
    )
    assert s.aliases == [] and s.forwards == []
    assert check(s) == []


def test_a_domain_wide_forward_with_more_targets_rewrites_the_first_and_keeps_the_rest() -> None:
    """``@old.example → @example.com,archive@external.example``: Postfix rewrites only the
    first address of a result (virtual(5)), so every user of old.example reaches the same
    user of example.com, and the archive a copy (it was refused as a bad local part)."""
    s = read_rows(
        [
            ("@old.example", "@example.com,archive@external.example", 1),
            ("@example.com", "postmaster@example.com", 1),
            ("postmaster@example.com", "postmaster@example.com", 1),
        ],
        mailboxes=("postmaster@example.com",),
    )
    assert check(s) == []
    virtual = render("virtual", s)
    assert virtual["postmaster@old.example"] == "postmaster@example.com,archive@external.example"
    assert virtual["@old.example"] == "postmaster@example.com,archive@external.example"


def test_a_dead_extra_target_of_a_domain_wide_forward_is_left_out_not_refused() -> None:
    s = read_rows(
        [
            ("@old.example", "@example.com,gone@example.com", 1),
            ("postmaster@example.com", "postmaster@example.com", 1),
        ],
        mailboxes=("postmaster@example.com",),
    )
    assert check(s) == []
    assert render("virtual", s)["postmaster@old.example"] == "postmaster@example.com"


def test_a_tagged_target_of_a_mailbox_is_kept_a_tagged_one_of_nothing_left_out() -> None:
    """``erin+lists@`` reaches erin@ (Postfix's recipient_delimiter = +): it was left out as
    a target that receives nothing, and erin got no mail of the alias."""
    s = read_rows(
        [
            ("team@example.com", "erin+lists@example.com,gone+x@example.com", 1),
            ("erin@example.com", "erin@example.com", 1),
            ("postmaster@example.com", "postmaster@example.com", 1),
        ],
        mailboxes=("erin@example.com", "postmaster@example.com"),
    )
    assert check(s) == []
    assert render("virtual", s)["team@example.com"] == "erin+lists@example.com"


def test_the_vacation_domain_is_relayed_though_it_has_a_domain_row() -> None:
    """PostfixAdmin's docs give the vacation domain a row (transport 'vacation'): hosted, its
    user#domain targets would receive nothing and every autoreply would be left out."""
    settings = PostfixAdminConfig(vacation_domain="autoreply.example.org")
    s = read_rows(
        [("bob@example.com", "bob#example.com@autoreply.example.org,bob@example.com", 1)],
        mailboxes=("bob@example.com",),
        domains=("autoreply.example.org",),
        settings=settings,
    )
    assert check(s) == []
    vacation = next(d for d in s.domains if d.name == "autoreply.example.org")
    assert vacation.kind == "relay"
    assert render("virtual", s)["bob@example.com"] == (
        "bob#example.com@autoreply.example.org,bob@example.com"
    )


def test_a_loop_of_alias_domains_gives_each_every_address_of_the_loop() -> None:
    """a → b → c → d → a: each receives what any of them has; the answer no longer depends on
    the domain the resolution started at (one found inside the loop was kept, short)."""
    loop = ("a.example", "b.example", "c.example", "d.example")
    s = read_rows(
        [(f"u{d[0]}@{d}", "x@external.example", 1) for d in loop],
        domains=loop,
        alias_domains=tuple(zip(loop, loop[1:] + loop[:1], strict=True)),
    )
    recipients = render("recipients", s)
    for d in loop:
        assert {f"u{o[0]}@{d}" for o in loop} <= recipients.keys(), d


@pytest.mark.parametrize("exact_first", [True, False])
def test_rows_differing_in_case_or_spaces_use_the_one_the_lookups_find_whatever_the_order(
    exact_first: bool,
) -> None:
    """On PostgreSQL and SQLite 'example.com' and 'Example.com', 'sales@x' and 'sales@x '
    are different rows, and PostfixAdmin's lookups find only the one written exactly as the
    (lowercased) key, active or not. Which one mapsync used depended on the row order (an
    UPDATE moves a row to the end on PostgreSQL): the domain hosted or relayed to another
    host, an alias's targets those of a row no lookup finds."""

    def ordered(exact: tuple[Any, ...], *others: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return [exact, *others] if exact_first else [*others, exact]

    reader = _Reader(PostfixAdminConfig(), secrets=True)
    s = reader.build(
        domains=ordered(
            ("example.com", "virtual", 0, 1),
            ("Example.com", "smtp:[evil.example]:25", 1, 1),
            (" example.com", "smtp:[evil.example]:25", 1, 1),
        )
        + ordered(("other.example", "virtual", 0, 0), ("other.example ", "virtual", 0, 1))
        + [("alias.example", "virtual", 0, 1)],
        alias_domains=ordered(
            ("alias.example", "example.com", 1), ("ALIAS.example", "other.example", 1)
        ),
        mailboxes=[
            *ordered(
                ("anna@example.com", "example.com/anna/", 0, 1, "$6$good"),
                ("Anna@example.com", "evil/", 0, 1, "$6$evil"),
            ),
            ("postmaster@example.com", "example.com/postmaster/", 0, 1, "$6$pm"),
        ],
        aliases=ordered(
            ("sales@example.com", "anna@example.com", 1),
            ("sales@example.com ", "evil@attacker.example", 1),
        )
        + ordered(
            ("info@example.com", "anna@example.com", 0),  # the row found, inactive: no alias
            ("INFO@example.com", "evil@attacker.example", 1),
        ),
        fingerprint=Fingerprint({}),
    )
    domains = {d.name: d for d in s.domains}
    assert (domains["example.com"].kind, domains["example.com"].relay_nexthop) == ("hosted", None)
    assert domains["other.example"].status == "disabled"
    ids = {d.id: d.name for d in s.domains}
    (anna,) = [a for a in s.accounts if a.local_part == "anna"]
    assert anna.password_hash == "{SHA512-CRYPT}$6$good"
    assert anna.home == "/var/vmail/example.com/anna/"
    aliases = {(ids[a.domain_id], a.local_part): a.targets for a in s.aliases}
    assert aliases[("example.com", "sales")] == ("anna@example.com",)
    assert ("example.com", "info") not in aliases
    assert aliases[("alias.example", "anna")] == ("anna@example.com",)  # → example.com
    assert check(s) == []

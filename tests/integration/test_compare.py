"""`mapsync compare` before the switch: PostfixAdmin's documented live SQL lookups (the very
files docs/migrating.md shows) against the maps published from the same database, on SQLite,
the running MariaDB and the running PostgreSQL. Equal but for what mapsync does on purpose;
then rows changed in the database without publishing are reported, and only those."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.helpers import migrating
from tests.helpers import postfixadmin as pfa

VERSIONS = {"sqlite": 1856, "mariadb": 1856, "postgresql": 1847}


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mapsync", "-q", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def compare_json(config: Path, before: tuple[Path, Path]) -> tuple[int, dict[str, Any]]:
    main_cf, dovecot = before
    p = run(config, "compare", "--postfix", str(main_cf), "--dovecot", str(dovecot), "--json")
    assert p.returncode in (0, 1), p.stdout + p.stderr
    return p.returncode, json.loads(p.stdout)


@pytest.fixture(params=sorted(VERSIONS))
def database(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(engine, url) of a PostfixAdmin database holding every case of POSTFIXADMIN.md."""
    engine = request.param
    if engine == "sqlite":
        url = f"sqlite:///{tmp_path / 'postfixadmin.db'}"
    else:
        url = request.getfixturevalue("pg_url" if engine == "postgresql" else "mariadb_url")
    pfa.build(url, "", VERSIONS[engine])
    return engine, url


def test_compare_sees_only_the_documented_differences_then_exactly_the_rows_changed_since(
    database: tuple[str, str], tmp_path: Path
) -> None:
    engine, url = database
    before = migrating.write_before(tmp_path / "before", url)
    config = migrating.write_publisher(tmp_path / "c", url)
    published = run(config, "publish", "--skip-invalid")
    assert published.returncode == 0, published.stderr

    code, report = compare_json(config, before)
    assert code == 0 and report["exit"] == 0 and report["unexpected"] == 0, report
    assert report["after"] == {"mx": 1, "store": 1}
    # Every row's address, the alias-domain expansions and a probe per domain were asked.
    assert report["addresses"] >= len(pfa.addresses()) - 2, report["addresses"]
    assert report["users"] >= len(pfa.MAILBOXES)
    expected = {(d["address"], d["check"]): d for d in report["differences"]}
    # The deliberate differences of docs/postfixadmin.md are reported, labelled as such.
    for key in [
        ("carol@inactive.example", "userdb"),  # a mailbox of an inactive domain: no login
        ("kim@example.com", "login"),  # cleartext: never published
        ("lee@example.com", "login"),
        (pfa.VACATION_DOMAIN, "domain"),  # the vacation domain is a relay domain
        ("bob@example.com", "delivery"),  # ... so bob's vacation copy is relayed there
    ]:
        assert key in expected and expected[key]["expected"], (key, report["differences"])
    if engine == "mariadb":  # 'all' finds PostfixAdmin's 'ALL' row on a case-insensitive column
        assert expected[("all", "domain")]["expected"]
    # No hash ever appears, not even for a difference in Dovecot's answers.
    assert not any(h in json.dumps(report) for h in pfa.HASHES.values())

    # Change rows behind the publisher's back: a new alias, a moved maildir, a domain
    # switched off. compare must name exactly the addresses whose answers changed.
    db = create_engine(url)
    no = False if engine == "postgresql" else 0
    yes = True if engine == "postgresql" else 1
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO alias (address, goto, domain, active, created, modified)"
                " VALUES ('new@example.com', 'erin@lmtp.example', 'example.com', :y,"
                " '2026-11-30 11:00:00', '2026-11-30 11:00:00')"
            ),
            {"y": yes},
        )
        conn.execute(
            text(
                "UPDATE mailbox SET maildir = 'example.com/alice.moved/' WHERE username = 'alice@example.com'"
            )
        )
        conn.execute(
            text("UPDATE domain SET active = :n WHERE domain = 'relay.example'"), {"n": no}
        )
    db.dispose()

    code, report = compare_json(config, before)
    assert code == 1 and report["exit"] == 1
    found: dict[str, set[str]] = {}
    for d in report["differences"]:
        if d["expected"] is None:
            found.setdefault(d["address"], set()).add(d["check"])
    assert found == {
        # the new alias, as written and through alias.example (alias domain) and
        # old.example (domain-wide forward); the published catch-all sends it to postmaster
        "new@example.com": {"delivery"},
        "new@alias.example": {"delivery"},
        "new@old.example": {"delivery"},
        # alice's mail now lands in another directory: herself and every alias reaching her
        "alice@example.com": {"delivery", "home"},
        "alice@alias.example": {"delivery"},
        "alice@old.example": {"delivery"},
        "alice@old2.example": {"delivery"},  # old2.example → alias.example → example.com
        "alice@multi.example": {"delivery"},  # the forward with an archive copy
        "sales@example.com": {"delivery"},
        "sales@old.example": {"delivery"},
        "sales@multi.example": {"delivery"},
        "team@lmtp.example": {"delivery"},
        "team@alias2.example": {"delivery"},
        # the relay domain is no longer ours
        "relay.example": {"domain"},
        f"{'mapsync-compare-probe'}@relay.example": {"accepted"},
    }, found
    moved = next(
        d
        for d in report["differences"]
        if (d["address"], d["check"]) == ("alice@example.com", "home")
    )
    assert moved["before"] == f"{pfa.MAIL_BASE}/example.com/alice.moved"
    assert moved["after"] == f"{pfa.MAIL_BASE}/example.com/alice"


def test_the_console_report_names_each_difference_and_the_summary(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'postfixadmin.db'}"
    pfa.build(url)
    main_cf, dovecot = migrating.write_before(tmp_path / "before", url)
    config = migrating.write_publisher(tmp_path / "c", url)
    assert run(config, "publish", "--skip-invalid").returncode == 0
    db = create_engine(url)
    with db.begin() as conn:  # a new password: Dovecot's answer differs, the hash is not shown
        conn.execute(
            text("UPDATE mailbox SET password = :p WHERE username = 'postmaster@example.com'"),
            {"p": pfa.HASHES["sha512crypt"]},
        )
    db.dispose()
    p = run(config, "compare", "--postfix", str(main_cf), "--dovecot", str(dovecot))
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("compared ") and "mx serial 1, store serial 1" in lines[0]
    assert (
        "DIFFERENT postmaster@example.com  password: before {CRYPT}$6$ | after {CRYPT}$2y$" in lines
    ), p.stdout
    assert any(
        line.startswith("expected  kim@example.com  login: before yes | after no  [cleartext")
        for line in lines
    ), p.stdout
    assert lines[-1].startswith("1 difference(s), ")
    assert not any(h in p.stdout for h in pfa.HASHES.values())


def test_the_after_configuration_in_the_doc_is_what_agents_ships() -> None:
    blocks = migrating.doc_blocks(marker="# from: ")
    assert set(blocks) == {"agents/postfix-mx/main.cf", "agents/dovecot-store/dovecot.conf"}
    for name, body in blocks.items():
        assert body == (migrating.ROOT / name).read_text(), name

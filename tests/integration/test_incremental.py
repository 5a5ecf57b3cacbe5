"""The long-running publisher's incremental runs (docs/incremental.md): after every one of a
random sequence of changes (accounts added, changed, moved between mailstores and domains,
deleted; aliases added, chained, retargeted, renamed, deactivated, expired, deleted;
catch-alls; sender grants; alias domains and mailstores, which the publisher reads in full),
the incrementally published maps are byte for byte those a full publish of the same database
makes, on SQLite and on the running PostgreSQL and MariaDB."""

from __future__ import annotations

import hashlib
import random
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert
from structlog.testing import capture_logs

from mapsync import config
from mapsync.errors import InvalidData
from mapsync.formats import splice
from mapsync.formats.cdbpatch import NotPatchable, patch_cdb
from mapsync.publish import publisher
from mapsync.publish.publisher import Publisher
from mapsync.publish.repository import Repository
from mapsync.sources import builtin, changes, open_source
from mapsync.sources import schema as t
from mapsync.sources.builtin import make_engine
from tests.conftest import make_cluster
from tests.helpers.incremental import (
    HASH,
    bodies,
    late_delete,
    late_insert,
    literal,
    newest,
    run,
    step,
)

CHANNELS = """
[publisher.guards]
max_shrink = "100%"
max_growth = "10000%"
max_change = "100%"
min_entries = 0

[publisher.channels.mx]
maps = ["domains", "recipients", "virtual", "transport", "senders", "exim_routes"]

[publisher.channels.store]
maps = ["dovecot_users", "dovecot_deny"]
mailstore = "store-1"

[publisher.channels.proxy]
maps = ["dovecot_proxy", "dovecot_submission"]
"""


def _publisher(root: Path, url: str, repo: str) -> Publisher:
    text = (root / "mapsync.toml").read_text()
    text = text.replace(
        '[publisher.channels.mx]\nmaps = ["domains", "recipients", "virtual", "transport"]\n', ""
    )
    text = text.replace("[agent]", CHANNELS + "\n[agent]", 1).replace("/repo", f"/{repo}")
    path = root / f"{repo}.toml"
    path.write_text(text)
    pub = config.load(path).need_publisher()
    return Publisher(pub, lambda: open_source(pub.database, pub.schema))


@pytest.mark.parametrize("engine", ["sqlite", "postgresql", "mariadb"])
def test_incremental_runs_publish_what_a_full_run_publishes(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No rows read again for clock skew: each run renders only what its change reaches
    # (with the minute of skew, every row the seed wrote just before would be read again).
    monkeypatch.setattr(changes, "SKEW", timedelta(0))
    patched: list[bool] = []  # each cdb changed in place: made, or given up (built whole)

    def counted(old: bytes | memoryview, edits: Any, spare: memoryview | None) -> memoryview:
        try:
            made = patch_cdb(old, edits, spare)
        except NotPatchable:
            patched.append(False)
            raise
        patched.append(True)
        return made

    monkeypatch.setattr(splice, "patch_cdb", counted)
    url = (
        f"sqlite:///{tmp_path / 'central.db'}"
        if engine == "sqlite"
        else request.getfixturevalue("pg_url" if engine == "postgresql" else "mariadb_url")
    )
    cluster = make_cluster(tmp_path / "c", url, accounts=150, domains=6, aliases=40)
    kept = _publisher(cluster.root, url, "inc")
    kept.incremental = True
    kept.run()
    assert kept.last_read == "full"
    rnd = random.Random(20261130)
    reads = []
    # MariaDB is not one of the two engines and the slowest: fewer steps there.
    steps = 24 if engine == "mariadb" else 60
    for number in range(steps):
        name, rows_only = step(url, rnd)
        kept.run()
        reads.append(kept.last_read)
        if rows_only:
            assert kept.last_read == "incremental", f"step {number} ({name}) was read in full"
        full = _publisher(cluster.root, url, "full")
        full.run()
        for channel in ("mx", "store", "proxy"):
            assert bodies(cluster.root / "inc", channel) == bodies(
                cluster.root / "full", channel
            ), f"step {number} ({name}): channel {channel} differs from a full render"
    print("reads:", {r: reads.count(r) for r in set(reads)}, "cdbs patched:", len(patched))
    assert reads.count("incremental") >= steps * 3 // 4
    # The cdbs were changed in place (and proved equal to a full build by the agents' hash
    # in the manifest, which the comparison with the full publish checks above).
    assert len(patched) >= steps * 3 // 4 and all(patched)
    names = {p.name for p in (cluster.root / "inc" / ".private" / "mx" / "cdb").iterdir()}
    manifest = Repository(cluster.root / "inc").latest_manifest("mx")
    assert manifest is not None
    wanted = {f"{e.cdb.sha256}.cdb" for e in manifest.maps.values() if e.cdb is not None}
    # A cdb changed in place is held in memory only; one built whole is kept on disk too;
    # none of an older release is left in either.
    assert names <= wanted, (len(names), len(wanted))
    held = {m: sha for (channel, m), (sha, data) in kept._cdb_data.items() if channel == "mx"}
    assert {f"{sha}.cdb" for sha in held.values()} == wanted
    for m, sha in held.items():
        assert hashlib.sha256(kept._cdb_data[("mx", m)][1]).hexdigest() == sha


def test_a_u_label_postfix_folds_is_keyed_alike_by_incremental_and_full_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A domain whose U-label case-folds to other letters (straße → strasse) is keyed three
    ways by the address maps; the incremental state resolves every one of them, so a change
    there renders what a full run renders (it lost the folded keys: a deleted alias kept
    forwarding until the full check)."""
    monkeypatch.setattr(changes, "SKEW", timedelta(0))
    url = f"sqlite:///{tmp_path / 'central.db'}"
    cluster = make_cluster(tmp_path / "c", url, accounts=60, domains=3, aliases=30)
    run(
        url,
        "UPDATE domain SET name = 'xn--strae-oqa.example', name_unicode = 'straße.example' "
        "WHERE id = (SELECT min(id) FROM domain WHERE kind = 'hosted')",
    )
    kept = _publisher(cluster.root, url, "inc")
    kept.incremental = True
    kept.run()
    rnd = random.Random(20261201)
    for number in range(25):
        name, _ = step(url, rnd)
        kept.run()
        full = _publisher(cluster.root, url, "full")
        full.run()
        for channel in ("mx", "store", "proxy"):
            assert bodies(cluster.root / "inc", channel) == bodies(
                cluster.root / "full", channel
            ), f"step {number} ({name}): channel {channel} differs from a full render"
    recipients = bodies(cluster.root / "inc", "mx")["recipients"]
    assert b"@strasse.example OK" in recipients and "@straße.example OK".encode() in recipients


def _kept(tmp_path: Path, url: str, extra: str = "") -> tuple[Publisher, Path]:
    cluster = make_cluster(tmp_path / "c", url, accounts=60, domains=4, aliases=20)
    if extra:
        text = cluster.config_path.read_text().replace(
            "[publisher]\n", f"[publisher]\n{extra}\n", 1
        )
        cluster.config_path.write_text(text)
    kept = _publisher(cluster.root, url, "inc")
    kept.incremental = True
    kept.run()
    return kept, cluster.root


def _sql(url: str, *statements: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


def _one(url: str, query: str) -> Any:
    engine = make_engine(url)
    with engine.connect() as conn:
        value = conn.exec_driver_sql(query).scalar_one()
    engine.dispose()
    return value


def _rows(url: str, query: str) -> list[Any]:
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = list(conn.exec_driver_sql(query))
    engine.dispose()
    return rows


BREAKS = {
    # An alias to an address of a hosted domain that nobody has.
    "dangling": "INSERT INTO alias_target (alias_id, target, updated_at) "
    "SELECT min(id), 'nobody-here@example-1.org', '2999-01-01' FROM alias WHERE local_part <> ''",
    # The account an alias leads to, deleted: the alias (unchanged) now leads nowhere.
    "target gone": "DELETE FROM account WHERE id = ("
    "SELECT min(a.id) FROM account a JOIN domain d ON d.id = a.domain_id "
    "JOIN alias_target t ON t.target = a.local_part || '@' || d.name)",
    # An alias at an account's address.
    "claimed twice": "INSERT INTO alias (domain_id, local_part) "
    "SELECT domain_id, local_part FROM account WHERE local_part <> 'postmaster' ORDER BY id LIMIT 1",
    # A local part no map may carry.
    "bad local part": "INSERT INTO account (domain_id, local_part) SELECT min(id), 'Upper Case' "
    "FROM domain WHERE kind = 'hosted'",
    # 'x+eu' beside the account 'x' of its mailstore: Dovecot's LMTP delivers it to 'x'.
    "tagged beside its base": "INSERT INTO account (domain_id, local_part, mailstore_id, "
    "password_hash) SELECT a.domain_id, a.local_part || '+eu', a.mailstore_id, a.password_hash "
    "FROM account a "
    "JOIN domain d ON d.id = a.domain_id WHERE d.kind = 'hosted' AND d.status = 'active' "
    "AND a.status <> 'disabled' AND a.local_part <> 'postmaster' ORDER BY a.id LIMIT 1",
}

# The first hosted domain (the seed's are all active), for rows a test adds there.
FIRST = "(SELECT min(id) FROM domain WHERE kind = 'hosted')"
FIRST_NAME = f"(SELECT name FROM domain WHERE id = {FIRST})"
HASHED = "(SELECT min(password_hash) FROM account)"  # a hash the store channel accepts

# Breaks through a row an earlier, valid, incremental run published: (that run's
# statements, the breaking ones).
LATER_BREAKS = {
    # The account 'zed' added after 'zed+eu' of its mailstore.
    "base after its tagged account": (
        [
            "INSERT INTO account (domain_id, local_part, password_hash) "
            f"VALUES ({FIRST}, 'zed+eu', {HASHED})"
        ],
        [
            "INSERT INTO account (domain_id, local_part, password_hash) "
            f"VALUES ({FIRST}, 'zed', {HASHED})"
        ],
    ),
    # A second account given the first one's home (spelt otherwise) on their mailstore.
    "home given twice": (
        [
            "INSERT INTO account (domain_id, local_part, password_hash, home) "
            f"VALUES ({FIRST}, 'h1', {HASHED}, '/var/vmail/h1')"
        ],
        [
            "INSERT INTO account (domain_id, local_part, password_hash, home) "
            f"VALUES ({FIRST}, 'h2', {HASHED}, '/var/vmail//h1/')"
        ],
    ),
    # An alias to 'tg+x@' reaches the account 'tg': deleted, the alias leads nowhere.
    "tagged target's account gone": (
        [
            "INSERT INTO account (domain_id, local_part, password_hash) "
            f"VALUES ({FIRST}, 'tg', {HASHED})",
            f"INSERT INTO alias (domain_id, local_part) VALUES ({FIRST}, 'tgl')",
            "INSERT INTO alias_target (alias_id, target) SELECT id, "
            f"'tg+x@' || {FIRST_NAME} FROM alias WHERE local_part = 'tgl'",
        ],
        ["DELETE FROM account WHERE local_part = 'tg'"],
    ),
    # ring-c's new target 'ring-a+x@' is ring-a's: a cycle through ring-a and ring-b, which
    # the change did not touch.
    "cycle through a tag": (
        [
            *(
                f"INSERT INTO alias (domain_id, local_part) VALUES ({FIRST}, 'ring-{x}')"
                for x in "abc"
            ),
            *(
                "INSERT INTO alias_target (alias_id, target) SELECT id, "
                f"'{to}@' || {FIRST_NAME} FROM alias WHERE local_part = 'ring-{x}'"
                for x, to in (("a", "ring-b"), ("b", "ring-c"), ("c", "postmaster"))
            ),
        ],
        [
            "INSERT INTO alias_target (alias_id, target) SELECT id, "
            f"'ring-a+x@' || {FIRST_NAME} FROM alias WHERE local_part = 'ring-c'"
        ],
    ),
    # lq's target 'lp+x@' is the account 'lp+x'; deleted, it is the alias lp's, which leads
    # back to lq: a cycle through two aliases the change did not touch.
    "cycle once a tag's account goes": (
        [
            "INSERT INTO account (domain_id, local_part, password_hash) "
            f"VALUES ({FIRST}, 'lp+x', {HASHED})",
            *(
                f"INSERT INTO alias (domain_id, local_part) VALUES ({FIRST}, '{x}')"
                for x in ("lp", "lq")
            ),
            *(
                "INSERT INTO alias_target (alias_id, target) SELECT id, "
                f"'{to}@' || {FIRST_NAME} FROM alias WHERE local_part = '{x}'"
                for x, to in (("lp", "lq"), ("lq", "lp+x"))
            ),
        ],
        ["DELETE FROM account WHERE local_part = 'lp+x'"],
    ),
    # As above, 'lp+x' an alias (to postmaster@) that is deleted.
    "cycle once a tag's alias goes": (
        [
            f"INSERT INTO alias (domain_id, local_part) VALUES ({FIRST}, 'lp+x')",
            "INSERT INTO alias_target (alias_id, target) SELECT id, "
            f"'postmaster@' || {FIRST_NAME} FROM alias WHERE local_part = 'lp+x'",
            *(
                f"INSERT INTO alias (domain_id, local_part) VALUES ({FIRST}, '{x}')"
                for x in ("lp", "lq")
            ),
            *(
                "INSERT INTO alias_target (alias_id, target) SELECT id, "
                f"'{to}@' || {FIRST_NAME} FROM alias WHERE local_part = '{x}'"
                for x, to in (("lp", "lq"), ("lq", "lp+x"))
            ),
        ],
        ["DELETE FROM alias WHERE local_part = 'lp+x'"],
    ),
}


@pytest.mark.parametrize("what", sorted(BREAKS))
def test_an_invalid_change_is_refused_as_a_full_run_refuses_it(
    tmp_path: Path, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No skew: with it, every row the seed wrote just before is read again, and validated.
    monkeypatch.setattr(changes, "SKEW", timedelta(0))
    url = f"sqlite:///{tmp_path / 'central.db'}"
    kept, root = _kept(tmp_path, url)
    serial = kept.repo.latest("mx").serial
    if what == "target gone":
        found = _one(
            url,
            BREAKS[what].replace("DELETE FROM account WHERE id = (", "SELECT (").rstrip(")") + ")",
        )
        assert found is not None, "the seed has an alias leading to an account"
    _sql(url, BREAKS[what])
    with pytest.raises(InvalidData):
        kept.run()
    assert kept.repo.latest("mx").serial == serial  # nothing published
    with pytest.raises(InvalidData):  # as a full run of the same database
        _publisher(root, url, "full").run()


@pytest.mark.parametrize("what", sorted(LATER_BREAKS))
def test_a_change_breaking_a_row_it_did_not_touch_is_refused_as_a_full_run_refuses_it(
    tmp_path: Path, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows a change is validated against reach beyond its addresses where a full run's
    rules do: the account before a '+' and the tagged ones after it, the accounts of one
    home, an alias to a tag of the address changed."""
    monkeypatch.setattr(changes, "SKEW", timedelta(0))  # else every seeded row is read again
    url = f"sqlite:///{tmp_path / 'central.db'}"
    kept, root = _kept(tmp_path, url)
    before, breaking = LATER_BREAKS[what]
    _sql(url, *before)
    kept.run()
    assert kept.last_read == "incremental"
    serial = kept.repo.latest("mx").serial
    _sql(url, *breaking)
    with pytest.raises(InvalidData):
        kept.run()
    assert kept.repo.latest("mx").serial == serial  # nothing published
    with pytest.raises(InvalidData):  # as a full run of the same database
        _publisher(root, url, "full").run()


def test_an_alias_cycle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changes, "SKEW", timedelta(0))  # else every seeded row is read again
    url = f"sqlite:///{tmp_path / 'central.db'}"
    kept, _ = _kept(tmp_path, url)
    _sql(
        url,
        "INSERT INTO alias (domain_id, local_part) SELECT min(id), 'ring-a' FROM domain WHERE kind = 'hosted'",
        "INSERT INTO alias_target (alias_id, target) SELECT id, 'ring-b@example-1.org' FROM alias WHERE local_part = 'ring-a'",
        "INSERT INTO alias (domain_id, local_part) SELECT min(id), 'ring-b' FROM domain WHERE kind = 'hosted'",
        "INSERT INTO alias_target (alias_id, target) SELECT id, 'postmaster@example-1.org' FROM alias WHERE local_part = 'ring-b'",
    )
    kept.run()
    assert kept.last_read == "incremental"
    # ring-b now leads back to ring-a: a cycle through rows this change did not touch.
    _sql(
        url,
        "INSERT INTO alias_target (alias_id, target) SELECT id, 'ring-a@example-1.org' FROM alias WHERE local_part = 'ring-b'",
    )
    with pytest.raises(InvalidData, match="alias cycle"):
        kept.run()


def test_after_a_refusal_the_next_runs_publish_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'central.db'}"
    kept, _ = _kept(tmp_path, url)
    _sql(url, BREAKS["bad local part"])
    with pytest.raises(InvalidData):
        kept.run()
    _sql(url, "DELETE FROM account WHERE local_part = 'Upper Case'")
    kept.run()  # read in full: the refused run left no state behind
    assert kept.last_read == "full"
    _sql(
        url,
        "UPDATE account SET status = 'login_disabled' WHERE id = (SELECT min(id) FROM account WHERE local_part <> 'postmaster')",
    )
    kept.run()
    assert kept.last_read == "incremental"


def test_the_full_check_compares_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'central.db'}"
    kept, _ = _kept(tmp_path, url, 'full_check = "0s"')
    _sql(url, "UPDATE account SET quota_bytes = 12345 WHERE id = (SELECT min(id) FROM account)")
    with capture_logs() as logs:
        kept.run()
    assert kept.last_read == "full"  # a full check is due at every run
    assert any(
        e["event"] == "full check: the incremental state equals a full render" for e in logs
    ), [e["event"] for e in logs]

    # An incremental state that holds an account the database does not: the full check
    # finds that its rows differ. Where the change reaches the phantom's entries, the
    # state renders lines the last release does not hold: said as loudly.
    state = kept._state
    assert state is not None
    some = next(a for a in state.accounts.values() if a.local_part != "postmaster")
    domain = state.domains[some.domain_id].name
    # A home of its own: one shared with another account is an invalid row of its own.
    phantom = some._replace(
        id=10**6, local_part="phantom", home=some.home and f"{some.home}-phantom"
    )
    state._add_account(phantom)
    _sql(url, f"UPDATE account SET quota_bytes = 777 WHERE id = {some.id}")
    with capture_logs() as logs:
        kept.run()
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"][:60] for e in errors] == [
        "full check: the incremental state's rows differ from the dat"
    ]
    assert errors[0]["tables"] == "account"

    state = kept._state
    assert state is not None
    state._add_account(phantom)
    _sql(
        url,
        f"INSERT INTO sender_grant (account_id, address) VALUES ({some.id}, 'phantom@{domain}')",
    )
    with capture_logs() as logs:
        kept.run()
    errors = [e["event"][:60] for e in logs if e["log_level"] == "error"]
    assert errors == [
        "full check: the incremental state renders entries the last r",
        "full check: the incremental state's rows differ from the dat",
    ]
    # The full render is what is published: the grant, without the phantom's own login.
    senders = bodies(kept.cfg.repository, "mx")["senders"].decode()
    line = next(x for x in senders.splitlines() if x.startswith(f"phantom@{domain} "))
    assert line.split(" ", 1)[1] == f"{some.local_part}@{domain}"


@pytest.mark.parametrize(
    "address", ["nobody@bücher.example", "a@b@c.example", "x@-bad-.example", "@", "ab"]
)
def test_a_sender_grant_no_full_run_would_publish_is_refused(tmp_path: Path, address: str) -> None:
    url = f"sqlite:///{tmp_path / 'central.db'}"
    kept, root = _kept(tmp_path, url)
    serial = kept.repo.latest("mx").serial
    _sql(
        url,
        "INSERT INTO sender_grant (account_id, address) "
        f"SELECT min(id), '{address}' FROM account WHERE status = 'active'",
    )
    with pytest.raises(InvalidData):
        _publisher(root, url, "full").run()
    with pytest.raises(InvalidData):
        kept.run()
    assert kept.repo.latest("mx").serial == serial


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_row_committed_while_the_full_read_runs_is_read_by_the_next_run(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No skew: the mark alone must cover the row (with the minute of skew a read had to
    # last over a minute to lose it, as one at millions of accounts may).
    monkeypatch.setattr(changes, "SKEW", timedelta(0))
    url = (
        f"sqlite:///{tmp_path / 'central.db'}"
        if engine == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    cluster = make_cluster(tmp_path / "c", url, accounts=60, domains=4, aliases=20)
    kept = _publisher(cluster.root, url, "inc")
    kept.incremental = True
    denied = builtin.read_denied
    done: list[str] = []

    def meanwhile(conn: Any, ids: Any = None, bad: Any = None) -> Any:
        # A panel commits an account while the snapshot's accounts are being read: the
        # snapshot does not hold it (its transaction started before), so the mark must
        # make the next run read it.
        if not done:
            time.sleep(0.01)
            _sql(
                url,
                "INSERT INTO account (domain_id, local_part, password_hash) "
                f"SELECT min(id), 'meanwhile', '{HASH}' FROM domain WHERE kind = 'hosted'",
            )
            done.append(
                _one(
                    url,
                    "SELECT d.name FROM domain d JOIN account a "
                    "ON a.domain_id = d.id WHERE a.local_part = 'meanwhile'",
                )
            )
            time.sleep(0.01)
        return denied(conn, ids, bad)

    monkeypatch.setattr(builtin, "read_denied", meanwhile)
    kept.run()
    assert kept.last_read == "full" and done
    address = f"meanwhile@{done[0]} "
    assert address not in bodies(cluster.root / "inc", "mx")["recipients"].decode()
    kept.run()
    assert kept.last_read == "incremental"
    lines = bodies(cluster.root / "inc", "mx")["recipients"].decode().splitlines()
    assert any(line.startswith(address) for line in lines), "the account committed meanwhile"


def test_an_alias_expiring_during_the_full_check_is_no_false_alarm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'central.db'}"
    cluster = make_cluster(tmp_path / "c", url, accounts=60, domains=4, aliases=20)
    expires = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=5)
    engine = make_engine(url)
    with engine.begin() as conn:
        alias_id = conn.execute(
            insert(t.alias).values(domain_id=1, local_part="leaving", expires_at=expires)
        ).inserted_primary_key[0]
        conn.execute(
            insert(t.alias_target).values(alias_id=alias_id, target="postmaster@x.example")
        )
    engine.dispose()
    text = cluster.config_path.read_text().replace(
        "[publisher]\n", '[publisher]\nfull_check = "0s"\n', 1
    )
    cluster.config_path.write_text(text)
    kept = _publisher(cluster.root, url, "inc")
    kept.incremental = True
    kept.run()
    entries = changes.entries

    def slow(conn: Any, after: int, margin: int) -> Any:
        # The full check's snapshot is read; its changes are read after the alias expired.
        time.sleep(
            max(0.0, (expires - datetime.now(UTC).replace(tzinfo=None)).total_seconds() + 0.2)
        )
        return entries(conn, after, margin)

    monkeypatch.setattr(changes, "entries", slow)
    with capture_logs() as logs:
        kept.run()  # a full check: full_check = 0s
    assert kept._state is not None and alias_id in kept._state.aliases, (
        "the full check's snapshot was read before the alias expired (else this proves nothing)"
    )
    assert [e["event"] for e in logs if e["log_level"] == "error"] == []
    assert any(e["event"] == "full check: the incremental state equals a full render" for e in logs)


def _url(tmp_path: Path, engine: str, request: pytest.FixtureRequest) -> str:
    if engine == "sqlite":
        return f"sqlite:///{tmp_path / 'central.db'}"
    return str(request.getfixturevalue("pg_url" if engine == "postgresql" else "mariadb_url"))


def _as_full(kept: Publisher, root: Path, what: str) -> None:
    """The kept publisher's releases are a full publish's of the database as it is."""
    _publisher(root, str(kept.cfg.database), "full").run()
    for channel in ("mx", "store", "proxy"):
        assert bodies(root / "inc", channel) == bodies(root / "full", channel), (
            f"{what}: channel {channel} differs from a full render"
        )


QUOTA = "UPDATE account SET quota_bytes = {} WHERE id = (SELECT min(id) FROM account)"


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_structural_row_stamped_below_the_tables_newest_is_read(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    """A domain whose updated_at is below the table's newest (its writer's clock behind, a
    transaction that commits after a newer one) moves no stamp: the publisher finds it in
    the skew window it reads again and reads in full; the runs after are incremental."""
    url = _url(tmp_path, engine, request)
    kept, root = _kept(tmp_path, url)
    assert kept._state is not None
    late = newest(url, "domain") - timedelta(milliseconds=1)
    assert late >= kept._state.mark.clock - changes.SKEW
    _sql(
        url,
        "INSERT INTO domain (name, kind, target_domain_id, updated_at) "
        f"SELECT 'late.example', 'alias', min(id), {literal(late)} FROM domain "
        "WHERE kind = 'hosted'",
        QUOTA.format(4242),  # a change of a row: the fingerprint moves
    )
    assert newest(url, "domain") == late + timedelta(milliseconds=1)
    kept.run()
    _as_full(kept, root, "the late domain")
    assert kept.last_read == "full"
    # Seen by that read: no reason to read in full again while it is in the window.
    _sql(url, QUOTA.format(4343))
    kept.run()
    assert kept.last_read == "incremental"
    _as_full(kept, root, "a change after")


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_structural_delete_logged_below_the_marks_id_and_committed_late_is_read(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    """A domain deleted in a transaction that commits after a read which saw a newer log id
    (another writer's delete) is read in the margin below the mark: read in full, once."""
    url = _url(tmp_path, engine, request)
    kept, root = _kept(tmp_path, url)
    hosted = "FROM domain WHERE kind = 'hosted'"
    _sql(
        url,
        f"INSERT INTO domain (name, kind, target_domain_id) SELECT 'gone.example', 'alias', min(id) {hosted}",
        "INSERT INTO account (domain_id, local_part, password_hash) "
        f"SELECT min(id), 'spare', '{HASH}' {hosted}",
    )
    # A newer domain: deleting gone.example moves no stamp.
    _sql(
        url,
        f"INSERT INTO domain (name, kind, target_domain_id) SELECT 'stays.example', 'alias', min(id) {hosted}",
    )
    kept.run()
    assert kept.last_read == "full"
    late_delete(
        url,
        "DELETE FROM domain WHERE name = 'gone.example'",
        "DELETE FROM account WHERE local_part = 'spare'",
        kept.run,
    )
    assert kept.last_read == "incremental"  # the account; the domain not yet committed
    _sql(url, QUOTA.format(4242))
    kept.run()
    _as_full(kept, root, "the domain deleted late")
    assert kept.last_read == "full"
    _sql(url, QUOTA.format(4343))
    kept.run()
    assert kept.last_read == "incremental"  # the deletion seen: not read in full again
    _as_full(kept, root, "a change after")


@pytest.mark.parametrize("engine", ["sqlite", "postgresql", "mariadb"])
def test_a_target_or_grant_moved_to_another_parent_changes_both(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``UPDATE alias_target SET alias_id`` and ``UPDATE sender_grant SET account_id`` change
    the old parent too (init-db's move trigger logs it): published as a full run would."""
    monkeypatch.setattr(changes, "SKEW", timedelta(0))  # else the seed's rows are read again
    url = _url(tmp_path, engine, request)
    kept, root = _kept(tmp_path, url)
    targets: dict[int, set[str]] = {}
    for alias_id, target in _rows(url, "SELECT alias_id, target FROM alias_target"):
        targets.setdefault(alias_id, set()).add(target)
    source = min(i for i, ts in targets.items() if len(ts) > 1)
    moved = min(targets[source])
    dest = min(i for i, ts in targets.items() if i != source and moved not in ts)
    first, second = (
        i for (i,) in _rows(url, "SELECT id FROM account WHERE status = 'active' ORDER BY id")[:2]
    )
    _sql(
        url,
        f"INSERT INTO sender_grant (account_id, address) VALUES ({first}, 'moved@elsewhere.example')",
    )
    kept.run()
    assert kept.last_read == "incremental"
    _sql(
        url,
        f"UPDATE alias_target SET alias_id = {dest} WHERE alias_id = {source} AND target = '{moved}'",
        f"UPDATE sender_grant SET account_id = {second} WHERE account_id = {first}",
    )
    kept.run()
    assert kept.last_read == "incremental"
    _as_full(kept, root, "a target and a grant moved")


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_an_address_held_twice_where_no_map_serves_it_stays_incremental(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    """A full run accepts an address twice (case aside) where it serves neither row: a
    disabled account beside a live one, two accounts or two aliases of a disabled domain.
    The kept state holds them as the full render does, and the runs after stay incremental
    (two rows that trade an address in one change included)."""
    url = _url(tmp_path, engine, request)
    kept, root = _kept(tmp_path, url)
    targeted = {target for (target,) in _rows(url, "SELECT target FROM alias_target")}
    domain, local = next(
        (domain, local)
        for domain, local, name in _rows(
            url,
            "SELECT a.domain_id, a.local_part, d.name FROM account a JOIN domain d "
            "ON d.id = a.domain_id WHERE a.status = 'active' AND d.kind = 'hosted' "
            "AND a.local_part <> 'postmaster' ORDER BY a.id",
        )
        if f"{local}@{name}" not in targeted
    )
    upper = local.upper()
    off = "FROM domain WHERE name = 'off.example'"
    _sql(
        url,
        "INSERT INTO account (domain_id, local_part, password_hash, status) "
        f"VALUES ({domain}, '{upper}', '{HASH}', 'disabled')",
        "INSERT INTO domain (name, status, default_mailstore_id) "
        "SELECT 'off.example', 'disabled', min(id) FROM mailstore",
        f"INSERT INTO account (domain_id, local_part, password_hash) SELECT id, 'kim', '{HASH}' {off}",
        f"INSERT INTO account (domain_id, local_part, password_hash) SELECT id, 'Kim', '{HASH}' {off}",
        f"INSERT INTO alias (domain_id, local_part) SELECT id, 'info' {off}",
        f"INSERT INTO alias (domain_id, local_part) SELECT id, 'Info' {off}",
    )
    kept.run()
    assert kept.last_read == "full"  # a domain added
    _as_full(kept, root, "the rows held twice")
    for number, change in enumerate(
        [
            (
                QUOTA.format(4242),
                f"UPDATE account SET quota_bytes = 7 WHERE local_part = '{upper}'",
                "UPDATE account SET status = 'disabled' WHERE local_part = 'kim'",
                "UPDATE alias SET expires_at = '2999-01-01' WHERE local_part = 'Info'",
            ),
            (
                f"UPDATE account SET status = 'active', local_part = '{local}x' "
                f"WHERE local_part = '{upper}'",
            ),
            # The newer row leaves an address, the older one takes it, in one change.
            (
                f"UPDATE account SET local_part = '{local}y' WHERE local_part = '{local}x'",
                f"UPDATE account SET local_part = '{local}x' WHERE local_part = '{local}'",
            ),
        ]
    ):
        _sql(url, *change)
        kept.run()
        assert kept.last_read == "incremental", f"change {number}: {change}"
        _as_full(kept, root, f"change {number}")


@pytest.mark.parametrize("engine", ["sqlite", "postgresql", "mariadb"])
def test_a_row_committed_late_with_an_older_stamp_is_read_though_the_fingerprint_stays(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    # The skew as shipped: a row stamped before the table's newest, committed after a run,
    # moves no fingerprint; for the skew after a change the kept state reads the changes.
    url = _url(tmp_path, engine, request)
    kept, _ = _kept(tmp_path, url)
    domain = _one(url, "SELECT name FROM domain WHERE id = 1")
    insert_account = (
        "INSERT INTO account (domain_id, local_part, password_hash) VALUES (1, 'LOCAL', '"
        + HASH
        + "')"
    )

    def read() -> None:
        kept.run()
        assert kept.last_read == "incremental"

    late_insert(
        url, insert_account.replace("LOCAL", "late"), insert_account.replace("LOCAL", "early"), read
    )
    recipients = bodies(kept.cfg.repository, "mx")["recipients"].decode()
    assert f"\nearly@{domain} " in recipients and f"\nlate@{domain} " not in recipients
    kept.run()
    assert kept.last_read == "incremental"
    recipients = bodies(kept.cfg.repository, "mx")["recipients"].decode()
    assert f"\nlate@{domain} " in recipients, "the row committed late"


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_row_committed_after_a_transaction_open_longer_than_the_skew_is_read(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    # A panel's transaction adds an account, stays open past the skew while the loop runs,
    # then commits: its row carries the stamp of its INSERT, older than the window the next
    # run reads. It is the table's newest, so the fingerprint moves; the run must not take
    # "no changed account" for the answer (it published nothing, noted the fingerprint as
    # checked, and the account waited for the full check).
    url = _url(tmp_path, engine, request)
    kept, root = _kept(tmp_path, url)
    aged = newest(url, "account") - timedelta(hours=2)  # the seed's rows, written long ago
    _sql(url, f"UPDATE account SET updated_at = {literal(aged)}")
    kept.run()
    mark = kept._state.mark if kept._state else None
    assert mark is not None
    stamp = mark.clock - changes.SKEW - timedelta(seconds=5)  # when its UPDATE ran
    _sql(
        url,
        "INSERT INTO account (domain_id, local_part, password_hash, updated_at) "
        f"VALUES (1, 'late', '{HASH}', {literal(stamp)})",
    )
    kept.run()
    assert kept.last_read == "full"
    _as_full(kept, root, "the late account")
    recipients = bodies(root / "inc", "mx")["recipients"].decode()
    assert "\nlate@" in recipients


@pytest.mark.parametrize("engine", ["sqlite", "postgresql", "mariadb"])
def test_a_row_whose_id_an_update_changes_leaves_nothing_behind(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    # A sync tool renumbers an account (and renames it): the row under its old id is gone as
    # if deleted, though no DELETE ran; its old address must leave the maps.
    url = _url(tmp_path, engine, request)
    kept, root = _kept(tmp_path, url)
    _sql(
        url,
        f"INSERT INTO account (domain_id, local_part, password_hash) VALUES (1, 'old', '{HASH}')",
    )
    kept.run()
    assert kept.last_read == "incremental"
    assert "\nold@" in bodies(root / "inc", "mx")["recipients"].decode()
    _sql(url, "UPDATE account SET id = id + 100000, local_part = 'new' WHERE local_part = 'old'")
    kept.run()
    recipients = bodies(root / "inc", "mx")["recipients"].decode()
    assert "\nnew@" in recipients and "\nold@" not in recipients
    _as_full(kept, root, "the renumbered account")


def test_a_restarted_loop_reads_once_so_its_first_change_is_incremental(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'central.db'}"
    cluster = make_cluster(tmp_path / "c", url, accounts=60, domains=4, aliases=20)
    _publisher(cluster.root, url, "inc").run()  # a one-shot publish, or an earlier loop
    kept = _publisher(cluster.root, url, "inc")
    kept.incremental = True
    serial = kept.repo.latest("mx").serial
    kept.run()  # nothing changed: read in full all the same, to keep the state
    assert kept.last_read == "full" and kept._state is not None
    assert kept.repo.latest("mx").serial == serial  # and nothing published
    kept.run()
    assert kept.last_read == "unchanged"
    _sql(url, "UPDATE account SET quota_bytes = 4321 WHERE id = (SELECT min(id) FROM account)")
    kept.run()
    assert kept.last_read == "incremental"
    assert kept.repo.latest("mx").serial == serial  # quota: in no MX map


def test_more_changed_rows_than_the_bound_read_in_full_though_of_one_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than MAX_CHANGED changed rows are a bulk change, read in full, however few aliases
    they belong to (the rows are read, not their DISTINCT parents: see read_changes)."""
    monkeypatch.setattr(changes, "SKEW", timedelta(0))  # else the seed's rows are read again
    monkeypatch.setattr(changes, "MAX_CHANGED", 5)
    url = f"sqlite:///{tmp_path / 'central.db'}"
    kept, root = _kept(tmp_path, url)
    (alias_id,) = _rows(url, "SELECT min(id) FROM alias")[0]
    _sql(
        url,
        *(
            f"INSERT INTO alias_target (alias_id, target) VALUES ({alias_id}, 'b{i}@bulk.example')"
            for i in range(5)
        ),
    )
    kept.run()
    assert kept.last_read == "incremental"  # five rows: at the bound
    _sql(
        url,
        *(
            f"INSERT INTO alias_target (alias_id, target) VALUES ({alias_id}, 'c{i}@bulk.example')"
            for i in range(6)
        ),
    )
    with capture_logs() as logs:
        kept.run()
    assert kept.last_read == "full"
    assert any(e.get("reason") == "more than 5 rows changed" for e in logs), logs
    _as_full(kept, root, "six targets of one alias")


def test_a_run_that_changes_no_map_copies_no_text_and_a_renewal_still_carries_every_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'central.db'}"
    kept, _ = _kept(tmp_path, url)
    repo = Repository(kept.cfg.repository)
    before = {ch: repo.latest_manifest(ch) for ch in ("mx", "store", "proxy")}
    copied: list[Path] = []
    real_copy = publisher.shutil.copy2

    def copy2(src: Any, dst: Any, **kw: Any) -> Any:
        copied.append(Path(dst))
        return real_copy(src, dst, **kw)

    monkeypatch.setattr(publisher.shutil, "copy2", copy2)
    touch = "UPDATE account SET local_part = local_part WHERE id = (SELECT min(id) FROM account)"
    _sql(url, touch)  # read as a change; no map shows it
    kept.run()
    assert kept.last_read == "incremental"
    assert copied == []  # no map changed, nothing published: no text copied
    for ch, manifest in before.items():
        current = repo.latest_manifest(ch)
        assert manifest is not None and current is not None and current.serial == manifest.serial
    # A renewal due: a new release of the same maps, every file the previous one byte for byte.
    monkeypatch.setattr(
        publisher, "renew_after", lambda cfg, last: datetime.now(UTC) - timedelta(seconds=1)
    )
    _sql(url, touch)
    kept.run()
    assert kept.last_read == "incremental"
    for ch, manifest in before.items():
        assert manifest is not None
        renewed = repo.latest_manifest(ch)
        assert renewed is not None and renewed.serial > manifest.serial
        for name, entry in renewed.maps.items():
            new_file = repo.release(ch, renewed.serial) / entry.file
            old_file = repo.release(ch, manifest.serial) / manifest.maps[name].file
            assert new_file.read_bytes() == old_file.read_bytes(), (ch, name)
    assert copied  # the unchanged maps were copied once the channel published


def test_a_database_restored_from_an_older_copy_is_read_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup restored under the long-running publisher: a row changed since the backup
    goes back to its old value, which no change read finds (nothing newer was written, no
    deletion logged). The newest stamp gone backwards with no deletion to explain it is read
    in full (the node kept the changed route until the full check, 15 minutes)."""
    monkeypatch.setattr(changes, "SKEW", timedelta(0))
    path = tmp_path / "central.db"
    url = f"sqlite:///{path}"
    cluster = make_cluster(tmp_path / "c", url, accounts=60, domains=3, aliases=20)
    kept = _publisher(cluster.root, url, "inc")
    kept.incremental = True
    kept.run()
    backup = tmp_path / "backup.db"
    with sqlite3.connect(path) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)
    time.sleep(0.01)
    run(url, "UPDATE account SET mailstore_id = 2 WHERE id = (SELECT min(id) FROM account)")
    kept.run()
    assert kept.last_read == "incremental"
    with sqlite3.connect(backup) as copy, sqlite3.connect(path) as live:
        copy.backup(live)  # the restore, in place
    kept.run()
    assert kept.last_read == "full"
    full = _publisher(cluster.root, url, "full")
    full.run()
    for channel in ("mx", "store", "proxy"):
        assert bodies(cluster.root / "inc", channel) == bodies(cluster.root / "full", channel)


@pytest.mark.postgresql
def test_postgresqls_infinite_expiries_read_as_never_and_expired_alike_in_both_reads(
    tmp_path: Path, pg_url: str
) -> None:
    """PostgreSQL's 'infinity' (its usual "never") and '-infinity' in alias.expires_at, and
    years psycopg cannot read (BC, after 9999): every publish failed with "timestamp too large
    (after year 10K): 'infinity'", naming no row, the fingerprint's newest expired one too.
    Now the far ends never expire, the near ones have, in the incremental read as in the full
    one, whatever the server's DateStyle."""
    kept, root = _kept(tmp_path, pg_url)
    _sql(pg_url, "ALTER DATABASE " + pg_url.rsplit("/", 1)[1] + " SET DateStyle = 'SQL, DMY'")
    targeted = {target for (target,) in _rows(pg_url, "SELECT target FROM alias_target")}
    aliases = [
        (alias_id, f"{local}@{name}")
        for alias_id, local, name in _rows(
            pg_url,
            "SELECT a.id, a.local_part, d.name FROM alias a JOIN domain d ON d.id = a.domain_id "
            "WHERE a.active AND a.local_part <> '' AND d.kind = 'hosted' "
            "AND d.status = 'active' ORDER BY a.id",
        )
        if f"{local}@{name}" not in targeted
    ][:4]
    assert len(aliases) == 4
    ends = ["infinity", "20000-01-01", "-infinity", "0100-01-01 BC"]
    statements = ["UPDATE alias SET expires_at = NULL"]  # '-infinity' the newest expired one
    statements += [
        f"UPDATE alias SET expires_at = '{end}' WHERE id = {alias_id}"
        for end, (alias_id, _) in zip(ends, aliases, strict=True)
    ]
    _sql(pg_url, *statements)
    kept.run()
    assert kept.last_read == "incremental"
    recipients = bodies(root / "inc", "mx")["recipients"].decode()
    for end, (_, address) in zip(ends, aliases, strict=True):
        assert (f"\n{address} " in recipients) == (not end.startswith(("-", "0100"))), end
    _as_full(kept, root, "infinite expiries")
    _sql(pg_url, f"UPDATE alias SET expires_at = 'infinity' WHERE id = {aliases[2][0]}")
    kept.run()
    assert kept.last_read == "incremental"
    assert f"\n{aliases[2][1]} " in bodies(root / "inc", "mx")["recipients"].decode()
    _as_full(kept, root, "-infinity made infinity")


@pytest.mark.postgresql
def test_an_infinite_updated_at_is_named_not_a_crash(tmp_path: Path, pg_url: str) -> None:
    """updated_at = 'infinity' (written past the trigger: disabled, or a restore with
    session_replication_role = replica) would stay the table's newest and hide every later
    change from the fingerprint; psycopg's "timestamp too large" named nothing. Now table and
    row; '-infinity', below every stamp, hides nothing and publishes."""
    kept, _ = _kept(tmp_path, pg_url)
    _sql(
        pg_url,
        "ALTER TABLE customer DISABLE TRIGGER customer_updated_at",
        "UPDATE customer SET updated_at = '-infinity'",
    )
    kept.run()  # every customer '-infinity': the table's newest too
    _sql(pg_url, "UPDATE customer SET updated_at = 'infinity' WHERE id = 1")
    with pytest.raises(InvalidData, match=r"customer id=1: updated_at 'infinity' is not a date"):
        kept.run()


@pytest.mark.postgresql
def test_a_timestamptz_expiry_expires_on_time_whatever_the_sessions_zone(
    tmp_path: Path, pg_url: str
) -> None:
    """alias.expires_at made a timestamptz (PostgreSQL users' habit) on a server east of UTC:
    the publisher's naive UTC 'now' was taken for Tokyo time, so the fingerprint saw no
    alias expire for nine hours, and neither the quiet check nor the incremental read removed
    it until the next full check. Now read in UTC: the run after it expires removes it."""
    kept, root = _kept(tmp_path, pg_url)
    _sql(
        pg_url,
        "ALTER TABLE alias ALTER expires_at TYPE timestamptz USING expires_at AT TIME ZONE 'UTC'",
        "ALTER DATABASE " + pg_url.rsplit("/", 1)[1] + " SET TimeZone = 'Asia/Tokyo'",
    )
    kept.run()
    targeted = {target for (target,) in _rows(pg_url, "SELECT target FROM alias_target")}
    alias_id, address = next(
        (alias_id, f"{local}@{name}")
        for alias_id, local, name in _rows(
            pg_url,
            "SELECT a.id, a.local_part, d.name FROM alias a JOIN domain d ON d.id = a.domain_id "
            "WHERE a.active AND a.expires_at IS NULL AND a.local_part <> '' "
            "AND d.kind = 'hosted' AND d.status = 'active' ORDER BY a.id",
        )
        if f"{local}@{name}" not in targeted
    )
    source = builtin.BuiltinSource(pg_url)
    try:
        before = source.fingerprint()
        _sql(
            pg_url,
            f"UPDATE alias SET expires_at = now() + interval '1 second' WHERE id = {alias_id}",
        )
        kept.run()
        assert f"\n{address} " in bodies(root / "inc", "mx")["recipients"].decode()
        time.sleep(1.5)
        after = source.fingerprint()
        assert after.tables["alias_expired"] != before.tables["alias_expired"]
    finally:
        source.close()
    kept.run()
    assert kept.last_read == "incremental"
    assert f"\n{address} " not in bodies(root / "inc", "mx")["recipients"].decode()
    _as_full(kept, root, "a timestamptz expiry")

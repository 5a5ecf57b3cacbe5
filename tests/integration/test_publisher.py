"""The publisher against a real SQLite database and a real repository on disk.

Invalid rows, crashes at the commit step, leftovers, serials, garbage collection, renewal,
signatures and keys. "Nothing written" is checked by comparing every file of the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, insert, update

import mapsync.publish.publisher as publisher_mod
import mapsync.publish.quiet as quiet_mod
import mapsync.publish.repository as repository_mod
import mapsync.publish.runlog as runlog_mod
from mapsync.errors import EXIT_OK, EXIT_WARNING, LockBusy, MapsyncError
from mapsync.formats import text
from mapsync.publish.plan import PublishResult
from mapsync.publish.publisher import Publisher
from mapsync.publish.repository import Repository
from mapsync.publish.runlog import publisher_status
from mapsync.release import MANIFEST, SIGNATURE, manifest_sha256, utcnow
from mapsync.signing import key_id, keygen, load_public, verify
from mapsync.sources import open_source
from mapsync.sources import schema as t
from tests.conftest import Cluster
from tests.helpers.agent import add_account
from tests.helpers.publisher import add_channels, assert_complete, parsed_manifest, set_row


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".publisher.json"  # the run note every run rewrites
    }


def run(cluster: Cluster, **kw: bool) -> PublishResult:
    pub = cluster.config().need_publisher()
    return Publisher(pub, lambda: open_source(pub.database, pub.schema)).run(**kw)


def latest(cluster: Cluster) -> int:
    return int(json.loads((cluster.repo / "mx" / "LATEST").read_text())["serial"])


def releases(cluster: Cluster) -> list[int]:
    return sorted(int(p.name) for p in (cluster.repo / "mx" / "releases").iterdir())


def execute(cluster: Cluster, *statements: object) -> None:
    engine = create_engine(cluster.db_url)
    try:
        with engine.begin() as conn:
            for s in statements:
                conn.execute(s)  # type: ignore[call-overload]
    finally:
        engine.dispose()


# --- invalid rows ------------------------------------------------------------------------------


def insert_bad_rows(cluster: Cluster) -> list[str]:
    execute(
        cluster,
        insert(t.account).values(id=9001, domain_id=2, local_part="bad user", status="active"),
        insert(t.account).values(id=9002, domain_id=2, local_part="good.newcomer", status="active"),
        insert(t.alias).values(id=9003, domain_id=3, local_part="#hidden"),
        insert(t.alias_target).values(alias_id=9003, target="postmaster@example-3.org"),
        insert(t.alias).values(id=9004, domain_id=3, local_part="sales-x"),
        insert(t.alias_target).values(alias_id=9004, target="a,b@example-3.org"),
        insert(t.domain).values(id=9005, name="Bad.Example", kind="hosted", default_mailstore_id=1),
        insert(t.domain).values(id=9006, name="norelay.example", kind="relay"),
    )
    return [
        "account id=9001 'bad user@example-2.org': local part has characters that are not allowed",
        "alias id=9003 '#hidden@example-3.org': local part starts with '#'",
        "alias id=9004 'sales-x@example-3.org': target 'a,b@example-3.org': local part has characters",
        "domain id=9005 'Bad.Example': not lowercase",
        "domain id=9006 'norelay.example': relay domain has no relay_nexthop",
    ]


def test_invalid_rows_fail_the_publish_and_are_all_listed(cluster: Cluster) -> None:
    cluster.publish()
    before = tree(cluster.repo)
    expected = insert_bad_rows(cluster)

    proc = cluster.cli("publish")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        f"mapsync: {len(expected)} invalid row(s) in the database; nothing was published"
        in proc.stderr
    )
    for row in expected:
        assert row in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree(cluster.repo) == before
    assert latest(cluster) == 1

    # The dry run says the same and also exits 2.
    assert cluster.cli("publish", "--dry-run").returncode == 2


def test_skip_invalid_publishes_the_rest_and_records_the_skipped(cluster: Cluster) -> None:
    cluster.publish()
    expected = insert_bad_rows(cluster)

    out = cluster.publish("--skip-invalid").stdout
    assert f"skipped {len(expected)} invalid row(s):" in out
    m = assert_complete(cluster, 2)
    assert len(m.skipped) == len(expected)
    for row, recorded in zip(sorted(expected), sorted(m.skipped), strict=True):
        assert recorded.startswith(row)
    release = cluster.repo / "mx" / "releases" / "2"
    recipients = dict(text.pairs(release / "recipients"))
    assert b"good.newcomer@example-2.org" in recipients
    assert not [k for k in recipients if b"bad" in k or b"hidden" in k or b"sales-x" in k]
    domains = dict(text.pairs(release / "domains"))
    assert b"Bad.Example" not in domains and b"bad.example" not in domains
    assert b"norelay.example" not in domains
    assert b"example-2.org" in domains


def test_an_alias_into_a_disabled_domain_is_refused_not_sent_away(cluster: Cluster) -> None:
    """A target in a domain of this cluster that is disabled (or whose customer is closed)
    reaches nothing published: the MX would accept the alias and send its mail out to that
    domain's MX, often this cluster again (a bounce or a loop). Refused as a target that is
    no account or alias is; --skip-invalid leaves the alias out."""
    execute(
        cluster,
        insert(t.domain).values(
            id=9100, name="leaving.example", kind="hosted", default_mailstore_id=1
        ),
        insert(t.account).values(id=9101, domain_id=9100, local_part="postmaster", status="active"),
        insert(t.alias).values(id=9102, domain_id=2, local_part="boss"),
        insert(t.alias_target).values(alias_id=9102, target="postmaster@leaving.example"),
    )
    cluster.publish()
    set_row(cluster, t.domain, 9100, status="disabled")
    before = tree(cluster.repo)
    proc = cluster.cli("publish")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        "alias id=9102 'boss@example-2.org': target 'postmaster@leaving.example' is in domain "
        "'leaving.example', which is disabled (nothing here receives it)"
    ) in proc.stderr
    assert tree(cluster.repo) == before
    assert "skipped 1 invalid row(s):" in cluster.publish("--skip-invalid").stdout
    release = cluster.repo / "mx" / "releases" / "2"
    assert b"boss@example-2.org" not in dict(text.pairs(release / "recipients"))
    assert b"boss@example-2.org" not in dict(text.pairs(release / "virtual"))
    assert b"leaving.example" not in dict(text.pairs(release / "domains"))


@pytest.mark.parametrize("space", ["\u00a0", "\u3000", "\u2028", "\x85"])
def test_a_u_label_holding_a_space_is_a_skippable_row(cluster: Cluster, space: str) -> None:
    # Such a U-label used to pass validation and then be refused by the renderer, for every
    # channel and even with --skip-invalid, naming no row.
    cluster.publish()
    label = f"b{space}cher"
    name = "xn--" + label.encode("punycode").decode() + ".example"
    execute(
        cluster,
        insert(t.domain).values(
            id=9010, name=name, name_unicode=f"{label}.example", kind="relay",
            relay_nexthop="[mx.example.net]:25",
        ),
    )  # fmt: skip
    row = (
        f"domain id=9010 {name!r}: name_unicode {label + '.example'!r} contains U+{ord(space):04X}"
    )
    proc = cluster.cli("publish")
    assert proc.returncode == 2 and row in proc.stderr, proc.stdout + proc.stderr
    out = cluster.publish("--skip-invalid").stdout
    assert "skipped 1 invalid row(s):" in out and row in out, out
    release = cluster.repo / "mx" / "releases" / str(latest(cluster))
    domains = dict(text.pairs(release / "domains"))
    assert name.encode() not in domains and b"example-2.org" in domains


# --- crash safety ------------------------------------------------------------------------------


def test_crash_before_latest_is_replaced_keeps_the_old_release_live(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.publish()
    add_account(cluster, "first.change", "example-2.org")

    def disk_full(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repository_mod, "atomic_write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(cluster)
    monkeypatch.undo()

    assert latest(cluster) == 1
    # Release 2 was moved into place before LATEST: whole and signed, just never named.
    assert releases(cluster) == [1, 2]
    for serial in releases(cluster):
        assert_complete(cluster, serial)
    assert not (cluster.repo / "mx" / ".staging").exists()

    (plan,) = run(cluster).plans
    assert (plan.action, plan.serial, plan.previous) == ("publish", 3, 1)
    assert latest(cluster) == 3
    assert_complete(cluster, 3)
    assert b"first.change@example-2.org" in dict(
        text.pairs(cluster.repo / "mx" / "releases" / str(plan.serial) / "recipients")
    )


def test_crash_when_moving_the_release_into_place(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.publish()
    before = tree(cluster.repo)
    add_account(cluster, "second.change", "example-2.org")
    real_rename = os.rename

    def failing_rename(src: object, dst: object, *a: object, **kw: object) -> None:
        if ".staging" in str(src):
            raise OSError(5, "Input/output error")
        real_rename(src, dst, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="Input/output error"):
        run(cluster)
    monkeypatch.undo()

    assert tree(cluster.repo) == before  # not even a staging leftover
    assert run(cluster).plans[0].serial == 2
    assert latest(cluster) == 2
    assert_complete(cluster, 2)


def test_unwritable_repository_exits_2_with_one_line(cluster: Cluster) -> None:
    (cluster.root / "afile").write_text("")
    cluster.write_config(extra_publisher="")
    cfg = cluster.config_path.read_text().replace(
        f'repository = "{cluster.repo}"', f'repository = "{cluster.root / "afile" / "repo"}"'
    )
    cluster.config_path.write_text(cfg)
    proc = cluster.cli("publish")
    assert proc.returncode == 2
    # Refused when the config is loaded, naming file, key and the path in the way.
    assert proc.stderr.splitlines() == [
        f"mapsync: {cluster.config_path}: [publisher] repository: {cluster.root / 'afile' / 'repo'} "
        f"lies under {cluster.root / 'afile'}, which is not a directory"
    ]


def test_leftover_staging_of_a_killed_run_is_cleaned(cluster: Cluster) -> None:
    cluster.publish()
    junk = cluster.repo / "mx" / ".staging" / "2"
    junk.mkdir(parents=True)
    (junk / "recipients").write_text("half a file")
    add_account(cluster, "after.crash", "example-2.org")
    cluster.publish()
    assert not (cluster.repo / "mx" / ".staging").exists()
    assert releases(cluster) == [1, 2]
    assert_complete(cluster, 2)


def test_a_signal_as_a_staging_directory_is_entered_leaves_none(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM landing after stage()'s __enter__ made the directory but before the run's
    ExitStack holds its __exit__: the directory is removed all the same."""
    real = Repository.stage

    class Signalled:
        def __init__(self, cm: Any) -> None:
            self.cm = cm

        def __enter__(self) -> Any:
            self.cm.__enter__()
            raise SystemExit(143)

        def __exit__(self, *exc: object) -> Any:
            return self.cm.__exit__(*exc)

    def stage(self: Repository, channel: str, last: Any) -> Signalled:
        return Signalled(real(self, channel, last))

    monkeypatch.setattr(Repository, "stage", stage)
    with pytest.raises(SystemExit) as signalled:
        run(cluster, force=True)
    # Checked while the traceback (and so stage()'s suspended generator) is alive, as it is
    # while the CLI reports the signal: not left to the garbage collector.
    assert signalled.value.code == 143
    assert not (cluster.repo / "mx" / ".staging").exists()


# --- serials, unchanged content, garbage collection ---------------------------------------------


def test_serials_strictly_increase_and_chain(cluster: Cluster) -> None:
    serials = []
    for i in range(4):
        if i:
            add_account(cluster, f"user{i}", "example-2.org")
        (plan,) = run(cluster).plans
        assert plan.action == "publish"
        serials.append(plan.serial)
    assert serials == [1, 2, 3, 4]
    assert [parsed_manifest(cluster, "mx", s).previous for s in serials] == [None, 1, 2, 3]
    created = [parsed_manifest(cluster, "mx", s).created_at() for s in serials]
    assert created == sorted(created)


def test_database_change_without_map_change_makes_no_release(cluster: Cluster) -> None:
    cluster.publish()
    # Touches updated_at and counts (the fingerprint) but nothing any MX map shows.
    execute(
        cluster,
        update(t.customer).where(t.customer.c.id == 1).values(name="Renamed Customer"),
        update(t.account).where(t.account.c.id == 1).values(quota_bytes=1),
    )
    out = cluster.publish().stdout
    assert "unchanged (serial 1)" in out
    assert releases(cluster) == [1] and latest(cluster) == 1


def test_keep_two_collects_old_releases(cluster: Cluster) -> None:
    cluster.write_config(extra_publisher="keep = 2")
    for i in range(4):
        if i:
            add_account(cluster, f"k{i}", "example-2.org")
        run(cluster)
        assert latest(cluster) == i + 1
        assert releases(cluster) == list(range(max(1, i), i + 2))
    assert releases(cluster) == [3, 4]
    assert_complete(cluster, 4)


def test_garbage_collection_never_removes_the_release_latest_names(cluster: Cluster) -> None:
    for i in range(4):
        if i:
            add_account(cluster, f"g{i}", "example-2.org")
        run(cluster)
    repo = Repository(cluster.repo)
    # LATEST pointing at an older release (e.g. a publisher rollback): it must survive.
    data = (cluster.repo / "mx" / "releases" / "2" / MANIFEST).read_bytes()
    (cluster.repo / "mx" / "LATEST").write_bytes(
        json.dumps({"serial": 2, "manifest_sha256": manifest_sha256(data)}).encode()
    )
    assert repo.collect_garbage("mx", 2) == [1]
    assert releases(cluster) == [2, 3, 4]
    assert repo.collect_garbage("mx", 10) == []


def test_one_publisher_at_a_time(cluster: Cluster) -> None:
    repo = Repository(cluster.repo)
    with (
        repo.lock(),
        pytest.raises(LockBusy, match="another publisher is running"),
        repo.lock(wait=0.3),
    ):
        pass
    with repo.lock(wait=0):  # released on exit
        pass


# --- renewal -------------------------------------------------------------------------------------


def test_a_clock_stepped_back_is_said_at_publish_and_by_status(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher's clock stepped back 8 days: the next release is created before the one
    it follows and has expired already (every node refuses it). The run says so, and status
    --publisher, judging on the same clock, warns until a release is created in order."""
    cluster.publish()
    add_account(cluster, "zz-clock")
    behind = utcnow() - timedelta(days=8)
    for module in (publisher_mod, quiet_mod, runlog_mod):
        monkeypatch.setattr(module, "utcnow", lambda: behind)
    warned = []
    monkeypatch.setattr(
        publisher_mod._log, "warning", lambda event, **kw: warned.append((event, kw))
    )
    (plan,) = run(cluster).plans
    assert (plan.action, plan.serial) == ("publish", 2)
    assert [kw["previous"] for e, kw in warned if "clock is behind" in e] == [1]
    st = publisher_status(cluster.config().need_publisher())
    assert st.code == EXIT_WARNING, st.message
    assert "channel mx: serial 2 is created " in st.message
    assert ", before serial 1 (" in st.message and "clock was stepped back" in st.message
    monkeypatch.undo()
    add_account(cluster, "zz-clock-set-right")
    cluster.publish()
    assert publisher_status(cluster.config().need_publisher()).code == EXIT_OK


def test_renewal_past_half_expiry_makes_a_new_serial_with_the_same_maps(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.publish()
    first = parsed_manifest(cluster, "mx", 1)
    rel1 = cluster.repo / "mx" / "releases" / "1"

    def clock(now: Callable[[], datetime]) -> None:
        # The publisher's, and that of the decision that nothing is to be done.
        for module in (publisher_mod, quiet_mod):
            monkeypatch.setattr(module, "utcnow", now)

    # Before half of the 7 days: nothing to do.
    clock(lambda: utcnow() + timedelta(days=3))
    assert run(cluster).plans[0].action == "none"
    assert releases(cluster) == [1]

    later = utcnow() + timedelta(days=4)
    clock(lambda: later)
    (plan,) = run(cluster).plans
    assert (plan.action, plan.serial, plan.previous) == ("renew", 2, 1)
    second = assert_complete(cluster, 2)
    assert latest(cluster) == 2
    assert second.maps == first.maps  # identical sha256s, sizes, entries, cdb hashes
    for entry in first.maps.values():
        assert (rel1 / entry.file).read_bytes() == (
            cluster.repo / "mx" / "releases" / "2" / entry.file
        ).read_bytes()
    assert second.previous == 1
    assert second.created_at() == later
    assert second.expires_at() == later + timedelta(days=7)
    assert second.expires_at() > first.expires_at()

    # Renewed: quiet again until half of the new expiry.
    assert run(cluster).plans[0].action == "none"
    assert releases(cluster) == [1, 2]


# --- signatures and keys -------------------------------------------------------------------------


def test_published_release_verifies_and_latest_names_its_manifest(cluster: Cluster) -> None:
    cluster.publish()
    m = assert_complete(cluster, 1)
    data = (cluster.repo / "mx" / "releases" / "1" / MANIFEST).read_bytes()
    pointer = json.loads((cluster.repo / "mx" / "LATEST").read_text())
    assert pointer == {"serial": 1, "manifest_sha256": manifest_sha256(data)}
    assert m.source["url"] == cluster.db_url and m.source["schema"] == "mapsync"
    assert m.generator.startswith("mapsync ")
    assert m.skipped == [] and not any(e.forced for e in m.maps.values())
    assert set(m.maps) == {"domains", "recipients", "virtual", "transport"}
    # No cdb travels: agents build it and prove it by the manifest's hash.
    assert not list((cluster.repo / "mx" / "releases" / "1").glob("*.cdb"))
    # A tampered manifest no longer verifies.
    pub = load_public(cluster.root / "keys" / "signing.pub")
    sig = (cluster.repo / "mx" / "releases" / "1" / SIGNATURE).read_bytes()
    with pytest.raises(MapsyncError, match="does not verify"):
        verify({key_id(pub): pub}, data.replace(b'"entries": ', b'"entries": 1', 1), sig, "x")


def test_text_maps_are_sorted_unique_with_a_header(cluster: Cluster) -> None:
    cluster.publish()
    for name in ("domains", "recipients", "virtual", "transport"):
        path = cluster.repo / "mx" / "releases" / "1" / name
        lines = path.read_bytes().split(b"\n")
        assert lines[0].startswith(f"# {name}: generated by mapsync".encode())
        assert b"channel mx, serial 1" in lines[0]
        keys = [k for k, _ in text.pairs(path)]
        assert keys == sorted(keys) and len(keys) == len(set(keys))
        assert all(k == k.lower() for k in keys)


def test_keygen_makes_a_private_0600_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    private = tmp_path / "keys" / "signing.key"
    public, kid = keygen(private)
    assert public == tmp_path / "keys" / "signing.pub"
    assert kid == key_id(load_public(public))
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    load_public(public)
    old = private.read_bytes(), public.read_bytes()

    with pytest.raises(MapsyncError, match="already exists; refusing to overwrite"):
        keygen(private)
    proc = subprocess.run(
        [sys.executable, "-m", "mapsync", "keygen", str(private)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mapsync: {private}: already exists; refusing to overwrite a key"
    assert (private.read_bytes(), public.read_bytes()) == old

    # Only the public half left over from an earlier key: still refused, nothing written.
    lone = tmp_path / "k"
    (tmp_path / "k.pub").write_text("old public")
    with pytest.raises(MapsyncError, match=r"k\.pub: already exists"):
        keygen(lone)
    assert not lone.exists()


def test_keygen_cli_names_both_files(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mapsync", "keygen", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.strip()
        == f"private key {tmp_path / 'k'} (mode 0600), public key {tmp_path / 'k.pub'}, "
        f"key id {key_id(load_public(tmp_path / 'k.pub'))}"
    )
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_signing_key_others_may_read_is_refused(cluster: Cluster, mode: int) -> None:
    # As rsync refuses a password_file others may read: whoever reads the key signs releases.
    cluster.publish()
    add_account(cluster, "after.the.chmod", "example-2.org")
    key = cluster.root / "keys" / "signing.key"
    key.chmod(mode)
    before = tree(cluster.repo)
    for args in (["publish"], ["rollback", "--publisher", "1"]):
        p = cluster.cli(*args)
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"{key}: signing key has mode {mode:04o}" in p.stderr, p.stderr
        assert f"chmod 600 {key}" in p.stderr and "Traceback" not in p.stderr
    assert tree(cluster.repo) == before
    key.chmod(0o600)
    cluster.publish()
    assert latest(cluster) == 2


def test_text_in_an_sqlite_integer_column_is_an_invalid_row(cluster: Cluster) -> None:
    # SQLite stores whatever an INTEGER column is given; a port rendered into a proxy or
    # transport line must be a number, or it could carry fields of its own.
    cluster.publish()
    db = cluster.db_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE mailstore SET lmtp_port = '24 host=10.9.9.9' WHERE id = 1")
    conn.close()
    add_account(
        cluster, "changes.the.fingerprint", "example-2.org"
    )  # a raw UPDATE leaves updated_at alone
    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "mailstore id=1 'store-1': lmtp_port '24 host=10.9.9.9' is not a number" in p.stderr
    assert "Traceback" not in p.stderr
    assert latest(cluster) == 1


def test_rows_whose_domain_or_account_was_deleted_without_them_are_named(cluster: Cluster) -> None:
    """A writer with foreign keys off (SQLite's default: its CLI, most scripts) deletes a
    domain or an account and leaves its rows: they vanished from every map without a word.
    An account or alias of no domain is an invalid row; a sender grant of no account, which
    grants nothing, a warning."""
    cluster.publish()
    db = sqlite3.connect(cluster.db_url.removeprefix("sqlite:///"))
    with db:
        db.execute("INSERT INTO account (id, domain_id, local_part) VALUES (9301, 999, 'lost')")
        db.execute("INSERT INTO alias (id, domain_id, local_part) VALUES (9302, 998, 'gone')")
        db.execute("INSERT INTO sender_grant (account_id, address) VALUES (9999, 'x@example.org')")
    db.close()
    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "account id=9301 'lost': domain_id 999 is no domain" in p.stderr
    assert "alias id=9302 'gone': domain_id 998 is no domain" in p.stderr
    assert "sender grant of no account ignored" in p.stderr and "account_id=9999" in p.stderr


def test_a_boolean_column_holding_text_is_an_invalid_row_not_true(cluster: Cluster) -> None:
    """SQLite keeps any text in a BOOLEAN column, and 'false' read as true: IMAP stayed
    allowed to an account whose allow_imap said 'false', a mailstore stayed active. Each is
    an invalid row naming its table, row and column."""
    cluster.publish()
    db = sqlite3.connect(cluster.db_url.removeprefix("sqlite:///"))
    with db:
        account = db.execute("SELECT id, local_part FROM account ORDER BY id LIMIT 1").fetchone()
        db.execute("UPDATE account SET allow_imap = 'false' WHERE id = ?", (account[0],))
        db.execute("UPDATE mailstore SET active = 'no' WHERE id = 1")
        alias = db.execute("SELECT id, local_part FROM alias WHERE local_part != ''").fetchone()
        db.execute("UPDATE alias SET active = 'true' WHERE id = ?", (alias[0],))
    db.close()
    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"account id={account[0]} '{account[1]}@" in p.stderr
    assert "allow_imap 'false' is not a boolean (0 or 1)" in p.stderr
    assert "mailstore id=1 'store-1': active 'no' is not a boolean (0 or 1)" in p.stderr
    assert f"alias id={alias[0]} '{alias[1]}@" in p.stderr  # it vanished without a word
    assert "active 'true' is not a boolean (0 or 1)" in p.stderr


def test_the_rows_of_a_domain_skipped_as_invalid_are_not_named_again(cluster: Cluster) -> None:
    """--skip-invalid leaves out a domain whose name is invalid, and its accounts and aliases
    with it: the domain is named once, not each of its rows as one of no domain."""
    db = sqlite3.connect(cluster.db_url.removeprefix("sqlite:///"))
    with db:
        domain = db.execute(
            "SELECT id FROM domain WHERE kind = 'hosted' AND id IN (SELECT domain_id FROM alias)"
        ).fetchone()[0]
        db.execute("UPDATE domain SET name = 'exa mple.org' WHERE id = ?", (domain,))
    db.close()
    p = cluster.cli("publish", "--dry-run", "--skip-invalid")
    assert p.returncode in (0, 1), p.stdout + p.stderr
    assert f"row={domain}" in p.stderr and "skipping invalid row" in p.stderr
    assert "is no domain" not in p.stderr, p.stderr


def test_a_channel_taken_out_of_the_config_is_a_warning_while_its_directory_serves(
    cluster: Cluster,
) -> None:
    """A channel renamed or removed: its releases stay in the repository, no longer renewed,
    and every node still pulling it goes CRITICAL when the last one expires; the publisher
    said OK. status --publisher names it until its directory is removed."""
    config = cluster.config_path.read_text()
    add_channels(cluster, '[publisher.channels.edge]\nmaps = ["domains", "recipients"]\n')
    cluster.publish()
    assert cluster.cli("status", "--publisher").returncode == 0
    cluster.config_path.write_text(config)
    cluster.publish()
    st = cluster.cli("status", "--publisher")
    assert st.returncode == 1, st.stdout
    assert "no longer in the config, not renewed: edge (serial 1, expires " in st.stdout
    shutil.rmtree(cluster.repo / "edge")
    assert cluster.cli("status", "--publisher").returncode == 0


def test_a_run_of_one_channel_clears_no_other_channels_failure(cluster: Cluster) -> None:
    """Channel edge refused in every full run, then ``publish --channel mx`` succeeding:
    status --publisher said OK (the note was one for the whole publisher) while edge went
    unrenewed. Each channel is judged by its own runs now."""
    add_channels(cluster, '[publisher.channels.edge]\nmaps = ["domains", "senders"]\n')
    cluster.publish()
    guarded = cluster.config_path.read_text()
    cluster.config_path.write_text(
        guarded.replace(
            "\n[agent]\n", "\n[publisher.guards.senders]\nmin_entries = 100000000\n\n[agent]\n", 1
        )
    )
    db = sqlite3.connect(cluster.db_url.removeprefix("sqlite:///"))
    with db:
        db.execute(
            "INSERT INTO sender_grant (account_id, address)"
            " SELECT MIN(id), 'x@example.net' FROM account"
        )
    db.close()
    refused = cluster.cli("publish")
    assert refused.returncode == 4, refused.stdout + refused.stderr  # refused by a guard
    cluster.publish("--channel", "mx")
    st = cluster.cli("status", "--publisher", "--json")
    assert st.returncode == 1, st.stdout
    found = json.loads(st.stdout)
    assert found["message"].startswith("channel(s) edge: last run failed "), found
    assert found["last_error"].startswith("edge: publish refused by guards"), found
    note = json.loads((cluster.repo / ".publisher.json").read_text())
    assert note["channels"]["mx"]["last_error"] is None
    cluster.publish("--force")  # the operator lets edge's change through: all is well again
    assert cluster.cli("status", "--publisher").returncode == 0


@pytest.mark.parametrize("expires", ["never", "", 0])
def test_an_expiry_that_is_no_time_is_an_invalid_row_not_a_crash(
    cluster: Cluster, expires: object
) -> None:
    """SQLite keeps any text or number in alias.expires_at (a DATETIME): every publish failed
    with 'unexpected error: ValueError: Invalid isoformat string', naming no row."""
    cluster.publish()
    db = sqlite3.connect(cluster.db_url.removeprefix("sqlite:///"))
    with db:
        alias_id = db.execute("SELECT MIN(id) FROM alias").fetchone()[0]
        db.execute("UPDATE alias SET expires_at = ? WHERE id = ?", (expires, alias_id))
    db.close()
    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "unexpected error" not in p.stderr, p.stderr
    assert f"alias id={alias_id} " in p.stderr
    assert f"expires_at {expires!r} is not a date and time" in p.stderr


@pytest.mark.parametrize("log", ["deletion log", "no deletion log"])
def test_an_updated_at_that_is_no_time_is_named_not_a_crash(cluster: Cluster, log: str) -> None:
    """updated_at = 'now' (PostgreSQL reads it as the time; SQLite keeps the text, which sorts
    after every stamp): 'unexpected error: ValueError', naming nothing. Now table and row;
    also in a database whose init-db predates the deletion log (a row count per table)."""
    cluster.publish()
    db = sqlite3.connect(cluster.db_url.removeprefix("sqlite:///"))
    with db:
        if log == "no deletion log":
            for (trigger,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
                db.execute(f'DROP TRIGGER "{trigger}"')
            db.execute("DROP TABLE mapsync_deleted")
        account_id = db.execute("SELECT MIN(id) FROM account").fetchone()[0]
        db.execute("UPDATE account SET updated_at = 'now' WHERE id = ?", (account_id,))
    db.close()
    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "unexpected error" not in p.stderr, p.stderr
    assert f"account id={account_id}: updated_at 'now' is not a date and time" in p.stderr


def test_an_updated_at_that_is_a_number_in_every_row_is_named_not_a_crash(
    cluster: Cluster,
) -> None:
    """A writer stamping Unix time (SQLite keeps the number): a table whose every row has
    one gave 'unexpected error: ValueError: Invalid isoformat string', naming nothing."""
    cluster.publish()
    db = sqlite3.connect(cluster.db_url.removeprefix("sqlite:///"))
    with db:
        customer_id = db.execute("SELECT MIN(id) FROM customer").fetchone()[0]
        db.execute("UPDATE customer SET updated_at = 1764641000")
    db.close()
    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "unexpected error" not in p.stderr, p.stderr
    assert f"customer id={customer_id}" in p.stderr
    assert "updated_at 1764641000 is not a date and time" in p.stderr


def test_a_blob_in_a_text_column_is_an_invalid_row_not_a_crash(cluster: Cluster) -> None:
    """SQLite keeps a BLOB in a TEXT column: 'unexpected error: TypeError: cannot use a
    string pattern on a bytes-like object', naming no row. Now the row and the column."""
    cluster.publish()
    db = sqlite3.connect(cluster.db_url.removeprefix("sqlite:///"))
    with db:
        account = db.execute("SELECT id, local_part FROM account ORDER BY id LIMIT 1").fetchone()
        db.execute(
            "UPDATE account SET home = CAST('/var/vmail/x' AS BLOB) WHERE id = ?", (account[0],)
        )
        db.execute("UPDATE alias_target SET target = CAST(target AS BLOB) WHERE rowid = 1")
    db.close()
    p = cluster.cli("publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "unexpected error" not in p.stderr, p.stderr
    assert f"account id={account[0]} '{account[1]}': home is bytes (a BLOB), not text" in p.stderr
    assert "target is bytes (a BLOB), not text" in p.stderr

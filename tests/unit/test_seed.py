"""``mapsync seed``: deterministic, honours its counts, valid data, refuses a non-empty database,
and ``--password`` gives hashes Dovecot (and Python's crypt) accept."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from mapsync.config import PublisherChannel
from mapsync.errors import MapsyncError
from mapsync.maps import CATALOGUE, Directory
from mapsync.signing import keygen
from mapsync.sources import schema as t
from mapsync.sources.builtin import BuiltinSource
from mapsync.sources.seed import SeedCounts, seed
from mapsync.validate import check
from tests.conftest import Cluster

SMALL = SeedCounts(accounts=150, domains=30, aliases=40, mailstores=3)
STAMPS = {"created_at", "updated_at"}


def url(tmp_path: Path, name: str) -> str:
    return f"sqlite:///{tmp_path / name}.db"


def dump(db: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, minus the timestamps, in primary-key order."""
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            out = {}
            for table in t.TABLES:
                cols = [c for c in table.c if c.name not in STAMPS]
                out[table.name] = [
                    tuple(r)
                    for r in conn.execute(select(*cols).order_by(*table.primary_key.columns))
                ]
            return out
    finally:
        engine.dispose()


def test_same_seed_same_rows(tmp_path: Path) -> None:
    made_a = seed(url(tmp_path, "a"), SMALL, seed=42)
    made_b = seed(url(tmp_path, "b"), SMALL, seed=42)
    assert made_a == made_b
    a, b = dump(url(tmp_path, "a")), dump(url(tmp_path, "b"))
    assert a == b
    assert len(a["account"]) == 150


def test_different_seed_different_rows(tmp_path: Path) -> None:
    seed(url(tmp_path, "a"), SMALL, seed=1)
    seed(url(tmp_path, "b"), SMALL, seed=2)
    a, b = dump(url(tmp_path, "a")), dump(url(tmp_path, "b"))
    assert a["account"] != b["account"]
    assert a["alias"] != b["alias"]
    # The skeleton does not depend on the seed: same stores and domains.
    assert a["mailstore"] == b["mailstore"] and a["domain"] == b["domain"]


def test_counts_are_honoured(tmp_path: Path) -> None:
    db = url(tmp_path, "c")
    made = seed(db, SMALL, seed=3)
    rows = dump(db)
    assert made["account"] == len(rows["account"]) == 150
    assert made["mailstore"] == len(rows["mailstore"]) == 3
    assert [r[1] for r in rows["mailstore"]] == ["store-1", "store-2", "store-3"]
    cols = [c.name for c in t.domain.c if c.name not in STAMPS]
    domains = [dict(zip(cols, r, strict=True)) for r in rows["domain"]]
    hosted = [d for d in domains if d["kind"] == "hosted"]
    assert [d["name"] for d in hosted] == [f"example-{i}.org" for i in range(1, 31)]
    assert {d["kind"] for d in domains} == {"hosted", "alias", "relay"}
    assert made["domain"] == len(domains)
    # One catch-all per 25 hosted domains comes on top of the requested aliases.
    alias_cols = [c.name for c in t.alias.c if c.name not in STAMPS]
    aliases = [dict(zip(alias_cols, r, strict=True)) for r in rows["alias"]]
    assert len([a for a in aliases if a["local_part"]]) == 40
    assert len([a for a in aliases if not a["local_part"]]) == 30 // 25
    assert made["alias"] == len(aliases)
    assert made["alias_target"] == len(rows["alias_target"])
    idn = [d for d in domains if d["name_unicode"]]
    assert [(d["name"], d["name_unicode"]) for d in idn] == [
        ("xn--bcher-1-n2a.example", "bücher-1.example")
    ]


def test_every_hosted_domain_has_postmaster(tmp_path: Path) -> None:
    db = url(tmp_path, "p")
    seed(db, SMALL, seed=4)
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            hosted = set(
                conn.execute(select(t.domain.c.id).where(t.domain.c.kind == "hosted")).scalars()
            )
            with_postmaster = set(
                conn.execute(
                    select(t.account.c.domain_id).where(
                        t.account.c.local_part == "postmaster", t.account.c.status == "active"
                    )
                ).scalars()
            )
    finally:
        engine.dispose()
    assert len(hosted) == 30
    assert hosted == with_postmaster


@pytest.mark.parametrize("s", [1, 7, 99])
def test_seeded_data_is_valid_and_renders(tmp_path: Path, s: int) -> None:
    db = url(tmp_path, f"v{s}")
    seed(db, SeedCounts(accounts=300, domains=50, aliases=100, mailstores=4), seed=s)
    source = BuiltinSource(db)
    try:
        snap = source.snapshot(secrets=True)  # every map, the passdbs too
    finally:
        source.close()
    assert check(snap) == []
    statuses = {a.status for a in snap.accounts}
    assert "active" in statuses
    directory = Directory(snap)
    mx = PublisherChannel("mx", tuple(CATALOGUE))
    for name, m in CATALOGUE.items():
        keys = [k for k, _ in m.entries(directory, mx)]
        assert keys and len(keys) == len(set(keys)), name


def test_seeding_a_non_empty_database_fails_clearly(tmp_path: Path) -> None:
    db = url(tmp_path, "n")
    seed(db, SMALL, seed=5)
    before = dump(db)
    with pytest.raises(
        MapsyncError, match=r"already has \d+ domains; seed fills an empty database"
    ) as info:
        seed(db, SMALL, seed=6)
    assert str(info.value).startswith(f"database {db} ")
    assert dump(db) == before


def test_seed_needs_a_domain_and_a_mailstore(tmp_path: Path) -> None:
    with pytest.raises(MapsyncError, match="at least one domain and one mailstore"):
        seed(url(tmp_path, "z"), SeedCounts(accounts=5, domains=0, aliases=0, mailstores=1))
    with pytest.raises(MapsyncError, match="at least one domain and one mailstore"):
        seed(url(tmp_path, "z"), SeedCounts(accounts=5, domains=1, aliases=0, mailstores=0))


def _crypt() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return crypt


def test_cli_seed_with_password_gives_sha512_crypt_hashes(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    keygen(root / "keys" / "signing.key")
    c = Cluster(root, url(tmp_path, "pw"))
    c.write_config()
    out = c.cli(
        "seed",
        "--accounts",
        "25",
        "--domains",
        "3",
        "--aliases",
        "2",
        "--password",
        "S3cret!pw",
        check=True,
    ).stdout
    assert out.startswith("seeded ") and "25 account" in out
    assert "S3cret" not in out

    engine = create_engine(c.db_url)
    try:
        with engine.connect() as conn:
            hashes = list(conn.execute(select(t.account.c.password_hash)).scalars())
            assert conn.execute(select(func.count()).select_from(t.account)).scalar() == 25
    finally:
        engine.dispose()
    assert len(hashes) == 25
    crypt = _crypt()
    for h in set(hashes):
        assert h.startswith("{SHA512-CRYPT}$6$")
        bare = h.removeprefix("{SHA512-CRYPT}")
        assert crypt.crypt("S3cret!pw", bare) == bare
        assert crypt.crypt("wrong", bare) != bare

    again = c.cli("seed", "--password", "x")
    assert again.returncode == 2
    assert "already has" in again.stderr and "seed fills an empty database" in again.stderr


def test_without_password_hashes_are_well_formed_and_unknown(tmp_path: Path) -> None:
    db = url(tmp_path, "np")
    seed(db, SeedCounts(accounts=10, domains=2, aliases=1, mailstores=1), seed=8)
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            hashes = list(conn.execute(select(t.account.c.password_hash)).scalars())
    finally:
        engine.dispose()
    assert len(set(hashes)) == 10  # no shared password
    assert all(h.startswith("{SHA512-CRYPT}$6$") for h in hashes)

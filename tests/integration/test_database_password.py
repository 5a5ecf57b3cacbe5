"""The database password stays in the config file.

A publisher whose ``[publisher].database`` carries its password (in the userinfo, or as a
``password=`` parameter, which psycopg and PyMySQL accept) publishes, fails to connect, and
runs ``init-db``: the password appears in no file of the repository (so in no signed manifest
on any node) and nowhere in what the command prints or logs, on success and on every error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Cluster, make_cluster

PW = "Zq7-db-secret-Pw"


def leaks(c: Cluster, out: str) -> list[str]:
    """Where ``PW`` shows: in ``out`` or in any file of the repository."""
    found = [str(p) for p in c.repo.rglob("*") if p.is_file() and PW.encode() in p.read_bytes()]
    return found + (["output"] if PW in out else [])


def with_database(c: Cluster, url: str) -> Cluster:
    c.db_url = url
    c.write_config()
    return c


@pytest.mark.postgresql
@pytest.mark.parametrize(
    "form",
    ["postgresql+psycopg://postgres:{pw}@127.0.0.1:5432/{db}",
     "postgresql+psycopg://postgres@127.0.0.1:5432/{db}?password={pw}",
     "postgresql+psycopg:///{db}?host=127.0.0.1&user=postgres&password={pw}"],
)  # fmt: skip
def test_a_publish_with_the_password_in_the_url_shows_it_nowhere(
    tmp_path: Path, pg_url: str, form: str
) -> None:
    # The test server trusts local connections: the password is sent and ignored.
    db = pg_url.rsplit("/", 1)[1]
    c = with_database(make_cluster(tmp_path / "c", pg_url), form.format(pw=PW, db=db))
    runs = [
        c.cli("init-db"),
        c.cli("-v", "publish"),
        c.cli("--log-format", "json", "-v", "publish"),
        c.cli("diff", "1", "1"),
    ]
    for p in runs[:2]:
        assert p.returncode == 0, p.stdout + p.stderr
    out = "".join(p.stdout + p.stderr for p in runs)
    assert leaks(c, out) == []
    manifest = json.loads((c.repo / "mx" / "releases" / "1" / "MANIFEST.json").read_text())
    assert "***" in manifest["source"]["url"]
    assert "schema ready in " in runs[0].stdout and "***" in runs[0].stdout


@pytest.mark.mariadb
@pytest.mark.postgresql
@pytest.mark.parametrize(
    ("form", "needle"),
    [
        # MariaDB's root has no password here: any password is wrong.
        ("mysql+pymysql://root:{pw}@127.0.0.1:3306/{db}", "Access denied"),
        ("mysql+pymysql://root@127.0.0.1:3306/{db}?passwd={pw}", "Access denied"),
        # Nothing listens on port 1.
        ("postgresql+psycopg://postgres:{pw}@127.0.0.1:1/{db}?password={pw}", "failed"),
        # libpq knows no upper-case keyword: psycopg refuses the connection string.
        ("postgresql+psycopg://postgres@127.0.0.1:5432/{db}?PASSWORD={pw}", "PASSWORD"),
    ],
)
def test_a_failing_connection_shows_the_password_nowhere(
    tmp_path: Path, mariadb_url: str, form: str, needle: str
) -> None:
    c = make_cluster(tmp_path / "c", mariadb_url)
    c.publish()
    with_database(c, form.format(pw=PW, db=mariadb_url.rsplit("/", 1)[1]))
    runs = [c.cli("-v", "publish"), c.cli("--log-format", "json", "publish"), c.cli("init-db")]
    for p in runs:
        assert p.returncode == 2, p.stdout + p.stderr
        assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert leaks(c, "".join(p.stdout + p.stderr for p in runs)) == []

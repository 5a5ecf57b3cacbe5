"""Shared fixtures: a real SQLite database, a real key pair, a real repository and node.

``cluster`` gives one publisher and one MX agent in a temporary directory, configured
exactly as an operator would (a TOML file), with helpers to run the CLI in a subprocess
(``cluster.cli(...)``) the way cron or systemd would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mapsync import config
from mapsync.signing import keygen
from mapsync.sources.seed import SeedCounts, seed

PG_URL = os.environ.get("MAPSYNC_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/{db}")
MARIADB_URL = os.environ.get("MAPSYNC_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/{db}")


@dataclass
class Cluster:
    """A publisher and an MX node, sharing one config file (as the demo does)."""

    root: Path
    db_url: str

    @property
    def config_path(self) -> Path:
        return self.root / "mapsync.toml"

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def target(self) -> Path:
        return self.root / "node" / "postfix"

    @property
    def state(self) -> Path:
        return self.root / "node" / "state"

    def write_config(
        self, source: str | None = None, extra_agent: str = "", extra_publisher: str = ""
    ) -> None:
        src = source or str(self.repo / "mx")
        self.config_path.write_text(
            textwrap.dedent(
                f"""\
                [publisher]
                database = "{self.db_url}"
                repository = "{self.repo}"
                signing_key = "{self.root / "keys" / "signing.key"}"
                {extra_publisher}
                [publisher.channels.mx]
                maps = ["domains", "recipients", "virtual", "transport"]

                [agent]
                state = "{self.state}"
                trusted_keys = ["{self.root / "keys" / "signing.pub"}"]

                [agent.channels.mx]
                source = "{src}"
                target = "{self.target}"
                timeout = "30s"
                {extra_agent}
                """
            )
        )

    def config(self) -> config.Config:
        return config.load(self.config_path)

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "mapsync", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"mapsync {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def publish(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("publish", *args, check=True)

    def pull(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("pull", *args, check=True)


def make_cluster(
    root: Path, db_url: str, accounts: int = 120, domains: int = 8, aliases: int = 40
) -> Cluster:
    root.mkdir(parents=True, exist_ok=True)
    keygen(root / "keys" / "signing.key")
    c = Cluster(root, db_url)
    c.write_config()
    seed(
        db_url,
        SeedCounts(accounts=accounts, domains=domains, aliases=aliases, mailstores=2),
        seed=7,
    )
    return c


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'central.db'}"


@pytest.fixture
def cluster(tmp_path: Path, sqlite_url: str) -> Cluster:
    """A seeded SQLite publisher and an MX agent; nothing published yet."""
    return make_cluster(tmp_path / "c", sqlite_url)


def _server_database(kind: str) -> Iterator[str]:
    """A fresh, empty database on the running server; dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = f"mapsync_t_{uuid.uuid4().hex[:10]}"
    if kind == "postgresql":
        admin_url, url = PG_URL.format(db="postgres"), PG_URL.format(db=name)
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    else:
        admin_url, url = MARIADB_URL.format(db=""), MARIADB_URL.format(db=name)
        admin = create_engine(admin_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
            conn.commit()
    except Exception as exc:
        admin.dispose()
        pytest.fail(f"{kind} server at {admin_url} is not usable: {exc}")
    try:
        yield url
    finally:
        _drop(admin, kind, name)
        admin.dispose()


def _drop(admin: Any, kind: str, name: str) -> None:
    """Drop the test database ``name``. MariaDB can refuse with "Error dropping database
    (can't rmdir ..., Directory not empty)" when a trigger's temporary file (``T.TRG-``) is
    left in its directory; that is the server's leftover, not the test's failure: tried once
    more, then left behind (said on stderr)."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    drop = f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if kind == "postgresql" else "")
    for attempt in (1, 2):
        try:
            with admin.connect() as conn:
                conn.execute(text(drop))
                conn.commit()
            return
        except OperationalError as exc:
            if kind == "postgresql" or "Error dropping database" not in str(exc):
                raise
            if attempt == 2:
                # Not warnings.warn: the suite turns warnings into errors (pyproject.toml).
                print(f"test database {name} left on the server: {exc.orig}", file=sys.stderr)
            else:
                time.sleep(0.5)


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _server_database("postgresql")


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    yield from _server_database("mariadb")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (scripts/test): twice as many workers as cores, at least 4 (most tests wait
    on subprocesses, daemons and sleeps rather than use a core), at most 16 (each holds
    database connections). PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return min(16, max(4, 2 * len(os.sched_getaffinity(0))))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadgroup`` (scripts/test), done here: pytest-xdist 3.8 marks a group by
    editing node ids, which pytest 9.2 no longer honours (pytest-xdist issue #1386), so its
    own loadgroup spreads a group over every worker.

    A module that declares a module-scoped fixture or an ``xdist_group`` mark (the package
    tests: one installed .deb) runs whole on one worker, so the fixture is made once; every
    other test goes to whichever worker is free. Bigger units are handed out first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    whole: dict[str, bool] = {}

    class ModuleFixtureScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path not in whole:
                text = (config.rootpath / path).read_text()
                whole[path] = 'scope="module"' in text or "xdist_group" in text
            return path if whole[path] else nodeid

    return ModuleFixtureScheduling(config, log)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each engine in turn: a SQLite file, then the running
    PostgreSQL, then the running MariaDB."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mapsync.db'}"
    return str(
        request.getfixturevalue("pg_url" if request.param == "postgresql" else "mariadb_url")
    )

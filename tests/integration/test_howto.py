"""docs/howto.md is true: every SQL task on the page runs unchanged on SQLite, PostgreSQL and MariaDB
against a database `mapsync init-db` and `seed` made, and changes exactly the map keys the page
says, in exactly the channels it names. And what the page says protects a writer who forgets
`updated_at`: the cheap fingerprint misses such an UPDATE, the next full check does not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import howto


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mapsync.db'}"
    return str(
        request.getfixturevalue("pg_url" if request.param == "postgresql" else "mariadb_url")
    )


def test_every_task_of_the_howto_changes_what_the_page_says(url: str, tmp_path: Path) -> None:
    publisher = howto.Publisher(tmp_path / "p", url)
    publisher.cli("init-db")
    publisher.cli("seed", *howto.SEED)
    publisher.cli("publish")
    tasks = howto.tasks()
    said = howto.changes()
    assert [name for name, _ in tasks] == list(said), "a task without its changes, or the reverse"
    assert len(tasks) >= 7
    for name, sql in tasks:
        howto.run_sql(url, sql)
        assert publisher.publish_and_diff() == said[name], name


def test_an_update_without_updated_at_waits_for_the_full_check_and_is_not_lost(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'mapsync.db'}"
    publisher = howto.Publisher(tmp_path / "p", url, full_check="3s")
    publisher.cli("init-db")
    publisher.cli("seed", *howto.SEED)
    first = dict(howto.tasks())
    howto.run_sql(url, first["add a domain"])
    howto.run_sql(url, first["add an account"])
    publisher.cli("publish")
    start = publisher.serials()
    # The forgetful writer: an UPDATE that leaves updated_at alone.
    howto.run_sql(url, "UPDATE account SET status = 'login_disabled' WHERE local_part = 'anna';")
    assert "unchanged" in publisher.cli("publish")  # the fingerprint cannot see it...
    assert publisher.serials() == start
    time.sleep(3.2)
    publisher.cli("publish")  # ...the full check, full_check later, does
    assert publisher.serials()["mx"] == start["mx"] + 1  # anna may no longer send
    # The careful writer is seen at once (a second later: CURRENT_TIMESTAMP has no fractions
    # on SQLite, and the seed's timestamps do).
    time.sleep(1.1)
    howto.run_sql(
        url,
        "UPDATE account SET status = 'active', updated_at = CURRENT_TIMESTAMP"
        " WHERE local_part = 'anna';",
    )
    publisher.cli("publish")
    assert publisher.serials()["mx"] == start["mx"] + 2
    # A forgetful write published at once: --skip-invalid reads every row, fingerprint or not.
    howto.run_sql(url, "UPDATE account SET status = 'login_disabled' WHERE local_part = 'anna';")
    assert "unchanged" in publisher.cli("publish")
    publisher.cli("publish", "--skip-invalid")
    assert publisher.serials()["mx"] == start["mx"] + 3

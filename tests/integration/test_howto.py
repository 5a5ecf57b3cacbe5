"""docs/howto.md is true: every SQL task on the page runs unchanged on SQLite, PostgreSQL and MariaDB
against a database `mapsync init-db` and `seed` made, and changes exactly the map keys the page
says, in exactly the channels it names. And what the page says protects a writer who forgets
`updated_at` (init-db's trigger sets it), and one whose `updated_at` is stale (the next full
check sees what the cheap fingerprint cannot)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.helpers import howto


def test_every_task_of_the_howto_changes_what_the_page_says(any_url: str, tmp_path: Path) -> None:
    publisher = howto.Publisher(tmp_path / "p", any_url)
    publisher.cli("init-db")
    publisher.cli("seed", *howto.SEED)
    publisher.cli("publish")
    tasks = howto.tasks()
    said = howto.changes()
    assert [name for name, _ in tasks] == list(said), "a task without its changes, or the reverse"
    assert len(tasks) >= 7
    for name, sql in tasks:
        howto.run_sql(any_url, sql)
        assert publisher.publish_and_diff() == said[name], name


def test_a_forgotten_updated_at_is_set_by_the_database_and_a_stale_one_waits_for_full_check(
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
    # The forgetful writer: an UPDATE that leaves updated_at alone. init-db's trigger sets it.
    howto.run_sql(url, "UPDATE account SET status = 'login_disabled' WHERE local_part = 'anna';")
    publisher.cli("publish")
    assert publisher.serials()["mx"] == start["mx"] + 1  # at once: anna may no longer send
    # A stale updated_at (a writer's clock behind, another time zone) on a row that is not
    # the table's newest leaves the fingerprint as it was: it cannot see the write...
    howto.run_sql(url, "UPDATE account SET status = status WHERE local_part = 'postmaster';")
    assert "unchanged" in publisher.cli("publish")  # (read in full: no map changed)
    stale = "updated_at = '2001-01-01 00:00:00'"
    howto.run_sql(url, f"UPDATE account SET status = 'active', {stale} WHERE local_part = 'anna';")
    assert "unchanged" in publisher.cli("publish")
    assert publisher.serials()["mx"] == start["mx"] + 1
    time.sleep(3.2)
    publisher.cli("publish")  # ...the full check, full_check later, does
    assert publisher.serials()["mx"] == start["mx"] + 2
    # Such a write published at once: --skip-invalid reads every row, fingerprint or not.
    howto.run_sql(
        url, f"UPDATE account SET status = 'login_disabled', {stale} WHERE local_part = 'anna';"
    )
    assert "unchanged" in publisher.cli("publish")
    publisher.cli("publish", "--skip-invalid")
    assert publisher.serials()["mx"] == start["mx"] + 3

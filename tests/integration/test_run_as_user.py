"""mapsync run as an unprivileged user, as deployed (docs/install.md): the publisher as the
repository's owner, and by the wrong user: each permission problem names the path, the
running user, the owner and the fix; a publish by another user than the repository's owner
writes nothing; an old release the publisher may not remove is a warning, not a failed
publish. And ``mapsync status`` run by a monitoring user (NRPE's ``nagios``) who may not read
the agent's 0700 state: it reads the world-readable copy each run writes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.conftest import Cluster, make_cluster
from tests.helpers.agent import add_account, tree_snapshot
from tests.helpers.users import USER, chown, run_as, shared_dir, uid

NOBODY = f"{USER} (uid {uid()})"


@pytest.fixture
def shared() -> Iterator[Cluster]:
    """A cluster every user can reach; the repository, key and database belong to nobody."""
    with shared_dir() as d:
        (d / "db").mkdir()  # SQLite's reader may need to create its -shm beside the file
        c = make_cluster(d / "c", f"sqlite:///{d / 'db' / 'central.db'}")
        c.repo.mkdir()
        for p in (c.repo, c.root / "keys", d / "db"):
            chown(p)
        yield c


def latest(c: Cluster) -> int:
    return int(json.loads((c.repo / "mx" / "LATEST").read_text())["serial"])


def test_the_publisher_runs_as_the_user_that_owns_the_repository(shared: Cluster) -> None:
    p = run_as(USER, shared.config_path, "publish")
    assert p.returncode == 0, p.stderr
    assert latest(shared) == 1
    assert os.stat(shared.repo / "mx" / "releases" / "1").st_uid == uid()


def test_a_publish_by_another_user_than_the_repository_owner_writes_nothing(
    shared: Cluster,
) -> None:
    assert run_as(USER, shared.config_path, "publish").returncode == 0
    add_account(shared, "zz-as-root")
    before = tree_snapshot(shared.repo)
    p = shared.cli("publish")  # root, on nobody's repository
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        f"mapsync: {shared.repo}: the repository belongs to {NOBODY}, but mapsync runs as "
        f"root (uid 0); nothing was written. Run it as that user (`sudo -u {USER} mapsync ...`"
    ) in p.stderr
    assert tree_snapshot(shared.repo) == before
    # The dry run writes nothing, so anyone may look (exit 1: changes are pending).
    p = shared.cli("publish", "--dry-run")
    assert p.returncode == 1 and "would publish serial 2" in p.stdout, p.stdout + p.stderr
    assert tree_snapshot(shared.repo) == before


def test_a_dry_run_by_root_before_the_first_publish_leaves_nothing_the_owner_cannot_write(
    shared: Cluster,
) -> None:
    """An operator previewing as root on a new repository: the dry run stages in a private
    temporary directory and takes no lock file it would have to make, so the repository stays
    empty (it made ``mx/`` and ``.lock`` as root, and every publish by the owner then failed)."""
    p = shared.cli("publish", "--dry-run")
    assert p.returncode == 1 and "would publish serial 1" in p.stdout, p.stdout + p.stderr
    assert os.listdir(shared.repo) == []
    mtime = os.stat(shared.repo).st_mtime_ns
    assert run_as(USER, shared.config_path, "publish").returncode == 0
    assert latest(shared) == 1
    add_account(shared, "zz-previewed")
    before = {p: os.stat(p).st_mtime_ns for p in (shared.repo, shared.repo / "mx")}
    assert shared.cli("publish", "--dry-run").returncode == 1
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    assert mtime != before[shared.repo]


def test_an_unreadable_signing_key_names_the_key_the_user_and_the_owner(shared: Cluster) -> None:
    key = shared.root / "keys" / "signing.key"
    chown(key, "root")
    p = run_as(USER, shared.config_path, "publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        f"mapsync: {key}: permission denied reading the signing key (mapsync runs as "
        f"{NOBODY}; {key} belongs to root (uid 0)): run mapsync as that user (`sudo -u root "
        f"mapsync ...`) or give {USER} access"
    ) in p.stderr
    assert "Errno" not in p.stderr


def test_a_lock_file_of_another_user_is_named_not_a_bare_errno(shared: Cluster) -> None:
    lock = shared.repo / ".lock"
    lock.touch(mode=0o600)  # left by a run as root
    p = run_as(USER, shared.config_path, "publish")
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        f"mapsync: {lock}: permission denied (mapsync runs as {NOBODY}; {lock} belongs to root"
        in p.stderr
    )
    assert "Errno" not in p.stderr


def test_an_old_release_it_may_not_remove_is_a_warning_after_latest_moved(
    shared: Cluster,
) -> None:
    text = shared.config_path.read_text()
    shared.config_path.write_text(text.replace("[publisher]\n", "[publisher]\nkeep = 2\n", 1))
    assert run_as(USER, shared.config_path, "publish").returncode == 0
    old = shared.repo / "mx" / "releases" / "1"
    chown(old, "root")  # as a publish run as root leaves it
    add_account(shared, "zz-second")
    assert run_as(USER, shared.config_path, "publish").returncode == 0
    add_account(shared, "zz-third")
    p = run_as(USER, shared.config_path, "publish")
    assert p.returncode == 0, p.stderr
    assert latest(shared) == 3
    assert "old release not removed" in p.stderr
    assert f"mapsync runs as {NOBODY}" in p.stderr and "belongs to root (uid 0)" in p.stderr
    assert old.is_dir()


def test_status_as_a_monitoring_user_reads_the_public_copy_of_the_state(shared: Cluster) -> None:
    assert run_as(USER, shared.config_path, "publish").returncode == 0  # the repository's owner
    shared.pull()  # the agent runs as root
    public = shared.state.with_name("state-status") / "mx.json"
    assert public.stat().st_mode & 0o777 == 0o644
    assert public.parent.stat().st_mode & 0o777 == 0o755
    assert json.loads(public.read_text()) == json.loads(
        (shared.state / "mx" / "state.json").read_text()
    )
    assert shared.state.stat().st_mode & 0o777 == 0o700  # the state itself stays private

    p = run_as(USER, shared.config_path, "status")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("MAPSYNC OK - mx OK | mx_serial=1 "), p.stdout
    j = run_as(USER, shared.config_path, "status", "--json")
    assert json.loads(j.stdout)["channels"][0]["last_success"] is not None

    # Without the copy: UNKNOWN, naming the state, the user and the copy it looked for.
    public.unlink()
    p = run_as(USER, shared.config_path, "status")
    assert p.returncode == 3, p.stdout + p.stderr
    # The reason on the first line too: a Nagios notification shows only that one.
    assert p.stdout.startswith("MAPSYNC UNKNOWN - mx UNKNOWN (cannot read state: "), p.stdout
    assert (
        f"mx: UNKNOWN cannot read state: {shared.state / 'mx' / 'state.json'}: permission "
        f"denied (mapsync runs as {NOBODY}"
    ) in p.stdout
    assert f"nor its public copy {public}" in p.stdout

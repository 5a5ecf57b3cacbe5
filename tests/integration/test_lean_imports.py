"""A run that finds nothing changed imports only what it uses: `pull -q` (every few minutes
on every node) and `status` neither cryptography, SQLAlchemy nor structlog; `publish -q` (SQLite) neither
SQLAlchemy nor structlog.
Each costs tens of milliseconds of a run that should take a fraction of a second. (Without
-q a pull logs "up to date" at INFO, and imports structlog to do so.)"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import Cluster


def imported(cluster: Cluster, *args: str) -> set[str]:
    """Top-level packages the run imported (python -X importtime), checking it succeeded."""
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "mapsync",
            "-q",
            "--config",
            str(cluster.config_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert lines, "premise: python -X importtime reports"
    return {line.rsplit("|", 1)[1].strip() for line in lines}


def test_nothing_changed_runs_import_only_what_they_use(cluster: Cluster) -> None:
    cluster.publish()
    cluster.pull()
    pull = imported(cluster, "pull")
    assert "mapsync.agent.pull" in pull  # not vacuous
    assert not {"cryptography", "sqlalchemy", "structlog"} & pull
    # `status` (Nagios, every minute) compares the live release's signer with the trusted
    # keys' ids, read from the key files without cryptography (signing.public_key_id).
    status = imported(cluster, "status")
    assert "mapsync.agent.status" in status  # not vacuous
    assert not {"cryptography", "sqlalchemy", "structlog"} & status
    publish = imported(cluster, "publish")
    assert "mapsync.publish.quiet" in publish  # not vacuous
    assert "cryptography" in publish  # our signature checked
    # The fingerprint read with the standard library's sqlite3 (mapsync.publish.quiet); nor
    # the publisher's machinery, nor cryptography's PEM loader for a key keygen wrote.
    assert not {"sqlalchemy", "structlog", "mapsync.publish.publisher"} & publish
    assert "cryptography.hazmat.primitives.serialization" not in publish
    # A run that logs imports it, and logs as before.
    verbose = subprocess.run(
        [sys.executable, "-m", "mapsync", "-v", "--config", str(cluster.config_path), "pull"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verbose.returncode == 0 and "component=agent" in verbose.stderr, verbose.stderr


def test_status_of_a_mirror_or_publisher_imports_neither_the_agent_nor_the_mirror(
    cluster: Cluster,
) -> None:
    """`status --mirror DEST` and `status --publisher` (monitoring, every minute) load the
    run note's reader, not the agent, the mirror's copying, cryptography nor structlog."""
    cluster.publish()
    dest = cluster.root / "mirror"
    assert cluster.cli("mirror", str(cluster.repo), str(dest)).returncode == 0
    mirror = imported(cluster, "status", "--mirror", str(dest))
    assert "mapsync.mirrorlog" in mirror  # not vacuous
    heavy = {"cryptography", "sqlalchemy", "structlog"}
    assert not heavy & mirror
    assert not [
        m for m in mirror if m.startswith(("mapsync.agent", "mapsync.publish", "mapsync.transport"))
    ]
    assert "mapsync.mirror" not in mirror
    publisher = imported(cluster, "status", "--publisher")
    assert "mapsync.publish.runlog" in publisher  # not vacuous
    assert not heavy & publisher
    assert not [m for m in publisher if m.startswith("mapsync.agent")]

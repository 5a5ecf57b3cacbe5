"""``--log-format json`` (the default under systemd): every line a command writes to standard
error is a JSON log event, also the errors of one channel of several that ``pull`` and
``verify`` go on past, and a metrics file ``status`` could not write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import Cluster


def _events(stderr: str) -> list[dict[str, Any]]:
    """Each line of ``stderr`` as a JSON object (AssertionError naming a line that is not)."""
    events = []
    for line in stderr.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}\n{stderr}") from None
    return events


def _with_a_broken_channel(cluster: Cluster, tmp_path: Path) -> None:
    """``cluster`` with a second agent channel whose source does not exist (nothing installed)."""
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(
        text
        + f'\n[agent.channels.edge]\nsource = "{tmp_path / "nowhere"}"\n'
        + f'target = "{tmp_path / "edge"}"\n'
    )


def test_per_channel_errors_are_json_events(cluster: Cluster, tmp_path: Path) -> None:
    cluster.publish()
    _with_a_broken_channel(cluster, tmp_path)

    pull = cluster.cli("--log-format", "json", "pull")
    assert pull.returncode == 2, pull.stderr
    failed = [e for e in _events(pull.stderr) if e.get("channel") == "edge"]
    assert len(failed) == 1, pull.stderr
    assert failed[0]["level"] == "error" and failed[0]["exit"] == 2
    assert failed[0]["event"].startswith("channel edge: rsync failed")
    assert "mx: installed serial 1" in pull.stdout  # the other channel went on

    verify = cluster.cli("--log-format", "json", "verify")
    assert verify.returncode == 5, verify.stderr
    (event,) = _events(verify.stderr)
    assert event["channel"] == "edge" and event["exit"] == 5, event
    assert "nothing installed" in event["event"]

    status = cluster.cli(
        "--log-format", "json", "status", "--prometheus", str(tmp_path / "no" / "m.prom")
    )
    assert status.returncode == 2  # edge: nothing installed
    (event,) = _events(status.stderr)
    assert event["event"].endswith("the metrics were not written"), event

    # For people, as before: one `mapsync: ` line per channel.
    people = cluster.cli("pull", "--channel", "edge")
    assert people.stderr.startswith("mapsync: channel edge: rsync failed"), people.stderr

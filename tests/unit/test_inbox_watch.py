"""The agent's watch of a push inbox: which events say a LATEST arrived, and when to pull;
which inboxes it can watch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from watchdog.events import FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent

from mapsync.agent.loop import DEBOUNCE, MAX_DEFER, _InboxHandler, pull_due, watched_inboxes
from mapsync.config import AgentConfig, load
from mapsync.errors import ConfigError


def _seen(event: object) -> list[tuple[str, bool]]:
    got: list[tuple[str, bool]] = []
    handler = _InboxHandler("mx", "/inbox/mx", lambda c, r: got.append((c, r)), lambda c, g: None)
    handler.on_any_event(event)  # type: ignore[arg-type]
    return got


def test_a_latest_renamed_into_place_is_whole_one_written_there_may_not_be() -> None:
    assert _seen(FileMovedEvent("/inbox/mx/.LATEST.x1", "/inbox/mx/LATEST")) == [("mx", True)]
    for event in (
        FileCreatedEvent("/inbox/mx/LATEST"),
        FileModifiedEvent("/inbox/mx/LATEST"),
        FileClosedEvent("/inbox/mx/LATEST"),
    ):
        assert _seen(event) == [("mx", False)], event
    assert _seen(FileModifiedEvent("/inbox/mx/releases")) == []
    assert _seen(FileMovedEvent("/inbox/mx/LATEST", "/inbox/mx/LATEST.old")) == []


def test_a_rename_is_pulled_at_once_a_burst_once_quiet() -> None:
    assert pull_due(10.0, 10.0, renamed=True) == 10.0
    assert pull_due(10.0, 10.0, renamed=False) == 10.0 + DEBOUNCE
    assert pull_due(10.0, 10.3, renamed=True) == 10.3  # the rename ends a burst: at once
    assert pull_due(10.0, 10.0 + MAX_DEFER, renamed=False) == 10.0 + MAX_DEFER  # never later


def _agent(tmp_path: Path, inbox: Path) -> AgentConfig:
    config = tmp_path / "mapsync.toml"
    config.write_text(
        f'[agent]\nstate = "{tmp_path}/state"\ntrusted_keys = ["{tmp_path}/signing.pub"]\n\n'
        f'[agent.channels.mx]\nsource = "{tmp_path}/repo/mx"\ntarget = "{tmp_path}/live"\n'
        f'inbox = "{inbox}"\n'
    )
    return load(config).need_agent()


def test_an_inbox_the_agent_cannot_make_is_a_config_error_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`agent --watch` makes a missing inbox; where it cannot (a read-only filesystem, as a
    path outside the unit's ReadWritePaths= is), the config must not pass the SIGHUP check
    (nor `check-config --watch`): the restarted agent would fail at every start."""
    spool = tmp_path / "spool"
    spool.mkdir()
    agent = _agent(tmp_path, spool / "inbox" / "mx")
    assert watched_inboxes(agent, tmp_path / "mapsync.toml", True) == agent.channels
    assert not (spool / "inbox").exists()  # looked at, nothing made
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == spool else real(p, mode))
    with pytest.raises(ConfigError) as caught:
        watched_inboxes(agent, tmp_path / "mapsync.toml", True)
    assert str(caught.value) == (
        f"{tmp_path / 'mapsync.toml'}: [agent.channels.mx] inbox {spool / 'inbox' / 'mx'}: "
        f"cannot be watched: it does not exist, and cannot be made in {spool} (read-only, or "
        "not writable)"
    )
    # One that is there already is watched whatever its parent.
    (spool / "inbox" / "mx").mkdir(parents=True)
    assert watched_inboxes(agent, tmp_path / "mapsync.toml", True) == agent.channels
    # Without --watch no inbox is looked at.
    assert watched_inboxes(_agent(tmp_path, tmp_path / "x" / "y"), tmp_path, False) == {}

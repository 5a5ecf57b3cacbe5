"""The agent's watch of a push inbox: which events say a LATEST arrived, and when to pull."""

from __future__ import annotations

from watchdog.events import FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent

from mapsync.agent.loop import DEBOUNCE, MAX_DEFER, _InboxHandler, pull_due


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

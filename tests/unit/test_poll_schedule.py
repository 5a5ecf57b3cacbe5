"""The agent's polls keep their interval when the wall clock is stepped (NTP, an operator,
a resumed VM): the scheduler reads the wall clock, the agent keeps it on the monotonic one.

Pure logic: both clocks are fakes that the test moves by hand."""

from __future__ import annotations

import datetime as real_datetime
import types

import pytest
import schedule

from mapsync.agent import loop

START = real_datetime.datetime(2026, 11, 30, 12, 0, 0)


class Clocks:
    """A wall clock (what ``datetime.datetime.now()`` returns, to schedule and to the
    agent) and a monotonic clock, moved together by :meth:`tick` or apart by :meth:`step`."""

    def __init__(self) -> None:
        self.wall = START
        self.mono = 1000.0

    def tick(self, seconds: float) -> None:
        self.wall += real_datetime.timedelta(seconds=seconds)
        self.mono += seconds

    def step(self, seconds: float) -> None:
        self.wall += real_datetime.timedelta(seconds=seconds)


@pytest.fixture
def clocks(monkeypatch: pytest.MonkeyPatch) -> Clocks:
    c = Clocks()

    class FakeDatetime(real_datetime.datetime):
        @classmethod
        def now(cls, tz: real_datetime.tzinfo | None = None) -> FakeDatetime:  # type: ignore[override]
            assert tz is None
            return c.wall  # type: ignore[return-value]

    fake = types.SimpleNamespace(**{k: getattr(real_datetime, k) for k in dir(real_datetime)})
    fake.datetime = FakeDatetime
    monkeypatch.setattr(schedule, "datetime", fake)
    monkeypatch.setattr(loop, "datetime", fake)
    return c


def polls_every_60s(clocks: Clocks) -> tuple[loop.PollSchedule, list[float]]:
    polls = loop.PollSchedule(monotonic=lambda: clocks.mono)
    ran: list[float] = []
    polls.every(60, 0, lambda: ran.append(clocks.mono))
    return polls, ran


def run_for(polls: loop.PollSchedule, clocks: Clocks, seconds: int) -> None:
    """Let ``seconds`` go by, one second at a time, running what is due."""
    for _ in range(seconds):
        clocks.tick(1)
        polls.run_pending()


def test_a_wall_clock_stepped_back_an_hour_does_not_stop_polling(clocks: Clocks) -> None:
    polls, ran = polls_every_60s(clocks)
    run_for(polls, clocks, 60)
    assert ran == [1060.0]
    clocks.step(-3600)
    idle = polls.idle_seconds
    assert idle is not None and 0 <= idle <= 60
    run_for(polls, clocks, 120)
    assert ran == [1060.0, 1120.0, 1180.0]


def test_a_wall_clock_stepped_forward_runs_no_burst_of_polls(clocks: Clocks) -> None:
    polls, ran = polls_every_60s(clocks)
    run_for(polls, clocks, 30)
    clocks.step(+3600)
    polls.run_pending()
    assert ran == []  # not due yet: 30 s have gone by, not an hour
    run_for(polls, clocks, 90)
    assert ran == [1060.0, 1120.0]


def test_a_step_while_a_poll_runs_does_not_shift_the_next_one(clocks: Clocks) -> None:
    polls = loop.PollSchedule(monotonic=lambda: clocks.mono)
    ran: list[float] = []

    def slow_poll_across_a_step() -> None:
        ran.append(clocks.mono)
        clocks.tick(5)
        if len(ran) == 1:
            clocks.step(-600)

    polls.every(60, 0, slow_poll_across_a_step)
    run_for(polls, clocks, 180)
    # Each poll takes 5 s; the next one starts 60 s after the previous one ended.
    assert ran == [1060.0, 1125.0, 1190.0]

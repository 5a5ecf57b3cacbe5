"""SIGTERM and SIGHUP: end the process with exit 128+n, and remember that they came.

The handler raises SystemExit, so ``finally`` blocks clean up (staging, temp files, locks) and
systemd sees the truth (SIGTERM → 143). Raising is not always enough: a SystemExit raised
inside a gc or weakref callback is swallowed ("Exception ignored"), and one raised while a C
extension runs (cdbx) can come back as SystemError. So the signal is also remembered:
long-running loops call :func:`stop_if_received` after each unit of work, and ``main()``
turns any outcome of a signalled run into exit 128+n.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

_received: int | None = None


def install() -> None:
    """Make SIGTERM and SIGHUP end the process by SystemExit(128+n), so cleanup handlers run."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = signum
    raise SystemExit(128 + signum)


def received() -> int | None:
    """The signal that asked this process to end, if one did."""
    return _received


def stop_if_received() -> None:
    """Raise SystemExit(128+n) if a signal came, whatever became of its first SystemExit."""
    if _received is not None:
        raise SystemExit(128 + _received)


@contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while a step must not be cut in two (a child process
    starting; the live set's link switched and settled); handle them after.

    Their handlers raise, and an exception raised after the fork but before the caller has
    the process object would leave the child running with no one to end it. A signal that
    comes meanwhile is handled (raises) as the block ends, when the caller can end the child.
    Only in the main thread, the one Python runs handlers in; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        came.append(signum)

    handlers: dict[int, Callable[[int, FrameType | None], Any]] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(sig)
        if callable(handler):  # a Python handler (one that raises); the defaults stay as they are
            handlers[sig] = handler
            signal.signal(sig, hold)
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for signum in came:
            handlers[signum](signum, None)


def describe_exit(code: int) -> str:
    """How a child process ended, in words: ``exit 1``, or ``killed by signal 9 (SIGKILL)``
    for the negative return code Python (and ``sh``) report for a child a signal ended."""
    if code >= 0:
        return f"exit {code}"
    try:
        name = f" ({signal.Signals(-code).name})"
    except ValueError:
        name = ""
    return f"killed by signal {-code}{name}"

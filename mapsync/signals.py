"""SIGTERM and SIGHUP: end the process with exit 128+n, and remember that they came.

The handler raises SystemExit, so ``finally`` blocks clean up (staging, temp files, locks) and
systemd sees the truth (SIGTERM → 143). Raising is not always enough: a SystemExit raised
inside a gc or weakref callback is swallowed ("Exception ignored"), and one raised while a C
extension runs (cdbx) can come back as SystemError. So the signal is also remembered:
long-running loops call :func:`stop_if_received` after each unit of work, and ``main()``
turns any outcome of a signalled run into exit 128+n.

A long-running process (``agent``, ``publish --interval``, ``mirror --interval``) calls
:func:`on_hangup` once it has started: SIGHUP then means "restart with the config read again"
only if that config loads. The handler does no more than write a byte to a pipe (no logging,
no lock: it runs between two bytecodes of the main thread, perhaps inside a ``print`` to the
same stderr); a thread of its own reads the config. If it loads, the thread sends SIGHUP
again, to the main thread, and that one ends the process as above (exit 129, which systemd's
``Restart=on-failure`` turns into a start with the new config). If not, the error is logged
and the process runs on with the config it had: a typo must not leave the maps unupdated
until someone reads the journal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

_received: int | None = None
# How deep the main thread is in held() blocks, and the signals that came meanwhile.
_depth = 0
_deferred: list[int] = []
# on_hangup(): the pipe's end the SIGHUP handler writes to, and whether the config has been
# found to load (then SIGHUP ends the process).
_hangup_fd: int | None = None
_hangup_confirmed = False


def install() -> None:
    """Make SIGTERM and SIGHUP end the process by SystemExit(128+n), so cleanup handlers run;
    ^C stays KeyboardInterrupt (where Python's own handler is set). All three wait while the
    main thread is in a :func:`held` block."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    # A handler's SystemExit raised inside a gc or weakref callback is "ignored" by Python,
    # with a traceback in the log; the signal is remembered (stop_if_received), so say nothing.
    if sys.unraisablehook is not _quiet_unraisable:
        _unraisable.append(sys.unraisablehook)
        sys.unraisablehook = _quiet_unraisable
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)


_unraisable: list[Any] = []  # the hook _quiet_unraisable passes everything else to


def _quiet_unraisable(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, (SystemExit, KeyboardInterrupt)) and _received:
        return
    _unraisable[0](unraisable)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _received
    if signum == signal.SIGHUP and _hangup_fd is not None and not _hangup_confirmed:
        # The checker's thread looks at the config (the pipe full: a check is due already).
        with contextlib.suppress(OSError):
            os.write(_hangup_fd, b"\0")
        return
    _received = signum
    if _depth:
        _deferred.append(signum)
        return
    _deferred.clear()  # one that came as the last block ended is this very exit
    raise SystemExit(128 + signum)


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    if _depth:
        _deferred.append(signum)
        return
    _deferred.clear()
    signal.default_int_handler(signum, frame)


def on_hangup(check: Callable[[], bool]) -> None:
    """From now on, a SIGHUP ends the process (exit 129, as :func:`install` says) only once
    ``check()`` returns True: the config the process would start with loads. ``check`` runs on
    a thread of its own, once per SIGHUP (several that come during a check count as one), and
    reports itself why it returns False. Once only, in the main thread."""
    global _hangup_fd
    if _hangup_fd is not None or threading.current_thread() is not threading.main_thread():
        return
    read, write = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(write, False)  # the handler must never wait
    main = threading.main_thread().ident
    assert main is not None
    threading.Thread(
        target=_check_hangups, args=(read, check, main), name="sighup", daemon=True
    ).start()
    _hangup_fd = write


def _check_hangups(read: int, check: Callable[[], bool], main: int) -> None:
    """The thread of :func:`on_hangup`: on each SIGHUP, ``check()``; once it passes, SIGHUP
    to the main thread again, whose handler now ends the process."""
    global _hangup_confirmed
    while True:
        os.read(read, 4096)  # every SIGHUP that came meanwhile: one check
        try:
            ok = check()
        except Exception:  # a bug in the check: the process runs on
            ok = False
        if ok:
            _hangup_confirmed = True
            signal.pthread_kill(main, signal.SIGHUP)  # the main thread: its sleep is cut short
            return


def received() -> int | None:
    """The signal that asked this process to end, if one did."""
    return _received


def stop_if_received() -> None:
    """Raise SystemExit(128+n) if a signal came, whatever became of its first SystemExit."""
    if _received is not None:
        raise SystemExit(128 + _received)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP (their :func:`install` handlers) while a step must not
    be cut in two (a child process starting; a tree removed; the live set's link switched and
    settled); the first that came is handled as the outermost block ends.

    Their handlers raise, and an exception raised after the fork but before the caller has
    the process object would leave the child running with no one to end it. The handlers
    themselves look at the depth: no handler is swapped, so no signal can come between two
    swaps and leave one in place. Only in the main thread, the one Python runs handlers in;
    elsewhere this does nothing.
    """
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _deferred:
            signum = _deferred[0]
            _deferred.clear()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)


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

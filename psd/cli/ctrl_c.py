"""Ctrl-C for a command that loops until interrupted (``psd status --watch``), noted where
nothing can lose it.

Python raises KeyboardInterrupt wherever its SIGINT handler happens to run, and some of
those places only print the exception: pyzmq checks for signals while it frees a received
message (``Frame.__dealloc__``), so a Ctrl-C that arrives while a reply is being read can
end up as "Exception ignored in ..." on stderr with the loop still running. Here the
handler notes the press first and raises second: the raise cuts a sleep or a poll short,
the note is what the loop tests, so a swallowed raise still ends it.
"""
from __future__ import annotations

import signal
import threading


class CtrlC:
    """``with CtrlC() as ctrl_c:`` ... ``if ctrl_c.pressed: stop``. Installs its handler only
    where SIGINT has Python's default one (in the main thread): a SIGINT that the caller
    ignores or handles itself stays theirs. The previous handler is back on exit."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def __enter__(self) -> "CtrlC":
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        raise KeyboardInterrupt

"""Which refusals get a log line: a daemon answers every bad or unauthorised request,
but a peer that repeats one must not flood the log (one line per kind, then a count)."""
from __future__ import annotations

from collections import OrderedDict


class RefusalLog:
    """Decides which refusals get a log line: the first of each key (or kind), then at
    most one per ``window`` seconds per key, counting the ones not logged. Remembers at
    most ``size`` keys (the oldest are forgotten). Pure: the caller passes the time."""

    def __init__(self, window: float = 60.0, size: int = 1024):
        self.window, self.size = window, size
        self._seen: OrderedDict[str, list] = OrderedDict()  # key -> [last logged at, repeats since]

    def note(self, key: str, now: float) -> int | None:
        """None: do not log; else the number of repeats not logged since the last line."""
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return None
        repeats = entry[1] if entry else 0
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return repeats

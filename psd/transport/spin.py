"""When a reader keeps checking its socket instead of letting the loop sleep.

Waking a sleeping process costs tens of microseconds on a virtual machine, a good part of
a small pull's round trip (docs/operations.md, "Latency"). Two budgets:

* ``fixed`` (config ``busy_poll_us``): after handling a message, always check for the
  next one that long;
* ``adaptive`` (config ``adaptive_poll_us``, servers): check that long only while the
  requests come close together, that is while the last one arrived within ``adaptive``
  of the moment the queue ran dry before it. A client in a request-reply loop keeps the
  server checking; an idle server, or one whose clients compute between requests, never
  spins, and at the end of a burst it spins once for nothing.
"""
from __future__ import annotations


class Spin:
    __slots__ = ("fixed", "adaptive", "dry_at", "_close")

    def __init__(self, fixed: float = 0.0, adaptive: float = 0.0):
        self.fixed = fixed
        self.adaptive = adaptive
        #: perf_counter time the queue ran dry after a message (None: a message came since)
        self.dry_at: float | None = None
        self._close = False  # the last message came within ``adaptive`` of the queue running dry

    def __bool__(self) -> bool:
        return bool(self.fixed or self.adaptive)

    def budget(self, now: float) -> float:
        """Seconds to check for the next message, the queue having just run dry (0: sleep);
        called each time it is found dry (the gap counts from the first)."""
        if self.dry_at is None:
            self.dry_at = now
        return self.fixed or (self.adaptive if self._close else 0.0)

    def arrived(self, now: float) -> None:
        """A message is there after the queue ran dry at ``dry_at``."""
        self._close = now - self.dry_at <= self.adaptive
        self.dry_at = None

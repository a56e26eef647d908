"""When a reader keeps checking its socket instead of letting the loop sleep.

Waking a sleeping process costs tens of microseconds on a virtual machine, a good part of
a small pull's round trip (docs/operations.md, "Latency"). Two budgets:

* ``fixed`` (config ``busy_poll_us``): after handling a message, always check for the
  next one that long;
* ``adaptive`` (config ``adaptive_poll_us``, servers): check that long only while the
  requests come close together, that is while each of the last ``CLOSE_RUN`` arrived
  within ``adaptive`` of the moment the queue ran dry before it. A client in a
  request-reply loop keeps the server checking; an idle server never spins, nor does
  one whose workers compute between short runs of messages (an iteration's pull, then
  its push and the one-way ``clock`` right behind it, make two close gaps, not three).
  A longer run costs one budget for nothing at its end (perhaps two: the loop's next
  pass spins on), so the waste is bounded by ``adaptive`` per run of close messages.
"""
from __future__ import annotations


#: close gaps in a row that make an adaptive reader spin
CLOSE_RUN = 3


class Spin:
    __slots__ = ("fixed", "adaptive", "dry_at", "_close")

    def __init__(self, fixed: float = 0.0, adaptive: float = 0.0):
        self.fixed = fixed
        self.adaptive = adaptive
        #: perf_counter time the queue ran dry after a message (None: a message came since)
        self.dry_at: float | None = None
        self._close = 0  # messages in a row that came within ``adaptive`` of the queue running dry

    def __bool__(self) -> bool:
        return bool(self.fixed or self.adaptive)

    def budget(self, now: float) -> float:
        """Seconds to check for the next message, the queue having just run dry (0: sleep);
        called each time it is found dry (the gap counts from the first)."""
        if self.dry_at is None:
            self.dry_at = now
        return self.fixed or (self.adaptive if self._close >= CLOSE_RUN else 0.0)

    def arrived(self, now: float) -> None:
        """A message is there after the queue ran dry at ``dry_at``."""
        self._close = self._close + 1 if now - self.dry_at <= self.adaptive else 0
        self.dry_at = None

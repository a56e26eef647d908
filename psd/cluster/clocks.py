"""Consistency models as deterministic classes: range vector clocks and held pulls.

A worker's clock is its iteration count (how many times it has called ``clock()``); every
pull carries the clock the worker had when issuing it. With a staleness bound ``tau``:

- sequential (``tau = 0``): a pull at clock c runs once every group worker has clock >= c,
  i.e. has finished iteration c-1. Each worker sends its clock advance after its pushes
  on the same FIFO connection, so the pull then sees every push of clocks < c (BSP).
- bounded (``tau > 0``): a pull at clock c runs once every live worker has clock >= c - tau.
- eventual (``tau = None``): pulls never wait.

The group has ``num_workers`` expected workers. Until that many have joined, each missing
one counts as clock 0, so BSP waits for the whole group to arrive. A worker that leaves or
dies stops counting, so one lost worker never blocks the others for ever.

Nothing here reads a clock or touches I/O: the server feeds events in and drains
``ready()``; durations for ``AutoDelay`` and ``WaitHistogram`` are passed in by the caller.
"""
from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Hashable, Iterable
from typing import NamedTuple

from psd.errors import ConfigError

DEFAULT_RANGE = "default"
CONSISTENCIES = ("sequential", "bounded", "eventual")


def tau_for(consistency: str, max_delay: int | None = None) -> int | None:
    """The staleness bound of a named model: sequential 0, bounded ``max_delay``, eventual None.

    ``max_delay: auto`` is not a number: build an ``AutoDelay`` and copy its ``tau`` instead.
    """
    if consistency == "sequential":
        return 0
    if consistency == "eventual":
        return None
    if consistency == "bounded":
        if isinstance(max_delay, bool) or not isinstance(max_delay, int) or max_delay < 0:
            raise ConfigError(f"bounded consistency needs an integer max_delay >= 0, "
                              f"got {max_delay!r} (use AutoDelay for 'auto')")
        return max_delay
    raise ConfigError(f"unknown consistency {consistency!r}; choose one of "
                      f"{', '.join(CONSISTENCIES)}")


#: not computed since the last change (a floor may be None)
_UNKNOWN = object()


class _Pull(NamedTuple):
    worker: str
    clock: int
    ranges: tuple[Hashable, ...] | None   # None: every range the server holds


class RangeClocks:
    """One server's clocks: one per (key range, worker), plus the pulls they hold back.

    Use one instance per consistency setting (a table with its own model gets its own).
    The server calls ``join``/``leave`` when the scheduler reports membership, ``clock``
    when a worker's clock message arrives, ``pull`` for each pull (True: run it now), and
    after every event drains ``ready()`` for held pulls that may now run, in arrival order.

    Ranges are opaque ids. ``clock`` and ``pull`` apply to every range unless given a
    subset; per-range clocks only diverge if the caller clocks ranges separately or adds a
    range with its own clocks (for example one taken over from a failed server).
    """

    def __init__(self, num_workers: int, tau: int | None = 0,
                 ranges: Iterable[Hashable] = (DEFAULT_RANGE,)):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self._tau = _check_tau(tau)
        self._clocks: dict[Hashable, dict[str, int]] = {r: {} for r in ranges}
        self._joined: set[str] = set()     # ever joined: fills an expected slot for good
        self._live: set[str] = set()
        self._held: dict[Hashable, _Pull] = {}   # insertion order is arrival order
        self._ready: list[Hashable] = []
        #: counts changes of the clocks and the group (a checker reads them only then)
        self.changes = 0
        #: range set -> its floor, kept until the clocks or the group change: every pull,
        #: kept push and drain asks for it, far more often than a clock moves
        self._floors: dict = {}
        self._unsynced: set[str] = set()

    @property
    def unsynced(self) -> frozenset[str]:
        """Live workers whose clocks do not vouch for ranges this server took over lately:
        a clock says every push sent *here* before it has arrived, and a worker's pushes
        to a range it thought another server led went there; until it clocks again
        knowing the new ring (its pushes sent again come first), it holds the floor.
        Read as a frozen copy and replaced by assignment: the floor is recomputed then,
        and a change in place would leave it stale."""
        return frozenset(self._unsynced)

    @unsynced.setter
    def unsynced(self, workers: set[str] | frozenset[str]) -> None:
        self._unsynced = set(workers)
        self._floors.clear()

    # -- consistency setting ---------------------------------------------------------
    @property
    def tau(self) -> int | None:
        return self._tau

    @tau.setter
    def tau(self, value: int | None) -> None:
        """Change the bound at run time (``AutoDelay``); a looser bound releases pulls."""
        self._tau = _check_tau(value)
        self._release()

    # -- events ----------------------------------------------------------------------
    def join(self, worker: str, clock: int = 0) -> None:
        """A worker joins (or rejoins, keeping its old clock if larger). Never releases."""
        self._joined.add(worker)
        self._live.add(worker)
        self.changes += 1
        self._floors.clear()
        for clocks in self._clocks.values():
            clocks[worker] = max(clocks.get(worker, 0), clock)

    def leave(self, worker: str) -> None:
        """A worker left or died: it stops counting, which may release pulls.

        One that never joined (it died before its first pull or clock reached this
        server) still takes its slot of the group, so nobody waits for it as missing.
        """
        self._joined.add(worker)
        self._live.discard(worker)
        self._unsynced.discard(worker)
        self.changes += 1
        self._floors.clear()
        self._release()

    def clock(self, worker: str, clock: int,
              ranges: Iterable[Hashable] | None = None, synced: bool = True) -> None:
        """The worker's clock is now ``clock`` (a smaller value than known is ignored).
        ``synced``: it was sent knowing the ring of this server's last takeover.

        A clock from a never-seen worker joins it (its messages may beat the scheduler's
        notice); one from a worker that left is recorded but does not bring it back.
        """
        if worker not in self._joined:
            self.join(worker)
        if synced:
            self._unsynced.discard(worker)
        elif worker in self._live:
            # sent before it knew our takeover, however it was first heard (a pull joins a
            # worker synced): its pushes to the ranges we took may still be elsewhere
            self._unsynced.add(worker)
        self.changes += 1
        self._floors.clear()
        for r in self._range_ids(ranges):
            clocks = self._clocks[r]
            clocks[worker] = max(clocks.get(worker, 0), clock)
        self._release()

    def pull(self, request_id: Hashable, worker: str, clock: int,
             ranges: Iterable[Hashable] | None = None) -> bool:
        """True if a pull issued at ``clock`` may run now; otherwise it is held."""
        if request_id in self._held:
            raise ValueError(f"pull {request_id!r} is already held")
        if worker not in self._joined:
            self.join(worker)
        if self._tau is None:  # eventual: never held
            return True
        ranges = None if ranges is None else tuple(ranges)
        if self._may_run(clock, ranges):
            return True
        self._held[request_id] = _Pull(worker, clock, ranges)
        return False

    def cancel(self, request_id: Hashable) -> bool:
        """Forget a held pull (its client went away); True if it was held."""
        return self._held.pop(request_id, None) is not None

    def ready(self) -> list[Hashable]:
        """Held pulls released since the last call, in arrival order."""
        out, self._ready = self._ready, []
        return out

    def add_range(self, range_id: Hashable, clocks: dict[str, int] | None = None) -> None:
        """Start tracking a range, by default at the clocks every current range agrees on."""
        if clocks is None:
            workers = set().union(*(c.keys() for c in self._clocks.values()))
            clocks = {w: min(c.get(w, 0) for c in self._clocks.values()) for w in workers}
        self._clocks[range_id] = dict(clocks)
        self._floors.clear()

    def resync(self) -> None:
        """This server took over ranges: every live worker's clock stops vouching for
        them until it clocks again knowing the new ring (``clock(..., synced=True)``)."""
        self.unsynced = set(self._live)
        self.changes += 1

    def drop_range(self, range_id: Hashable) -> None:
        self._clocks.pop(range_id, None)
        self._floors.clear()
        self._release()

    # -- queries ---------------------------------------------------------------------
    def min_clock(self, ranges: Iterable[Hashable] | None = None) -> int | None:
        """The clock every group worker has reached (missing ones count 0); None if empty."""
        return self._floor(None if ranges is None else tuple(ranges))

    def min_clock_now(self) -> int | None:
        """``min_clock()`` worked out afresh, past the cache: for a reader on another
        thread (log records), which must never fill the cache with a floor it read while
        the loop was halfway through a clock."""
        return self._floor_now(None)

    def clocks(self, range_id: Hashable | None = None) -> dict[str, int]:
        """Live workers' clocks in one range, or (default) the minimum over all ranges."""
        tables = [self._clocks[range_id]] if range_id is not None else list(self._clocks.values())
        if not tables:
            return {}
        return {w: min(t.get(w, 0) for t in tables) for w in sorted(self._live)}

    def held(self) -> int:
        return len(self._held)

    def members(self) -> tuple[dict[str, int], set[str]]:
        """Every worker that ever joined with its clock (the minimum over ranges), and the
        live ones; enough to start another instance with the same group."""
        tables = list(self._clocks.values())
        joined = {w: min((t.get(w, 0) for t in tables), default=0) for w in self._joined}
        return joined, set(self._live)

    # -- internals -------------------------------------------------------------------
    def _range_ids(self, ranges: Iterable[Hashable] | None) -> list[Hashable]:
        if ranges is None:
            return list(self._clocks)
        return [r for r in ranges if r in self._clocks]   # ranges not held here don't bind

    def _floor(self, ranges: tuple[Hashable, ...] | None) -> int | None:
        floor = self._floors.get(ranges, _UNKNOWN)
        if floor is _UNKNOWN:
            floor = self._floors[ranges] = self._floor_now(ranges)
        return floor

    def _floor_now(self, ranges: tuple[Hashable, ...] | None) -> int | None:
        lows = [min((self._clocks[r].get(w, 0) for w in self._live), default=None)
                for r in self._range_ids(ranges)]
        lows = [x for x in lows if x is not None]
        if len(self._joined) < self.num_workers:
            lows.append(0)
        if self._unsynced:
            lows.append(-1)  # below every clock: what it vouches for here is not known yet
        return min(lows, default=None)

    def _may_run(self, clock: int, ranges: tuple[Hashable, ...] | None) -> bool:
        """Whether a pull at ``clock`` over ``ranges`` may run now."""
        if self._tau is None:
            return True
        floor = self._floor(ranges)
        return floor is None or floor >= clock - self._tau

    def _release(self) -> None:
        for request_id, pull in list(self._held.items()):
            if self._may_run(pull.clock, pull.ranges):
                del self._held[request_id]
                self._ready.append(request_id)


def _check_tau(tau: int | None) -> int | None:
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int) or tau < 0):
        raise ValueError(f"tau must be None (eventual) or an integer >= 0, got {tau!r}")
    return tau


class AutoDelay:
    """Adapts tau between ``tau_min`` and ``tau_max``: as loose as the workers need not
    to wait, and no looser than the room they actually use.

    Waiting at the gate is time lost for certain; staleness costs only where workers
    really run ahead, and how far they run ahead is measurable. So the rule is
    asymmetric: climb fast when pulls wait, come down slowly, and only as far as the
    recent leads show is safe. The caller reports, from the same workers,
    ``observe_pull(lead)`` for every pull (``lead``: the pull's clock minus the floor it
    is gated on; it is held exactly when ``lead > tau``), ``observe_wait(s)`` when a
    held pull is released, and ``observe_iteration(s)`` once per worker iteration.
    Judged every ``window`` iterations:

    - wait fraction ``f = sum(waits) / sum(iteration times)`` over the window (judged
      early once the waits alone put it above ``raise_above``, counting the window's
      remaining iterations at its mean length);
    - ``f > raise_above``: tau doubles (0 -> 1 -> 2 -> 4 -> 8, capped by ``tau_max``):
      workers idle at the barrier, and a straggler's lag is not known in advance, so
      growing geometrically reaches any needed room in a few windows;
    - otherwise, tau - 1 only if no pull over the last ``quiet`` windows had a lead
      above tau - 1 (the tighter bound would have held none of them) and no raise came
      in that time: a transient straggler that used the room keeps it for ``quiet``
      more windows, and waits that vanish for long bring tau down a step a window;
    - a raise that reverses a lowering doubles the quiet time needed before the next
      lowering (up to ``max_backoff`` times), so a workload whose needed room comes and
      goes does not flap; a lowering that stands until the next one resets it.
    """

    def __init__(self, tau_min: int = 0, tau_max: int = 8, *, initial: int | None = None,
                 window: int = 20, raise_above: float = 0.05, quiet: int = 8,
                 max_backoff: int = 8):
        if not 0 <= tau_min <= tau_max:
            raise ConfigError(f"max_delay auto needs 0 <= tau_min <= tau_max, "
                              f"got {tau_min}, {tau_max}")
        if not 0 <= raise_above < 1:
            raise ConfigError(f"auto delay needs 0 <= raise_above < 1, got {raise_above}")
        if window < 1 or quiet < 1 or max_backoff < 1:
            raise ConfigError("auto delay needs window >= 1, quiet >= 1 and max_backoff >= 1")
        self.tau_min, self.tau_max = tau_min, tau_max
        self.window, self.quiet, self.max_backoff = window, quiet, max_backoff
        self.raise_above = raise_above
        self._tau = tau_min if initial is None else min(max(initial, tau_min), tau_max)
        self._iters = 0
        self._time = 0.0
        self._waited = 0.0
        self._lead = 0                                   # the largest lead this window
        self._leads: deque[int] = deque(maxlen=quiet)    # the largest lead of past windows
        self._since_raise = quiet                        # windows since the last raise
        self._backoff = 1
        self._last_step = 0       # +1, -1, or 0 before any change

    @property
    def tau(self) -> int:
        return self._tau

    def observe_pull(self, lead: int) -> None:
        """A pull arrived ``lead`` clocks ahead of the floor it is gated on."""
        self._lead = max(self._lead, lead)

    def observe_wait(self, seconds: float) -> None:
        self._waited += max(seconds, 0.0)

    def observe_iteration(self, seconds: float) -> int:
        """Record one iteration (with the waits seen since the last); returns tau."""
        self._iters += 1
        self._time += max(seconds, 0.0)
        if self._iters >= self.window or self._decided():
            self._judge()
        return self._tau

    def _decided(self) -> bool:
        """The window will end above ``raise_above`` even if nothing more waits in it
        (the rest of its iterations taken at this window's mean): judge it now."""
        if self._time <= 0:
            return False
        rest = (self.window - self._iters) * self._time / self._iters
        return self._waited > self.raise_above * (self._time + rest)

    def wait_fraction(self) -> float | None:
        """The current window's fraction of iteration time spent waiting, if any."""
        return self._waited / self._time if self._time > 0 else None

    def _judge(self) -> None:
        f = self.wait_fraction()
        self._leads.append(self._lead)
        self._iters, self._time, self._waited, self._lead = 0, 0.0, 0.0, 0
        self._since_raise += 1
        if f is not None and f > self.raise_above:
            if self._tau < self.tau_max:
                if self._last_step < 0:
                    self._backoff = min(self._backoff * 2, self.max_backoff)
                self._tau = min(max(self._tau + 1, 2 * self._tau), self.tau_max)
                self._last_step = 1
            self._since_raise = 0
            return
        if (self._tau > self.tau_min and self._since_raise >= self.quiet * self._backoff
                and len(self._leads) == self.quiet and max(self._leads) <= self._tau - 1):
            if self._last_step < 0:
                self._backoff = 1
            self._tau -= 1
            self._last_step = -1


def stragglers(clocks: dict[str, int], lag: int) -> list[str]:
    """Workers whose clock is more than ``lag`` behind the median, slowest first."""
    if not clocks:
        return []
    median = statistics.median(clocks.values())
    return sorted((w for w, c in clocks.items() if median - c > lag),
                  key=lambda w: (clocks[w], w))


class WaitHistogram:
    """How long pulls were held, in fixed log-spaced buckets (1-2-5 per decade).

    Fixed buckets keep it cheap to record and to merge across servers; the quantiles
    are estimates: the upper bound of the bucket holding the rank (the largest wait seen
    for the open top bucket).
    """

    def __init__(self, lo: float = 1e-3, hi: float = 100.0):
        bounds, decade = [], lo
        while decade <= hi * (1 + 1e-9):
            bounds += [b for b in (decade, 2 * decade, 5 * decade) if b <= hi * (1 + 1e-9)]
            decade *= 10
        self.bounds = [float(f"{b:.6g}") for b in bounds]
        self.counts = [0] * (len(self.bounds) + 1)   # the last bucket is (hi, inf)
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def merge(self, other: WaitHistogram) -> None:
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different buckets")
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        if self.count == 0:
            return None
        rank, seen = max(1, math.ceil(q * self.count)), 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(self.bounds[i], self.max) if i < len(self.bounds) else self.max
        return self.max

    def to_dict(self) -> dict:
        """For status output: ``le`` bound -> count (``+inf`` last), count, sum, p50, p99."""
        keys = [f"{b:g}" for b in self.bounds] + ["+inf"]
        return {"buckets": dict(zip(keys, self.counts)), "count": self.count,
                "sum": self.total, "max": self.max,
                "p50": self.quantile(0.50), "p99": self.quantile(0.99)}

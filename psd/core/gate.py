"""The server's consistency gate: holds pulls (and, under sequential, pushes) until the
workers' clocks allow them, then runs them in arrival order.

The decisions come from the deterministic :class:`psd.cluster.clocks.RangeClocks`; this
module only keeps the work that is waiting (as callables), times how long it waited, and
adapts tau for ``max_delay: auto``.

Why pushes wait under sequential: a pull at clock c must see *exactly* the pushes of
clocks < c. A fast worker's clock-c push can reach the server before a slow worker's
clock-c pull, so the push is acknowledged at once but applied only when every worker has
finished clock c (the slow worker's pull, sent before its clock message on the same
connection, has been answered by then).
"""
from __future__ import annotations

import logging
from bisect import insort
from dataclasses import dataclass, field
from typing import Callable, Hashable

from psd.cluster.clocks import AutoDelay, RangeClocks, WaitHistogram, tau_for

log = logging.getLogger("psd.server")


@dataclass(frozen=True)
class Setting:
    consistency: str = "eventual"
    max_delay: int | str = 0            # an int, or "auto"
    num_workers: int = 0
    auto_bounds: tuple[int, int] = (0, 8)

    @property
    def is_auto(self) -> bool:
        return self.consistency == "bounded" and self.max_delay == "auto"


@dataclass
class Policy:
    """One consistency setting (the cluster's, or a table's override)."""

    setting: Setting
    clocks: RangeClocks = field(init=False)
    auto: AutoDelay | None = field(init=False, default=None)
    waits: WaitHistogram = field(default_factory=WaitHistogram)
    _held: dict = field(default_factory=dict)       # request id -> (run, since, clock, worker)
    _pushes: list = field(default_factory=list)     # (clock, seq, apply) awaiting the clock boundary
    _seq: int = 0                                   # arrival order of kept pushes
    _draining: bool = False                         # inside _drain: a released request pushes
    _last_clock_at: dict = field(default_factory=dict)
    _tau_since: float = float("-inf")               # when auto last changed tau
    #: a checkpoint in progress: pushes at clocks >= cut wait until the snapshot is written
    cut: int | None = None
    #: in arrival order: pushes the cut holds, (worker, clock, apply, what), and pulls that
    #: must see one of them, (worker, clock, None, (rid, run, since)): a pull let through
    #: after the pushes that came before it, and before those that came after it
    _past_cut: list = field(default_factory=list)
    #: of ``_past_cut`` (kept as it grows, reset when the cut replays it), so that a pull
    #: or push asks in O(workers), not by scanning it: the lowest held push clock of each
    #: worker and of all, and the lowest clock of a waiting pull (None: none)
    _held_low: dict = field(default_factory=dict)
    _held_min: int | None = None
    _wait_low: int | None = None
    _now: float = float("-inf")  # the latest event's time (a cut moves with none)
    #: the workers the cut covers; pushes of any other (one that joined after the
    #: checkpoint began) count as after the cut, whatever their clock
    cut_workers: frozenset | None = None
    #: request id -> (clock, worker) of a held or parked request that pushes when it runs
    #: (an older client's pushpull, held whole): a cut below its clock waits for it
    _pushing: dict = field(default_factory=dict)

    def __post_init__(self):
        s = self.setting
        if s.is_auto:
            lo, hi = s.auto_bounds
            self.auto = AutoDelay(lo, hi)
            tau = self.auto.tau
        else:
            tau = tau_for(s.consistency, s.max_delay if s.consistency == "bounded" else None)
        self.clocks = RangeClocks(s.num_workers, tau)

    @property
    def tau(self) -> int | None:
        return self.clocks.tau

    @property
    def buffers_pushes(self) -> bool:
        return self.clocks.tau == 0

    @property
    def holding(self) -> bool:
        """Whether pushes are being kept now (for the clock boundary or a checkpoint cut)."""
        return self.cut is not None or bool(self._past_cut) or bool(self._pushes)

    # -- events ----------------------------------------------------------------
    def pull(self, rid: Hashable, worker: str, clock: int, run: Callable[[], None], now: float,
             pushes: bool = False) -> bool:
        """Run ``run`` now if allowed, else hold it; True when it ran now. A pull that
        must see a push a checkpoint cut holds (its worker's own, or, sequential and
        bounded, one at a clock it must see) waits until the cut lets the push through.
        ``pushes``: ``run`` pushes at ``clock`` first (a request held whole): until it
        runs, a cut above its clock is not written (``pushes_below``)."""
        self._now = max(self._now, now)
        if pushes:
            self._pushing[rid] = (clock, worker)
            inner = run

            def run() -> None:
                self._pushing.pop(rid, None)
                inner()
        # (a request that pushes is never parked whole: the cut may wait for its push,
        # so it runs once the clocks allow it, and after_push parks only its pull part)
        if rid not in self._pushing and self._past_cut and self._sees_held(worker, clock):
            self._park_pull(worker, clock, (rid, run, now))
            return False
        if self.auto is not None:   # how far ahead of its gate the pull is: the room it uses
            floor = self.clocks.min_clock()
            self.auto.observe_pull(0 if floor is None else clock - floor)
        if self.clocks.pull(rid, worker, clock):
            self.waits.record(0.0)
            run()
            return True
        self._held[rid] = (run, now, clock, worker)
        return False

    def kept(self) -> list[tuple[int, object]]:
        """(clock, what) of every push kept for the clock boundary: a range copy carries
        the ones of its range (``what`` is the caller's account of the push)."""
        return [(clock, what) for clock, _seq, _apply, what in self._pushes]

    def waiting(self) -> list[object]:
        """``what`` of every push not applied yet: kept for the clock boundary or held by
        a checkpoint cut, in no particular order."""
        return [what for _c, _s, _a, what in self._pushes] + [
            what for _w, _c, apply, what in self._past_cut if apply is not None]

    def push(self, worker: str, clock: int, apply: Callable[[], None], what: object = None,
             keep: bool = False) -> bool:
        """Apply now, or keep for the clock boundary (sequential); True when applied now.

        With no live worker left (``min_clock()`` is None) nobody can be mid-iteration,
        so pushes are applied at once, and any still kept are applied when the last
        worker leaves: an acknowledged push is never left unapplied. A checkpoint cut
        in progress holds pushes at clocks >= the cut until the snapshot is written;
        ``keep``: keep it for the clock boundary even of a closed clock (a cut lets
        through what it held: ``set_cut`` then drains them in order with the pulls)."""
        if self.cut is not None and (clock >= self.cut or (self.cut_workers is not None
                                                           and worker not in self.cut_workers)):
            self._past_cut.append((worker, clock, apply, what))
            low = self._held_low.get(worker)
            if low is None or clock < low:
                self._held_low[worker] = clock
                if self._held_min is None or clock < self._held_min:
                    self._held_min = clock
            return False
        if self.buffers_pushes:
            if self._draining:
                # a held request released by this drain pushes (an older client's pushpull
                # held whole: decision 143): kept in its (clock, arrival) place, the drain
                # applies it after the pulls of its clock, as it would have been on arrival
                self._seq += 1
                insort(self._pushes, (clock, self._seq, apply, what), key=lambda p: (p[0], p[1]))
                return False
            limit = self._keep_from(self.clocks.min_clock())
            if limit is not None and (keep or clock >= limit):
                self._seq += 1
                self._pushes.append((clock, self._seq, apply, what))
                return False
        apply()
        return True

    def clock(self, worker: str, clock: int, now: float, synced: bool = True) -> None:
        self._now = max(self._now, now)
        last = self._last_clock_at.get(worker)
        self._last_clock_at[worker] = now
        self.clocks.clock(worker, clock, synced=synced)
        if self.auto is not None and last is not None:
            tau = self.auto.observe_iteration(now - last)
            if tau != self.clocks.tau:
                log.info("max_delay auto: tau %s -> %d (clock %d of %s)", self.clocks.tau, tau, clock, worker)
                self._tau_since = now
                self.clocks.tau = tau
        self._drain(now)

    def leave(self, worker: str, now: float) -> None:
        self.clocks.leave(worker)
        self._last_clock_at.pop(worker, None)
        self._drain(now)

    def _drain(self, now: float) -> None:
        """Apply the kept pushes whose clock has closed and run the pulls now allowed, a
        clock at a time: a pull at clock c sees exactly the pushes of clocks < c even when
        the floor jumps past c at once (a departure, a late pull), because the pushes of
        clock c are applied only after it. Kept pushes are applied in (clock, arrival)
        order, which is the same on every copy whatever floors each passed through.

        A callback that raises does not stop the drain: the pulls released with it were
        already taken off the clocks, and a push left in the list after it ran would be
        applied again by the next drain. The drain finishes, then the first error is
        raised for the caller's handler to report."""
        self._draining = True
        try:
            self._drain_now(now)
        finally:
            self._draining = False

    def _drain_now(self, now: float) -> None:
        ready = self.clocks.ready()
        if not ready and not self._pushes:
            return  # (most clocks: nothing held, nothing kept)
        errors: list[Exception] = []
        call = _collecting(errors)
        released = sorted(((self._held[rid][2], i, rid) for i, rid in enumerate(ready)))
        self._pushes.sort(key=lambda p: (p[0], p[1]))
        floor = self.clocks.min_clock()
        limit = None if not self.buffers_pushes else self._keep_from(floor)
        for clock, _i, rid in released:
            self._apply_kept(clock if limit is None else min(clock, limit), call)
            call(lambda rid=rid: self._run_held(rid, now))  # (may keep a push, in its sorted place)
            if self._past_cut and self.buffers_pushes:  # (it may wait for the cut now)
                limit = self._keep_from(floor)
        self._apply_kept(limit, call)
        if errors:
            raise errors[0]

    def _keep_from(self, floor: int | None) -> int | None:
        """Kept pushes at clocks from this one on wait (sequential): the floor, or lower,
        the clock of a pull waiting for the cut (it must see none of its clock or later)."""
        waiting = self._wait_low
        if waiting is None:
            return floor
        return waiting if floor is None else min(floor, waiting)

    def pushes_below(self, cut: int, workers: set) -> bool:
        """Whether a push below ``cut`` is still to be applied here: kept for the clock
        boundary, or to be made by a held request of one of ``workers``."""
        return (any(c < cut for c, _seq, _apply, _what in self._pushes)
                or any(c < cut and w in workers for c, w in self._pushing.values()))

    def after_push(self, rid: Hashable, worker: str, clock: int, run: Callable[[], None], now: float) -> None:
        """The pull part of a request held whole that has just pushed (an older client's
        pushpull): the clocks let it through already, a checkpoint cut may still hold a
        push it must see (its own, under eventual and bounded)."""
        if self._past_cut and self._sees_held(worker, clock):
            self._park_pull(worker, clock, (rid, run, now))
        else:
            run()

    def _run_held(self, rid, now: float) -> None:
        run, since, clock, worker = self._held.pop(rid)
        if rid not in self._pushing and self._past_cut and self._sees_held(worker, clock):  # (past a cut)
            self._park_pull(worker, clock, (rid, run, since))
            return
        waited = now - since
        self.waits.record(waited)
        if self.auto is not None:   # only the part of the wait under the current tau
            self.auto.observe_wait(now - max(since, self._tau_since))
        run()

    def _sees_held(self, worker: str, clock: int) -> bool:
        """Whether a pull by ``worker`` at ``clock`` must see a push the cut holds: one at
        a clock below ``clock - tau``, or (eventual, bounded) its worker's own before it."""
        tau = self.clocks.tau
        own = self._held_low.get(worker) if tau != 0 else None
        if own is not None and own <= clock:
            return True
        return tau is not None and self._held_min is not None and self._held_min < clock - tau

    def _park_pull(self, worker: str, clock: int, what: tuple) -> None:
        """A pull waits in the cut's queue, after the pushes that came before it."""
        self._past_cut.append((worker, clock, None, what))
        if self._wait_low is None or clock < self._wait_low:
            self._wait_low = clock

    def set_cut(self, cut: int | None, workers: frozenset | None = None) -> None:
        """Move the checkpoint cut; pushes now below it (or all, when cleared) go ahead,
        then the pulls that waited for them. Like ``_drain``, a callback that raises
        does not stop it: what it took off ``_past_cut`` is all let through (the pushes
        were acknowledged), then the first error is raised."""
        self.cut, self.cut_workers = cut, workers
        errors: list[Exception] = []
        self._draining = True  # (a released older client's pushpull keeps its push in order, as in _drain)
        try:
            self._set_cut_now(_collecting(errors))
        finally:
            self._draining = False
        if errors:
            raise errors[0]

    def _set_cut_now(self, call: Callable[[Callable[[], None]], None]) -> None:
        waiting, self._past_cut = self._past_cut, []
        self._held_low, self._held_min, self._wait_low = {}, None, None
        keep = self.buffers_pushes
        pulls = []
        for worker, clock, apply, what in waiting:
            if apply is not None:
                call(lambda: self.push(worker, clock, apply, what, keep=keep))
            elif self.clocks.tau is None:  # eventual: after its worker's pushes before it, not after
                rid, run, since = what
                call(lambda: self.pull(rid, worker, clock, run, since))
            else:  # after every push (bounded: it may see them, and must see those below its
                # bound, which may have come after it); sequential: by clock, as _drain runs them
                pulls.append((clock if keep else what[2], len(pulls), worker, clock, what))  # (bounded: by arrival)
        self._pushes.sort(key=lambda p: (p[0], p[1]))
        for _order, _i, worker, clock, (rid, run, since) in sorted(pulls):
            if keep:  # (what it must see, of closed clocks, first; pull() holds it if a push still is)
                limit = self._keep_from(self.clocks.min_clock())
                self._apply_kept(clock if limit is None else min(clock, limit), call)
            call(lambda: self.pull(rid, worker, clock, run, since))
        if keep and waiting:
            call(lambda: self._drain(self._now))

    def _apply_kept(self, below: int | None, call: Callable[[Callable[[], None]], None]) -> None:
        """Apply the pushes kept for the clock boundary at clocks below ``below`` (all when
        None), in (clock, arrival) order (``_pushes`` is sorted), each through ``call``,
        which keeps an error for later: a push it ran is never applied again."""
        done = 0
        while done < len(self._pushes) and (below is None or self._pushes[done][0] < below):
            call(self._pushes[done][2])
            done += 1
        del self._pushes[:done]

    def stats(self) -> dict:
        """``held_pulls``: held by the clocks or waiting for the cut; ``buffered_pushes``:
        kept for the clock boundary or held by the cut."""
        clocks = self.clocks.clocks()
        cut_pulls = sum(1 for _w, _c, apply, _what in self._past_cut if apply is None)
        return {"consistency": self.setting.consistency, "tau": self.tau,
                "max_delay": self.setting.max_delay, "clocks": clocks,
                "min_clock": min(clocks.values()) if clocks else None,
                "max_clock": max(clocks.values()) if clocks else None,
                "held_pulls": len(self._held) + cut_pulls,
                "buffered_pushes": len(self._pushes) + len(self._past_cut) - cut_pulls,
                "waits": self.waits.to_dict()}


def _collecting(errors: list[Exception]) -> Callable[[Callable[[], None]], None]:
    """A caller of callbacks that keeps an error in ``errors`` and goes on (``_drain``)."""
    def call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - re-raised by the caller, once its work is whole
            errors.append(err)
    return call


#: a cut below every clock: hold every push until the real cut is known
HOLD_ALL = 0


class Gate:
    """Every policy a server runs: the cluster default plus per-table overrides, and the
    checkpoint cut they share."""

    def __init__(self, default: Setting):
        self.default = default
        self.policies: dict[Setting, Policy] = {default: Policy(default)}
        self._default_policy = self.policies[default]
        self.left: set[str] = set()
        self._cut_wait: tuple[int, set[str], Callable[[], None]] | None = None
        self.max_push_clock = -1

    def policy(self, override: dict | None) -> Policy:
        if not override:  # (asked on every request: no hashing of the default Setting)
            return self._default_policy
        setting = Setting(override.get("consistency", self.default.consistency),
                          override.get("max_delay", self.default.max_delay),
                          override.get("num_workers", self.default.num_workers), self.default.auto_bounds)
        if setting not in self.policies:
            self.policies[setting] = self._seeded(Policy(setting))
            default = self.policies[self.default]
            self.policies[setting].cut, self.policies[setting].cut_workers = default.cut, default.cut_workers
        return self.policies[setting]

    # -- checkpoint cuts ---------------------------------------------------------
    def hold_all(self) -> int:
        """Phase 1 of a cut: apply nothing new; return the highest push clock seen."""
        self._each(lambda p: p.set_cut(HOLD_ALL))
        return self.max_push_clock

    def cut(self, cut: int, workers: set[str], on_ready: Callable[[], None]) -> None:
        """Phase 2: hold pushes at clocks >= ``cut``, and every push of a worker not
        listed (one that joined since the checkpoint began: nobody waits for its clock,
        so its pushes count as after the cut); once every listed worker still in the
        group has clock >= ``cut`` (so all its earlier pushes have arrived), call
        ``on_ready`` (the snapshot), then let the held pushes through."""
        self._cut_wait = (cut, set(workers), on_ready)
        self._each(lambda p: p.set_cut(cut, frozenset(workers)))

    def release_cut(self) -> None:
        self._cut_wait = None
        self._each(lambda p: p.set_cut(None))

    def _check_cut(self) -> None:
        if self._cut_wait is None:
            return
        cut, workers, on_ready = self._cut_wait
        if not self.lagging(cut, workers) and not any(p.pushes_below(cut, workers) for p in self.policies.values()):
            # (and every push below the cut applied: sequential keeps them until every worker
            # of the group, one not yet registered too, has passed their clock; a request
            # held whole, an older client's pushpull, has not even pushed yet)
            self._cut_wait = None
            try:
                on_ready()
            finally:
                self.release_cut()

    def lagging(self, cut: int, workers) -> list[str]:
        """The listed workers still in the group whose clock does not vouch for the cut:
        below it, or sent at a ring before our last takeover (``RangeClocks.unsynced``:
        their pushes may still be on their way to the old owner)."""
        group = self.policies[self.default].clocks
        clocks, unsynced = group.clocks(), group.unsynced
        return [w for w in workers if w not in self.left and (clocks.get(w, 0) < cut or w in unsynced)]

    def kept(self) -> list[tuple[int, object]]:
        """Every policy's pushes kept for the clock boundary: (clock, what)."""
        return [k for p in self.policies.values() for k in p.kept()]

    def waiting(self) -> list[object]:
        """Every policy's pushes not applied yet (``Policy.waiting``)."""
        return [w for p in self.policies.values() for w in p.waiting()]

    def note_push(self, clock: int) -> None:
        self.max_push_clock = max(self.max_push_clock, clock)

    def _seeded(self, policy: Policy) -> Policy:
        """A policy made after the group started (a table's override, on its first
        request) starts with the group as the existing policies know it: the workers'
        clocks, and who has left. Otherwise a worker that left or died before it existed
        would count as missing (clock 0) in it for ever."""
        clocks: dict[str, int] = {}
        gone: set[str] = set()
        for p in self.policies.values():
            joined, live = p.clocks.members()
            for w, c in joined.items():
                clocks[w] = max(clocks.get(w, 0), c)
                if w not in live:
                    gone.add(w)
        for w, c in clocks.items():
            policy.clocks.join(w, c)
        for w in gone:
            policy.clocks.leave(w)
        policy.clocks.unsynced = set().union(*(p.clocks.unsynced for p in self.policies.values())) - gone
        return policy

    def clock(self, worker: str, clock: int, now: float, synced: bool = True) -> None:
        """A worker's clock message; ``synced``: sent knowing the ring of our last takeover."""
        self._each(lambda p: p.clock(worker, clock, now, synced))

    def resync(self) -> None:
        """We took over ranges: workers' clocks vouch for them only once they clock again
        knowing the new ring (see ``RangeClocks.unsynced``)."""
        for p in self.policies.values():
            p.clocks.resync()

    def leave(self, worker: str, now: float) -> None:
        self.left.add(worker)
        self._each(lambda p: p.leave(worker, now))

    def _each(self, step: Callable[[Policy], None]) -> None:
        """``step`` on every policy, then the cut checked, even when a released request
        raised in one (its drain finished; the others and the cut must go on too)."""
        errors: list[Exception] = []
        call = _collecting(errors)
        for p in self.policies.values():
            call(lambda p=p: step(p))
        call(self._check_cut)
        if errors:
            raise errors[0]

    def live_workers(self) -> set[str]:
        """The workers some policy still counts as in the group."""
        return set().union(*(p.clocks.members()[1] for p in self.policies.values()))

    def stats(self) -> dict:
        return {f"{s.consistency}/{s.max_delay}": p.stats() for s, p in self.policies.items()}

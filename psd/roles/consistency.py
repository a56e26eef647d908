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

from dataclasses import dataclass, field
from typing import Callable, Hashable

from psd.cluster.clocks import AutoDelay, RangeClocks, WaitHistogram, tau_for


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
    _held: dict = field(default_factory=dict)       # request id -> (run, since)
    _pushes: list = field(default_factory=list)     # (clock, apply) awaiting the clock boundary
    _last_clock_at: dict = field(default_factory=dict)

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

    # -- events ----------------------------------------------------------------
    def pull(self, rid: Hashable, worker: str, clock: int, run: Callable[[], None], now: float) -> bool:
        """Run ``run`` now if allowed, else hold it; True when it ran now."""
        if self.clocks.pull(rid, worker, clock):
            self.waits.record(0.0)
            run()
            return True
        self._held[rid] = (run, now)
        return False

    def push(self, worker: str, clock: int, apply: Callable[[], None]) -> bool:
        """Apply now, or keep for the clock boundary (sequential); True when applied now."""
        if self.buffers_pushes:
            floor = self.clocks.min_clock()
            if floor is None or clock >= floor:
                self._pushes.append((clock, apply))
                return False
        apply()
        return True

    def clock(self, worker: str, clock: int, now: float) -> None:
        last = self._last_clock_at.get(worker)
        self._last_clock_at[worker] = now
        self.clocks.clock(worker, clock)
        if self.auto is not None and last is not None:
            self.clocks.tau = self.auto.observe_iteration(now - last)
        self._drain(now)

    def leave(self, worker: str, now: float) -> None:
        self.clocks.leave(worker)
        self._last_clock_at.pop(worker, None)
        self._drain(now)

    def _drain(self, now: float) -> None:
        """Apply pushes whose clock has closed, then run the pulls now allowed."""
        if self._pushes:
            floor = self.clocks.min_clock()
            keep = []
            for clock, apply in self._pushes:
                if self.buffers_pushes and (floor is None or clock >= floor):
                    keep.append((clock, apply))
                else:
                    apply()
            self._pushes = keep
        for rid in self.clocks.ready():
            run, since = self._held.pop(rid)
            waited = now - since
            self.waits.record(waited)
            if self.auto is not None:
                self.auto.observe_wait(waited)
            run()

    def stats(self) -> dict:
        clocks = self.clocks.clocks()
        return {"consistency": self.setting.consistency, "tau": self.tau,
                "max_delay": self.setting.max_delay, "clocks": clocks,
                "min_clock": min(clocks.values()) if clocks else None,
                "max_clock": max(clocks.values()) if clocks else None,
                "held_pulls": len(self._held), "buffered_pushes": len(self._pushes),
                "waits": self.waits.to_dict()}


class Gate:
    """Every policy a server runs: the cluster default plus per-table overrides."""

    def __init__(self, default: Setting):
        self.default = default
        self.policies: dict[Setting, Policy] = {default: Policy(default)}

    def policy(self, override: dict | None) -> Policy:
        setting = self.default
        if override:
            setting = Setting(override.get("consistency", self.default.consistency),
                              override.get("max_delay", self.default.max_delay),
                              self.default.num_workers, self.default.auto_bounds)
        if setting not in self.policies:
            self.policies[setting] = Policy(setting)
        return self.policies[setting]

    def clock(self, worker: str, clock: int, now: float) -> None:
        for p in self.policies.values():
            p.clock(worker, clock, now)

    def leave(self, worker: str, now: float) -> None:
        for p in self.policies.values():
            p.leave(worker, now)

    def stats(self) -> dict:
        return {f"{s.consistency}/{s.max_delay}": p.stats() for s, p in self.policies.items()}

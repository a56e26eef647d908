"""Unit and property tests of the consistency core (psd.cluster.clocks): no I/O, no sleeps."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psd.cluster.clocks import (AutoDelay, RangeClocks, WaitHistogram, stragglers,
                                tau_for)
from psd.errors import ConfigError


def group(n: int, tau: int | None, *, join: int | None = None) -> RangeClocks:
    """A RangeClocks with workers w0..w{join-1} joined (all n by default)."""
    rc = RangeClocks(num_workers=n, tau=tau)
    for i in range(n if join is None else join):
        rc.join(f"w{i}")
    return rc


# -- the three models --------------------------------------------------------------
def test_sequential_holds_until_every_worker_reaches_c():
    rc = group(3, tau=0)
    for w in ("w0", "w1", "w2"):
        assert rc.pull(f"{w}@0", w, 0)        # clock 0 needs nothing
    rc.clock("w0", 1)
    assert not rc.pull("p", "w0", 1)
    rc.clock("w1", 1)
    assert rc.ready() == [] and rc.held() == 1
    rc.clock("w2", 1)
    assert rc.ready() == ["p"] and rc.held() == 0
    assert rc.min_clock() == 1


def test_bounded_lets_workers_run_ahead_by_tau():
    rc = group(2, tau=2)
    for c in (1, 2):
        rc.clock("w0", c)
        assert rc.pull(f"p{c}", "w0", c)       # c - 2 <= 0: the slow w1 is close enough
    rc.clock("w0", 3)
    assert not rc.pull("p3", "w0", 3)          # needs w1 >= 1
    rc.clock("w1", 1)
    assert rc.ready() == ["p3"]
    rc.clock("w0", 4)
    rc.clock("w0", 5)
    assert not rc.pull("p4", "w0", 4) and not rc.pull("p5", "w0", 5)
    rc.clock("w1", 3)                          # enough for both; arrival order kept
    assert rc.ready() == ["p4", "p5"]


def test_eventual_never_holds():
    rc = group(3, tau=None, join=1)
    assert all(rc.pull(i, "w0", c) for i, c in enumerate(range(0, 1000, 7)))
    assert rc.held() == 0 and rc.ready() == []


def test_missing_workers_count_as_zero_until_the_group_has_joined():
    rc = group(3, tau=0, join=2)
    rc.clock("w0", 1)
    rc.clock("w1", 1)
    assert rc.min_clock() == 0
    assert not rc.pull("p", "w0", 1)           # the third worker has not arrived
    rc.join("w2")
    assert rc.ready() == []                    # it arrived at clock 0
    rc.clock("w2", 1)
    assert rc.ready() == ["p"]
    assert rc.clocks() == {"w0": 1, "w1": 1, "w2": 1}


def test_clock_from_unknown_worker_joins_it():
    rc = RangeClocks(num_workers=2, tau=0)
    rc.clock("a", 1)
    rc.clock("b", 1)
    assert rc.pull("p", "a", 1)
    assert rc.clocks() == {"a": 1, "b": 1}


def test_leave_releases_held_pulls_and_stops_counting():
    rc = group(3, tau=1)
    rc.clock("w0", 3)
    rc.clock("w1", 3)
    assert not rc.pull("a", "w0", 3)
    assert not rc.pull("b", "w1", 3)
    rc.leave("w2")                             # the straggler died
    assert rc.ready() == ["a", "b"]
    assert rc.clocks() == {"w0": 3, "w1": 3}
    rc.clock("w2", 10)                         # a late message does not bring it back
    assert "w2" not in rc.clocks()


def test_leave_before_the_group_filled_keeps_its_slot_filled():
    rc = group(2, tau=0, join=1)
    rc.join("w1")
    rc.leave("w1")
    rc.clock("w0", 1)
    assert rc.pull("p", "w0", 1)               # w1's slot is not waited for again


def test_a_worker_first_heard_after_a_takeover_with_an_unsynced_clock_holds_the_floor():
    """After a takeover (resync) a clock sent at an older ring does not vouch for the
    ranges taken over: the worker's pushes to them went to their old primary. That holds
    for a worker this server had not heard from yet too (found by the simulation, seed
    5085 of tests/test_sim.py's FOUND_SEEDS: its clock let a pull pass a push it missed)."""
    rc = group(2, tau=0, join=1)
    rc.clock("w0", 1)
    rc.resync()
    rc.clock("w0", 1, synced=True)
    rc.clock("w1", 1, synced=False)  # first heard, at the old ring
    assert not rc.pull("p", "w0", 1)
    rc.clock("w1", 1, synced=True)  # again, knowing the new ring
    assert rc.ready() == ["p"]


def test_a_clock_sent_at_an_older_ring_unsyncs_a_worker_first_heard_by_a_pull():
    """Decision 138: a pull joins a worker synced; its clock sent at the old ring after
    that must still not vouch for the ranges taken over (nor count at once)."""
    rc = group(2, tau=0, join=1)
    rc.clock("w0", 1)
    rc.resync()
    rc.clock("w0", 1, synced=True)
    assert rc.pull("p0", "w1", 0)  # w1 first heard here by a pull, at clock 0
    rc.clock("w1", 1, synced=False)  # then its clock, sent at the old ring
    assert rc.unsynced == {"w1"}
    assert not rc.pull("p1", "w0", 1)
    rc.clock("w1", 1, synced=True)
    assert rc.ready() == ["p1"]


def test_rejoin_keeps_the_larger_clock():
    rc = group(2, tau=0)
    rc.clock("w1", 4)
    rc.leave("w1")
    rc.join("w1")
    assert rc.clocks()["w1"] == 4
    rc.join("w1", clock=6)
    assert rc.clocks()["w1"] == 6


def test_clocks_only_move_forward():
    rc = group(2, tau=0)
    rc.clock("w0", 5)
    rc.clock("w0", 2)
    assert rc.clocks()["w0"] == 5
    rc.clock("w1", 5)
    rc.clock("w1", 0)
    assert rc.min_clock() == 5


def test_raising_tau_releases_and_eventual_releases_all():
    rc = group(2, tau=0)
    rc.clock("w0", 2)
    assert not rc.pull("a", "w0", 1) and not rc.pull("b", "w0", 2)
    rc.tau = 1
    assert rc.ready() == ["a"]
    rc.tau = None
    assert rc.ready() == ["b"]


def test_cancel_and_duplicate_ids():
    rc = group(2, tau=0)
    assert not rc.pull("a", "w0", 1)
    with pytest.raises(ValueError):
        rc.pull("a", "w0", 1)
    assert rc.cancel("a") and not rc.cancel("a")
    rc.clock("w0", 1)
    rc.clock("w1", 1)
    assert rc.ready() == []


def test_per_range_clocks():
    rc = RangeClocks(num_workers=2, tau=0, ranges=("r1", "r2"))
    rc.join("a")
    rc.join("b")
    rc.clock("a", 1)
    rc.clock("b", 1, ranges=["r1"])            # b has only clocked r1
    assert rc.clocks("r1") == {"a": 1, "b": 1} and rc.clocks("r2") == {"a": 1, "b": 0}
    assert rc.clocks() == {"a": 1, "b": 0}
    assert rc.pull("p1", "a", 1, ranges=["r1"])
    assert not rc.pull("p2", "a", 1)           # all ranges: r2 is behind
    rc.add_range("r3")                         # inherits what every range agrees on
    assert rc.clocks("r3") == {"a": 1, "b": 0}
    rc.drop_range("r2")
    rc.drop_range("r3")
    assert rc.ready() == ["p2"]
    assert rc.pull("p3", "a", 5, ranges=["gone"])   # a range not held here doesn't bind


def test_tau_for():
    assert tau_for("sequential") == 0
    assert tau_for("eventual") is None
    assert tau_for("bounded", 3) == 3
    for bad in (("bounded", None), ("bounded", -1), ("bounded", "auto"), ("bsp", 0)):
        with pytest.raises(ConfigError):
            tau_for(*bad)


# -- property tests over random interleavings ---------------------------------------
WORKERS = ["w0", "w1", "w2", "w3"]
worker = st.sampled_from(WORKERS)
taus = st.sampled_from([0, 1, 2, 3, None])
event = st.one_of(
    st.tuples(st.just("join"), worker),
    st.tuples(st.just("leave"), worker),
    st.tuples(st.just("clock"), worker, st.integers(0, 8)),
    st.tuples(st.just("pull"), worker, st.integers(0, 8)),
    st.tuples(st.just("tau"), taus),
)


class Model:
    """The semantics restated plainly, to check RangeClocks against."""

    def __init__(self, num_workers: int, tau: int | None):
        self.n, self.tau = num_workers, tau
        self.clock: dict[str, int] = {}
        self.joined: set[str] = set()
        self.live: set[str] = set()

    def apply(self, ev) -> None:
        kind, *args = ev
        if kind == "join":
            self.joined.add(args[0])
            self.live.add(args[0])
            self.clock.setdefault(args[0], 0)
        elif kind == "leave":   # a worker that never joined still takes its slot
            self.joined.add(args[0])
            self.live.discard(args[0])
            self.clock.setdefault(args[0], 0)
        elif kind == "clock":
            w, c = args
            if w not in self.joined:
                self.apply(("join", w))
            self.clock[w] = max(self.clock[w], c)
        elif kind == "pull":
            if args[0] not in self.joined:
                self.apply(("join", args[0]))
        elif kind == "tau":
            self.tau = args[0]

    def may_run(self, c: int) -> bool:
        if self.tau is None:
            return True
        group = [self.clock[w] for w in self.live] + [0] * max(0, self.n - len(self.joined))
        return all(x >= c - self.tau for x in group)


def replay(rc: RangeClocks, model: Model, events, held: dict, released: list,
           offset: int = 0) -> None:
    """Feed events to both and check properties (1)-(3) after each; ``held``: id -> clock."""
    clock_of = dict(held)
    for i, ev in enumerate(events, offset):
        model.apply(ev)
        kind, *args = ev
        now = []
        if kind == "join":
            rc.join(args[0])
        elif kind == "leave":
            rc.leave(args[0])
        elif kind == "clock":
            rc.clock(*args)
        elif kind == "tau":
            rc.tau = args[0]
        elif kind == "pull":
            rid = ("pull", i)
            clock_of[rid] = args[1]
            if rc.pull(rid, args[0], args[1]):
                now.append(rid)
            else:
                held[rid] = args[1]
        for rid in rc.ready():
            assert rid in held, f"{rid} released but not held, or released twice"
            del held[rid]
            now.append(rid)
        # (1) a release happens only when every live group worker is within tau
        for rid in now:
            assert model.may_run(clock_of[rid]), (rid, ev, model.clock, model.live)
        # (2) no pull stays held once its condition holds
        assert not any(model.may_run(c) for c in held.values()), (ev, held)
        assert rc.held() == len(held)
        # (3) released ids are unique
        released.extend(now)
        assert len(released) == len(set(released))
        # the class's own view agrees with the model
        assert rc.clocks() == {w: model.clock[w] for w in sorted(model.live)}


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 4), tau=taus, events=st.lists(event, max_size=60),
       finish=st.sampled_from(["leave", "advance"]))
def test_random_interleavings(n, tau, events, finish):
    rc, model = RangeClocks(num_workers=n, tau=tau), Model(n, tau)
    held: dict = {}
    released: list = []
    replay(rc, model, events, held, released)
    # (4) once the whole group has joined and then leaves or advances far enough,
    # nothing stays held and every pull was released exactly once
    tail = [("join", w) for w in WORKERS]
    tail += ([("leave", w) for w in WORKERS] if finish == "leave"
             else [("clock", w, 100) for w in WORKERS])
    replay(rc, model, tail, held, released, offset=len(events))
    assert held == {} and rc.held() == 0
    pulls = [("pull", i) for i, ev in enumerate(events) if ev[0] == "pull"]
    assert sorted(released) == sorted(pulls)


#: operations on a RangeClocks of ranges "a", "b" and "c" (worker, clock, ranges, synced)
cache_ops = st.one_of(
    st.tuples(st.just("join"), st.sampled_from(WORKERS), st.integers(0, 5)),
    st.tuples(st.just("leave"), st.sampled_from(WORKERS)),
    st.tuples(st.just("clock"), st.sampled_from(WORKERS), st.integers(0, 8),
              st.sampled_from([None, ("a",), ("b", "c")]), st.booleans()),
    st.tuples(st.just("pull"), st.sampled_from(WORKERS), st.integers(0, 8), st.sampled_from([None, ("a",), ("c",)])),
    st.tuples(st.just("add_range"), st.sampled_from("abcd")),
    st.tuples(st.just("drop_range"), st.sampled_from("abcd")),
    st.tuples(st.just("resync")),
    st.tuples(st.just("unsynced"), st.frozensets(st.sampled_from(WORKERS))))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 4), tau=taus, ops=st.lists(cache_ops, max_size=40))
def test_the_kept_floor_is_always_the_floor_worked_out_afresh(n, tau, ops):
    """``min_clock`` keeps each range set's floor until the clocks or the group change:
    after every operation it must equal the floor computed from scratch, for every range
    set a pull may ask about (a mutator that forgot to drop the kept floors fails here)."""
    rc = RangeClocks(num_workers=n, tau=tau, ranges=("a", "b", "c"))
    for i, (op, *args) in enumerate(ops):
        if op == "pull":
            rc.pull(i, *args)
        elif op == "unsynced":
            rc.unsynced = set(args[0])
        else:
            getattr(rc, op)(*args)
        for ranges in (None, ("a",), ("c",), ("b", "c")):
            assert rc.min_clock(ranges) == rc._floor_now(ranges), (op, ranges)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 4), tau=st.integers(0, 3),
       steps=st.lists(st.integers(0, 3), min_size=1, max_size=80))
def test_fifo_workers_stay_within_tau(n, tau, steps):
    """Workers that clock then pull at their own clock never drift apart by more than tau+1.

    A blocked worker stops until its pull is released; it is held only while someone lags.
    """
    rc = RangeClocks(num_workers=n, tau=tau)
    names = [f"w{i}" for i in range(n)]
    clock = dict.fromkeys(names, 0)
    blocked: dict[str, tuple[str, int]] = {}     # worker -> (request id, clock)
    for who in steps:
        w = names[who % n]
        if w in blocked:
            continue
        clock[w] += 1
        rc.clock(w, clock[w])
        rid = f"{w}@{clock[w]}"
        if not rc.pull(rid, w, clock[w]):
            blocked[w] = (rid, clock[w])
        for rid in rc.ready():
            assert blocked.pop(rid.split("@")[0])[0] == rid
        for _, c in blocked.values():
            assert min(clock.values()) < c - tau
        assert max(clock.values()) - min(clock.values()) <= tau + 1


# -- AutoDelay ---------------------------------------------------------------------
def feed(auto: AutoDelay, iterations: int, iter_s: float, wait_s: float) -> list[int]:
    out = []
    for _ in range(iterations):
        auto.observe_wait(wait_s)
        out.append(auto.observe_iteration(iter_s))
    return out


def window(auto: AutoDelay, n: int, *, wait_s: float = 0.0, lead: int = 0) -> list[int]:
    """``n`` windows of one-second iterations, each window with one pull ``lead`` clocks
    ahead and ``wait_s`` of waiting in all; the tau after each."""
    out = []
    for _ in range(n):
        auto.observe_pull(lead)
        auto.observe_wait(wait_s)
        out.append(feed(auto, auto.window, iter_s=1.0, wait_s=0.0)[-1])
    return out


def test_auto_delay_climbs_fast_under_a_persistent_straggler():
    """Waits in every window: tau doubles a window, 0 to the upper bound in four."""
    auto = AutoDelay(tau_min=0, tau_max=8, window=10)
    assert auto.tau == 0
    assert window(auto, 6, wait_s=5.0, lead=auto.tau + 1) == [1, 2, 4, 8, 8, 8]
    bounded = AutoDelay(tau_min=1, tau_max=6, window=10)
    assert window(bounded, 4, wait_s=5.0) == [2, 4, 6, 6]


def test_auto_delay_judges_a_window_early_only_once_its_waits_decide_it():
    auto = AutoDelay(tau_min=0, tau_max=8, window=10, raise_above=0.05)
    seen = feed(auto, 30, iter_s=1.0, wait_s=0.051)  # f 0.051: raised at the window's end
    assert seen[8] == 0 and seen[9] == 1 and seen[18] == 1 and seen[19] == 2 and seen[29] == 4
    auto = AutoDelay(tau_min=0, tau_max=8, window=10, raise_above=0.05)
    seen = feed(auto, 4, iter_s=1.0, wait_s=0.3)     # 0.6 s by the 2nd: over 5% of 10 s
    assert seen == [0, 1, 1, 2]


def test_auto_delay_stays_up_across_transient_stragglers():
    """Little waiting, but a straggler now and then uses the whole room: tau keeps it."""
    auto = AutoDelay(tau_min=0, tau_max=8, initial=8, window=10, quiet=8)
    seen = []
    for i in range(200):
        seen += window(auto, 1, lead=8 if i % 7 == 0 else 1)   # a use every 7 windows < quiet
    assert set(seen) == {8}


def test_auto_delay_comes_down_only_when_waits_vanish_for_long():
    auto = AutoDelay(tau_min=0, tau_max=8, window=10, quiet=8)
    window(auto, 4, wait_s=5.0)                       # up to 8
    assert auto.tau == 8
    seen = window(auto, 20, lead=1)                   # nobody more than a clock ahead
    assert seen[:7] == [8] * 7                        # the quiet time after a raise
    assert seen[7:15] == [7, 6, 5, 4, 3, 2, 1, 1]     # then a step a window, to the lead used
    assert auto.tau == 1                              # tau 0 would have held lead-1 pulls


def test_auto_delay_comes_down_no_further_than_the_room_used():
    auto = AutoDelay(tau_min=0, tau_max=8, initial=8, window=10, quiet=4)
    window(auto, 40, lead=3)
    assert auto.tau == 3
    window(auto, 40, lead=0)
    assert auto.tau == 0


def test_auto_delay_backs_off_on_room_that_comes_and_goes():
    """Heavy waits at tau 1, none at tau 2 and no lead past 1: each lowering that a raise
    undoes doubles the quiet time before the next, up to max_backoff (the raise comes
    two iterations after each lowering: by then the waits decide the window)."""
    auto = AutoDelay(tau_min=1, tau_max=2, window=10, quiet=2, max_backoff=8)
    seen = []
    for _ in range(2000):
        auto.observe_pull(1)
        auto.observe_wait(0.5 if auto.tau == 1 else 0.0)
        seen.append(auto.observe_iteration(1.0))
    lowers = [i for i in range(1, len(seen)) if seen[i] < seen[i - 1]]
    gaps = [b - a for a, b in zip(lowers, lowers[1:])]
    assert gaps[:4] == [2 + 40, 2 + 80, 2 + 160, 2 + 160] and set(gaps[4:]) == {162}


def test_auto_delay_backoff_resets_when_a_lowering_stands():
    auto = AutoDelay(tau_min=1, tau_max=8, window=10, quiet=2, max_backoff=8)
    for _ in range(600):                       # room that comes and goes: backoff climbs to 8
        auto.observe_pull(1)
        auto.observe_wait(0.5 if auto.tau == 1 else 0.0)
        auto.observe_iteration(1.0)
    window(auto, 10, wait_s=5.0)               # a persistent straggler: up to 8
    seen = window(auto, 40, lead=1)            # then it goes away
    lowers = [i for i in range(1, len(seen)) if seen[i] < seen[i - 1]]
    assert seen[-1] == 1
    assert lowers[2] - lowers[1] == 1          # once a lowering stands, a step a window


def test_auto_delay_validates_bounds():
    with pytest.raises(ConfigError):
        AutoDelay(tau_min=3, tau_max=2)
    with pytest.raises(ConfigError):
        AutoDelay(raise_above=1.5)
    with pytest.raises(ConfigError):
        AutoDelay(quiet=0)


# -- stragglers and the wait histogram ------------------------------------------------
def test_stragglers_lag_the_median():
    assert stragglers({}, 1) == []
    clocks = {"a": 10, "b": 10, "c": 9, "d": 4, "e": 7}
    assert stragglers(clocks, 1) == ["d", "e"]    # median 9
    assert stragglers(clocks, 2) == ["d"]
    assert stragglers(clocks, 5) == []
    assert stragglers({"a": 1, "b": 1}, 0) == []


def test_wait_histogram():
    h = WaitHistogram()
    assert h.to_dict()["p50"] is None
    for s in [0.0] * 90 + [0.003] * 9 + [250.0]:
        h.record(s)
    d = h.to_dict()
    assert d["count"] == 100 and list(d["buckets"])[:3] == ["0.001", "0.002", "0.005"]
    assert d["buckets"]["0.001"] == 90 and d["buckets"]["0.005"] == 9
    assert d["buckets"]["+inf"] == 1 and list(d["buckets"])[-2] == "100"
    assert d["p50"] == 0.001 and d["p99"] == 0.005 and d["max"] == 250.0
    assert h.quantile(1.0) == 250.0
    other = WaitHistogram()
    other.record(0.5)
    h.merge(other)
    assert h.count == 101 and h.to_dict()["buckets"]["0.5"] == 1

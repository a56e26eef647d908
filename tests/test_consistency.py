"""Consistency models end to end: real worker processes (tests/clockworker.py) against a
LocalCluster, one of them a deliberate straggler.

Every worker j pushes +1 to its own counter key once per iteration and then calls
``kv.clock()``; at the start of iteration c (clock c) it pulls every worker's counter and
records what it saw. So "worker j's count" is the number of iterations j has finished,
and the models' promises become statements about the recorded counts:

* bounded(tau): a pull at clock c sees every live worker's count >= c - tau;
* sequential: a pull at clock c sees exactly c for every worker;
* eventual: no promise; the fast workers run ahead of the straggler.

Each scenario gets its own cluster; every wait is bounded and every process is killed
on the way out, even when an assertion fails.
"""
from __future__ import annotations

import ctypes
import json
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import psd
from psd.cli.status import render
from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.codec import Message
from psd.config import ClusterConfig
from psd.core.effects import Reply
from psd.core.gate import Gate, Policy, Setting
from psd.core.pushpull import PULL_REFUSABLE
from psd.core.server import ServerCore
from psd.schema import TableSpec

from clockworker import TABLE, spread_keys

WORKER = Path(__file__).with_name("clockworker.py")
N = 3              # workers; the last one is the straggler
ITERS = 20
SLOW = 0.15        # the straggler's seconds of "work" per iteration
STRAGGLER = N - 1
#: a small heartbeat so a killed worker is declared dead soon (after 2 x 8 x 0.1 s), with
#: enough misses allowed that a live one is not, on a loaded machine
CLUSTER = dict(servers=2, num_workers=N, heartbeat_interval=0.1, heartbeat_misses=8)
RUN_TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(60)


# -- running a group of worker processes ---------------------------------------------
def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        pass


class Group:
    """Worker processes, started together; killed on leaving the ``with`` block whatever
    happened (and by the kernel if this process dies first)."""

    def __init__(self, cluster: psd.LocalCluster, tmp: Path, sleeps: list[float],
                 iterations: int = ITERS):
        self.cluster, self.tmp, self.sleeps = cluster, tmp, sleeps
        self.outs = [tmp / f"worker{i}.json" for i in range(len(sleeps))]
        self.errs = [tmp / f"worker{i}.err" for i in range(len(sleeps))]
        self.procs: list[subprocess.Popen] = []
        self._files: list = []
        self.ids: list[str] = []
        self.iterations = iterations
        self.killed: dict[int, float] = {}   # index -> time.time() of the SIGKILL
        status = cluster.status()
        self.keys = spread_keys(status, len(sleeps))
        assert len({owner(status, k) for k in self.keys}) > 1, "all counters on one server"

    def __enter__(self) -> "Group":
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            for i, sleep in enumerate(self.sleeps):
                self._files.append(open(self.errs[i], "wb"))
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), self.cluster.scheduler, str(i), str(len(self.sleeps)),
                     str(self.iterations), str(sleep), str(self.outs[i]), json.dumps(self.keys)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._files[-1],
                    preexec_fn=_die_with_parent))
            for i, p in enumerate(self.procs):
                line = self._readline(i, deadline)
                assert line.startswith("ready "), f"worker {i} said {line!r}:\n{self.stderr(i)}"
                self.ids.append(line.split()[1])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (p.stdin, p.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        for f in self._files:
            f.close()

    def _readline(self, i: int, deadline: float) -> str:
        p = self.procs[i]
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"worker {i} printed nothing in time:\n{self.stderr(i)}")
        return p.stdout.readline().decode().strip()

    def stderr(self, i: int) -> str:
        try:
            return self.errs[i].read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def go(self) -> None:
        for p in self.procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()

    def kill(self, i: int) -> None:
        self.killed[i] = time.time()
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(5)

    def join(self, poll=None, timeout: float = RUN_TIMEOUT) -> list[dict | None]:
        """Wait for every worker not killed; ``poll(status)`` runs every 50 ms meanwhile.
        Returns each worker's records (None for a killed one)."""
        deadline = time.monotonic() + timeout
        while True:
            if poll is not None:
                poll(self.cluster.status())
            running = [i for i, p in enumerate(self.procs) if p.poll() is None and i not in self.killed]
            if not running:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"workers {running} did not finish within {timeout} s; "
                                     f"clocks {self.cluster.status()['clocks']}")
            time.sleep(0.05)
        results = []
        for i, p in enumerate(self.procs):
            if i in self.killed:
                results.append(None)
                continue
            assert p.returncode == 0, f"worker {i} exited {p.returncode}:\n{self.stderr(i)}"
            results.append(json.loads(self.outs[i].read_text()))
        return results


def owner(status: dict, key: int) -> str:
    return next(r["owners"][0] for r in status["ranges"] if r["begin"] <= key <= r["last"])


def elapsed(result: dict) -> float:
    return result["end"] - result["start"]


def check_own_count(results: list[dict | None]) -> None:
    """A worker's pull always reflects its own earlier pushes (same connection, in order)."""
    for r in filter(None, results):
        for rec in r["records"]:
            assert rec["counts"][r["index"]] == rec["clock"], (r["index"], rec)


def check_bounded(results: list[dict | None], tau: int, killed: dict[int, float] = {}) -> int:
    """No pull at clock c saw a live worker's count below c - tau; returns pulls checked."""
    checked = 0
    for r in filter(None, results):
        for rec in r["records"]:
            c = rec["clock"]
            for j, count in enumerate(rec["counts"]):
                if j in killed and rec["t"] >= killed[j]:
                    continue   # answered after j died: j no longer counts
                assert count >= c - tau, (f"worker {r['index']} pulled at clock {c} and saw worker "
                                          f"{j} at {count} < c - tau = {c - tau}")
            checked += 1
    return checked


def check_held_back(results: list[dict | None], tau: int, slow: int = STRAGGLER) -> None:
    """A fast worker's pull at clock c was answered only after the straggler had finished
    iteration c - tau - 1, whose pull the straggler recorded before sleeping SLOW s."""
    straggler = {rec["clock"]: rec["t"] for rec in results[slow]["records"]}
    for r in results:
        if r is None or r["index"] == slow:
            continue
        for rec in r["records"]:
            before = straggler.get(rec["clock"] - tau - 1)
            if before is not None:
                assert rec["t"] >= before + 0.9 * SLOW, (
                    f"worker {r['index']} at clock {rec['clock']} was answered at {rec['t']:.3f}, "
                    f"before the straggler could finish iteration {rec['clock'] - tau - 1} "
                    f"(pulled at {before:.3f})")


SLEEPS = [0.0] * (N - 1) + [SLOW]


# -- bounded delay ---------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1, 2])
def test_bounded_delay_holds_fast_workers_within_tau(tmp_path, tau):
    samples: list[dict] = []
    with psd.LocalCluster(consistency="bounded", max_delay=tau, straggler_lag=1, **CLUSTER) as cluster:
        with Group(cluster, tmp_path, SLEEPS) as group:
            group.go()
            results = group.join(poll=samples.append)
            ids = group.ids
        status = _await_server_stats(cluster, f"bounded/{tau}")

    assert check_bounded(results, tau) == N * ITERS
    check_own_count(results)
    check_held_back(results, tau)
    slow = elapsed(results[STRAGGLER])
    assert slow >= ITERS * SLOW
    for r in results[:STRAGGLER]:
        # held back: it finished only after the straggler had finished iteration
        # ITERS - tau - 2 (the straggler's own timestamps, not a wall-clock guess)
        assert r["end"] >= results[STRAGGLER]["records"][ITERS - tau - 2]["t"] + 0.9 * SLOW
        # and sometimes it really was ahead: it saw the straggler behind it
        assert any(rec["counts"][STRAGGLER] < rec["clock"] for rec in r["records"])

    # status: every worker's clock, slowest/fastest, the straggler flagged (lag > 1)
    full = [s["clocks"] for s in samples if len(s["clocks"]["workers"]) == N]
    assert full, "status never listed all three workers' clocks"
    for clocks in full:
        assert set(clocks["workers"]) == set(ids)
        assert clocks["slowest"] == min(clocks["workers"].values())
        assert clocks["fastest"] == max(clocks["workers"].values())
        assert clocks["consistency"] == "bounded" and clocks["max_delay"] == tau
        # clocks come from heartbeats (a little stale); the lead stays near tau + 1
        assert clocks["fastest"] - clocks["slowest"] <= tau + 4, clocks
    assert any(c["stragglers"] == [ids[STRAGGLER]] for c in full), [c["stragglers"] for c in full]
    # heartbeat clocks are a little stale, so on a loaded machine a fast worker can look
    # behind for a moment; the straggler must still be the one flagged most often
    flags = {w: sum(w in c["stragglers"] for c in full) for w in ids}
    assert max(flags, key=flags.get) == ids[STRAGGLER], flags
    flagged = next(s for s in samples if ids[STRAGGLER] in s["clocks"]["stragglers"])
    node = {n["id"]: n for n in flagged["nodes"]}[ids[STRAGGLER]]
    assert node["straggler"] is True and isinstance(node["clock"], int)

    # servers: pulls were held, and the wait histogram shows it
    waits = [n["consistency"][f"bounded/{tau}"]["waits"] for n in status["nodes"] if n["role"] == "server"]
    assert sum(w["count"] - w["buckets"]["0.001"] for w in waits) > 0   # waited > 1 ms
    assert max(w["max"] for w in waits) >= 0.9 * SLOW
    assert all(w["p99"] >= w["p50"] for w in waits if w["count"])

    # psd status renders the workers section from a mid-run sample
    text = render(flagged)
    assert "workers" in text and ids[STRAGGLER] in text and "straggler" in text
    assert "pull wait" in text


def _await_server_stats(cluster, policy: str, timeout: float = 5.0) -> dict:
    """Status once the servers have reported (by heartbeat) stats for ``policy`` counting
    at least every worker's pulls."""
    deadline = time.monotonic() + timeout
    while True:
        st = cluster.status()
        servers = [n for n in st["nodes"] if n["role"] == "server"]
        counts = [n["consistency"].get(policy, {}).get("waits", {}).get("count", 0) for n in servers]
        if servers and sum(counts) >= N * ITERS:   # every pull counted by some server
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"servers never reported {policy} stats: "
                                 f"{[n['consistency'] for n in servers]}")
        time.sleep(0.1)


# -- eventual ---------------------------------------------------------------------------
def test_eventual_lets_fast_workers_run_ahead(tmp_path):
    with psd.LocalCluster(consistency="eventual", **CLUSTER) as cluster:
        with Group(cluster, tmp_path, SLEEPS) as group:
            group.go()
            results = group.join()
    check_own_count(results)
    slow = elapsed(results[STRAGGLER])
    tau = 2   # what bounded(2) would have enforced
    for r in results[:STRAGGLER]:
        assert elapsed(r) < 0.5 * slow, (elapsed(r), slow)
        assert any(rec["counts"][STRAGGLER] < rec["clock"] - tau for rec in r["records"])


# -- sequential -------------------------------------------------------------------------
def test_sequential_pulls_see_exactly_the_earlier_clocks(tmp_path):
    with psd.LocalCluster(consistency="sequential", **CLUSTER) as cluster:
        with Group(cluster, tmp_path, SLEEPS) as group:
            group.go()
            results = group.join()
        for r in results:
            assert [rec["clock"] for rec in r["records"]] == list(range(ITERS))
            for rec in r["records"]:
                assert rec["counts"] == [rec["clock"]] * N, (r["index"], rec)
        check_held_back(results, tau=0)

        # afterwards, in this process (the old group has left, so it is the only live one):
        # pushes of clock c are acked at once but applied at the clock boundary, in issue order
        with psd.connect(cluster, psd.ClusterConfig(request_timeout=10.0)) as kv:
            counts = kv.table(TABLE, width=1, dtype="int64", updater="sum")
            assert counts.pull(group.keys)[:, 0].tolist() == [ITERS] * N
            order = kv.table("order", width=1, dtype="int64", updater="assign")
            key = np.array([5], dtype=np.uint64)
            assert order.pull(key)[0, 0] == 0
            stamps = [order.push(key, np.array([[v]], dtype=np.int64)) for v in range(1, 31)]
            for ts in stamps:
                kv.wait(ts)                                 # acked ...
            assert order.pull(key)[0, 0] == 0               # ... but not applied within clock 0
            # a pushpull's pull part is such a pull: its own push is not in it
            both = kv.table("both", width=1, dtype="int64", updater="sum")
            assert both.pushpull(key, np.array([[7]], dtype=np.int64))[0, 0] == 0
            kv.clock()
            assert order.pull(key)[0, 0] == 30              # applied at the boundary, in order
            assert both.pull(key)[0, 0] == 7


# -- a worker dies --------------------------------------------------------------------------
def test_killed_worker_stops_counting_and_the_rest_finish(tmp_path):
    tau = 1
    with psd.LocalCluster(consistency="bounded", max_delay=tau, **CLUSTER) as cluster:
        with Group(cluster, tmp_path, SLEEPS) as group:
            group.go()
            victim = group.ids[STRAGGLER]
            deadline = time.monotonic() + RUN_TIMEOUT
            while cluster.status()["clocks"]["workers"].get(victim, 0) < 4:
                assert time.monotonic() < deadline, "the straggler never reached clock 4"
                time.sleep(0.02)
            group.kill(STRAGGLER)
            started = time.monotonic()
            results = group.join(timeout=15.0)
            recovered = time.monotonic() - started
            st = cluster.status()
    assert results[STRAGGLER] is None
    for r in results[:STRAGGLER]:
        assert len(r["records"]) == ITERS
        assert r["records"][-1]["counts"][r["index"]] == ITERS - 1
        # they got past the dead worker: its count stayed far below their clocks
        assert r["records"][-1]["counts"][STRAGGLER] < ITERS - 1 - tau
    check_bounded(results, tau, killed=group.killed)
    check_own_count(results)
    assert recovered < 10.0
    assert victim not in st["clocks"]["workers"]
    assert {n["id"]: n["state"] for n in st["nodes"]}[victim] == "dead"


# -- dependencies -----------------------------------------------------------------------------
def test_push_after_a_pull_waits_for_its_answer():
    """A pull held by bounded consistency; a push issued after it with ``after=[pull]``
    is applied only after the pull is answered, a push without ``after`` right away."""
    cfg = psd.ClusterConfig(request_timeout=10.0)
    one = np.ones((1, 1), dtype=np.int64)
    with psd.LocalCluster(servers=2, consistency="bounded", max_delay=1, num_workers=2) as cluster, \
            psd.connect(cluster, cfg) as kv_a, psd.connect(cluster, cfg) as kv_o:
        status = cluster.status()
        keys = np.array(spread_keys(status, 3), dtype=np.uint64)
        assert len({owner(status, int(k)) for k in keys}) == 2
        free, dep = keys[:1], keys[2:]
        ta = kv_a.table("dep", width=1, dtype="int64", updater="sum")
        to = kv_o.table("dep", width=1, dtype="int64", updater="sum")
        assert ta.pull(keys)[:, 0].tolist() == [0, 0, 0]   # both join the group at clock 0
        assert to.pull(keys)[:, 0].tolist() == [0, 0, 0]
        kv_a.clock()
        kv_a.clock()
        pull_ts = ta.pull_async(keys)            # clock 2 needs every worker >= 1: held (O is at 0)
        dep_ts = ta.push(dep, one, after=[pull_ts])
        free_ts = ta.push(free, one)             # no dependency: sent now, applied now
        assert kv_a.wait(free_ts) is None
        for _ in range(5):                       # give A's event loop every chance to send `dep`
            kv_a.status()
            time.sleep(0.05)
        assert to.pull(keys)[:, 0].tolist() == [1, 0, 0]    # O at clock 0 may read: dep not applied
        kv_o.clock()                             # O reaches clock 1: A's pull may run
        assert kv_a.wait(pull_ts)[:, 0].tolist() == [1, 0, 0]   # answered before dep was applied
        assert kv_a.wait(dep_ts) is None
        assert to.pull(keys)[:, 0].tolist() == [1, 0, 1]


# -- the server's gate, deterministically (no I/O) ----------------------------------------
def _policy(tau: int | None, n: int) -> Policy:
    if tau is None:
        return Policy(Setting("eventual", 0, n))
    return Policy(Setting("sequential", 0, n) if tau == 0 else Setting("bounded", tau, n))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 4), tau=st.sampled_from([0, 1, 2, None]),
       schedule=st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.integers(0, 30)), max_size=120))
def test_gate_random_interleavings_with_pushes(n, tau, schedule):
    """Workers run pull -> push(+1 to own key) -> clock, interleaved at random, some
    leaving mid-run. Every pull that runs sees what its model promises; the survivors
    always finish; at the end every acknowledged push has been applied."""
    iters = 5
    p = _policy(tau, n)
    counts = [0] * n
    pushed = [0] * n
    clock = [0] * n
    phase = ["pull"] * n           # pull -> (held) -> push -> clock -> pull ...
    live = set(range(n))
    seen: list[tuple[int, int, list[int], set[int]]] = []

    def answer(w: int, c: int):
        def run():
            if w in live:   # a departed worker's pull may be released later: nobody reads it
                seen.append((w, c, list(counts), set(live)))
            phase[w] = "push"
        return run

    def step(w: int) -> None:
        if phase[w] == "pull":
            phase[w] = "held"
            p.pull((w, clock[w]), f"w{w}", clock[w], answer(w, clock[w]), 0.0)
        elif phase[w] == "push":
            pushed[w] += 1
            p.push(f"w{w}", clock[w], lambda w=w: counts.__setitem__(w, counts[w] + 1))
            phase[w] = "clock"
        elif phase[w] == "clock":
            clock[w] += 1
            p.clock(f"w{w}", clock[w], 0.0)
            phase[w] = "pull"
            if clock[w] == iters:
                leave(w)

    def leave(w: int) -> None:
        live.discard(w)
        p.leave(f"w{w}", 0.0)

    for who, dies, when in schedule:
        w = who % n
        if w not in live:
            continue
        if dies and when == 0:
            leave(w)
        elif phase[w] != "held":
            step(w)
    # the survivors always finish (nobody waits for a worker that left)
    while live:
        movable = [w for w in live if phase[w] != "held"]
        assert movable, f"deadlock: {live} all held; clocks {clock}, {p.stats()}"
        step(movable[0])
    assert counts == pushed, "an acknowledged push was never applied"
    assert p.stats()["buffered_pushes"] == 0

    for w, c, observed, alive in seen:
        assert observed[w] == c                      # its own earlier pushes, none later
        for j in range(n):
            if tau == 0:
                assert observed[j] <= c              # no push of clock >= c
                if j in alive:
                    assert observed[j] == c          # every push of clocks < c
            elif tau is not None and j in alive:
                assert observed[j] >= c - tau


def test_a_worker_that_dies_before_its_first_request_is_not_waited_for():
    p = _policy(0, 2)
    p.leave("w1", 0.0)               # the scheduler's notice: w1 died while starting up
    assert p.pull("a", "w0", 0, lambda: None, 0.0)
    p.clock("w0", 1, 0.0)
    ran = []
    assert p.pull("b", "w0", 1, lambda: ran.append(1), 0.0)   # w1's slot is not missing


def test_buffered_pushes_are_applied_when_the_last_worker_leaves():
    p = _policy(0, 1)
    applied = []
    assert p.pull("r", "w0", 0, lambda: None, 0.0)
    assert not p.push("w0", 0, lambda: applied.append(1))   # sequential: kept for clock 1
    p.leave("w0", 1.0)                                        # ... which never comes
    assert applied == [1]
    assert p.push("w1", 0, lambda: applied.append(2))        # nobody live: applied at once
    assert applied == [1, 2]


def test_table_override_made_late_knows_who_left():
    """A table's own policy is made on its first request; a worker that left before then
    must not count as a missing member of it."""
    gate = Gate(Setting("sequential", 0, 2))
    default = gate.policy(None)
    for w in ("w0", "w1"):
        assert default.pull(w, w, 0, lambda: None, 0.0)
        gate.clock(w, 1, 0.0)
    gate.leave("w1", 0.0)
    late = gate.policy({"consistency": "bounded", "max_delay": 1})
    assert late is not default and late.clocks.clocks() == {"w0": 1}
    ran = []
    assert late.pull("p", "w0", 2, lambda: ran.append(2), 0.0)      # 2 - 1 <= 1: runs now
    assert not late.pull("q", "w0", 3, lambda: ran.append(3), 0.0)  # needs w0 >= 2 only
    gate.clock("w0", 2, 0.0)
    assert ran == [2, 3]


# -- a pushpull under sequential, in the server's core (no I/O) ------------------------------
@pytest.mark.parametrize("refusable", [True, False], ids=["current", "older"])
def test_sequential_pushpull_answers_the_earlier_clocks_without_its_own_push(refusable):
    """The pull part of a pushpull at clock c reflects exactly the pushes of clocks < c,
    as a pull issued right after the push would (docs/consistency.md): at clock 0, the
    table's zeros, although its push is acknowledged in the same answer. The push is
    kept for the clock boundary, not applied; a pull at clock 1 sees it. Both for a
    current client's pushpull (``pull_refusable``) and an older client's."""
    core = ServerCore(ClusterConfig(security="none", consistency="sequential", num_workers=1), secure=False)
    core.node_id = "S0"
    core.ring = Assignment(version=1, ranges=(Range(0, KEY_SPACE_END),), owners=(("S0",),),
                           addresses={"S0": "tcp://S0"})
    core._create(TableSpec("t", 1, "int64"))
    core.fence.confirmed(0.0)
    keys = np.array([10, 20], np.uint64)

    def ask(op: str, rid: int, clock: int, *arrays) -> np.ndarray:
        meta = {"rid": rid, **({PULL_REFUSABLE: True} if refusable and op == "pushpull" else {})}
        out = core.handle(None, Message(op, id=rid, sender="W0", table="t", clock=clock, meta=meta,
                                        arrays=[keys, *arrays]), 0.0)
        assert [type(e) for e in out] == [Reply], out
        return out[0].msg.arrays[0]

    assert ask("pushpull", 1, 0, np.full((2, 1), 7, np.int64))[:, 0].tolist() == [0, 0]
    assert [clock for clock, _ in core.gate.policy(None).kept()] == [0]   # kept, not applied
    assert ask("pull", 2, 0)[:, 0].tolist() == [0, 0]
    core.handle(None, Message("clock", sender="W0", meta={"clock": 1}), 0.0)
    assert ask("pull", 3, 1)[:, 0].tolist() == [7, 7]
    assert ask("pushpull", 4, 1, np.full((2, 1), 1, np.int64))[:, 0].tolist() == [7, 7]

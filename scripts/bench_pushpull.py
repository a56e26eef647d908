#!/usr/bin/env python
"""Push/pull benchmark of psd against a bare pyzmq baseline moving the same bytes.

    .venv/bin/python scripts/bench_pushpull.py            # full run, a few minutes at most
    .venv/bin/python scripts/bench_pushpull.py --quick    # smaller sizes, under a minute

For each configuration (1 server / 1 worker, then 2 servers / 2 workers) it starts a
``psd.LocalCluster`` and measures, through the blocking API ``psd.connect``:

* dense push+pull: ``kv.wait(t.push_span(lo, v))`` then ``t.pull_span(lo, n)`` of
  float32 vectors (MB/s counts bytes pushed plus bytes pulled, 1 MB = 1e6 B; one op
  is one push+wait+pull round);
* sparse push then pull of random sorted unique uint64 keys drawn from a table
  pre-filled with ``push_span`` (keys/s; "push+pull" counts keys pushed plus keys pulled);
* round-trip latency of a small pull (10 keys; also a 10-key ``pull_span``), with the
  default settings and again on a second cluster where servers and workers busy-poll
  (``busy_poll_us``, docs/operations.md "Latency"): they spin for a while instead of
  sleeping when they wait for a message;
* the dense cells again on a third cluster with ``shm: false``: payloads over loopback
  TCP instead of shared memory (docs/operations.md, "Shared memory"), so the table shows
  both paths of one run side by side, and their ratio.

psd runs with ``security: none`` here (plaintext, like the baseline); CurveZMQ, which is
on by default, is measured against it by ``scripts/bench_security.py``.

Then it repeats the same traffic against a bare pyzmq ROUTER echo server running in
its own process (one per psd server), from plain blocking DEALER sockets, zero-copy:
a push is acked with one byte, a pull is answered with a same-size payload.

Layout: worker w uses its own table, and its pre-filled region, its dense spans, its
sparse keys and its small pulls all lie in one key range that server w % S leads, in
psd's ring (the widest such range) and in the bare baseline's equal-width split alike:
both sides send the same bytes to the same number of servers, and with 2 servers and 2
workers each server serves one worker. (Until stop 11 the regions were centred on
2**63, the bare split's boundary: the bare client then spread every request over both
servers while psd's ring put both workers' regions on one server.)

A full run makes three rounds of psd, psd with busy polling and bare, in alternating
order (``--rounds``), so that a machine whose speed drifts during the run favours
neither side. Throughput figures are the median over the repetitions of every round
(the best is in the JSON too); with 2 workers, a repetition's rate is all workers' work over the span from the earliest
start to the latest end (workers start each repetition together behind a barrier).
Latency percentiles pool every sample of every worker after warm-up.

Before timing, each psd test checks that the values it pulls back are the values it
pushed (a psd that silently drops requests fails the run instead of looking fast).
The whole run is bounded (``--budget``; 90 s quick, 600 s full): at the deadline a
watchdog stops every child process, reports what finished and exits with code 3.
Only 127.0.0.1 is used; Ctrl-C and errors also stop every child.

Results: a table on stdout, plus ``results.json`` and ``throughput.png`` in ``--out``.
The 1-minute load average is printed: this benchmark is only meaningful on an idle
machine (figures from a machine running other work are flagged as noisy).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402


TARGET_DENSE_RATIO = 0.7
TARGET_LAT_P50_US = 300.0
TARGET_SPARSE_PER_SERVER = 5e6
#: busy_poll_us of the latency-only run (servers and workers)
BUSY_POLL_US = 1000
BUSY = "busy poll"
#: the kind that runs the dense cells with shared memory off (payloads over loopback TCP)
TCP = "shm off"


#: every child this run has started and not yet stopped, so that the watchdog (time
#: budget) can stop them from its own thread while the main thread is blocked
_LIVE_CLUSTERS: set = set()
_LIVE_PROCS: set = set()
_REPORT_LOCK = threading.Lock()


class Watchdog:
    """Bounds the whole run: at the deadline it stops every child we started, reports
    what finished, and exits (the main thread may be blocked inside a psd call)."""

    def __init__(self, budget: float, on_expire):
        self.budget = budget
        self.on_expire = on_expire
        self._timer = threading.Timer(budget, self._fire)
        self._timer.daemon = True

    def start(self) -> "Watchdog":
        self._timer.start()
        return self

    def cancel(self) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        print(f"\n!! benchmark exceeded its {self.budget:.0f} s budget; stopping", file=sys.stderr, flush=True)
        code = 3
        try:
            stop_children()
            self.on_expire(f"exceeded its {self.budget:.0f} s budget")
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)


def stop_children() -> None:
    for cluster in list(_LIVE_CLUSTERS):
        try:
            cluster.close()
        except Exception:
            pass
        _LIVE_CLUSTERS.discard(cluster)
    for proc in list(_LIVE_PROCS):
        bc.stop_process(proc, 2.0)
        _LIVE_PROCS.discard(proc)


def make_plan(quick: bool) -> dict:
    if quick:
        return {"mode": "quick", "dense_sizes": [1000, 100_000, 1_000_000],
                "dense_iters": {1000: 100, 100_000: 20, 1_000_000: 4}, "reps": 3,
                "fill": 1_000_000, "sparse_keys": 10_000, "lat_warmup": 200, "lat_samples": 1500,
                "lat_keys": 10, "barrier_timeout": 60.0, "budget": 90.0, "rounds": 1}
    return {"mode": "full", "dense_sizes": [1000, 100_000, 10_000_000],
            "dense_iters": {1000: 200, 100_000: 50, 10_000_000: 3}, "reps": 5,
            "fill": 10_000_000, "sparse_keys": 100_000, "lat_warmup": 500, "lat_samples": 5000,
            "lat_keys": 10, "barrier_timeout": 180.0, "budget": 600.0, "rounds": 3}


# -- the two clients, behind one interface ---------------------------------------
class PsdOps:
    def __init__(self, scheduler: str, w: int, num_servers: int, busy_poll_us: int = 0, shm: bool = True):
        import psd

        # the cluster runs with security: none (the baseline is plaintext pyzmq), and
        # this worker process is told so (a client is CurveZMQ unless its config says none)
        self.kv = psd.connect(scheduler, psd.ClusterConfig(security="none", busy_poll_us=busy_poll_us, shm=shm))
        self.t = self.kv.table(f"bench_w{w}", width=1, dtype="float32", updater="sum")

    def region(self, w: int, n: int) -> int:
        """Start of ``n`` keys in the middle of the widest range server w % S leads."""
        ring = self.kv.aio.ring
        leader = sorted(ring.servers)[w % len(ring.servers)]
        r = max((r for r, owners in zip(ring.ranges, ring.owners) if owners[0] == leader),
                key=lambda r: r.end - r.begin)
        assert r.end - r.begin >= n, f"the widest range {leader} leads is narrower than {n} keys"
        return r.begin + (r.end - r.begin - n) // 2

    def prefill(self, lo: int, n: int) -> None:
        self.kv.wait(self.t.push_span(lo, np.zeros(n, dtype=np.float32)))

    def dense(self, lo: int, v: np.ndarray):
        kv, t, n = self.kv, self.t, v.shape[0]

        def op():
            kv.wait(t.push_span(lo, v))
            return t.pull_span(lo, n)
        return op

    def sparse(self, keys: np.ndarray, vals: np.ndarray):
        kv, t = self.kv, self.t
        return (lambda: kv.wait(t.push(keys, vals))), (lambda: t.pull(keys))

    def small_pull(self, keys: np.ndarray):
        return lambda: self.t.pull(keys)

    def small_pull_span(self, lo: int, n: int):
        return lambda: self.t.pull_span(lo, n)

    # sanity checks, run once before timing: a psd that silently did nothing (or sent
    # nothing) must fail the run instead of reporting impossible figures
    def check_dense(self, lo: int, v: np.ndarray, op) -> None:
        before = self.t.pull_span(lo, v.shape[0]).ravel().copy()
        after = np.asarray(op()).ravel()
        _expect(after, before + v, f"dense push_span/pull_span of {v.shape[0]} keys")

    def check_sparse(self, keys: np.ndarray, vals: np.ndarray, push, pull) -> None:
        before = self.t.pull(keys).ravel().copy()
        push()
        _expect(np.asarray(pull()).ravel(), before + vals, f"sparse push/pull of {keys.size} keys")

    def check_small(self, keys: np.ndarray, pull, lo: int, pull_span) -> None:
        bump = np.arange(1, keys.size + 1, dtype=np.float32)
        before = self.t.pull(keys).ravel().copy()
        self.kv.wait(self.t.push(keys, bump))
        _expect(np.asarray(pull()).ravel(), before + bump, "small pull")
        span = self.t.pull_span(lo, int(keys[-1] - keys[0]) + 1).ravel()
        _expect(span[(keys - keys[0]).astype(np.int64)], before + bump, "pull_span against pull")
        _expect(np.asarray(pull_span()).ravel(), span[:keys.size], "small pull_span")

    def close(self) -> None:
        self.kv.close()


def _expect(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if got.shape != want.shape or not np.array_equal(got, want):
        raise AssertionError(f"psd returned wrong values for {what}: got {got[:5]}..., expected {want[:5]}...")


class BareOps:
    """Same bytes as psd on the wire (header aside), precomputed frames, no checks."""

    def __init__(self, addresses: list[str], w: int, num_servers: int):
        self.c = bc.BareClient(addresses)
        self.S = num_servers

    def region(self, w: int, n: int) -> int:
        """Start of ``n`` keys in the middle of server w % S's equal-width range."""
        begins = bc.server_begins(self.S) + [bc.KEY_SPACE_END]
        s = w % self.S
        return begins[s] + (begins[s + 1] - begins[s] - n) // 2

    def prefill(self, lo: int, n: int) -> None:
        pass

    def dense(self, lo: int, v: np.ndarray):
        pieces = bc.split_span(lo, v.shape[0], self.S)
        push = [(s, [memoryview(v[off:off + cnt])], 0) for s, off, cnt in pieces]
        pull = [(s, [], cnt * v.itemsize) for s, off, cnt in pieces]
        rt = self.c.roundtrip

        def op():
            rt(push)
            return [np.frombuffer(f.buffer, dtype=np.float32) for f in rt(pull)]
        return op

    def sparse(self, keys: np.ndarray, vals: np.ndarray):
        pieces = bc.split_keys(keys, self.S)
        push = [(s, [memoryview(keys[i0:i1]), memoryview(vals[i0:i1])], 0) for s, i0, i1 in pieces]
        pull = [(s, [memoryview(keys[i0:i1])], (i1 - i0) * 4) for s, i0, i1 in pieces]
        rt = self.c.roundtrip
        return (lambda: rt(push)), (lambda: [np.frombuffer(f.buffer, np.float32) for f in rt(pull)])

    def small_pull(self, keys: np.ndarray):
        (s, i0, i1), = bc.split_keys(keys, self.S)
        req = [(s, [memoryview(keys)], keys.size * 4)]
        return lambda: np.frombuffer(self.c.roundtrip(req)[0].buffer, np.float32)

    def small_pull_span(self, lo: int, n: int):
        (s, _, _), = bc.split_span(lo, n, self.S)
        req = [(s, [], n * 4)]
        return lambda: np.frombuffer(self.c.roundtrip(req)[0].buffer, np.float32)

    def check_dense(self, lo, v, op) -> None:
        got = sum(a.size for a in op())
        assert got == v.shape[0], f"bare echo returned {got} values, expected {v.shape[0]}"

    def check_sparse(self, keys, vals, push, pull) -> None:
        push()
        pull()

    def check_small(self, keys, pull, lo, pull_span) -> None:
        pull()
        pull_span()

    def close(self) -> None:
        self.c.close()


# -- one worker's whole run ------------------------------------------------------
def run_worker(kind: str, w: int, num_workers: int, num_servers: int, address, plan: dict,
               barrier) -> dict:
    timeout = plan["barrier_timeout"]

    def sync():
        if barrier is not None:
            barrier.wait(timeout)

    # "psd busy poll": the latency tests only, on a cluster that busy-polls
    lat_only = kind == f"psd {BUSY}"
    # "psd shm off": the dense tests only, on a cluster with shared memory off
    dense_only = kind == f"psd {TCP}"
    ops = (BareOps(address, w, num_servers) if kind == "bare"
           else PsdOps(address, w, num_servers, BUSY_POLL_US if lat_only else 0, shm=not dense_only))
    tests: dict[str, list] = {}
    lat: dict[str, list] = {}

    def record(name, t0, t1, **units):
        tests.setdefault(name, []).append({"t0": t0, "t1": t1, "units": units})

    try:
        fill = plan["fill"]
        fill_lo = ops.region(w, fill)  # [fill_lo, fill_lo + fill): on server w % S
        mid = fill_lo + fill // 2
        sync()
        t0 = time.perf_counter()
        if not lat_only:
            ops.prefill(fill_lo, fill)
        prefill_s = time.perf_counter() - t0
        sync()

        for n in ([] if lat_only else plan["dense_sizes"]):
            v = np.ones(n, dtype=np.float32)
            op = ops.dense(mid - n // 2, v)
            iters = plan["dense_iters"][n]
            ops.check_dense(mid - n // 2, v, op)  # warm-up, and values come back right
            for _ in range(plan["reps"]):
                sync()
                t0 = time.perf_counter()
                for _ in range(iters):
                    op()
                t1 = time.perf_counter()
                record(f"dense {n}", t0, t1, bytes=2 * v.nbytes * iters, ops=iters)

        rng = np.random.default_rng(1234 + w)
        k = plan["sparse_keys"]
        vals = np.ones(k, dtype=np.float32)
        key_sets = [np.sort(rng.choice(fill, size=k, replace=False)).astype(np.uint64) + np.uint64(fill_lo)
                    for _ in range(plan["reps"] + 1)]
        for r, keys in enumerate([] if lat_only or dense_only else key_sets):
            push, pull = ops.sparse(keys, vals)
            if r == 0:
                ops.check_sparse(keys, vals, push, pull)  # warm-up, and values come back right
                continue
            sync()
            t0 = time.perf_counter()
            push()
            tm = time.perf_counter()
            pull()
            t1 = time.perf_counter()
            record("sparse push", t0, tm, keys=k)
            record("sparse pull", tm, t1, keys=k)
            record("sparse push+pull", t0, t1, keys=2 * k, rounds=1)

        lo = fill_lo
        nk = plan["lat_keys"]
        small_keys = (np.arange(nk, dtype=np.uint64) * np.uint64(3)) + np.uint64(lo)
        small_pull, small_span = ops.small_pull(small_keys), ops.small_pull_span(lo, nk)
        ops.check_small(small_keys, small_pull, lo, small_span)
        for name, op in (() if dense_only else (("small pull", small_pull), ("small pull_span", small_span))):
            sync()
            for _ in range(plan["lat_warmup"]):
                op()
            samples = np.empty(plan["lat_samples"], dtype=np.float64)
            clock = time.perf_counter_ns
            for i in range(samples.size):
                a = clock()
                op()
                samples[i] = clock() - a
            lat[name] = (samples / 1e3).tolist()
        sync()
    finally:
        ops.close()
    return {"w": w, "tests": tests, "lat": lat, "prefill_s": prefill_s}


def worker_entry(kind, w, num_workers, num_servers, address, plan, barrier, queue, parent_pid):
    """Body of a spawned worker process: run, put the result (or the error) on ``queue``."""
    bc.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    from psd.transport.sockets import tune_malloc
    tune_malloc()  # bare and psd workers alike (psd.connect does it too)
    try:
        queue.put(run_worker(kind, w, num_workers, num_servers, address, plan, barrier))
    except BaseException:
        if barrier is not None:
            barrier.abort()
        queue.put({"w": w, "error": traceback.format_exc()})


# -- one configuration -----------------------------------------------------------
def run_workers(kind: str, num_servers: int, num_workers: int, address, plan: dict) -> list[dict]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(num_workers) if num_workers > 1 else None
    queue = ctx.Queue()
    procs = []
    try:
        for w in range(1, num_workers):
            p = ctx.Process(target=worker_entry, daemon=True, name=f"bench-worker{w}",
                            args=(kind, w, num_workers, num_servers, address, plan, barrier, queue,
                                  os.getpid()))
            p.start()
            procs.append(p)
            _LIVE_PROCS.add(p)
        try:
            results = [run_worker(kind, 0, num_workers, num_servers, address, plan, barrier)]
        except BaseException:
            if barrier is not None:
                barrier.abort()
            raise
        for _ in procs:
            r = queue.get(timeout=plan["barrier_timeout"])
            if "error" in r:
                raise RuntimeError(f"worker {r['w']} failed:\n{r['error']}")
            results.append(r)
        return results
    finally:
        for p in procs:
            p.join(5)
            bc.stop_process(p)
            _LIVE_PROCS.discard(p)
        queue.close()
        queue.join_thread()


def run_psd(num_servers: int, num_workers: int, plan: dict, busy_poll_us: int = 0, shm: bool = True) -> list[dict]:
    import psd

    # plaintext, like the bare pyzmq baseline: the cost of CurveZMQ is scripts/bench_security.py's
    with psd.LocalCluster(servers=num_servers, security="none", busy_poll_us=busy_poll_us, shm=shm) as cluster:
        _LIVE_CLUSTERS.add(cluster)
        try:
            kind = f"psd {BUSY}" if busy_poll_us else "psd" if shm else f"psd {TCP}"
            return run_workers(kind, num_servers, num_workers, cluster.scheduler, plan)
        finally:
            _LIVE_CLUSTERS.discard(cluster)


def run_psd_busy(num_servers: int, num_workers: int, plan: dict) -> list[dict]:
    return run_psd(num_servers, num_workers, plan, BUSY_POLL_US)


def run_psd_tcp(num_servers: int, num_workers: int, plan: dict) -> list[dict]:
    return run_psd(num_servers, num_workers, plan, shm=False)


def run_bare(num_servers: int, num_workers: int, plan: dict) -> list[dict]:
    ctx = mp.get_context("spawn")
    servers, addresses = [], []
    try:
        for i in range(num_servers):
            here, there = ctx.Pipe()
            p = ctx.Process(target=bc.bare_server_main, args=(there, os.getpid()), daemon=True,
                            name=f"bare-echo{i}")
            p.start()
            servers.append(p)
            _LIVE_PROCS.add(p)
            if not here.poll(30):
                raise RuntimeError("bare echo server did not start")
            addresses.append(here.recv())
        return run_workers("bare", num_servers, num_workers, addresses, plan)
    finally:
        for a in addresses:
            try:
                bc.stop_bare_server(a)
            except Exception:
                pass
        for p in servers:
            p.join(2)
            bc.stop_process(p)
            _LIVE_PROCS.discard(p)


def merge_rounds(before: list[dict] | None, now: list[dict]) -> list[dict]:
    """Each worker's repetitions and latency samples of every round so far, as if one
    round had run them all (a repetition still pools the workers of its own round)."""
    if before is None:
        return now
    by_w = {w["w"]: w for w in now}
    for w in before:
        new = by_w[w["w"]]
        for name, recs in new["tests"].items():
            w["tests"].setdefault(name, []).extend(recs)
        for name, samples in new["lat"].items():
            w["lat"].setdefault(name, []).extend(samples)
        w["prefill_s"] = max(w["prefill_s"], new["prefill_s"])
    return before


# -- reporting -----------------------------------------------------------------------
def summarize(kind_results: dict, plan: dict, num_servers: int) -> dict:
    """{test: {"psd": value, "bare": value, "unit": ..., ...}} for one configuration."""
    rows = {}

    def rate(kind, name, unit):
        ws = kind_results.get(kind)
        if not ws:
            return None
        r = bc.aggregate_rates(ws, name)
        return r[unit]["median"] if unit in r else None

    for n in plan["dense_sizes"]:
        rows[f"dense {n:.0e} push+pull"] = {
            "unit": "MB/s", "psd": _mb(rate("psd", f"dense {n}", "bytes")),
            "bare": _mb(rate("bare", f"dense {n}", "bytes"))}
        rows[f"dense {n:.0e} push+pull ops"] = {
            "unit": "ops/s", "psd": rate("psd", f"dense {n}", "ops"), "bare": rate("bare", f"dense {n}", "ops")}
        rows[f"dense {n:.0e} push+pull ({TCP})"] = {
            "unit": "MB/s", "psd": _mb(rate(f"psd {TCP}", f"dense {n}", "bytes")),
            "bare": _mb(rate("bare", f"dense {n}", "bytes"))}
    k = plan["sparse_keys"]
    for name in ("sparse push", "sparse pull", "sparse push+pull"):
        rows[f"{name} {k:.0e} keys"] = {"unit": "keys/s", "psd": rate("psd", name, "keys"),
                                        "bare": rate("bare", name, "keys")}
    per = {kind: rate(kind, "sparse push+pull", "keys") for kind in ("psd", "bare")}
    rows["sparse push+pull per server"] = {
        "unit": "keys/s", **{kind: (v / num_servers if v is not None else None) for kind, v in per.items()}}
    for psd_kind, suffix in (("psd", ""), (f"psd {BUSY}", f" ({BUSY})")):
        for name in ("small pull", "small pull_span"):
            for p in ("p50", "p99"):
                row = {"unit": "us"}
                for kind in (psd_kind, "bare"):
                    ws = kind_results.get(kind)
                    row["psd" if kind == psd_kind else kind] = (bc.latency_summary(ws, name)[f"{p}_us"]
                                                                if ws else None)
                rows[f"{name} {plan['lat_keys']} keys latency {p}{suffix}"] = row
    for row in rows.values():
        row["ratio"] = (row["psd"] / row["bare"]) if row["psd"] and row["bare"] else None
    return rows


def _mb(x):
    return None if x is None else x / 1e6


def print_table(report: dict) -> None:
    header = ("config", "test", "unit", "psd", "bare", "psd/bare")
    lines = []
    for cfg in report["configs"]:
        for test, row in cfg["rows"].items():
            lines.append((cfg["name"], test, row["unit"], bc.fmt_num(row["psd"]), bc.fmt_num(row["bare"]),
                          "-" if row["ratio"] is None else f"{row['ratio']:.2f}"))
        if cfg.get("errors"):
            for kind, err in cfg["errors"].items():
                lines.append((cfg["name"], f"{kind} FAILED: {err.splitlines()[-1][:60]}", "", "", "", ""))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    last = None
    for line in lines:
        if last is not None and line[0] != last:
            print()
        last = line[0]
        print(fmt.format(*line))


def print_shm(report: dict, plan: dict) -> None:
    """Shared memory on / off, dense push+pull of each size, same run (ratios > 1: faster on)."""
    for cfg in report["configs"]:
        rows = cfg["rows"]
        cells = []
        for n in plan["dense_sizes"]:
            on = rows.get(f"dense {n:.0e} push+pull", {}).get("psd")
            off = rows.get(f"dense {n:.0e} push+pull ({TCP})", {}).get("psd")
            cells.append(f"{n:.0e}: {on / off:.2f}" if on and off else f"{n:.0e}: n/a")
        print(f"[{cfg['name']}] dense push+pull, shared memory on / off: " + ", ".join(cells))
    print()


def check_targets(report: dict, plan: dict) -> list[dict]:
    n = max(plan["dense_sizes"])
    checks = []
    for cfg in report["configs"]:
        rows, name, S = cfg["rows"], cfg["name"], cfg["servers"]
        dense = rows.get(f"dense {n:.0e} push+pull", {})
        sparse = rows.get("sparse push+pull per server", {})
        checks.append({"config": name, "target": f"dense {n:.0e} push+pull >= {TARGET_DENSE_RATIO} x bare",
                       "value": dense.get("ratio"), "pass": (dense.get("ratio") or 0) >= TARGET_DENSE_RATIO,
                       "shown": f"{dense['ratio']:.2f} x bare" if dense.get("ratio") else "n/a"})
        # the target is at the defaults; busy polling is an opt-in shown beside it (every
        # process spinning on shared cores hurts: docs/operations.md, "Latency")
        for suffix, how, info in (("", "defaults", False), (f" ({BUSY})", f"busy_poll_us: {BUSY_POLL_US}", True)):
            p50 = rows.get(f"small pull {plan['lat_keys']} keys latency p50{suffix}", {}).get("psd")
            checks.append({"config": name, "target": f"small pull p50 < {TARGET_LAT_P50_US:.0f} us ({how})",
                           "value": p50, "pass": p50 is not None and p50 < TARGET_LAT_P50_US, "info": info,
                           "shown": f"{p50:.0f} us" if p50 else "n/a"})
        v = sparse.get("psd")
        checks.append({"config": name, "target": f"sparse push+pull >= {TARGET_SPARSE_PER_SERVER / 1e6:.0f} M keys/s "
                                                  f"per server ({S} server{'s' if S > 1 else ''})",
                       "value": v, "pass": v is not None and v >= TARGET_SPARSE_PER_SERVER,
                       "shown": f"{v / 1e6:.2f} M keys/s" if v else "n/a"})
    return checks


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = report["configs"]
    plan = report["plan"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    groups = [(f"dense {n:.0e} push+pull", f"dense {n:.0e}") for n in plan["dense_sizes"]]
    panels = [
        (axes[0], groups, "MB/s (pushed + pulled)", "dense push+pull throughput", True),
        (axes[1], [(f"{t} {plan['sparse_keys']:.0e} keys", t.replace("sparse ", ""))
                   for t in ("sparse push", "sparse pull", "sparse push+pull")],
         "keys/s", f"sparse, {plan['sparse_keys']:.0e} random keys of {plan['fill']:.0e}", True),
        (axes[2], [(f"small pull {plan['lat_keys']} keys latency p50", "pull p50"),
                   (f"small pull {plan['lat_keys']} keys latency p99", "pull p99"),
                   (f"small pull {plan['lat_keys']} keys latency p50 ({BUSY})", "p50, busy poll"),
                   (f"small pull_span {plan['lat_keys']} keys latency p50", "span p50")],
         "microseconds (lower is better)", "small-pull round trip", True),
    ]
    series = [(c["name"], kind) for c in cfgs for kind in ("psd", "bare")]
    colors = {"psd": ["#1f77b4", "#2ca02c"], "bare": ["#aec7e8", "#98df8a"]}
    width = 0.8 / max(1, len(series))
    for ax, tests, ylabel, title, log in panels:
        x = np.arange(len(tests))
        for i, (cname, kind) in enumerate(series):
            cfg = next(c for c in cfgs if c["name"] == cname)
            ys = [cfg["rows"].get(t, {}).get(kind) or 0 for t, _ in tests]
            ci = [c["name"] for c in cfgs].index(cname) % 2
            ax.bar(x + (i - (len(series) - 1) / 2) * width, ys, width, label=f"{kind} {cname}",
                   color=colors[kind][ci], edgecolor="black", linewidth=0.4)
        ax.set_xticks(x, [label for _, label in tests])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    if plan["lat_keys"]:
        axes[2].axhline(TARGET_LAT_P50_US, color="red", linestyle="--", linewidth=1, label="p50 target")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"psd vs bare pyzmq on loopback ({plan['mode']} run; medians of {plan.get('rounds', 1)} rounds "
                 f"x {plan['reps']} reps, psd and bare alternating)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (< 60 s)")
    ap.add_argument("--out", default="runs/bench_pushpull", help="output directory (JSON and PNG)")
    ap.add_argument("--configs", default="1x1,2x2",
                    help="comma-separated SERVERSxWORKERS configurations (default 1x1,2x2)")
    ap.add_argument("--budget", type=float, default=None, help="hard time limit in seconds for the whole run")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of psd, psd busy poll and bare, alternating order (default: 3 full, 1 quick)")
    args = ap.parse_args(argv)
    from psd.transport.sockets import tune_malloc
    tune_malloc()  # this process is worker 0 of both kinds: tune it before either runs

    plan = make_plan(args.quick)
    if args.rounds:
        plan["rounds"] = args.rounds
    budget = args.budget or plan["budget"]
    configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    report = {"plan": plan, "configs": [], "host": {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg()}}

    def on_expire(reason: str) -> None:
        report["aborted"] = reason
        finish(report, plan, out, started)

    watchdog = Watchdog(budget, on_expire).start()
    try:
        import zmq
        report["host"]["pyzmq"] = zmq.__version__
        report["host"]["libzmq"] = zmq.zmq_version()
        for S, W in configs:
            name = f"{S}s/{W}w"
            kind_results, errors, timings = {}, {}, {}
            runs = (("psd", run_psd), (f"psd {BUSY}", run_psd_busy), (f"psd {TCP}", run_psd_tcp), ("bare", run_bare))
            for rnd in range(plan["rounds"]):
                # rounds alternate the order: a machine whose speed drifts during the run
                # favours neither side
                for kind, fn in (runs if rnd % 2 == 0 else runs[::-1]):
                    if kind in errors:
                        continue
                    t0 = time.monotonic()
                    print(f"[{time.monotonic() - started:6.1f} s] {name}: {kind}, round {rnd + 1} of "
                          f"{plan['rounds']} ...", file=sys.stderr, flush=True)
                    try:
                        kind_results[kind] = merge_rounds(kind_results.get(kind), fn(S, W, plan))
                    except KeyboardInterrupt:
                        raise
                    except Exception:
                        errors[kind] = traceback.format_exc()
                        print(errors[kind], file=sys.stderr)
                    timings[kind] = timings.get(kind, 0.0) + time.monotonic() - t0
            rows = summarize(kind_results, plan, S)
            prefill = {k: max(w["prefill_s"] for w in v) for k, v in kind_results.items()}
            report["configs"].append({"name": name, "servers": S, "workers": W, "rows": rows,
                                      "errors": errors, "seconds": timings, "prefill_s": prefill,
                                      "raw": {k: [{"w": w["w"], "tests": w["tests"]} for w in v]
                                              for k, v in kind_results.items()}})
    finally:
        watchdog.cancel()
        stop_children()
    finish(report, plan, out, started)
    return 1 if report.get("aborted") or any(c.get("errors") for c in report["configs"]) else 0


def finish(report: dict, plan: dict, out: Path, started: float) -> None:
    """Print the table and the target checks; write results.json and throughput.png."""
    with _REPORT_LOCK:
        report["seconds"] = time.monotonic() - started
        report["host"]["loadavg_after"] = os.getloadavg()
        print()
        print(f"psd push/pull benchmark, {plan['mode']} mode, {report['host']['cpus']} CPUs, "
              f"pyzmq {report['host'].get('pyzmq')} / libzmq {report['host'].get('libzmq')}; "
              f"throughput = median of {plan['rounds']} rounds x {plan['reps']} reps, psd and bare "
              f"alternating; MB = 1e6 B (pushed + pulled); "
              f"op = push+wait+pull; psd/bare > 1 is better for rates, worse for latency")
        print("psd runs with security: none here, as plaintext as the bare pyzmq baseline; "
              "the cost of CurveZMQ (on by default) is measured by scripts/bench_security.py")
        before = report["host"]["loadavg_before"][0]
        print(f"load average (1 min) before the run: {before:.2f}, after: {report['host']['loadavg_after'][0]:.2f}"
              + ("  -- WARNING: something else was using the CPUs; figures are noisy" if before > 0.5 else ""))
        if report.get("aborted"):
            print(f"!! run aborted ({report['aborted']}): only the configurations that finished are shown")
        print()
        print_table(report)
        print()
        print_shm(report, plan)
        checks = check_targets(report, plan)
        report["targets"] = checks
        for c in checks:
            verdict = "info" if c.get("info") else "PASS" if c["pass"] else "FAIL"
            print(f"{verdict:<4}  [{c['config']}] {c['target']}: {c['shown']}")
        for cfg in report["configs"]:
            pf = ", ".join(f"{k} {v:.2f} s" for k, v in cfg["prefill_s"].items())
            print(f"({cfg['name']}: pre-fill of {plan['fill']:.0e} keys took {pf})")
        (out / "results.json").write_text(json.dumps(report, indent=1, default=float))
        if report["configs"]:
            plot(report, out / "throughput.png")
        print(f"\nwrote {out / 'results.json'}"
              + (f" and {out / 'throughput.png'}" if report["configs"] else "")
              + f" in {report['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; child processes stopped", file=sys.stderr)
        sys.exit(130)

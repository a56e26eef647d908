#!/usr/bin/env python
"""Failover benchmark: write throughput over time across a SIGKILL, and the cost of
replication.

    .venv/bin/python scripts/bench_failover.py            # full run, about 90 s
    .venv/bin/python scripts/bench_failover.py --quick    # about 60 s

Part 1, failover timeline. A ``psd.LocalCluster`` of 3 servers with replication 2 and
default heartbeat settings (interval 0.1 s, 4 misses: suspect after 0.4 s of silence,
dead after 0.8 s). Worker processes (multiprocessing "spawn", asyncio API) push
without pause (up to ``--window`` pushes in flight each) for ``--duration`` seconds:
each push adds 1 to ``--keys`` random keys of a fixed pool, into an int64 table
(pre-filled with zeros, so no push pays for a key's first touch). ``--kill-at``
seconds in, one server gets SIGKILL. Every ack is timestamped. Printed:

* the longest write stall: the longest time without any ack, among gaps that overlap
  the interval from the kill until full replication is back;
* when the scheduler declared the server dead, and the time to restore full
  replication: from the kill until ``psd status`` shows no ring change under way, the
  dead server in no range, and every range on 2 servers again;
* throughput before and after, and whether every key holds exactly the number of acked
  pushes that touched it (none lost, none doubled).

A PNG of throughput over time (``--bin`` ms bins) marks the kill, the death and the
restore. Part 2, the cost of replication: the same push stream, now ``--cost-keys``
(1e4) random keys of a pre-filled pool per push, into an int64 and a float32 table, on 3
servers at replication 1, 2 and 3; pushes/s and keys/s with ratios to replication 1.

Results: tables on stdout, ``results.json`` and ``failover_throughput.png`` in ``--out``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

TOP = 2**64 - 1


def key_pool(size: int, seed: int = 2024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pool = np.unique(rng.integers(0, TOP, size=size, dtype=np.uint64, endpoint=True))
    return pool


# -- worker processes -------------------------------------------------------------
async def _stream(scheduler: str, w: int, job: dict) -> dict:
    """Push until ``job['stop_at']`` (wall clock), starting at ``job['start_at']``."""
    import psd

    pool = key_pool(job["pool"], job["pool_seed"])
    rng = np.random.default_rng([job["seed"], w])
    kv = await psd.aio.connect(scheduler)
    try:
        table = await kv.table(job["table"], dtype=job["dtype"], updater="sum")
        n = job["keys"]
        if job["cycle"]:  # a few fixed key sets, reused: no key generation in the loop
            sets = [np.sort(rng.choice(pool, size=n, replace=False)) for _ in range(8)]
        values = np.ones((n, 1), dtype=job["dtype"])
        acked_i: list[int] = []
        acked_t: list[float] = []
        failed: list[str] = []
        slots = asyncio.Semaphore(job["window"])
        running: set[asyncio.Task] = set()

        async def one(i: int, ts: int) -> None:
            try:
                await kv.wait(ts)
                acked_t.append(time.time())
                acked_i.append(i)
            except Exception as e:
                failed.append(f"push {i}: {type(e).__name__}: {e}")
            finally:
                slots.release()

        await asyncio.sleep(max(0.0, job["start_at"] - time.time()))
        i = 0
        while time.time() < job["stop_at"]:
            await slots.acquire()
            keys = (sets[i % len(sets)] if job["cycle"] else
                    np.unique(pool[np.random.default_rng([job["seed"], w, i]).integers(0, pool.size, n)]))
            vals = values if keys.size == n else np.ones((keys.size, 1), dtype=job["dtype"])
            task = asyncio.ensure_future(one(i, table.push(keys, vals)))
            running.add(task)
            task.add_done_callback(running.discard)
            i += 1
        if running:
            await asyncio.wait(set(running), timeout=60)
        return {"w": w, "issued": i, "acked_i": acked_i, "acked_t": acked_t, "failed": failed,
                "unfinished": i - len(acked_i) - len(failed)}
    finally:
        await kv.close()


def worker_entry(scheduler: str, w: int, job: dict, queue, parent_pid: int) -> None:
    bc.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        queue.put(asyncio.run(_stream(scheduler, w, job)))
    except BaseException:
        queue.put({"w": w, "error": traceback.format_exc()})


def start_workers(scheduler: str, workers: int, job: dict):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker_entry, args=(scheduler, w, job, queue, os.getpid()), daemon=True,
                         name=f"bench-failover-w{w}") for w in range(workers)]
    for p in procs:
        p.start()
    return procs, queue


def collect(procs, queue, timeout: float) -> list[dict]:
    out = []
    try:
        for _ in procs:
            r = queue.get(timeout=timeout)
            if "error" in r:
                raise RuntimeError(f"worker {r['w']} failed:\n{r['error']}")
            out.append(r)
    finally:
        for p in procs:
            p.join(5)
            bc.stop_process(p)
    return sorted(out, key=lambda r: r["w"])


# -- part 1: failover timeline ----------------------------------------------------------
def ring_restored(st: dict, victim: str, replication: int) -> bool:
    return (not st["ring_changing"] and all(victim not in r["owners"] for r in st["ranges"])
            and all(len(r["owners"]) == replication for r in st["ranges"]))


def run_failover(args) -> dict:
    import psd

    replication = 2
    with psd.LocalCluster(servers=3, replication=replication) as cluster:
        prefill(cluster, "bf_i64", "int64", key_pool(args.pool, 2024))  # steady state: no first touch
        start_at = time.time() + 4.0  # spawned workers need a moment to import and connect
        job = {"table": "bf_i64", "dtype": "int64", "keys": args.keys, "pool": args.pool, "pool_seed": 2024,
               "seed": 7, "window": args.window, "cycle": False, "start_at": start_at,
               "stop_at": start_at + args.duration}
        procs, queue = start_workers(cluster.scheduler, args.workers, job)
        try:
            victim = cluster.node_id(1)
            time.sleep(max(0.0, start_at + args.kill_at - time.time()))
            t_kill = time.time()
            cluster.kill_server(1)
            t_dead = t_restored = None
            ring_before = ring_after = None
            deadline = time.monotonic() + 30
            while t_restored is None and time.monotonic() < deadline:
                st = cluster.status()
                now = time.time()
                ring_before = ring_before or st["ring_version"]
                state = next(n["state"] for n in st["nodes"] if n["id"] == victim)
                if t_dead is None and state == "dead":
                    t_dead = now
                if ring_restored(st, victim, replication):
                    t_restored, ring_after = now, st["ring_version"]
                time.sleep(0.01)
            results = collect(procs, queue, timeout=args.duration + 90)
        finally:
            for p in procs:
                bc.stop_process(p)
        exact, detail = verify(cluster, job, results)
    times = np.sort(np.concatenate([np.asarray(r["acked_t"]) for r in results]))
    return {"start": start_at, "t_kill": t_kill, "t_dead": t_dead, "t_restored": t_restored,
            "victim": victim, "ring_before": ring_before, "ring_after": ring_after,
            "acks": times.tolist(), "issued": sum(r["issued"] for r in results),
            "acked": int(times.size), "failed": sum(len(r["failed"]) for r in results),
            "failures": [f for r in results for f in r["failed"]][:5],
            "unfinished": sum(r["unfinished"] for r in results), "exact": exact, "exact_detail": detail,
            "job": job}


def verify(cluster, job: dict, results: list[dict]) -> tuple[bool, str]:
    """Every pool key holds the number of acked pushes that touched it."""
    import psd

    pool = key_pool(job["pool"], job["pool_seed"])
    want = np.zeros(pool.size, dtype=np.int64)
    for r in results:
        for i in r["acked_i"]:
            idx = np.unique(np.random.default_rng([job["seed"], r["w"], i]).integers(0, pool.size, job["keys"]))
            want[idx] += 1
    with psd.connect(cluster.scheduler) as kv:
        t = kv.table(job["table"], dtype=job["dtype"], updater="sum")
        got = np.concatenate([t.pull(pool[i:i + 50000]) for i in range(0, pool.size, 50000)])[:, 0]
    bad = np.flatnonzero(got != want)
    if bad.size == 0:
        return True, f"all {pool.size} keys exact"
    return False, (f"{bad.size} of {pool.size} keys differ (sum of differences {int((got - want)[bad].sum())}), "
                   f"e.g. key {int(pool[bad[0]])}: {int(got[bad[0]])} != {int(want[bad[0]])}")


def stall_stats(res: dict) -> dict:
    acks = np.asarray(res["acks"])
    t_kill = res["t_kill"]
    t_end = res["t_restored"] or t_kill + 5.0
    gaps_lo, gaps_hi = acks[:-1], acks[1:]
    overlap = (gaps_hi >= t_kill) & (gaps_lo <= t_end)
    if overlap.any():
        j = int(np.argmax(np.where(overlap, gaps_hi - gaps_lo, -1)))
        stall, stall_from, stall_to = float(gaps_hi[j] - gaps_lo[j]), float(gaps_lo[j]), float(gaps_hi[j])
    else:
        stall = stall_from = stall_to = float("nan")
    before = acks[(acks >= res["start"] + 0.5) & (acks < t_kill)]
    after_from = res["t_restored"] or t_end
    after = acks[acks >= after_from + 0.5]
    span_before = max(1e-9, t_kill - (res["start"] + 0.5))
    span_after = max(1e-9, (acks[-1] if acks.size else after_from) - (after_from + 0.5))
    return {"stall_s": stall, "stall_from_kill_s": stall_from - t_kill, "stall_to_kill_s": stall_to - t_kill,
            "dead_after_s": (res["t_dead"] - t_kill) if res["t_dead"] else None,
            "restored_after_s": (res["t_restored"] - t_kill) if res["t_restored"] else None,
            "rate_before": before.size / span_before, "rate_after": after.size / span_after}


def plot_timeline(res: dict, stats: dict, bin_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acks = np.asarray(res["acks"]) - res["start"]
    width = bin_ms / 1000.0
    end = max(acks.max() if acks.size else 0.0, res["job"]["stop_at"] - res["start"])
    edges = np.arange(0.0, end + width, width)
    counts, _ = np.histogram(acks, bins=edges)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.step(edges[:-1], counts / width, where="post", color="#1f77b4", linewidth=1.0,
            label=f"acked pushes/s ({bin_ms:.0f} ms bins)")
    marks = [(res["t_kill"], "red", "SIGKILL"), (res["t_dead"], "orange", "declared dead"),
             (res["t_restored"], "green", "replication restored")]
    for t, color, label in marks:
        if t:
            ax.axvline(t - res["start"], color=color, linestyle="--", linewidth=1.2,
                       label=f"{label} (+{t - res['t_kill']:.2f} s)" if t != res["t_kill"] else label)
    if np.isfinite(stats["stall_s"]):
        ax.axvspan(stats["stall_from_kill_s"] + res["t_kill"] - res["start"],
                   stats["stall_to_kill_s"] + res["t_kill"] - res["start"], color="red", alpha=0.12,
                   label=f"longest write stall {stats['stall_s']:.2f} s")
    j = res["job"]
    ax.set_xlabel("seconds since the stream started")
    ax.set_ylabel("acked pushes / s")
    ax.set_title(f"psd write throughput across a SIGKILL: 3 servers, replication 2, {res['acked']} acked pushes "
                 f"of {j['keys']} keys (int64)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- part 2: cost of replication -------------------------------------------------------
def prefill(cluster, table: str, dtype: str, pool: np.ndarray) -> None:
    import psd

    with psd.connect(cluster.scheduler) as kv:
        t = kv.table(table, dtype=dtype, updater="sum")
        for i in range(0, pool.size, 50000):
            chunk = pool[i:i + 50000]
            kv.wait(t.push(chunk, np.zeros((chunk.size, 1), dtype=dtype)))


def run_cost(args) -> list[dict]:
    import psd

    rows = []
    for replication in (1, 2, 3):
        with psd.LocalCluster(servers=3, replication=replication) as cluster:
            for dtype in ("int64", "float32"):
                table = f"cost_{dtype}"
                prefill(cluster, table, dtype, key_pool(args.cost_pool, seed=99))
                start_at = time.time() + 3.0
                job = {"table": table, "dtype": dtype, "keys": args.cost_keys, "pool": args.cost_pool,
                       "pool_seed": 99, "seed": 99, "window": args.cost_window, "cycle": True, "start_at": start_at,
                       "stop_at": start_at + args.cost_duration}
                procs, queue = start_workers(cluster.scheduler, args.workers, job)
                results = collect(procs, queue, timeout=args.cost_duration + 90)
                acks = np.sort(np.concatenate([np.asarray(r["acked_t"]) for r in results]))
                # rate over the steady part: from the first ack to the stop time
                window = [t for t in acks if t <= job["stop_at"]]
                span = job["stop_at"] - (window[0] if window else start_at)
                pushes = len(window) / span if span > 0 else 0.0
                failed = sum(len(r["failed"]) for r in results)
                rows.append({"replication": replication, "dtype": dtype, "pushes_per_s": pushes,
                             "keys_per_s": pushes * args.cost_keys, "failed": failed,
                             "acked": int(acks.size)})
                print(f"  replication {replication} {dtype}: {pushes:,.0f} pushes/s", file=sys.stderr, flush=True)
    base = {r["dtype"]: r["pushes_per_s"] for r in rows if r["replication"] == 1}
    for r in rows:
        r["vs_r1"] = r["pushes_per_s"] / base[r["dtype"]] if base.get(r["dtype"]) else None
    return rows


# -- reporting ---------------------------------------------------------------------------
def print_report(res: dict, stats: dict, cost: list[dict], args) -> None:
    def s(x):
        return "-" if x is None else f"{x:.2f} s"

    print()
    print(f"failover: 3 servers, replication 2, {args.workers} worker process(es), window {args.window}, "
          f"{args.keys}-key int64 pushes, SIGKILL of {res['victim']} at +{args.kill_at:.1f} s of a "
          f"{args.duration:.0f} s stream")
    print("| measure | value |")
    print("|---|---|")
    print(f"| longest write stall (no ack at all) | {stats['stall_s']:.3f} s "
          f"(from +{stats['stall_from_kill_s']:.2f} s to +{stats['stall_to_kill_s']:.2f} s after the kill) |")
    print(f"| declared dead after | {s(stats['dead_after_s'])} |")
    print(f"| full replication restored after (ring v{res['ring_before']} -> v{res['ring_after']}) | "
          f"{s(stats['restored_after_s'])} |")
    print(f"| throughput before the kill | {stats['rate_before']:,.0f} pushes/s "
          f"({stats['rate_before'] * args.keys:,.0f} keys/s) |")
    print(f"| throughput after the restore | {stats['rate_after']:,.0f} pushes/s "
          f"({stats['rate_after'] * args.keys:,.0f} keys/s) |")
    print(f"| pushes issued / acked / failed / unfinished | {res['issued']} / {res['acked']} / {res['failed']} / "
          f"{res['unfinished']} |")
    print(f"| every key == number of acked pushes on it | {'yes' if res['exact'] else 'NO'}: "
          f"{res['exact_detail']} |")
    target = "met" if stats["stall_s"] < 1.0 else "NOT met"
    print(f"target: writes stall < 1 s after a SIGKILL with default settings: {target}")
    if res["failures"]:
        print("failures, first few:", *res["failures"], sep="\n  ")
    print()
    print(f"cost of replication: 3 servers, {args.workers} worker process(es), window {args.cost_window}, "
          f"pushes of {args.cost_keys:,} random keys of a pre-filled pool of {args.cost_pool:,}, "
          f"{args.cost_duration:.0f} s per row")
    print("| replication | dtype | pushes/s | keys/s | vs replication 1 | failed |")
    print("|---|---|---|---|---|---|")
    for r in cost:
        print(f"| {r['replication']} | {r['dtype']} | {r['pushes_per_s']:,.1f} | {r['keys_per_s']:,.0f} | "
              f"{r['vs_r1']:.2f}x | {r['failed']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter streams (about a minute in all)")
    ap.add_argument("--out", default="runs/bench_failover", help="output folder (JSON and PNG)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    ap.add_argument("--duration", type=float, default=None, help="failover stream length, s (10; quick 6)")
    ap.add_argument("--kill-at", type=float, default=3.0, help="SIGKILL this many seconds into the stream")
    ap.add_argument("--keys", type=int, default=100, help="keys per push in the failover stream")
    ap.add_argument("--pool", type=int, default=20000, help="key pool of the failover stream")
    ap.add_argument("--window", type=int, default=8, help="pushes in flight per worker")
    ap.add_argument("--bin", type=float, default=None, help="throughput bin in ms (100; quick 50)")
    ap.add_argument("--cost-keys", type=int, default=10000, help="keys per push in the replication-cost runs")
    ap.add_argument("--cost-pool", type=int, default=200000, help="pre-filled key pool of the cost runs")
    ap.add_argument("--cost-window", type=int, default=4, help="pushes in flight per worker (cost runs)")
    ap.add_argument("--cost-duration", type=float, default=None, help="seconds per cost row (5; quick 2)")
    args = ap.parse_args(argv)
    args.duration = args.duration or (6.0 if args.quick else 10.0)
    args.bin = args.bin or (50.0 if args.quick else 100.0)
    args.cost_duration = args.cost_duration or (2.0 if args.quick else 5.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    print("part 1: failover timeline ...", file=sys.stderr, flush=True)
    res = run_failover(args)
    stats = stall_stats(res)
    plot_timeline(res, stats, args.bin, out / "failover_throughput.png")
    print(f"part 2: cost of replication ... ({time.monotonic() - started:.0f} s so far)", file=sys.stderr, flush=True)
    cost = run_cost(args)
    print_report(res, stats, cost, args)
    report = {"args": vars(args), "failover": {k: v for k, v in res.items() if k != "acks"}, "stall": stats,
              "cost": cost, "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                      "machine": platform.machine(), "load_avg": os.getloadavg()},
              "wall_s": time.monotonic() - started}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwrote {out / 'results.json'} and {out / 'failover_throughput.png'} "
          f"({time.monotonic() - started:.0f} s)")
    return 0 if res["exact"] and res["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

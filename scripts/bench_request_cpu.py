#!/usr/bin/env python
"""CPU per request: psd against the bare pyzmq baseline, side by side in one run.

    .venv/bin/python scripts/bench_request_cpu.py            # about a minute
    .venv/bin/python scripts/bench_request_cpu.py --quick    # a few seconds

On a machine other work shares, round trips per second measure the scheduler as much
as psd; the CPU a round trip costs does not. This runs the dense cells of
``scripts/bench_pushpull.py`` (``kv.wait(t.push_span(lo, v))`` then
``t.pull_span(lo, n)``; the bare client: the same bytes to a pyzmq ROUTER echo in its
own process) and reads, from ``/proc/PID/task/*/schedstat``, the nanoseconds every
thread of the client (this process) and of the server spent on a CPU. It prints per
size and side: CPU microseconds per round trip, client and server, and round trips per
second; then psd/bare ratios. Repetitions alternate psd and bare; figures are medians.
``security: none`` (plaintext, like the baseline), and ``adaptive_poll_us: 0``: a server
that spins for the next request after answering one (the default, 300 us) would count
that spin as the request's CPU. Loopback only.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402


def cpu_ns(pid: int) -> int:
    """Nanoseconds all threads of ``pid`` have run (the first field of schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # (a thread that ended meanwhile)
    return total


def measure(op, iters: int, server_pid: int) -> dict:
    me = os.getpid()
    c0, s0, t0 = cpu_ns(me), cpu_ns(server_pid), time.perf_counter()
    for _ in range(iters):
        op()
    t1, c1, s1 = time.perf_counter(), cpu_ns(me), cpu_ns(server_pid)
    return {"client_us": (c1 - c0) / iters / 1e3, "server_us": (s1 - s0) / iters / 1e3,
            "per_s": iters / (t1 - t0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="1000,100000")
    args = ap.parse_args()
    import psd

    sizes = [int(x) for x in args.sizes.split(",")]
    iters = {n: (300 if args.quick else 2000) if n <= 10_000 else (60 if args.quick else 400) for n in sizes}
    reps = 2 if args.quick else 5
    from psd.transport.sockets import tune_malloc
    tune_malloc()
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    bare_proc = ctx.Process(target=bc.bare_server_main, args=(there, os.getpid()), daemon=True)
    bare_proc.start()
    bare_addr = here.recv()
    bare = bc.BareClient([bare_addr])
    results: dict = {(side, n): [] for side in ("psd", "bare") for n in sizes}
    with psd.LocalCluster(servers=1, security="none", adaptive_poll_us=0) as cluster:
        kv = psd.connect(cluster.scheduler, psd.ClusterConfig(security="none"))
        t = kv.table("cpu", width=1, dtype="float32", updater="sum")
        server_pid = cluster.servers[0].proc.pid
        try:
            for n in sizes:
                v = np.ones(n, dtype=np.float32)

                def psd_op(v=v, n=n):
                    kv.wait(t.push_span(0, v))
                    return t.pull_span(0, n)
                before = t.pull_span(0, n).ravel().copy()
                if not np.array_equal(psd_op().ravel(), before + v):
                    raise AssertionError(f"psd returned wrong values for dense {n}")
                push = [(0, [memoryview(v)], 0)]
                pull = [(0, [], v.nbytes)]

                def bare_op():
                    bare.roundtrip(push)
                    return bare.roundtrip(pull)
                for _ in range(50):  # warm both
                    psd_op()
                    bare_op()
                for rep in range(reps):
                    order = (("psd", psd_op, server_pid), ("bare", bare_op, bare_proc.pid))
                    for side, op, pid in (order if rep % 2 == 0 else order[::-1]):
                        results[(side, n)].append(measure(op, iters[n], pid))
                print(f"  dense {n} done", file=sys.stderr, flush=True)
        finally:
            kv.close()
            bare.close()
            bc.stop_bare_server(bare_addr)
            bc.stop_process(bare_proc)
    print(f"\nCPU per dense push+pull round trip (push, wait, pull), 1 server, 1 client, security none; median of "
          f"{reps} repetitions, psd and bare alternating; load average (1 min) {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs\n")
    head = ["size", "side", "client us", "server us", "total us", "round trips/s"]
    rows = []
    for n in sizes:
        med = {}
        for side in ("psd", "bare"):
            runs = results[(side, n)]
            med[side] = {k: statistics.median(r[k] for r in runs) for k in ("client_us", "server_us", "per_s")}
            m = med[side]
            rows.append([f"{n:.0e}", side, f"{m['client_us']:.1f}", f"{m['server_us']:.1f}",
                         f"{m['client_us'] + m['server_us']:.1f}", f"{m['per_s']:.0f}"])
        p, b = med["psd"], med["bare"]
        rows.append([f"{n:.0e}", "bare/psd", f"{b['client_us'] / p['client_us']:.2f}",
                     f"{b['server_us'] / p['server_us']:.2f}",
                     f"{(b['client_us'] + b['server_us']) / (p['client_us'] + p['server_us']):.2f}",
                     f"{p['per_s'] / b['per_s']:.2f} (psd/bare)"])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))
    print("\nbare/psd of CPU: the share of psd's CPU per round trip that bare pyzmq needs for the same bytes "
          "(1.0 = no overhead); the round-trips ratio is psd/bare")
    return 0


if __name__ == "__main__":
    sys.exit(main())

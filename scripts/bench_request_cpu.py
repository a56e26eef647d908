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
that spin as the request's CPU. Each psd side runs in a child process of its own (its
cluster and client), driven over a pipe; ``--base-tree DIR`` adds a second psd side
from another source tree (``git worktree add --detach /tmp/base main``), so a change is
measured against its base side by side in one run. Loopback only.
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


def psd_child() -> int:
    """``--child``: one psd cluster and client in this process (psd from PYTHONPATH);
    reads ``N ITERS`` lines on stdin, answers each with a JSON line of ``measure``."""
    import json

    import psd
    from psd.transport.sockets import tune_malloc
    tune_malloc()
    with psd.LocalCluster(servers=1, security="none", adaptive_poll_us=0) as cluster:
        kv = psd.connect(cluster.scheduler, psd.ClusterConfig(security="none"))
        t = kv.table("cpu", width=1, dtype="float32", updater="sum")
        server_pid = cluster.servers[0].proc.pid
        ops = {}
        try:
            print(json.dumps({"ready": True}), flush=True)
            for line in sys.stdin:
                n, iters = (int(x) for x in line.split())
                if n not in ops:
                    v = np.ones(n, dtype=np.float32)

                    def psd_op(v=v, n=n):
                        kv.wait(t.push_span(0, v))
                        return t.pull_span(0, n)
                    before = t.pull_span(0, n).ravel().copy()
                    if not np.array_equal(psd_op().ravel(), before + v):
                        raise AssertionError(f"psd returned wrong values for dense {n}")
                    for _ in range(50):
                        psd_op()
                    ops[n] = psd_op
                print(json.dumps(measure(ops[n], iters, server_pid)), flush=True)
        finally:
            kv.close()
    return 0


class Side:
    """A psd tree's child (``psd_child``) driven over its stdin and stdout."""

    def __init__(self, tree: str):
        import json
        import subprocess

        self.json = json
        env = {**os.environ, "PYTHONPATH": tree}
        self.proc = subprocess.Popen([sys.executable, __file__, "--child"], cwd=tree, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if not self.json.loads(self.proc.stdout.readline()).get("ready"):
            raise RuntimeError(f"the psd child of {tree} did not start")

    def measure(self, n: int, iters: int) -> dict:
        self.proc.stdin.write(f"{n} {iters}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the psd child ended")
        return self.json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--base-tree", default=None,
                    help="also measure the psd of this source tree (a git worktree of main, say), "
                         "alternating with this one: 'psd base' rows and new/base ratios")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return psd_child()
    here_tree = str(Path(__file__).resolve().parent.parent)
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
    names = ["psd", "bare"] + (["psd base"] if args.base_tree else [])
    results: dict = {(side, n): [] for side in names for n in sizes}
    sides = {"psd": Side(here_tree)}
    try:
        if args.base_tree:
            sides["psd base"] = Side(str(Path(args.base_tree).resolve()))
        for n in sizes:
            v = np.ones(n, dtype=np.float32)
            push = [(0, [memoryview(v)], 0)]
            pull = [(0, [], v.nbytes)]

            def bare_op():
                bare.roundtrip(push)
                return bare.roundtrip(pull)
            for _ in range(50):  # warm
                bare_op()
            for rep in range(reps):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for side in (order if rep % 2 == 0 else order[::-1]):
                    if side == "bare":
                        results[(side, n)].append(measure(bare_op, iters[n], bare_proc.pid))
                    else:
                        results[(side, n)].append(sides[side].measure(n, iters[n]))
            print(f"  dense {n} done", file=sys.stderr, flush=True)
    finally:
        for side in sides.values():
            side.close()
        bare.close()
        bc.stop_bare_server(bare_addr)
        bc.stop_process(bare_proc)
    print(f"\nCPU per dense push+pull round trip (push, wait, pull), 1 server, 1 client, security none; median of "
          f"{reps} repetitions, sides alternating; load average (1 min) {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs\n")
    head = ["size", "side", "client us", "server us", "total us", "round trips/s"]
    rows = []
    for n in sizes:
        med = {}
        for side in names:
            runs = results[(side, n)]
            med[side] = {k: statistics.median(r[k] for r in runs) for k in ("client_us", "server_us", "per_s")}
            m = med[side]
            rows.append([f"{n:.0e}", side, f"{m['client_us']:.1f}", f"{m['server_us']:.1f}",
                         f"{m['client_us'] + m['server_us']:.1f}", f"{m['per_s']:.0f}"])
        for psd_side in [s for s in names if s != "bare"]:
            p, b = med[psd_side], med["bare"]
            rows.append([f"{n:.0e}", f"bare/{psd_side}", f"{b['client_us'] / p['client_us']:.2f}",
                         f"{b['server_us'] / p['server_us']:.2f}",
                         f"{(b['client_us'] + b['server_us']) / (p['client_us'] + p['server_us']):.2f}",
                         f"{p['per_s'] / b['per_s']:.2f} ({psd_side}/bare)"])
        if args.base_tree:
            p, b = med["psd"], med["psd base"]
            rows.append([f"{n:.0e}", "base/psd", f"{b['client_us'] / p['client_us']:.2f}",
                         f"{b['server_us'] / p['server_us']:.2f}",
                         f"{(b['client_us'] + b['server_us']) / (p['client_us'] + p['server_us']):.2f}",
                         f"{p['per_s'] / b['per_s']:.2f} (psd/base)"])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))
    print("\nbare/psd of CPU: the share of psd's CPU per round trip that bare pyzmq needs for the same bytes "
          "(1.0 = no overhead); the round-trips ratio is psd/bare; base/psd: the base tree's CPU over this "
          "tree's (above 1: this tree uses less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

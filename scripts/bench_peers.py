#!/usr/bin/env python
"""Dense push+pull on one host: psd against a Ray-actor and a torch.distributed.rpc
parameter server, in one run.

    .venv/bin/python scripts/bench_peers.py            # dense 1e7 float32, 3 rounds
    .venv/bin/python scripts/bench_peers.py --quick    # dense 1e6, 1 round
    pip install -e '.[bench]'                          # Ray and torch (CPU) for the peers

One cell, the same on every system: a parameter vector of N float32 held by one server
process; the client (this benchmark's child process) pushes N ones, waits until the
server added them, then pulls the N values back. MB/s counts bytes pushed plus bytes
pulled (1 MB = 1e6 B); one op is one push+wait+pull. Each system runs in a fresh child
process, the systems in alternating order each round, so a machine whose speed drifts
favours none; the figure is the median over every repetition of every round.

- **psd**: ``psd.LocalCluster(servers=1)``, ``kv.wait(t.push_span(0, v))`` then
  ``t.pull_span(0, N)`` through ``psd.connect``; with ``security: none`` (plaintext, like
  the peers), with shared memory off (``shm: false``, loopback TCP), and with CurveZMQ
  (the default).
- **Ray actor**: an actor holding a numpy vector; ``ray.get(ps.push.remote(v))`` adds
  ``v`` in place, ``ray.get(ps.pull.remote())`` returns it (Ray passes large objects
  through its shared-memory object store). Skipped with a message when Ray is not
  installed.
- **torch rpc**: ``torch.distributed.rpc`` with a server process holding a tensor;
  ``rpc_sync(push, v)`` adds, ``rpc_sync(pull)`` returns it (TensorPipe). Skipped with a
  message when torch is not installed.

Every system checks once, before timing, that the values it pulls are what it pushed.
Only 127.0.0.1 is used. The whole run is bounded (``--budget``).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

BUDGET = 900.0


# -- the systems, each run in its own child process ----------------------------------------
def run_psd(n: int, reps: int, iters: int, security: str, shm: bool) -> list[float]:
    import psd

    with psd.LocalCluster(servers=1, security=security, shm=shm) as cluster:
        kv = psd.connect(cluster, psd.ClusterConfig(security=security, shm=shm)) if security == "none" \
            else psd.connect(cluster, psd.ClusterConfig(shm=shm))
        try:
            t = kv.table("bench_peers", width=1, dtype="float32")
            v = np.ones(n, dtype=np.float32)

            def op():
                kv.wait(t.push_span(0, v))
                return t.pull_span(0, n)
            return _measure(op, n, reps, iters)
        finally:
            kv.close()


def run_ray(n: int, reps: int, iters: int) -> list[float]:
    # every Ray process on loopback: without this, Ray's workers pick the address of the
    # host's outward interface for themselves
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    class PS:  # (defined here so that Ray ships it by value to its worker processes)
        def __init__(self, n: int):
            self.w = np.zeros(n, dtype=np.float32)

        def push(self, v) -> bool:
            self.w += v
            return True

        def pull(self):
            return self.w

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    try:
        ps = ray.remote(PS).remote(n)
        v = np.ones(n, dtype=np.float32)

        def op():
            ray.get(ps.push.remote(v))
            return ray.get(ps.pull.remote())
        return _measure(op, n, reps, iters)
    finally:
        ray.shutdown()


_TORCH_W = None


def _torch_push(v):
    _TORCH_W.add_(v)
    return True


def _torch_pull():
    return _TORCH_W


def _torch_server(n: int, port: int) -> None:
    global _TORCH_W
    import torch
    import torch.distributed.rpc as rpc

    _TORCH_W = torch.zeros(n, dtype=torch.float32)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rpc.init_rpc("ps", rank=0, world_size=2, rpc_backend_options=_torch_options())
    rpc.shutdown()  # waits for the client's shutdown


def _torch_options():
    import torch.distributed.rpc as rpc
    return rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                                           num_worker_threads=4, rpc_timeout=120)


def run_torch(n: int, reps: int, iters: int) -> list[float]:
    import socket

    import torch
    import torch.distributed.rpc as rpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = mp.get_context("spawn").Process(target=_torch_server, args=(n, port), daemon=True)
    server.start()
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        rpc.init_rpc("client", rank=1, world_size=2, rpc_backend_options=_torch_options())
        v = torch.ones(n, dtype=torch.float32)

        def op():
            rpc.rpc_sync("ps", _torch_push, args=(v,))
            return rpc.rpc_sync("ps", _torch_pull).numpy()
        try:
            return _measure(op, n, reps, iters)
        finally:
            rpc.shutdown()
    finally:
        server.join(30)
        if server.is_alive():
            server.kill()


def _measure(op, n: int, reps: int, iters: int) -> list[float]:
    """Check once that a push+pull adds what was pushed, then time ``reps`` x ``iters``
    ops; returns MB/s of each repetition."""
    before = np.array(op(), copy=True).ravel()
    after = np.asarray(op()).ravel()
    if after.shape != (n,) or not np.array_equal(after, before + 1):
        raise RuntimeError(f"a push+pull of {n} ones did not add one to every value")
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            op()
        rates.append(2 * 4 * n * iters / (time.perf_counter() - t0) / 1e6)
    return rates


SYSTEMS = {
    "psd (security none)": (lambda n, r, i: run_psd(n, r, i, "none", True), "psd"),
    "psd (security none, shm off)": (lambda n, r, i: run_psd(n, r, i, "none", False), "psd"),
    "psd (curve, the default)": (lambda n, r, i: run_psd(n, r, i, "curve", True), "psd"),
    "Ray actor": (run_ray, "ray"),
    "torch.distributed.rpc": (run_torch, "torch"),
}


def _child(name: str, n: int, reps: int, iters: int, queue) -> None:
    try:
        queue.put((name, SYSTEMS[name][0](n, reps, iters), None))
    except BaseException:
        queue.put((name, None, traceback.format_exc()))


def available(module: str) -> str | None:
    """None if ``module`` imports, else why not."""
    try:
        __import__(module)
        return None
    except Exception as e:
        return f"{module} is not installed ({type(e).__name__}); pip install -e '.[bench]' adds it"


def run_one(name: str, n: int, reps: int, iters: int, timeout: float):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(name, n, reps, iters, queue), name=f"bench-{name}")
    p.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:
        return name, None, f"no result within {timeout:.0f} s"
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="dense 1e6 and one round")
    ap.add_argument("-n", type=float, default=None, help="floats per push (default 1e7; 1e6 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds, systems in alternating order (default 3)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of the systems to run")
    ap.add_argument("--out", default="runs/bench_peers", help="output folder (results.json, peers.png)")
    ap.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole run")
    ap.add_argument("--iters", type=int, default=None,
                    help="push+pull rounds per repetition (default 5, 3 above 1e6; small requests need hundreds)")
    args = ap.parse_args(argv)
    n = int(args.n or (1e6 if args.quick else 1e7))
    rounds = args.rounds or (1 if args.quick else 3)
    reps, iters = (3, 5) if n <= 1e6 else (5, 3)
    iters = args.iters or iters
    names = [s for s in SYSTEMS if args.only is None or any(o.strip() in s for o in args.only.split(","))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.budget
    results: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    load = os.getloadavg()[0]
    for rnd in range(rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            if name in skipped:
                continue
            why = available(SYSTEMS[name][1])
            if why is not None:
                skipped[name] = why
                continue
            left = deadline - time.monotonic()
            if left < 30:
                skipped.setdefault(name, "the run's budget was spent")
                continue
            print(f"[{time.monotonic() - started:6.1f} s] {name}, round {rnd + 1} of {rounds} ...",
                  file=sys.stderr, flush=True)
            _, rates, err = run_one(name, n, reps, iters, left)
            if err is not None:
                skipped[name] = "failed: " + err.strip().splitlines()[-1][:200]
                print(err, file=sys.stderr)
                continue
            results.setdefault(name, []).extend(rates)
    base = "psd (security none)"
    psd_rate = float(np.median(results[base])) if base in results else None
    print()
    print(f"dense {n:.0e} float32 push+pull on one host, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"MB/s = (bytes pushed + pulled) / s, median of {rounds} round(s) x {reps} reps x {iters} ops")
    print(f"load average (1 min) before: {load:.2f}, after: {os.getloadavg()[0]:.2f}"
          + ("  -- WARNING: the machine was busy; compare ratios only" if load > 0.5 else ""))
    print()
    header = ("system", "MB/s median", "MB/s best", f"psd / system")
    rows = []
    for name in names:
        if name in results:
            med, best = float(np.median(results[name])), max(results[name])
            ratio = f"{psd_rate / med:.2f}" if psd_rate else "-"
            rows.append((name, f"{med:,.0f}", f"{best:,.0f}", ratio))
        else:
            rows.append((name, "skipped", "", skipped.get(name, "")))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(3)]
    for r in (header, tuple("-" * w for w in widths) + ("-" * 12,), *rows):
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    report = {"n": n, "rounds": rounds, "reps": reps, "iters": iters, "rates_mb_s": results, "skipped": skipped,
              "loadavg_before": load, "cpus": os.cpu_count()}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    _plot(report, out / "peers.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'peers.png'} in {time.monotonic() - started:.0f} s")
    return 0 if base in results else 1


def _plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(report["rates_mb_s"])
    if not names:
        return
    meds = [float(np.median(report["rates_mb_s"][k])) for k in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(names, meds, color=["#1f77b4" if k.startswith("psd") else "#ff7f0e" for k in names])
    ax.set_xlabel("MB/s, pushed + pulled (median)")
    ax.set_title(f"dense {report['n']:.0e} float32 push+pull, one host")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

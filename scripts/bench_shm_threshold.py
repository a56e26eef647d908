#!/usr/bin/env python
"""Where shared memory starts to pay: dense push+pull of growing sizes, shared memory
for every payload frame (``shm_min_bytes: 4096``) against none (``shm: false``).

    .venv/bin/python scripts/bench_shm_threshold.py [--rounds 3]

One server and this process as the worker, ``security: none``; for each payload size
(64 KiB .. 16 MiB of float32) it times ``kv.wait(t.push_span(0, v))`` then
``t.pull_span(0, n)``; the two clusters run in alternating order each round, and the
figure is the median op time over all rounds. The ratio tcp / shm > 1 means shared
memory is faster at that size: ``shm_min_bytes`` (default 1 MiB) is picked from it
(docs/performance.md, "Shared memory").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

SIZES = [64 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20, 16 << 20]


def run(shm: bool, sizes: list[int], iters: int) -> dict[int, list[float]]:
    import psd

    settings = dict(security="none", shm=shm, shm_min_bytes=4096)
    with psd.LocalCluster(servers=1, **settings) as cluster:
        kv = psd.connect(cluster, psd.ClusterConfig(**settings))
        try:
            t = kv.table("threshold", width=1, dtype="float32")
            out = {}
            for nbytes in sizes:
                n = nbytes // 4
                v = np.ones(n, dtype=np.float32)
                for _ in range(3):  # warm: connections, the handshake, segments
                    kv.wait(t.push_span(0, v))
                    t.pull_span(0, n)
                times = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    kv.wait(t.push_span(0, v))
                    t.pull_span(0, n)
                    times.append(time.perf_counter() - t0)
                out[nbytes] = times
            if shm:
                used = sum((rpc.shm_stats() or {}).get("frames_out", 0) for rpc in kv.aio._servers.values())
                assert used > 0, "no frame went through shared memory"
            return out
        finally:
            kv.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    times: dict[bool, dict[int, list[float]]] = {True: {}, False: {}}
    for rnd in range(args.rounds):
        for shm in ((True, False) if rnd % 2 == 0 else (False, True)):
            print(f"round {rnd + 1}: shm {'on' if shm else 'off'} ...", file=sys.stderr, flush=True)
            for size, ts in run(shm, SIZES, args.iters).items():
                times[shm].setdefault(size, []).extend(ts)
    print(f"dense push+pull, 1 server, security none, median op time of {args.rounds} rounds x {args.iters}; "
          f"load average before {load:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"{'payload':>10}  {'shm ms':>8}  {'tcp ms':>8}  {'tcp / shm':>9}")
    for size in SIZES:
        on, off = np.median(times[True][size]) * 1e3, np.median(times[False][size]) * 1e3
        label = f"{size >> 10} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
        print(f"{label:>10}  {on:8.3f}  {off:8.3f}  {off / on:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

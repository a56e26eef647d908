#!/usr/bin/env python
"""Messages and time of a full push+pull at replication 2 on 3 servers: one message per
server (decision 97) against one per owner tuple (the old cut), and chained replica
placement against spread (the default), side by side in one run.

    .venv/bin/python scripts/bench_onemsg.py [--sizes 1000,10000,100000,300000] [--reps 30]
                                             [--placement both|spread|chained]
                                             [--png runs/bench_onemsg/onemsg.png]

One ``psd.LocalCluster(servers=3, replication=2, security="none", placement=P)`` and one
blocking worker per placement (both clusters run at once under ``--placement both``).
For each size, ``n`` random uint64 keys spread over the whole key space (so every range
of the ring gets some: 37 ranges at the default 16 vnodes; 6 owner tuples under spread,
3 under chained), pushed once before timing. A repetition is ``kv.wait(t.push(keys, v))``
then ``t.pull(keys)``; the cells (placement x cut) take turns repetition by repetition,
starting from a different cell each time, so a machine whose speed drifts favours none.
The cut is the client's ``core.one_message_per_server`` switch. Messages are the
servers' own counters (``push``, ``pull``, ``replicated`` from each server's
``status``), read before and after each cell's repetitions, divided by the repetitions.
Time: the median repetition, and keys/s counting keys pushed plus keys pulled. The
ratios compare cells of this run (below 1: faster). 300,000 keys (3.6 MB) is a push over
the client's 2 MiB piece size: the old cut sends at least a piece per range, the new one
fills pieces across a server's ranges. Loopback, one machine: ratios only.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psd  # noqa: E402
from _bench_common import server_status  # noqa: E402

CUTS = (("per server", True), ("per owner tuple", False))
PLACEMENTS = ("spread", "chained")
COUNTERS = ("push", "pull", "replicated")


def counters(addresses: list[str]) -> dict[str, int]:
    """The sum over the servers of COUNTERS, read off each server's data socket."""
    total = dict.fromkeys(COUNTERS, 0)
    for address in addresses:
        got = server_status(address)["counters"]
        for name in COUNTERS:
            total[name] += got[name]
    return total


def measure(clients: dict[str, tuple], n: int, reps: int, seed: int) -> dict[tuple[str, str], dict]:
    """``clients``: placement -> (kv, server addresses). The cells of every placement and
    cut take turns; returns (placement, cut) -> messages per repetition and time."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64))
    vals = np.ones((keys.size, 1), np.float32)
    tables = {}
    for placement, (kv, _addresses) in clients.items():
        tables[placement] = kv.table(f"w{n}", width=1, dtype="float32", updater="sum")
        kv.wait(tables[placement].push(keys, vals))  # every key stored: the timed pushes insert nothing
    cells = [(placement, cut, per_server) for placement in clients for cut, per_server in CUTS]
    times: dict[tuple, list[float]] = {c[:2]: [] for c in cells}
    msgs: dict[tuple, dict[str, int]] = {c[:2]: dict.fromkeys(COUNTERS, 0) for c in cells}
    for rep in range(reps + 2):  # (the first two of each cell: warm-up, not timed)
        turn = rep % len(cells)
        for placement, cut, per_server in cells[turn:] + cells[:turn]:
            kv, addresses = clients[placement]
            t = tables[placement]
            kv.aio.core.one_message_per_server = per_server
            before = counters(addresses) if rep >= 2 else None
            started = time.perf_counter()
            kv.wait(t.push(keys, vals))
            got = t.pull(keys)
            took = time.perf_counter() - started
            if rep >= 2:
                after = counters(addresses)
                for c in COUNTERS:
                    msgs[placement, cut][c] += after[c] - before[c]
                times[placement, cut].append(took)
    for placement, (kv, _addresses) in clients.items():
        kv.aio.core.one_message_per_server = True
        got = tables[placement].pull(keys)
        if not np.array_equal(got, vals * (len(CUTS) * (reps + 2) + 1)):
            raise SystemExit(f"n={n}, {placement}: pulled values differ from what was pushed")
    out = {}
    for cell in times:
        med = statistics.median(times[cell])
        out[cell] = {"ms": med * 1e3, "keys_per_s": 2 * keys.size / med,
                     **{c: msgs[cell][c] / reps for c in COUNTERS}}
    return out


def plot(rows: list[tuple[int, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = list(rows[0][1])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(rows))
    width = 0.8 / len(cells)
    for i, cell in enumerate(cells):
        ax.bar(x + (i - (len(cells) - 1) / 2) * width, [r[cell]["ms"] for _, r in rows], width,
               label=f"{cell[0]}, {cell[1]}")
    ax.set_xticks(x, [f"{n:,} keys" for n, _ in rows])
    ax.set_ylabel("ms per push+pull (median)")
    ax.set_yscale("log")
    ax.set_title("full push+pull, replication 2 on 3 servers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,300000", help="keys per request, comma-separated")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions per cell and size")
    ap.add_argument("--placement", choices=("both", *PLACEMENTS), default="both",
                    help="the ring's replica placement: one cluster each, side by side under 'both'")
    ap.add_argument("--png", default="runs/bench_onemsg/onemsg.png", help="bar plot of the times ('' for none)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    placements = PLACEMENTS if args.placement == "both" else (args.placement,)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.reps} repetitions per cell")
    rows = []
    with contextlib.ExitStack() as stack:
        clients = {}
        for placement in placements:
            cluster = stack.enter_context(psd.LocalCluster(servers=3, replication=2, security="none",
                                                           placement=placement))
            addresses = [n["address"] for n in cluster.status()["nodes"] if n["role"] == "server"]
            clients[placement] = (stack.enter_context(psd.connect(cluster)), addresses)
        for i, n in enumerate(sizes):
            rows.append((n, measure(clients, n, args.reps, seed=i)))
    head = (f"{'keys':>8} {'placement':<9} {'cut':<16} {'push msgs':>9} {'forwards':>8} {'pull msgs':>9} "
            f"{'ms':>8} {'keys/s':>10}")
    print(head)
    print("-" * len(head))
    for n, r in rows:
        for (placement, cut), c in r.items():
            print(f"{n:>8} {placement:<9} {cut:<16} {c['push']:>9.1f} {c['replicated']:>8.1f} {c['pull']:>9.1f} "
                  f"{c['ms']:>8.2f} {c['keys_per_s']:>10.3g}")
    for placement in placements:
        print(f"\n{placement}: per server / per owner tuple, same run:")
        for n, r in rows:
            new, old = r[placement, CUTS[0][0]], r[placement, CUTS[1][0]]
            print(f"{n:>8} keys: messages {(new['push'] + new['pull']) / (old['push'] + old['pull']):.2f}, "
                  f"forwards {new['replicated'] / old['replicated']:.2f}, time {new['ms'] / old['ms']:.2f}")
    if len(placements) == 2:
        print("\nchained / spread, per server, same run:")
        for n, r in rows:
            new, old = r["chained", CUTS[0][0]], r["spread", CUTS[0][0]]
            print(f"{n:>8} keys: messages {(new['push'] + new['pull']) / (old['push'] + old['pull']):.2f}, "
                  f"forwards {new['replicated'] / old['replicated']:.2f}, time {new['ms'] / old['ms']:.2f}")
    if args.png:
        plot(rows, Path(args.png))
        print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

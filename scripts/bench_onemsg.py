#!/usr/bin/env python
"""Messages and time of a full push+pull at replication 2 on 3 servers: one message per
server (decision 97) against one per owner tuple (the old cut), side by side in one run.

    .venv/bin/python scripts/bench_onemsg.py [--sizes 1000,10000,100000,300000] [--reps 30]
                                             [--png runs/bench_onemsg/onemsg.png]

One ``psd.LocalCluster(servers=3, replication=2, security="none")`` and one blocking
worker. For each size, ``n`` random uint64 keys spread over the whole key space (so every
range of the ring gets some: 37 ranges, 6 owner tuples at the default 16 vnodes), pushed
once before timing. A repetition is ``kv.wait(t.push(keys, v))`` then ``t.pull(keys)``;
the two cuts alternate repetition by repetition (the client's
``core.one_message_per_server`` switch), so a machine whose speed drifts favours
neither. Messages are the servers' own counters (``push``, ``pull``, ``replicated``
from each server's ``status``), read before and after each cut's repetitions, divided by
the repetitions. Time: the median repetition, and keys/s counting keys pushed plus keys
pulled. The ratio column is per-server / per-owner-tuple time in this run (below 1:
faster). 300,000 keys (3.6 MB) is a push over the client's 2 MiB piece size: the old cut
sends at least a piece per range, the new one fills pieces across a server's ranges.
Loopback, one machine: ratios only.
"""
from __future__ import annotations

import argparse
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
COUNTERS = ("push", "pull", "replicated")


def counters(addresses: list[str]) -> dict[str, int]:
    """The sum over the servers of COUNTERS, read off each server's data socket."""
    total = dict.fromkeys(COUNTERS, 0)
    for address in addresses:
        got = server_status(address)["counters"]
        for name in COUNTERS:
            total[name] += got[name]
    return total


def measure(kv, addresses: list[str], n: int, reps: int, seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64))
    vals = np.ones((keys.size, 1), np.float32)
    t = kv.table(f"w{n}", width=1, dtype="float32", updater="sum")
    kv.wait(t.push(keys, vals))  # every key stored: the timed pushes insert nothing
    times: dict[str, list[float]] = {name: [] for name, _ in CUTS}
    msgs: dict[str, dict[str, int]] = {name: dict.fromkeys(COUNTERS, 0) for name, _ in CUTS}
    for rep in range(reps + 2):  # (the first two of each cut: warm-up, not timed)
        for name, per_server in (CUTS if rep % 2 == 0 else CUTS[::-1]):
            kv.aio.core.one_message_per_server = per_server
            before = counters(addresses) if rep >= 2 else None
            started = time.perf_counter()
            kv.wait(t.push(keys, vals))
            got = t.pull(keys)
            took = time.perf_counter() - started
            if rep >= 2:
                after = counters(addresses)
                for c in COUNTERS:
                    msgs[name][c] += after[c] - before[c]
                times[name].append(took)
    kv.aio.core.one_message_per_server = True
    if not np.array_equal(got, vals * (2 * reps + 5)):  # (1 + 2 cuts x (reps + 2) pushes)
        raise SystemExit(f"n={n}: pulled values differ from what was pushed")
    out = {}
    for name, _ in CUTS:
        med = statistics.median(times[name])
        out[name] = {"ms": med * 1e3, "keys_per_s": 2 * keys.size / med,
                     **{c: msgs[name][c] / reps for c in COUNTERS}}
    return out


def plot(rows: list[tuple[int, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(rows))
    for i, (name, _) in enumerate(CUTS):
        ax.bar(x + (i - 0.5) * 0.4, [r[name]["ms"] for _, r in rows], 0.4, label=name)
    ax.set_xticks(x, [f"{n:,} keys" for n, _ in rows])
    ax.set_ylabel("ms per push+pull (median)")
    ax.set_yscale("log")
    ax.set_title("full push+pull, replication 2 on 3 servers")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,300000", help="keys per request, comma-separated")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions per cut and size")
    ap.add_argument("--png", default="runs/bench_onemsg/onemsg.png", help="bar plot of the times ('' for none)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.reps} repetitions per cell")
    rows = []
    with psd.LocalCluster(servers=3, replication=2, security="none") as cluster:
        addresses = [n["address"] for n in cluster.status()["nodes"] if n["role"] == "server"]
        with psd.connect(cluster) as kv:
            for i, n in enumerate(sizes):
                rows.append((n, measure(kv, addresses, n, args.reps, seed=i)))
    head = f"{'keys':>8} {'cut':<16} {'push msgs':>9} {'forwards':>8} {'pull msgs':>9} {'ms':>8} {'keys/s':>10}"
    print(head)
    print("-" * len(head))
    for n, r in rows:
        for name, _ in CUTS:
            c = r[name]
            print(f"{n:>8} {name:<16} {c['push']:>9.1f} {c['replicated']:>8.1f} {c['pull']:>9.1f} "
                  f"{c['ms']:>8.2f} {c['keys_per_s']:>10.3g}")
    print("\nper server / per owner tuple, same run:")
    for n, r in rows:
        new, old = r[CUTS[0][0]], r[CUTS[1][0]]
        print(f"{n:>8} keys: messages {(new['push'] + new['pull']) / (old['push'] + old['pull']):.2f}, "
              f"forwards {new['replicated'] / old['replicated']:.2f}, time {new['ms'] / old['ms']:.2f}")
    if args.png:
        plot(rows, Path(args.png))
        print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bytes on the wire with and without key caching, zstd and the filters (issue 17), on loopback.

    .venv/bin/python scripts/bench_traffic.py [--iters 20] [--keys 100000] [--workers 2]
                                              [--png traffic.png] [--part keys|job|all]
                                              [--spam .cache/data/prepared/spam]

Part ``job``: the L1 logistic-regression job (``psd run``'s path: a fresh LocalCluster
per row, 2 servers, 2 workers, sequential, generated click-like data; the SpamAssassin
mails too when ``--spam`` names the prepared folder) with stages added in turn: none,
+key caching, +zstd, +kkt, +quantize (float16), +pull filters answering with the rows
that changed only (lossless), +pull filters ``significant`` per column (the weight
exact, the gradient within 0.2 l1, the curvature within 90%) with bfloat16 answers
(decision 115), and kkt alone (no key caching, no zstd: what those two add once kkt
has cut). ``significant`` and ``random_skip``
hold rows back, which the job's aggregating prox_l1 table refuses (it waits for every
worker's part of a key), so they are measured on the repeated-key workload below. Per
row: bytes workers and servers sent (the job's own traffic record), the fraction saved
against the first row, seconds until the objective first came within 1% of the 'none'
row's final objective (wall time in the job's metrics), and the final objective.
Part ``links`` (also in ``all``): the same stages on emulated hosts whose links are
shaped to 1 Gbit/s and 100 Mbit/s (psd.testing.netcluster: network namespaces and tbf;
needs root, and says so and skips otherwise): MB through each host's link and seconds
to the target objective.

Part ``keys``:
A synthetic repeated-key workload, as a batch solver over fixed data shards makes it:
each worker holds the feature keys of its shard (``--keys`` keys drawn from a Zipf-like
distribution over hashed 64-bit ids, so the shards overlap on the frequent ones) and
every iteration pulls the weights of those keys and pushes a gradient for them
(float32, width 1; gradients are sparse-ish: most entries small, many exactly zero,
as a logistic-regression gradient over binary features is). The same workload runs on a
fresh LocalCluster (2 servers, replication 1, security off: loopback only) under four
settings, each its own cluster, in one run: nothing, key caching, zstd, both. For each:
bytes the workers sent and received and the servers sent and received (the servers'
own counters, read from each server's ``status``), after each stage, and the ratios
to the first setting measured in the same run. Loopback only: the time column is not a
link-speed result (on 127.0.0.1 bytes cost almost nothing; see docs/performance.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psd  # noqa: E402
from _bench_common import server_status  # noqa: E402
from psd.codec.traffic import total  # noqa: E402

SETTINGS = [("none", False, "none", None), ("key caching", True, "none", None), ("zstd", False, "zstd", None),
            ("key caching + zstd", True, "zstd", None),
            ("kc + zstd + significant 1e-3", True, "zstd", [{"significant": {"threshold": 1e-3}}]),
            ("... keep_keys", True, "zstd", [{"significant": {"threshold": 1e-3, "keep_keys": True}}]),
            ("kc + zstd + quantize int8", True, "zstd", [{"quantize": {"to": "int8"}}]),
            ("kc + zstd + random_skip 0.5", True, "zstd", [{"random_skip": {"p": 0.5}}])]


def shards(workers: int, n: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(0, 2**63, size=4 * n, dtype=np.uint64))  # the feature vocabulary (hashed ids)
    out = []
    for w in range(workers):
        ranks = np.minimum(rng.zipf(1.3, size=3 * n), ids.size) - 1
        keys = np.unique(ids[ranks])
        if keys.size < n:  # top up with rare features
            rare = np.setdiff1d(ids, keys)
            keys = np.concatenate([keys, rng.choice(rare, n - keys.size, replace=False)])
        out.append(np.sort(rng.choice(keys, n, replace=False)))
    return out


def gradient(rng: np.random.Generator, n: int) -> np.ndarray:
    g = (rng.standard_normal((n, 1)) * 1e-3).astype(np.float32)
    g[rng.random((n, 1)) < 0.5] = 0.0  # features absent from this shard's active rows
    return g


def server_traffic(addresses: list[str]) -> dict:
    snaps = [server_status(address)["traffic"] for address in addresses]
    return total(snaps)


def run(name: str, key_caching: bool, compression: str, filters, keys: list[np.ndarray], iters: int) -> dict:
    with psd.LocalCluster(servers=2, replication=1, security="none", compression=compression) as cluster:
        kvs = [psd.connect(cluster, cluster.config.replace(key_caching=key_caching)) for _ in keys]
        try:
            tables = [kv.table("w", width=1, dtype="float32", updater="sum", filters=filters) for kv in kvs]
            rng = np.random.default_rng(1)
            started = time.perf_counter()
            for _ in range(iters):
                pulls = [t.pull_async(k) for t, k in zip(tables, keys)]
                for kv, ts in zip(kvs, pulls):
                    kv.wait(ts)
                pushes = [t.push(k, gradient(rng, k.size)) for t, k in zip(tables, keys)]
                for kv, ts in zip(kvs, pushes):
                    kv.wait(ts)
            for kv in kvs:
                kv.flush()
            seconds = time.perf_counter() - started
            workers = total(kv.traffic() for kv in kvs)
            workers["sent"]["before_filters"] = workers["sent"]["raw"] + sum(
                kv.traffic()["filters"]["held_back"] for kv in kvs)
            addresses = [n["address"] for n in cluster.status()["nodes"] if n["role"] == "server"]
            servers = server_traffic(addresses)
            final = tables[0].pull(keys[0])
        finally:
            for kv in kvs:
                kv.close()
    return {"name": name, "workers": workers, "servers": servers, "seconds": seconds,
            "checksum": float(np.abs(final.astype(np.float64)).sum()), "final": final}


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--png", default="traffic.png")
    ap.add_argument("--part", choices=("keys", "job", "links", "all"), default="all")
    ap.add_argument("--passes", type=int, default=10, help="passes of the logreg job (parts job and links)")
    ap.add_argument("--examples", type=int, default=50_000, help="generated examples (parts job and links)")
    ap.add_argument("--features", type=int, default=100_000, help="generated features (parts job and links)")
    ap.add_argument("--spam", default=None, help="the prepared SpamAssassin folder (train-*.svm, test.svm)")
    args = ap.parse_args()
    if args.part in ("keys", "all"):
        keys_part(args)
    if args.part in ("job", "all"):
        from job_traffic import job_part  # (scripts/job_traffic.py)
        job_part(args)
    if args.part in ("links", "all"):
        from job_traffic import shaped_part
        shaped_part(args)


def keys_part(args) -> None:
    keys = shards(args.workers, args.keys)
    results = [run(name, kc, comp, flt, keys, args.iters) for name, kc, comp, flt in SETTINGS]
    base = results[0]
    print(f"{args.workers} workers x {args.keys} keys (float32), {args.iters} iterations of pull + push, "
          f"2 servers, replication 1, loopback (127.0.0.1; no link shaping)")
    print("MiB on the wire (payload + headers); x = the 'none' row's bytes / this row's, same run")
    head = ("| setting | workers sent | x | workers received | servers sent | x | servers received | x "
            "| worker keys by signature | wall s |")
    print(head)
    print("|" + "---|" * 10)
    for r in results:
        w, s = r["workers"], r["servers"]
        print(f"| {r['name']} | {mib(w['sent']['wire'])} | {base['workers']['sent']['wire'] / w['sent']['wire']:.2f} "
              f"| {mib(w['received']['wire'])} | {mib(s['sent']['wire'])} "
              f"| {base['servers']['sent']['wire'] / s['sent']['wire']:.2f} | {mib(s['received']['wire'])} "
              f"| {base['servers']['received']['wire'] / s['received']['wire']:.2f} "
              f"| {w['sent']['kc_messages']} of {w['sent']['messages']} | {r['seconds']:.1f} |")
    print()
    print("stages of what the workers sent (MiB): before filters (what the pushes and pulls meant), after them "
          "(raw), after key caching, after zstd, wire; saved = 1 - after zstd / before filters")
    print("| setting | before filters | after filters | after kc | after zstd | wire | saved |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ws = r["workers"]["sent"]
        meant = ws.get("before_filters", ws["raw"])
        print(f"| {r['name']} | {mib(meant)} | {mib(ws['raw'])} | {mib(ws['after_kc'])} | {mib(ws['after_zstd'])} | "
              f"{mib(ws['wire'])} | {100 * (1 - ws['after_zstd'] / meant):.0f}% |")
    lossless = [r for r, st in zip(results, SETTINGS) if st[3] is None]
    sums = {round(r["checksum"], 6) for r in lossless}
    print(f"\nfinal weights identical across the lossless settings: {'yes' if len(sums) == 1 else 'NO ' + str(sums)}")
    for r, st in zip(results, SETTINGS):
        if st[3] is not None:  # after kv.flush(): what the filters held back has been sent
            print(f"{r['name']}: largest difference from 'none' after the flush "
                  f"{float(np.abs(r['final'] - base['final']).max()):.2e}")
    plot(results, args.png)
    print(f"chart: {args.png}")


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.8))
    ax = fig.add_subplot()
    names = [r["name"] for r in results]
    x = np.arange(len(names))
    series = [("workers sent", lambda r: r["workers"]["sent"]["wire"]),
              ("servers sent", lambda r: r["servers"]["sent"]["wire"])]
    for i, (label, get) in enumerate(series):
        vals = [get(r) / (1 << 20) for r in results]
        bars = ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("MiB on the wire")
    ax.set_title("Bytes sent, repeated-key workload (loopback)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

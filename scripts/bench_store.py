#!/usr/bin/env python
"""The table store alone, in process: today's hash store against the sorted-array store
it replaced, side by side in one run.

    .venv/bin/python scripts/bench_store.py            # full: tables up to 5e7 keys, a few minutes
    .venv/bin/python scripts/bench_store.py --quick    # up to 1e7 keys, under a minute

Cells (float32, width 1; keys are random uint64, sorted per request as the API wants):

* new keys: pushes of 1e5 keys never stored before into a table of N keys (sum), for N
  from 1e6 up; keys/s, median over pushes. The sorted store is built at each N by one
  push of N keys; the hash table grows through every N by 1e5-key pushes, and the
  amortised rate of that whole fill (growth and rehashing included) is reported too;
* existing keys: push then pull of 1e5 stored keys at 1e7 stored, for sum and adagrad
  (and, in a full run, every other updater at 1e6); keys/s counts each key once per
  push+pull round;
* dense: push_span then pull_span of 1e7 float32 at key 0 (the pull lends a view, as a
  server's reply does); GB/s of values moved, both directions counted;
* range operations on a 1e7-key adagrad table of random keys, as a ring change and a
  checkpoint run them: ``snapshot`` of a third of the key space (a range copy),
  ``count_present_span`` of that third, and ``retain`` of two thirds (on a fresh copy
  of the table each rep, not timed);
* memory: bytes per stored key of the hash table, as allocated (arrays, spare capacity
  included) and as resident (RSS growth while it was built), against ``row_bytes``;
  for sum (float32, width 1: 12 raw bytes a row) and adagrad (16).
* positions (``--only positions`` runs just this cell): a cached push, as a server gets
  it when a worker names a key list it keeps (issue 17): 1e5 random keys already stored,
  the same list every push, into a table of N keys (sum and adagrad); with the rows kept
  from the last push (``Table.push_at``) against looking every key up (``push``),
  alternated push by push; keys/s and the ratio. Also through the whole server core
  (``ServerCore.handle`` of a ``push`` naming the list by signature, ``keep_positions``
  on and off: parsing, the key cache, the store);
* bounded (``--only bounded`` runs just this cell): a stream of pushes of 1e5 new random
  keys into a plain table and into one with a row cap (``max_rows``), pushed alternately
  with the same batches, each as a primary does it (admit, push, evict); keys/s (median
  over the pushes once the cap is reached, and over the whole stream), rows resident and
  bytes allocated at the end. A plot of both rates and row counts along the stream.

The old store is the committed sorted-array ``psd/store/table.py``: read from a git
worktree (``--old-tree``, e.g. ``git worktree add /tmp/store_old <commit>``) or else from
git history (commit ``OLD_COMMIT``, the last with it), and run with today's helpers
(schema, updaters' numpy rules: unchanged), so nothing of it ships in the package and
both stores run side by side in one process. Old and new alternate rep by rep (the
machine is noisy) and every figure is a median. A PNG plot of the new-key rates is
written beside the JSON results (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from psd.schema import TableSpec  # noqa: E402
from psd.store import kernels  # noqa: E402
from psd.store.table import Table  # noqa: E402

#: the last commit whose psd/store/table.py is the sorted-array store
OLD_COMMIT = "a4073b509bb972b8bdc6c34371bb7b1cc4c92fb1"
BATCH = 100_000
PAGE = 4096


def old_table_class(tree: str | None):
    """The sorted-array ``Table``, from a worktree or OLD_COMMIT, as a module of its own."""
    if tree:
        path = Path(tree) / "psd" / "store" / "table.py"
        src, where = path.read_text(), str(path)
    else:
        try:
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:psd/store/table.py"],
                                 capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(f"bench_store: cannot read the old store from git history ({e}); run inside the psd repo")
        where = f"{OLD_COMMIT[:7]}:psd/store/table.py"
    if "searchsorted" not in src or "hashrows" in src:
        sys.exit(f"bench_store: {where} is not the sorted-array store")
    mod = types.ModuleType("sorted_table")
    exec(compile(src, where, "exec"), mod.__dict__)
    return mod.Table


OldTable = None  # set by main()


def spec(updater: str = "sum", **options) -> TableSpec:
    return TableSpec("t", 1, "float32", updater, options).validate()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fresh_keys(rng, n: int) -> np.ndarray:
    return np.unique(rng.integers(0, 2**64, size=n, dtype=np.uint64))


def alternate(cells: dict, reps: int) -> dict:
    """Run each named callable ``reps`` times, interleaved; median seconds of each."""
    times = {name: [] for name in cells}
    for _ in range(reps):
        for name, fn in cells.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


# -- cells ------------------------------------------------------------------------------
def new_keys(sizes: list[int], reps: int, rng) -> tuple[list[dict], list[dict]]:
    """New-key push rates at each size, and the hash table's memory per key there."""
    rows, memory = [], []
    new = Table(spec())
    ones = np.ones((BATCH, 1), np.float32)
    stream_keys: list[np.ndarray] = []
    stored = 0
    base_rss = rss()
    fill_time = 0.0
    for size in sizes:
        while stored < size:  # grow the hash table by 1e5-key pushes, timed as a whole
            k = fresh_keys(rng, BATCH)
            stream_keys.append(k)
            fill_time += timed(lambda: new.push(k, ones[:k.size]))
            stored += k.size
        memory.append({"keys": new.num_keys, "allocated_per_key": new.allocated_bytes / new.num_keys,
                       "resident_per_key": (rss() - base_rss - sum(k.nbytes for k in stream_keys)) / new.num_keys,
                       "row_bytes": new.row_bytes})
        old = OldTable(spec())
        all_keys = np.unique(np.concatenate(stream_keys))
        old.push(all_keys, np.ones((all_keys.size, 1), np.float32))
        del all_keys
        batches = [fresh_keys(rng, BATCH) for _ in range(2 * reps)]
        it_old, it_new = iter(batches[:reps]), iter(batches[reps:])

        def push_old():
            k = next(it_old)
            old.push(k, ones[:k.size])

        def push_new():
            k = next(it_new)
            new.push(k, ones[:k.size])
        t = alternate({"old": push_old, "new": push_new}, reps)
        stored = new.num_keys
        rows.append({"size": size, "old": BATCH / t["old"], "new": BATCH / t["new"],
                     "new_fill_amortised": stored / fill_time})
        print(f"  new keys at {size:.0e}: old {rows[-1]['old'] / 1e6:.2f}M/s, new {rows[-1]['new'] / 1e6:.2f}M/s, "
              f"fill {rows[-1]['new_fill_amortised'] / 1e6:.2f}M/s, "
              f"{memory[-1]['allocated_per_key']:.1f} B/key allocated", flush=True)
        del old
        gc.collect()
    return rows, memory


def existing_keys(updater: str, size: int, reps: int, rng, memory: list | None = None, **options) -> dict:
    keys = fresh_keys(rng, size)
    ones = np.ones((keys.size, 1), np.float32)
    tables = {"old": OldTable(spec(updater, **options))}
    tables["new"] = Table(spec(updater, **options))
    tables["new"].push(keys, ones)  # one push of every key: the index and rows sized at once
    if memory is not None:
        t = tables["new"]
        # (no resident figure: the pages may come back from tables freed earlier in the run)
        memory.append({"updater": updater, "keys": t.num_keys, "allocated_per_key": t.allocated_bytes / t.num_keys,
                       "resident_per_key": None, "row_bytes": t.row_bytes})
    tables["old"].push(keys, ones)
    picks = [np.sort(rng.choice(keys, BATCH, replace=False)) for _ in range(reps)]
    grads = np.full((BATCH, 1), 0.01, np.float32)
    its = {name: iter(picks) for name in tables}

    def round_trip(name):
        def run():
            k = next(its[name])
            tables[name].push(k, grads)
            tables[name].pull(k, [])
        return run
    t = alternate({name: round_trip(name) for name in tables}, reps)
    return {name: BATCH / s for name, s in t.items()}


def positions(size: int, reps: int, rng, updater: str = "sum", **options) -> dict:
    """A cached push of 1e5 stored keys: through kept rows against a lookup (see the docstring)."""
    from psd.codec import Message
    from psd.codec.signature import key_ref
    from psd.config import ClusterConfig
    from psd.core.server import ServerCore

    keys = fresh_keys(rng, size)
    ones = np.ones((keys.size, 1), np.float32)
    pick = np.sort(rng.choice(keys, BATCH, replace=False))
    grads = np.full((BATCH, 1), 0.01, np.float32)
    # filled in 100 pushes of random key sets, so the rows of a sorted key list are scattered
    # over the table, as a server fed by many workers stores them
    batches = [np.sort(b) for b in np.array_split(rng.permutation(keys), 100)]
    tables = {"lookup": Table(spec(updater, **options)), "kept rows": Table(spec(updater, **options))}
    for t in tables.values():
        for b in batches:
            t.push(b, ones[:b.size])
    at = {"at": tables["kept rows"].locate(pick)}

    def kept():
        at["at"] = tables["kept rows"].push_at(pick, grads, at["at"])
    store = alternate({"lookup": lambda: tables["lookup"].push(pick, grads), "kept rows": kept}, reps)
    tables.clear()
    gc.collect()
    cores, rids = {}, iter(range(1, 10**9))
    for name, keep in (("lookup", False), ("kept rows", True)):
        core = ServerCore(ClusterConfig(security="none"), secure=False)
        core.node_id, core.keep_positions = "S0", keep
        core._create(spec(updater, **options))
        for b in batches:
            core.tables["t"].push(b, ones[:b.size])
        core.handle(None, Message("push", id=1, sender="W0", table="t", meta={"rid": next(rids), "kcs": True},
                                  arrays=[pick, grads]), 0.0)
        cores[name] = core
    ref = key_ref(pick)

    def by_signature(core):
        def run():
            rid = next(rids)
            out = core.handle(None, Message("push", id=rid, sender="W0", table="t", meta={"rid": rid, "kc": ref},
                                            arrays=[grads]), 0.0)
            assert type(out[0]).__name__ == "Reply", out
        return run
    for core in cores.values():  # (the first push by signature finds the rows)
        by_signature(core)()
    whole = alternate({name: by_signature(core) for name, core in cores.items()}, reps)
    return {"updater": updater, "size": size, "store": {n: BATCH / t for n, t in store.items()},
            "core": {n: BATCH / t for n, t in whole.items()}}


def positions_lines(cells: list[dict]) -> list[str]:
    out = [("cached push of 1e5 stored keys (the same list each push): keys/s, median; "
            "x = kept rows / lookup, same run; tables filled in 100 pushes of random key sets"),
           ("| updater | table keys | store: lookup | store: kept rows | x | server core: lookup "
            "| server core: kept rows | x |"), "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        st, co = c["store"], c["core"]
        out.append(f"| {c['updater']} | {c['size']:.0e} | {st['lookup'] / 1e6:.1f} M | {st['kept rows'] / 1e6:.1f} M "
                   f"| {st['kept rows'] / st['lookup']:.2f} | {co['lookup'] / 1e6:.1f} M "
                   f"| {co['kept rows'] / 1e6:.1f} M | {co['kept rows'] / co['lookup']:.2f} |")
    return out


def dense(size: int, reps: int) -> dict:
    vals = np.ones((size, 1), np.float32)
    tables = {"old": OldTable(spec()), "new": Table(spec())}
    for t in tables.values():
        t.push_span(0, vals)

    def round_trip(name):
        def run():
            leases: list = []
            tables[name].push_span(0, vals)
            tables[name].pull_span(0, size, leases)
            for lease in leases:
                lease.release()
        return run
    t = alternate({name: round_trip(name) for name in tables}, reps)
    return {name: 2 * vals.nbytes / s / 1e9 for name, s in t.items()}


class _Range:
    def __init__(self, begin: int, end: int):
        self.begin, self.end = begin, end


def range_ops(size: int, reps: int, rng) -> dict:
    """Seconds for snapshot, count and retain of key-space thirds of a ``size``-key table."""
    keys = fresh_keys(rng, size)
    ones = np.ones((keys.size, 1), np.float32)
    tables = {"old": OldTable(spec("adagrad")), "new": Table(spec("adagrad"))}
    for t in tables.values():
        t.push(keys, ones)
    del keys, ones
    third = 2**64 // 3
    out = {}
    out["snapshot"] = alternate({name: (lambda tb=tb: tb.snapshot(third, 2 * third))
                                 for name, tb in tables.items()}, reps)
    out["count"] = alternate({name: (lambda tb=tb: tb.count_present_span(third, third))
                              for name, tb in tables.items()}, reps)
    keep = [_Range(0, third), _Range(2 * third, 2**64)]
    times: dict = {name: [] for name in tables}
    for _ in range(reps):
        for name, tb in tables.items():
            victim = copy.deepcopy(tb)
            times[name].append(timed(lambda: victim.retain(keep)))
            del victim
            gc.collect()
    out["retain"] = {name: statistics.median(ts) for name, ts in times.items()}
    return out


def bounded(total: int, cap: int, rng) -> dict:
    """Push rate and resident rows on a stream of new keys, with and without a row cap."""
    tables = {"no cap": Table(spec()), f"max_rows {cap:.0e}": Table(spec(max_rows=cap))}
    ones = np.ones((BATCH, 1), np.float32)
    trace: dict[str, list] = {name: [] for name in tables}

    def primary_push(t: Table, k: np.ndarray) -> None:
        keep = t.admit(k)  # (None: no admission on these tables; kept for the primary's path)
        t.push(k if keep is None else k[keep], ones[:k.size] if keep is None else ones[:int(keep.sum())])
        t.evict()
    pushed = 0
    while pushed < total:
        k = fresh_keys(rng, BATCH)
        for name, t in tables.items():  # the same batch, alternately
            dt = timed(lambda: primary_push(t, k))
            trace[name].append((pushed + k.size, k.size / dt, t.num_keys))
        pushed += k.size
    out = {"total": pushed, "cap": cap, "trace": trace, "tables": {}}
    for name, t in tables.items():
        steady = [rate for at, rate, _ in trace[name] if at > cap]
        seconds = sum(BATCH / rate for _, rate, _ in trace[name])
        out["tables"][name] = {"steady": statistics.median(steady), "amortised": pushed / seconds,
                               "rows": t.num_keys, "allocated": t.allocated_bytes,
                               "evicted": (t.bounded_stats() or {}).get("evicted", 0)}
        print(f"  bounded, {name}: {out['tables'][name]['steady'] / 1e6:.2f}M keys/s once past the cap, "
              f"{t.num_keys} rows resident", flush=True)
    return out


def bounded_lines(b: dict) -> list[str]:
    names = list(b["tables"])
    plain, capped = (b["tables"][n] for n in names)
    out = [f"{'bounded: stream of ' + format(b['total'], '.0e') + ' new keys, 1e5/push':<46} "
           f"{names[0]:>12} {names[1]:>14} {'cap/none':>8}"]

    def line(what, a, c, fmt):
        out.append(f"{what:<46} {fmt.format(a):>12} {fmt.format(c):>14} {c / a if a else float('nan'):>8.2f}")
    line("push keys/s once past the cap (M/s)", plain["steady"] / 1e6, capped["steady"] / 1e6, "{:.2f}")
    line("push keys/s over the whole stream (M/s)", plain["amortised"] / 1e6, capped["amortised"] / 1e6, "{:.2f}")
    line("rows resident at the end", plain["rows"], capped["rows"], "{:,}")
    line("bytes allocated at the end (MB)", plain["allocated"] / 1e6, capped["allocated"] / 1e6, "{:.1f}")
    out.append(f"{'rows evicted':<46} {plain['evicted']:>12,} {capped['evicted']:>14,}")
    return out


def plot_bounded(b: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, trace in b["trace"].items():
        at = [x[0] for x in trace]
        a1.plot(at, [x[1] / 1e6 for x in trace], ".-", label=name)
        a2.plot(at, [x[2] for x in trace], "-", label=name)
    a1.set_xlabel("keys pushed")
    a1.set_ylabel("push rate, M keys/s")
    a2.set_xlabel("keys pushed")
    a2.set_ylabel("rows resident")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
        a.legend()
    fig.suptitle("Table.push of 1e5 new random keys: no cap vs max_rows (float32, sum)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# -- report -------------------------------------------------------------------------------
def table_lines(results: dict) -> list[str]:
    out = [f"{'cell':<46} {'old':>12} {'new':>12} {'new/old':>8}"]

    def line(name, old, new, unit, fmt="{:.2f}"):
        ratio = new / old if old else float("nan")
        out.append(f"{name:<46} {fmt.format(old) + unit:>12} {fmt.format(new) + unit:>12} {ratio:>8.2f}")
    for r in results["new_keys"]:
        line(f"new keys, 1e5/push, at {r['size']:.0e} stored", r["old"] / 1e6, r["new"] / 1e6, "M/s")
    for r in results["new_keys"]:
        out.append(f"{'  new store filled to ' + format(r['size'], '.0e') + ', amortised':<46} {'':>12} "
                   f"{r['new_fill_amortised'] / 1e6:>10.2f}M/s")
    for name, r in results["existing"].items():
        line(f"existing keys push+pull, {name}", r["old"] / 1e6, r["new"] / 1e6, "M/s")
    d = results["dense"]
    line(f"dense span push+pull, {results['dense_size']:.0e} float32", d["old"], d["new"], "GB/s")
    for op, what in (("snapshot", "snapshot of 1/3"), ("count", "count_present_span of 1/3"),
                     ("retain", "retain of 2/3")):
        r = results["ranges"][op]
        line(f"{what}, {results['ranges_size']:.0e}-key adagrad table (s)", r["old"], r["new"], "s", "{:.3f}")
    for m in results["memory"]:
        name = f"memory, {m.get('updater', 'sum')} at {m['keys']:.1e} keys, B/key"
        out.append(f"{name:<46} {'(raw ' + str(m['row_bytes']) + ')':>12} {m['allocated_per_key']:>9.1f} al "
                   + (f"{m['resident_per_key']:>6.1f} rss" if m["resident_per_key"] is not None else f"{'':>10}")
                   + f"   {m['allocated_per_key'] / m['row_bytes']:.2f}x raw")
    first, last = results["new_keys"][0], results["new_keys"][-1]
    out.append(f"new store: new-key rate at {last['size']:.0e} / at {first['size']:.0e} = "
               f"{last['new'] / first['new']:.2f} (target >= 0.7; absolute >= 5M/s)")
    return out


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rows = results["new_keys"]
    sizes = [r["size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [r["old"] / 1e6 for r in rows], "o-", label="sorted arrays (old)")
    ax.plot(sizes, [r["new"] / 1e6 for r in rows], "o-", label="hash rows (new)")
    ax.plot(sizes, [r["new_fill_amortised"] / 1e6 for r in rows], "x--", label="hash rows, amortised fill")
    ax.set_xscale("log")
    ax.set_xlabel("keys stored")
    ax.set_ylabel("new keys pushed, M keys/s")
    ax.set_title("Table.push of 1e5 new random keys (float32, sum)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tables up to 1e7 keys, fewer repetitions")
    ap.add_argument("--out", default="bench-results/store", help="folder for store.json and store.png")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--old-tree", help="a git worktree holding the sorted-array store (default: git history)")
    ap.add_argument("--sizes", help="comma-separated table sizes for the new-key cells (default: by --quick)")
    ap.add_argument("--only", choices=["bounded", "positions"], help="run only this cell (no old store needed)")
    args = ap.parse_args()
    if args.only == "positions":
        kernels.warm()
        rng = np.random.default_rng(args.seed)
        sizes = [10**6] if args.quick else [10**6, 10**7]
        print(f"bench_store: positions cell, tables of {', '.join(f'{n:.0e}' for n in sizes)} keys", flush=True)
        cells = [positions(n, 31, rng, updater, **opts) for n in sizes
                 for updater, opts in (("sum", {}), ("adagrad", {"lr": 0.1, "l1": 0.01}))]
        print("\n".join(positions_lines(cells)))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "positions.json").write_text(json.dumps(cells, indent=1))
        return
    if args.only == "bounded":
        kernels.warm()
        total, cap = (5 * 10**6, 10**6) if args.quick else (2 * 10**7, 5 * 10**6)
        print(f"bench_store: bounded cell, {total:.0e} new keys, cap {cap:.0e}", flush=True)
        b = bounded(total, cap, np.random.default_rng(args.seed))
        print()
        print("\n".join(bounded_lines(b)))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bounded.json").write_text(json.dumps({k: v for k, v in b.items() if k != "trace"}, indent=1))
        plot_bounded(b, out / "bounded.png")
        return
    global OldTable
    OldTable = old_table_class(args.old_tree)
    rng = np.random.default_rng(args.seed)
    kernels.warm()
    if args.quick:
        sizes, reps, big = [10**6, 10**7], 5, 10**7
    else:
        sizes, reps, big = [10**6, 5 * 10**6, 10**7, 2 * 10**7, 5 * 10**7], 7, 10**7
    if args.sizes:
        sizes = [int(float(x)) for x in args.sizes.split(",")]
    started = time.perf_counter()
    print(f"bench_store: sizes {', '.join(f'{s:.0e}' for s in sizes)}; {reps} reps per cell", flush=True)
    results: dict = {"quick": args.quick, "reps": reps}
    results["new_keys"], results["memory"] = new_keys(sizes, reps, rng)
    gc.collect()
    results["existing"] = {}
    for updater in ("sum", "adagrad"):
        results["existing"][f"{updater} at {big:.0e}"] = existing_keys(updater, big, reps, rng, results["memory"])
        print(f"  existing keys, {updater}: done", flush=True)
        gc.collect()
    if not args.quick:
        for updater, options in (("assign", {}), ("sgd", {}), ("prox_l1", {"l1": 0.01}), ("ftrl", {"l1": 0.01})):
            results["existing"][f"{updater} at 1e+06"] = existing_keys(updater, 10**6, reps, rng, **options)
    results["dense_size"] = big
    results["dense"] = dense(big, reps)
    results["ranges_size"] = big
    results["ranges"] = range_ops(big, max(3, reps // 2), rng)
    results["bounded"] = bounded(5 * 10**6 if args.quick else 2 * 10**7, 10**6 if args.quick else 5 * 10**6, rng)
    results["seconds"] = time.perf_counter() - started
    print()
    print("\n".join(table_lines(results)))
    print("\n".join(bounded_lines(results["bounded"])))
    print(f"({results['seconds']:.0f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "store.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "store.png")
    plot_bounded(results["bounded"], out / "bounded.png")


if __name__ == "__main__":
    main()

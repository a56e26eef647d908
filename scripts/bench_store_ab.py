#!/usr/bin/env python
"""This tree's hash rows against another tree's, side by side in one process.

    git worktree add --detach /tmp/store_base main      # or any commit with psd/store/hashrows.py
    .venv/bin/python scripts/bench_store_ab.py --base-tree /tmp/store_base --cpu
    .venv/bin/python scripts/bench_store_ab.py --base-tree /tmp/store_base --sizes 1e6,2e7,5e7

``bench_store.py`` weighs the store against the sorted arrays it replaced; this one
weighs a change to the hash rows (index, probing, kernels) against the version before
it. The base tree's ``psd/store/kernels.py`` and ``hashrows.py`` are copied into a
temporary package of their own (numba caches it beside the copy, so the first run
compiles it), and both ``HashRows`` run on the same keys, rep by rep alternately:

* new keys: pushes of 1e5 keys never stored (``sum``, float32, width 1) into tables of
  each size, both grown to it by 1e6-key pushes (growth as a stream of pushes makes it);
* existing keys at ``--existing`` stored (default 1e7), ``sum`` and ``adagrad``: a push
  then a pull of 1e5 stored keys; push+pull counts each key once per round, as
  ``bench_store.py`` does.

``--more`` adds cells through a ``Table`` whose hash rows are each side's: existing keys
push+pull for the other updaters (assign, sgd, prox_l1, ftrl) at ``--existing`` stored;
dense ``push_span`` + ``pull_span`` of 1e7 float32 (GB/s, both directions); and the range
operations of ``bench_store.py`` on a 1e7-key adagrad table (``snapshot`` and
``count_present_span`` of a third of the key space, ``retain`` of two thirds on a copy),
as rates (1 / median seconds) so that every ratio reads "higher is better".

The side that goes first alternates from rep to rep.
``--cpu`` times with the thread's CPU clock instead of the wall clock: on a machine
shared with other work a descheduled thread then costs nothing, so ratios between the
two trees stay readable (caches polluted by the other work still count). Every figure
is a median.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from psd.schema import TableSpec  # noqa: E402
from psd.store import hashrows as this_rows, kernels as this_kernels  # noqa: E402
from psd.store.table import Table  # noqa: E402

BATCH = 100_000


def load_base(tree: str, folder: Path):
    """The base tree's (hashrows, kernels) as package ``psd_base_store`` in ``folder``."""
    src = Path(tree) / "psd" / "store"
    pkg = folder / "psd_base_store"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("kernels.py", "hashrows.py"):
        if not (src / name).exists():
            sys.exit(f"bench_store_ab: {src / name} is missing: not a tree with the hash rows")
        shutil.copy(src / name, pkg / name)
    text = (pkg / "hashrows.py").read_text()
    (pkg / "hashrows.py").write_text(text.replace("from psd.store import kernels", "from psd_base_store import kernels"))
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(folder))
    return importlib.import_module("psd_base_store.hashrows"), importlib.import_module("psd_base_store.kernels")


def table(rows, updater: str, **options) -> Table:
    """A float32 width-1 ``Table`` whose hash rows are ``rows.HashRows`` (a side's)."""
    t = Table(TableSpec("t", 1, "float32", updater, options).validate())
    t._hash = rows.HashRows(t.width, t.dtype, len(t._fields))
    return t


def huge_share(arrays: list) -> str:
    """AnonHugePages / Rss of the mappings holding ``arrays`` (/proc/self/smaps; a
    mapping merged with a neighbour counts whole): whether a table's random reads pay a
    TLB miss per 4 KiB page or per 2 MiB one (decision 145)."""
    try:
        with open("/proc/self/smaps") as f:
            text = f.read().splitlines()
    except OSError:
        return "-"
    spans = [(a.__array_interface__["data"][0], a.__array_interface__["data"][0] + a.nbytes) for a in arrays]
    huge = rss = 0
    hit = False
    for row in text:
        head = row.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            hit = any(lo < b and hi > a for a, b in spans)
        elif hit and head[0] in ("Rss:", "AnonHugePages:"):
            if head[0] == "Rss:":
                rss += int(head[1])
            else:
                huge += int(head[1])
    return f"{huge / rss:.0%}" if rss else "-"


def sides_in_turn(names: list, rep: int) -> list:
    """The sides in the order they run at rep ``rep``: the first alternates."""
    return names if rep % 2 == 0 else names[::-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-tree", required=True, help="a checkout whose psd/store is the base")
    ap.add_argument("--sizes", default="1e6,2e7,5e7", help="table sizes for the new-key cells")
    ap.add_argument("--existing", type=float, default=1e7, help="table size for the existing-key cells (0: skip)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--cpu", action="store_true", help="time with the thread's CPU clock")
    ap.add_argument("--more", action="store_true", help="other updaters, dense spans and range operations too")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    clock = time.thread_time if args.cpu else time.perf_counter
    folder = Path(tempfile.gettempdir()) / f"psd-bench-store-ab-{Path(args.base_tree).resolve().name}"
    base_rows, base_kernels = load_base(args.base_tree, folder)
    base_kernels.warm()
    this_kernels.warm()
    sides = {"base": (base_rows, base_kernels), "this": (this_rows, this_kernels)}
    rng = np.random.default_rng(args.seed)
    pt = np.zeros(1, np.float32)
    lines = [f"{'cell (' + ('CPU' if args.cpu else 'wall') + ' time)':<44} {'base':>10} {'this':>10} {'this/base':>9}"]

    def line(what, a, b, unit="M/s", scale=1e6):
        lines.append(f"{what:<44} {a / scale:>8.2f}{unit} {b / scale:>8.2f}{unit} {b / a:>9.2f}")
        print(lines[-1], flush=True)

    def timed(fn) -> float:
        t = clock()
        fn()
        return clock() - t
    started = time.perf_counter()
    print(lines[0], flush=True)
    # new keys at each size
    tables = {name: (rows.HashRows(1, np.float32, 0), k) for name, (rows, k) in sides.items()}
    ones = np.ones((10**6, 1), np.float32)
    stored, first = 0, None
    for size in (int(float(x)) for x in args.sizes.split(",")):
        while stored < size:
            keys = np.unique(rng.integers(0, 2**64, 10**6, dtype=np.uint64))
            for h, k in tables.values():
                h.push(keys, ones[:keys.size], k.SUM, pt, pt.astype(np.float64))
            stored += keys.size
        times: dict[str, list] = {name: [] for name in tables}
        for rep in range(args.reps):
            keys = np.unique(rng.integers(0, 2**64, BATCH, dtype=np.uint64))
            for name in sides_in_turn(list(tables), rep):
                h, k = tables[name]
                times[name].append(timed(lambda: h.push(keys, ones[:keys.size], k.SUM, pt, pt.astype(np.float64))))
            stored += keys.size
        rate = {name: BATCH / statistics.median(ts) for name, ts in times.items()}
        loads = ", ".join(f"{name} {h.n / (1 << h.bits):.2f}" for name, (h, _) in tables.items())
        line(f"new keys at {size:.0e} (index load {loads})", rate["base"], rate["this"])
        first = first or rate
        last = rate
    for name in tables:
        lines.append(f"  {name}: new-key rate at the largest size / at the smallest = {last[name] / first[name]:.2f}")
        print(lines[-1], flush=True)
    del tables
    # existing keys
    if args.existing:
        n = int(args.existing)
        keys = np.unique(rng.integers(0, 2**64, n, dtype=np.uint64))
        grad = np.full((BATCH, 1), 0.01, np.float32)
        for updater, kind, fields, pf in (("sum", this_kernels.SUM, 0, np.zeros(1)),
                                          ("adagrad", this_kernels.ADAGRAD, 1, np.array([0.1, 1e-3, 0.0]))):
            tables = {name: (rows.HashRows(1, np.float32, fields), k) for name, (rows, k) in sides.items()}
            for h, k in tables.values():
                h.push(keys, np.ones((keys.size, 1), np.float32), kind, pt, pf)
            times = {name: [] for name in tables}
            for rep in range(args.reps):
                pick = np.sort(rng.choice(keys, BATCH, replace=False))
                for name in sides_in_turn(list(tables), rep):
                    h, k = tables[name]
                    times[name].append(timed(lambda: (h.push(pick, grad, kind, pt, pf), h.pull(pick))))
            rate = {name: BATCH / statistics.median(ts) for name, ts in times.items()}
            line(f"existing keys push+pull, {updater}, {n:.0e} stored", rate["base"], rate["this"])
            shares = ", ".join(f"{name} {huge_share([h.index, h.raw])}" for name, (h, _) in tables.items())
            lines.append(f"  (huge pages in the mappings of its index and rows: {shares})")
            print(lines[-1], flush=True)
            del tables
        if args.more:
            for updater, options in (("assign", {}), ("sgd", {"lr": 0.3}),
                                     ("prox_l1", {"lr": 0.2, "l1": 0.05, "l2": 0.5}),
                                     ("ftrl", {"alpha": 0.1, "beta": 1.0, "l1": 0.05, "l2": 0.1})):
                tables = {name: table(rows, updater, **options) for name, (rows, _) in sides.items()}
                for t in tables.values():
                    t.push(keys, np.ones((keys.size, 1), np.float32))
                times = {name: [] for name in tables}
                for rep in range(args.reps):
                    pick = np.sort(rng.choice(keys, BATCH, replace=False))
                    for name in sides_in_turn(list(tables), rep):
                        t = tables[name]
                        times[name].append(timed(lambda t=t, pick=pick: (t.push(pick, grad), t.pull(pick, []))))
                rate = {name: BATCH / statistics.median(ts) for name, ts in times.items()}
                line(f"existing keys push+pull, {updater}, {n:.0e} stored", rate["base"], rate["this"])
                shares = ", ".join(f"{name} {huge_share([t._hash.index, t._hash.raw])}" for name, t in tables.items())
                lines.append(f"  (huge pages in the mappings of its index and rows: {shares})")
                print(lines[-1], flush=True)
                del tables
        del keys
    if args.more:
        more(sides, args.reps, rng, timed, line)
    print(f"({time.perf_counter() - started:.0f} s)")


class _Range:
    def __init__(self, begin: int, end: int):
        self.begin, self.end = begin, end


def more(sides: dict, reps: int, rng, timed, line) -> None:
    """The dense-span and range-operation cells of ``bench_store.py``, side by side."""
    size = 10**7

    def alternated(tables: dict, op) -> dict:
        """Median seconds of ``op(table)`` per side, the sides alternating."""
        times: dict = {name: [] for name in tables}
        for rep in range(reps):
            for name in sides_in_turn(list(tables), rep):
                times[name].append(timed(lambda t=tables[name]: op(t)))
        return {name: statistics.median(ts) for name, ts in times.items()}

    def span_round(t: Table, vals: np.ndarray) -> None:
        leases: list = []
        t.push_span(0, vals)
        t.pull_span(0, vals.shape[0], leases)
        for lease in leases:
            lease.release()
    vals = np.ones((size, 1), np.float32)
    tables = {name: table(rows, "sum") for name, (rows, _) in sides.items()}
    for t in tables.values():
        t.push_span(0, vals)
    secs = alternated(tables, lambda t: span_round(t, vals))
    line("dense push_span+pull_span, 1e7 float32", 2 * vals.nbytes / secs["base"], 2 * vals.nbytes / secs["this"],
         "GB/s", 1e9)
    del tables
    keys = np.unique(rng.integers(0, 2**64, size, dtype=np.uint64))
    tables = {name: table(rows, "adagrad", lr=0.1) for name, (rows, _) in sides.items()}
    for t in tables.values():
        t.push(keys, vals[:keys.size])
    third = 2**64 // 3
    keep = [_Range(0, third), _Range(2 * third, 2**64)]

    def retain_copy(t: Table) -> float:
        victim = copy.deepcopy(t)
        took = timed(lambda v=victim: v.retain(keep))
        del victim
        gc.collect()
        return took
    for what, op in (("snapshot of 1/3, 1e7-key adagrad table", lambda t: t.snapshot(third, 2 * third)),
                     ("count_present_span of 1/3 of it", lambda t: t.count_present_span(third, third))):
        secs = alternated(tables, op)
        line(what, 1 / secs["base"], 1 / secs["this"], "/s  ", 1)
    times: dict = {name: [] for name in tables}
    for rep in range(reps):
        for name in sides_in_turn(list(tables), rep):
            times[name].append(retain_copy(tables[name]))
    secs = {name: statistics.median(ts) for name, ts in times.items()}
    line("retain of 2/3 of it (on a copy)", 1 / secs["base"], 1 / secs["this"], "/s  ", 1)


if __name__ == "__main__":
    main()

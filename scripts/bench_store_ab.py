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

``--cpu`` times with the thread's CPU clock instead of the wall clock: on a machine
shared with other work a descheduled thread then costs nothing, so ratios between the
two trees stay readable (caches polluted by the other work still count). Every figure
is a median.
"""
from __future__ import annotations

import argparse
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

from psd.store import hashrows as this_rows, kernels as this_kernels  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-tree", required=True, help="a checkout whose psd/store is the base")
    ap.add_argument("--sizes", default="1e6,2e7,5e7", help="table sizes for the new-key cells")
    ap.add_argument("--existing", type=float, default=1e7, help="table size for the existing-key cells (0: skip)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--cpu", action="store_true", help="time with the thread's CPU clock")
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

    def line(what, a, b):
        lines.append(f"{what:<44} {a / 1e6:>8.2f}M/s {b / 1e6:>8.2f}M/s {b / a:>9.2f}")
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
        for _ in range(args.reps):
            keys = np.unique(rng.integers(0, 2**64, BATCH, dtype=np.uint64))
            for name, (h, k) in tables.items():
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
            for _ in range(args.reps):
                pick = np.sort(rng.choice(keys, BATCH, replace=False))
                for name, (h, k) in tables.items():
                    times[name].append(timed(lambda: (h.push(pick, grad, kind, pt, pf), h.pull(pick))))
            rate = {name: BATCH / statistics.median(ts) for name, ts in times.items()}
            line(f"existing keys push+pull, {updater}, {n:.0e} stored", rate["base"], rate["this"])
            del tables
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

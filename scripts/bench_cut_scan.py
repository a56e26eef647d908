#!/usr/bin/env python
"""What a request costs the gate while a checkpoint cut holds many pushes.

    .venv/bin/python scripts/bench_cut_scan.py            # a few seconds
    .venv/bin/python scripts/bench_cut_scan.py --held 1000 4000 16000

Pure logic, no daemons: a ``Gate`` of 8 workers at clock 10, a cut at 11, and N pushes
at clock 11 held by it. It times a pull by a worker that needs none of them (each
consistency model) and a sequential push below the cut (kept for the clock boundary),
and prints microseconds per call for each N beside N = 0, and the ratio: about 1 when
a request's cost does not grow with what the cut holds (decision 149). Repetitions
alternate the sizes; figures are medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

from psd.core.gate import Gate, Setting

WORKERS = [f"W{w}" for w in range(8)]


def gate(model: str, held: int) -> Gate:
    g = Gate(Setting(model, 2 if model == "bounded" else 0, len(WORKERS), (0, 8)))
    for w in WORKERS:
        g.clock(w, 10, 0.0)
    g.hold_all()
    g.cut(11, set(WORKERS), lambda: None)
    p = g.policy(None)
    for i in range(held):
        p.push(WORKERS[i % len(WORKERS)], 11, lambda: None)
    return g


def per_call(model: str, op: str, held: int, n: int) -> float:
    p = gate(model, held).policy(None)
    t = time.perf_counter()
    if op == "pull":  # (by a worker with nothing held, at a clock that needs nothing held)
        for i in range(n):
            p.pull(("r", i), "W9", 10, lambda: None, 0.0)
    else:
        for i in range(n):
            p.push("W1", 10, lambda: None)
    return 1e6 * (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    cells = [(m, "pull") for m in ("eventual", "bounded", "sequential")] + [("sequential", "push")]
    sizes = [0] + a.held
    print(f"{'model':<11} {'op':<5} " + " ".join(f"{f'N={n} us':>10}" for n in sizes)
          + " " + " ".join(f"{f'x N={n}':>9}" for n in a.held))
    for model, op in cells:
        runs: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(a.reps):
            for n in sizes:
                runs[n].append(per_call(model, op, n, a.calls))
        med = {n: statistics.median(v) for n, v in runs.items()}
        print(f"{model:<11} {op:<5} " + " ".join(f"{med[n]:>10.1f}" for n in sizes)
              + " " + " ".join(f"{med[n] / med[0]:>9.2f}" for n in a.held))


if __name__ == "__main__":
    main()

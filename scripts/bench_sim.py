#!/usr/bin/env python3
"""CPU seconds per seed of the deterministic simulation (psd/sim), of this tree and of
others, side by side in one run.

    python scripts/bench_sim.py                                  # this tree only
    python scripts/bench_sim.py --tree /tmp/sim_old --seeds 40   # an older tree beside it

An older tree is any checkout of psd (``git worktree add /tmp/sim_old <commit>``, or
``git archive <commit> | tar -x -C /tmp/sim_old``). Each cell runs ``--seeds`` seeds of
one setting in a fresh process (the store warmed first, outside the timing) and reports
the CPU seconds (``time.process_time``) per seed, the messages per seed and the ratio to
the first tree. Trees alternate cell by cell and round by round, and each figure is the
median over ``--rounds`` (``--stat min``: the least disturbed round): the machine is
shared and noisy, so compare ratios from one run, never figures from two. Each row also
says whether every tree ran the same schedules (``same``: equal pushes, acks, pulls,
messages, faults and violations, seed by seed), so a change meant only to be faster
shows that it is.

The settings are the suite's (``tests/test_sim.py``): each consistency model with
``settings_for``, plus key caching, a bounded table, and one message per server, at
each tree's default pace (``--pace long``: the schedules before decision 136, which a
change meant only to be faster must keep "same" beside an older tree).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

#: label -> (consistency, extra settings): the suite's kinds of seed
CELLS = {
    "eventual": ("eventual", {}),
    "bounded": ("bounded", {}),
    "sequential": ("sequential", {}),
    "key caching": ("eventual", {"key_caching": True}),
    "bounded table": ("bounded", {"bounded": True}),
    "one message": ("eventual", {"push_keys": 6, "keys_per_worker": 8,
                                 "faults": ["kill_mid_forward", "kill", "join", "drop", "stall"]}),
}

CHILD = r"""
import hashlib, json, logging, sys, time
logging.disable(logging.CRITICAL)
import psd.store.kernels as kernels
kernels.warm()
from psd.sim import Settings, settings_for, simulate
consistency, extra, first, n, pace = json.loads(sys.argv[1])
if "faults" in extra:
    extra["faults"] = tuple(extra["faults"])
if pace and "pace" in Settings.__dataclass_fields__:  # (a tree before decision 136 has the long one only)
    extra["pace"] = pace
simulate(first, **{**settings_for(first, consistency), **extra})  # (imports, first tables: not timed)
messages, outcomes = 0, []
start = time.process_time()
for seed in range(first, first + n):
    o = simulate(seed, **{**settings_for(seed, consistency), **extra})
    messages += o.messages
    outcomes.append([o.pushes, o.acked, o.pulls, o.messages, o.faults, o.violations])
cpu = (time.process_time() - start) / n
digest = hashlib.sha1(json.dumps(outcomes).encode()).hexdigest()[:12]
print(json.dumps({"cpu": cpu, "messages": messages / n, "digest": digest}))
"""


def cell(tree: Path, consistency: str, extra: dict, first: int, n: int, pace: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([consistency, extra, first, n, pace])], env=env,
                         cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], help="another checkout to compare (repeatable)")
    ap.add_argument("--seeds", type=int, default=30, help="seeds per cell (default 30)")
    ap.add_argument("--first", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians (default 3)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="figure over the rounds (min: the least disturbed round, on a busy machine)")
    ap.add_argument("--only", action="append", choices=sorted(CELLS), help="these cells only (repeatable)")
    ap.add_argument("--pace", help="run every tree at this pace (psd.sim.run.PACES; default: each tree's own "
                                   "default; a tree before decision 136 runs the long one whatever is asked)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.tree] + [HERE]
    names = [f"{t.name}" for t in trees]
    cells = {k: v for k, v in CELLS.items() if not args.only or k in args.only}
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for label, (consistency, extra) in cells.items():
            order = trees if r % 2 == 0 else trees[::-1]
            for tree in order:
                results.setdefault((label, tree.name), []).append(
                    cell(tree, consistency, extra, args.first, args.seeds, args.pace))
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    head = f"{'seeds of':14s}" + "".join(f"{n[:18]:>20s} {'msgs':>6s}" for n in names)
    if len(trees) > 1:
        head += "".join(f"  {n[:12]:>12s}/{names[0][:12]}" for n in names[1:])
    stat = statistics.median if args.stat == "median" else min
    print(f"CPU ms per seed ({args.stat} of {args.rounds} rounds of {args.seeds} seeds), messages per seed; "
          f"same/differ: whether every tree ran the same schedules (pushes, acks, pulls, messages, faults "
          f"and violations of each seed)")
    print(head)
    table = {}
    for label in cells:
        cpu = [stat(x["cpu"] for x in results[(label, n)]) for n in names]
        msgs = [statistics.median(x["messages"] for x in results[(label, n)]) for n in names]
        table[label] = {n: {"cpu_ms": 1000 * c, "messages": m} for n, c, m in zip(names, cpu, msgs)}
        line = f"{label:14s}" + "".join(f"{1000 * c:20.1f} {m:6.0f}" for c, m in zip(cpu, msgs))
        line += "".join(f"  {c / cpu[0]:25.2f}" for c in cpu[1:])
        digests = {x["digest"] for n in names for x in results[(label, n)]}
        table[label]["same_schedules"] = len(digests) == 1
        print(line + ("  same" if len(digests) == 1 else "  differ"))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

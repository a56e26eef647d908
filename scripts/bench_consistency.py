#!/usr/bin/env python
"""Consistency models against a straggler: the quickstart logistic regression, 4 workers,
one of them slowed, under sequential, bounded tau = 1, 2, 4, 8, bounded auto and eventual.

    .venv/bin/python scripts/bench_consistency.py            # full run, a few minutes
    .venv/bin/python scripts/bench_consistency.py --quick    # smaller data, under 2 minutes

Each setting is one ``psd run`` of a job file written for it (the app
``psd/apps/logreg_sgd.py``; job keys ``consistency:`` and ``max_delay:``), on its own local
cluster of 2 servers and 4 worker daemons. Rank 0 is the straggler: it sleeps
``--slow-seconds`` after each minibatch's gradient (``train.slow_rank`` /
``train.slow_seconds``). Rank 0 also evaluates the test log-loss every ``--eval-every`` of
its minibatches (``train.eval_every``) and at each epoch; as the slowest worker it finishes
last, so its evaluations cover the whole job under every model (a fast rank 0 would stop
evaluating while the straggler still trains, under eventual).

Reported per setting, from the rank-0 evaluation records of the run's metrics.jsonl
("time" is seconds since rank 0's app started, data generation included):

* time to target: the first evaluation with test log-loss <= the target. The target is
  the test log-loss sequential (BSP) reaches at its last evaluation, loosened by
  ``--slack`` (relative, 0.5 % by default: the models end within a few 1e-4 of each
  other, so an exact target would be decided by noise at the very last evaluation),
  unless ``--target`` gives a fixed value;
* the final test log-loss (rank 0's last evaluation, after the last epoch);
* job seconds (the app's run time on rank 0, which finishes last) and the wall time of
  the whole ``psd run`` (cluster start-up and shutdown included);
* straggler events: how many times the scheduler flagged a worker (lag > straggler_lag).

With ``--repeat N`` every setting runs N times (settings interleaved) and the table shows
medians with each run's value. Writes ``results.json`` and ``logloss_vs_time.png`` to ``--out``
(runs/bench_consistency/ by default) and each run's own output folder under it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = [  # (label, consistency, max_delay)
    ("sequential", "sequential", None),
    ("bounded tau=1", "bounded", 1),
    ("bounded tau=2", "bounded", 2),
    ("bounded tau=4", "bounded", 4),
    ("bounded tau=8", "bounded", 8),
    ("bounded auto", "bounded", "auto"),
    ("eventual", "eventual", None),
]


def job_spec(label: str, consistency: str, max_delay, args) -> dict:
    spec = {
        "name": "bench_" + label.replace(" ", "_").replace("=", ""),
        "app": "logreg_sgd",
        "servers": 2,
        "workers": 4,
        "consistency": consistency,
        "timeout": args.timeout,
        "data": {"generator": "sparse_logreg", "seed": 42, "examples": args.examples,
                 "features": args.features, "nnz": 20, "noise": 0.05, "test_fraction": 0.1},
        "train": {"epochs": args.epochs, "batch_size": 500, "learning_rate": 0.5,
                  "eval_every": args.eval_every, "slow_rank": 0, "slow_seconds": args.slow_seconds},
    }
    if max_delay is not None:
        spec["max_delay"] = max_delay
    return spec


def run_setting(label: str, consistency: str, max_delay, args, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    job_path = folder / "job.yaml"
    job_path.write_text(yaml.safe_dump(job_spec(label, consistency, max_delay, args), sort_keys=False))
    started = time.monotonic()
    with open(folder / "run.log", "wb") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "psd", "run", str(job_path), "--quiet",
                                   "--output", str(folder)], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=args.timeout + 60,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.monotonic() - started
    records = []
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = sorted(((r["time"], r["test_logloss"]) for r in records
                    if r.get("rank") == 0 and "test_logloss" in r and "time" in r),
                   key=lambda p: p[0])
    summary = {}
    if (folder / "summary.json").exists():
        summary = json.loads((folder / "summary.json").read_text())
    return {"label": label, "consistency": consistency, "max_delay": max_delay, "exit": code,
            "state": summary.get("state"), "wall": wall, "evals": evals,
            "final_logloss": evals[-1][1] if evals else None,
            "job_seconds": max((r["time"] for r in records if r.get("rank") == 0 and "time" in r),
                               default=None),
            "straggler_events": sum(1 for r in records if r.get("event") == "straggler"),
            "released_shards": sum(1 for r in records if r.get("event") == "shard_released")}


def time_to(evals: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, loss in evals if loss <= target), None)


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def plot(results: list[dict], target: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for r in results:
        if r["evals"]:
            ax.plot([t for t, _ in r["evals"]], [v for _, v in r["evals"]], marker="o",
                    markersize=2, label=r["label"])
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.4f}")
    finals = [r["final_logloss"] for r in results if r["final_logloss"] is not None]
    if finals:
        ax.set_ylim(min(finals + [target]) - 0.01, 0.70)
    ax.set_xlabel("time since rank 0 started (s)")
    ax.set_ylabel("test log-loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (< 2 min)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_consistency"))
    ap.add_argument("--target", type=float,
                    help="a fixed target log-loss (default: sequential's final, times 1 + slack)")
    ap.add_argument("--slack", type=float, default=0.005,
                    help="relative slack on sequential's final log-loss for the target (default 0.005)")
    ap.add_argument("--slow-seconds", type=float, help="rank 0's sleep per minibatch")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (medians are reported)")
    ap.add_argument("--only", nargs="*", help="run only these settings (labels, e.g. 'eventual')")
    args = ap.parse_args()
    if args.quick:
        defaults = dict(examples=40_000, features=200_000, epochs=2, eval_every=6, slow_seconds=0.03)
    else:
        defaults = dict(examples=100_000, features=1_000_000, epochs=4, eval_every=10, slow_seconds=0.05)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.timeout = 300
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    settings = [s for s in SETTINGS if not args.only or s[0] in args.only]
    print(f"logreg_sgd, 2 servers, 4 workers, rank 0 sleeps {args.slow_seconds} s per minibatch of 500; "
          f"{args.examples} examples, {args.features} features, {args.epochs} epochs, "
          f"rank 0 evaluates every {args.eval_every} minibatches; {args.repeat} run(s) per setting",
          flush=True)
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in settings}
    for rep in range(args.repeat):   # settings interleaved, so drift hits them alike
        for label, consistency, max_delay in settings:
            folder = out / label.replace(" ", "_").replace("=", "")
            if args.repeat > 1:
                folder = folder / f"run{rep + 1}"
            r = run_setting(label, consistency, max_delay, args, folder)
            print(f"  {label} (run {rep + 1}): {r['state'] or r['exit']}, final test log-loss "
                  f"{fmt(r['final_logloss'], '.4f')}, {r['wall']:.1f} s", flush=True)
            runs[label].append(r)

    seq_finals = [r["final_logloss"] for r in runs.get("sequential", []) if r["final_logloss"] is not None]
    if args.target is not None:
        target, how = args.target, "fixed (--target)"
    elif seq_finals:
        base = statistics.median(seq_finals)
        target = base * (1 + args.slack)
        how = f"sequential's final test log-loss {base:.4f} + {100 * args.slack:g} %"
    else:
        base = min(r["final_logloss"] for rs in runs.values() for r in rs if r["final_logloss"] is not None)
        target, how = base * (1 + args.slack), f"the best final test log-loss {base:.4f} + {100 * args.slack:g} %"
    for rs in runs.values():
        for r in rs:
            r["time_to_target"] = time_to(r["evals"], target)

    def med(values: list) -> float | None:
        """Median, counting a missing value (target never reached) as infinitely late."""
        if not values:
            return None
        m = statistics.median([math.inf if v is None else v for v in values])
        return None if math.isinf(m) else m

    def cell(rs: list[dict], key: str, spec: str) -> str:
        text = fmt(med([r[key] for r in rs]), spec)
        if len(rs) > 1:
            text += " (" + ", ".join(fmt(r[key], spec) for r in rs) + ")"
        return text

    print(f"\ntarget test log-loss {target:.4f} ({how})")
    if args.repeat > 1:
        print(f"cells: median over {args.repeat} runs (each run in parentheses; '-': not reached)")
    print()
    headers = ["setting", "time to target (s)", "final log-loss", "job (s)", "wall (s)",
               "straggler events", "state"]
    rows = [[label, cell(rs, "time_to_target", ".2f"), cell(rs, "final_logloss", ".4f"),
             cell(rs, "job_seconds", ".2f"), cell(rs, "wall", ".1f"),
             str(sum(r["straggler_events"] for r in rs)),
             ",".join(sorted({str(r["state"] or r["exit"]) for r in rs}))] for label, rs in runs.items()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())

    plot([next((r for r in rs if r["evals"]), rs[0]) for rs in runs.values()], target,
         out / "logloss_vs_time.png",
         f"test log-loss vs time, rank 0 slowed by {args.slow_seconds} s/minibatch"
         + (" (first complete run of each)" if args.repeat > 1 else ""))
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "target": target, "target_rule": how, "runs": runs}, indent=2))
    print(f"\nplot: {out / 'logloss_vs_time.png'}; data: {out / 'results.json'}")
    failed = sorted({label for label, rs in runs.items() for r in rs if r["state"] != "done"})
    if failed:
        print(f"runs that did not finish cleanly: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

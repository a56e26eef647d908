#!/usr/bin/env python
"""Consistency models against stragglers: the quickstart logistic regression, 4 workers,
under sequential, bounded tau = 1, 2, 4, 8, bounded auto and eventual.

    .venv/bin/python scripts/bench_consistency.py --repeat 3          # the default run, ~25 min
    .venv/bin/python scripts/bench_consistency.py --quick --repeat 3  # smaller data, ~12 min
    .venv/bin/python scripts/bench_consistency.py --straggler fixed   # rank 0 always slow

Each setting is one ``psd run`` of a job file written for it (the app
``psd/apps/logreg_sgd.py``; job keys ``consistency:`` and ``max_delay:``), on its own local
cluster of 2 servers and 4 worker daemons, at the app's data-scaled step.

Stragglers (``--straggler``):

* ``transient`` (default): every minibatch of every worker is slow with probability
  ``--slow-chance`` (0.1); a slow minibatch sleeps ``--slow-seconds`` (0.2 s, about four
  times a minibatch's usual time here) after its gradient (``train.slow_chance``,
  ``train.slow_seconds``). Slowness comes and goes between the workers, as on a shared
  cluster. Under sequential every clock waits for the slowest of the four (a third of
  the clocks have a slow one); bounded delay lets the others run on while one is slow,
  and the slow one catch up after, so the delays average out when tau holds a slow
  streak. A sleep and not ``--slow-factor`` times the minibatch's own work: the
  gradient of 500 rows of 20 features is a small share of a minibatch here (the rest is
  the pull and push), so stretching it alone slows little.
* ``fixed``: rank 0 is always slow: ``--slow-factor`` times its own work plus
  ``--slow-seconds``. Every gated model then runs at rank 0's pace (the others may get
  only tau clocks ahead): it shows the limit of bounded delay, not its gain.

Rank 0 evaluates the test log-loss every ``--eval-every`` of its minibatches
(``train.eval_every``) and at each epoch. Under eventual nothing waits for rank 0, so
its last evaluation may come before another worker's last pushes (transient stragglers
slow every rank alike, so rank 0 is not always the last to finish). Reported per setting, from rank 0's evaluation
records ("time": seconds since rank 0's app started, data generation included):

* time to target: the first evaluation with test log-loss <= the target. The target is
  the test log-loss sequential (BSP) reaches at its last evaluation, loosened by
  ``--slack`` (relative, 0.5 % by default: the models end within a few 1e-4 of each
  other, so an exact target would be decided by noise at the very last evaluation),
  unless ``--target`` gives a fixed value; and its ratio to sequential's (the median
  over the repetitions of the per-repetition ratios: settings run interleaved, so one
  repetition's runs share the machine's load);
* the final test log-loss (rank 0's last evaluation, after the last epoch);
* job seconds (rank 0's last evaluation time) and the wall time of the whole ``psd
  run`` (cluster start-up and shutdown included);
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
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "eval_every": args.eval_every,
                  "slow_factor": args.slow_factor, "slow_seconds": args.slow_seconds},
    }
    if args.straggler == "fixed":
        spec["train"]["slow_rank"] = 0
    else:
        spec["train"]["slow_chance"] = args.slow_chance
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
            # rank 0's own records only: the scheduler's events (straggler flags) carry the
            # straggler's rank too, but a wall-clock time
            "job_seconds": evals[-1][0] if evals else None,
            "straggler_events": sum(1 for r in records if r.get("event") == "straggler"),
            "released_shards": sum(1 for r in records if r.get("event") == "shard_released")}


def time_to(evals: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, loss in evals if loss <= target), None)


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def plot(runs: dict[str, list[dict]], target: float, path: Path, title: str) -> None:
    """Left: test log-loss against time, the first complete run of each setting; right:
    time to target per setting (bar: median; dots: each run)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5), dpi=100)
    ax = fig.add_subplot(1, 2, 1)
    firsts = [next((r for r in rs if r["evals"]), rs[0]) for rs in runs.values()]
    for r in firsts:
        if r["evals"]:
            ax.plot([t for t, _ in r["evals"]], [v for _, v in r["evals"]], marker="o",
                    markersize=2, label=r["label"])
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.4f}")
    finals = [r["final_logloss"] for r in firsts if r["final_logloss"] is not None]
    if finals:
        ax.set_ylim(min(finals + [target]) - 0.01, 0.70)
    ax.set_xlabel("time since rank 0 started (s)")
    ax.set_ylabel("test log-loss")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    bx = fig.add_subplot(1, 2, 2)
    labels = list(runs)
    for i, label in enumerate(labels):
        times = [r["time_to_target"] for r in runs[label] if r["time_to_target"] is not None]
        if times:
            bx.bar(i, statistics.median(times), color="tab:blue", alpha=0.5)
            bx.plot([i] * len(times), times, "o", color="black", markersize=4)
    bx.set_xticks(range(len(labels)))
    bx.set_xticklabels(labels, rotation=30, ha="right", fontsize="small")
    bx.set_ylabel("time to target (s)")
    bx.set_title("time to target: median (bar) and each run (dots)", fontsize="medium")
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
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
    ap.add_argument("--straggler", choices=("transient", "fixed"), default="transient",
                    help="transient: any worker's minibatch is slow with --slow-chance; fixed: rank 0 always")
    ap.add_argument("--slow-factor", type=float,
                    help="a slow minibatch also takes this many times its own work (default: transient 1, fixed 8)")
    ap.add_argument("--slow-chance", type=float, default=0.1,
                    help="transient: the probability that a minibatch is slow (default 0.1)")
    ap.add_argument("--slow-seconds", type=float,
                    help="a slow minibatch's sleep, in seconds (default: transient 0.2, fixed 0)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (medians are reported)")
    ap.add_argument("--only", nargs="*", help="run only these settings (labels, e.g. 'eventual')")
    args = ap.parse_args()
    if args.quick:
        defaults = dict(examples=40_000, features=200_000, epochs=6, eval_every=10)
    else:
        defaults = dict(examples=100_000, features=1_000_000, epochs=8, eval_every=15)
    defaults.update(slow_factor=1.0 if args.straggler == "transient" else 8.0,
                    slow_seconds=0.2 if args.straggler == "transient" else 0.0)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.timeout = 600
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    settings = [s for s in SETTINGS if not args.only or s[0] in args.only]
    slow_how = " + ".join([f"{args.slow_seconds:g} s"] * bool(args.slow_seconds)
                     + [f"{args.slow_factor:g}x its work"] * (args.slow_factor > 1)) or "not at all"
    slowness = (f"any minibatch slowed ({slow_how}) with probability {args.slow_chance:g}"
                if args.straggler == "transient" else f"rank 0's minibatches slowed ({slow_how})")
    args.slowness = slowness
    print(f"logreg_sgd, 2 servers, 4 workers, minibatches of {args.batch_size}, {slowness}; "
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
    seq_runs = runs.get("sequential", [])
    for rs in runs.values():   # speed-up over the same repetition's sequential run
        for i, r in enumerate(rs):
            base = seq_runs[i]["time_to_target"] if i < len(seq_runs) else None
            r["speedup"] = base / r["time_to_target"] if base and r["time_to_target"] else None

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
    headers = ["setting", "time to target (s)", "speed-up vs sequential", "final log-loss", "job (s)", "wall (s)",
               "straggler events", "state"]
    rows = [[label, cell(rs, "time_to_target", ".2f"), cell(rs, "speedup", ".2f"),
             cell(rs, "final_logloss", ".4f"),
             cell(rs, "job_seconds", ".2f"), cell(rs, "wall", ".1f"),
             str(sum(r["straggler_events"] for r in rs)),
             ",".join(sorted({str(r["state"] or r["exit"]) for r in rs}))] for label, rs in runs.items()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())

    plot(runs, target, out / "logloss_vs_time.png",
         f"test log-loss vs time, {slowness}"
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

#!/usr/bin/env python3
"""Run the deterministic simulation (psd/sim) for as long as asked, over fresh seeds, and
print every failing seed with the command that replays it.

    python scripts/sim_soak.py --minutes 30            # all three consistency models in turn
    python scripts/sim_soak.py --seed 1234 --consistency bounded -v   # replay one, with its log
    python scripts/sim_soak.py --minutes 10 --pace long   # the schedules before decision 136
    python scripts/sim_soak.py --minutes 30 --mix        # workload features mixed per seed
    python scripts/sim_soak.py --seed 500406 --consistency eventual --mix -v   # replay one of those

It uses every core (one process each) and shows progress once a second. With ``--mix``
each seed also turns on a mix of the optional workload features (``psd.sim.run.MIX``: key caching,
pull filters, spans, pushpulls, older clients' pushpulls, BSP, checkpoints, restore, an
evicting table), drawn from the seed itself, so ``--seed N --mix`` replays it; the
suite runs each feature on seeds of its own, never together.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psd.sim import settings_for, simulate  # noqa: E402
from psd.sim.run import MIX, PACES, mixed_settings  # noqa: E402

MODELS = ("eventual", "bounded", "sequential")


def settings(seed: int, consistency: str, mix: bool) -> dict:
    return mixed_settings(seed, consistency) if mix else settings_for(seed, consistency)


def one(args: tuple[int, str, str, bool]) -> tuple[int, str, str | None, int]:
    seed, consistency, pace, mix = args
    logging.disable(logging.CRITICAL)
    outcome = simulate(seed, pace=pace, **settings(seed, consistency, mix))
    return seed, consistency, None if outcome.ok else outcome.describe(), outcome.messages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="how long to run (default 5)")
    ap.add_argument("--start", type=int, default=100_000, help="first seed (default 100000: past the suite's)")
    ap.add_argument("--consistency", choices=MODELS, help="one model only (default: all three in turn)")
    ap.add_argument("--seed", type=int, help="run this one seed and print its fault log")
    ap.add_argument("--pace", choices=sorted(PACES), default="short",
                    help="when things happen in a run (psd.sim.run.PACES; default short, the suite's)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mix", action="store_true", help="each seed also turns on optional workload features (MIX)")
    ap.add_argument("-v", "--verbose", action="store_true", help="with --seed: the cores' log lines too")
    args = ap.parse_args()
    if args.seed is not None:
        if args.verbose:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        from psd.sim.run import Run, Settings
        run = Run(args.seed, Settings(**settings(args.seed, args.consistency or "eventual", args.mix), pace=args.pace))
        outcome = run.run()
        print("\n".join(run.world.log))
        print(outcome.describe())
        return 0 if outcome.ok else 1
    models = [args.consistency] if args.consistency else list(MODELS)
    jobs = ((seed, models[i % len(models)], args.pace, args.mix) for i, seed in enumerate(itertools.count(args.start)))
    end = time.monotonic() + 60 * args.minutes
    done = failed = messages = 0
    last = 0.0
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        running = {pool.submit(one, next(jobs)) for _ in range(2 * args.workers)}
        while running:
            finished, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in finished:
                seed, consistency, failure, sent = fut.result()
                done, messages = done + 1, messages + sent
                if failure:
                    failed += 1
                    mixed = f" --mix -v   # with {', '.join(f for f in MIX if settings(seed, consistency, True).get(f))}" \
                        if args.mix else " -v"
                    print(f"\nFAILED {failure}\n  replay: python scripts/sim_soak.py --seed {seed} "
                          f"--consistency {consistency} --pace {args.pace}{mixed}", flush=True)
                if time.monotonic() < end:
                    running.add(pool.submit(one, next(jobs)))
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                left = max(0.0, end - last)
                print(f"\r{done} schedules, {failed} failed, {messages} messages simulated; {left:5.0f} s left",
                      end="", flush=True)
    print(f"\n{done} schedules, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

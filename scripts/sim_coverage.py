#!/usr/bin/env python3
"""What a set of simulation seeds covers, and what it finds per CPU second, for two
paces or two trees side by side (decision 136).

    python scripts/sim_coverage.py faults --pace long:eventual=400,bounded=300,sequential=300 \\
                                          --pace short:eventual=800,bounded=600,sequential=600
    python scripts/sim_coverage.py mutations --pace long --pace short --seeds 60
    python scripts/sim_coverage.py faults --pace short:any/checkpoints=64@9300,any/restore=30@9400
    python scripts/sim_coverage.py mutations --pace short --tree /tmp/old --seeds 60

``faults`` counts, over each seed set (``settings_for`` settings, as tests/test_sim.py
runs them), the faults that took effect: kills, restarts, joins, stalls past the
failure timeout (heartbeat_interval x heartbeat_misses) of servers and of the
scheduler, partitions of each shape, dropped connections, ring changes after the
workers started, checkpoints (asked, taken with a manifest, failed, servers killed
mid-cut, failed writes: a model named ``MODEL/checkpoints`` runs its seeds with
``Settings.checkpoints``; ``MODEL/restore`` with ``Settings.restore`` at replication 1:
servers lost with the only copy, restores, keys restored, push slots allowed lost; a
model ``any`` takes it by seed % 3, and ``=N@FIRST`` runs seeds FIRST to FIRST + N - 1:
``any/checkpoints=64@9300`` are tests/test_sim.py's checkpoint seeds), and the CPU
seconds the set took. ``mutations`` switches off each
guarantee the mutation tests of tests/test_sim.py switch off, runs ``--seeds`` seeds of
that test's settings (every one, not up to the first hit) and prints how many seeds
found it and the hits per CPU second. Each column runs in a fresh process of its tree
(``--tree``: a checkout before paces existed runs its one pace, the long one).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import collections, contextlib, json, logging, re, sys, time
from unittest import mock
logging.disable(logging.CRITICAL)
import psd.store.kernels as kernels
kernels.warm()
from psd.sim.run import Run, Settings, settings_for
task, pace, arg = json.loads(sys.argv[1])
PACED = "pace" in Settings.__dataclass_fields__
if pace.startswith("{"):  # a pace of one's own: SHORT with these fields changed
    import dataclasses
    import psd.sim.run as sim_run
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(pace).items()}
    sim_run.PACES[pace] = dataclasses.replace(sim_run.SHORT, **fields)


def settings(seed, **kw):
    if PACED:
        kw["pace"] = pace
    elif pace != "long":
        raise SystemExit(f"this tree has only the long pace, not {pace!r}")
    if "faults" in kw:
        kw["faults"] = tuple(kw["faults"])
    return Settings(**kw)


def faults(seed_sets):
    counts = collections.Counter()
    seeds = 0
    start = time.process_time()
    for model, n in seed_sets.items():
        consistency, _, extra = model.partition("/")
        n, first = n if isinstance(n, list) else (n, 0)
        for seed in range(first, first + n):
            # ("any": the model by seed % 3, as tests/test_sim.py's checkpoint seeds run)
            kw = settings_for(seed, ("eventual", "bounded", "sequential")[seed % 3] if consistency == "any"
                              else consistency)
            if extra == "checkpoints":  # (Settings.checkpoints)
                kw["checkpoints"] = True
            elif extra == "restore":  # (Settings.restore: one copy, lost and restored)
                kw.update(checkpoints=True, restore=True, replication=1)
            run = Run(seed, settings(seed, **kw))
            first = {}
            when = run.pace.start if PACED else 0.3
            run.world.at(when, lambda: first.setdefault("ring", run.scheduler.core.state.ring.version), None)
            out = run.run()
            seeds += 1
            counts["violations"] += bool(out.violations)
            timeout = run.config.heartbeat_interval * run.config.heartbeat_misses
            kinds = collections.Counter(f.split("@")[0] for f in out.faults)
            for line in run.world.log:
                what = line.split(None, 1)[1]
                if what.startswith("kill "):
                    counts["kills"] += 1
                m = re.match(r"stall (\S+) for ([\d.]+) s", what)
                if m and float(m.group(2)) > timeout:
                    counts["scheduler stalls past timeout" if m.group(1) == "sched" else
                           "server stalls past timeout"] += 1
                elif m:
                    counts["server stalls under timeout"] += 1
            counts["restarts"] += len(run.servers) - run.s.servers - kinds["join"]
            counts["joins"] += kinds["join"]
            counts["scheduler cut from every process"] += kinds["cut_scheduler"]
            counts["server cut from scheduler only"] += kinds["cut_server_from_scheduler"]
            counts["server cut from every process"] += kinds["cut_server"]
            counts["one-way cuts"] += kinds["one_way"]
            counts["worker cut from scheduler"] += kinds["cut_worker"]
            counts["connection drops"] += kinds["drop"]
            counts["ring changes"] += run.scheduler.core.state.ring.version - first.get("ring", 0)
            counts["checkpoints asked by the admin"] += kinds["checkpoint"]
            for k, v in getattr(out, "checkpoints", {}).items():
                if k in ("taken", "failed", "killed mid-cut", "write failures", "lost", "restores",
                         "keys restored", "slots allowed lost"):
                    counts[f"checkpoints: {k}"] += v
            counts["pushes"] += out.pushes
            counts["pulls"] += out.pulls
            counts["messages"] += out.messages
    cpu = time.process_time() - start
    return {"seeds": seeds, "cpu": cpu, **counts}


def _lend_released():
    import psd.store.table as table
    lend = table.Table._lend

    def released_at_once(self, view, leases):
        out = lend(self, view, leases)
        for lease in leases or ():
            lease.release()
        return out
    return mock.patch.object(table.Table, "_lend", released_at_once)


def _no_clear():
    import psd.core.bounds as bounds
    import psd.core.server as server
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(bounds.Bounds, "copy_begins", lambda self, r: None))
    stack.enter_context(mock.patch.object(server.ServerCore, "_drop_rows_in", lambda self, r: None))
    return stack


def _patch(module, attr, value):
    import importlib
    mod = importlib.import_module(module)
    owner, _, name = attr.rpartition(".")
    return mock.patch.object(getattr(mod, owner) if owner else mod, name, value)


ONE_MESSAGE = dict(push_keys=6, keys_per_worker=8,
                   faults=("kill_mid_forward", "kill_mid_forward", "kill", "join", "drop", "stall"))
# name -> (the switch, the settings of its test in tests/test_sim.py)
MUTATIONS = {
    "exactly once off": (lambda: _patch("psd.core.seen", "Seen.__contains__", lambda self, key: False),
                         lambda s: {}),
    "forwarding off": (lambda: _patch("psd.core.server", "ServerCore._forward", lambda self, *a, **k: None),
                       lambda s: {}),
    "gate open (bounded)": (lambda: _patch("psd.core.gate", "Policy.pull",
                                           lambda self, rid, worker, clock, run, now: (run(), True)[1]),
                            lambda s: {"consistency": "bounded"}),
    "gate open (sequential)": (lambda: _patch("psd.core.gate", "Policy.pull",
                                              lambda self, rid, worker, clock, run, now: (run(), True)[1]),
                               lambda s: {"consistency": "sequential"}),
    "stream order off": (lambda: _patch("psd.core.server", "BREAKING", ()),
                         lambda s: {"faults": ("stall_long",), "outstanding": 10}),
    "leases off": (_lend_released, lambda s: {"consistency": "sequential"}),
    "evict records off": (lambda: _patch("psd.core.bounds", "Bounds.on_evict",
                                         lambda self, route, msg, now: msg.reply()),
                          lambda s: {"bounded": True}),
    "copy clearing off": (_no_clear, lambda s: {"bounded": True, **settings_for(s, "bounded")}),
    "partial forward noted whole": (lambda: _patch("psd.core.server", "_cover", lambda value, rows: None),
                                    lambda s: {**ONE_MESSAGE,
                                               "consistency": "bounded" if s % 3 == 1 else "eventual"}),
}


def mutations(n, only):
    out = {}
    for name, (switch, kw) in MUTATIONS.items():
        if only and name not in only:
            continue
        hits, first = 0, None
        start = time.process_time()
        with switch():
            for seed in range(n):
                if not Run(seed, settings(seed, **kw(seed))).run().ok:
                    hits += 1
                    first = seed if first is None else first
        out[name] = {"hits": hits, "first": first, "cpu": time.process_time() - start}
    return out


print(json.dumps(faults(arg) if task == "faults" else mutations(*arg)))
"""


def child(tree: Path, task: str, pace: str, arg) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([task, pace, arg])], env=env, cwd=tree,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tree} ({pace}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _seed_sets(text: str) -> dict:
    sets = {}
    for part in text.split(","):
        model, _, n = part.partition("=")
        n, _, first = n.partition("@")
        sets[model] = [int(n), int(first)] if first else int(n)
    return sets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("faults", "mutations"))
    ap.add_argument("--pace", action="append", required=True,
                    help="a column: PACE (mutations) or PACE:MODEL=N,MODEL=N (faults); repeatable. PACE is a "
                         "name of psd.sim.run.PACES or a JSON object of fields changed from SHORT")
    ap.add_argument("--tree", help="run the first column in this checkout instead of this one")
    ap.add_argument("--seeds", type=int, default=60, help="mutations: seeds per mutation (default 60)")
    ap.add_argument("--only", action="append", help="mutations: this one only (its name as printed; repeatable)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    columns = []
    for i, spec in enumerate(args.pace):
        tree = Path(args.tree).resolve() if args.tree and i == 0 else HERE
        cut = spec.rfind("}") + 1 if spec.startswith("{") else spec.find(":") % (len(spec) + 1)
        pace, sets = spec[:cut], spec[cut + 1:]
        label = f"{pace if not pace.startswith('{') else 'custom ' + str(i)}" + (f" ({tree.name})" if args.tree else "")
        if args.task == "faults":
            columns.append((label, child(tree, "faults", pace, _seed_sets(sets))))
        else:
            columns.append((label, child(tree, "mutations", pace, [args.seeds, args.only or []])))
        print(f"{label} done", file=sys.stderr, flush=True)
    width = max(len(c[0]) for c in columns) + 2
    if args.task == "faults":
        rows = sorted({k for _, c in columns for k in c} - {"cpu", "seeds"})
        print(f"{'over each seed set':34s}" + "".join(f"{label:>{width}s}" for label, _ in columns))
        for key in ("seeds", "cpu", *rows):
            fmt = (lambda v: f"{v:.1f} s") if key == "cpu" else str
            print(f"{key:34s}" + "".join(f"{fmt(c.get(key, 0)):>{width}s}" for _, c in columns))
        cpu = [c["cpu"] / c["seeds"] * 1000 for _, c in columns]
        print(f"{'CPU ms per seed':34s}" + "".join(f"{x:>{width}.1f}" for x in cpu))
    else:
        print(f"hits of {args.seeds} seeds; hits per CPU second")
        print(f"{'mutation':30s}" + "".join(f"{label:>{2 * width}s}" for label, _ in columns)
              + "".join(f"{'ratio ' + label:>{width + 8}s}" for label, _ in columns[1:]))
        for name in columns[0][1]:
            cells = [c[name] for _, c in columns]
            rates = [x["hits"] / x["cpu"] if x["cpu"] else 0.0 for x in cells]
            line = f"{name:30s}" + "".join(f"{x['hits']:>{width}d}{r:>{width}.2f}" for x, r in zip(cells, rates))
            line += "".join(f"{(r / rates[0] if rates[0] else float('inf')):>{width + 8}.2f}" for r in rates[1:])
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(columns), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

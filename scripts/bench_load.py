#!/usr/bin/env python
"""Load benchmark: many concurrent worker processes pushing and pulling against one cluster.

    .venv/bin/python scripts/bench_load.py                    # 32 clients, 20 s
    .venv/bin/python scripts/bench_load.py --clients 1,8,32   # one run per client count
    .venv/bin/python scripts/bench_load.py --quick            # 32 clients, 8 s

For each client count it starts a fresh ``psd.LocalCluster`` (``--servers``, default 2;
CurveZMQ on, as by default) and that many client processes, through the driver the load
test uses (tests/loadworker.py, ``run_load``). All clients start together; each loops for
``--seconds``: push ``--keys`` random keys of a 4,101-key pool into an int64 table and
wait for the ack, then pull ``--keys`` other keys (optionally ``--think`` ms of pause).
Latencies are measured in the client processes. Afterwards every key must hold exactly
the sum of the acked pushes; any failed request or wrong sum makes the run exit 1.

Printed, per client count: pull and push latency percentiles (p50/p95/p99/max), the
throughput (requests/s, a push+pull round is two requests), and each daemon's resident
memory and open file descriptors: idle, with the clients connected, after the warm-up,
at the end of the run, and after the clients left.

Results: the table on stdout, plus ``results.json`` and ``load.png`` (latency
percentiles per client count; RSS and file descriptors over time for the largest
count) in ``--out`` (default runs/bench_load). The 1-minute load average is printed: on
a machine doing other work the latencies say more about it than about psd. The whole
run is bounded by ``--budget`` seconds: past it every child is stopped and the script
exits 3.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the load driver, shared with tests/test_load.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402
import loadworker  # noqa: E402

LABELS = ("idle", "connected", "warm", "end", "left")


def row_of(report: dict) -> dict:
    """The printed figures of one run."""
    pull, push = report["pull"], report["push"]
    daemons = {}
    for name, samples in report["samples"].items():
        at = {}
        for label, s in samples:
            at[label] = s  # the last sample of each label
        daemons[name] = {label: {"rss_mib": at[label]["rss"] / 2**20, "fds": at[label]["fds"]}
                         for label in LABELS if label in at}
    return {"clients": report["clients"], "requests": report["requests"], "rps": report["throughput_rps"],
            "pull": pull, "push": push, "daemons": daemons, "errors": len(report["errors"]),
            "wrong_keys": report["wrong_keys"], "loadavg": report["loadavg"][0]}


def print_table(rows: list[dict]) -> None:
    head = ("clients", "req/s", "pull p50", "p95", "p99", "max", "push p50", "p95", "p99", "max", "errors")
    lines = []
    for r in rows:
        ms = lambda x, k: f"{x[k] / 1e3:.2f}"  # noqa: E731
        lines.append((str(r["clients"]), bc.fmt_num(r["rps"]),
                      *(ms(r["pull"], k) for k in ("p50_us", "p95_us", "p99_us", "max_us")),
                      *(ms(r["push"], k) for k in ("p50_us", "p95_us", "p99_us", "max_us")),
                      str(r["errors"] + r["wrong_keys"])))
    _print(head, lines, "latencies in ms, measured in the client processes")
    head = ("clients", "daemon", *(f"RSS {lab}" for lab in LABELS), *(f"fds {lab}" for lab in LABELS))
    lines = []
    for r in rows:
        for name, d in r["daemons"].items():
            lines.append((str(r["clients"]), name,
                          *(f"{d[lab]['rss_mib']:.1f}" if lab in d else "-" for lab in LABELS),
                          *(str(d[lab]["fds"]) if lab in d else "-" for lab in LABELS)))
    print()
    _print(head, lines, "RSS in MiB; fds = open file descriptors (/proc/PID/fd)")


def _print(head: tuple, lines: list[tuple], note: str) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    print(f"# {note}")
    print(fmt.format(*head))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line))


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    counts = [r["clients"] for r in reports]
    x = np.arange(len(counts))
    width = 0.13
    bars = [(f"pull {p}", r_key, p) for r_key in ("pull", "push") for p in ("p50", "p95", "p99")]
    for i, (label, what, p) in enumerate(bars):
        ys = [r[what][f"{p}_us"] / 1e3 for r in reports]
        ax.bar(x + (i - len(bars) / 2 + 0.5) * width, ys, width, label=f"{what} {p}",
               color=("#1f77b4", "#6baed6", "#c6dbef", "#d62728", "#fc9272", "#fee0d2")[i], edgecolor="black",
               linewidth=0.4)
    ax.set_xticks(x, [f"{c} client{'s' if c != 1 else ''}" for c in counts])
    ax.set_ylabel("ms (lower is better)")
    ax.set_yscale("log")
    ax.set_title("latency percentiles (in the clients)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    big = max(reports, key=lambda r: r["clients"])
    t0 = min(s["t"] for v in big["samples"].values() for _, s in v)
    for ax, key, scale, ylabel in ((axes[1], "rss", 2**20, "resident memory, MiB"),
                                   (axes[2], "fds", 1, "open file descriptors")):
        for name, samples in big["samples"].items():
            ax.plot([s["t"] - t0 for _, s in samples], [s[key] / scale for _, s in samples], marker="o",
                    markersize=3, label=name)
        ax.set_ylim(bottom=0)
        for label in ("connected", "warm", "end", "left"):
            ts = [s["t"] - t0 for at, s in next(iter(big["samples"].values())) if at == label]
            if ts:
                ax.axvline(ts[-1], color="grey", linestyle=":", linewidth=1)
                ax.text(ts[-1], ax.get_ylim()[1], label, rotation=90, va="top", ha="right", fontsize=7)
        ax.set_xlabel("seconds")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} of each daemon ({big['clients']} clients)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"psd under load: {big['servers']} servers, {big['keys_per_request']} keys per request, "
                 f"{big['seconds']:g} s per run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="32", help="client process count, or a comma-separated list (default 32)")
    ap.add_argument("--seconds", type=float, default=None, help="length of each run (20; quick 8)")
    ap.add_argument("--servers", type=int, default=2, help="servers in the cluster (default 2)")
    ap.add_argument("--keys", type=int, default=16, help="keys per push and per pull (default 16)")
    ap.add_argument("--think", type=float, default=0.0, help="pause between rounds in each client, ms (default 0)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before the 'warm' sample (default 3)")
    ap.add_argument("--quick", action="store_true", help="8 s runs")
    ap.add_argument("--out", default="runs/bench_load", help="output folder (JSON and PNG)")
    ap.add_argument("--budget", type=float, default=None, help="hard time limit for the whole run, s")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    args.seconds = args.seconds or (8.0 if args.quick else 20.0)
    budget = args.budget or 120.0 + len(counts) * (args.seconds + 60.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def expire() -> None:  # the driver stops its children itself; this is the last resort
        print(f"\n!! benchmark exceeded its {budget:.0f} s budget; stopping", file=sys.stderr, flush=True)
        os._exit(3)

    watchdog = threading.Timer(budget, expire)
    watchdog.daemon = True
    watchdog.start()
    started = time.monotonic()
    reports = []
    try:
        for n in counts:
            print(f"[{time.monotonic() - started:6.1f} s] {n} clients x {args.seconds:g} s on {args.servers} "
                  f"servers ...", file=sys.stderr, flush=True)
            reports.append(loadworker.run_load(
                n, args.seconds, servers=args.servers, keys=args.keys, think_ms=args.think, warmup=args.warmup,
                log=lambda m: print(f"[{time.monotonic() - started:6.1f} s]   {m}", file=sys.stderr, flush=True)))
    finally:
        watchdog.cancel()
    rows = [row_of(r) for r in reports]
    print(f"\npsd load benchmark: {args.servers} servers, {args.keys} keys per request, {args.seconds:g} s per run, "
          f"think {args.think:g} ms; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print_table(rows)
    bad = [(r["clients"], r["errors"], r["wrong_keys"]) for r in rows if r["errors"] or r["wrong_keys"]]
    for r in reports:
        for seed, err in r["errors"][:3]:
            print(f"!! {r['clients']} clients: client {seed}: {err}")
        if r["wrong_keys"]:
            print(f"!! {r['clients']} clients: {r['wrong_keys']} keys differ from the acked pushes: {r['first_wrong']}")
    plot(reports, out / "load.png")
    host = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_avg": os.getloadavg()}
    (out / "results.json").write_text(json.dumps({"args": vars(args), "host": host, "rows": rows, "runs": reports,
                                                  "wall_s": time.monotonic() - started}, indent=1, default=float))
    print(f"\nwrote {out / 'results.json'} and {out / 'load.png'} ({time.monotonic() - started:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

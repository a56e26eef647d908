#!/usr/bin/env python
"""Backpressure benchmark: what one client's unawaited stream of large pushes costs the
server's memory and another client's small pulls.

    .venv/bin/python scripts/bench_backpressure.py            # 150 pushes of 1M keys
    .venv/bin/python scripts/bench_backpressure.py --quick    # 40 pushes

One ``psd.LocalCluster`` with one server. A probe process (its own client) pulls 10 keys
of another table every 2 ms and records each pull's latency. Three phases, side by side
in one run:

- ``idle``: the probe alone for 3 s (what a pull costs on this machine now);
- ``stream``: the probe while this process issues ``--pushes`` pushes of 1M scattered
  keys (12 MB each) without waiting, then waits for all of them, the probe pulling
  from the first push to the last ack (the case of tests/test_backpressure.py);
- ``stream, no pieces``: the same stream with the client's cut of large pushes into
  2 MiB pieces switched off (``psd.core.client.MAX_PUSH_BYTES`` raised), so a 12 MB push
  is one message: what the pieces buy the other client.

Printed per phase: pulls answered, p50/p99/max latency, the p99 over the idle p99, the
server's resident-memory growth over the phase and the stream's time. Every phase checks
that every push was applied exactly once. A PNG of the latency distributions goes to
``--out`` (default runs/bench_backpressure). The machine's load average is printed: on
a shared machine the latencies say as much about it as about psd.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psd  # noqa: E402
import psd.core.client as client_core  # noqa: E402

KEYS = 1_000_000

PROBE = """
import json, select, sys, time
import numpy as np
import psd
with psd.connect(sys.argv[1]) as kv:
    t = kv.table("probe", width=1, dtype="float32")
    keys = np.arange(10, dtype=np.uint64)
    kv.wait(t.push(keys, np.ones(10, np.float32)))
    print("ready", flush=True)
    while sys.stdin.readline().strip() == "go":  # pull until told to stop
        lat = []
        while not select.select([sys.stdin], [], [], 0)[0]:
            t0 = time.perf_counter()
            t.pull(keys)
            lat.append(time.perf_counter() - t0)
            time.sleep(0.002)
        sys.stdin.readline()
        print(json.dumps(lat), flush=True)
"""


class Probe:
    """The other client, in its own process: pulls for a given time on request."""

    def __init__(self, scheduler: str):
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, scheduler], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the probe client did not start")

    def _say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def start(self) -> None:
        self._say("go")

    def latencies(self) -> np.ndarray:
        """Stop pulling; the latencies (ms) of the pulls since ``start``."""
        self._say("stop")
        return np.array(json.loads(self.proc.stdout.readline())) * 1e3

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _peak_rss(pid: int, stop: threading.Event, peak: list) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)


def phase(name: str, kv, table, probe: Probe, server_pid: int, pushes: int, expect: list) -> dict:
    keys = np.arange(KEYS, dtype=np.uint64) * 7
    ones = np.ones((KEYS, 1), np.float32)
    start_rss = psutil.Process(server_pid).memory_info().rss
    stop, peak = threading.Event(), [start_rss]
    sampler = threading.Thread(target=_peak_rss, args=(server_pid, stop, peak), daemon=True)
    sampler.start()
    probe.start()
    t0 = time.monotonic()
    if pushes:
        stamps = [table.push(keys, ones) for _ in range(pushes)]
        for ts in stamps:
            kv.wait(ts)
        expect[0] += pushes
    else:
        time.sleep(3.0)
    stream = time.monotonic() - t0 if pushes else None
    lat = probe.latencies()
    stop.set()
    sampler.join()
    got = table.pull(keys)
    if not (got == expect[0]).all():
        raise SystemExit(f"{name}: keys hold {np.unique(got)[:5]}, not {expect[0]}: pushes lost or doubled")
    print(f"  {name}: {len(lat)} pulls, stream {stream or 0:.1f} s", file=sys.stderr, flush=True)
    return {"phase": name, "pulls": len(lat), "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "max": float(lat.max()),
            "rss_growth_mb": (peak[0] - start_rss) / 2**20, "stream_s": stream, "latencies": lat.tolist()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pushes", type=int, default=150)
    ap.add_argument("--quick", action="store_true", help="40 pushes")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_backpressure"))
    args = ap.parse_args()
    pushes = 40 if args.quick else args.pushes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {pushes} pushes of "
          f"{KEYS:,} keys (12 MB each)", flush=True)
    rows = []
    with psd.LocalCluster(servers=1) as cluster, psd.connect(cluster) as kv:
        table = kv.table("stream", width=1, dtype="float32")
        keys = np.arange(KEYS, dtype=np.uint64) * 7
        kv.wait(table.push(keys, np.ones((KEYS, 1), np.float32)))  # the table exists in full
        expect = [1]
        server = cluster.server(0).proc.pid
        probe = Probe(cluster.scheduler)
        try:
            rows.append(phase("idle", kv, table, probe, server, 0, expect))
            rows.append(phase("stream", kv, table, probe, server, pushes, expect))
            pieces = client_core.MAX_PUSH_BYTES
            client_core.MAX_PUSH_BYTES = 1 << 40
            try:
                rows.append(phase("stream, no pieces", kv, table, probe, server, pushes, expect))
            finally:
                client_core.MAX_PUSH_BYTES = pieces
        finally:
            probe.close()
    idle_p99 = rows[0]["p99"]
    head = ("phase", "pulls", "p50 ms", "p99 ms", "max ms", "p99/idle", "server RSS +MB", "stream s")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join([r["phase"], str(r["pulls"]), f"{r['p50']:.2f}", f"{r['p99']:.2f}", f"{r['max']:.1f}",
                          f"{r['p99'] / idle_p99:.1f}x", f"{r['rss_growth_mb']:.0f}",
                          "-" if r["stream_s"] is None else f"{r['stream_s']:.1f}"]))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, out / "backpressure.png")
    print(f"wrote {out / 'results.json'} and {out / 'backpressure.png'}")
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        lat = np.sort(r["latencies"])
        ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=r["phase"])
    ax.set_xscale("log")
    ax.set_xlabel("another client's 10-key pull latency (ms)")
    ax.set_ylabel("fraction of pulls")
    ax.axhline(0.99, color="grey", lw=0.5, ls=":")
    ax.legend()
    ax.set_title("small pulls during an unawaited stream of 12 MB pushes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What CurveZMQ costs: psd with ``security: none``, with ``security: curve`` on one
connection per server (``stripes: 1``), and with ``security: curve`` striped over
several connections (``stripes: auto``, the default), side by side in one run.

    .venv/bin/python scripts/bench_security.py            # about a minute
    .venv/bin/python scripts/bench_security.py --quick    # a few seconds, for a smoke test

Shared memory is off (``shm: false``) on both sides: on one host it would carry every
large payload unencrypted and leave nothing to measure; this is what crosses hosts.

Two ``psd.LocalCluster(servers=1)`` run at once, one per security setting; three
blocking clients (``psd.connect``) live in this process: one on the plaintext cluster
and two on the CurveZMQ one, with ``stripes: 1`` and with the default. Repetitions
alternate the order of the modes (none, curve1, curve, curve, curve1, none, ...), so a
machine that gets busier or quieter during the run affects all alike. ``--stripes N``
sets the striped client's count (and the curve cluster's I/O threads). Per repetition
and mode:

* dense push+pull of float32 vectors of 1e3, 1e5 and 1e6 keys:
  ``kv.wait(t.push_span(lo, v))`` then ``t.pull_span(lo, n)``; MB/s counts bytes pushed
  plus bytes pulled (1 MB = 1e6 B); the figure is the median over repetitions;
* the round trip of a small pull (10 keys): p50 and p99 over every sample;
* ``psd.connect`` + ``close`` (registration, including the CurveZMQ handshake);
* for reference, a bare pyzmq DEALER/ROUTER echo of the 1e6-key payload (4 MB) in this
  process, with and without CURVE: the ceiling libzmq's CURVE itself reaches here.

Before timing, each client checks that it pulls back what it pushed. Output: a table
with curve/none, curve1/none and curve/curve1 ratios on stdout, ``results.json`` and ``security.png`` in ``--out``
(default runs/bench_security/). Loopback only; the load average is printed because the
figures mean little on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

#: none: plaintext; curve1: CurveZMQ on one connection per server; curve: striped
MODES = ("none", "curve1", "curve")
ROOT = Path(__file__).resolve().parent.parent


def make_plan(quick: bool) -> dict:
    if quick:
        return {"mode": "quick", "dense_sizes": [1000, 100_000, 1_000_000],
                "dense_iters": {1000: 50, 100_000: 8, 1_000_000: 2}, "reps": 2,
                "lat_keys": 10, "lat_samples": 300, "lat_warmup": 50, "connects": 2}
    return {"mode": "full", "dense_sizes": [1000, 100_000, 1_000_000],
            "dense_iters": {1000: 300, 100_000: 40, 1_000_000: 8}, "reps": 7,
            "lat_keys": 10, "lat_samples": 2000, "lat_warmup": 200, "connects": 5}


class Client:
    """One mode's cluster and its blocking client."""

    def __init__(self, mode: str, cluster, stripes):
        import psd
        from psd.config import ClusterConfig

        self.mode = mode
        self.cluster = cluster
        config = ClusterConfig(scheduler=cluster.scheduler, shm=False, security="none" if mode == "none" else "curve",
                               stripes=1 if mode == "curve1" else stripes)
        self.config = config
        self.kv = psd.connect(self.cluster.scheduler, config)
        self.t = self.kv.table("bench" + mode, width=1, dtype="float32", updater="assign")

    def check(self, plan: dict) -> None:
        """The values come back: a client that silently did nothing fails the run."""
        for n in plan["dense_sizes"]:
            v = np.arange(n, dtype=np.float32)
            self.kv.wait(self.t.push_span(0, v))
            got = self.t.pull_span(0, n).ravel()
            if not np.array_equal(got, v):
                raise AssertionError(f"{self.mode}: dense {n}: got {got[:4]}..., expected {v[:4]}...")

    def dense(self, n: int, iters: int) -> float:
        """MB/s of ``iters`` push+pull rounds of ``n`` float32 keys."""
        v = np.ones(n, dtype=np.float32)
        kv, t = self.kv, self.t
        kv.wait(t.push_span(0, v))  # warm: first touch, connection
        t0 = time.perf_counter()
        for _ in range(iters):
            kv.wait(t.push_span(0, v))
            t.pull_span(0, n)
        return 2 * v.nbytes * iters / (time.perf_counter() - t0) / 1e6

    def latency(self, keys: np.ndarray, samples: int, warmup: int) -> list[float]:
        pull = self.t.pull
        for _ in range(warmup):
            pull(keys)
        out = []
        for _ in range(samples):
            t0 = time.perf_counter()
            pull(keys)
            out.append((time.perf_counter() - t0) * 1e6)
        return out

    def connect_ms(self) -> float:
        import psd

        t0 = time.perf_counter()
        psd.connect(self.cluster.scheduler, self.config).close()
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        self.kv.close()


def bare_echo(curve: bool, size: int, n: int) -> float:
    """MB/s of a bare pyzmq DEALER -> ROUTER echo of ``size`` bytes in this process (the
    ceiling libzmq itself reaches, with or without CURVE; no psd code)."""
    import threading

    import zmq

    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        if curve:
            server_public, server_secret = zmq.curve_keypair()
            client_public, client_secret = zmq.curve_keypair()
            router.curve_server, router.curve_secretkey = True, server_secret
            dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = \
                server_public, client_public, client_secret
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        payload = np.ones(size // 4, dtype=np.float32)

        def echo():
            for _ in range(n + 1):
                router.send_multipart(router.recv_multipart(copy=False), copy=False)
        th = threading.Thread(target=echo, daemon=True)
        th.start()
        dealer.send(payload, copy=False)
        dealer.recv(copy=False)
        t0 = time.perf_counter()
        for _ in range(n):
            dealer.send(payload, copy=False)
            dealer.recv(copy=False)
        rate = 2 * payload.nbytes * n / (time.perf_counter() - t0) / 1e6
        th.join(5)
        return rate
    finally:
        dealer.close(0)
        router.close(0)
        ctx.term()


def run(plan: dict, stripes) -> dict:
    import psd

    clusters = {"none": psd.LocalCluster(servers=1, security="none", shm=False),
                "curve": psd.LocalCluster(servers=1, security="curve", stripes=stripes, shm=False)}
    clients = {}
    try:
        for m in MODES:
            clients[m] = Client(m, clusters["none" if m == "none" else "curve"], stripes)
        for c in clients.values():
            c.check(plan)
        dense = {m: {n: [] for n in plan["dense_sizes"]} for m in MODES}
        lat = {m: [] for m in MODES}
        conn = {m: [] for m in MODES}
        bare = {m: [] for m in MODES}
        keys = np.arange(0, plan["lat_keys"] * 1000, 1000, dtype=np.uint64)
        for rep in range(plan["reps"]):
            order = MODES if rep % 2 == 0 else MODES[::-1]
            for m in order:
                c = clients[m]
                for n in plan["dense_sizes"]:
                    dense[m][n].append(c.dense(n, plan["dense_iters"][n]))
                lat[m] += c.latency(keys, plan["lat_samples"] // plan["reps"] + 1,
                                    plan["lat_warmup"] if rep == 0 else 20)
                if rep < plan["connects"]:
                    conn[m].append(c.connect_ms())
                if m != "curve":  # (one connection: the same for both curve modes)
                    bare[m].append(bare_echo(m != "none", 4 * max(plan["dense_sizes"]),
                                             plan["dense_iters"][max(plan["dense_sizes"])]))
            print(f"  repetition {rep + 1}/{plan['reps']} done", file=sys.stderr, flush=True)
        striped = clients["curve"].kv.aio._servers.values()
        stats = {"striped_out": sum(r.striped_out for r in striped),
                 "assembled_in": sum(r.assembler.assembled for r in striped),
                 "lost_in": sum(r.assembler.lost for r in striped)}
        if plan["dense_sizes"] and stats["striped_out"] == 0 and stripes != 1:
            raise AssertionError("the striped client sent nothing striped: the benchmark measures nothing")
    finally:
        for c in clients.values():
            c.close()
        for cl in clusters.values():
            cl.close()
    bare["curve"] = bare["curve1"]
    rows = []

    def row(test: str, unit: str, vals: dict, **extra) -> dict:
        return {"test": test, "unit": unit, **vals, "ratio": vals["curve"] / vals["none"],
                "ratio1": vals["curve1"] / vals["none"], "gain": vals["curve"] / vals["curve1"], **extra}
    for n in plan["dense_sizes"]:
        rows.append(row(f"dense {n:.0e} push+pull", "MB/s", {m: statistics.median(dense[m][n]) for m in MODES},
                        reps={m: dense[m][n] for m in MODES}))
    for q in (50, 99):
        rows.append(row(f"small pull {plan['lat_keys']} keys p{q}", "us",
                        {m: float(np.percentile(lat[m], q)) for m in MODES}, n={m: len(lat[m]) for m in MODES}))
    rows.append(row(f"bare pyzmq echo {4 * max(plan['dense_sizes']) / 1e6:g} MB", "MB/s",
                    {m: statistics.median(bare[m]) for m in MODES}, reps=bare))
    rows.append(row("connect + close", "ms", {m: statistics.median(conn[m]) for m in MODES}))
    return {"rows": rows, "stripes": stats}


def print_table(report: dict) -> None:
    head = ["test", "unit", "none", "curve1", "curve", "curve1/none", "curve/none", "curve/curve1"]
    body = [[r["test"], r["unit"], bc.fmt_num(r["none"]), bc.fmt_num(r["curve1"]), bc.fmt_num(r["curve"]),
             f"{r['ratio1']:.2f}", f"{r['ratio']:.2f}", f"{r['gain']:.2f}"] for r in report["rows"]]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    for line in [head, ["-" * w for w in widths], *body]:
        print("  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w) for i, (x, w) in enumerate(zip(line, widths))))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    panels = [([r for r in rows if r["unit"] == "MB/s"], "MB/s (pushed + pulled), higher is better",
               "dense push+pull throughput", lambda t: t.replace(" push+pull", "").replace("bare pyzmq echo", "bare")),
              ([r for r in rows if r["unit"] in ("us",)], "microseconds, lower is better",
               f"small-pull round trip ({report['plan']['lat_keys']} keys)", lambda t: t.split()[-1]),
              ([r for r in rows if r["unit"] == "ms"], "milliseconds, lower is better", "psd.connect + close",
               lambda t: "connect")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 2, 1]})
    colors = {"none": "#aec7e8", "curve1": "#ff9896", "curve": "#1f77b4"}
    names = {"none": "security: none", "curve1": "curve, 1 connection", "curve": "curve, striped"}
    for ax, (sub, ylabel, title, label) in zip(axes, panels):
        x = np.arange(len(sub))
        for i, m in enumerate(MODES):
            ys = [r[m] for r in sub]
            bars = ax.bar(x + (i - 1) * 0.27, ys, 0.27, label=names[m], color=colors[m],
                          edgecolor="black", linewidth=0.4)
            if m != "none":
                for b, r in zip(bars, sub):
                    ax.annotate(f"x{r['ratio' if m == 'curve' else 'ratio1']:.2f}",
                                (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [label(r["test"]) for r in sub])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CurveZMQ vs plaintext, 1 server, 1 client, loopback ({report['plan']['mode']} run; "
                 f"x = mode/none)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_security"), help="output folder")
    ap.add_argument("--stripes", default="auto", help="the striped client's connections per server (default auto)")
    args = ap.parse_args()
    stripes = args.stripes if args.stripes == "auto" else int(args.stripes)
    from psd.transport.stripes import stripe_count
    plan = make_plan(args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import zmq

    report = {"plan": {**plan, "dense_iters": {str(k): v for k, v in plan["dense_iters"].items()}},
              "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "pyzmq": zmq.__version__,
                       "libzmq": zmq.zmq_version(), "curve": zmq.has("curve"),
                       "loadavg_before": os.getloadavg()}}
    started = time.monotonic()
    report["plan"]["stripes"] = stripe_count(stripes)
    report.update(run(plan, stripes))
    report["seconds"] = time.monotonic() - started
    report["host"]["loadavg_after"] = os.getloadavg()
    before = report["host"]["loadavg_before"][0]
    print()
    print(f"psd security benchmark, {plan['mode']} mode, {report['host']['cpus']} CPUs, pyzmq "
          f"{zmq.__version__} / libzmq {zmq.zmq_version()}; 1 server, 1 client (psd.connect), loopback; "
          f"security none, curve on 1 connection (curve1) and curve striped over "
          f"{report['plan']['stripes']} connections (curve) alternating over {plan['reps']} repetitions; "
          f"throughput = median, MB = 1e6 B pushed + pulled; a ratio > 1 is better for MB/s, worse for us and ms")
    print(f"load average (1 min) before the run: {before:.2f}, after: {report['host']['loadavg_after'][0]:.2f}"
          + ("  -- WARNING: something else was using the CPUs; figures are noisy" if before > 0.5 else ""))
    print()
    print_table(report)
    print(f"\nstriped client: {report['stripes']['striped_out']} messages sent striped, "
          f"{report['stripes']['assembled_in']} replies put back together, {report['stripes']['lost_in']} lost")
    (out / "results.json").write_text(json.dumps(report, indent=1, default=float))
    plot(report, out / "security.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'security.png'} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The sparse logistic-regression job on emulated hosts: workers, link rates, tau.

    sudo .venv/bin/python scripts/bench_netcluster.py --quick   # about 3 minutes
    sudo .venv/bin/python scripts/bench_netcluster.py           # about 15 minutes

Each run builds an emulated cluster (psd.testing.netcluster: network namespaces on a
bridge, links shaped with tbf, CurveZMQ, daemons under a systemd-like supervisor) of 2
server hosts and W worker hosts, submits the shipped ``logreg`` job (delayed block
proximal gradient, bounded delay) with ``psd submit --follow`` from the operator host,
and reads back:

* **time to target**: seconds from the job's start until its objective first reaches
  ``--target`` (rank 0's evaluations, metrics.jsonl); and the job's wall time;
* **MB on the wire per host**: bytes through each host's link (both directions, from
  the bridge side's counters), per server host and per worker host;
* **network share**: the busier direction of the busiest link, over what its rate
  carries in the job's wall time (near 1: the network is the limit);
* **worker busy**: CPU seconds of the worker daemons over their wall time (the rest is
  waiting: for the network, the consistency gate, or a core).

Sweeps: W in 1, 2, 4 (and 8 in the full run) at 1 Gbit/s and 100 Mbit/s with tau = 1
(the shipped setting); then tau in 0, 1, 4, 8, auto at 100 Mbit/s with the most workers.
On 2 cores the absolute scale is CPU-bound (every host shares them): read ratios. A
table on stdout, results.json, and PNGs in ``--out``. Needs root (network namespaces);
exits 2 with the reason otherwise. Every namespace and process is removed at the end,
also on Ctrl-C or an error.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from psd.testing import NetCluster, unsupported  # noqa: E402

RATE_BITS = {"1gbit": 1e9, "100mbit": 1e8}


def job_file(folder: Path, name: str, workers: int, tau, data: dict, passes: int) -> Path:
    job = yaml.safe_load((ROOT / "configs" / "jobs" / "logreg.yaml").read_text())
    job.update(name=name, workers=workers, output=str(folder / name), max_delay=tau)
    job["data"].update(data)
    job["train"]["passes"] = passes
    if tau == "auto" or tau >= job["train"]["blocks"]:
        job["train"]["blocks"] = 16 if tau == "auto" else tau + 8
    job.pop("model", None)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def link_bytes(net: NetCluster) -> dict[str, tuple[int, int]]:
    """Bytes through each host's link so far, (received, sent) at the bridge side."""
    out = {}
    for host in net.hosts.values():
        stats = Path("/sys/class/net") / host.veth / "statistics"
        out[host.name] = (int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text()))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def worker_pids(net: NetCluster) -> list[int]:
    """The psd worker daemons (the supervisor starts them under `ip netns exec`, which
    execs: the unit's pid is the daemon's)."""
    return [u.pid for name, u in net.units.items() if "psd-worker" in name and u.pid]


def run_job(net: NetCluster, folder: Path, name: str, workers: int, rate: str, tau, args) -> dict:
    path = job_file(folder, name, workers, tau, {"examples": args.examples, "features": args.features},
                    args.passes)
    pids = worker_pids(net)
    before, cpu0, t0 = link_bytes(net), {p: cpu_seconds(p) for p in pids}, time.monotonic()
    out = net.exec("operator", net.psd_argv("submit", str(path), "--config", str(net.config_path), "--follow",
                                            "--quiet"), timeout=args.job_timeout, check=False)
    wall = time.monotonic() - t0
    after, cpu1 = link_bytes(net), {p: cpu_seconds(p) for p in pids}
    summary_path = folder / name / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if out.returncode != 0 or summary.get("state") != "done":
        raise RuntimeError(f"job {name} did not finish: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    records = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "objective" in r and "time" in r and r.get("rank", 0) == 0]
    reached = next((r["time"] for r in evals if r["objective"] <= args.target), None)
    each_way = {h: (after[h][0] - before[h][0], after[h][1] - before[h][1]) for h in after}
    moved = {h: sum(b) for h, b in each_way.items()}
    servers = [moved[h.name] for h in net.role_hosts("server")]
    clients = [moved[h.name] for h in net.role_hosts("client")]
    job_seconds = max((r["time"] for r in evals), default=wall)
    # a link is full duplex: its busier direction, over what the rate carries in the
    # submitted job's whole time (start-up and the final evaluation included)
    busiest = max(max(each_way[h.name]) for h in [*net.role_hosts("server"), *net.role_hosts("client")])
    return {"name": name, "workers": workers, "rate": rate, "tau": tau, "wall_s": round(wall, 2),
            "job_s": round(job_seconds, 2), "to_target_s": None if reached is None else round(reached, 2),
            "objective": round(summary["objective"], 5),
            "server_MB": round(sum(servers) / len(servers) / 1e6, 2),
            "worker_MB": round(sum(clients) / len(clients) / 1e6, 2),
            "net_share": round(busiest * 8 / (RATE_BITS[rate] * max(wall, 1e-3)), 3),
            "worker_busy": round(sum(cpu1[p] - cpu0[p] for p in pids) / (len(pids) * wall), 3)}


def show(rows: list[dict]) -> str:
    cols = ["workers", "rate", "tau", "to_target_s", "job_s", "objective", "server_MB", "worker_MB", "net_share",
            "worker_busy"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).rjust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_netcluster: matplotlib not installed; no plots", file=sys.stderr)
        return []
    made = []
    scale = [r for r in rows if r["tau"] == 1 and r["name"].startswith("scale")]
    if scale:
        fig, ax = plt.subplots(figsize=(6, 4))
        for rate in sorted({r["rate"] for r in scale}):
            pts = sorted((r["workers"], r["to_target_s"] or r["job_s"]) for r in scale if r["rate"] == rate)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=rate)
        ax.set(xlabel="worker hosts", ylabel="seconds to target objective", title="logreg on emulated hosts")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "workers.png")
        made.append(out / "workers.png")
    taus = [r for r in rows if r["name"].startswith("tau")]
    if taus:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar([str(r["tau"]) for r in taus], [r["to_target_s"] or r["job_s"] for r in taus])
        ax.set(xlabel="max_delay (tau)", ylabel="seconds to target objective",
               title=f"tau at 100 Mbit/s, {taus[0]['workers']} workers")
        fig.tight_layout()
        fig.savefig(out / "tau.png")
        made.append(out / "tau.png")
    return made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 2 workers, tau 0, 1 and auto (about 3 minutes)")
    ap.add_argument("--out", default="runs/bench_netcluster", help="output folder")
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--features", type=int, default=1_000_000)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.55, help="objective to reach (default 0.55)")
    ap.add_argument("--job-timeout", type=float, default=600.0)
    args = ap.parse_args()
    reason = unsupported()
    if reason is not None:
        print(f"bench_netcluster: emulated hosts need network namespaces: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [1, 2] if args.quick else [1, 2, 4, 8]
    taus = [0, 1, "auto"] if args.quick else [0, 1, 4, 8, "auto"]
    plan = [(rate, w) for rate in ("1gbit", "100mbit") for w in counts]
    rows: list[dict] = []
    net = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        for rate, workers in plan:
            net = NetCluster(servers=2, clients=workers, rate=rate, replication=1, worker_daemons=True,
                             run_dir=out / f"net-{rate}-{workers}")
            net.up()
            jobs = [("scale", 1)] + ([("tau", t) for t in taus if t != 1]
                                     if (rate, workers) == ("100mbit", counts[-1]) else [])
            for kind, tau in jobs:
                name = f"{kind}-{rate}-{workers}-{tau}"
                print(f"bench_netcluster: {name} ...", file=sys.stderr, flush=True)
                rows.append(run_job(net, out, name, workers, rate, tau, args))
                print(show(rows[-1:]), file=sys.stderr, flush=True)
            net.down()
            net = None
    finally:
        if net is not None:
            net.down()
    rows.sort(key=lambda r: (r["name"].startswith("tau"), r["rate"], r["workers"], str(r["tau"])))
    print(show(rows))
    base = {r["rate"]: r for r in rows if r["workers"] == 1 and r["tau"] == 1}
    for r in rows:
        b = base.get(r["rate"])
        if b and r["to_target_s"] and b["to_target_s"]:
            r["speedup_vs_1"] = round(b["to_target_s"] / r["to_target_s"], 2)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "load": os.getloadavg()},
                                                 indent=2))
    for path in plot(rows, out):
        print(f"wrote {path}")
    print(f"load average {os.getloadavg()[0]:.1f} (2 cores shared by every host: read ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

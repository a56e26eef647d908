"""The job part of scripts/bench_traffic.py: the L1 logistic-regression job with the
communication stages added in turn (see that script's docstring for the method)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

import psd
from psd.apps import APPS
from psd.jobs.runner import run_parsed
from psd.jobs.spec import parse_job


def pull_changed(l1: float) -> list:
    """Pull answers with the rows that changed only (lossless)."""
    return [{"significant": {"threshold": 0}}, "sparse"]


def pull_lossy(l1: float) -> list:
    """The weight exact (up to bfloat16), the gradient column within 0.2 l1 (below l1 -
    7/8 (l1 - delta) at kkt's defaults: a key kkt skips on a stale gradient still has
    |g| < l1, so the skip stays right), the curvature within 90% (only its being non-zero
    is read); bfloat16 rows."""
    return [{"significant": {"threshold": [0, 0.2 * l1, 0.9], "relative": [False, False, True]}}, "quantize"]


#: (row, cluster settings, filters, pull filters of l1 or None) in the order the stages are added
STAGES = [
    ("none", {"key_caching": False, "compression": "none"}, [], None),
    ("+key caching", {"key_caching": True, "compression": "none"}, [], None),
    ("+zstd", {"key_caching": True, "compression": "zstd"}, [], None),
    ("+kkt", {"key_caching": True, "compression": "zstd"}, ["kkt"], None),
    ("+quantize float16", {"key_caching": True, "compression": "zstd"}, ["kkt", {"quantize": {"to": "float16"}}],
     None),
    ("+pulls: changed rows", {"key_caching": True, "compression": "zstd"},
     ["kkt", {"quantize": {"to": "float16"}}], pull_changed),
    ("+pulls: significant, bfloat16", {"key_caching": True, "compression": "zstd"},
     ["kkt", {"quantize": {"to": "float16"}}], pull_lossy),
    ("kkt alone", {"key_caching": False, "compression": "none"}, ["kkt"], None),
]


def datasets(args) -> list[tuple[str, dict, dict]]:
    out = [(f"generated click-like ({args.examples:,} x {args.features:,}, nnz 20)",
            {"generator": "sparse_logreg", "seed": 42, "examples": args.examples, "features": args.features, "nnz": 20},
            {"l1": 1e-4, "blocks": 16, "passes": args.passes, "tol": 0})]
    if args.spam:
        spam = Path(args.spam)
        if (spam / "test.svm").exists():
            out.append(("SpamAssassin mails (hashed 2**24)",
                        {"files": str(spam / "train-*.svm"), "test_files": str(spam / "test.svm")},
                        {"l1": 3e-5, "blocks": 16, "passes": args.passes, "tol": 0}))
        else:
            print(f"(no prepared spam data in {spam}: scripts/fetch_data.sh && scripts/prepare_data.py)")
    return out


def run_stage(data: dict, train: dict, cluster: dict, filters: list, pull_filters: list | None = None) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench_traffic_"))
    spec = {"name": "bench_traffic", "app": "logreg", "servers": 2, "workers": 2, "output": str(folder),
            "consistency": "sequential", "cluster": cluster, "filters": filters, "data": data, "train": train,
            "model": {"save": False}, "pull_filters": pull_filters or []}
    run = run_parsed(parse_job(spec, "bench_traffic.yaml", APPS), APPS, psd.LocalCluster.for_job, output=folder,
                     quiet=True, plots=False)
    if run.state != "done":
        raise SystemExit(f"job failed: {run.error}")
    traffic = next(r for r in run.metrics if r.get("record") == "traffic")
    curve = [(r["time"], r["objective"]) for r in run.metrics if r.get("rank") == 0 and "objective" in r
             and "time" in r]
    return {"traffic": traffic, "curve": curve, "objective": run.summary["objective"],
            "nnz": run.summary.get("nnz_weights"), "seconds": run.seconds}


def to_target(curve, target: float) -> float | None:
    return next((t for t, o in curve if o <= target), None)


def job_part(args) -> None:
    print("\nL1 logistic regression job, stages added in turn; 2 servers, 2 workers, sequential, "
          "loopback (127.0.0.1): links not shaped in this run")
    for label, data, train in datasets(args):
        rows = [(name, run_stage(data, train, cluster, flt, pull and pull(train["l1"])))
                for name, cluster, flt, pull in STAGES]
        base = rows[0][1]
        target = base["objective"] * 1.01
        print(f"\n{label}: target objective {target:.5f} (1% above the 'none' row's final)")
        print("| stage | workers sent MB | x | servers sent MB | x | saved (all bytes sent) | rows pushed "
              "| to target s | final objective | vs none | non-zero |")
        print("|" + "---|" * 11)
        for name, r in rows:
            t, b = r["traffic"], base["traffic"]
            ws, ss = t["workers_sent_wire"], t["servers_sent_wire"]
            saved = 1 - (ws + ss) / (b["workers_sent_wire"] + b["servers_sent_wire"])
            reach = to_target(r["curve"], target)
            print(f"| {name} | {ws / 1e6:.2f} | {b['workers_sent_wire'] / ws:.2f} | {ss / 1e6:.2f} "
                  f"| {b['servers_sent_wire'] / ss:.2f} | {100 * saved:.0f}% | "
                  f"{(t.get('filtered_rows') or {}).get('w', 'all')} | "
                  f"{'-' if reach is None else f'{reach:.2f}'} | {r['objective']:.5f} "
                  f"| {100 * (r['objective'] / base['objective'] - 1):+.2f}% | {r['nnz']} |")
        plot(label, rows, Path(args.png).with_name(Path(args.png).stem + f"_job{datasets(args).index((label, data, train))}.png"))


def plot(label: str, rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4.8))
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    for i, (what, key) in enumerate((("workers sent", "workers_sent_wire"), ("servers sent", "servers_sent_wire"))):
        bars = ax.bar(x + (i - 0.5) * 0.38, [r["traffic"][key] / 1e6 for _, r in rows], 0.38, label=what)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, [n for n, _ in rows], fontsize=8, rotation=20, ha="right")
    ax.set_ylabel("MB on the wire")
    ax.set_title(f"L1 logistic regression, {label} (loopback)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


# -- shaped links: the same stages on emulated hosts (psd.testing.netcluster) ---------------
def shaped_part(args) -> None:
    """Each stage on 2 server hosts and 2 worker hosts behind links shaped to 1 Gbit/s
    and 100 Mbit/s (tbf), CurveZMQ on, submitted with ``psd submit --follow``: seconds to
    the target objective and bytes through the links. Needs root; says why not otherwise."""
    import json
    import os
    import sys

    import yaml

    from psd.testing import NetCluster, unsupported

    reason = unsupported() if os.geteuid() == 0 else "not root"
    if reason is not None:
        print(f"\nshaped links: not measured ({reason}); the rows above are loopback only")
        return
    label, data, train = datasets(args)[0]
    out = Path(tempfile.mkdtemp(prefix="bench_traffic_net_"))
    rows = []
    for rate in ("1gbit", "100mbit"):
        for name, cluster, flt, pull in STAGES:
            net = NetCluster(servers=2, clients=2, rate=rate, replication=1, worker_daemons=True,
                             settings=cluster, run_dir=out / f"net-{rate}-{len(rows)}")
            try:
                net.up()
                job = {"name": f"s{len(rows)}", "app": "logreg", "workers": 2, "output": str(out / f"job{len(rows)}"),
                       "consistency": "sequential", "filters": flt, "data": data, "train": train,
                       "model": {"save": False}, "pull_filters": pull(train["l1"]) if pull else []}
                path = out / f"job{len(rows)}.yaml"
                path.write_text(yaml.safe_dump(job))
                before = _links(net)
                res = net.exec("operator", net.psd_argv("submit", str(path), "--config", str(net.config_path),
                                                        "--follow", "--quiet"), timeout=900, check=False)
                after = _links(net)
                folder = out / f"job{len(rows)}"
                records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
                summary = json.loads((folder / "summary.json").read_text())
                if res.returncode != 0 or summary.get("state") != "done":
                    raise SystemExit(f"{rate} {name}: job failed: {res.stderr[-1500:]}")
                moved = {h: after[h][0] - before[h][0] + after[h][1] - before[h][1] for h in after}
                curve = [(r["time"], r["objective"]) for r in records
                         if r.get("rank") == 0 and "objective" in r and "time" in r]
                rows.append({"rate": rate, "stage": name, "objective": summary["objective"], "curve": curve,
                             "server_MB": sum(moved[h.name] for h in net.role_hosts("server")) / 2e6,
                             "worker_MB": sum(moved[h.name] for h in net.role_hosts("client")) / 2e6,
                             "job_s": max((t for t, _ in curve), default=0.0)})
                print(f"  {rate} {name}: done", file=sys.stderr, flush=True)
            finally:
                net.down()
    print(f"\n{label} on emulated hosts (2 server hosts, 2 worker hosts, CurveZMQ, links shaped with tbf; "
          f"every host shares this machine's cores: read ratios)")
    print("| link | stage | MB per server host | x | MB per worker host | x | to target s | job s | final objective |")
    print("|" + "---|" * 9)
    for rate in ("1gbit", "100mbit"):
        mine = [r for r in rows if r["rate"] == rate]
        base = mine[0]
        target = base["objective"] * 1.01
        for r in mine:
            reach = to_target(r["curve"], target)
            print(f"| {rate} | {r['stage']} | {r['server_MB']:.1f} | {base['server_MB'] / r['server_MB']:.2f} "
                  f"| {r['worker_MB']:.1f} | {base['worker_MB'] / r['worker_MB']:.2f} "
                  f"| {'-' if reach is None else f'{reach:.2f}'} | {r['job_s']:.2f} | {r['objective']:.5f} |")


def _links(net) -> dict:
    out = {}
    for host in net.hosts.values():
        stats = Path("/sys/class/net") / host.veth / "statistics"
        out[host.name] = (int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text()))
    return out

#!/usr/bin/env python
"""The bundled apps on psd (1, 2 and 4 workers) next to what a user would run on one
machine, on the same data, in one run.

    .venv/bin/python scripts/bench_apps.py             # full size
    .venv/bin/python scripts/bench_apps.py --quick     # smaller data, under 2 minutes
    .venv/bin/python scripts/bench_apps.py --apps lda --workers 2

One function per app (``bench_cms``, ``bench_lda``; add more to ``BENCHES``) returns
table rows; ``print_table`` prints them. Every psd row is one ``psd run`` of a job file
written for it, on its own local cluster (2 servers), in a subprocess; the numbers come
from the run's summary.json and metrics.jsonl.

count-min (app ``cms``): a seeded Zipf stream. Baseline: the same sketch in plain numpy
in this process (``psd.apps.cms.CountMin``: the same hash functions and local
aggregation, no servers), so its estimates must equal psd's exactly.
Columns: wall = whole ``psd run`` (cluster start-up and shutdown included; for the
baseline, generation plus inserting); stream = the slowest worker's streaming time;
inserts/s/worker = items per wall second of the insert path (local counting, hashing,
bincount, pushes and waiting for their acknowledgements; generating the items is not
counted), mean over workers; inserts/cpu-s/worker = the same per CPU second of the
thread doing it (not counting time spent waiting for a core, which matters when workers
and servers outnumber the cores); items/s total = all items / stream time (generation
included); then the error of the same queries against exact counts.

LDA (app ``lda``): a corpus with planted topics. Baseline: scikit-learn's
LatentDirichletAllocation (batch variational Bayes, same K, alpha, beta, the same
number of iterations) on the same bag-of-words matrix. Quality for both: the per-token
log-likelihood ``mean log sum_k theta_dk phi_kw`` of the corpus under the model's point
estimates (psd: from the Gibbs counts; scikit-learn: normalised ``components_`` and
``transform``), and how many planted topics are recovered (greedy matching, at least half
of the top 10 words shared). "to sklearn ll" is the time (rank 0's clock since its app
started) at which psd's global log-likelihood first reached scikit-learn's final one.

The machine's core count and load average are printed with the tables: workers and
servers of one local cluster share those cores.
Writes results.json, cms.png and lda.png to --out (runs/bench_apps/ by default).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from psd.apps import cms, lda  # noqa: E402
from psd.apps.datasets.topics import make_planted_corpus  # noqa: E402


# -- running psd ----------------------------------------------------------------------
def run_psd_job(job: dict, out: Path, timeout: float = 600) -> tuple[dict, list[dict], float]:
    """``psd run`` a job in a subprocess; returns (summary, metric records, wall seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "psd", "run", str(path), "--quiet", "--output", str(out / "run")],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"psd run {path} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    summary = json.loads((out / "run" / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, records, wall


def print_table(title: str, columns: list[tuple[str, str]], rows: list[dict]) -> str:
    """A fixed-width table: ``columns`` are (key, header); floats get 4 significant digits."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
                return f"{v:.3g}"
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    lines = [title, "  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


# -- count-min ----------------------------------------------------------------------------
def bench_cms(args, out: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    data = {"generator": "zipf", "seed": 42, "items": 20_000_000 if args.quick else 80_000_000,
            "vocabulary": 1_000_000, "exponent": 1.1}
    sketch = {"epsilon": 0.001, "delta": 0.01, "seed": 1}
    ev = {"queries": 2000, "heavy": 100}
    width, depth = cms.sketch_shape(sketch)
    rows = []

    # baseline: the same sketch in plain numpy, one process
    base = cms.CountMin(width, depth, sketch["seed"])
    t_make = t_insert = cpu_insert = 0.0
    t0 = time.perf_counter()
    batches = cms.zipf_batches(data, range(cms.num_blocks(data["items"])), 1 << 21)
    while True:
        a = time.perf_counter()
        items = next(batches, None)
        b = time.perf_counter()
        if items is None:
            break
        c = time.thread_time()
        base.add(*cms.aggregate_dense(items, data["vocabulary"]))
        cpu_insert += time.thread_time() - c
        t_make += b - a
        t_insert += time.perf_counter() - b
    wall = time.perf_counter() - t0
    ids, counts = cms.exact_counts(data, 1)
    pick = cms.pick_queries(ids, counts, ev["queries"], ev["heavy"], data["seed"])
    true, est = counts[pick], base.query(ids[pick])
    n = int(counts.sum())
    bound = math.e / width * n
    base_err = {"mean_error_over_n": float((est - true).mean() / n),
                "underestimates": int(np.sum(est < true)), "frac_over_bound": float(np.mean(est - true > bound))}
    rows.append({"system": "numpy count-min", "workers": 1, "wall_s": wall, "stream_s": wall,
                 "inserts_per_s_worker": n / t_insert, "inserts_per_cpu_s_worker": n / cpu_insert,
                 "items_per_s_total": n / wall, **base_err})
    est_by_item = dict(zip(ids[pick].tolist(), est.tolist()))

    curves = {}
    for w in args.workers:
        job = {"name": f"bench_cms_w{w}", "app": "cms", "servers": 2, "workers": w,
               "data": data, "sketch": sketch, "train": {"batch_size": 1 << 21}, "eval": ev}
        s, recs, wall = run_psd_job(job, out / f"cms_w{w}")
        q = [r for r in recs if r.get("series") == "query"]
        same = all(est_by_item.get(r["item"]) == r["estimate"] for r in q)
        rows.append({"system": "psd", "workers": w, "wall_s": wall, "stream_s": s["stream_seconds"],
                     "inserts_per_s_worker": float(s["inserts_per_s_worker_mean"]),
                     "inserts_per_cpu_s_worker": float(s["inserts_per_cpu_s_worker_mean"]),
                     "items_per_s_total": float(s["items_per_s_total"]),
                     "mean_error_over_n": s["mean_error_over_n"], "underestimates": s["underestimates"],
                     "frac_over_bound": s["frac_over_bound"], "same_as_numpy": "yes" if same else "NO"})
        curves[w] = [r for r in recs if str(r.get("series", "")).startswith("worker")]
    rows[0]["same_as_numpy"] = "-"
    _plot_cms(rows, out / "cms.png", width, depth, n)
    columns = [("system", "system"), ("workers", "workers"), ("wall_s", "wall s"), ("stream_s", "stream s"),
               ("inserts_per_s_worker", "inserts/s/worker"), ("inserts_per_cpu_s_worker", "inserts/cpu-s/worker"),
               ("items_per_s_total", "items/s total"),
               ("mean_error_over_n", "mean err/N"), ("frac_over_bound", "frac > eps*N"),
               ("underestimates", "under"), ("same_as_numpy", "same est")]
    title = (f"count-min: {n:,} Zipf(1.1) items over 1M ids, sketch {width} x {depth} "
             f"(epsilon {math.e / width:.2g}, delta {math.exp(-depth):.2g})")
    return title, columns, rows


def _plot_cms(rows, path, width, depth, n):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"{r['system']}\n{r['workers']} worker(s)" for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["inserts_per_s_worker"] / 1e6 for r in rows], 0.4, label="inserts/s per worker (insert path)")
    ax.bar(x + 0.2, [r["items_per_s_total"] / 1e6 for r in rows], 0.4, label="items/s total (incl. generation)")
    ax.axhline(20, color="gray", ls="--", lw=1, label="target: 20M inserts/s per worker")
    ax.set_xticks(x, labels)
    ax.set_ylabel("million items per second")
    ax.set_title(f"count-min throughput, {n / 1e6:.0f}M items, sketch {width} x {depth}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


# -- LDA ----------------------------------------------------------------------------------
def bench_lda(args, out: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    from sklearn.decomposition import LatentDirichletAllocation

    data = {"generator": "planted", "seed": 42, "documents": 2000 if args.quick else 5000,
            "vocabulary": 2000 if args.quick else 5000, "doc_length": 100, "dominant_words": 10,
            "dominant_mass": 0.7, "doc_alpha": 0.1}
    model = {"topics": 10 if args.quick else 20, "alpha": 0.1, "beta": 0.01, "dtype": "int32"}
    iterations = 30 if args.quick else 50
    K = model["topics"]
    corpus = make_planted_corpus(data["documents"], data["vocabulary"], K, data["doc_length"], data["seed"],
                                 dominant_words=data["dominant_words"], dominant_mass=data["dominant_mass"],
                                 doc_alpha=data["doc_alpha"])
    tokens = int(corpus.words.size)
    rows = []

    X = corpus.counts_matrix()
    t0 = time.perf_counter()
    sk = LatentDirichletAllocation(n_components=K, doc_topic_prior=model["alpha"],
                                   topic_word_prior=model["beta"], learning_method="batch",
                                   max_iter=iterations, random_state=0, n_jobs=1)
    theta = sk.fit_transform(X)
    fit = time.perf_counter() - t0
    phi = sk.components_ / sk.components_.sum(axis=1, keepdims=True)
    theta = theta / theta.sum(axis=1, keepdims=True)
    sk_ll = lda.corpus_loglik(corpus, theta, phi)
    sk_top = [np.argsort(-sk.components_[k])[:10].tolist() for k in range(K)]
    rows.append({"system": "sklearn LDA (VB)", "workers": 1, "wall_s": fit, "train_s": fit,
                 "loglik": sk_ll, "recovered": f"{lda.recovered(sk_top, corpus.topics, 10)}/{K}",
                 "tokens_per_s_worker": tokens * iterations / fit, "to_target_s": None})
    planted_ll = lda.corpus_loglik(corpus, corpus.doc_topics, corpus.topics)

    curves = {}
    for w in args.workers:
        job = {"name": f"bench_lda_w{w}", "app": "lda", "servers": 2, "workers": w,
               "consistency": "sequential", "data": data, "model": model,
               "train": {"iterations": iterations, "top_words": 10}}
        s, recs, wall = run_psd_job(job, out / f"lda_w{w}")
        glob_ll = {r["iteration"]: r["loglik"] for r in recs if "loglik" in r and "series" not in r}
        times = {r["iteration"]: r["time"] for r in recs if r.get("series") == "worker0"}
        reach = [it for it in sorted(glob_ll) if glob_ll[it] >= sk_ll]
        curves[w] = [(times[it], glob_ll[it]) for it in sorted(glob_ll) if it in times]
        rows.append({"system": "psd Gibbs", "workers": w, "wall_s": wall, "train_s": s["train_seconds"],
                     "loglik": s["loglik"], "recovered": f"{s['topics_recovered']}/{s['topics_planted']}",
                     "tokens_per_s_worker": float(s["tokens_per_s_worker_mean"]),
                     "to_target_s": times.get(reach[0]) if reach else None})
    _plot_lda(curves, fit, sk_ll, planted_ll, out / "lda.png", K)
    columns = [("system", "system"), ("workers", "workers"), ("wall_s", "wall s"), ("train_s", "train s"),
               ("to_target_s", "to sklearn ll s"), ("loglik", "loglik/token"), ("recovered", "topics"),
               ("tokens_per_s_worker", "tokens/s/worker")]
    title = (f"LDA: {data['documents']} docs, {tokens:,} tokens, V={data['vocabulary']}, K={K}, "
             f"{iterations} iterations (planted model's loglik/token: {planted_ll:.4f})")
    return title, columns, rows


def _plot_lda(curves, sk_time, sk_ll, planted_ll, path, K):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for w, pts in sorted(curves.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=2, label=f"psd, {w} worker(s)")
    ax.scatter([sk_time], [sk_ll], color="black", marker="*", s=120, zorder=5, label="scikit-learn (final)")
    ax.axhline(planted_ll, color="gray", ls="--", lw=1, label="planted model")
    ax.set_xlabel("seconds (rank 0, since its app started)")
    ax.set_ylabel("log-likelihood per token")
    ax.set_title(f"LDA, K={K}: log-likelihood against time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


BENCHES = {"cms": bench_cms, "lda": bench_lda}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller data: the whole run under 2 minutes")
    p.add_argument("--apps", default=",".join(BENCHES), help=f"comma-separated, of {', '.join(BENCHES)}")
    p.add_argument("--workers", default="1,2,4", help="psd worker counts to run")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_apps"))
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"bench_apps: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
          f"{' (quick)' if args.quick else ''}\n", flush=True)
    started = time.perf_counter()
    results = {"cores": os.cpu_count(), "loadavg": load, "quick": args.quick, "apps": {}}
    for name in args.apps.split(","):
        title, columns, rows = BENCHES[name](args, out)
        results["apps"][name] = {"title": title, "rows": rows, "table": print_table(title, columns, rows)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"bench_apps: {time.perf_counter() - started:.0f} s; results.json and PNGs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

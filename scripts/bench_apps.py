#!/usr/bin/env python
"""The bundled apps on psd (1, 2 and 4 workers) next to what a user would run on one
machine, on the same data, in one run.

    .venv/bin/python scripts/bench_apps.py             # full size
    .venv/bin/python scripts/bench_apps.py --quick     # smaller data, under 2 minutes
    .venv/bin/python scripts/bench_apps.py --apps lda --workers 2
    .venv/bin/python scripts/bench_apps.py --apps defaults [--quick]   # defaults vs scikit-learn

One function per app (``bench_logreg``, ``bench_cms``, ``bench_lda``; add more to ``BENCHES``) returns
table rows; ``print_table`` prints them. Every psd row is one ``psd run`` of a job file
written for it, on its own local cluster (2 servers), in a subprocess; the numbers come
from the run's summary.json and metrics.jsonl.

logistic regression (app ``logreg``, solver ``prox``: delayed block proximal gradient,
``bounded`` consistency with ``max_delay: 1`` as the shipped job): the seeded sparse
generator. Baselines: scikit-learn's ``LogisticRegression`` with the same objective
(``penalty="l1"``, ``C = 1 / (N l1)``, no intercept) on the same training rows, solver
liblinear (tol 1e-6: the reference objective) and saga (run from scratch with
max_iter 1, 2, 4, ... so its objective can be plotted against time). Every objective is
computed by ``psd.apps.logreg.objective`` (psd's own reports use the same formula).
Columns: wall = whole ``psd run`` (cluster start-up, generation, shutdown included;
sklearn: the fit); load = generating the worker's shard; train = rank 0's training
time; to 1% = seconds of training until the objective is within 1% of the reference
(psd: rank 0's clock since training started; saga: the fit time of the first run that
got there; liblinear: its fit); objective and its gap to the reference; non-zero
weights; examples/s = examples processed per second of training (psd: N x passes /
train; sklearn: N x ``n_iter_`` / fit, for liblinear ``n_iter_`` counts its outer
Newton iterations) and per worker.

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
defaults (``--apps defaults``): ``logreg.fit(X, y, X_test, y_test)`` with every option
at its default (l1 1e-4) on each data set there is (generated Zipf, a census-like set at
a9a's shape, and the SpamAssassin mails and the UCI adult census set when
scripts/prepare_data.py has run) against
scikit-learn's liblinear optimum of the same objective, with test AUC and non-zero
weights for both; and ``lda.fit(docs, topics=K)`` at its defaults (alpha 0.1, the
data-scaled beta) on a generated corpus (planted topics, short documents over a large
vocabulary, K 20) and on the mails' bodies (first 150 words, K 10) against scikit-learn's
``LatentDirichletAllocation`` (batch VB, 100 iterations, fit on psd's vocabulary) at its
defaults (alpha = beta = 1/K) and at psd's priors, all scored by the held-out perplexity
by document completion of the same held-out documents (psd's measure: half of each
document folds in against the fixed topics, the other half is scored). Writes
defaults.png.

Writes results.json, logreg.png, cms.png, lda.png and defaults.png to --out (runs/bench_apps/ by default).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from psd.apps import cms, lda, logreg  # noqa: E402
from psd.apps.datasets import make_sparse_logreg  # noqa: E402
from psd.apps.datasets.mails import mail_documents  # noqa: E402
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


# -- logistic regression ----------------------------------------------------------------
def _sklearn_l1(X, y, l1: float, solver: str, **options):
    """scikit-learn's minimiser of mean log-loss + l1 |w|_1 (no intercept) and its fit seconds."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn >= 1.8 deprecates `penalty`; saga's ConvergenceWarning
        clf = LogisticRegression(penalty="l1", solver=solver, C=1.0 / (X.shape[0] * l1), fit_intercept=False,
                                 **options)
        t0 = time.perf_counter()
        clf.fit(X, y)
        return clf, time.perf_counter() - t0


def bench_logreg(args, out: Path) -> tuple[str, list[tuple[str, str]], list[dict]]:
    import scipy.sparse as sp

    data = {"generator": "sparse_logreg", "seed": 42, "examples": 50_000 if args.quick else 500_000,
            "features": 100_000 if args.quick else 1_000_000, "nnz": 20, "noise": 0.05, "test_fraction": 0.1}
    train_opts = {"solver": "prox", "l1": 1e-4, "l2": 0.0, "blocks": 16, "passes": 10, "learning_rate": 0.5}
    l1 = train_opts["l1"]
    within = 0.01
    train, _, _ = make_sparse_logreg(data["examples"], data["features"], data["nnz"], data["seed"],
                                     noise=data["noise"], test_fraction=data["test_fraction"])
    n = len(train)
    X = sp.csr_matrix((train.values.astype(np.float64), train.indices.astype(np.int64), train.indptr),
                      shape=(n, data["features"]))
    y = train.labels
    keys = np.arange(data["features"], dtype=np.uint64)

    def score(coef) -> float:
        return logreg.objective(train, keys, coef.ravel(), l1)

    # the reference: liblinear to a tight tolerance
    clf, fit = _sklearn_l1(X, y, l1, "liblinear", tol=1e-6, max_iter=1000)
    ref, ref_time = score(clf.coef_), fit
    target = ref * (1 + within)
    rows = [{"system": "sklearn liblinear", "workers": 1, "wall_s": fit, "train_s": fit, "to_target_s": fit,
             "objective": ref, "gap": 0.0, "nnz": int(np.count_nonzero(clf.coef_)),
             "examples_per_s": n * int(np.max(clf.n_iter_)) / fit,
             "examples_per_s_worker": n * int(np.max(clf.n_iter_)) / fit}]

    # saga, from scratch with doubling max_iter: its objective against time
    saga_curve, reached = [], None
    max_iter = 1
    while True:
        clf, fit = _sklearn_l1(X, y, l1, "saga", tol=1e-4, max_iter=max_iter)
        obj, done = score(clf.coef_), int(np.max(clf.n_iter_)) < max_iter
        saga_curve.append((fit, obj))
        if reached is None and obj <= target:
            reached = fit
        if done or max_iter >= (32 if args.quick else 64):
            break
        max_iter *= 2
    epochs = int(np.max(clf.n_iter_))
    rows.append({"system": "sklearn saga", "workers": 1, "wall_s": fit, "train_s": fit, "to_target_s": reached,
                 "objective": obj, "gap": obj / ref - 1, "nnz": int(np.count_nonzero(clf.coef_)),
                 "examples_per_s": n * epochs / fit, "examples_per_s_worker": n * epochs / fit})

    curves = {}
    for w in args.workers:
        job = {"name": f"bench_logreg_w{w}", "app": "logreg", "servers": 2, "workers": w,
               "consistency": "bounded", "max_delay": 1, "data": data, "train": train_opts,
               "model": {"save": str(out / f"logreg_w{w}" / "model")}}
        s, recs, wall = run_psd_job(job, out / f"logreg_w{w}")
        evals = sorted(((r["time"], r["objective"]) for r in recs if "objective" in r and "series" not in r))
        curves[w] = evals
        final = score(_dense(logreg.load_model(out / f"logreg_w{w}" / "model"), data["features"]))
        hit = [t for t, obj in evals if obj <= target]
        passes = s["passes"]
        rows.append({"system": "psd prox", "workers": w, "wall_s": wall, "load_s": s["load_seconds"],
                     "train_s": s["train_seconds"], "to_target_s": hit[0] if hit else None,
                     "objective": final, "gap": final / ref - 1, "nnz": int(s["nnz_weights"]),
                     "examples_per_s": n * passes / s["train_seconds"],
                     "examples_per_s_worker": n * passes / s["train_seconds"] / w})
    _plot_logreg(curves, saga_curve, ref, ref_time, within, out / "logreg.png")
    columns = [("system", "system"), ("workers", "workers"), ("wall_s", "wall s"), ("load_s", "load s"),
               ("train_s", "train s"), ("to_target_s", "to 1% s"), ("objective", "objective"),
               ("gap", "vs ref"), ("nnz", "nnz w"), ("examples_per_s", "examples/s"),
               ("examples_per_s_worker", "examples/s/worker")]
    title = (f"L1 logistic regression: {n:,} training examples, {data['features']:,} features, "
             f"~{data['nnz']} non-zeros per row, l1 = {l1:g}; psd: {train_opts['blocks']} blocks x "
             f"{train_opts['passes']} passes, bounded delay 1, 2 servers; reference objective "
             f"{ref:.6f} (liblinear, tol 1e-6)")
    return title, columns, rows


def _dense(model: tuple[np.ndarray, np.ndarray], features: int) -> np.ndarray:
    keys, w = model
    coef = np.zeros(features)
    coef[keys.astype(np.int64)] = w
    return coef


def _plot_logreg(curves, saga_curve, ref, ref_time, within, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=100)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    def gap(v):  # on the log axis: no point at or below zero
        return max(v / ref - 1, 1e-6)

    for w, pts in sorted(curves.items()):
        for ax, f in ((left, lambda v: v), (right, gap)):
            ax.plot([p[0] for p in pts], [f(p[1]) for p in pts], marker="o", markersize=2, lw=1,
                    label=f"psd prox, {w} worker(s)")
    for ax, f in ((left, lambda v: v), (right, gap)):
        ax.plot([p[0] for p in saga_curve], [f(p[1]) for p in saga_curve], marker="s", markersize=4, lw=1,
                color="gray", label="sklearn saga (max_iter 1, 2, 4, ...)")
    left.axhline(ref, color="black", lw=1, label="sklearn liblinear (reference)")
    left.scatter([ref_time], [ref], color="black", marker="*", s=120, zorder=5, label="liblinear's fit time")
    left.axhline(ref * (1 + within), color="black", ls=":", lw=1, label=f"reference + {within:.0%}")
    right.axhline(within, color="black", ls=":", lw=1, label=f"{within:.0%}")
    top = max([p[1] for pts in curves.values() for p in pts[1:]] + [ref * 1.05])
    left.set_ylim(ref * 0.995, min(top, ref * 1.3))
    left.set_ylabel("objective F(w)")
    right.set_yscale("log")
    right.set_ylabel("F(w) / reference - 1")
    for ax in (left, right):
        ax.set_xlabel("seconds of training")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    left.set_title("L1 logistic regression: objective against time")
    right.set_title("gap to the reference (log scale)")
    fig.tight_layout()
    fig.savefig(path, format="png")


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


# -- the apps at their defaults against scikit-learn, on every data set there is ----------------
SPAM_DIR = ROOT / ".cache" / "data" / "prepared" / "spam"
MAILS_DIR = ROOT / ".cache" / "data" / "spam-assassin"
ADULT_DIR = ROOT / ".cache" / "data" / "prepared" / "adult"
DEFAULT_L1 = 1e-4   # logreg.fit's default


def _columns_of(X_train, X_test):
    """Both matrices restricted to the training set's columns, renumbered 0..d-1."""
    cols = np.unique(X_train.indices)
    return X_train[:, cols].tocsr(), X_test[:, cols].tocsr()


def _logreg_sets(quick: bool):
    """(name, X, y, X_test, y_test) for every data set: generated Zipf, census-like
    (a9a's shape) and, when prepared, the SpamAssassin mails and the UCI adult set."""
    import scipy.sparse as sp

    from psd.apps.datasets.synthetic import make_onehot_census

    tr, te, _ = make_sparse_logreg(5000 if quick else 20000, 5000 if quick else 20000, 12, seed=3,
                                   test_fraction=0.2)

    def csr(d, width):
        return sp.csr_matrix((d.values.astype(float), d.indices.astype(np.int64), d.indptr), shape=(len(d), width))

    width = int(max(tr.indices.max(), te.indices.max())) + 1
    Xa, Xb = _columns_of(csr(tr, width), csr(te, width))
    yield "zipf (generated)", Xa, tr.labels.astype(float), Xb, te.labels.astype(float)
    n = 4000 if quick else 30000
    X, y = make_onehot_census(n + n // 4, seed=1)
    yield "census (a9a-like)", X[:n], y[:n], X[n:], y[n:]
    if (SPAM_DIR / "test.svm").is_file():
        from sklearn.datasets import load_svmlight_file

        shards = [SPAM_DIR / "train-0.svm"] if quick else sorted(SPAM_DIR.glob("train-*.svm"))
        parts = [load_svmlight_file(str(f), n_features=1 << 24, zero_based=True) for f in shards]
        X = sp.vstack([p[0] for p in parts]).tocsr()
        y = np.concatenate([p[1] for p in parts])
        Xt, yt = load_svmlight_file(str(SPAM_DIR / "test.svm"), n_features=1 << 24, zero_based=True)
        X, Xt = _columns_of(X, Xt)
        yield "spam (SpamAssassin)", X, y, Xt, yt
    else:
        print("bench_apps: no prepared spam data (bash scripts/fetch_data.sh && python scripts/prepare_data.py)")
    if (ADULT_DIR / "test.svm").is_file():
        from sklearn.datasets import load_svmlight_file

        X, y = load_svmlight_file(str(ADULT_DIR / "train.svm"), zero_based=True)
        Xt, yt = load_svmlight_file(str(ADULT_DIR / "test.svm"), n_features=X.shape[1], zero_based=True)
        if quick:
            X, y = X[:8000], y[:8000]
        yield "adult (UCI census)", _int32(X), y, _int32(Xt), yt
    else:
        print("bench_apps: no prepared adult data (bash scripts/fetch_data.sh && python scripts/prepare_data.py)")


def _int32(X):
    """A CSR matrix with 32-bit indices (liblinear refuses 64-bit ones)."""
    X = X.tocsr()
    X.indices, X.indptr = X.indices.astype(np.int32), X.indptr.astype(np.int32)
    return X


def _mails(limit: int, words: int) -> list[str]:
    """The SpamAssassin mails as documents; empty when the raw mails are not fetched."""
    return mail_documents(MAILS_DIR, limit, words)


def _lda_sets(quick: bool):
    """(name, documents, K) for LDA at defaults: a generated corpus with planted topics
    (short documents over a large vocabulary, words spelt in letters for the tokenizer)
    and, when fetched, the SpamAssassin mails' bodies."""
    K = 20
    corpus = make_planted_corpus(1000 if quick else 3000, 3000 if quick else 10000, K, 16 if quick else 30, 3,
                                 dominant_words=40)

    def word(i: int) -> str:
        return "w" + "".join(chr(97 + (i // 26 ** j) % 26) for j in range(3))

    yield ("planted (generated)", [" ".join(word(w) for w in corpus.words[corpus.indptr[d]:corpus.indptr[d + 1]])
                                   for d in range(corpus.num_docs)], K)
    docs = _mails(1200 if quick else 3000, 150)
    if docs:
        yield "mails (SpamAssassin)", docs, 10
    else:
        print("bench_apps: no raw mails for LDA (bash scripts/fetch_data.sh)")


def bench_defaults(args, out: Path) -> tuple[str, list[tuple[str, str]], list[dict]]:
    """logreg.fit at every default (l1 1e-4) on each data set against scikit-learn's
    liblinear optimum of the same objective, and lda.fit at its defaults against
    scikit-learn's LatentDirichletAllocation: held-out perplexity by document completion,
    the same held-out tokens and the same measure for both."""
    from sklearn.decomposition import LatentDirichletAllocation
    from sklearn.feature_extraction.text import CountVectorizer

    from psd.apps.datasets.text import _WORD
    from psd.apps.metrics import auc

    rows = []
    for name, X, y, Xt, yt in _logreg_sets(args.quick):
        t0 = time.perf_counter()
        res = logreg.fit(X, y, X_test=Xt, y_test=yt, output=out / "defaults" / name.split()[0])
        psd_s = time.perf_counter() - t0
        clf, sk_s = _sklearn_l1(X, y, DEFAULT_L1, "liblinear", tol=1e-8, max_iter=10000)
        ours = logreg.objective(_as_dataset(X, y), np.arange(X.shape[1], dtype=np.uint64), res.coef, DEFAULT_L1)
        ref = logreg.objective(_as_dataset(X, y), np.arange(X.shape[1], dtype=np.uint64), clf.coef_.ravel(),
                               DEFAULT_L1)
        rows.append({"data": name, "size": f"{X.shape[0]}x{X.shape[1]}", "measure": "objective",
                     "psd": ours, "sklearn": ref, "gap_pct": 100 * (ours / ref - 1),
                     "psd_auc": auc(yt, Xt @ res.coef), "sklearn_auc": auc(yt, Xt @ clf.coef_.ravel()),
                     "psd_nnz": int(np.count_nonzero(res.coef)), "sklearn_nnz": int(np.count_nonzero(clf.coef_)),
                     "psd_s": psd_s, "sklearn_s": sk_s,
                     "note": f"{res.summary['passes']:g} passes, {res.summary['stopped']}"})
        print(f"  {name}: objective {ours:.6f} vs {ref:.6f} ({100 * (ours / ref - 1):+.3f}%)", flush=True)

    for name, docs, K in _lda_sets(args.quick):
        rng = np.random.default_rng(0)
        held = set(rng.choice(len(docs), size=len(docs) // 10, replace=False).tolist())
        train = [d for i, d in enumerate(docs) if i not in held]
        test = [d for i, d in enumerate(docs) if i in held]
        t0 = time.perf_counter()
        model = lda.fit(train, topics=K, output=out / "defaults" / f"lda-{name.split()[0]}")
        psd_s = time.perf_counter() - t0
        observed, target = lda.completion_split(model.corpus(test))
        ours = lda.completion_perplexity(observed, target, lda.topic_word(model.nwk, model.beta), model.alpha, 20, 0)
        vec = CountVectorizer(vocabulary=model.vocab, token_pattern=_WORD.pattern, lowercase=True)
        counts = vec.transform(train)
        refs = {}
        for which, a, b in (("sk defaults", 1 / K, 1 / K), ("sk same priors", model.alpha, model.beta)):
            t0 = time.perf_counter()
            sk = LatentDirichletAllocation(n_components=K, doc_topic_prior=a, topic_word_prior=b,
                                           learning_method="batch", max_iter=100, random_state=0, n_jobs=1).fit(counts)
            phi = (sk.components_ / sk.components_.sum(axis=1, keepdims=True)).T     # (V, K), as topic_word
            refs[which] = (lda.completion_perplexity(observed, target, phi, a, 20, 0), time.perf_counter() - t0)
        ref, sk_s = refs["sk defaults"]
        tokens = int(model.corpus(train).words.size)
        rows.append({"data": f"{name}, LDA K={K}",
                     "size": f"{len(train)} docs, {tokens:,} tok, V={len(model.vocab)}",
                     "measure": "held-out perplexity", "psd": ours, "sklearn": ref, "gap_pct": 100 * (ours / ref - 1),
                     "psd_s": psd_s, "sklearn_s": sk_s,
                     "note": f"beta {model.beta:.3g}; {model.summary.get('iterations')} sweeps "
                             f"({model.summary.get('stopped')}); sk at 1/K; sk at psd's priors "
                             f"{refs['sk same priors'][0]:.1f}"})
        print(f"  LDA {name}: held-out perplexity {ours:.1f} vs {ref:.1f} (sk defaults), "
              f"{refs['sk same priors'][0]:.1f} (sk at alpha {model.alpha:g}, beta {model.beta:.3g})", flush=True)
    _plot_defaults(rows, out / "defaults.png")
    columns = [("data", "data"), ("size", "size"), ("measure", "measure"), ("psd", "psd"), ("sklearn", "sklearn"),
               ("gap_pct", "gap %"), ("psd_auc", "psd AUC"), ("sklearn_auc", "sk AUC"), ("psd_nnz", "psd nnz"),
               ("sklearn_nnz", "sk nnz"), ("psd_s", "psd s"), ("sklearn_s", "sk s"), ("note", "psd run")]
    title = (f"apps at defaults vs scikit-learn (logreg.fit(X, y): l1 {DEFAULT_L1:g}, sequential, "
             f"data-scaled step; lda.fit(docs, topics=K): alpha 0.1, data-scaled beta, vs "
             f"LatentDirichletAllocation at its defaults)")
    return title, columns, rows


def _as_dataset(X, y):
    from psd.apps.datasets.arrays import from_arrays
    return from_arrays(X, y)


def _plot_defaults(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), dpi=100)
    ax = fig.add_subplot(1, 2, 1)
    names = [r["data"] for r in rows]
    gaps = [r["gap_pct"] for r in rows]
    bars = ax.barh(names, gaps, color=["tab:blue" if r["measure"] == "objective" else "tab:orange" for r in rows])
    for b, r in zip(bars, rows):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {r['gap_pct']:+.2f}%", va="center",
                fontsize="small")
    ax.axvline(0.5, color="gray", ls="--", lw=1)
    ax.set_xlabel("psd above scikit-learn (%): objective (blue), held-out perplexity (orange)")
    ax.invert_yaxis()
    ax2 = fig.add_subplot(1, 2, 2)
    lr = [r for r in rows if "psd_auc" in r]
    x = np.arange(len(lr))
    ax2.bar(x - 0.2, [r["psd_auc"] for r in lr], 0.4, label="psd")
    ax2.bar(x + 0.2, [r["sklearn_auc"] for r in lr], 0.4, label="scikit-learn")
    ax2.set_xticks(x, [r["data"].split()[0] for r in lr])
    ax2.set_ylim(0.5, 1.0)
    ax2.set_ylabel("test AUC")
    ax2.legend(fontsize="small")
    fig.suptitle("psd apps at their defaults against scikit-learn on the same data")
    fig.tight_layout()
    fig.savefig(path, format="png")


BENCHES = {"logreg": bench_logreg, "cms": bench_cms, "lda": bench_lda, "defaults": bench_defaults}


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

"""The count-min sketch and LDA apps: the hash family and tokeniser, the apps' math
against an in-process fake of the async KV API, and each app end to end through
``psd run`` in a subprocess (plus bad job files, which must exit 2 with one line)."""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.optimize import linear_sum_assignment

from psd.apps import APPS, cms, lda
from psd.apps.datasets.text import expand_files, iter_shard_token_ids, plan_shards
from psd.apps.datasets.topics import make_planted_corpus, match_topics
from psd.apps.hashing import MultiplyShift, mix64, token_id, token_ids

PSD = [sys.executable, "-m", "psd"]


def run_psd(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*PSD, *args], capture_output=True, text=True, timeout=timeout)


def write_job(tmp_path: Path, job: dict, name="job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job))
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# -- the hash family ------------------------------------------------------------------
KEYS = np.arange(200_000, dtype=np.uint64)


def test_apps_are_registered():
    assert APPS["cms"] == "psd.apps.cms" and APPS["lda"] == "psd.apps.lda"


def test_hash_family_is_deterministic_across_processes():
    here = MultiplyShift(5, 2719, seed=11).columns(KEYS[:1000] * np.uint64(0x9E3779B97F4A7C15))
    code = ("import numpy as np, sys; from psd.apps.hashing import MultiplyShift;"
            "k = np.arange(1000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15);"
            "sys.stdout.write(MultiplyShift(5, 2719, seed=11).columns(k).tobytes().hex())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=Path(__file__).parent.parent)
    assert there.returncode == 0, there.stderr
    assert bytes.fromhex(there.stdout) == here.tobytes()
    again = MultiplyShift(5, 2719, seed=11).columns(KEYS[:1000] * np.uint64(0x9E3779B97F4A7C15))
    assert np.array_equal(here, again)


def test_hash_columns_are_in_range_and_near_uniform():
    w = 97
    cols = MultiplyShift(4, w, seed=1).columns(KEYS)
    assert cols.shape == (4, KEYS.size) and cols.dtype == np.int64
    assert cols.min() >= 0 and cols.max() < w
    expected = KEYS.size / w
    for row in cols:
        counts = np.bincount(row, minlength=w)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < w + 6 * math.sqrt(2 * w)  # chi-square with w-1 dof, far tail


def test_different_seeds_and_rows_give_different_independent_columns():
    w = 1000
    a = MultiplyShift(3, w, seed=1).columns(KEYS)
    b = MultiplyShift(3, w, seed=2).columns(KEYS)
    # two independent functions agree on a key with probability about 1/w
    for x, y in [(a[0], b[0]), (a[0], a[1]), (a[1], a[2]), (b[0], b[2])]:
        assert np.mean(x == y) < 3.0 / w
    # pairs of rows look jointly uniform (pairwise independence-ish): 16 x 16 cells
    s = MultiplyShift(2, 16, seed=5).columns(KEYS)
    joint = np.bincount(s[0] * 16 + s[1], minlength=256)
    exp = KEYS.size / 256
    chi2 = float(((joint - exp) ** 2 / exp).sum())
    assert chi2 < 255 + 6 * math.sqrt(2 * 255)


def test_collision_probability_is_about_one_over_width():
    w = 512
    f = MultiplyShift(1, w, seed=3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1 << 63, size=100_000, dtype=np.uint64)
    y = x ^ rng.integers(1, 1 << 20, size=x.size, dtype=np.uint64)  # near keys, all distinct from x
    assert np.mean(f.columns(x)[0] == f.columns(y)[0]) < 1.5 / w


def test_high_key_bits_are_hashed():
    f = MultiplyShift(3, 1 << 16, seed=9)
    lo = np.arange(1000, dtype=np.uint64)
    hi = lo | np.uint64(1 << 40)
    assert np.mean(f.columns(lo) == f.columns(hi)) < 0.01


def test_mix64_is_a_stable_bijection_sample():
    x = mix64(np.arange(200_000))
    assert np.unique(x).size == x.size
    assert int(mix64(0)[()]) == 0xE220A8397B1DCDAF  # SplitMix64's first output for seed 0


def test_token_ids_depend_only_on_the_token():
    ids = token_ids(b"the cat\tsat\n\non  the mat the\r\n")
    assert ids.size == 7
    assert ids[0] == ids[4] == ids[6] == token_id("the")
    assert len({int(i) for i in ids}) == 5
    assert token_ids(b"   \n").size == 0 and token_ids(b"").size == 0
    assert token_id("ab") != token_id("ba") and token_id("a") != token_id("aa")


def test_text_shards_partition_the_tokens_exactly(tmp_path):
    import gzip

    rng = np.random.default_rng(0)
    vocab = ["alpha", "be", "c", "delta" * 40, "\u00e9t\u00e9"]
    paths = []
    for i in range(3):
        words = rng.choice(vocab, size=int(rng.integers(0, 1500)))
        seps = rng.choice([" ", "\n", "\t\t", "  \r\n"], size=words.size)
        p = tmp_path / f"f{i}.txt"
        p.write_bytes("".join(w + s for w, s in zip(words, seps)).encode())
        paths.append(str(p))
    gz = tmp_path / "z.gz"
    with gzip.open(gz, "wb") as f:
        f.write(" ".join(rng.choice(vocab, size=4000)).encode())
    paths.append(str(gz))
    truth = np.sort(np.concatenate([token_ids(Path(p).read_bytes()) for p in paths[:3]]
                                   + [token_ids(gzip.open(gz).read())]))
    assert expand_files(str(tmp_path / "*")) == sorted(paths)
    for shards in (1, 2, 3, 7):
        for chunk in (256, 4096):
            plan = plan_shards(paths, shards)
            got = np.sort(np.concatenate([a for s in plan for a in iter_shard_token_ids(s, chunk)]))
            assert np.array_equal(got, truth), (shards, chunk)


def test_local_count_min_never_underestimates():
    items = cms.zipf_block(1, 0, 50_000, 5000, 1.2)
    ids, counts = cms.aggregate_dense(items, 5000)
    sketch = cms.CountMin(64, 4, seed=2)
    sketch.add(ids, counts)
    est = sketch.query(ids)
    assert np.all(est >= counts) and np.any(est > counts)
    assert sketch.counts.reshape(4, 64).sum(axis=1).tolist() == [50_000] * 4
    ids2, counts2 = cms.aggregate_sparse(items.astype(np.uint64))
    assert np.array_equal(ids, ids2) and np.array_equal(counts, counts2)


def test_sketch_shape_and_keys():
    assert cms.sketch_shape({"epsilon": 0.001, "delta": 0.01}) == (2719, 5)
    assert cms.sketch_shape({"width": 100, "depth": 3, "epsilon": 0.5, "delta": 0.5}) == (100, 3)
    keys = cms.counter_keys(np.array([0, 1, 99, 100, 299]), 100, 3)
    stride = cms.stride(3)
    assert keys.tolist() == [0, 1, 99, stride, 2 * stride + 99]
    assert np.all(np.diff(keys.astype(object)) > 0)


# -- the apps against an in-process fake KV ---------------------------------------------
class FakeTable:
    """Dict-backed table with the sum / assign updaters; checks the key contract."""

    def __init__(self, width, dtype, updater):
        self.width, self.dtype, self.updater = width, np.dtype(dtype), updater
        self.rows: dict[int, np.ndarray] = {}

    def _apply(self, keys, values):
        values = np.asarray(values)
        assert values.dtype == self.dtype and values.shape == (len(keys), self.width)
        for k, v in zip(keys, values):
            if self.updater == "sum":
                self.rows[int(k)] = self.rows.get(int(k), np.zeros(self.width, self.dtype)) + v
            else:
                self.rows[int(k)] = v.copy()
        return 0

    def push(self, keys, values, once=None):
        keys = np.asarray(keys)
        assert keys.dtype == np.uint64 and np.all(keys[1:] > keys[:-1])
        return self._apply(keys.tolist(), values)

    def push_span(self, lo, values, once=None):
        return self._apply(range(int(lo), int(lo) + len(values)), values)

    async def pull(self, keys):
        keys = np.asarray(keys)
        assert keys.dtype == np.uint64 and np.all(keys[1:] > keys[:-1])
        await asyncio.sleep(0)
        zero = np.zeros(self.width, self.dtype)
        return np.array([self.rows.get(int(k), zero) for k in keys], self.dtype).reshape(-1, self.width)


class FakeLimits:
    max_keys = 1 << 27


class FakeKV:
    limits = FakeLimits()

    def __init__(self, tables):
        self.tables = tables

    async def table(self, name, width=1, dtype="float32", updater="sum", **options):
        return self.tables.setdefault(name, FakeTable(width, dtype, updater))

    async def wait(self, ts):
        await asyncio.sleep(0)

    def clock(self):
        return 0


class FakeContext:
    def __init__(self, spec, rank, num_workers):
        self.spec, self.rank, self.num_workers, self.shards = spec, rank, num_workers, [rank]
        self.job_id = "J1"
        self.metrics: list[dict] = []

    async def report(self, progress=None, metrics=None, summary=None):
        self.metrics.extend(metrics or [])

    def once(self, step):
        return f"{self.job_id}/{self.rank}", step


def run_fake(app, spec, workers):
    tables: dict = {}
    ctxs = [FakeContext(spec, r, workers) for r in range(workers)]

    async def main():
        return await asyncio.gather(*(app.run(FakeKV(tables), c) for c in ctxs))

    return asyncio.run(main()), ctxs, tables


def test_cms_app_with_more_workers_than_blocks():
    # 3 workers, 2 generator blocks: one worker streams nothing and still checks in
    spec = {"app": "cms", "data": {"items": 100_000, "vocabulary": 3000, "seed": 3},
            "sketch": {"width": 50, "depth": 3}, "eval": {"queries": 300, "heavy": 10}}
    summaries, ctxs, _ = run_fake(cms, spec, 3)
    assert [s["items"] for s in summaries[1:]] == [65_536, 34_464]  # rank 0 got no block
    s0 = summaries[0]
    assert s0["items_total"] == s0["items_in_sketch"] == 100_000
    assert s0["underestimates"] == 0 and s0["queries"] == 300
    q = [m for m in ctxs[0].metrics if m.get("series") == "query"]
    assert len(q) == 300 and all(m["estimate"] >= m["true"] for m in q)
    assert s0["mean_error"] > 0  # a 50-wide sketch of 3000 ids must collide


def test_cms_app_on_text_files_matches_a_python_count(tmp_path):
    rng = np.random.default_rng(4)
    words = [f"word{i}" for i in range(400)]
    p = 1.0 / np.arange(1, 401)
    for i in range(3):
        toks = rng.choice(words, size=5000, p=p / p.sum())
        (tmp_path / f"part{i}.txt").write_text("\n".join(" ".join(toks[j:j + 9]) for j in range(0, 5000, 9)))
    spec = {"app": "cms", "data": {"files": str(tmp_path / "*.txt")},
            "sketch": {"width": 2000, "depth": 4}, "train": {"batch_size": 3000},
            "eval": {"queries": 400, "heavy": 20}}
    assert cms.validate(spec, "job.yaml") == []
    summaries, ctxs, _ = run_fake(cms, spec, 2)
    truth = Counter(w for f in sorted(tmp_path.glob("*.txt")) for w in f.read_text().split())
    by_id = {token_id(w): c for w, c in truth.items()}
    q = [m for m in ctxs[0].metrics if m.get("series") == "query"]
    assert len(q) == 400 and summaries[0]["items_total"] == 15_000 == sum(truth.values())
    assert all(by_id[m["item"]] == m["true"] and m["estimate"] >= m["true"] for m in q)


def test_lda_app_with_an_empty_shard():
    spec = {"app": "lda", "data": {"documents": 2, "vocabulary": 50, "doc_length": 10, "dominant_words": 3},
            "model": {"topics": 3}, "train": {"iterations": 3}}
    summaries, ctxs, _ = run_fake(lda, spec, 3)   # rank 0 holds no document
    assert summaries[0]["tokens"] == summaries[0]["counts_total"] == summaries[1]["tokens"] + summaries[2]["tokens"]
    curve = [m for m in ctxs[0].metrics if "loglik" in m and "series" not in m]
    assert [m["iteration"] for m in curve] == [1, 2, 3]


def test_lda_sampler_keeps_counts_consistent():
    corpus = make_planted_corpus(200, 300, 5, 40, seed=1, dominant_words=8)
    s = lda.LocalSampler(corpus, 300, 5, 0.1, 0.01, blocks=16, seed=0)
    s.load(s.initial_counts())
    for _ in range(3):
        s.sweep()
    ndk = np.zeros((corpus.num_docs, 5))
    np.add.at(ndk, (s.doc, s.z), 1)
    nwk = np.zeros((s.word_ids.size, 5))
    np.add.at(nwk, (s.w, s.z), 1)
    assert np.array_equal(ndk, s.ndk) and np.array_equal(nwk, s.nwk)
    assert np.array_equal(s.nk, np.bincount(s.z, minlength=5))
    keys, delta = s.deltas()
    assert keys.dtype == np.uint64 and np.all(np.diff(keys.astype(object)) > 0)
    assert int(delta.sum()) == 0  # moves only: as many tokens leave topics as enter


# -- end to end through `psd run` ---------------------------------------------------
CMS_JOB = {
    "name": "cms_small", "app": "cms", "servers": 2, "workers": 2,
    "data": {"generator": "zipf", "seed": 7, "items": 3_000_000, "vocabulary": 100_000, "exponent": 1.1},
    "sketch": {"epsilon": 0.005, "delta": 0.05, "seed": 3},
    "train": {"batch_size": 1 << 19},
    "eval": {"queries": 1500, "heavy": 50},
}


def test_cms_end_to_end_never_underestimates_and_keeps_its_bound(tmp_path):
    out = tmp_path / "out"
    res = run_psd("run", str(write_job(tmp_path, CMS_JOB)), "--quiet", "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cms_small: done" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    width, depth = 544, 3                      # ceil(e / 0.005), ceil(ln 20)
    assert (summary["width"], summary["depth"]) == (width, depth)
    n = 3_000_000
    assert summary["items_total"] == summary["items_in_sketch"] == n
    # exact counts of the same seeded stream, computed here independently of the app
    truth = np.zeros(100_000, np.int64)
    for j in range(cms.num_blocks(n)):
        truth += np.bincount(cms.zipf_block(7, j, min(cms.GEN_BLOCK, n - j * cms.GEN_BLOCK), 100_000, 1.1),
                             minlength=100_000)
    q = [r for r in records(out) if r.get("series") == "query"]
    assert len(q) == 1500
    true = np.array([r["true"] for r in q])
    est = np.array([r["estimate"] for r in q])
    assert np.array_equal(true, truth[[r["item"] for r in q]])
    assert np.all(est >= true), "count-min never underestimates"
    bound = math.e / width * n
    frac = float(np.mean(est - true > bound))
    # P(error > eps N) <= delta per item; 1500 queries: allow 3 standard deviations
    delta = math.exp(-depth)
    assert frac <= delta + 3 * math.sqrt(delta * (1 - delta) / len(q))
    assert summary["underestimates"] == 0 and summary["frac_over_bound"] == pytest.approx(frac)
    assert np.mean(est - true) > 0  # the sketch is lossy at this width: the check is not vacuous
    assert summary["inserts_per_s_worker_min"] > 0
    workers = {r["series"] for r in records(out) if str(r.get("series", "")).startswith("worker")}
    assert workers == {"worker0", "worker1"}
    assert is_png(out / "error.png") and is_png(out / "throughput.png")


LDA_JOB = {
    "name": "lda_small", "app": "lda", "servers": 2, "workers": 2, "consistency": "sequential",
    "data": {"generator": "planted", "seed": 5, "documents": 600, "vocabulary": 800, "doc_length": 80,
             "dominant_words": 10},
    "model": {"topics": 6},
    "train": {"iterations": 20, "top_words": 10},
}


def test_lda_end_to_end_improves_and_recovers_planted_topics(tmp_path):
    """Also: the default held-out split (10% of the documents, never trained on) gives a
    falling perplexity by document completion, and the model comes out loadable."""
    out = tmp_path / "out"
    job = {**LDA_JOB, "model": {**LDA_JOB["model"], "save": str(tmp_path / "model")}}
    res = run_psd("run", str(write_job(tmp_path, job)), "--quiet", "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "lda_small: done" in res.stdout and "topic_05" in res.stdout
    recs = records(out)
    summary = json.loads((out / "summary.json").read_text())
    curve = [r for r in recs if "loglik" in r and "series" not in r]
    assert 10 <= summary["iterations"] <= 20   # at most train.iterations; held-out may stop it first
    assert [r["iteration"] for r in curve] == list(range(1, summary["iterations"] + 1))
    ll = [r["loglik"] for r in curve]
    assert ll[-1] > ll[0] + 0.3
    assert ll[-1] >= max(ll) - 0.01  # settled, not diverging
    assert summary["counts_total"] == summary["tokens"]  # every delta applied exactly once
    corpus = make_planted_corpus(600, 800, 6, 80, 5, dominant_words=10)
    held = lda.heldout_split(600, 0.1, 7)
    assert summary["heldout_documents"] == held.sum() == 60
    assert summary["tokens"] + np.diff(corpus.indptr)[held].sum() == corpus.words.size
    ppl = [r for r in recs if "heldout_perplexity" in r]
    assert [r["iteration"] for r in ppl] == list(range(5, summary["iterations"] + 1, 5))
    assert ppl[-1]["heldout_perplexity"] < 0.8 * ppl[0]["heldout_perplexity"], ppl
    assert summary["heldout_perplexity"] == ppl[-1]["heldout_perplexity"]
    assert is_png(out / "heldout.png")
    # no model.beta given: the data-scaled prior, the same on every worker and in the model
    assert summary["beta"] == pytest.approx(lda.default_beta(summary["tokens"], 800, 6)) and summary["alpha"] == 0.1
    # the model: counts of every trained token, the same top words, and new documents'
    # mixtures by sampling against it
    model = lda.Model.load(tmp_path / "model")
    assert model.header["topics"] == 6 and model.nwk.shape == (800, 6) and model.beta == summary["beta"]
    assert int(model.nwk.sum()) == summary["tokens"]
    assert [" ".join(t) for t in model.top_words(10)] == [summary[f"topic_{k:02d}"] for k in range(6)]
    docs = [model.top_words(5)[k] * 4 for k in range(6)]   # lists: words as given (these have digits)
    theta = model.transform(docs, sweeps=20)
    assert theta.shape == (6, 6) and np.allclose(theta.sum(axis=1), 1.0)
    # each document lands on a topic with its words (two learned topics may share a planted one)
    top = model.top_words(5)
    assert all(len(set(top[k]) & set(doc)) >= 4 for k, doc in zip(theta.argmax(axis=1), docs)), theta
    assert theta.max(axis=1).min() > 0.6, theta
    assert model.perplexity(docs) < 0.5 * summary["heldout_perplexity"]
    planted = [set(np.argsort(-corpus.topics[k])[:10].tolist()) for k in range(6)]
    learned = [set(r["word_ids"]) for r in sorted((r for r in recs if r.get("series") == "topic"),
                                                   key=lambda r: r["topic"])]
    overlap = np.array([[len(a & b) for b in planted] for a in learned])
    rows, cols = linear_sum_assignment(-overlap)
    matched = int(np.sum(overlap[rows, cols] >= 5))
    assert matched >= 5, overlap
    assert summary["topics_recovered"] >= 5
    assert is_png(out / "loglik.png")


def test_default_beta_scales_with_the_counts_per_cell():
    """beta = 0.1 sqrt(N / (K V)), at most 0.1: dense corpora get 0.1, sparse ones less."""
    assert lda.default_beta(226_520, 10_683, 10) == pytest.approx(0.1)          # mails, K 10: c = 2.1
    assert lda.default_beta(120_173, 20_000, 50) == pytest.approx(0.1 * math.sqrt(0.12017), rel=1e-4)
    assert lda.default_beta(100, 10_000, 100) == pytest.approx(0.001)           # c = 1e-4
    assert lda.default_beta(0, 10, 2) == 0.1
    assert lda.validate({"model": {"beta": None}}, "j") == []
    assert "model.beta: expected a number in (0, 100], or null" in lda.validate({"model": {"beta": 0}}, "j")[0]


def test_match_topics_is_greedy_one_to_one():
    pairs = match_topics([[1, 2, 3], [1, 2, 9], [7, 8]], [[1, 2, 3], [7, 8, 9]])
    assert pairs == [(0, 0, 3), (2, 1, 2)]


# -- bad job files ------------------------------------------------------------------
@pytest.mark.parametrize("job, key, expect", [
    ({**CMS_JOB, "sketch": {"epsilon": "small"}}, "sketch.epsilon", "expected a number"),
    ({**CMS_JOB, "sketch": {"epsilon": None}}, "sketch.epsilon", "got None"),
    ({**CMS_JOB, "sketch": {"epsilon": 0.01, "width": 10}}, "sketch.width", "not both"),
    ({**CMS_JOB, "data": {"files": "/nonexistent/psd/words.txt"}}, "data.files", "cannot read"),
    ({**CMS_JOB, "data": {"files": "/nonexistent/psd/*.txt"}}, "data.files", "matches no file"),
    ({**CMS_JOB, "train": {"batchsize": 10}}, "train.batchsize", "unknown key"),
    ({**LDA_JOB, "model": {"topics": 2.5}}, "model.topics", "expected an integer"),
    ({**LDA_JOB, "train": {"iterations": "ten"}}, "train.iterations", "expected an integer"),
    ({**LDA_JOB, "data": {"files": ["/nonexistent/psd/corpus.txt"]}}, "data.files", "cannot read"),
    ({**LDA_JOB, "data": {"documents": 100, "files": __file__}}, "data.documents", "only for"),
    ({**LDA_JOB, "model": "big"}, "model", "expected a mapping"),
])
def test_bad_app_job_file_exits_2_with_one_clear_line(tmp_path, job, key, expect):
    path = write_job(tmp_path, job)
    res = run_psd("run", str(path), timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and f"{key}:" in lines[0] and expect in lines[0], lines[0]


def test_job_status_pages_metric_records():
    """A status reply carries its records in one msgpack header (64 KiB at most): the job
    book pages them, and a reader fetches on while it has fewer than num_metrics."""
    from psd.cluster.jobs import JobBook

    book = JobBook()
    job = book.submit({"app": "cms"}, 1)
    book.report(job.id, 0, metrics=[{"series": "query", "item": i, "true": i, "estimate": i + 1}
                                    for i in range(5000)])
    seen: list[dict] = []
    pages = 0
    while True:
        st = job.to_dict(len(seen))
        assert len(repr(st["metrics"])) < 40_000 and st["metrics"]
        seen.extend(st["metrics"])
        pages += 1
        if len(seen) >= st["num_metrics"]:
            break
    assert pages > 1 and [r["item"] for r in seen] == list(range(5000))
    assert job.to_dict(5000)["metrics"] == []

"""Pure-logic tests of the bundled apps: data, metrics, plots, validation, and the SGD math.

No daemons here: ``logreg_sgd.run`` is driven against an in-process fake of the async
KV API that applies the server's sgd rule, so only the app's math is under test.
"""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from psd.apps import APPS, load_app
from psd.apps import logreg_sgd
from psd.apps.datasets import SparseDataset, make_sparse_logreg, shard
from psd.apps.metrics import auc, log_loss
from psd.jobs.plots import plot_curves
from psd.errors import ConfigError


def _arrays(ds: SparseDataset):
    return ds.indptr, ds.indices, ds.values, ds.labels


# -- data --------------------------------------------------------------------------
def test_generator_is_deterministic_and_seed_dependent():
    a = make_sparse_logreg(3000, 5000, 12, seed=7)
    b = make_sparse_logreg(3000, 5000, 12, seed=7)
    c = make_sparse_logreg(3000, 5000, 12, seed=8)
    for part_a, part_b in zip(a[:2], b[:2]):
        for x, y in zip(_arrays(part_a), _arrays(part_b)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    assert np.array_equal(a[2], b[2])
    assert not np.array_equal(a[0].indices[:1000], c[0].indices[:1000])
    assert not np.array_equal(a[2], c[2])


def test_generator_layout():
    train, test, true_w = make_sparse_logreg(2000, 1000, 10, seed=1, test_fraction=0.25)
    assert (len(train), len(test)) == (1500, 500)
    assert true_w.shape == (1000,) and true_w.dtype == np.float32
    assert np.count_nonzero(true_w) == 50  # signal_fraction 0.05
    for ds in (train, test):
        assert ds.indptr.dtype == np.int64 and ds.indices.dtype == np.uint64
        assert ds.values.dtype == np.float32 and ds.indptr[0] == 0 and ds.indptr[-1] == ds.nnz
        assert set(np.unique(ds.labels)) <= {0.0, 1.0}
        lengths = np.diff(ds.indptr)
        assert lengths.min() >= 1 and lengths.max() <= 10
        assert ds.indices.max() < 1000
        # sorted and unique within each row: consecutive entries of one row strictly increase
        same_row = ds.row_ids()[1:] == ds.row_ids()[:-1]
        assert np.all(ds.indices[1:][same_row] > ds.indices[:-1][same_row])
    # Zipf-like: the most frequent feature is far more common than the median one
    counts = np.bincount(train.indices.astype(np.int64), minlength=1000)
    assert counts.max() > 20 * max(1, np.median(counts))


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_shards_partition_exactly(num_shards):
    ds, _, _ = make_sparse_logreg(1001, 500, 8, seed=3, test_fraction=0.0)
    parts = [shard(ds, k, num_shards) for k in range(num_shards)]
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(ds) and max(sizes) - min(sizes) <= 1
    assert np.array_equal(np.concatenate([p.labels for p in parts]), ds.labels)
    assert np.array_equal(np.concatenate([p.indices for p in parts]), ds.indices)
    lengths = np.concatenate([np.diff(p.indptr) for p in parts])
    assert np.array_equal(lengths, np.diff(ds.indptr))
    assert all(p.indptr[0] == 0 for p in parts)
    with pytest.raises(ValueError):
        shard(ds, num_shards, num_shards)


def test_rows_slice():
    ds, _, _ = make_sparse_logreg(50, 100, 5, seed=2, test_fraction=0.0)
    sub = ds.rows(10, 20)
    assert len(sub) == 10
    lo, hi = ds.indptr[10], ds.indptr[20]
    assert np.array_equal(sub.indices, ds.indices[lo:hi])
    assert np.array_equal(sub.indptr, ds.indptr[10:21] - lo)
    assert len(ds.rows(45, 100)) == 5 and len(ds.rows(30, 30)) == 0


# -- metrics -----------------------------------------------------------------------
def test_log_loss_by_hand():
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert log_loss([0, 1], [0.5, 0.5]) == pytest.approx(math.log(2))
    # clipped: a certain, wrong prediction costs -log(eps), not infinity
    assert log_loss([0], [1.0], eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_auc_by_hand():
    # pairs (pos, neg): (0.35 vs 0.1) win, (0.35 vs 0.4) lose, 0.8 wins both -> 3/4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert auc([1, 0, 1, 0], [3, 2, 2, 1]) == pytest.approx(0.875)
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(5000) < 0.3
    scores = np.round(rng.normal(size=5000) + y, 1)  # rounding makes many ties
    assert auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


# -- registry, validation, plots ---------------------------------------------------
def test_load_app():
    assert load_app("logreg_sgd") is logreg_sgd
    with pytest.raises(ConfigError) as err:
        load_app("nope")
    assert "nope" in str(err.value) and all(name in str(err.value) for name in APPS)


def test_validate():
    assert logreg_sgd.validate({}, "job.yaml") == []
    assert logreg_sgd.validate(logreg_sgd.DEFAULTS, "job.yaml") == []
    problems = logreg_sgd.validate({"train": {"epochs": "x", "batchsize": 3},
                                    "data": {"noise": 2}}, "job.yaml")
    assert "job.yaml: train.epochs: expected a positive integer, got 'x'" in problems
    assert any(p.startswith("job.yaml: train.batchsize: unknown key") for p in problems)
    assert any(p.startswith("job.yaml: data.noise: expected") for p in problems)
    assert len(problems) == 3
    assert logreg_sgd.validate({"train": [1]}, "j.yaml") == ["j.yaml: train: expected a mapping, got [1]"]
    assert logreg_sgd.validate({"train": {"epochs": True}}, "j.yaml")  # a bool is not a count
    assert any("data.nnz" in p for p in logreg_sgd.validate({"data": {"features": 5, "nnz": 6}}, "j"))


def test_plot_curves_writes_png(tmp_path):
    records = [{"epoch": e, "series": f"worker{r}", "train_logloss": 0.7 - 0.05 * e - 0.01 * r}
               for e in range(1, 4) for r in range(2)]
    records += [{"epoch": e, "test_logloss": 0.7 - 0.04 * e, "test_auc": 0.6 + 0.05 * e} for e in range(1, 4)]
    records.append({"progress": 0.5})  # no x: skipped
    out = plot_curves(records, "epoch", ["train_logloss", "test_logloss"], tmp_path / "sub" / "c.png", "loss")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    empty = plot_curves([], "epoch", ["test_auc"], tmp_path / "empty.png", "nothing")
    assert empty.stat().st_size > 0


# -- the app's math against a fake KV -----------------------------------------------
class FakeTable:
    """Dict-backed table applying the server's sgd rule; checks the key contract."""

    def __init__(self, lr: float):
        self.lr = lr
        self.values: dict[int, float] = {}

    @staticmethod
    def _check(keys):
        assert keys.dtype == np.uint64 and keys.ndim == 1
        assert np.all(keys[1:] > keys[:-1]), "keys must be sorted and unique"

    async def pull(self, keys):
        self._check(keys)
        await asyncio.sleep(0)  # let the other worker interleave
        return np.array([self.values.get(int(k), 0.0) for k in keys], dtype=np.float32).reshape(-1, 1)

    def push(self, keys, grads):
        self._check(keys)
        grads = np.asarray(grads)
        assert grads.dtype == np.float32 and grads.shape[0] == keys.size
        for k, g in zip(keys.tolist(), grads.reshape(-1).tolist()):
            self.values[k] = self.values.get(k, 0.0) - self.lr * g
        return 0


class FakeKV:
    def __init__(self, tables: dict):
        self.tables = tables
        self.clock_value = 0

    async def table(self, name, width=1, dtype="float32", updater="sum", **options):
        assert (width, dtype, updater) == (1, "float32", "sgd")
        return self.tables.setdefault(name, FakeTable(options["lr"]))

    async def wait(self, ts):
        await asyncio.sleep(0)

    def clock(self):
        self.clock_value += 1
        return self.clock_value


class FakeContext:
    def __init__(self, spec, rank, num_workers):
        self.spec, self.rank, self.num_workers, self.shards = spec, rank, num_workers, [rank]
        self.reports: list[dict] = []

    async def report(self, progress=None, metrics=None, summary=None):
        self.reports.append({"progress": progress, "metrics": metrics, "summary": summary})


def test_logreg_sgd_learns_with_two_async_workers():
    spec = {"app": "logreg_sgd",
            "data": {"seed": 5, "examples": 12_000, "features": 20_000, "nnz": 15},
            "train": {"epochs": 2, "batch_size": 100, "learning_rate": 0.5}}
    tables: dict = {}
    ctxs = [FakeContext(spec, rank, 2) for rank in range(2)]

    async def main():
        return await asyncio.gather(*(logreg_sgd.run(FakeKV(tables), c) for c in ctxs))

    summaries = asyncio.run(main())
    evals = [m for r in ctxs[0].reports for m in (r["metrics"] or []) if "test_auc" in m]
    assert [m["epoch"] for m in evals] == [1, 2]
    assert evals[0]["test_logloss"] < math.log(2)  # better than the all-zero start
    assert evals[1]["test_logloss"] < evals[0]["test_logloss"]
    assert evals[1]["test_auc"] > 0.7
    for rank, ctx in enumerate(ctxs):
        own = [m for r in ctx.reports for m in (r["metrics"] or []) if m.get("series") == f"worker{rank}"]
        assert [m["epoch"] for m in own] == [1, 2]
        if rank:
            assert not any("test_auc" in m for r in ctx.reports for m in (r["metrics"] or []))
        assert ctx.reports[-1]["progress"] == pytest.approx(1.0)
    assert summaries[0]["test_auc"] == evals[-1]["test_auc"]
    assert summaries[0]["batches"] == summaries[1]["batches"] == 2 * 54  # 5400 rows / 100 per epoch
    assert all(isinstance(v, (int, float, str)) for s in summaries for v in s.values())


def _sgd_run(data: dict, train: dict, workers: int = 2) -> list[dict]:
    spec = {"app": "logreg_sgd", "data": data, "train": train}
    tables: dict = {}
    ctxs = [FakeContext(spec, rank, workers) for rank in range(workers)]

    async def main():
        return await asyncio.gather(*(logreg_sgd.run(FakeKV(tables), c) for c in ctxs))

    return asyncio.run(main())


@pytest.mark.parametrize("nnz", [3, 300])
def test_logreg_sgd_default_step_is_data_scaled(nnz):
    """Rows of 3 and of 300 features at the default step both learn; the old fixed step
    0.5 diverges on the wide rows (a final test log-loss above log 2 is an error)."""
    from psd.apps.guard import DivergedError

    data = {"seed": 5, "examples": 3000, "features": 5000, "nnz": nnz}
    summaries = _sgd_run(data, {"epochs": 2, "batch_size": 100})
    train, _ = logreg_sgd.make_data(logreg_sgd.options({"data": data})["data"])
    assert summaries[0]["learning_rate"] == pytest.approx(logreg_sgd.default_step(train, 2))
    assert summaries[0]["test_logloss"] < 0.6 and summaries[0]["test_auc"] > 0.6, summaries[0]
    if nnz == 300:
        with pytest.raises(DivergedError, match="lower train.learning_rate"):
            _sgd_run(data, {"epochs": 2, "batch_size": 100, "learning_rate": 0.5})


def test_largest_eigenvalue_matches_numpy():
    import scipy.sparse as sp
    ds, _, _ = make_sparse_logreg(3000, 400, 12, seed=4, test_fraction=0.0)
    X = sp.csr_matrix((ds.values.astype(float), ds.indices.astype(np.int64), ds.indptr), shape=(len(ds), 400))
    exact = np.linalg.eigvalsh((X.T @ X).toarray() / len(ds))[-1]
    assert logreg_sgd.largest_eigenvalue(ds) == pytest.approx(exact, rel=0.03)


def test_straggler_options_are_checked():
    bad = {"train": {"slow_factor": 0.5, "slow_chance": 2}}
    problems = logreg_sgd.validate(bad, "job.yaml")
    assert any("train.slow_factor: expected a number in [1, 1000]" in p for p in problems), problems
    assert any("train.slow_chance: expected a probability in [0, 1]" in p for p in problems), problems
    assert logreg_sgd.validate({"train": {"slow_factor": 4, "slow_chance": 0.1, "learning_rate": None}}, "j") == []

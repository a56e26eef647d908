"""The L1 logistic regression app (`app: logreg`) and its LIBSVM reader.

End to end through `psd run` in a subprocess: the final objective is within 1% of
scikit-learn's solution of the same problem on the same training data, with both
objectives computed here by one function from the weights each solver produced;
a LIBSVM round trip (files written here, hashed feature ids, more files than
workers); bad job files exit 2 with one line naming the file and the key. The rest
checks the reader, the validation and the objective in-process.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import yaml
from sklearn.linear_model import LogisticRegression

from psd.apps import logreg
from psd.apps.datasets import SparseDataset, make_sparse_logreg, shard
from psd.apps.datasets.libsvm import concat, expand_files, load_shard, read_chunks, shard_plan, write_libsvm
from psd.apps.hashing import mix64, token_id
from psd.errors import ConfigError
from psd.store import Table, TableSpec

PSD = [sys.executable, "-m", "psd"]
L1 = 1e-3
DATA = {"generator": "sparse_logreg", "seed": 3, "examples": 6000, "features": 5000, "nnz": 10}


def run_psd(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*PSD, *args], capture_output=True, text=True, timeout=timeout)


def write_job(tmp_path: Path, job: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job))
    return path


def saved_model(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The weights every worker saved, merged (a key two workers hold has one value), as
    rank 0 wrote them into model.npz; checked against the parts themselves."""
    parts = [np.load(p) for p in sorted((folder / "parts").glob("part-*.npz"))]
    assert parts, f"no model parts in {folder}/parts"
    keys = np.concatenate([p["keys"] for p in parts])
    w = np.concatenate([p["w"] for p in parts])
    keys, first = np.unique(keys, return_index=True)
    model = logreg.Model.load(folder)
    assert model.header["format"] == "psd-model" and model.header["app"] == "logreg"
    np.testing.assert_array_equal(model.keys, keys)
    np.testing.assert_allclose(model.w, w[first])
    return model.keys, model.w


def sklearn_solution(data: SparseDataset, l1: float) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's minimiser of mean log-loss + l1 * |w|_1 (no intercept): its
    objective is |w|_1 + C * sum of losses, the same up to a factor when C = 1/(n*l1)."""
    keys, cols = np.unique(data.indices, return_inverse=True)
    X = sp.csr_matrix((data.values.astype(np.float64), cols, data.indptr), shape=(len(data), keys.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn >= 1.8 deprecates `penalty`; older ones need it
        clf = LogisticRegression(penalty="l1", solver="liblinear", C=1.0 / (len(data) * l1),
                                 fit_intercept=False, tol=1e-6, max_iter=1000)  # 1e-10 never converges
        clf.fit(X, data.labels)
    return keys, clf.coef_.ravel()


# -- end to end ---------------------------------------------------------------------
def test_psd_run_reaches_the_sklearn_objective(tmp_path):
    out = tmp_path / "out"
    job = {"name": "lr", "app": "logreg", "servers": 2, "workers": 2, "consistency": "bounded",
           "max_delay": 1, "data": DATA, "train": {"l1": L1, "blocks": 8, "passes": 12},
           "model": {"save": str(tmp_path / "model")}}
    res = run_psd("run", str(write_job(tmp_path, job)), "--quiet", "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "lr: done" in res.stdout

    train, _, _ = make_sparse_logreg(DATA["examples"], DATA["features"], DATA["nnz"], DATA["seed"])
    keys, w = saved_model(tmp_path / "model")
    ours = logreg.objective(train, keys, w, L1)
    ref_keys, ref_w = sklearn_solution(train, L1)
    theirs = logreg.objective(train, ref_keys, ref_w, L1)
    print(f"objective: psd {ours:.6f}, scikit-learn {theirs:.6f}, relative {ours / theirs - 1:+.2e}")
    assert abs(ours / theirs - 1) < 0.01
    assert abs(np.count_nonzero(w) - np.count_nonzero(ref_w)) <= 0.1 * np.count_nonzero(ref_w) + 2

    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == pytest.approx(ours, rel=1e-5)  # the distributed sum is exact
    assert summary["total_examples"] == len(train) == summary["examples"]
    assert summary["nnz_weights"] == np.count_nonzero(w)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "objective" in r]
    iterations = summary["iterations"]          # 12 passes at most; fewer if a pass gains under tol
    assert summary["stopped"] in ("passes", "converged") and 8 * 6 <= iterations <= 8 * 12
    assert [r["iteration"] for r in evals] == list(range(iterations + 1))  # one per iteration + final
    assert evals[0]["objective"] == pytest.approx(np.log(2), rel=1e-6)  # w = 0
    assert evals[-1]["objective"] < evals[8]["objective"] < evals[0]["objective"]
    assert evals[-1]["test_auc"] > 0.75 and evals[-1]["test_logloss"] < 0.6
    for png in ("objective.png", "nnz.png", "test.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_libsvm_files_round_trip(tmp_path):
    """Three LIBSVM files for two workers, labels -1/+1 in some and 0/1 in others,
    feature ids hashed: the same objective as scikit-learn on the original data."""
    full, test, _ = make_sparse_logreg(3000, 800, 8, seed=11, test_fraction=0.2)
    for i in range(3):
        write_libsvm(tmp_path / f"train-{i}.svm", shard(full, i, 3), zero_one=i == 1)
    write_libsvm(tmp_path / "test.svm", test)
    out = tmp_path / "out"
    job = {"app": "logreg", "workers": 2, "consistency": "sequential",
           "data": {"files": str(tmp_path / "train-*.svm"), "test_files": [str(tmp_path / "test.svm")],
                    "hash_features": True, "chunk_rows": 500},
           "train": {"l1": L1, "blocks": 4, "passes": 12}, "model": {"save": str(tmp_path / "model")}}
    res = run_psd("run", str(write_job(tmp_path, job)), "--quiet", "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]

    keys, w = saved_model(tmp_path / "model")
    assert keys.max() > 2**40  # hashed keys spread over the key space
    hashed = load_shard(sorted(tmp_path.glob("train-*.svm")), 0, 1, hash_features=True)
    ours = logreg.objective(hashed, keys, w, L1)
    theirs = logreg.objective(full, *sklearn_solution(full, L1), L1)
    print(f"objective (LIBSVM): psd {ours:.6f}, scikit-learn {theirs:.6f}")
    assert abs(ours / theirs - 1) < 0.01
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_examples"] == len(full)
    assert summary["test_auc"] > 0.7


@pytest.mark.parametrize("change, key, expect", [
    ({"data": {"hash_features": True}}, "data.files", "missing; expected the LIBSVM training file(s)"),
    ({"train": {"l1": "lots"}}, "train.l1", "expected a number >= 0, got 'lots'"),
    ({"data": {"files": ["/nonexistent/train.svm"]}}, "data.files", "cannot read '/nonexistent/train.svm'"),
])
def test_bad_job_file_exits_2_with_one_line(tmp_path, change, key, expect):
    path = write_job(tmp_path, {"app": "logreg", "workers": 2, **change})
    res = run_psd("run", str(path), timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and f"{key}:" in lines[0] and expect in lines[0], lines[0]


# -- validation ----------------------------------------------------------------------
@pytest.mark.parametrize("spec, needle", [
    ({"train": {"solver": "newton"}}, "train.solver: expected one of prox, ftrl, adagrad, got 'newton'"),
    ({"train": {"blocks": 0}}, "train.blocks: expected an integer in [1, 1048576], got 0"),
    ({"train": {"curvature": "yes"}}, "train.curvature: expected true or false"),
    ({"train": {"lr": 0.1}}, "train.lr: unknown key"),
    ({"train": {"epochs": 3}}, "train.epochs: applies to solver ftrl and adagrad, not 'prox'"),
    ({"train": {"solver": "ftrl", "blocks": 4}}, "train.blocks: applies to solver prox, not 'ftrl'"),
    ({"consistency": "bounded", "max_delay": 4, "train": {"blocks": 4}},
     "train.blocks: expected more blocks than the job's max_delay (4)"),
    ({"data": {"files": "x.svm", "seed": 3}}, "data.seed: applies to generated data"),
    ({"data": {"files": 7}}, "data.files: expected a file path or glob"),
    ({"data": {"files": "/nonexistent/*.svm"}}, "data.files: no file matches '/nonexistent/*.svm'"),
    ({"data": {"nnz": 50, "features": 10}}, "data.nnz: expected at most data.features (10)"),
    ({"model": {"save": 3}}, "model.save: expected a folder path"),
    ({"model": "here"}, "model: expected a mapping"),
    ({"filters": {"kkt": True}}, "filters: expected a list of filters, got dict"),
    ({"filters": [{"kkt": {"recheck": -1}}]}, "filters[0].recheck: expected an integer >= 0"),
])
def test_validation_names_key_and_expectation(spec, needle):
    problems = logreg.validate({"app": "logreg", **spec}, "job.yaml")
    assert any(p.startswith("job.yaml: ") and needle in p for p in problems), problems


def test_validation_accepts_the_shipped_job_and_defaults():
    shipped = yaml.safe_load((Path(__file__).parent.parent / "configs/jobs/logreg.yaml").read_text())
    assert logreg.validate(shipped, "logreg.yaml") == []
    assert logreg.validate({"app": "logreg"}, "j") == []
    assert logreg.delay_of({"consistency": "bounded", "max_delay": "auto"}) == 8
    assert logreg.delay_of({"cluster": {"consistency": "bounded", "max_delay": 3}}) == 3
    assert logreg.delay_of({"consistency": "sequential"}) == 0


def test_unreadable_file_is_named(tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    _, problems = expand_files([str(folder)], "data.files", "job.yaml")
    assert problems == [f"job.yaml: data.files: {str(folder)!r} is a directory; expected a LIBSVM file "
                        f"(use a glob such as {str(folder / '*')!r} for the files in it)"]


# -- the reader -----------------------------------------------------------------------
def test_reader_parses_labels_comments_qid_and_repeats(tmp_path):
    path = tmp_path / "a.svm"
    path.write_text("# header\n+1 3:1 1:0.5 3:2  # repeated key 3\n-1 qid:4 10:1.5\n\n0 2:1\n1 7:1e-1\n")
    (data,) = list(read_chunks([path]))
    np.testing.assert_array_equal(data.labels, [1, 0, 0, 1])
    np.testing.assert_array_equal(data.indptr, [0, 2, 3, 4, 5])
    np.testing.assert_array_equal(data.indices, [1, 3, 10, 2, 7])
    np.testing.assert_allclose(data.values, [0.5, 3.0, 1.5, 1.0, 0.1])
    chunks = list(read_chunks([path], chunk_rows=3))
    assert [len(c) for c in chunks] == [3, 1]
    np.testing.assert_array_equal(concat(chunks).indices, data.indices)


@pytest.mark.parametrize("text, needle", [
    ("2 1:1\n", ":1: label '2' is not binary"),
    ("yes 1:1\n", ":1: label 'yes' is not a number"),
    ("1 1:1\n1 4\n", ":2: expected FEATURE:VALUE, got '4'"),
    ("1 1:x\n", ":1: feature value 'x' is not a number"),
    ("1 1:1\n\n1 ab:1\n", ":3: feature id 'ab' is not an integer"),
])
def test_reader_errors_name_file_and_line(tmp_path, text, needle):
    path = tmp_path / "bad.svm"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        list(read_chunks([path]))
    assert str(info.value).startswith(f"{path}:")


def test_hashed_features_are_stable_and_collision_free(tmp_path):
    # a fixed value: keys must not change between versions, or saved models break
    assert int(mix64(np.array([0], np.uint64))[0]) == 0xE220A8397B1DCDAF  # SplitMix64(0)
    path = tmp_path / "n.svm"
    path.write_text("1 7:1 colour:2 18446744073709551615:1\n0 7:1 8:1\n")
    a, = list(read_chunks([path], hash_features=True))
    want = mix64(np.array([7, 2**64 - 1], np.uint64)).tolist() + [token_id("colour")]
    assert sorted(a.indices[:3].tolist()) == sorted(want)  # names hash as the text apps hash them
    ids = np.arange(100_000, dtype=np.uint64)
    assert np.unique(mix64(ids)).size == ids.size
    path.write_text("".join(f"1 {i}:1\n" for i in range(1000)))
    b = load_shard([path], 0, 1, hash_features=True)
    np.testing.assert_array_equal(b.indices, mix64(np.arange(1000, dtype=np.uint64)))


@pytest.mark.parametrize("num_files, num_shards", [(3, 2), (1, 3), (4, 4)])
def test_shards_partition_the_rows(tmp_path, num_files, num_shards):
    full, _, _ = make_sparse_logreg(301, 200, 6, seed=5, test_fraction=0.0)
    files = []
    for i in range(num_files):
        files.append(tmp_path / f"p{i}.svm")
        write_libsvm(files[-1], shard(full, i, num_files))
    parts = [load_shard(files, s, num_shards, chunk_rows=17) for s in range(num_shards)]
    assert sum(len(p) for p in parts) == len(full)
    seen = sorted(tuple(p.indices[p.indptr[i]:p.indptr[i + 1]].tolist()) + (float(p.labels[i]),)
                  for p in parts for i in range(len(p)))
    want = sorted(tuple(full.indices[full.indptr[i]:full.indptr[i + 1]].tolist()) + (float(full.labels[i]),)
                  for i in range(len(full)))
    assert seen == want
    assert shard_plan(files, 0, num_shards)[1] == (num_files < num_shards)


def test_write_then_read_is_identity(tmp_path):
    data, _, _ = make_sparse_logreg(500, 300, 7, seed=9, test_fraction=0.0)
    write_libsvm(tmp_path / "d.svm", data)
    back = load_shard([tmp_path / "d.svm"], 0, 1)
    for a, b in zip((data.indptr, data.indices, data.values, data.labels),
                    (back.indptr, back.indices, back.values, back.labels)):
        np.testing.assert_array_equal(a, b)


# -- the math ---------------------------------------------------------------------------
def test_objective_matches_dense_numpy():
    data, _, _ = make_sparse_logreg(400, 50, 5, seed=2, test_fraction=0.0)
    rng = np.random.default_rng(0)
    keys = np.arange(0, 50, 2, dtype=np.uint64)  # odd features are absent: weight 0
    w = rng.normal(size=keys.size)
    dense = np.zeros(50)
    dense[keys.astype(int)] = w
    X = np.zeros((len(data), 50))
    X[data.row_ids(), data.indices.astype(int)] = data.values
    m = X @ dense
    y = data.labels
    want = np.mean(np.log1p(np.exp(m)) - y * m) + 0.3 * np.abs(w).sum() + 0.5 * 0.2 * (w @ w)
    assert logreg.objective(data, keys, w, 0.3, 0.2) == pytest.approx(want, rel=1e-12)


def test_block_gradients_add_up_to_the_full_gradient():
    """The parts workers push (their examples' sums / N) add up to the whole gradient."""
    data, _, _ = make_sparse_logreg(600, 120, 6, seed=4, test_fraction=0.0)
    keys = np.unique(data.indices)
    w = np.random.default_rng(1).normal(scale=0.3, size=keys.size)
    bounds = np.array([0, 40, keys.size])
    total = np.zeros(keys.size)
    for s in range(3):
        part = shard(data, s, 3)
        d = logreg.Design.of(part, keys)
        d.recompute(w)
        d.split(bounds)
        for b in range(2):
            g, _ = d.block_gradient(b, bounds[b + 1] - bounds[b], 1.0 / len(data))
            total[bounds[b]:bounds[b + 1]] += g
    X = np.zeros((len(data), keys.size))
    X[data.row_ids(), np.searchsorted(keys, data.indices)] = data.values
    p = 1 / (1 + np.exp(-(X @ w)))
    np.testing.assert_allclose(total, X.T @ (p - data.labels) / len(data), rtol=1e-9, atol=1e-12)


# -- every solver in-process, one worker, against the real updaters ----------------------
class OneWorkerKV:
    """The async KV API for a single worker: tables are real ``psd.store.Table``s, pushes
    apply at once (with one worker every consistency model reads its own writes)."""

    def __init__(self):
        self.tables: dict[str, Table] = {}
        self.clock_value = 0

    async def table(self, name, width=1, dtype="float32", updater="sum", filters=None, pull_filters=None,
                    **options):
        spec = TableSpec(name, width, dtype, updater, options).validate()  # (filters: none in process)
        table = self.tables.setdefault(name, Table(spec))
        assert table.spec == spec
        return FakeTable(table)

    async def wait(self, ts):
        return None

    def clock(self):
        self.clock_value += 1
        return self.clock_value


class FakeTable:
    filters = None

    def __init__(self, table: Table):
        self.table = table

    def push(self, keys, values):
        assert keys.dtype == np.uint64 and np.all(keys[1:] > keys[:-1])
        self.table.push(keys, np.asarray(values))
        return 0

    async def pull(self, keys):
        return self.table.pull(np.asarray(keys, dtype=np.uint64)).copy()


class OneWorkerContext:
    job_id, rank, num_workers, shards = "J1", 0, 1, [0]

    def __init__(self, spec):
        self.spec = spec
        self.records: list[dict] = []

    async def report(self, progress=None, metrics=None, **_):
        self.records.extend(metrics or [])


@pytest.mark.parametrize("train, key, within", [
    ({"l1": L1, "blocks": 8, "passes": 12}, "iteration", 0.002),
    ({"l1": L1, "blocks": 8, "passes": 40, "curvature": False, "learning_rate": 4.0}, "iteration", 0.03),
    ({"solver": "ftrl", "l1": L1, "epochs": 4, "batch_size": 200, "learning_rate": 1.0}, "epoch", 0.1),
    # adagrad shrinks only the keys a minibatch touches: rare features stay under-regularised,
    # so |w|_1 and F grow while the log-loss falls (docs/jobs.md)
    ({"solver": "adagrad", "l1": L1, "epochs": 4, "batch_size": 200}, "epoch", 0.6),
])
def test_every_solver_in_process(train, key, within):
    """Each solver's loop, evaluation and summary, one worker in-process: how close it
    gets to the optimum of F (prox exactly; the online solvers roughly)."""
    spec = {"app": "logreg", "data": DATA, "train": train}
    assert logreg.validate(spec, "j") == []
    kv, ctx = OneWorkerKV(), OneWorkerContext(spec)
    summary = asyncio.run(logreg.run(kv, ctx))
    full, _, _ = make_sparse_logreg(DATA["examples"], DATA["features"], DATA["nnz"], DATA["seed"])
    best = logreg.objective(full, *sklearn_solution(full, L1), L1)
    w = kv.tables["w"]  # the worker daemon puts it in the job's namespace (J1/w)
    ours = logreg.objective(full, w.keys, w.vals[:, 0], L1)
    assert summary["objective"] == pytest.approx(ours, rel=1e-5)
    assert 0 <= ours / best - 1 < within, (ours, best)
    evals = [r for r in ctx.records if "objective" in r]
    assert [r[key] for r in evals] == sorted(r[key] for r in evals) and evals[-1] is not evals[0]
    assert evals[-1]["train_logloss"] < evals[0]["train_logloss"]
    assert evals[-1]["test_logloss"] < evals[0]["test_logloss"]
    if train.get("solver") != "adagrad":
        assert evals[-1]["objective"] < evals[0]["objective"]
    assert evals[-1]["test_auc"] > 0.7 and summary["nnz_weights"] == np.count_nonzero(w.vals[:, 0])

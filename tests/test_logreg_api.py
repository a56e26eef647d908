"""``psd.estimators.fit_logreg``: the L1 logistic regression app on numpy / scipy.sparse arrays
from Python, through the same path as ``psd run`` (a local cluster, worker daemons, the
job's ``data.npz`` input), and the ``.npz`` input a job file can name itself.

The learned objective is compared with scikit-learn's solution of the same problem,
both scored by ``psd.apps.logreg.objective``; bad arrays and options raise a
``psd.PsdError`` subclass naming the problem, without starting a cluster.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

import psd
from psd.apps import APPS, logreg
from psd.apps.datasets import make_sparse_logreg
from psd.apps.datasets.arrays import check_npz, from_arrays, load_npz, write_npz
from psd.estimators import fit_logreg
from psd.jobs.spec import parse_job

L1 = 1e-3


def as_matrix(data, columns: int) -> sp.csr_matrix:
    return sp.csr_matrix((data.values.astype(np.float64), data.indices.astype(np.int64), data.indptr),
                         shape=(len(data), columns))


def sklearn_objective(X, y01: np.ndarray, l1: float) -> float:
    """F at scikit-learn's minimiser of mean log-loss + l1 |w|_1 (no intercept)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn >= 1.8 deprecates `penalty`
        clf = LogisticRegression(penalty="l1", solver="liblinear", C=1.0 / (X.shape[0] * l1),
                                 fit_intercept=False, tol=1e-6, max_iter=1000).fit(X, y01)
    return score(X, y01, clf.coef_.ravel(), l1)


def score(X, y, coef: np.ndarray, l1: float) -> float:
    return logreg.objective(from_arrays(X, y), np.arange(coef.size, dtype=np.uint64), coef, l1)


@pytest.fixture(scope="module")
def problem():
    train, test, _ = make_sparse_logreg(5000, 3000, 10, seed=3, test_fraction=0.1)
    return as_matrix(train, 3000), train.labels.astype(np.float64), as_matrix(test, 3000), test.labels


# -- end to end ---------------------------------------------------------------------------
def test_fit_sparse_matches_sklearn(problem):
    X, y, Xt, yt = problem
    result = fit_logreg(X.tocsc(), 2 * y - 1, servers=2, workers=2, l1=L1, blocks=8, passes=12,
                        X_test=Xt, y_test=yt)  # any sparse format, -1/+1 labels
    ours = score(X, y, result.coef, L1)
    theirs = sklearn_objective(X, y, L1)
    print(f"objective: psd.fit {ours:.6f}, scikit-learn {theirs:.6f}, relative {ours / theirs - 1:+.2e}")
    assert abs(ours / theirs - 1) < 0.01
    assert result.coef.shape == (3000,) and result.output is None
    # one source of defaults: fit_logreg runs what logreg.fit runs (test_apps_models checks that side)
    assert result.header["options"]["consistency"] == logreg.FIT_CONSISTENCY == "sequential"
    assert result.objective == pytest.approx(ours, rel=1e-5)  # the workers' own sum
    assert result.summary["total_examples"] == X.shape[0] and result.summary["state"] == "done"
    assert result.summary["nnz_weights"] == np.count_nonzero(result.coef) == result.keys.size
    np.testing.assert_array_equal(result.coef[result.keys.astype(np.int64)], result.values)
    evals = [r for r in result.metrics if "objective" in r]
    assert evals[-1]["objective"] < evals[0]["objective"] and evals[-1]["test_auc"] > 0.75
    p = result.predict_proba(Xt)
    assert p.shape == (Xt.shape[0],) and np.all((p > 0) & (p < 1))


def test_fit_dense_numpy_keeps_its_outputs(tmp_path):
    train, _, _ = make_sparse_logreg(1500, 60, 8, seed=7, test_fraction=0.0)
    X = as_matrix(train, 60).toarray()
    y = train.labels.astype(bool)
    result = fit_logreg(X, y, servers=1, workers=1, l1=L1, blocks=4, passes=15, output=tmp_path / "fit",
                        consistency="sequential")
    ours = score(X, y, result.coef, L1)
    theirs = sklearn_objective(X, y, L1)
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)
    out = tmp_path / "fit"
    assert result.output == out
    assert json.loads((out / "summary.json").read_text())["objective"] == pytest.approx(result.objective)
    assert (out / "objective.png").read_bytes()[:4] == b"\x89PNG"
    back = load_npz(out / "data" / "train.npz")
    np.testing.assert_array_equal(back.labels, y.astype(np.float32))
    keys, w = logreg.load_model(out)          # the workers' parts, merged
    np.testing.assert_array_equal(result.coef[keys.astype(np.int64)], w)
    model = logreg.Model.load(out)            # model.npz + model.json in the run folder
    np.testing.assert_array_equal(model.keys, keys)
    assert model.header["keys"].startswith("feature ids") and model.header["options"]["l1"] == L1
    np.testing.assert_allclose(model.predict_proba(X), result.predict_proba(X))


# -- bad arrays and options: no cluster is started ------------------------------------------
def _float_indices():
    X = sp.csr_matrix(np.eye(3))
    X.indices = X.indices.astype(np.float64)
    return X


@pytest.mark.parametrize("X, y, kwargs, error, needle", [
    (np.eye(3), [0, 1], {}, psd.BadRequestError, "X has 3 rows but y has 2 labels"),
    (np.eye(3), [0, 1, 2], {}, psd.BadRequestError, "y: labels must be binary, 0/1 or -1/+1; got 3 distinct"),
    (np.eye(3), [-1, 0, 1], {}, psd.BadRequestError, "labels must be binary"),
    (np.eye(3), ["a", "b", "a"], {}, psd.BadRequestError, "y: expected numeric labels"),
    (_float_indices(), [0, 1, 0], {}, psd.BadRequestError, "X.indices: expected integer indices, got dtype float64"),
    (np.array([["1", "0"]]), [1], {}, psd.BadRequestError, "X: expected numeric values"),
    (np.ones(3), [0, 1, 0], {}, psd.BadRequestError, "X: expected a 2-d array"),
    (np.array([[np.nan, 1.0]]), [1], {}, psd.BadRequestError, "NaN or infinite"),
    (np.eye(3), [0, 1, 0], {"bloks": 4}, psd.BadRequestError, "fit_logreg(): unknown option 'bloks'"),
    (np.eye(3), [0, 1, 0], {"X_test": np.eye(3)}, psd.BadRequestError, "give both or neither"),
    (np.eye(3), [0, 1, 0], {"X_test": np.eye(2), "y_test": [0, 1]}, psd.BadRequestError,
     "X_test has 2 columns but X has 3"),
    (np.eye(3), [0, 1, 0], {"blocks": 0}, psd.ConfigError, "fit_logreg: train.blocks: expected an integer"),
    (np.eye(3), [0, 1, 0], {"l1": -1.0}, psd.ConfigError, "fit_logreg: train.l1: expected a number >= 0"),
])
def test_bad_input_raises_a_named_error(X, y, kwargs, error, needle):
    with pytest.raises(error) as info:
        fit_logreg(X, y, **kwargs)
    assert isinstance(info.value, psd.PsdError)
    assert needle in str(info.value), str(info.value)


# -- data.npz in a job file -----------------------------------------------------------------
def npz_job(path, **data) -> dict:
    return {"app": "logreg", "workers": 2, "data": {"npz": str(path), **data}}


def test_npz_job_validates(tmp_path):
    good = write_npz(tmp_path / "good.npz", from_arrays(np.eye(4), [0, 1, 1, 0]))
    assert parse_job(npz_job(good), "job.yaml", APPS).spec["data"]["npz"] == str(good)

    np.savez(tmp_path / "floats.npz", indptr=np.array([0, 1]), indices=np.array([0.0]), values=np.ones(1),
             labels=np.ones(1))
    np.savez(tmp_path / "partial.npz", indptr=np.array([0, 1]), labels=np.ones(1))
    np.savez(tmp_path / "short.npz", indptr=np.array([0, 1, 1]), indices=np.array([0]), values=np.ones(1),
             labels=np.ones(1))
    (tmp_path / "text.npz").write_text("not a zip")
    cases = [
        (npz_job(tmp_path / "none.npz"), f"job.yaml: data.npz: cannot read '{tmp_path / 'none.npz'}': "
                                         f"No such file or directory"),
        (npz_job(tmp_path / "floats.npz"), "array indices has dtype float64; expected integer column indices"),
        (npz_job(tmp_path / "partial.npz"), "missing array(s) indices, values"),
        (npz_job(tmp_path / "short.npz"), "array indptr has 3 entries; expected rows + 1 = 2"),
        (npz_job(tmp_path / "text.npz"), "is not an .npz file"),
        (npz_job(tmp_path), "is a directory"),
        (npz_job(good, seed=3), "job.yaml: data.seed: applies to generated data, but data.npz names arrays"),
        (npz_job(good, hash_features=True), "data.hash_features: applies to LIBSVM files"),
        ({"app": "logreg", "data": {"test_npz": str(good)}}, "data.npz: missing"),
    ]
    for job, needle in cases:
        with pytest.raises(psd.ConfigError) as info:
            parse_job(job, "job.yaml", APPS)
        lines = str(info.value).splitlines()
        assert len(lines) == 1 and lines[0].startswith("job.yaml: data.") and needle in lines[0], (needle, lines)


def test_npz_contents_are_checked_on_load(tmp_path):
    np.savez(tmp_path / "labels.npz", indptr=np.array([0, 1, 2]), indices=np.array([0, 1]), values=np.ones(2),
             labels=np.array([0, 3]))
    np.savez(tmp_path / "indptr.npz", indptr=np.array([0, 2, 1]), indices=np.array([0, 1]), values=np.ones(2),
             labels=np.array([0, 1]))
    for name, needle in [("labels", "labels must be binary"), ("indptr", "indptr must start at 0")]:
        with pytest.raises(psd.ConfigError, match=needle) as info:
            load_npz(tmp_path / f"{name}.npz")
        assert str(info.value).startswith(str(tmp_path / f"{name}.npz"))
    # repeated columns in a row are summed and rows sorted, as the LIBSVM reader does
    np.savez(tmp_path / "dup.npz", indptr=np.array([0, 3]), indices=np.array([5, 2, 5], np.int32),
             values=np.array([1.0, 2.0, 0.5]), labels=np.array([-1]))
    d = load_npz(tmp_path / "dup.npz")
    assert d.indices.tolist() == [2, 5] and d.values.tolist() == [2.0, 1.5] and d.labels.tolist() == [0.0]
    assert check_npz(str(tmp_path / "dup.npz"), "data.npz", "j") == []


def test_fit_job_is_the_one_source_of_fit_defaults(tmp_path):
    """logreg.fit and fit_logreg both build their job here: sequential unless told,
    and bounded gets max_delay 1 unless given."""
    X, y = np.eye(3), [0, 1, 0]
    assert logreg.fit_job(X, y, tmp_path)["consistency"] == logreg.FIT_CONSISTENCY
    assert "max_delay" not in logreg.fit_job(X, y, tmp_path)
    job = logreg.fit_job(X, y, tmp_path, consistency="bounded")
    assert (job["consistency"], job["max_delay"]) == ("bounded", 1)
    assert logreg.fit_job(X, y, tmp_path, consistency="bounded", max_delay=3)["max_delay"] == 3

"""The apps at their defaults on differently scaled data, and the models they return.

- ``logreg.fit`` with only ``l1`` given, on generated Zipf data (values 1, ~15 per row)
  and on an a9a-like census set (123 one-hot columns, 14 per row, collinear groups;
  the real adult set is not in any registry package the machine reaches, so it is
  generated at the same shape), each within 0.5% of scikit-learn's objective.
- ``cms.fit`` on a word stream: ``query`` and ``heavy_hitters`` take and give strings.
- ``lda.fit`` on documents given as strings: the model comes back with its top words.
"""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from psd.apps import cms, lda, logreg
from psd.apps.datasets import make_sparse_logreg
from psd.apps.datasets.synthetic import make_onehot_census
from psd.apps.guard import DivergedError, Watch, check_end


def a9a_like(n: int, seed: int = 0):
    return make_onehot_census(n, seed)


def generated():
    tr, _, _ = make_sparse_logreg(2500, 3000, 12, seed=3, test_fraction=0.1)
    keys, cols = np.unique(tr.indices, return_inverse=True)
    return sp.csr_matrix((tr.values.astype(float), cols, tr.indptr), shape=(len(tr), keys.size)), tr.labels


def F(X, y, w, l1):
    m = X @ w
    return float(np.mean(np.logaddexp(0, m) - y * m) + l1 * np.abs(w).sum())


def sklearn_objective(X, y, l1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(penalty="l1", solver="liblinear", C=1 / (X.shape[0] * l1), fit_intercept=False,
                                 tol=1e-8, max_iter=10000).fit(X, y)
    return F(X, y, clf.coef_.ravel(), l1)


@pytest.mark.parametrize("make, l1", [(generated, 1e-3), (lambda: a9a_like(3000), 3e-4)], ids=["zipf", "a9a"])
def test_logreg_defaults_reach_sklearn(make, l1, tmp_path):
    X, y = make()
    result = logreg.fit(X, y, l1=l1, servers=1, output=tmp_path / "run")
    ours, theirs = F(X, y, result.coef, l1), sklearn_objective(X, y, l1)
    print(f"objective {ours:.6f} scikit-learn {theirs:.6f} ({ours / theirs - 1:+.3%}); {result.summary['passes']} "
          f"passes, {result.summary['stopped']}, step ratio {result.summary['step_ratio_median']}")
    assert ours / theirs - 1 < 0.005
    assert result.summary["step_shrinks"] <= 1   # a9a: one late halving, from oscillation near the optimum
    model = logreg.Model.load(tmp_path / "run")     # model.npz + model.json in the run folder
    assert model.header["options"]["consistency"] == logreg.FIT_CONSISTENCY   # as fit_logreg's (test_logreg_api)
    np.testing.assert_allclose(model.predict_proba(X), result.predict_proba(X), rtol=1e-6)
    assert (tmp_path / "run" / "objective.png").is_file()


def test_watch_shrinks_on_rises_and_refuses_divergence():
    w = Watch("t", patience=3, advice="lower it")
    for i, v in enumerate([0.69, 0.5, 0.6, 0.7, 0.8]):
        w.add(i, v)
    assert w.shrinks == 1 and w.scale == 2.0 and w.events[0]["iteration"] == 4
    with pytest.raises(DivergedError, match="lower it"):
        w.add(5, float("nan"))
    with pytest.raises(DivergedError, match="above its start"):
        check_end("t", 0.693, 23.5, 160, "lower it")
    check_end("t", 0.693, 0.2, 160, "")   # a run that ends lower is fine


def test_watch_compares_a_pass_with_the_pass_before():
    """Under a bounded delay the objective wobbles from block to block while every pass
    gains: rises against the previous evaluation must not halve the step, and one
    wobbly evaluation must not stop the run; a rise pass over pass still shrinks."""
    wobble = [1.0 - 0.01 * i + (0.015 if i % 2 and i > 4 else 0.0) for i in range(40)]   # up every other block
    w = Watch("t", patience=1, period=4)
    for i, v in enumerate(wobble):
        w.add(i, v)
    assert w.shrinks == 0                                  # period 1 (the old rule) shrinks 18 times
    old = Watch("t", patience=1)
    for i, v in enumerate(wobble):
        old.add(i, v)
    assert old.shrinks == 18
    blip = Watch("t", period=4)
    for i in range(40):
        blip.add(i, 1.0 - 0.01 * i + (0.04 if i == 39 else 0.0))   # the last evaluation as high as 4 before
    assert blip.at(39) == pytest.approx(blip.at(35))       # one value against one value: "no gain"
    assert not blip.converged(39, 35, tol=1e-3)            # the pass means still gain 4.5%
    flat = Watch("t", period=4)
    for i in range(12):
        flat.add(i, 0.5)
    assert flat.converged(11, 7, tol=1e-3)                 # a pass without gain stops the run
    up = Watch("t", patience=2, period=4)
    for i, v in enumerate([1.0, 0.9, 0.8, 0.7, 1.1, 1.0, 0.9, 0.8]):
        up.add(i, v)
    assert up.shrinks == 2                                 # 4 rises pass over pass, patience 2


def test_cms_fit_queries_and_heavy_hitters_by_string(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"word{i}" for i in range(3000)]
    draws = rng.zipf(1.3, size=30_000) % 3000
    lines = [" ".join(words[j] for j in draws[i:i + 20]) for i in range(0, draws.size, 20)]
    model = cms.fit(lines, epsilon=0.01, delta=0.01, servers=1, workers=2, output=tmp_path / "run")
    exact = Counter(words[j] for j in draws)
    top = [w for w, _ in exact.most_common(10)]
    est = model.query(top)
    assert all(e >= exact[w] for e, w in zip(est, top))                    # never under
    assert all(e - exact[w] <= 0.01 * draws.size for e, w in zip(est, top))
    hh = model.heavy_hitters(5)
    assert [w for w, _ in hh] == top[:5] and all(isinstance(w, str) for w, _ in hh)
    again = cms.Model.load(tmp_path / "run")
    assert again.header["items"] == "tokens" and again.counts.shape == (model.depth, model.width)
    assert model.query(["never-seen"])[0] <= 0.01 * draws.size


def test_lda_fit_returns_the_model():
    rng = np.random.default_rng(1)
    themes = [["apple", "pear", "plum", "grape", "melon"], ["piano", "violin", "flute", "drums", "cello"]]
    docs = [" ".join(rng.choice(themes[d % 2], size=30)) for d in range(120)]
    model = lda.fit(docs, topics=2, servers=1, workers=2, min_count=1, max_df=1.0, every=2)
    tops = [set(t) for t in model.top_words(5)]
    assert sorted(map(sorted, tops)) == sorted(map(sorted, themes))
    theta = model.transform(["apple pear plum", "flute cello drums"])
    assert theta.argmax(axis=1)[0] != theta.argmax(axis=1)[1] and theta.max() > 0.8
    assert model.summary["heldout_documents"] == 12 and model.summary["heldout_perplexity"] < 6


def _letters(i: int) -> str:
    """Word i of a generated vocabulary as letters (the tokenizer keeps runs of letters)."""
    out = ""
    for _ in range(3):
        i, r = divmod(i, 26)
        out = chr(97 + r) + out
    return "w" + out


def test_lda_fit_defaults_match_sklearn_on_a_sparse_corpus():
    """At defaults (alpha 0.1, the data-scaled beta, held-out stopping) at least as good
    as scikit-learn's variational LDA at its own defaults (1/K, 1/K; 40 batch
    iterations), on the same held-out documents by the same measure (document
    completion). Short documents over a large vocabulary (N / (K V) about 0.2). Measured:
    psd 517, scikit-learn 804 (the fixed-beta comparison is on real
    mail, tests/test_real_data.py)."""
    from sklearn.decomposition import LatentDirichletAllocation
    from psd.apps.datasets.topics import make_planted_corpus

    K = 20
    corpus = make_planted_corpus(1000, 3000, K, 16, 3, dominant_words=40)
    docs = [" ".join(_letters(w) for w in corpus.words[corpus.indptr[d]:corpus.indptr[d + 1]])
            for d in range(corpus.num_docs)]
    train, test = docs[:900], docs[900:]
    model = lda.fit(train, topics=K, servers=1, workers=2, min_count=1, max_df=1.0)
    counts = model.corpus(train)
    sk = LatentDirichletAllocation(n_components=K, learning_method="batch", max_iter=40, random_state=0
                                   ).fit(counts.counts_matrix())
    observed, target = lda.completion_split(model.corpus(test))
    ours = model.perplexity(test)
    phi = (sk.components_ / sk.components_.sum(axis=1, keepdims=True)).T
    theirs = lda.completion_perplexity(observed, target, phi, 1 / K, 20, 0)
    print(f"held-out perplexity: psd {ours:.1f} (beta {model.beta:.4f}, {model.summary['iterations']} sweeps), "
          f"scikit-learn {theirs:.1f} ({ours / theirs - 1:+.2%})")
    assert model.beta == pytest.approx(lda.default_beta(model.summary["tokens"], len(model.vocab), K))
    assert ours < 1.02 * theirs

"""Seeded synthetic sparse data with a known answer, so an app's learning can be checked.

Everything is drawn from one ``numpy.random.Generator`` seeded by the caller, in a
fixed order, so every worker that calls the generator with the same arguments builds
bit-identical arrays and can simply take its own shard; nothing has to be shipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SparseDataset:
    """Rows in CSR form: row ``i`` holds ``indices[indptr[i]:indptr[i+1]]`` (sorted, unique)."""

    indptr: np.ndarray   # int64, len(labels) + 1, starts at 0
    indices: np.ndarray  # uint64 feature ids
    values: np.ndarray   # float32, aligned with indices
    labels: np.ndarray   # float32 in {0, 1}

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def rows(self, i0: int, i1: int) -> "SparseDataset":
        """Rows ``i0:i1`` as views (indptr rebased to 0), clamped like a slice."""
        i0, i1, _ = slice(i0, i1).indices(len(self))
        i1 = max(i0, i1)
        lo, hi = int(self.indptr[i0]), int(self.indptr[i1])
        return SparseDataset(self.indptr[i0:i1 + 1] - lo, self.indices[lo:hi],
                             self.values[lo:hi], self.labels[i0:i1])

    def row_ids(self) -> np.ndarray:
        """The row number of every stored entry; the scatter index for per-row sums."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.indptr))


def shard_bounds(n: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Row range of one of ``num_shards`` contiguous shards whose sizes differ by at most one."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard {shard_index} of {num_shards} does not exist")
    return n * shard_index // num_shards, n * (shard_index + 1) // num_shards


def shard(ds: SparseDataset, shard_index: int, num_shards: int) -> SparseDataset:
    """The ``shard_index``-th contiguous shard; the shards partition ``ds`` exactly."""
    return ds.rows(*shard_bounds(len(ds), shard_index, num_shards))


def _zipf_ranks(rng: np.random.Generator, size: int, n: int, exponent: float) -> np.ndarray:
    """Popularity ranks in [0, n) with P(rank r) roughly proportional to (r + 1) ** -exponent.

    Inverse-CDF sampling of a continuous power law truncated to [1, n + 1) and floored:
    one vectorised expression, much faster than a search over an n-entry CDF.
    """
    u = rng.random(size)
    if abs(exponent - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1.0))
    else:
        s = 1.0 - exponent
        x = (1.0 + u * ((n + 1.0) ** s - 1.0)) ** (1.0 / s)
    return np.minimum(x.astype(np.int64) - 1, n - 1)


def _csr_from_draws(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of a (rows, k) id matrix and drop repeats, giving CSR indptr and indices."""
    ids = np.sort(ids, axis=1)
    keep = np.ones(ids.shape, dtype=bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
    indptr = np.zeros(ids.shape[0] + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return indptr, ids[keep]


def _margins(indptr: np.ndarray, indices: np.ndarray, w: np.ndarray) -> np.ndarray:
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    return np.bincount(rows, weights=w[indices], minlength=indptr.size - 1)


def make_sparse_logreg(num_examples: int, num_features: int, nnz_per_example: int, seed: int,
                       noise: float = 0.05, signal_fraction: float = 0.05, *,
                       test_fraction: float = 0.1, zipf_exponent: float = 1.1,
                       margin_scale: float = 3.0) -> tuple[SparseDataset, SparseDataset, np.ndarray]:
    """A binary classification set drawn from a planted sparse logistic model.

    Each example draws ``nnz_per_example`` feature ids from a Zipf-like popularity law
    (repeats within a row collapse, so rows may hold slightly fewer). Popularity ranks
    are scattered over the id space by a random permutation, like hashed features. A
    fraction ``signal_fraction`` of features get a non-zero true weight, chosen with
    probability growing with popularity, so the model is learnable from the data; the
    weights are scaled so true margins have standard deviation ``margin_scale``.
    Labels follow the logistic model, then each flips with probability ``noise``.

    Returns ``(train, test, true_w)``: the last ``round(num_examples * test_fraction)``
    rows are the test set; ``true_w`` is dense float32 indexed by feature id.
    """
    if num_examples < 1 or num_features < 1 or nnz_per_example < 1:
        raise ValueError("num_examples, num_features and nnz_per_example must be positive")
    if not 0.0 <= noise <= 0.5 or not 0.0 < signal_fraction <= 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError("need 0 <= noise <= 0.5, 0 < signal_fraction <= 1, 0 <= test_fraction < 1")
    rng = np.random.default_rng(seed)

    # popularity rank -> feature id
    id_of_rank = rng.permutation(num_features).astype(np.uint64)
    ranks = _zipf_ranks(rng, num_examples * nnz_per_example, num_features, zipf_exponent)
    indptr, indices = _csr_from_draws(id_of_rank[ranks].reshape(num_examples, nnz_per_example))

    # planted weights: weighted sampling without replacement (Efraimidis-Spirakis keys),
    # weight sqrt(popularity) so frequent features usually matter but not only they do
    n_signal = max(1, int(round(signal_fraction * num_features)))
    log_pop = -zipf_exponent * np.log1p(np.arange(num_features, dtype=np.float64))
    keys = np.log(rng.random(num_features)) * np.exp(-0.5 * log_pop)
    signal_ranks = np.sort(np.argpartition(-keys, n_signal - 1)[:n_signal])  # sorted: order-free
    true_w = np.zeros(num_features, dtype=np.float64)
    true_w[id_of_rank[signal_ranks].astype(np.int64)] = rng.standard_normal(n_signal)

    margins = _margins(indptr, indices, true_w)
    std = margins.std()
    if std > 0:
        true_w *= margin_scale / std
        margins *= margin_scale / std
    p = 1.0 / (1.0 + np.exp(-margins))
    labels = rng.random(num_examples) < p
    labels ^= rng.random(num_examples) < noise

    full = SparseDataset(indptr, indices, np.ones(indices.size, dtype=np.float32),
                         labels.astype(np.float32))
    n_train = num_examples - int(round(num_examples * test_fraction))
    return full.rows(0, n_train), full.rows(n_train, num_examples), true_w.astype(np.float32)


#: the a9a (adult census) layout: 123 binary columns in 14 one-hot groups, one per row
CENSUS_GROUPS = (5, 8, 5, 16, 5, 7, 14, 6, 5, 2, 3, 3, 5, 39)


def make_onehot_census(n: int, seed: int = 0):
    """A census-like set at a9a's shape (the adult set itself is in no registry package
    the project reaches): ``n`` rows of 14 one-hot groups (123 columns, 14 ones per row,
    skewed category frequencies, so the columns of a group are collinear with their
    sum), labels from a planted logistic model with about 24% positives. Returns
    ``(X, y)``: a scipy CSR matrix of ones and 0/1 labels."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    cols, off = [], 0
    for k in CENSUS_GROUPS:
        cols.append(off + rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 0.7))))
        off += k
    idx = np.stack(cols, 1)
    X = sp.csr_matrix((np.ones(idx.size), idx.ravel(), np.arange(0, idx.size + 1, len(CENSUS_GROUPS))),
                      shape=(n, off))
    m = X @ rng.normal(0, 0.8, off)
    m -= np.quantile(m, 0.76)
    return X, (rng.random(n) < 1 / (1 + np.exp(-m))).astype(float)

"""Table lookups through the run index agree with a plain model."""
import numpy as np
from hypothesis import given, settings, strategies as st

from psd.store import Table, TableSpec


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 5000), st.integers(1, 3000)), min_size=1, max_size=5),
       st.integers(0, 2**32), st.integers(64, 2000))
def test_run_index_lookups_match_a_dict(runs, seed, n_query):
    rng = np.random.default_rng(seed)
    keys = np.unique(np.concatenate([np.arange(lo, lo + n, dtype=np.uint64) for lo, n in runs]))
    t = Table(TableSpec("t", 1, "int64", "sum"))
    t.push(keys, np.arange(keys.size, dtype=np.int64).reshape(-1, 1) + 1)
    model = dict(zip(keys.tolist(), range(1, keys.size + 1)))
    # queries: stored keys, neighbours of runs, and random keys
    near = np.concatenate([keys[rng.integers(0, keys.size, n_query)],
                           np.array([lo - 1 for lo, _ in runs if lo > 0] + [lo + n for lo, n in runs],
                                    dtype=np.uint64),
                           rng.integers(0, 2**64, 50, dtype=np.uint64)])
    q = np.unique(near)
    got = t.pull(q)[:, 0]
    want = np.array([model.get(k, 0) for k in q.tolist()])
    assert np.array_equal(got, want)
    idx, present = t._locate(q)  # positions agree with a plain binary search
    ref = np.searchsorted(t.keys, q)
    ref_present = t.keys[np.minimum(ref, t.keys.size - 1)] == q
    assert np.array_equal(present, ref_present)
    assert np.array_equal(idx[present], ref[ref_present])

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


def test_pulled_views_never_change_and_are_read_only():
    """Large pulls of consecutive keys lend views under a lease (sent zero-copy); a later
    write must not show through a view whose lease is held, and must not copy once every
    lease is released. Small pulls, and pulls that take no lease, are private copies."""
    t = Table(TableSpec("t", 2, "int64", "sum"))
    n = 20_000  # 320 KB of values: over LEND_MIN_BYTES
    t.push_span(100, np.ones((n, 2), dtype=np.int64))
    leases: list = []
    span = t.pull_span(100, n, leases)
    keys = np.arange(200, 200 + 5000, dtype=np.uint64)  # 80 KB
    rows = t.pull(keys, leases)
    small = t.pull_span(100, 10, leases)
    private = t.pull(keys)  # no lease asked for: a copy
    assert len(leases) == 2 and t.lent() == 2
    assert not span.flags.writeable and not rows.flags.writeable
    assert np.shares_memory(span, t.vals) and not np.shares_memory(small, t.vals)  # lent / copied
    assert not np.shares_memory(private, t.vals)
    storage = t.vals
    t.push_span(100, np.full((n, 2), 5, dtype=np.int64))
    t.push(keys, np.full((keys.size, 2), 7, dtype=np.int64))
    assert (span == 1).all() and (rows == 1).all() and (small == 1).all()  # what was lent stays
    assert t.vals is not storage  # the write went to a fresh copy
    assert (t.pull_span(100, 100) == 6).all() and (t.pull(keys) == 13).all()
    leases = []
    t.pull_span(100, n, leases)
    for lease in leases:
        lease.release()  # the transport is done with it: the next write is in place
    storage = t.vals
    t.push_span(100, np.ones((10, 2), dtype=np.int64))
    assert t.vals is storage
    assert (t.pull_span(100, 10) == 7).all()
    done = [False]
    leases = []
    t.pull_span(100, n, leases)
    leases[0].track(lambda: done[0])  # held until the transport's tracker says sent
    t.push_span(100, np.ones((10, 2), dtype=np.int64))
    assert t.vals is not storage
    storage, done[0] = t.vals, True
    t.push_span(100, np.ones((10, 2), dtype=np.int64))
    assert t.vals is storage

"""The compiled store (hash rows, dense runs, fused updaters) against the numpy store it
replaced.

The reference below is the sorted-array store in a few lines: sorted keys, aligned
values and state arrays, new keys merged in as zeros, then the updater's numpy rule
(``Updater.apply``) on the pushed rows. The table runs the same rules as compiled loops,
one key at a time (``psd.store.kernels``); results must be equal bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from psd.store import Table, TableSpec, make_updater
from psd.store import hashrows
from psd.store.runs import RUN_MIN

from psd.keysets import setdiff, unique

TOP = 2**64 - 1

#: (updater, options, widths it takes, float tables only)
UPDATERS = [
    ("sum", {}, None, False),
    ("assign", {}, None, False),
    ("sgd", {"lr": 0.3}, None, True),
    ("prox_l1", {"lr": 0.2, "l1": 0.05, "l2": 0.5}, None, True),
    ("prox_l1", {"lr": 0.5, "l1": 0.1, "aggregate": True}, 3, True),
    ("adagrad", {"lr": 0.1, "l1": 0.01}, None, True),
    ("adagrad", {"lr": 0.5}, None, True),
    ("ftrl", {"alpha": 0.1, "beta": 1.0, "l1": 0.05, "l2": 0.1}, None, True),
    ("ftrl", {"alpha": 0.5, "beta": 0.0}, None, True),
]


class Reference:
    """The sorted-array store: what ``psd/store/table.py`` did before the hash rows."""

    def __init__(self, updater: str, options: dict, width: int, dtype):
        self.dtype, self.width = np.dtype(dtype), width
        self.updater = make_updater(updater, self.dtype, options, width)
        self.keys = np.empty(0, np.uint64)
        self.vals = np.zeros((0, width), self.dtype)
        self.state = {f: np.zeros((0, width), self.dtype) for f in self.updater.state_fields}

    def push(self, keys: np.ndarray, grad: np.ndarray) -> None:
        new = setdiff(keys, self.keys)
        if new.size:
            at = np.searchsorted(self.keys, new)
            self.keys = np.insert(self.keys, at, new)
            self.vals = np.insert(self.vals, at, 0, axis=0)
            self.state = {f: np.insert(a, at, 0, axis=0) for f, a in self.state.items()}
        self.updater.apply(self.vals, self.state, np.searchsorted(self.keys, keys), grad)

    def pull(self, keys: np.ndarray) -> np.ndarray:
        idx = np.minimum(np.searchsorted(self.keys, keys), max(self.keys.size - 1, 0))
        out = np.zeros((keys.size, self.width), self.dtype)
        if self.keys.size:
            hit = self.keys[idx] == keys
            out[hit] = self.vals[idx[hit]]
        return out

    def range(self, begin: int, end: int):
        a, b = np.searchsorted(self.keys, [begin, end]) if end <= TOP else \
            (np.searchsorted(self.keys, begin), self.keys.size)
        return self.keys[a:b], self.vals[a:b], {f: s[a:b] for f, s in self.state.items()}


def equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype.kind == "f":  # bit for bit, NaN equal to NaN (-0.0 and 0.0 too)
        assert np.array_equal(a, b, equal_nan=True), np.argwhere(~((a == b) | (np.isnan(a) & np.isnan(b))))[:5]
    else:
        assert np.array_equal(a, b)


@st.composite
def cases(draw):
    updater, options, fixed_width, float_only = draw(st.sampled_from(UPDATERS))
    dtypes = ["float32", "float64"] if float_only else ["float32", "float64", "int32", "int64"]
    dtype = draw(st.sampled_from(dtypes))
    width = fixed_width or draw(st.integers(1, 4))
    # a pool of keys: both ends of the key space, random ones, and a dense block long
    # enough to become a run when pushed as a span
    base = draw(st.integers(0, TOP - 2 * RUN_MIN))
    pool = np.unique(np.concatenate([
        np.array([0, 1, TOP - 1, TOP], np.uint64),
        np.array(draw(st.lists(st.integers(0, TOP), min_size=1, max_size=40)), np.uint64),
        np.arange(base, base + 2 * RUN_MIN, dtype=np.uint64)[:draw(st.integers(0, 2 * RUN_MIN))],
    ]))
    seed = draw(st.integers(0, 2**32 - 1))
    pushes = draw(st.integers(1, 8))
    return updater, options, dtype, width, pool, seed, pushes, base


def _grads(rng, n: int, width: int, dtype: np.dtype, updater: str) -> np.ndarray:
    if dtype.kind == "i":
        return rng.integers(-1000, 1000, size=(n, width)).astype(dtype)
    g = rng.normal(scale=2.0, size=(n, width))
    if updater == "prox_l1" and width == 3:  # (g, h, parts): parts of 1..3, sometimes odd
        g[:, 1] = np.abs(g[:, 1])
        g[:, 2] = rng.choice([1.0, 2.0, 3.0, 0.0, np.nan], size=n)
    return g.astype(dtype)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_updater_matches_the_numpy_store(case):
    updater, options, dtype, width, pool, seed, pushes, base = case
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    table = Table(TableSpec("t", width, dtype.name, updater, options).validate())
    ref = Reference(updater, options, width, dtype)
    for _ in range(pushes):
        if rng.random() < 0.25:  # a span (dense: a run once it is long enough)
            lo = base + int(rng.integers(0, RUN_MIN))
            count = int(rng.integers(1, RUN_MIN + 40))
            keys = np.arange(lo, lo + count, dtype=np.uint64)
            grad = _grads(rng, count, width, dtype, updater)
            table.push_span(lo, grad)
        else:
            keys = np.sort(rng.choice(pool, size=int(rng.integers(1, pool.size + 1)), replace=False))
            grad = _grads(rng, keys.size, width, dtype, updater)
            table.push(keys, grad)
        ref.push(keys, grad)
    # pulls: every key ever stored, keys never stored (zeros), both ends of the key space
    asked = unique(np.concatenate([ref.keys, pool, rng.integers(0, TOP, 20, dtype=np.uint64, endpoint=True)]))
    equal(table.pull(asked), ref.pull(asked))
    assert table.num_keys == ref.keys.size
    assert table.count_present(asked) == ref.keys.size
    # range operations: a snapshot of a random range, then retain of it
    lo, hi = sorted(int(k) for k in rng.integers(0, TOP, 2, dtype=np.uint64, endpoint=True))
    keys, vals, state = table.snapshot(lo, hi)
    want_keys, want_vals, want_state = ref.range(lo, hi)
    equal(keys, want_keys)
    equal(vals, want_vals)
    assert state.keys() == want_state.keys()
    for f in state:
        equal(state[f], want_state[f])
    assert table.count_present_span(lo, hi - lo) == want_keys.size
    # install what was snapshot into a fresh table: the same rows, state included
    copy = Table(TableSpec("t", width, dtype.name, updater, options).validate())
    copy.install(keys, vals, state)
    equal(copy.snapshot(0, 2**64)[1], want_vals)

    class R:
        begin, end = lo, hi
    assert table.retain([R]) == ref.keys.size - want_keys.size
    equal(table.snapshot(0, 2**64)[0], want_keys)
    equal(table.pull(asked), Reference.pull(_restricted(ref, lo, hi), asked))


def _restricted(ref: Reference, lo: int, hi: int) -> Reference:
    out = Reference.__new__(Reference)
    out.dtype, out.width, out.updater = ref.dtype, ref.width, ref.updater
    out.keys, out.vals, out.state = ref.range(lo, hi)
    return out


@pytest.mark.parametrize("updater,options,dtype", [
    ("sum", {}, "float32"), ("sum", {}, "int64"), ("adagrad", {"lr": 0.1}, "float32"),
    ("ftrl", {"alpha": 0.1, "l1": 0.05}, "float64"), ("prox_l1", {"lr": 0.2, "l1": 0.1}, "float32"),
])
def test_a_table_grown_through_many_resizes_matches(updater, options, dtype):
    """200k random keys in pushes of 10k, half of each push keys already stored: the
    index doubles from 2**10 to 2**19 slots (9 rehashes) and the rows grow ~30 times
    between the pushes and inside them, and every value stays where it belongs."""
    rng = np.random.default_rng(7)
    dtype = np.dtype(dtype)
    width = 2
    table = Table(TableSpec("t", width, dtype.name, updater, options).validate())
    ref = Reference(updater, options, width, dtype)
    stored = np.array([0, TOP], np.uint64)
    bits = [table._hash.bits]
    for i in range(40):
        fresh = rng.integers(0, TOP, 5000, dtype=np.uint64, endpoint=True)
        old = rng.choice(stored, min(5000, stored.size), replace=False)
        keys = unique(np.concatenate([fresh, old, np.array([0, TOP], np.uint64)]))
        grad = _grads(rng, keys.size, width, dtype, updater)
        table.push(keys, grad)
        ref.push(keys, grad)
        stored = ref.keys
        bits.append(table._hash.bits)
        assert table._hash.n <= hashrows.MAX_LOAD * (1 << table._hash.bits)  # what keeps probes short
    assert bits[-1] - bits[0] >= 8, bits
    assert table._hash.bits <= hashrows._MIN_BITS + 10
    equal(table.pull(ref.keys), ref.vals)
    keys, vals, state = table.snapshot(0, 2**64)
    equal(keys, ref.keys)
    equal(vals, ref.vals)
    for f in state:
        equal(state[f], ref.state[f])
    absent = rng.integers(0, TOP, 1000, dtype=np.uint64)
    absent = setdiff(absent, ref.keys)
    assert not table.pull(absent).any()


def test_keys_zero_and_top_are_keys_like_any_other():
    """The index marks empty slots itself (entry 0), so no key value is reserved."""
    t = Table(TableSpec("t", 1, "int64", "sum").validate())
    assert not t.pull(np.array([0, TOP], np.uint64)).any()
    t.push(np.array([0, TOP], np.uint64), np.array([[5], [7]], np.int64))
    t.push(np.array([TOP], np.uint64), np.array([[1]], np.int64))
    assert t.pull(np.array([0, 1, TOP - 1, TOP], np.uint64)).ravel().tolist() == [5, 0, 0, 8]
    assert t.snapshot(TOP, 2**64)[0].tolist() == [TOP]
    assert t.count_present_span(TOP, 1) == 1 and t.count_present_span(0, 2) == 1


def _mapping(a: np.ndarray):
    """The object that owns ``a``'s memory (the end of its ``base`` chain)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


def _vma_flags(address: int) -> list[str]:
    """This process's mapping holding ``address``: its name (``[heap]``, or nothing for
    an anonymous one) and VmFlags, from /proc/self/smaps."""
    hit = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                hit = head[5:] if lo <= address < hi else None
            elif hit is not None and head[0] == "VmFlags:":
                return hit + head[1:]
    return []


@pytest.mark.skipif(not hashrows._HUGE, reason="no MADV_HUGEPAGE on this platform")
def test_large_index_and_rows_get_mappings_of_their_own_with_huge_pages():
    """From ``HUGE_MIN`` bytes on, the index and the rows are each a private anonymous
    mapping asked to use huge pages, never a block calloc found in the heap (whose 4 KiB
    pages made a table's lookups 1.1-1.3x slower by where malloc put it, decision 145); small
    tables stay on numpy's allocator. Values are kept across the growth that moves them."""
    import mmap
    h = hashrows.HashRows(1, np.float32, 0)
    assert not isinstance(_mapping(h.index), mmap.mmap)  # (2**10 slots: 4 KiB)
    rng = np.random.default_rng(3)
    keys = unique(rng.integers(0, TOP, 800_000, dtype=np.uint64, endpoint=True))
    for part in np.array_split(keys, 4):  # (grown in steps: earlier mappings are let go)
        h.push(part, np.ones((part.size, 1), np.float32), hashrows.K.SUM, np.zeros(1, np.float32), np.zeros(1))
    assert h.index.nbytes >= hashrows.HUGE_MIN and h.raw.nbytes >= hashrows.HUGE_MIN
    for a in (h.index, h.raw):
        assert isinstance(_mapping(a), mmap.mmap)
        flags = _vma_flags(a.ctypes.data)
        assert "[heap]" not in flags and "hg" in flags, flags
    h.push(keys[::2], np.ones((keys[::2].size, 1), np.float32), hashrows.K.SUM, np.zeros(1, np.float32),
           np.zeros(1))
    got = h.pull(keys).ravel()
    assert (got[::2] == 2).all() and (got[1::2] == 1).all()

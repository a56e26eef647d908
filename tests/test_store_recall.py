"""A pull of the keys a push just found reads the rows that push left behind
(``hashrows.Recall``) instead of looking every key up again, and is exactly the pull by
lookup: across inserts and growth (rows keep their numbers), and never through rows that
moved since (deletes of a bounded table, a retain, a dense span taking hash rows: the
store's generation changed) or for another key list of the same length and ends.

The sequences are checked against the sorted-array reference of ``test_store_hash``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from psd.cluster.ranges import Range
from psd.store import Table, TableSpec, hashrows, kernels as K
from psd.store.runs import RUN_MIN
from tests.test_store_hash import TOP, Reference, _grads, equal

from psd.keysets import setdiff, unique


class Counted:
    """Counts calls of a kernel (``rows_pull``: pulls served from a push's rows)."""

    def __init__(self, monkeypatch, name: str):
        self.n = 0
        inner = getattr(K, name)

        def call(*a):
            self.n += 1
            return inner(*a)
        monkeypatch.setattr(K, name, call)


def _ref_drop(ref: Reference, keys: np.ndarray) -> None:
    keep = ~np.isin(ref.keys, keys)
    ref.keys, ref.vals = ref.keys[keep], ref.vals[keep]
    ref.state = {f: a[keep] for f, a in ref.state.items()}


def _ref_install(ref: Reference, keys: np.ndarray, vals: np.ndarray, state: dict) -> None:
    _ref_drop(ref, keys)
    at = np.searchsorted(ref.keys, keys)
    ref.keys = np.insert(ref.keys, at, keys)
    ref.vals = np.insert(ref.vals, at, vals, axis=0)
    ref.state = {f: np.insert(a, at, state[f], axis=0) for f, a in ref.state.items()}


UPDATERS = [("sum", {}, "float32"), ("sum", {}, "int64"), ("adagrad", {"lr": 0.1, "l1": 0.01}, "float32"),
            ("ftrl", {"alpha": 0.1, "l1": 0.05}, "float64")]
#: how a step's keys are first met: a push, a cached list's pushes (the second through
#: the rows the first found), or a pull (some keys absent)
FIRST = ["push", "push_at", "pull"]
#: what may happen before the same keys are pulled, pushed and pulled again
BETWEEN = ["nothing", "grow", "install", "drop", "evict", "retain", "span", "other_push"]


def _rows_hold_their_keys(h: hashrows.HashRows) -> None:
    """The layout of decision 132: each row starts with its key (8 bytes, in ``raw``
    itself), which leads the index back to that row; rows past ``n`` are zero, keys
    included; ``row_keys`` and ``data`` are views of the current rows."""
    n = h.n
    assert not h.raw.size or (np.shares_memory(h.row_keys, h.raw) and np.shares_memory(h.data, h.raw))
    assert h.raw.shape[1] * h.raw.itemsize == 8 + h.cols * h.raw.itemsize
    heads = np.ascontiguousarray(h.raw.view(np.uint8)[:n, :8]).view(np.uint64).reshape(-1)
    assert np.array_equal(heads, h.row_keys[:n]) and np.unique(heads).size == n
    rows = np.empty(n, np.int64)
    assert K.hash_find(h.index, h.bits, h.row_keys, heads, rows) == n
    assert np.array_equal(rows, np.arange(n))
    assert not h.raw[n:].any()


@st.composite
def sequences(draw):
    updater, options, dtype = draw(st.sampled_from(UPDATERS))
    bounded = draw(st.booleans())
    width = draw(st.integers(1, 3))
    pool = np.unique(np.concatenate([
        np.array([0, 1, TOP - 1, TOP], np.uint64),
        np.array(draw(st.lists(st.integers(0, TOP), min_size=4, max_size=60)), np.uint64),
        np.arange(1000, 1000 + RUN_MIN, 7, dtype=np.uint64),  # (a span over them takes their rows)
    ]))
    steps = draw(st.lists(st.tuples(st.sampled_from(FIRST), st.sampled_from(BETWEEN)), min_size=1, max_size=8))
    return updater, options, dtype, bounded, width, pool, steps, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences())
def test_pushes_and_pulls_of_the_same_keys_match_the_reference(seq):
    updater, options, dtype, bounded, width, pool, steps, seed = seq
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    opts = {**options, **({"max_rows": 10**6} if bounded else {})}
    table = Table(TableSpec("t", width, dtype.name, updater, opts).validate())
    if bounded:
        table.lead([Range(0, 2**64)])
    ref = Reference(updater, options, width, dtype)

    def push(keys):
        grad = _grads(rng, keys.size, width, dtype, updater)
        table.push(keys, grad)
        ref.push(keys, grad)

    def install(keys):
        vals = _grads(rng, keys.size, width, dtype, "sum")
        state = {f: np.zeros_like(vals) for f in ref.state}
        table.install(keys, vals, state)
        _ref_install(ref, keys, vals, state)

    for first, between in steps:
        keys = np.sort(rng.choice(pool, size=int(rng.integers(1, pool.size + 1)), replace=False))
        if first == "push_at":
            grad = _grads(rng, keys.size, width, dtype, updater)
            at = table.push_at(keys, grad, None)
            table.push_at(keys, grad, at)
            ref.push(keys, grad)
            ref.push(keys, grad)
        elif first == "push":
            push(keys)
        else:
            equal(table.pull(keys), ref.pull(keys))
        if between == "grow":  # thousands of new keys installed: the index and the rows grow
            install(setdiff(rng.integers(0, TOP, 3000, dtype=np.uint64, endpoint=True), ref.keys))
        elif between == "install":  # keys a pull found absent arrive from a range copy
            absent = setdiff(keys, ref.keys)
            if absent.size:
                install(absent)
        elif between == "drop" and bounded and ref.keys.size:  # a replica deletes what its primary evicted: rows move
            gone = np.sort(rng.choice(ref.keys, size=max(1, ref.keys.size // 3), replace=False))
            assert table.drop_keys(gone) == gone.size
            _ref_drop(ref, gone)
        elif between == "evict" and bounded:  # the primary's own evictions under a lower cap
            table.bounded.bounds = dataclasses.replace(table.bounded.bounds, max_rows=max(1, ref.keys.size // 2))
            _ref_drop(ref, table.evict())
        elif between == "retain" and ref.keys.size:  # a ring change takes a range away: rows compacted
            cut = int(rng.choice(ref.keys))
            table.retain([Range(0, cut)])
            _ref_drop(ref, ref.keys[ref.keys >= np.uint64(cut)])
        elif between == "span" and not bounded:  # a dense push takes the hash rows it covers
            grad = _grads(rng, RUN_MIN, width, dtype, updater)
            table.push_span(1000, grad)
            ref.push(np.arange(1000, 1000 + RUN_MIN, dtype=np.uint64), grad)
        elif between == "other_push":  # the last push was of other keys: nothing to reuse
            push(np.setdiff1d(pool, keys)[:5])
        leases: list = []
        got = table.pull(keys.copy(), leases)  # (a copy: the same keys, another array)
        equal(got, ref.pull(keys))
        assert not np.shares_memory(got, table._hash.raw)  # hash rows are copied out, never lent
        push(keys)  # through the rows that pull found, when it found every key
        equal(table.pull(keys), ref.pull(keys))
        _rows_hold_their_keys(table._hash)
        if keys.size > 2:  # the same length and ends, one key swapped: its own lookup
            other = keys.copy()
            other[1] = other[1] + np.uint64(1) if other[1] + np.uint64(1) < other[2] else other[1]
            equal(table.pull(other), ref.pull(other))
    assert table.num_keys == ref.keys.size
    equal(table.pull(ref.keys), ref.vals)


@pytest.mark.parametrize("updater,options,dtype", UPDATERS)
def test_a_push_then_a_pull_of_its_keys_skips_the_lookup(monkeypatch, updater, options, dtype):
    rng = np.random.default_rng(5)
    table = Table(TableSpec("t", 2, dtype, updater, options).validate())
    ref = Reference(updater, options, 2, np.dtype(dtype))
    pulls = Counted(monkeypatch, "rows_pull")
    finds = Counted(monkeypatch, "hash_find")
    stored = np.array([0, TOP], np.uint64)
    for i in range(12):  # 60k keys: the index doubles six times on the way
        keys = np.unique(np.concatenate([rng.integers(0, TOP, 5000, dtype=np.uint64),
                                         rng.choice(stored, min(stored.size, 2000), replace=False)]))
        grad = _grads(rng, keys.size, 2, np.dtype(dtype), updater)
        table.push(keys, grad)
        ref.push(keys, grad)
        stored = ref.keys
        equal(table.pull(keys), ref.pull(keys))
        assert table.count_present(keys) == keys.size
    assert pulls.n == 12 and finds.n == 0  # every pull and count read the push's rows
    equal(table.pull(ref.keys), ref.vals)  # (another list: looked up)
    assert pulls.n == 12
    # a worker's loop the other way round: pull a minibatch's rows, push its gradients
    by_rows, by_keys = Counted(monkeypatch, "rows_push"), Counted(monkeypatch, "hash_push")
    for i in range(3):
        keys = np.sort(rng.choice(ref.keys, 3000, replace=False))
        equal(table.pull(keys), ref.pull(keys))
        grad = _grads(rng, keys.size, 2, np.dtype(dtype), updater)
        table.push(keys, grad)
        ref.push(keys, grad)
    assert by_rows.n == 3 and by_keys.n == 0
    keys = np.sort(np.append(keys[1:], np.setdiff1d(np.arange(10, dtype=np.uint64), ref.keys)[:1]))  # one absent
    equal(table.pull(keys), ref.pull(keys))
    grad = _grads(rng, keys.size, 2, np.dtype(dtype), updater)
    table.push(keys, grad)  # (an insert: looked up)
    ref.push(keys, grad)
    assert by_rows.n == 3 and by_keys.n == 1
    equal(table.pull(ref.keys), ref.vals)


def test_a_cached_push_then_its_pull_read_the_kept_rows(monkeypatch):
    """A server's push naming a kept list goes through its rows (``push_at``); the pull
    of the list after it reads them too."""
    table = Table(TableSpec("t", 1, "float32", "sum").validate())
    keys = np.unique(np.random.default_rng(1).integers(0, TOP, 4000, dtype=np.uint64))
    one = np.ones((keys.size, 1), np.float32)
    at = table.push_at(keys, one, None)
    table.push(keys[:10], one[:10])  # another push in between: the list's rows are forgotten
    pulls = Counted(monkeypatch, "rows_pull")
    np.testing.assert_array_equal(table.pull(keys)[:12, 0], [2] * 10 + [1] * 2)
    assert pulls.n == 0
    at = table.push_at(keys, one, at)
    pulled = table.pull(keys)
    assert pulls.n == 1
    np.testing.assert_array_equal(pulled[:, 0], np.where(np.arange(keys.size) < 10, 3, 2))


def test_kept_rows_are_checked_against_every_key():
    """No copy of the keys is kept (decision 133): a list of the same length and ends as
    the last one, one key inside changed, is checked key by key against the rows' own
    keys; a push of it inserts its new key, a pull reads its own rows, and a key kept as
    absent is looked up again."""
    h = hashrows.HashRows(1, np.float32, 0)
    pt, pf = np.zeros(1, np.float32), np.zeros(1)
    keys = np.arange(0, 3 * 64, 3, dtype=np.uint64)
    h.push(keys, np.ones((keys.size, 1), np.float32), K.SUM, pt, pf)
    other = keys.copy()
    other[5] = 10**12  # (not sorted: the store's kernels do not care, and the ends stay)
    h.push(other, np.full((keys.size, 1), 5, np.float32), K.SUM, pt, pf)
    assert h.n == keys.size + 1 and h.pull(keys[5:6])[0, 0] == 1  # keys[5]'s row untouched
    np.testing.assert_array_equal(h.pull(other)[:, 0], np.where(np.arange(keys.size) == 5, 5, 6))
    rows, found = h.find(keys)
    assert found == keys.size and h.row_keys[rows].tolist() == keys.tolist()
    probe = keys.copy()
    probe[7] = 2**64 - 1  # absent: its row is kept as -1
    assert h.pull(probe)[7, 0] == 0 and h.recall.rows_of(h.generation, probe, h.row_keys) is not None
    again = probe.copy()
    again[7] = 10**12  # the same length and ends, a stored key where the absent one was
    assert h.pull(again)[7, 0] == 5


def test_only_a_pushs_own_keys_are_recalled():
    """A push larger than ``RECALL_MAX`` keeps nothing (its buffer would cost 8 bytes a
    key); an empty push forgets what was kept."""
    h = hashrows.HashRows(1, np.float32, 0)
    pt, pf = np.zeros(1, np.float32), np.zeros(1)
    keys = np.arange(0, 3 * 64, 3, dtype=np.uint64)
    h.push(keys, np.ones((keys.size, 1), np.float32), K.SUM, pt, pf)
    assert h.recall.rows_of(h.generation, keys, h.row_keys) is not None
    assert h.recall.rows_of(h.generation + 1, keys, h.row_keys) is None
    h.push(keys[:0], np.ones((0, 1), np.float32), K.SUM, pt, pf)
    assert h.recall.rows_of(h.generation, keys, h.row_keys) is None
    big = np.arange(hashrows.RECALL_MAX + 1, dtype=np.uint64)
    h.push(big, np.ones((big.size, 1), np.float32), K.SUM, pt, pf)
    assert h.recall.rows_of(h.generation, big, h.row_keys) is None and h.recall.allocated() < 1 << 20  # (in pieces)
    np.testing.assert_array_equal(h.pull(keys)[:, 0], 2)
    want = np.ones(big.size, np.float32)  # (taken in pieces of PIECE keys, growing on the way)
    want[keys.astype(np.int64)] = 2
    np.testing.assert_array_equal(h.pull(big)[:, 0], want)
    assert h.n == big.size


@pytest.mark.parametrize("updater,options,dtype", UPDATERS[:3])
def test_a_push_of_stored_and_new_runs_of_keys_switches_how_it_inserts(updater, options, dtype):
    """``hash_push`` probes a block first, or inserts as it goes after a block of mostly
    new keys; runs of 300 stored then 300 new keys (sorted) make it switch both ways,
    and the table grows (stops and resumes) inside the push."""
    rng = np.random.default_rng(11)
    runs = [np.unique((np.uint64(r) << np.uint64(40)) | rng.integers(0, 1 << 40, 300, dtype=np.uint64))
            for r in range(24)]
    stored = np.concatenate(runs[::2])
    keys = np.concatenate(runs)
    table = Table(TableSpec("t", 2, dtype, updater, options).validate())
    ref = Reference(updater, options, 2, np.dtype(dtype))
    for k in (stored, keys, keys):
        grad = _grads(rng, k.size, 2, np.dtype(dtype), updater)
        table.push(k, grad)
        ref.push(k, grad)
        equal(table.pull(ref.keys), ref.vals)
    assert table._hash.n == keys.size


def test_a_server_answers_the_pull_of_a_list_it_just_pushed_from_the_pushs_rows(monkeypatch):
    """Issue 15's full-path round on the server core: a push sending its keys whole to
    be kept, then a pull naming them by signature (what the client's key caching sends),
    then another list of the same length: only the second pull looks keys up."""
    from psd.codec import Message
    from psd.codec.signature import key_ref
    from psd.config import ClusterConfig
    from psd.core.server import ServerCore

    core = ServerCore(ClusterConfig(security="none"), secure=False)
    core.node_id = "S0"
    core._create(TableSpec("t", 1, "float32", "sum"))
    rng = np.random.default_rng(2)
    keys = np.unique(rng.integers(0, TOP, 5000, dtype=np.uint64))
    pulls, lookups = Counted(monkeypatch, "rows_pull"), Counted(monkeypatch, "hash_pull")

    def ask(rid, op, meta, arrays):
        out = core.handle(None, Message(op, id=rid, sender="W0", table="t", meta={"rid": rid, **meta},
                                        arrays=arrays), 0.0)
        assert len(out) == 1 and type(out[0]).__name__ == "Reply", out
        return out[0].msg

    ask(1, "push", {"kcs": True}, [keys, np.full((keys.size, 1), 2.0, np.float32)])
    answer = ask(2, "pull", {"kc": key_ref(keys)}, [])
    np.testing.assert_array_equal(np.asarray(answer.arrays[-1]).ravel(), 2.0)
    assert pulls.n == 1 and lookups.n == 0
    other = np.unique(rng.integers(0, TOP, keys.size, dtype=np.uint64))
    answer = ask(3, "pull", {}, [other])
    assert not np.asarray(answer.arrays[-1]).any()
    assert pulls.n == 1 and lookups.n == 1


def test_kept_rows_cost_no_more_than_a_sixty_fourth_of_the_table(monkeypatch):
    """Issue 15's memory target (allocated bytes per key <= 2x the raw row) holds with
    the kept rows counted: a table of 1e6 keys (sum, float32, width 1) grown by pushes of
    1e5 keys keeps none of them (8 bytes a key would be 0.8 B per stored key), while a
    list of 2e4 keys is kept (within the table's 1/64)."""
    rng = np.random.default_rng(4)
    table = Table(TableSpec("t", 1, "float32", "sum").validate())
    for _ in range(10):
        keys = unique(rng.integers(0, TOP, 100_000, dtype=np.uint64))
        table.push(keys, np.ones((keys.size, 1), np.float32))
    pulls = Counted(monkeypatch, "rows_pull")
    table.pull(keys)
    assert pulls.n == 0 and table._hash.recall.allocated() <= hashrows.RECALL_FLOOR
    assert table.allocated_bytes / table.num_keys <= 2 * table.row_bytes
    small = keys[:20_000]
    table.push(small, np.ones((small.size, 1), np.float32))
    table.pull(small)
    assert pulls.n == 1
    assert table.allocated_bytes / table.num_keys <= 2 * table.row_bytes

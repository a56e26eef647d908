"""Bounded tables in the store: admission by a count-min sketch, eviction by TTL and by
an LRU row cap, and the hash rows staying correct through deletes.

Each test runs the table against a few lines of plain Python that say what the rule
is (a dict of rows, a last-pushed stamp per key); the table must agree exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from psd.cluster.ranges import Range
from psd.errors import BadRequestError
from psd.schema import TableSpec
from psd.store import hashrows
from psd.store import kernels as K
from psd.store.table import Table

TOP = 2**64 - 1
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def table(updater="sum", width=1, dtype="float32", **options) -> Table:
    return Table(TableSpec("t", width, dtype, updater, options).validate())


def push(t: Table, keys, vals=None) -> np.ndarray:
    """Push like a primary does: admission, the push, evictions; returns evicted keys."""
    keys = np.array(sorted(set(keys)), np.uint64)
    vals = np.ones((keys.size, t.width), t.dtype) if vals is None else vals
    keep = t.admit(keys)
    if keep is not None:
        keys, vals = keys[keep], vals[keep]
    t.push(keys, vals)
    return t.evict()


def stored(t: Table) -> dict[int, float]:
    return dict(zip(t.keys.tolist(), t.vals[:, 0].tolist()))


# -- options --------------------------------------------------------------------------
@pytest.mark.parametrize("options, key", [
    ({"max_rows": 0}, "max_rows"), ({"max_rows": 1.5}, "max_rows"), ({"admit_after": True}, "admit_after"),
    ({"ttl_pushes": -1}, "ttl_pushes"), ({"ttl_seconds": 0}, "ttl_seconds"),
    ({"ttl_seconds": "1h"}, "ttl_seconds"), ({"ttl_pushes": 3, "ttl_seconds": 2.0}, "ttl_seconds"),
    ({"admit_after": 2, "admit_sketch": 1000}, "admit_sketch"), ({"admit_sketch": 1024}, "admit_sketch"),
    ({"admit_after": 2, "admit_sketch": 1 << 30}, "admit_sketch"),
])
def test_bad_options_name_the_option(options, key):
    with pytest.raises(BadRequestError, match=repr(key)) as e:
        TableSpec("t", 1, "float32", "sum", options).validate()
    assert e.value.data["option"] == key


def test_eviction_refused_under_sequential():
    """A sequential push is applied at the clock boundary, on each copy at its own time:
    an eviction between two pushes could not fall at the same point on every copy."""
    with pytest.raises(BadRequestError, match="sequential") as e:
        TableSpec("t", 1, "float32", "sum", {"max_rows": 5, "consistency": "sequential"}).validate()
    assert e.value.data["option"] == "consistency"
    TableSpec("t", 1, "float32", "sum", {"admit_after": 2, "consistency": "sequential"}).validate()


def test_bounds_options_pass_every_updater():
    spec = TableSpec("t", 1, "float32", "adagrad", {"lr": 0.1, "max_rows": 10, "admit_after": 3,
                                                    "ttl_seconds": 2}).validate()
    assert (spec.bounds.max_rows, spec.bounds.admit_after, spec.bounds.ttl_seconds) == (10, 3, 2.0)


# -- admission ---------------------------------------------------------------------------
def test_admission_at_the_kth_push_exactly():
    """A key gets a row at its K-th push, carrying that push's update; earlier pushes are
    counted and dropped. A wide sketch and a few keys: no two keys share counters."""
    t = table(admit_after=3)
    keys = [5, 0, TOP, 1 << 40]
    for i in range(1, 6):
        push(t, keys, np.full((4, 1), i, np.float32))
        want = {} if i < 3 else {k: float(sum(range(3, i + 1))) for k in keys}
        assert stored(t) == want
    assert t.bounded_stats()["refused"] == 2 * len(keys)


@FAST
@given(st.integers(2, 5), st.lists(st.lists(st.integers(0, 60), max_size=20), max_size=30), st.integers(6, 8))
def test_admission_never_later_than_k(k, pushes, bits):
    """With a tiny sketch keys share counters: a count-min sketch then counts high, so
    a key may come in early, never late; and refusals are counted exactly."""
    t = table(admit_after=k, admit_sketch=1 << bits)
    count: dict[int, int] = {}
    refused = 0
    for batch in pushes:
        before = set(stored(t))
        push(t, batch)
        after = set(stored(t))
        for key in set(batch):
            count[key] = count.get(key, 0) + 1
            if key not in before:
                if count[key] >= k:
                    assert key in after, (key, count[key])
                refused += key not in after
    assert t.bounded_stats()["refused"] == refused


# -- eviction -------------------------------------------------------------------------
class Model:
    """The eviction rules in plain Python: last push per key, evict oldest first (ties:
    the order the keys were pushed in, ascending within one push)."""

    def __init__(self, cap=None, ttl=None):
        self.cap, self.ttl = cap, ttl
        self.rows: dict[int, float] = {}
        self.last: dict[int, tuple[int, int]] = {}
        self.pushes = 0

    def push(self, keys) -> list[int]:
        self.pushes += 1
        for i, k in enumerate(sorted(set(keys))):
            self.rows[k] = self.rows.get(k, 0.0) + 1.0
            self.last[k] = (self.pushes, i)
        order = sorted(self.rows, key=lambda k: self.last[k])
        gone = []
        for k in order:
            over = self.cap is not None and len(self.rows) > self.cap
            idle = self.ttl is not None and self.last[k][0] < self.pushes - self.ttl
            if not (over or idle):
                break
            gone.append(k)
            del self.rows[k], self.last[k]
        return sorted(gone)


@FAST
@given(st.lists(st.lists(st.integers(0, 2000), max_size=40), min_size=1, max_size=40),
       st.one_of(st.none(), st.integers(1, 50)), st.one_of(st.none(), st.integers(1, 6)))
def test_eviction_matches_the_model(pushes, cap, ttl):
    if cap is None and ttl is None:
        cap = 10
    options = {**({"max_rows": cap} if cap else {}), **({"ttl_pushes": ttl} if ttl else {})}
    t, model = table(**options), Model(cap, ttl)
    evicted = 0
    for batch in pushes:
        gone = push(t, batch)
        assert gone.tolist() == model.push(batch)
        evicted += gone.size
        assert stored(t) == model.rows
    assert t.bounded_stats()["evicted"] == evicted
    assert t.num_keys == len(model.rows)


def test_ttl_seconds_uses_the_time_given():
    t = table(ttl_seconds=2.0)
    t.bounded.clock.now = 100.0
    push(t, [1, 2, 3])
    t.bounded.clock.now = 101.5
    push(t, [2])
    t.bounded.clock.now = 102.5  # 1 and 3 idle 2.5 s, 2 idle 1 s
    assert t.evict().tolist() == [1, 3]
    assert stored(t) == {2: 2.0}
    assert t.pull(np.array([1, 3], np.uint64)).tolist() == [[0.0], [0.0]]  # as never pushed


def test_only_led_rows_are_evicted_and_drop_keys_follows():
    """Rows outside the led ranges (replicated here) are never evicted by this table;
    the primary names them (drop_keys). A ring change relists by the stamps."""
    t = table(max_rows=2)
    t.lead([Range(0, 100)])
    push(t, [500, 501, 502])  # replicated rows: stamped, not listed
    push(t, [1, 2, 3])
    assert sorted(stored(t)) == [2, 3, 500, 501, 502]
    assert t.drop_keys(np.array([501, 777], np.uint64)) == 1
    t.lead([Range(0, 1000)])  # we lead them now: 500 and 502 are older than 2 and 3
    assert t.evict().tolist() == [500, 502]
    assert t.bounded_stats() == {"refused": 0, "evicted": 3, "evicted_by_primary": 1, "led_rows": 2}


def test_updaters_with_state_survive_row_moves():
    """A delete moves the last row into the hole: its state fields go with it."""
    t = table("adagrad", width=2, max_rows=3, lr=0.5)
    ref = table("adagrad", width=2, lr=0.5)
    rng = np.random.default_rng(1)
    for _ in range(30):
        keys = np.unique(rng.integers(0, 8, 4).astype(np.uint64))
        g = rng.standard_normal((keys.size, 2)).astype(np.float32)
        push(t, keys, g)
        ref.push(keys, g)
        left = t.keys
        ref.retain([Range(int(k), int(k) + 1) for k in left])
        # (a row evicted earlier starts again from zero in both)
        np.testing.assert_array_equal(t.pull(left), ref.pull(left))
        np.testing.assert_array_equal(t.state["g2"], ref.state["g2"])
        assert t.num_keys <= 3


# -- the hash rows through deletes -------------------------------------------------------------
@FAST
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 3000), max_size=60)), max_size=40))
def test_hash_rows_stay_a_correct_map_through_deletes(ops):
    """Inserts and deletes against a dict, on an index that starts at 1024 slots: keys
    that probed past a deleted one are still found (backward shift), growth after
    deletes keeps every row."""
    t = table(max_rows=10**9)
    h = t._hash
    want: dict[int, float] = {}
    for insert, keys in ops:
        keys = np.array(sorted(set(keys)), np.uint64)
        if insert:
            t.push(keys, np.ones((keys.size, 1), np.float32))
            for k in keys.tolist():
                want[k] = want.get(k, 0.0) + 1.0
        else:
            assert t.drop_keys(keys) == sum(k in want for k in keys.tolist())
            for k in keys.tolist():
                want.pop(k, None)
        assert h.n == len(want) and int(h.track.meta[2]) == len(want)
        assert not h.row_keys[h.n:].any() and not h.data[h.n:].any()  # rows past n stay zero
    probe = np.arange(0, 3001, dtype=np.uint64)
    got = t.pull(probe)[:, 0]
    np.testing.assert_array_equal(got, [want.get(k, 0.0) for k in range(3001)])
    # every used slot is reachable from its key's home without crossing an empty slot
    rows, found = h.find(np.array(sorted(want), np.uint64))
    assert found == len(want) and sorted(rows.tolist()) == list(range(len(want)))


def test_colliding_keys_found_after_their_neighbour_goes():
    """Keys whose home slot is the same: delete the first of the probe run, the others
    must still be found (a plain empty slot would cut the run)."""
    t = table(max_rows=10**9)
    bits, mask = t._hash.bits, (1 << t._hash.bits) - 1
    mix = K._mix.py_func
    with np.errstate(over="ignore"):  # (the hash wraps, as uint64 arithmetic does in the kernel)
        same = [k for k in range(200_000) if int(mix(np.uint64(k))) & mask == 7][:6]
    assert len(same) == 6 and bits == hashrows._MIN_BITS
    keys = np.array(same, np.uint64)  # (ascending already: the probe run follows push order)
    t.push(keys, np.arange(1, 7, dtype=np.float32).reshape(-1, 1))
    value = {k: float(i + 1) for i, k in enumerate(same)}
    for gone in (same[0], same[3], same[1]):  # the run's head, its middle, then the new head
        assert t.drop_keys(np.array([gone], np.uint64)) == 1
        del value[gone]
        left = np.array(sorted(value), np.uint64)
        assert t.pull(left)[:, 0].tolist() == [value[k] for k in sorted(value)]
        assert t.pull(np.array([gone], np.uint64)).tolist() == [[0.0]]


def test_growth_after_deletes():
    t = table(max_rows=10**9)
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 2**63, 5000).astype(np.uint64))
    t.push(keys, np.ones((keys.size, 1), np.float32))
    t.drop_keys(keys[::2])
    more = np.unique(rng.integers(2**63, 2**64 - 1, 20_000, dtype=np.uint64))
    t.push(more, np.full((more.size, 1), 2, np.float32))
    assert t._hash.bits > hashrows._MIN_BITS + 2  # the index grew past several doublings
    np.testing.assert_array_equal(t.pull(keys[1::2])[:, 0], 1)
    np.testing.assert_array_equal(t.pull(keys[::2])[:, 0], 0)
    np.testing.assert_array_equal(t.pull(more)[:, 0], 2)
    assert t.num_keys == keys[1::2].size + more.size


def test_retain_and_install_keep_the_list():
    """A range copy out (retain) compacts the rows; a copy in (install) stamps its rows
    as pushed now: both relist, so the LRU order still holds."""
    t = table(max_rows=4)
    for k in (10, 20, 30, 40):
        push(t, [k])
    t.retain([Range(15, 100)])
    t.install(np.array([90, 91], np.uint64), np.ones((2, 1), np.float32), {})
    assert t.evict().tolist() == [20]  # 5 rows, cap 4: the oldest of the kept goes
    assert push(t, [30, 99]).tolist() == [40]  # 90 and 91 count as pushed at the copy


# -- the job file ------------------------------------------------------------------------
def test_job_file_tables_w_checked_naming_file_and_key():
    """logreg's ``tables.w`` takes the bounded options for the ftrl/adagrad solvers; a
    bad one is reported with the file and the key, as every job-file problem is."""
    from psd.apps import logreg
    base = {"app": "logreg", "data": {"generator": "sparse_logreg", "examples": 200, "features": 50, "nnz": 5}}
    ok = {**base, "train": {"solver": "ftrl"}, "tables": {"w": {"max_rows": 1000, "admit_after": 2}}}
    assert logreg.validate(ok, "job.yaml") == []
    assert logreg.options(ok)["tables"]["w"] == {"max_rows": 1000, "admit_after": 2}
    cases = [({"max_rows": 0}, "job.yaml: tables.w.max_rows: "),
             ({"ttl_pushes": 2, "ttl_seconds": 1}, "job.yaml: tables.w.ttl_seconds: "),
             ({"max_row": 5}, "job.yaml: tables.w.max_row: unknown key")]
    for w, start in cases:
        problems = logreg.validate({**base, "train": {"solver": "adagrad"}, "tables": {"w": w}}, "job.yaml")
        assert len(problems) == 1 and problems[0].startswith(start), problems
    problems = logreg.validate({**base, "tables": {"w": {"max_rows": 10}}}, "job.yaml")  # prox: every weight
    assert problems and problems[0].startswith("job.yaml: tables.w: bounded-memory options apply to solver")


def test_probe_runs_across_cache_lines():
    """Keys whose probes all start in the last slots of one cache line of the index: the
    runs they make cross into the next lines, where a block's probes resume after their
    line was fetched (``kernels._fetch_block``). Inserts, updates, installs and deletes
    in one batch each, with keys 0 and 2**64-1 among them, must agree with a dict."""
    t = table(max_rows=10**9)
    mask = (1 << t._hash.bits) - 1
    mix = K._mix.py_func
    with np.errstate(over="ignore"):
        near_end = [k for k in range(300_000) if int(mix(np.uint64(k))) & mask & (K.LINE - 1) >= K.LINE - 3
                    and int(mix(np.uint64(k))) & mask < K.LINE][:40]
    assert len(near_end) == 40
    keys = np.array(sorted({0, TOP, *near_end}), np.uint64)
    want = {k: 0.0 for k in keys.tolist()}
    for step in range(1, 4):  # inserts, then updates of rows found past the line's end
        t.push(keys, np.full((keys.size, 1), step, np.float32))
        for k in want:
            want[k] += step
        assert t.pull(keys)[:, 0].tolist() == [want[k] for k in keys.tolist()]
    assert t._hash.bits == hashrows._MIN_BITS and t.num_keys == keys.size
    gone = keys[1:-1:3]  # every third of the run (not 0 or TOP): backward shifts across lines
    assert t.drop_keys(gone) == gone.size
    for k in gone.tolist():
        del want[k]
    t.install(gone[:5], np.full((5, 1), 9, np.float32), {})  # back in through the upsert path
    want.update({k: 9.0 for k in gone[:5].tolist()})
    t.push(keys, np.ones((keys.size, 1), np.float32))
    want = {k: want.get(k, 0.0) + 1.0 for k in keys.tolist()}
    assert t.pull(keys)[:, 0].tolist() == [want[k] for k in keys.tolist()]
    assert stored(t) == want

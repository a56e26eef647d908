"""Storage positions kept with a cached key list (issue 17, decision 117): a push naming a
list the server keeps folds its values into the rows found last time, unless a move of
rows (an eviction, a compaction into a dense run, a retain, a drop) changed the store's
generation since; then it looks the keys up again. Each test pushes the same sequence
into a table through kept positions and into one without, and wants the same table."""
from __future__ import annotations

import numpy as np
import pytest

from psd.cluster.ranges import Range
from psd.codec import Message
from psd.codec.signature import key_ref
from psd.config import ClusterConfig
from psd.core.server import ServerCore
from psd.schema import TableSpec
from psd.store.table import Table

KEYS = np.unique(np.random.default_rng(3).integers(0, 1 << 40, size=3000, dtype=np.uint64))


def _tables(updater: str = "sum", **options):
    spec = TableSpec("t", 2, "float32", updater, options).validate()
    return Table(spec), Table(spec)


def _grad(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2)).astype(np.float32)


def _same(a: Table, b: Table) -> None:
    ka, va, sa = a.snapshot(0, 2**64)
    kb, vb, sb = b.snapshot(0, 2**64)
    np.testing.assert_array_equal(ka, kb)
    np.testing.assert_array_equal(va, vb)
    for f in sa:
        np.testing.assert_array_equal(sa[f], sb[f])


class Spy:
    """Counts pushes that went through kept rows (no key looked up)."""

    def __init__(self, table: Table):
        self.n = 0
        inner = table._hash.push_rows

        def push_rows(*a, **kw):
            self.n += 1
            return inner(*a, **kw)
        table._hash.push_rows = push_rows


@pytest.mark.parametrize("updater,options", [("sum", {}), ("adagrad", {"lr": 0.1, "l1": 0.01})])
def test_kept_rows_are_used_until_rows_move(updater, options):
    cached, plain = _tables(updater, **options)
    spy = Spy(cached)
    at = None
    for step in range(3):
        g = _grad(step, KEYS.size)
        at = cached.push_at(KEYS, g, at)
        plain.push(KEYS, g)
    assert spy.n == 2 and at is not None  # the first push found the rows; the next two used them
    others = np.setdiff1d(np.arange(100, 200, dtype=np.uint64) << np.uint64(30), KEYS)
    for t in (cached, plain):  # inserts append rows: nothing moves
        t.push(others, _grad(9, others.size))
    at = cached.push_at(KEYS, _grad(10, KEYS.size), at)
    plain.push(KEYS, _grad(10, KEYS.size))
    assert spy.n == 3
    _same(cached, plain)


def test_a_retain_moves_rows_and_the_kept_ones_are_not_used():
    cached, plain = _tables()
    spy = Spy(cached)
    at = cached.push_at(KEYS, _grad(0, KEYS.size), None)
    plain.push(KEYS, _grad(0, KEYS.size))
    keep = [Range(0, int(KEYS[KEYS.size // 2]))]  # a ring change took the upper half away
    cached.retain(keep)
    plain.retain(keep)
    at = cached.push_at(KEYS, _grad(1, KEYS.size), at)  # the dropped keys come back, others moved
    plain.push(KEYS, _grad(1, KEYS.size))
    assert spy.n == 0
    _same(cached, plain)
    cached.push_at(KEYS, _grad(2, KEYS.size), at)  # found again after the fallback
    plain.push(KEYS, _grad(2, KEYS.size))
    assert spy.n == 1
    _same(cached, plain)


def test_a_dense_span_that_takes_hash_rows_moves_them():
    keys = np.arange(5000, 5000 + 3000, 3, dtype=np.uint64)
    cached, plain = _tables()
    at = cached.push_at(keys, _grad(0, keys.size), None)
    plain.push(keys, _grad(0, keys.size))
    for t in (cached, plain):  # a dense push over them: their rows move into a run
        t.push_span(5000, _grad(1, 3000))
    assert cached.locate(keys) is None  # (in a run now: no hash rows to keep)
    cached.push_at(keys, _grad(2, keys.size), at)
    plain.push(keys, _grad(2, keys.size))
    _same(cached, plain)


def test_evictions_between_two_cached_pushes_never_use_a_stale_row():
    """A bounded table evicts rows (the last row moves into each hole): the next cached
    push must look its keys up again, or it would add to other keys' rows."""
    cached, plain = _tables("sum", max_rows=KEYS.size)
    spy = Spy(cached)
    for t in (cached, plain):
        t.lead([Range(0, 2**64)])
    at = cached.push_at(KEYS, _grad(0, KEYS.size), None)
    plain.push(KEYS, _grad(0, KEYS.size))
    at = cached.push_at(KEYS, _grad(1, KEYS.size), at)
    plain.push(KEYS, _grad(1, KEYS.size))
    assert spy.n == 1
    newer = np.arange(1, 301, dtype=np.uint64) << np.uint64(41)  # above every key of the list
    for t in (cached, plain):
        t.push(newer, _grad(2, newer.size))
        gone = t.evict()  # over max_rows: the 300 least recently pushed rows go
    assert gone.size == 300
    at = cached.push_at(KEYS, _grad(3, KEYS.size), at)
    plain.push(KEYS, _grad(3, KEYS.size))
    assert spy.n == 1  # not through the old rows
    _same(cached, plain)


# -- the server core: the key cache keeps the rows ------------------------------------------------
def _push(core: ServerCore, rid: int, values: np.ndarray, by_signature: bool):
    meta = {"rid": rid, **({"kc": key_ref(KEYS)} if by_signature else {"kcs": True})}
    arrays = [values] if by_signature else [KEYS, values]
    out = core.handle(None, Message("push", id=rid, sender="W0", table="t", meta=meta, arrays=arrays), 0.0)
    assert all(type(e).__name__ == "Reply" for e in out), out


@pytest.mark.parametrize("keep", [True, False])
def test_a_server_pushes_a_cached_list_through_its_rows(keep):
    core = ServerCore(ClusterConfig(security="none"), secure=False)
    core.node_id = "S0"
    core.keep_positions = keep
    core._create(TableSpec("t", 2, "float32", "sum"))
    spy = Spy(core.tables["t"])
    _push(core, 1, _grad(0, KEYS.size), by_signature=False)
    for rid in range(2, 5):
        _push(core, rid, _grad(rid, KEYS.size), by_signature=True)
    assert spy.n == (2 if keep else 0)
    held = core.keycache.lookup("W0", "t", key_ref(KEYS))
    assert (held.at is not None) == keep
    assert core.keycache.bytes == KEYS.nbytes + (held.at[1].nbytes if keep else 0)
    want = sum(_grad(r, KEYS.size).astype(np.float64) for r in (0, 2, 3, 4))
    np.testing.assert_allclose(core.tables["t"].pull(KEYS), want, rtol=1e-5, atol=1e-5)

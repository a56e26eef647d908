"""Pushes of NaN or infinities are refused unless the table allows them (real daemons).

A NaN pushed into a sum or adagrad table poisons every later read of its key, so by
default a server refuses the push with a ``ValuesError`` naming the table, the first bad
row and its key, before anything of it is applied; a table created with the option
``allow_nonfinite: true`` takes them. Integer tables have nothing to check.
"""
from __future__ import annotations

import numpy as np
import pytest

import psd
from psd.store import Table, TableSpec


@pytest.fixture(scope="module")
def kv():
    with psd.LocalCluster(servers=1) as cluster, psd.connect(cluster.scheduler) as kv:
        yield kv


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_push_with_a_nonfinite_value_is_refused_whole(kv, bad, dtype):
    name = f"nf_{dtype}_{bad}".replace("-", "m")
    t = kv.table(name, width=2, dtype=dtype, updater="adagrad")
    keys = np.array([3, 10, 2**40, 2**64 - 1], np.uint64)
    kv.wait(t.push(keys, np.ones((4, 2), dtype)))
    before = t.pull(keys)
    vals = np.full((4, 2), 0.5, dtype)
    vals[2, 1] = bad
    with pytest.raises(psd.ValuesError) as err:
        kv.wait(t.push(keys, vals))
    msg = str(err.value)
    assert repr(name) in msg and "row 2 " in msg and f"key {2**40}" in msg and "allow_nonfinite" in msg
    np.testing.assert_array_equal(t.pull(keys), before)  # nothing of it applied
    span = np.ones((1000, 2), dtype)
    span[999, 0] = bad
    with pytest.raises(psd.ValuesError, match=f"row 999 \\(key {5000 + 999}\\)"):
        kv.wait(t.push_span(5000, span))
    assert not t.pull_span(5000, 1000).any()
    kv.wait(t.push(keys, np.full((4, 2), 0.5, dtype)))  # the table still takes finite pushes
    assert np.isfinite(t.pull(keys)).all()


def test_a_table_may_allow_nonfinite_values(kv):
    t = kv.table("nf_allowed", width=1, dtype="float32", updater="sum", allow_nonfinite=True)
    keys = np.array([1, 2, 3], np.uint64)
    kv.wait(t.push(keys, np.array([[1.0], [np.nan], [np.inf]], np.float32)))
    got = t.pull(keys)[:, 0]
    assert got[0] == 1.0 and np.isnan(got[1]) and got[2] == np.inf
    i = kv.table("nf_int", width=1, dtype="int64", updater="sum")  # nothing to check
    kv.wait(i.push(keys, np.array([[1], [2], [3]], np.int64)))
    with pytest.raises(psd.BadRequestError, match="allow_nonfinite"):
        kv.table("nf_bad_option", width=1, dtype="float32", allow_nonfinite="yes")


def test_the_check_finds_the_first_bad_row_at_any_place():
    t = Table(TableSpec("t", 3, "float32", "sum").validate())
    for n in (1, 4095, 4096, 4097, 20000):
        for at in sorted({0, n // 2, n - 1}):
            v = np.zeros((n, 3), np.float32)
            v[at, 2] = np.nan
            if at + 1 < n:
                v[n - 1, 0] = np.inf
            with pytest.raises(psd.ValuesError, match=f"row {at} "):
                t.refuse_nonfinite(v, spans=[(100, n)])
    t.refuse_nonfinite(np.full((5, 3), np.finfo(np.float32).max, np.float32))  # large but finite

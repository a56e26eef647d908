"""Push and pull against real daemons: worker processes pushing concurrently to a
3-server LocalCluster, compared exactly to a numpy reference; spans, updaters, the
asyncio API and table-spec errors."""
from __future__ import annotations

import asyncio
import json
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import psd
from psd.codec import Message

from conftest import owner_changes, server_ranges
from pushworker import SPAN_LEN, TABLES, key_pool, make_pushes, span_starts

WORKER = Path(__file__).with_name("pushworker.py")
TOP = 2**64 - 1
DTYPES = ["int32", "int64", "float32", "float64"]


def u64(*keys) -> np.ndarray:
    return np.array(keys, dtype=np.uint64)


def _readline(proc: subprocess.Popen, deadline: float) -> str:
    remaining = deadline - time.monotonic()
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, remaining))
    if not ready:
        raise AssertionError(f"worker {proc.pid} printed nothing in time")
    return proc.stdout.readline().decode().strip()


def run_workers(scheduler: str, seeds: list[int], boundaries: list[int], timeout: float = 60.0) -> None:
    """Start one worker process per seed, release them together, and wait for all."""
    deadline = time.monotonic() + timeout
    procs = [subprocess.Popen([sys.executable, str(WORKER), scheduler, str(seed), json.dumps(boundaries)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for seed in seeds]
    try:
        for p in procs:
            line = _readline(p, deadline)
            assert line == "ready", f"worker {p.pid} said {line!r}: {p.stderr.read().decode()[-2000:]}"
        for p in procs:  # every worker pushes at the same moment
            p.stdin.write(b"go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, f"worker exited {p.returncode}: {err.decode()[-3000:]}"
            assert out.decode().split() == ["done"], out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def reference(seeds: list[int], boundaries: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per table: every key any worker touched and the exact sum pushed to it."""
    pushes = [p for seed in seeds for p in make_pushes(seed, boundaries)]
    out = {}
    for name, dtype, width in TABLES:
        mine = [p for p in pushes if p[0] == name]
        key_lists = [w if kind == "keys" else np.arange(w, w + len(v), dtype=np.uint64)
                     for _, kind, w, v in mine]
        keys = np.unique(np.concatenate(key_lists))
        ref = np.zeros((keys.size, width), dtype=dtype)
        for k, (_, _, _, v) in zip(key_lists, mine):
            ref[np.searchsorted(keys, k)] += v.reshape(len(k), width)
        out[name] = (keys, ref)
    return out


# -- many worker processes at once ---------------------------------------------------
def test_concurrent_worker_processes_sum_exactly(cluster3, kv3, raw_dealer):
    ranges = server_ranges(cluster3)
    assert {r.node for r in ranges} == {"S0", "S1", "S2"}
    boundaries = [r.begin for r in ranges[1:]]
    tables = {name: kv3.table(name, width=width, dtype=dtype, updater="sum")
              for name, dtype, width in TABLES}
    seeds = [11, 22, 33, 44]
    run_workers(cluster3.scheduler, seeds, boundaries)
    ref = reference(seeds, boundaries)

    for name, dtype, width in TABLES:
        keys, expect = ref[name]
        # the test data really does span every range, both ends and shared keys
        assert all(np.any((keys >= r.begin) & (keys <= r.last)) for r in ranges)
        assert keys[0] == 0 and keys[-1] == TOP
        got = tables[name].pull(keys)
        assert got.dtype == np.dtype(dtype) and got.shape == (keys.size, width)
        np.testing.assert_array_equal(got, expect, err_msg=name)
        assert np.any(expect != 0)

        # dense reads across every boundary see the same sums and zeros around them
        for lo in span_starts(boundaries):
            lo2 = lo - 3
            n = min(SPAN_LEN + 6, TOP + 1 - lo2)
            window = np.arange(lo2, lo2 + n, dtype=np.uint64)
            want = np.zeros((n, width), dtype=dtype)
            at = np.searchsorted(keys, window)
            hit = (at < keys.size) & (keys[np.minimum(at, keys.size - 1)] == window)
            want[hit] = expect[at[hit]]
            np.testing.assert_array_equal(tables[name].pull_span(lo2, n), want)

        # each range's primary holds exactly that range's sums
        for r in ranges:
            inside = (keys >= r.begin) & (keys <= r.last)
            reply = raw_dealer(r.address).request(
                Message("pull", table=name, arrays=[keys[inside]]))
            assert reply.op == "ok", reply.meta
            np.testing.assert_array_equal(reply.arrays[0], expect[inside])

        # keys nobody pushed read zero
        pool = key_pool(boundaries)
        fresh = np.setdiff1d(u64(500, 501, 2**40, 2**62 + 7, TOP - 100), np.union1d(keys, pool))
        assert fresh.size >= 3
        np.testing.assert_array_equal(tables[name].pull(fresh), np.zeros((fresh.size, width), dtype))


# -- shapes, ends of the key space, spans -----------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 3])
def test_empty_key_lists(kv3, dtype, width):
    t = kv3.table(f"empty_{dtype}_{width}", width=width, dtype=dtype)
    ts = t.push([], np.empty((0, width), dtype=dtype))
    assert isinstance(ts, int)
    kv3.wait(ts)
    for got in (t.pull([]), t.pull(np.empty(0, dtype=np.uint64)), t.pull_span(123, 0),
                t.pushpull([], np.empty((0, width), dtype=dtype))):
        assert got.shape == (0, width) and got.dtype == np.dtype(dtype)
    kv3.wait(t.push_span(TOP, np.empty((0, width), dtype=dtype)))
    with pytest.raises(psd.ValuesError):
        t.push([], np.zeros((1, width), dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_keys_and_widths(kv3, dtype):
    t1 = kv3.table(f"ends1_{dtype}", width=1, dtype=dtype)
    t3 = kv3.table(f"ends3_{dtype}", width=3, dtype=dtype)
    keys = [0, 2**63, TOP]  # a Python list, including a key above int64
    v1 = np.array([7, -3, 5], dtype=dtype)
    v3 = np.arange(9, dtype=dtype).reshape(3, 3) - 4
    kv3.wait(t1.push(keys, v1))
    kv3.wait(t3.push(keys, v3))
    kv3.wait(t3.push(u64(0, TOP), v3[[0, 2]]))
    np.testing.assert_array_equal(t1.pull(keys), v1.reshape(3, 1))
    np.testing.assert_array_equal(t3.pull(keys), v3 + v3 * np.array([[1], [0], [1]], dtype=dtype))
    np.testing.assert_array_equal(t3.pull(u64(1, TOP - 1)), np.zeros((2, 3), dtype))


def test_spans_across_range_boundaries(cluster3, kv3):
    begins = [0, *owner_changes(server_ranges(cluster3))]
    t = kv3.table("spans", width=3, dtype="int64")
    model: dict[int, np.ndarray] = {}
    rng = np.random.default_rng(5)

    def push_span(lo, n):
        v = rng.integers(-9, 10, size=(n, 3)).astype(np.int64)
        kv3.wait(t.push_span(lo, v))
        for i in range(n):
            model[lo + i] = model.get(lo + i, np.zeros(3, np.int64)) + v[i]

    def expect(lo, n):
        return np.array([model.get(lo + i, np.zeros(3, np.int64)) for i in range(n)]).reshape(n, 3)

    for lo, n in [(2**63 - 5, 10), (begins[1] - 4, 8), (begins[2] - 1, 2), (TOP - 3, 4),
                  (2**63 - 2, 6), (0, 5)]:  # the second 2**63 span overlaps the first
        push_span(lo, n)
    for lo, n in [(2**63 - 8, 20), (begins[1] - 6, 12), (begins[2] - 3, 6), (TOP - 9, 10), (0, 7)]:
        np.testing.assert_array_equal(t.pull_span(lo, n), expect(lo, n), err_msg=f"span {lo}+{n}")
        keys = np.arange(lo, lo + n, dtype=np.uint64)
        np.testing.assert_array_equal(t.pull(keys), expect(lo, n))
    with pytest.raises(psd.KeysError, match="outside the key space"):
        t.push_span(TOP, np.zeros((2, 3), np.int64))
    with pytest.raises(psd.KeysError):
        t.pull_span(TOP - 1, 3)


def test_pushpull_returns_the_updated_values(cluster3, kv3):
    begins = [0, *owner_changes(server_ranges(cluster3))]
    t = kv3.table("pp", width=2, dtype="float64")
    keys = u64(0, 5, begins[1] - 1, begins[1], begins[2], TOP)
    v = np.arange(12, dtype=np.float64).reshape(6, 2) + 1
    np.testing.assert_array_equal(t.pushpull(keys, v), v)
    np.testing.assert_array_equal(t.pushpull(keys, v), 2 * v)
    np.testing.assert_array_equal(t.pull(keys), 2 * v)
    # pushpull on a subset touches only that subset
    np.testing.assert_array_equal(t.pushpull(keys[1:3], -v[1:3]), v[1:3])
    want = 2 * v
    want[1:3] -= v[1:3]
    np.testing.assert_array_equal(t.pull(keys), want)


# -- updaters --------------------------------------------------------------------------
def test_a_pushpull_without_the_pull_refusable_flag_is_pushed_and_answered(cluster3, kv3, raw_dealer):
    """An older client's pushpull (no ``meta.pull_refusable``), raw through a real socket:
    a gate that does not hold it (eventual) pushes and answers it at once, as before
    decision 143; held, the server holds it whole (tests/test_held_across_rings.py)."""
    t = kv3.table("older", width=1, dtype="int64", updater="sum")
    first = server_ranges(cluster3)[0]
    keys = u64(first.begin, first.begin + 1)
    msg = Message("pushpull", table="older", meta={"rid": 1}, arrays=[keys, np.full((2, 1), 3, np.int64)])
    reply = raw_dealer(first.address).request(msg)
    assert reply.op == "ok" and reply.arrays[0][:, 0].tolist() == [3, 3], reply.meta
    assert t.pull(keys)[:, 0].tolist() == [3, 3]


def test_pulls_in_flight_see_exactly_the_pushes_before_them(kv3):
    """Servers answer a pull of consecutive keys with a view of the table, sent
    zero-copy; the push right behind it must not change the reply while ZeroMQ is still
    sending it (the table copies on write). Each pull must see exactly the pushes
    issued before it, whole."""
    t = kv3.table("cow_in_flight", width=1, dtype="int64")
    n = 1_000_000
    keys = np.arange(n, dtype=np.uint64) * 3  # spread over every server of cluster3
    ones = np.ones((n, 1), dtype=np.int64)
    pulls = []
    for _ in range(6):
        t.push(keys, ones)
        pulls.append(t.pull_async(keys))
    for i, ts in enumerate(pulls):
        got = kv3.wait(ts)
        assert (got == i + 1).all(), f"pull {i} saw {np.unique(got)[:5]}, wanted only {i + 1}"


def test_assign_keeps_the_last_value_in_push_order(cluster3, kv3):
    begins = [0, *owner_changes(server_ranges(cluster3))]
    t = kv3.table("assign", width=2, dtype="int32", updater="assign")
    k1 = u64(1, 2, begins[1], begins[2] + 3, TOP)
    k2 = u64(2, begins[1], TOP)
    a = np.full((5, 2), 7, np.int32)
    b = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
    ts1 = t.push(k1, a)
    ts2 = t.push(k2, b)  # sent before the first is acknowledged: applied after it
    got = t.pull(k1)  # issued after both on the same connections: sees both
    kv3.wait(ts1)
    kv3.wait(ts2)
    want = np.array([[7, 7], [1, 2], [3, 4], [7, 7], [5, 6]], np.int32)
    np.testing.assert_array_equal(got, want)
    kv3.wait(t.push(k2, b * 10))
    want[[1, 2, 4]] = b * 10  # assign, not sum
    np.testing.assert_array_equal(t.pull(k1), want)


@pytest.mark.parametrize("dtype,lr", [("float64", 0.5), ("float32", 0.25)])
def test_sgd_steps_against_the_gradient(cluster3, kv3, dtype, lr):
    begins = [0, *owner_changes(server_ranges(cluster3))]
    t = kv3.table(f"sgd_{dtype}", width=2, dtype=dtype, updater="sgd", lr=lr)
    keys = u64(3, begins[1] + 1, TOP)
    g1 = np.array([[2, -4], [8, 6], [1, 1]], dtype=dtype)
    g2 = np.array([[4, 4], [-8, 2], [3, -1]], dtype=dtype)
    kv3.wait(t.push(keys, g1))
    np.testing.assert_array_equal(t.pull(keys), -lr * g1)
    kv3.wait(t.push(keys[:2], g2[:2]))
    np.testing.assert_array_equal(t.pull(keys), -lr * (g1 + np.vstack([g2[:2], np.zeros((1, 2))])).astype(dtype))


def test_sgd_needs_a_float_table(kv3):
    with pytest.raises(psd.BadRequestError, match="float"):
        kv3.table("sgd_int", width=1, dtype="int64", updater="sgd")
    with pytest.raises(psd.BadRequestError, match="lr"):
        kv3.table("sgd_neg", width=1, dtype="float32", updater="sgd", lr=-1.0)


# -- table specs -------------------------------------------------------------------------
def test_reopening_with_other_settings_raises_table_mismatch(cluster3, kv3):
    t = kv3.table("spec", width=2, dtype="float32", updater="sum")
    kv3.wait(t.push([4], np.ones((1, 2), np.float32)))
    for kwargs in (dict(width=3, dtype="float32", updater="sum"),
                   dict(width=2, dtype="float64", updater="sum"),
                   dict(width=2, dtype="float32", updater="assign")):
        with pytest.raises(psd.TableMismatchError, match="'spec'") as e:
            kv3.table("spec", **kwargs)
        assert "width=2" in str(e.value) and "float32" in str(e.value)
    kv3.table("sgd_opts", width=1, dtype="float32", updater="sgd", lr=0.1)
    with pytest.raises(psd.TableMismatchError):
        kv3.table("sgd_opts", width=1, dtype="float32", updater="sgd", lr=0.2)
    # the same settings open the same table, from another worker too
    with psd.connect(cluster3) as other:
        again = other.table("spec", width=2, dtype="float32", updater="sum")
        np.testing.assert_array_equal(again.pull([4]), np.ones((1, 2), np.float32))


def test_unknown_updater(kv3):
    with pytest.raises(psd.UnknownUpdaterError, match="'nope'") as e:
        kv3.table("uu", width=1, dtype="float32", updater="nope")
    assert "sum" in str(e.value) and "assign" in str(e.value)  # names what exists
    assert isinstance(e.value, psd.PsdError)


# -- asyncio ---------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_asyncio_api(cluster3):
    begins = [0, *owner_changes(server_ranges(cluster3))]
    kv = await psd.aio.connect(cluster3)
    try:
        t = await kv.table("aio", width=2, dtype="int64", updater="sum")
        keys = u64(0, 9, begins[1], begins[2] - 1, begins[2], TOP)

        async def one_task(i: int) -> None:
            v = np.full((keys.size, 2), i, np.int64)
            ts = t.push(keys, v)
            assert isinstance(ts, int)
            await kv.wait(ts)

        await asyncio.wait_for(asyncio.gather(*(one_task(i) for i in range(1, 11))), 30)
        want = np.full((keys.size, 2), sum(range(1, 11)), np.int64)
        got, got_span, got_empty = await asyncio.gather(
            t.pull(keys), t.pull_span(begins[1] - 1, 2), t.pull([]))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_span, np.vstack([np.zeros((1, 2), np.int64), want[2:3]]))
        assert got_empty.shape == (0, 2)
        np.testing.assert_array_equal(await t.pushpull(keys[:2], np.ones((2, 2), np.int64)), want[:2] + 1)
        await kv.wait(t.push_span(begins[2] - 1, np.ones((2, 2), np.int64)))
        np.testing.assert_array_equal(await t.pull(keys[3:5]), want[3:5] + 1)
        with pytest.raises(psd.KeysError):
            t.push(keys[::-1], np.ones((keys.size, 2), np.int64))
        with pytest.raises(psd.TableMismatchError):
            await kv.table("aio", width=1, dtype="int64")
    finally:
        await kv.close()

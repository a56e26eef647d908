"""A server stalled past the failure timeout at replication 1 (real processes, SIGSTOP).

With no replica to promote, its ranges have no other copy. It is declared dead (its
peers and the scheduler agree it is silent), but its ranges stay listed under it,
``unavailable``, and are not handed to a live server empty: that would answer zeros for
acknowledged writes and lose them for good when the stalled server came back. Clients
asking for those keys get a retryable ``unavailable`` error naming the server; the
rest of the keys are served as usual. Woken up, the server registers again and takes
its ranges back with their data."""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest

import psd

TIMEOUT = 2.0  # the client's request_timeout


def _wait(cluster: psd.LocalCluster, what: str, ok, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = cluster.status()
        if ok(st):
            return st
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}; status: {st['health']}"
        time.sleep(0.1)


def _state(st: dict, node: str) -> str:
    return next(n["state"] for n in st["nodes"] if n["id"] == node)


def _owned_by(ring, keys: np.ndarray, server: str) -> np.ndarray:
    mine = np.zeros(keys.size, dtype=bool)
    for r, owners in zip(ring.ranges, ring.owners):
        if owners[0] == server:
            mine |= (keys >= np.uint64(r.begin)) & (keys <= np.uint64(r.end - 1))
    return mine


def test_a_stalled_server_at_replication_1_keeps_its_ranges_until_it_is_back():
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(0, 2**64 - 1, size=3000, dtype=np.uint64))
    with psd.LocalCluster(servers=3, replication=1) as cluster, \
            psd.connect(cluster, psd.ClusterConfig(request_timeout=TIMEOUT)) as kv:
        t = kv.table("w", width=1, dtype="int64")
        kv.wait(t.push(keys, np.full((keys.size, 1), 7, np.int64)))
        frozen = cluster.node_id(1)
        mine = _owned_by(kv.aio.ring, keys, frozen)
        assert 0 < mine.sum() < keys.size
        held, others = keys[mine], keys[~mine]

        cluster.kill_server(1, signal.SIGSTOP)
        try:
            st = _wait(cluster, f"{frozen} declared dead, its ranges unavailable",
                       lambda st: _state(st, frozen) == "dead" and st["unavailable"])
            assert all(r["waiting_for"] == [frozen] for r in st["unavailable"])
            assert {o for r in st["ranges"] for o in r["owners"]} >= {frozen}  # still listed under it
            assert st["health"]["state"] == "down"
            assert any("unavailable" in r and frozen in r for r in st["health"]["reasons"]), st["health"]

            started = time.monotonic()
            with pytest.raises(psd.UnavailableError) as err:
                t.pull(held[:10])
            assert time.monotonic() - started >= TIMEOUT * 0.9  # retried until the deadline
            assert frozen in str(err.value) and "declared dead" in str(err.value), str(err.value)
            assert err.value.data.get("server") == frozen
            # the other servers serve as usual
            np.testing.assert_array_equal(t.pull(others).ravel(), np.full(others.size, 7))
        finally:
            cluster.kill_server(1, signal.SIGCONT)

        st = _wait(cluster, f"{frozen}'s process back under a new id, the cluster OK",
                   lambda st: st["health"]["state"] == "ok" and not st["unavailable"])
        assert frozen not in {o for r in st["ranges"] for o in r["owners"]}
        # the only copy came back with it: nothing acknowledged was lost
        np.testing.assert_array_equal(t.pull(held).ravel(), np.full(held.size, 7))
        kv.wait(t.push(held, np.ones((held.size, 1), np.int64)))
        np.testing.assert_array_equal(t.pull(keys).ravel(), np.where(mine, 8, 7))


def test_a_range_waited_for_past_the_bound_is_restored_from_the_newest_checkpoint(tmp_path):
    """``restore_unavailable_after``: the stalled server's ranges wait that long, then the
    scheduler gives the server up and restores them onto live servers from the newest
    checkpoint: the keys read their checkpointed values (never zeros, and pushes made
    after the checkpoint to them are lost, as documented), the rest is untouched, and
    the woken server comes back as a new member without serving its stale copy."""
    rng = np.random.default_rng(5)
    keys = np.unique(rng.integers(0, 2**64 - 1, size=3000, dtype=np.uint64))
    with psd.LocalCluster(servers=3, replication=1, checkpoint_dir=str(tmp_path / "ckpt"),
                          restore_unavailable_after=2.0) as cluster, \
            psd.connect(cluster, psd.ClusterConfig(request_timeout=TIMEOUT)) as kv:
        t = kv.table("w", width=1, dtype="int64")
        kv.wait(t.push(keys, np.full((keys.size, 1), 7, np.int64)))
        kv.clock()
        psd.client.admin.call(cluster.scheduler, "checkpoint", timeout=30, wait=10)
        kv.wait(t.push(keys, np.full((keys.size, 1), 100, np.int64)))  # after the checkpoint
        frozen = cluster.node_id(1)
        mine = _owned_by(kv.aio.ring, keys, frozen)
        held, others = keys[mine], keys[~mine]
        assert held.size and others.size

        cluster.kill_server(1, signal.SIGSTOP)
        try:
            st = _wait(cluster, f"{frozen}'s ranges restored from the checkpoint",
                       lambda st: st["restored"] and not st["unavailable"])
            assert st["restored"][0]["servers"] == [frozen] and st["restored"][0]["keys"] == held.size
            assert frozen not in {o for r in st["ranges"] for o in r["owners"]}
            got = t.pull(held).ravel()  # the checkpoint's values, not zeros, not the later pushes
            np.testing.assert_array_equal(got, np.full(held.size, 7))
            np.testing.assert_array_equal(t.pull(others).ravel(), np.full(others.size, 107))
            kv.wait(t.push(held, np.full((held.size, 1), 1, np.int64)))  # writable again
        finally:
            cluster.kill_server(1, signal.SIGCONT)
        st = _wait(cluster, "the woken server back as a new member, the cluster OK",
                   lambda st: st["health"]["state"] == "ok" and sum(
                       n["state"] == "active" for n in st["nodes"] if n["role"] == "server") == 3)
        np.testing.assert_array_equal(t.pull(held).ravel(), np.full(held.size, 8))  # not its stale 107
        np.testing.assert_array_equal(t.pull(others).ravel(), np.full(others.size, 107))

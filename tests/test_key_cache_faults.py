"""Key caching is lossless through faults (issue 17): the same workload run on a real
cluster (3 servers, replication 2) with key caching and without it, a server SIGKILLed
in the middle of its traffic and a server joining live later, leaves bit-identical
tables, equal to the sum of every push applied once in issue order. Key caching must
actually be used in the first run (most requests by signature) and never in the second.
"""
from __future__ import annotations

import numpy as np

import psd

ITERS = 30
KILL_AT, JOIN_AT = 8, 18
#: key lists the worker pushes every iteration: each cut into parts of 64+ keys per server
SIZES = (3000, 900, 400)


def _lists() -> list[np.ndarray]:
    rng = np.random.default_rng(17)
    return [np.unique(rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)) for n in SIZES]


def _values(it: int, j: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([it, j])
    return (rng.integers(-1000, 1000, size=(n, 1), dtype=np.int64),
            rng.standard_normal((n, 2)) * 10.0 ** rng.integers(-3, 4, size=(n, 1)))


def _expected(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every key's sums, added in issue order (float64: the order decides the bits)."""
    keys = np.unique(np.concatenate(lists))
    ints = np.zeros((keys.size, 1), np.int64)
    floats = np.zeros((keys.size, 2), np.float64)
    for it in range(ITERS):
        for j, ks in enumerate(lists):
            vi, vf = _values(it, j, ks.size)
            at = np.searchsorted(keys, ks)
            ints[at] += vi
            floats[at] += vf
    return keys, ints, floats


def _run(key_caching: bool, lists: list[np.ndarray]):
    with psd.LocalCluster(servers=3, replication=2) as cluster:
        kv = psd.connect(cluster, cluster.config.replace(key_caching=key_caching))
        try:
            ti = kv.table("kci", width=1, dtype="int64", updater="sum")
            tf = kv.table("kcf", width=2, dtype="float64", updater="sum")
            window: list[int] = []
            for it in range(ITERS):
                issued = []
                for j, keys in enumerate(lists):
                    vi, vf = _values(it, j, keys.size)
                    issued += [ti.push(keys, vi), tf.push(keys, vf)]
                for ts in window:  # one iteration in flight while the next is issued
                    kv.wait(ts)
                window = issued
                if it == KILL_AT:
                    cluster.kill_server(0)  # with this iteration's pushes unanswered
                if it == JOIN_AT:
                    cluster.add_server(wait=False)
                ti.pull(lists[it % len(lists)])  # (pulls name the same lists)
            for ts in window:
                kv.wait(ts)
            keys = np.unique(np.concatenate(lists))
            return ti.pull(keys), tf.pull(keys), kv.traffic()
        finally:
            kv.close()


def test_tables_are_bit_identical_with_and_without_key_caching_through_kill_and_join():
    lists = _lists()
    _, want_i, want_f = _expected(lists)
    with_i, with_f, with_traffic = _run(True, lists)
    without_i, without_f, without_traffic = _run(False, lists)
    np.testing.assert_array_equal(with_i, want_i)
    np.testing.assert_array_equal(without_i, want_i)
    # bit for bit: the float sums saw the same pushes in the same order
    assert with_f.tobytes() == without_f.tobytes() == want_f.tobytes()
    kc, sent = with_traffic["key_cache"], with_traffic["sent"]
    assert kc["by_signature"] > kc["whole_to_keep"] > 0, kc
    assert sent["after_kc"] < 0.8 * sent["raw"], sent
    off = without_traffic["sent"]
    assert off["kc_messages"] == 0 and off["raw"] == off["after_kc"]
    assert without_traffic["key_cache"]["whole_to_keep"] == 0

"""Bounded tables on real daemons: admission and eviction decided by each range's
primary, followed by its replicas, through a SIGKILL of a primary.

Three servers, replication 2. A worker pushes batches drawn from a pool of keys into a
table with ``admit_after`` and ``max_rows``; a plain-Python model of each primary (its
keys in push order, the K-th push admits, the least recently pushed go over the cap)
says what every key must read. Then the primary of the most keys is SIGKILLed: the
replicas that take its ranges over must read exactly the same (an evicted key does not
come back from a replica), and ``psd status`` and the Prometheus text show the counts.
"""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest

import psd
from psd.cli.status import render
from psd.errors import BadRequestError

from test_failover import live_servers, node_state, settled, wait_until

CAP, K, POOL, BATCH, PUSHES = 40, 2, 400, 60, 12


class Primary:
    """One server's led keys as the rules say: admission at the K-th push, then LRU."""

    def __init__(self):
        self.rows: dict[int, float] = {}
        self.order: dict[int, int] = {}  # key -> place in push order (last push wins)
        self.count: dict[int, int] = {}
        self.tick = 0
        self.refused = self.evicted = 0

    def push(self, keys: list[int], value: float) -> None:
        for k in sorted(keys):
            if k not in self.rows:
                self.count[k] = self.count.get(k, 0) + 1
                if self.count[k] < K:
                    self.refused += 1
                    continue
            self.rows[k] = self.rows.get(k, 0.0) + value
            self.tick += 1
            self.order[k] = self.tick
        while len(self.rows) > CAP:
            oldest = min(self.rows, key=self.order.__getitem__)
            del self.rows[oldest], self.order[oldest]
            self.evicted += 1


def owners_of(st: dict, key: int) -> tuple[str, ...]:
    return next(tuple(r["owners"]) for r in st["ranges"] if r["begin"] <= key <= r["last"])


def one_tuple_per_primary(st: dict, keys: np.ndarray) -> np.ndarray:
    """The keys whose owners are, for their primary, its one widest owner tuple: then a
    push reaches each primary as one message, however a client groups its rows (by
    owner tuple or by server), and the model's "evict after each push" is the server's."""
    span: dict[tuple, int] = {}
    for r in st["ranges"]:
        span[tuple(r["owners"])] = span.get(tuple(r["owners"]), 0) + r["last"] - r["begin"] + 1
    widest = {}
    for owners, n in sorted(span.items(), key=lambda x: -x[1]):
        widest.setdefault(owners[0], owners)
    return np.array([k for k in keys.tolist() if widest[owners_of(st, k)[0]] == owners_of(st, k)], np.uint64)


@pytest.fixture(scope="module")
def cluster():
    with psd.LocalCluster(servers=3, replication=2, metrics="127.0.0.1:0") as c:
        yield c


def test_bad_bounds_options_are_refused_by_name(cluster):
    kv = psd.connect(cluster)
    try:
        with pytest.raises(BadRequestError, match="'max_rows'"):
            kv.table("bad", width=1, dtype="float32", updater="sum", max_rows=-3)
        with pytest.raises(BadRequestError, match="'ttl_seconds'"):
            kv.table("bad", width=1, dtype="float32", updater="sum", ttl_pushes=3, ttl_seconds=1.0)
    finally:
        kv.close()
    assert "bad" not in cluster.status()["tables"]


def test_replica_that_takes_over_holds_the_same_rows(cluster):
    st0 = cluster.status()
    servers = live_servers(st0)
    rng = np.random.default_rng(7)
    pool = one_tuple_per_primary(st0, np.unique(rng.integers(0, 2**64 - 1, 3 * POOL, dtype=np.uint64)))[:POOL]
    model = {s: Primary() for s in servers}
    kv = psd.connect(cluster)
    try:
        w = kv.table("w", width=1, dtype="float32", updater="sum", max_rows=CAP, admit_after=K)
        for i in range(PUSHES):
            keys = np.sort(rng.choice(pool, BATCH, replace=False))
            value = float(i + 1)
            kv.wait(w.push(keys, np.full((keys.size, 1), value, np.float32)))
            by_primary: dict[str, list[int]] = {}
            for k in keys.tolist():
                by_primary.setdefault(owners_of(st0, k)[0], []).append(k)
            for s, ks in by_primary.items():
                model[s].push(ks, value)
        want = np.zeros(pool.size, np.float32)
        rows = {k: v for m in model.values() for k, v in m.rows.items()}
        for i, k in enumerate(pool.tolist()):
            want[i] = rows.get(k, 0.0)
        before = w.pull(pool)[:, 0]
        np.testing.assert_array_equal(before, want)
        assert 0 < len(rows) < pool.size  # some keys were refused or evicted, some are stored

        def stats_current(st) -> bool:  # each server's stats arrive with its own heartbeat
            t = st["tables"]["w"]
            return (t.get("evicted") == sum(m.evicted for m in model.values())
                    and t.get("refused") == sum(m.refused for m in model.values())
                    and all(t.get("per_server", {}).get(s, {}).get("led_rows") == len(m.rows)
                            for s, m in model.items()))

        st = wait_until(cluster, stats_current, "the servers' stats to show the evictions and refusals")
        t = st["tables"]["w"]
        assert t["evicted_by_primary"] == t["evicted"]  # every eviction reached its replica
        for s, m in model.items():
            assert t["per_server"][s]["led_rows"] == len(m.rows) <= CAP
        table_line = next(line for line in render(st).splitlines() if line.split()[:1] == ["w"])
        assert table_line.split()[-2:] == [str(t["refused"]), str(t["evicted"])]  # psd status's columns
        text = urllib.request.urlopen(f"http://{st['metrics']}/metrics", timeout=5).read().decode()
        assert f'psd_cluster_table_evicted_rows_total{{table="w"}} {t["evicted"]}' in text

        victim = max(model, key=lambda s: len(model[s].rows))
        cluster.kill_server(victim)
        wait_until(cluster, lambda st: node_state(st, victim) == "dead" and settled(st, servers - {victim}),
                   f"{victim} dead and its ranges led by their replicas")
        after = w.pull(pool)[:, 0]
        np.testing.assert_array_equal(after, want)

        # the new primaries lead more keys now: the next push brings each back under the cap
        keys = np.sort(rng.choice(pool, BATCH, replace=False))
        kv.wait(w.push(keys, np.ones((keys.size, 1), np.float32)))
        st = wait_until(cluster, lambda st: all(v.get("led_rows", CAP + 1) <= CAP for n, v in
                                                st["tables"]["w"]["per_server"].items() if n != victim),
                        "the new primaries to evict down to max_rows")
    finally:
        kv.close()


def test_eviction_refused_when_the_cluster_is_sequential():
    """The scheduler refuses an evicting table that takes the cluster's sequential
    consistency (a table that names eventual or bounded is fine); nothing is created."""
    with psd.LocalCluster(servers=1, consistency="sequential", security="none") as c:
        kv = psd.connect(c)
        try:
            with pytest.raises(BadRequestError, match="cluster's is sequential") as e:
                kv.table("capped", width=1, dtype="float32", updater="sum", max_rows=5)
            assert e.value.data.get("option") == "consistency"
            assert "capped" not in c.status()["tables"]
            t = kv.table("capped", width=1, dtype="float32", updater="sum", max_rows=5, consistency="eventual")
            kv.wait(t.push(np.arange(10, dtype=np.uint64), np.ones((10, 1), np.float32)))
            assert t.pull(np.arange(10, dtype=np.uint64))[:, 0].tolist() == [0.0] * 5 + [1.0] * 5
        finally:
            kv.close()

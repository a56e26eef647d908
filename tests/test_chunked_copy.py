"""Range copies larger than limits.max_message_bytes move in chunks (real daemons).

A cluster with a small ``max_message_bytes`` holds tables whose moved ranges are
several times that limit: an integer table (exact sums) and an adagrad table (float64,
values plus updater state). After a join, and after a SIGKILL at replication 2, every
key must read back exactly, and the adagrad state must have moved too (a push after
the change must give what a local replay of every push gives). A stream of acked
pushes runs meanwhile and is checked exactly (none lost, none applied twice).

Before chunked copies these ranges could not move at all: the receiver refused each
one-message copy as too large, the copy was logged missing and its rows read as zero.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import psd
from psd.store import Table, TableSpec

from test_failover import Stream, check_exact, live_servers, node_state, settled, wait_until
from workerprocs import closing

LIMIT = 256 * 1024
NKEYS = 24000
INT_WIDTH = 16          # 8 + 128 bytes a row: 3.3 MB
ADA_WIDTH = 8           # 8 + 64 values + 64 state bytes a row: 3.3 MB
BATCH = 1000            # keys per push or pull: well under LIMIT
ADA = {"lr": 0.3, "eps": 1e-3}
SETTINGS = dict(limits={"max_message_bytes": LIMIT}, vnodes=2)


def keys_all() -> np.ndarray:
    rng = np.random.default_rng(77)
    return np.unique(rng.integers(0, 2**64 - 1, size=NKEYS, dtype=np.uint64, endpoint=True))


KEYS = keys_all()


def int_push(r: int) -> np.ndarray:
    return np.random.default_rng([1, r]).integers(-1000, 1000, size=(KEYS.size, INT_WIDTH), dtype=np.int64)


def ada_push(r: int) -> np.ndarray:
    return np.random.default_rng([2, r]).normal(scale=2.0, size=(KEYS.size, ADA_WIDTH))


def push_round(kv, r: int) -> None:
    ti = kv.table("cc_int", width=INT_WIDTH, dtype="int64", updater="sum")
    ta = kv.table("cc_ada", width=ADA_WIDTH, dtype="float64", updater="adagrad", **ADA)
    gi, ga = int_push(r), ada_push(r)
    for i in range(0, KEYS.size, BATCH):
        kv.wait(ti.push(KEYS[i:i + BATCH], gi[i:i + BATCH]))
        kv.wait(ta.push(KEYS[i:i + BATCH], ga[i:i + BATCH]))


def pull_all(kv) -> tuple[np.ndarray, np.ndarray]:
    ti = kv.table("cc_int", width=INT_WIDTH, dtype="int64", updater="sum")
    ta = kv.table("cc_ada", width=ADA_WIDTH, dtype="float64", updater="adagrad", **ADA)
    return (np.concatenate([ti.pull(KEYS[i:i + BATCH]) for i in range(0, KEYS.size, BATCH)]),
            np.concatenate([ta.pull(KEYS[i:i + BATCH]) for i in range(0, KEYS.size, BATCH)]))


def reference(rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """What the tables hold after ``rounds`` push rounds, replayed locally in the same order."""
    ada = Table(TableSpec("ref", ADA_WIDTH, "float64", "adagrad", dict(ADA)).validate())
    ints = np.zeros((KEYS.size, INT_WIDTH), dtype=np.int64)
    for r in range(rounds):
        ints += int_push(r)
        ga = ada_push(r)
        for i in range(0, KEYS.size, BATCH):
            ada.push(KEYS[i:i + BATCH], ga[i:i + BATCH])
    return ints, ada.pull(KEYS)


def check_tables(kv, rounds: int) -> None:
    want_i, want_a = reference(rounds)
    got_i, got_a = pull_all(kv)
    bad = np.flatnonzero((got_i != want_i).any(axis=1))
    assert bad.size == 0, f"{bad.size} of {KEYS.size} integer rows differ, e.g. key {int(KEYS[bad[0]])}"
    bad = np.flatnonzero((got_a != want_a).any(axis=1))
    assert bad.size == 0, f"{bad.size} of {KEYS.size} adagrad rows differ, e.g. key {int(KEYS[bad[0]])}: " \
                          f"{got_a[bad[0]].tolist()} != {want_a[bad[0]].tolist()}"


def largest_range_bytes(st: dict, owners: set[str]) -> int:
    """The most table bytes (both tables) in one range held by one of ``owners``."""
    row = 8 + INT_WIDTH * 8 + 8 + 2 * ADA_WIDTH * 8
    most = 0
    for r in st["ranges"]:
        if owners & set(r["owners"]):
            n = int(np.searchsorted(KEYS, np.uint64(r["last"]), side="right")
                    - np.searchsorted(KEYS, np.uint64(r["begin"])))
            most = max(most, n * row)
    return most


@pytest.fixture
def make_cluster():
    yield from closing(lambda servers, **kw: psd.LocalCluster(servers=servers, **SETTINGS, **kw))


@pytest.fixture
def streams():
    yield from closing(Stream)


def test_join_moves_ranges_larger_than_the_message_limit(make_cluster, streams, tmp_path: Path):
    cluster = make_cluster(2, replication=1)
    servers = live_servers(cluster.status())
    with psd.connect(cluster.scheduler) as kv:
        push_round(kv, 0)
        push_round(kv, 1)
        before = pull_all(kv)
        stream = streams(cluster.scheduler, [11], tmp_path)
        stream.go()
        time.sleep(0.5)
        cluster.add_server()
        joined = cluster.node_id(2)
        st = wait_until(cluster, lambda st: not st["ring_changing"] and joined in
                        {o for r in st["ranges"] for o in r["owners"]}, f"{joined} in the ring")
        assert largest_range_bytes(st, {joined}) > 4 * LIMIT, "the test must move ranges far above the limit"
        after = pull_all(kv)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])
        push_round(kv, 2)  # adagrad's step uses the moved state: a lost state gives other values
        check_tables(kv, 3)
    time.sleep(0.3)
    check_exact(cluster, stream.stop(), min_acked=20)
    assert servers | {joined} == live_servers(cluster.status())


def test_sigkill_replication2_restores_copies_in_chunks(make_cluster, streams, tmp_path: Path):
    cluster = make_cluster(3, replication=2)
    servers = live_servers(cluster.status())
    with psd.connect(cluster.scheduler) as kv:
        push_round(kv, 0)
        push_round(kv, 1)
        stream = streams(cluster.scheduler, [12], tmp_path)
        stream.go()
        time.sleep(0.5)
        victim = cluster.node_id(1)
        st0 = cluster.status()
        cluster.kill_server(1)
        st = wait_until(cluster, lambda st: node_state(st, victim) == "dead" and settled(st, servers - {victim}),
                        f"{victim} dead and 2 copies of every range again")
        assert st["ring_version"] > st0["ring_version"]
        assert all(len(set(r["owners"])) == 2 for r in st["ranges"])
        assert largest_range_bytes(st0, {victim}) > 4 * LIMIT, "the test must move ranges far above the limit"
        check_tables(kv, 2)
        push_round(kv, 2)
        check_tables(kv, 3)
    time.sleep(0.3)
    check_exact(cluster, stream.stop(), min_acked=20)


def test_copy_ids_in_several_messages_count_for_the_range_only(raw_dealer):
    """The ids of a copy may come in several ``install`` messages (``senders`` without
    ``final``), the last one final: all of them count as applied, for rows in the range."""
    from conftest import daemon_keys
    from psd.codec import Message
    from psd.core.range_copy import id_pieces
    from psd.core.seen import ids_of_arrays

    senders, counts, rids = ["W1", "W2", "W3"], np.array([5, 0, 40], np.uint64), np.arange(45, dtype=np.uint64)
    for budget in (1, 16, 24, 100, 1 << 20):
        pieces = id_pieces(senders, counts, rids, budget)
        assert [i for p in pieces for i in ids_of_arrays(*p)] == list(ids_of_arrays(senders, counts, rids))
        assert all(8 * (len(p[0]) + p[2].size) <= max(budget, 16) for p in pieces)
    assert [p[2].size for p in id_pieces([], np.empty(0, np.uint64), np.empty(0, np.uint64), 100)] == [0]

    u8 = lambda *v: np.array(v, dtype=np.uint64)  # noqa: E731
    with psd.LocalCluster(servers=1) as cluster, psd.connect(cluster.scheduler) as kv:
        t = kv.table("cc_ids", dtype="int64")
        t.pull(u8(10))  # the table exists on the server
        d = raw_dealer(cluster.servers[0].address, curve=daemon_keys())
        rng = [0, 999]
        ring = cluster.status()["ring_version"]  # (a copy from an older ring is refused: decision 122)

        def install(meta, arrays):
            return d.request(Message("install", ring=ring, meta={"range": rng, **meta}, arrays=arrays))

        assert install({"senders": ["Wx"]}, [u8(2), u8(5, 6)]).op == "ok"
        bad = install({"senders": ["Wx"]}, [u8(3), u8(1, 2)])  # counts disagree: refused, nothing noted
        assert bad.op == "error" and bad.meta["code"] == "protocol", bad
        assert install({}, []).op == "ok"  # neither rows nor ids: nothing to do
        assert install({"senders": ["Wx", "Wy"], "final": True}, [u8(1, 1), u8(7, 9)]).op == "ok"


        def replicate(origin, rid, key):
            msg = Message("replicate", table="cc_ids", ring=ring, meta={"origin": origin, "rid": rid},
                          arrays=[u8(key), np.ones((1, 1), np.int64)])
            reply = d.request(msg)
            assert reply.op == "ok", reply

        replicate("Wx", 5, 5000)            # outside the range the ids came with: applied
        for origin, rid in [("Wx", 6), ("Wx", 7), ("Wy", 9)]:
            replicate(origin, rid, 10)      # copied in for the range: not applied again
        replicate("Wx", 1, 10)              # in the refused message only: applied
        replicate("Wx", 8, 10)              # never seen: applied
        assert t.pull(u8(10, 5000)).ravel().tolist() == [2, 1]


def test_a_copy_respects_max_keys_as_well_as_max_message_bytes():
    """Chunks are cut to the receiver's limits.max_keys too: a chunk of more rows than
    that is refused whatever its bytes, and the range would be lost."""
    n = 20000
    keys = np.arange(n, dtype=np.uint64) * np.uint64(2**64 // n)  # spread over the key space
    with psd.LocalCluster(servers=1, vnodes=2, limits={"max_keys": 2000}) as cluster:
        with psd.connect(cluster) as kv:
            t = kv.table("cc_keys", dtype="int64")
            for i in range(0, n, 1000):
                kv.wait(t.push(keys[i:i + 1000], np.arange(i, i + 1000, dtype=np.int64)))
            cluster.add_server()
            wait_until(cluster, lambda st: not st["ring_changing"]
                       and {o for r in st["ranges"] for o in r["owners"]} == {"S0", "S1"}, "the join to settle")
            got = np.concatenate([t.pull(keys[i:i + 1000]).ravel() for i in range(0, n, 1000)])
            np.testing.assert_array_equal(got, np.arange(n))

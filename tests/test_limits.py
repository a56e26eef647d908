"""Limits on real daemons: each is refused with a clear error before anything is
allocated or applied, and the daemon goes on serving with its tables unchanged.

Per message (checked by the codec before allocating): header size, keys per request,
a frame's declared size. Message size and frame count are covered in
test_bad_input.py. Per cluster: ``limits.max_tables`` (the scheduler). Per server:
``limits.max_memory_bytes`` (table storage, replicas included), on one server and on
a replicated cluster whose replica fills up first.
"""
from __future__ import annotations


import numpy as np
import pytest
import zstandard

import psd
from psd.client import admin
from psd.codec import Message, encode

from conftest import desc, header, pack, wait_for

TOP = 2**64 - 1
#: clusters a raw test socket talks to speak plaintext (the socket says curve=None), so
#: that several clusters may be open at once; the checks do not depend on CurveZMQ
RAW = "none"


def u64(*keys) -> np.ndarray:
    return np.array(keys, dtype=np.uint64)


def only_server(cluster) -> str:
    [address] = [n["address"] for n in cluster.status()["nodes"] if n["role"] == "server"]
    return address


# -- per message: header, keys, frame size -------------------------------------------------
HEADER_LIMIT = 4096
KEYS_LIMIT = 1000
MESSAGE_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def tight():
    """One server with small per-message limits and a seeded table ``t`` (float64, width 2)."""
    with psd.LocalCluster(servers=1, security=RAW, limits={"max_header_bytes": HEADER_LIMIT, "max_keys": KEYS_LIMIT,
                                             "max_message_bytes": MESSAGE_LIMIT}) as cluster:
        with psd.connect(cluster) as kv:
            t = kv.table("t", width=2, dtype="float64")
            keys = u64(0, 5, 2**40, TOP)
            values = np.arange(8, dtype=np.float64).reshape(4, 2) + 1
            kv.wait(t.push(keys, values))
            yield cluster, kv, t, keys, values


def _tight_intact(tight, fresh: np.ndarray) -> None:
    """The seeded rows are unchanged and none of ``fresh`` was written."""
    _, _, t, keys, values = tight
    np.testing.assert_array_equal(t.pull(keys), values)
    np.testing.assert_array_equal(t.pull(fresh), np.zeros((fresh.size, 2)))


def test_a_header_over_max_header_bytes_is_refused_unread(tight, raw_dealer):
    cluster = tight[0]
    d = raw_dealer(only_server(cluster), curve=None)
    keys = u64(100, 101)
    vals = np.ones((2, 2))
    big = header("push", id=31, table="t", meta={"pad": "x" * (2 * HEADER_LIMIT)}, frames=[desc(keys), desc(vals)])
    reply = d.exchange([pack(big), keys.tobytes(), vals.tobytes()])
    assert reply.op == "error" and reply.meta["code"] == "too_large", reply.meta
    assert f"limit is {HEADER_LIMIT}" in reply.meta["message"] and "header" in reply.meta["message"]
    assert reply.id == 0  # the header was never unpacked, so the request id is unknown
    d.ping()  # the same connection is still served
    _tight_intact(tight, keys)


def test_more_keys_than_max_keys_are_refused_by_client_and_server(tight, raw_dealer):
    cluster, kv, t, _, _ = tight
    keys = np.arange(10_000, 10_000 + KEYS_LIMIT + 1, dtype=np.uint64)
    vals = np.ones((keys.size, 2))
    with pytest.raises(psd.MessageTooLargeError, match=str(KEYS_LIMIT)):  # the worker learned the limit
        t.push(keys, vals)
    d = raw_dealer(only_server(cluster), curve=None)
    reply = d.exchange(encode(Message("push", id=32, table="t", arrays=[keys, vals])))
    assert reply.op == "error" and reply.meta["code"] == "too_large", reply.meta
    assert reply.id == 32 and "more rows than limits.max_keys" in reply.meta["message"]
    d.ping()
    _tight_intact(tight, keys[[0, -1]])
    kv.wait(t.push(keys[:KEYS_LIMIT], vals[:KEYS_LIMIT]))  # at the limit: accepted
    np.testing.assert_array_equal(t.pull(keys[[0, KEYS_LIMIT - 1]]), np.ones((2, 2)))


def test_a_compressed_frame_declaring_more_than_the_limit_is_refused_before_inflating(tight, raw_dealer):
    """A few hundred bytes on the wire that would decode to 1.6 MB: refused from the
    descriptor, before zstd allocates anything."""
    cluster = tight[0]
    d = raw_dealer(only_server(cluster), curve=None)
    keys = np.arange(20_000, 20_000 + KEYS_LIMIT, dtype=np.uint64)
    zeros = np.zeros((KEYS_LIMIT, 200))  # 1.6 MB > max_message_bytes
    packed = zstandard.ZstdCompressor().compress(zeros.tobytes())
    assert len(packed) < 10_000
    frames = [pack(header("push", id=33, table="t",
                          frames=[desc(keys), ["<f8", [KEYS_LIMIT, 200], "zstd", zeros.nbytes]])),
              keys.tobytes(), packed]
    reply = d.exchange(frames)
    assert reply.op == "error" and reply.meta["code"] == "too_large", reply.meta
    assert reply.id == 33 and str(MESSAGE_LIMIT) in reply.meta["message"]
    d.ping()
    _tight_intact(tight, keys[[0, -1]])


# -- per cluster: max_tables -------------------------------------------------------------------
def test_max_tables(tmp_path):
    with psd.LocalCluster(servers=2, limits={"max_tables": 3}) as cluster:
        with psd.connect(cluster) as kv:
            a = kv.table("a")
            kv.table("b", width=2)
            kv.table("c", dtype="int64")
            with pytest.raises(psd.LimitError) as e:
                kv.table("d")
            msg = str(e.value)
            assert "'d'" in msg and "limits.max_tables is 3" in msg and "psd drop" in msg, msg
            assert e.value.data == {"limit": "max_tables", "max": 3, "used": 3}
            assert e.value.node == "H"
            assert kv.table("b", width=2).name == "b"  # opening one that exists still works
            kv.wait(a.push(u64(1, TOP), np.ones(2, np.float32)))  # and so does everything else
            np.testing.assert_array_equal(a.pull(u64(1, TOP)).ravel(), [1, 1])
            st = cluster.status()
            assert sorted(st["tables"]) == ["a", "b", "c"]
            # dropping one makes room; a raw create names the limit as well
            assert admin.call(cluster.scheduler, "drop_tables", tables=["c"])["dropped"] == ["c"]
            kv.table("d")
            with pytest.raises(psd.LimitError, match="max_tables"):
                admin.call(cluster.scheduler, "create_table", spec={"name": "e", "width": 1, "dtype": "float32"})
            assert sorted(cluster.status()["tables"]) == ["a", "b", "d"]


# -- per server: max_memory_bytes -----------------------------------------------------------
ROW = 8 + 8  # a float64 key of width 1: 8 bytes of key, 8 of value
MEMORY = 1000 * ROW  # 1000 keys per server


def server_memory(cluster, raw_dealer) -> dict[str, int]:
    """Each server's table bytes, asked of the server itself (not a heartbeat old)."""
    out = {}
    for n in cluster.status()["nodes"]:
        if n["role"] == "server" and n["state"] == "active":
            m = raw_dealer(n["address"], curve=None).request(Message("status")).meta["memory"]
            assert m["limit"] == MEMORY
            out[n["id"]] = m["bytes"]
    return out


def test_max_memory_bytes_on_one_server(raw_dealer):
    with psd.LocalCluster(servers=1, security=RAW, limits={"max_memory_bytes": MEMORY}) as cluster:
        with psd.connect(cluster) as kv:
            t = kv.table("m", dtype="float64")
            old = np.arange(900, dtype=np.uint64)
            kv.wait(t.push(old, np.ones(900)))
            assert server_memory(cluster, raw_dealer) == {"S0": 900 * ROW}
            # 50 stored and 150 new keys: 1050 would not fit; nothing of it is applied
            mixed = np.arange(850, 1050, dtype=np.uint64)
            with pytest.raises(psd.LimitError) as e:
                kv.wait(t.push(mixed, np.full(200, 5.0)))
            msg = str(e.value)
            assert e.value.node == "S0" and "'m'" in msg and "150 new key(s)" in msg, msg
            assert f"max_memory_bytes {MEMORY}" in msg and "nothing was applied" in msg, msg
            assert e.value.data["limit"] == "max_memory_bytes" and e.value.data["requested"] == 150 * ROW
            np.testing.assert_array_equal(t.pull(mixed).ravel(), [1.0] * 50 + [0.0] * 150)
            with pytest.raises(psd.LimitError):
                t.pushpull(mixed, np.full(200, 5.0))
            assert server_memory(cluster, raw_dealer) == {"S0": 900 * ROW}
            # pushes to stored keys keep working, and keys up to the limit fit exactly
            kv.wait(t.push(old, np.ones(900)))
            kv.wait(t.push(np.arange(900, 1000, dtype=np.uint64), np.ones(100)))
            assert server_memory(cluster, raw_dealer) == {"S0": MEMORY}
            for push in (lambda: t.push(u64(TOP), np.ones(1)), lambda: t.push_span(5000, np.ones(3))):
                with pytest.raises(psd.LimitError):
                    kv.wait(push())
            np.testing.assert_array_equal(t.pull(old[:3]).ravel(), [2, 2, 2])
            np.testing.assert_array_equal(t.pull_span(4999, 5).ravel(), np.zeros(5))
            kv.wait(t.push_span(0, np.ones(1000)))  # a span over stored keys only
            assert t.pull(u64(999)).ravel().tolist() == [2.0]
            # another table counts against the same server budget
            other = kv.table("other", dtype="float64")
            with pytest.raises(psd.LimitError):
                kv.wait(other.push(u64(1), np.ones(1)))
            assert server_memory(cluster, raw_dealer) == {"S0": MEMORY}
            node = wait_for(lambda: next((n for n in cluster.status()["nodes"] if n["role"] == "server"
                                          and n["counters"].get("limit_refusals", 0) >= 5), None), 10,
                            "the refusals to reach status (on heartbeats)")
            assert node["memory"] == {"bytes": MEMORY, "limit": MEMORY, "reserved": 0, "full_replicas": []}
            # dropping the table frees the memory: new keys fit again
            admin.call(cluster.scheduler, "drop_tables", tables=["m"])
            assert server_memory(cluster, raw_dealer) == {"S0": 0}
            kv.wait(other.push(u64(1), np.ones(1)))
            assert server_memory(cluster, raw_dealer) == {"S0": ROW}


def test_a_server_at_its_memory_limit_makes_the_cluster_degraded():
    """Health (the first line of `psd status`) says DEGRADED, and why, while a server holds
    its whole limits.max_memory_bytes: it refuses every push that adds keys. Dropping
    tables brings it back to OK."""
    from psd.cli.status import health_line

    def health(state: str):
        return wait_for(lambda: (lambda st: st if st["health"]["state"] == state else None)(cluster.status()), 10,
                        f"health {state} (on heartbeats)")

    with psd.LocalCluster(servers=1, security=RAW, limits={"max_memory_bytes": MEMORY}) as cluster:
        with psd.connect(cluster) as kv:
            t = kv.table("m", dtype="float64")
            kv.wait(t.push(np.arange(999, dtype=np.uint64), np.ones(999)))  # one key short of the limit
            assert health("ok")["health"]["reasons"] == []
            kv.wait(t.push(u64(999), np.ones(1)))
            st = health("degraded")
            reason = f"server S0 at its memory limit ({MEMORY} of {MEMORY} bytes, limits.max_memory_bytes)"
            assert st["health"]["reasons"] == [f"{reason}: pushes that add keys are refused"], st["health"]
            assert health_line(st).startswith(f"DEGRADED: {reason}")
            admin.call(cluster.scheduler, "drop_tables", tables=["m"])
            health("ok")


def test_pushes_the_gate_holds_count_against_the_limit(raw_dealer):
    """Under sequential consistency a push is acknowledged at once but applied at the
    clock boundary: until then the bytes it may add are reserved, so two held pushes
    cannot together overshoot the limit."""
    with psd.LocalCluster(servers=1, security=RAW, consistency="sequential", num_workers=1,
                          limits={"max_memory_bytes": MEMORY}) as cluster:
        with psd.connect(cluster) as kv:
            t = kv.table("m", dtype="float64")
            first, second = np.arange(600, dtype=np.uint64), np.arange(600, 1200, dtype=np.uint64)
            kv.wait(t.push(first, np.ones(600)))  # held until kv.clock()
            address = only_server(cluster)
            m = raw_dealer(address, curve=None).request(Message("status")).meta["memory"]
            assert (m["bytes"], m["reserved"]) == (0, 600 * ROW)
            with pytest.raises(psd.LimitError):
                kv.wait(t.push(second, np.ones(600)))
            kv.clock()
            np.testing.assert_array_equal(t.pull(first[[0, -1]]).ravel(), [1, 1])
            m = raw_dealer(address, curve=None).request(Message("status")).meta["memory"]
            assert (m["bytes"], m["reserved"]) == (600 * ROW, 0)
            np.testing.assert_array_equal(t.pull(second[:2]).ravel(), [0, 0])


def _keys_in(st: dict, owners: tuple[str, ...], n: int, offset: int) -> np.ndarray:
    """``n`` keys of ranges whose owner tuple is ``owners`` (primary first)."""
    for r in st["ranges"]:
        if tuple(r["owners"]) == owners and r["last"] - r["begin"] > offset + n:
            return np.arange(r["begin"] + offset, r["begin"] + offset + n, dtype=np.uint64)
    raise AssertionError(f"no range owned by {owners}: {st['ranges']}")


def test_max_memory_bytes_with_replicas(raw_dealer):
    """replication 2 on 3 servers. R is the replica of P's ranges in group (P, R), and
    the primary of group (R, X). R fills up through (R, X); a forward from P may then
    take R past its limit (a replica never refuses a forward: copies would differ), R
    says so in its answer, and from then on P refuses pushes that add keys to (P, R)
    before applying anything; R refuses new keys of (R, X) itself."""
    with psd.LocalCluster(servers=3, replication=2, security=RAW, limits={"max_memory_bytes": MEMORY}) as cluster:
        st = cluster.wait_for_ring(3)
        groups = {tuple(r["owners"]) for r in st["ranges"]}
        p, r, x = next((p, r, x) for (p, r) in sorted(groups) for (r2, x) in sorted(groups)
                       if r2 == r and x != p)
        with psd.connect(cluster) as kv:
            t = kv.table("m", dtype="float64")
            kv.wait(t.push(_keys_in(st, (r, x), 900, 0), np.ones(900)))
            assert server_memory(cluster, raw_dealer)[r] == 900 * ROW
            first = _keys_in(st, (p, r), 200, 0)
            kv.wait(t.push(first, np.ones(200)))  # fits on P; takes R past its limit
            mem = server_memory(cluster, raw_dealer)
            assert mem[r] == 1100 * ROW and mem[p] <= 200 * ROW + 900 * ROW
            more = _keys_in(st, (p, r), 10, 500)
            with pytest.raises(psd.LimitError) as e:
                kv.wait(t.push(more, np.ones(10)))
            assert e.value.node == p and f"replicated on {r}" in str(e.value), str(e.value)
            with pytest.raises(psd.LimitError) as e:
                kv.wait(t.push(_keys_in(st, (r, x), 10, 5000), np.ones(10)))
            assert e.value.node == r
            assert server_memory(cluster, raw_dealer) == mem  # nothing applied, anywhere
            np.testing.assert_array_equal(t.pull(more).ravel(), np.zeros(10))
            kv.wait(t.push(first, np.ones(200)))  # stored keys: fine on both copies
            np.testing.assert_array_equal(t.pull(first[[0, -1]]).ravel(), [2, 2])
            # every copy holds the same keys: the refused pushes reached no replica
            per = {node: v.get("keys", 0) for node, v in server_tables(cluster, raw_dealer, "m").items()}
            assert sum(per.values()) == 2 * (900 + 200), per
            address = next(n["address"] for n in cluster.status()["nodes"] if n["id"] == p)
            assert raw_dealer(address, curve=None).request(Message("status")).meta["memory"]["full_replicas"] == [r]
            # a drop frees every copy, and the primaries forget the full replica
            admin.call(cluster.scheduler, "drop_tables", tables=["m"])
            assert set(server_memory(cluster, raw_dealer).values()) == {0}
            t = kv.table("m", dtype="float64")
            kv.wait(t.push(more, np.ones(10)))
            assert sum(server_memory(cluster, raw_dealer).values()) == 2 * 10 * ROW


def server_tables(cluster, raw_dealer, name: str) -> dict[str, dict]:
    return {n["id"]: raw_dealer(n["address"], curve=None).request(Message("status")).meta["tables"].get(name, {})
            for n in cluster.status()["nodes"] if n["role"] == "server"}


def test_range_copies_are_never_refused_for_memory(raw_dealer):
    """Draining a server moves its ranges to the others even past their limits (refusing
    a copy would lose the range); the server over its limit then refuses new keys."""
    with psd.LocalCluster(servers=3, security=RAW, limits={"max_memory_bytes": MEMORY}) as cluster:
        st = cluster.wait_for_ring(3)
        with psd.connect(cluster) as kv:
            t = kv.table("m", dtype="float64")
            keys = np.concatenate([_keys_in(st, (node,), 800, 0) for node in ("S0", "S1", "S2")])
            kv.wait(t.push(keys, np.ones(keys.size)))
            assert server_memory(cluster, raw_dealer) == {"S0": 800 * ROW, "S1": 800 * ROW, "S2": 800 * ROW}
            admin.call(cluster.scheduler, "drain", timeout=40, node="S2")
            mem = server_memory(cluster, raw_dealer)
            assert set(mem) == {"S0", "S1"} and sum(mem.values()) == 2400 * ROW  # nothing lost
            full = max(mem, key=mem.get)
            assert mem[full] > MEMORY  # 2400 keys cannot fit in 2 x 1000
            np.testing.assert_array_equal(t.pull(keys).ravel(), np.ones(keys.size))
            kv.wait(t.push(keys, np.ones(keys.size)))  # stored keys still take pushes
            np.testing.assert_array_equal(t.pull(keys[[0, -1]]).ravel(), [2, 2])
            st = cluster.wait_for_ring(2)
            with pytest.raises(psd.LimitError) as e:
                kv.wait(t.push(_keys_in(st, (full,), 1, 10**6), np.ones(1)))
            assert e.value.node == full
            assert server_memory(cluster, raw_dealer) == mem


def test_raw_status_reports_memory(raw_dealer):
    with psd.LocalCluster(servers=1, security=RAW) as cluster:
        m = raw_dealer(only_server(cluster), curve=None).request(Message("status")).meta["memory"]
        assert m == {"bytes": 0, "limit": None, "reserved": 0, "full_replicas": []}

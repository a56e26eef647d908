"""Striped CurveZMQ (psd/transport/stripes.py): a large message over several connections.

Pure tests of cutting and putting back together (order, loss, bounds, a chunk from a
connection of another key), then one CurveZMQ cluster: striped and unstriped clients
give the same tables, a stripe that loses a chunk either way loses no acknowledged push
and applies none twice, and a peer without a listed key cannot feed a stripe.
"""
from __future__ import annotations

import random
import time

import numpy as np
import pytest
import zmq

import psd
from psd.codec import Message, encode
from psd.config import ClusterConfig, config_from_dict
from psd.errors import ConfigError
from psd.transport import stripes
from psd.transport.stripes import LOST, STRIPE_WAIT, Assembler, cut, hello, stripe_route

from conftest import RawDealer
from test_security import stranger_keys


class Frame(bytes):
    """A received frame with the role ZeroMQ would attach to it (CurveZMQ's User-Id)."""

    role: str | None = None

    def get(self, key):
        return self.role


def frames_of(msg_frames: list, role=None) -> list:
    out = []
    for f in msg_frames:
        fr = Frame(bytes(f))
        fr.role = role
        out.append(fr)
    return out


def message(big: int = 3_000_000, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return encode(Message("push", id=7, sender="W0", table="t", meta={"rid": 1},
                          arrays=[np.arange(big // 8, dtype=np.uint64), rng.random((big // 8, 1)).astype(np.float32),
                                  np.arange(10, dtype=np.int64)]))


def sent(frames: list, token: int = 5, seq: int = 1, n: int = 3, role=None):
    sends, carrier = cut(frames, token, seq, n)
    return [frames_of(chunk, role) for _, chunk in sends], frames_of(carrier, role)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(bytes(x) == bytes(y) for x, y in zip(a, b))


# -- cutting and putting back together --------------------------------------------------------
@pytest.mark.parametrize("carrier_first", [True, False])
def test_a_message_comes_back_whole_whatever_order_its_chunks_arrive_in(carrier_first):
    original = message()
    chunks, carrier = sent(original)
    assert len(chunks) >= 3 and len(carrier) == len(original) + 1
    assert {conn for conn, _ in cut(original, 5, 1, 3)[0]} == {0, 1, 2}  # every connection carries some
    random.Random(1).shuffle(chunks)
    asm = Assembler(1 << 30, ordered=True)
    order = [carrier, *chunks] if carrier_first else [*chunks, carrier]
    outs = [asm.feed(b"r", f, 0.0) for f in order]
    assert all(o == [] for o in outs[:-1])
    [(route, frames)] = outs[-1]
    assert route == b"r" and same(frames, original)
    assert asm.bytes == 0 and not asm.waiting and not asm.chunks and not asm.parked
    assert asm.stats()["assembled"] == 1


def test_a_connection_keeps_its_order_behind_a_carrier_that_waits():
    original = message(seed=1)
    chunks, carrier = sent(original)
    asm = Assembler(1 << 30, ordered=True)
    later = frames_of(message(1000, seed=2))  # small: not striped
    assert asm.feed(b"r", carrier, 0.0) == []
    assert asm.feed(b"r", later, 0.0) == []            # held behind the carrier
    assert asm.feed(b"other", later, 0.0) is None     # another connection is not held
    for c in chunks[:-1]:
        assert asm.feed(b"r", c, 0.0) == []
    ready = asm.feed(b"r", chunks[-1], 0.0)
    assert [r for r, _ in ready] == [b"r", b"r"]
    assert same(ready[0][1], original) and ready[1][1] is later
    assert asm.feed(b"r", later, 0.0) is None         # nothing held any more


def test_a_carrier_missing_a_chunk_is_given_up_and_what_waited_behind_it_goes_on():
    original = message(seed=3)
    chunks, carrier = sent(original)
    asm = Assembler(1 << 30, ordered=True)
    later = frames_of(message(1000, seed=4))
    asm.feed(b"r", carrier, 10.0)
    asm.feed(b"r", later, 10.0)
    for c in chunks[1:]:  # the first chunk never comes
        asm.feed(b"r", c, 10.0)
    assert asm.expire(10.0 + STRIPE_WAIT / 2) == []
    ready = asm.expire(10.0 + STRIPE_WAIT)
    assert type(ready[0][1]) is LOST and bytes(ready[0][1][0]) == bytes(original[0])  # (named by its header)
    assert ready[1][1] is later and asm.stats()["lost"] == 1
    assert asm.bytes == 0 and not asm.parked
    # the late chunk has no carrier: dropped after twice the wait, never handed on
    assert asm.feed(b"r", chunks[0], 10.0 + STRIPE_WAIT) == []
    assert asm.expire(10.0 + 3.1 * STRIPE_WAIT) == [] and asm.bytes == 0 and asm.stats()["dropped_chunks"] == 1


def test_a_later_chunk_on_the_same_connection_shows_a_chunk_lost_at_once():
    first, second = message(seed=7), message(seed=8)
    chunks1, carrier1 = sent(first, seq=1)
    chunks2, carrier2 = sent(second, seq=2)
    conns = [c for c, _ in cut(first, 5, 1, 3)[0]]
    lost = next(i for i, c in enumerate(conns) if c == 1)  # a chunk the second stripe carried
    asm = Assembler(1 << 30, ordered=True)
    for f in [*chunks1[:lost], *chunks1[lost + 1:], carrier1]:
        assert asm.feed(b"r", f, 0.0) == []
    # another connection's later chunk says nothing about connection 1
    other = next(f for f, c in zip(chunks2, conns) if c == 2)
    assert asm.feed(b"r", other, 0.0) == []
    on_one = next(f for f, c in zip(chunks2, conns) if c == 1)
    ready = asm.feed(b"r", on_one, 0.0)  # connection 1 went on to message 2: the chunk is lost
    assert len(ready) == 1 and type(ready[0][1]) is LOST and asm.stats()["lost"] == 1
    rest = [f for f in chunks2 if f is not other and f is not on_one]
    ready = [r for f in [*rest, carrier2] for r in asm.feed(b"r", f, 0.0)]
    assert len(ready) == 1 and same(ready[0][1], second)
    # a carrier that arrives after the evidence is given up as it arrives
    chunks3, carrier3 = sent(message(seed=9), seq=3)
    late = Assembler(1 << 30, ordered=True)
    late.feed(b"r", next(f for f, c in zip(chunks2, conns) if c == 1), 0.0)  # seq 2 on connection 1
    _, carrier0 = sent(first, seq=1)
    assert [type(f) for _, f in late.feed(b"r", carrier0, 0.0)] == [LOST]


def test_a_chunk_from_a_connection_of_another_key_spoils_the_message():
    original = message(seed=5)
    chunks, carrier = sent(original, role="client:client")
    chunks[1] = frames_of(chunks[1], role="worker:intruder")
    asm = Assembler(1 << 30, ordered=True)
    ready = [r for f in [carrier, *chunks] for r in asm.feed(b"r", f, 0.0)]
    assert len(ready) == 1 and type(ready[0][1]) is LOST


@pytest.mark.parametrize("case", ["mask names the header", "mask past the frames", "bad length", "no chunk size",
                                  "no connections", "hello of one connection", "chunk without data"])
def test_malformed_stripe_frames_are_dropped_and_counted(case):
    head = stripes.HEAD
    carrier = [bytes(message(1000)[0]), stripes._LEN.pack(1 << 20)]
    b = 3 << 24 | 1 << 16  # (3 connections, chunks of 64 KiB)
    assert Assembler(1 << 30, ordered=True).feed(b"r", frames_of([head.pack(0xC1, 3, 0b10, b, 1, 1), *carrier]),
                                                  0.0) == []  # (well formed: it waits for its chunks)
    frames = {"mask names the header": [head.pack(0xC1, 3, 0b11, b, 1, 1), *carrier],
              "mask past the frames": [head.pack(0xC1, 3, 0b100, b, 1, 1), *carrier],
              "bad length": [head.pack(0xC1, 3, 0b10, b, 1, 1), carrier[0], b"123"],
              "no chunk size": [head.pack(0xC1, 3, 0b10, 3 << 24, 1, 1), *carrier],
              "no connections": [head.pack(0xC1, 3, 0b10, 1 << 16, 1, 1), *carrier],
              "hello of one connection": [hello(9, 1)],
              "chunk without data": [head.pack(0xC1, 2, 0, 0, 1, 1)]}[case]
    asm = Assembler(1 << 30, ordered=True)
    assert asm.feed(b"r", frames_of(frames), 0.0) == []
    assert not asm.waiting and not asm.parked and not asm.groups
    assert asm.stats()["dropped_chunks"] == (0 if case == "hello of one connection" else 1)


def test_chunks_are_bounded_in_bytes():
    chunks, _ = sent(message(seed=6))
    asm = Assembler(len(chunks[0][1]) + 10, ordered=True)
    asm.feed(b"r", chunks[0], 0.0)
    assert asm.feed(b"r", chunks[1], 0.0) == []      # the oldest unclaimed chunks make room
    assert asm.bytes <= len(chunks[0][1]) + 10 and asm.stats()["dropped_chunks"] >= 1


def test_hello_names_the_stripe_routes_of_a_connection():
    asm = Assembler(1 << 30, ordered=True)
    assert asm.feed(b"main", [Frame(hello(42, 3))], 0.0) == []
    assert asm.groups[b"main"] == (42, 3)
    assert stripe_route(42, 1) != stripe_route(42, 2) != stripe_route(43, 1)
    assert not stripe_route(42, 1).startswith(b"\0")  # (ZeroMQ keeps ids starting with 0 for itself)


def test_stripe_count_setting():
    assert stripes.stripe_count(1) == 1 and stripes.stripe_count(3) == 3
    assert 1 <= stripes.stripe_count("auto") <= 8
    assert config_from_dict({"stripes": "auto"}).stripes == "auto" and config_from_dict({"stripes": 4}).stripes == 4
    for bad in (0, 17, "many", 2.5):
        with pytest.raises(ConfigError, match=r"stripes: expected an integer from 1 .* or 'auto'"):
            config_from_dict({"stripes": bad})


# -- real daemons -------------------------------------------------------------------------------
N = 1_000_000  # 4 MB of float32: striped both ways


# Stripes are for peers on other hosts: on one host large payloads go through shared
# memory (psd/transport/shm.py) and nothing is left to stripe, so it is off here.
@pytest.fixture(scope="module")
def cluster():
    with psd.LocalCluster(servers=2, replication=2, stripes=3, shm=False) as c:
        yield c


def connect(cluster, stripes_: int):
    return psd.connect(cluster.scheduler, ClusterConfig(scheduler=cluster.scheduler, stripes=stripes_, shm=False))


def rpc_of(kv, key: int = 0):
    """The connection to the primary of ``key``."""
    ring = kv.aio.ring
    i = next(i for i, r in enumerate(ring.ranges) if r.begin <= key < r.end)
    return kv.aio._servers[ring.owners[i][0]]


def owners_of(kv, key: int = 0) -> list[str]:
    ring = kv.aio.ring
    return next(o for r, o in zip(ring.ranges, ring.owners) if r.begin <= key < r.end)


def per_server(cluster) -> dict[str, dict]:
    """Each server's striping counters, asked of its data socket (``status``)."""
    out = {}
    for node in cluster.status()["nodes"]:
        if node["role"] == "server":
            d = RawDealer(node["address"])
            try:
                out[node["id"]] = d.request(Message("status")).meta["stripes"]
            finally:
                d.close()
    return out


def server_stripes(cluster) -> dict:
    """The servers' striping counters, summed."""
    total: dict = {}
    for st in per_server(cluster).values():
        for k, v in st.items():
            total[k] = total.get(k, 0) + v
    return total


def test_striped_and_unstriped_clients_build_identical_tables(cluster):
    rng = np.random.default_rng(11)
    span = rng.random((N, 1), dtype=np.float32)
    keys = np.unique(rng.integers(0, 2**64 - 1, 400_000, dtype=np.uint64))
    vals = rng.random((keys.size, 2)).astype(np.float64)
    got = {}
    for n in (1, 3):
        kv = connect(cluster, n)
        try:
            a = kv.table(f"same_span_{n}", updater="sum")
            b = kv.table(f"same_keys_{n}", width=2, dtype="float64", updater="sum")
            for _ in range(2):
                kv.wait(a.push_span(0, span))
                kv.wait(b.push(keys, vals))
            got[n] = (a.pull_span(0, N), b.pull(keys))
            rpcs = kv.aio._servers.values()
            out, back = sum(r.striped_out for r in rpcs), sum(r.assembler.assembled for r in rpcs)
            if n == 1:
                assert all(r.links is None for r in rpcs) and out == 0 and back == 0
            else:  # pushes went striped, and the pulls' replies came back striped
                assert out >= 4 and back >= 2
        finally:
            kv.close()
    for x, y in zip(got[1], got[3]):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(got[3][0], span + span)
    np.testing.assert_array_equal(got[3][1], vals + vals)
    st = server_stripes(cluster)
    assert st["assembled"] >= 4 and st["sent"] >= 2 and st["lost"] == 0


def test_forwards_to_replicas_are_striped_too(cluster):
    kv = connect(cluster, 3)
    try:
        t = kv.table("forwarded", updater="sum")
        v = np.ones((N, 1), np.float32)
        primary, replica = owners_of(kv)
        before = per_server(cluster)
        for _ in range(2):
            kv.wait(t.push_span(0, v))  # acked once the replica holds it
        after = per_server(cluster)
        # the replica put the primary's forwards back together: it had nothing else striped
        assert after[replica]["assembled"] - before[replica]["assembled"] == 2
        assert after[primary]["assembled"] - before[primary]["assembled"] == 2  # (the client's pushes)
        assert after[replica]["lost"] == before[replica]["lost"]
        np.testing.assert_array_equal(t.pull_span(0, N), 2 * v)
    finally:
        kv.close()


def test_a_stripe_that_drops_a_chunk_loses_no_acked_push_and_applies_none_twice(cluster):
    kv = connect(cluster, 2)
    try:
        t = kv.table("lossy", updater="sum")
        v = np.arange(N, dtype=np.float32).reshape(-1, 1)
        kv.wait(t.push_span(0, v))
        rpc = rpc_of(kv)
        before = server_stripes(cluster)["lost"]
        # the stripe connection dies and comes back, losing the chunk it was sending
        rpc.reconnect_stripe(1)
        rpc.links.drop_out = 1
        started = time.monotonic()
        # the next push's chunk on that connection shows the loss: both are sent again
        # (the second one was refused out of order behind the first), neither applied twice
        ts = [t.push_span(0, v), t.push_span(0, v)]
        for x in ts:
            kv.wait(x)  # acked only once applied
        assert rpc.links.drop_out == 0 and time.monotonic() - started < STRIPE_WAIT
        assert server_stripes(cluster)["lost"] == before + 1
        # a reply's chunk lost on its way back: that pull is asked again
        rpc.links.drop_in = 1
        ts = [t.pull_async(np.arange(N, dtype=np.uint64)), t.pull_async(np.arange(N, dtype=np.uint64))]
        for x in ts:
            np.testing.assert_array_equal(kv.wait(x), 3 * v)  # every push, each once
        assert rpc.links.drop_in == 0 and rpc.assembler.lost == 1
        # and a lost chunk nothing follows: given up after STRIPE_WAIT
        rpc.links.drop_out = 1
        started = time.monotonic()
        kv.wait(t.push_span(0, v))
        assert time.monotonic() - started >= STRIPE_WAIT * 0.9
        np.testing.assert_array_equal(t.pull_span(0, N), 4 * v)
        assert server_stripes(cluster)["lost"] == before + 2
    finally:
        kv.close()


def test_a_stripe_connection_back_before_its_old_one_is_gone_carries_on(cluster):
    """A stripe connection that comes back keeps its routing id; the server may see the
    new connection before the old one's close (a busy machine, a half-open TCP
    connection). A ROUTER ignores a connection whose routing id it still holds, for
    good: every chunk on that stripe was lost, each striped push given up after
    STRIPE_WAIT and sent again into the same hole until its request timed out. The
    server's ROUTER hands the routing id over to the new connection instead."""
    from zmq.utils.monitor import recv_monitor_message
    kv = connect(cluster, 2)
    try:
        t = kv.table("handover", updater="sum")
        v = np.ones((N, 1), np.float32)
        kv.wait(t.push_span(0, v))
        rpc = rpc_of(kv)
        links = rpc.links
        new = links._context(links.connections - 1).socket(zmq.DEALER)
        new.setsockopt(zmq.ROUTING_ID, stripe_route(links.token, 1))
        links._configure(new)
        watch = new.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        new.connect(links.address)
        try:  # the new connection is up while the old one still is
            assert watch.poll(10_000), "the new stripe connection never finished its handshake"
            recv_monitor_message(watch)
        finally:
            new.disable_monitor()
            watch.close(0)
        rpc._unwatch_stripes()
        links.socks[0], old = new, links.socks[0]
        old.close(0)
        rpc._watch_stripes()
        before = server_stripes(cluster)
        started = time.monotonic()
        for _ in range(2):
            kv.wait(t.push_span(0, v))
        assert time.monotonic() - started < STRIPE_WAIT, "a striped push waited for its lost chunks"
        after = server_stripes(cluster)
        assert after["lost"] == before["lost"] and after["assembled"] >= before["assembled"] + 2
        np.testing.assert_array_equal(t.pull_span(0, N), 3 * v)
    finally:
        kv.close()


@pytest.mark.parametrize("case", ["no key", "unlisted key"])
def test_a_peer_without_a_listed_key_cannot_feed_a_stripe(cluster, tmp_path, case):
    kv = connect(cluster, 2)
    try:
        t = kv.table("guarded_" + case.replace(" ", "_"), updater="sum")
        v = np.ones((N, 1), np.float32)
        kv.wait(t.push_span(0, v))
        token = rpc_of(kv).links.token
        before = server_stripes(cluster)
        # a stranger takes the second stripe's routing id and sends a whole striped push,
        # chunks and carrier, under the client's own group
        dealer = RawDealer(kv.aio.ring.addresses[owners_of(kv)[0]], curve=stranger_keys(tmp_path, cluster, case))
        dealer.sock.close(0)
        dealer.sock = zmq.Context.instance().socket(zmq.DEALER)
        dealer.sock.setsockopt(zmq.LINGER, 0)
        dealer.sock.setsockopt(zmq.ROUTING_ID, stripe_route(token, 1))
        if dealer.curve is not None:
            from psd.transport import security
            security.apply_client(dealer.sock, dealer.curve)
        dealer.sock.connect(dealer.address)
        try:
            push = encode(Message("push", id=99, sender=kv.node_id, table=t.name, meta={"rid": 1 << 40, "spans": [[0, N]]},
                                  arrays=[np.full((N, 1), 1000, np.float32)]))
            sends, carrier = cut(push, token, 1 << 50, 2)
            for frames in [*(chunk for _, chunk in sends), carrier]:
                try:  # (a refused connection has no pipe to queue on: a send may find none)
                    dealer.sock.send_multipart([bytes(f) for f in frames], zmq.NOBLOCK)
                except zmq.Again:
                    pass
            assert dealer.recv_frames(timeout=0.5) is None
        finally:
            dealer.close()
        after = server_stripes(cluster)
        assert after["assembled"] == before["assembled"] and after["dropped_chunks"] == before["dropped_chunks"]
        # nothing applied, and the client's own stripe still carries its traffic
        kv.wait(t.push_span(0, v))
        np.testing.assert_array_equal(t.pull_span(0, N), 2 * v)
        assert server_stripes(cluster)["assembled"] > after["assembled"]
    finally:
        kv.close()

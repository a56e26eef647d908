"""The server's small-pull fast path (psd/roles/fast_pull.py) against its general path.

Two in-process servers with the same tables and ring, each behind a real ROUTER socket
on loopback: one answers with the fast path on, one with it off. Every request, well
formed or not, goes to both, and the replies must be the same bytes; the fast one must
have taken every request it is meant for (or the comparison would prove nothing).
"""
from __future__ import annotations

import asyncio
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.codec import Message, encode
from psd.config import ClusterConfig, ClusterLimits
from psd.roles.fast_pull import FastPull
from psd.roles.server import Server
from psd.store.table import SMALL_PULL, TableSpec
from psd.transport.rpc import RpcSocket

MID = 1 << 63
TABLES = {"f32": (1, "float32"), "f64": (3, "float64"), "i32": (2, "int32"), "i64": (1, "int64")}
STORED = np.array([0, 1, 2, 5, 9, 1000, MID - 1, MID, MID + 7, KEY_SPACE_END - 1], dtype=np.uint64)


class Counted(FastPull):
    def __init__(self, server):
        super().__init__(server)
        self.taken = 0

    def __call__(self, route, frames) -> bool:
        took = super().__call__(route, frames)
        self.taken += took
        return took


def _server(ctx: zmq.Context, fast: bool, loop, config: ClusterConfig) -> tuple[Server, zmq.Socket, Counted | None]:
    s = Server(config, curve=None)
    s.core.node_id = "S1"
    # S1 leads the lower half and is only a replica of the upper half
    s.core.ring = Assignment(version=3, ranges=(Range(0, MID), Range(MID, KEY_SPACE_END)),
                        owners=(("S1", "S2"), ("S2", "S1")))
    for name, (width, dtype) in TABLES.items():
        s.core._create(TableSpec(name, width, dtype))
        t = s.core.tables[name]
        t.push(STORED, (np.arange(STORED.size * width).reshape(-1, width) + 1).astype(dtype))
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    fastpath = Counted(s) if fast else None
    s.data = RpcSocket(router, "S1", router=True, handler=s.handle, fast=fastpath, loop=loop,
                       limits=config.limits, compression=config.compression)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return s, dealer, fastpath


def _confirm(server: Server) -> None:
    """The scheduler's word that the server is a member, unless the test took it away."""
    if not getattr(server, "lapsed", False):
        server.core.fence.confirmed(time.monotonic())


def _send(server: Server, dealer: zmq.Socket, frames: list) -> None:
    dealer.send_multipart(frames)
    time.sleep(0.002)
    _confirm(server)  # (no heartbeat loop here to say we are a member)
    server.data.drain()


def _replies(server: Server, dealer: zmq.Socket, count: int, timeout: float = 5.0) -> list[list[bytes]]:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < count:
        _confirm(server)
        server.data.drain()
        if dealer.poll(1):
            out.append(dealer.recv_multipart())
        assert time.monotonic() < deadline, f"{len(out)} of {count} replies"
    return out


def _ask(server: Server, dealer: zmq.Socket, frames: list) -> list[bytes]:
    _send(server, dealer, frames)
    return _replies(server, dealer, 1)[0]


def _pull(table: str, keys: np.ndarray, *, id_: int = 7, meta: dict | None = None, clock: int = 0) -> list:
    msg = Message("pull", id=id_, sender="W9", table=table, ring=3, clock=clock,
                  meta={"rid": 11} if meta is None else meta, arrays=[keys])
    return [bytes(f) if not isinstance(f, bytes) else f for f in encode(msg)]


class Pair:
    """The same server twice, one with the fast path and one without."""

    def __init__(self, config: ClusterConfig):
        self.loop = asyncio.new_event_loop()
        self.ctx = zmq.Context()
        self.fast, self.fast_dealer, self.fastpath = _server(self.ctx, True, self.loop, config)
        self.gen, self.gen_dealer, _ = _server(self.ctx, False, self.loop, config)
        self.sides = ((self.fast, self.fast_dealer), (self.gen, self.gen_dealer))

    def both(self, frames: list) -> tuple[list[bytes], list[bytes]]:
        a, b = (_ask(s, d, frames) for s, d in self.sides)
        return a, b

    def send(self, frames: list) -> None:
        for s, d in self.sides:
            _send(s, d, frames)

    def replies(self, count: int) -> tuple[list, list]:
        a, b = (_replies(s, d, count) for s, d in self.sides)
        return a, b

    def silent(self) -> bool:
        """No reply is waiting on either side (after letting both servers read)."""
        for s, _ in self.sides:
            _confirm(s)
            s.data.drain()
        return not any(d.poll(50) for _, d in self.sides)

    def close(self) -> None:
        for sock in (self.fast_dealer, self.gen_dealer):
            sock.close(0)
        self.fast.data.close()
        self.gen.data.close()
        self.ctx.term()
        self.loop.close()


@pytest.fixture
def pairs():
    made = []

    def make(**settings) -> Pair:
        made.append(Pair(ClusterConfig(security="none", **settings)))
        return made[-1]

    try:
        yield make
    finally:
        for p in made:
            p.close()


@pytest.fixture
def pair(pairs):
    p = pairs()
    return p.both, p.fastpath, p.fast, p.gen


def _same(a: list[bytes], b: list[bytes]) -> None:
    assert a == b, ([msgpack.unpackb(a[0]), *a[1:]], [msgpack.unpackb(b[0]), *b[1:]])


def test_small_pulls_are_answered_by_the_fast_path_with_the_general_paths_bytes(pair):
    both, fastpath, fast_srv, gen_srv = pair
    requests = [
        ("f32", [0, 1, 2]),                    # stored, in a row
        ("f64", [3, 5, 1000]),                 # one absent
        ("i32", [4, 6, 8, 10]),                # none stored
        ("i64", [MID - 1]),                    # last key of the range this server leads
        ("f32", list(range(0, SMALL_PULL * 7, 7))[:SMALL_PULL - 1]),  # the largest it takes
    ]
    for i, (table, keys) in enumerate(requests):
        a, b = both(_pull(table, np.array(keys, dtype=np.uint64), id_=100 + i))
        _same(a, b)
        assert msgpack.unpackb(a[0])["op"] == "ok"
    assert fastpath.taken == len(requests)
    for key in ("pull", "keys_pulled", "errors"):
        assert fast_srv.core.counters[key] == gen_srv.core.counters[key], key
    assert fast_srv.timings.counts() == gen_srv.timings.counts()


def test_everything_else_is_left_to_the_general_path(pair):
    both, fastpath, *_ = pair
    k = np.array([1, 2, 3], dtype=np.uint64)
    cases = [
        _pull("nope", k),                                            # unknown table
        _pull("f32", np.array([3, 2], dtype=np.uint64)),             # unsorted
        _pull("f32", np.array([2, 2], dtype=np.uint64)),             # duplicate
        _pull("f32", np.array([MID + 7], dtype=np.uint64)),          # a range S1 does not lead
        _pull("f32", np.array([5, MID + 7], dtype=np.uint64)),       # two ranges
        _pull("f32", k, meta={"spans": [[0, 3]]}),                   # spans and keys
        _pull("f32", k)[:1],                                         # no keys frame
        _pull("f32", k) + [b"x"],                                    # a frame too many
        [msgpack.packb({"v": 1, "op": "pull", "id": True, "src": "W9", "tbl": "f32", "ring": 3, "clk": 0,
                        "meta": {}, "frames": [["<u8", [3], "none", 24]]}), k.tobytes()],
        [msgpack.packb({"v": 1, "op": "pull", "id": 5, "src": "W9", "tbl": "f32", "ring": 3, "clk": 0,
                        "meta": {}, "frames": [["<u8", [3], "none", 32]]}), k.tobytes()],  # bytes disagree
        [msgpack.packb({"v": 1, "op": "pull", "id": 5, "src": "W9", "tbl": "f32", "ring": 3, "clk": 0,
                        "meta": {}, "frames": [["<i8", [3], "none", 24]]}), k.tobytes()],  # keys not uint64
        [b"\xc1 not msgpack", k.tobytes()],
    ]
    for frames in cases:
        a, b = both(frames)
        _same(a, b)
        assert msgpack.unpackb(a[0])["op"] == "error"
    for frames in (_pull("f32", np.arange(SMALL_PULL, dtype=np.uint64)),  # not small
                   _pull("f32", np.empty(0, dtype=np.uint64))):          # empty
        a, b = both(frames)
        _same(a, b)
        assert msgpack.unpackb(a[0])["op"] == "ok"
    assert fastpath.taken == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.sampled_from([*TABLES, "other"]),
       keys=st.lists(st.sampled_from([*STORED.tolist(), 3, 4, 77, MID - 2, MID + 1, KEY_SPACE_END - 2]),
                     max_size=12),
       keep_order=st.booleans(), clock=st.integers(0, 5))
def test_any_pull_gets_the_same_answer_either_way(pair, table, keys, keep_order, clock):
    both, fastpath, fast_srv, gen_srv = pair
    arr = np.array(keys if keep_order else sorted(set(keys)), dtype=np.uint64)
    a, b = both(_pull(table, arr, clock=clock))
    _same(a, b)
    small = table in TABLES and 0 < arr.size and (np.diff(arr.astype(object)) > 0).all() and (arr < MID).all()
    before = fastpath.taken
    a, b = both(_pull(table, arr, clock=clock))
    assert fastpath.taken - before == int(bool(small))
    assert fast_srv.core.counters == gen_srv.core.counters


def test_held_pulls_and_a_repeated_id_go_the_same_way(pairs):
    """Sequential consistency holds a pull until every worker reached its clock; a
    second pull under the id of a held one is an error; the release answers both
    servers' held pulls alike."""
    p = pairs(consistency="sequential", num_workers=2)
    k = np.array([1, 2, 5], dtype=np.uint64)
    p.send(_pull("f32", k, id_=20, clock=1))  # W9 at clock 1, W8 (below) still at 0
    assert p.silent(), "the pull should be held"
    _same(*p.both(_pull("f32", k, id_=20, clock=1)))  # the same id again: refused alike
    for worker in ("W9", "W8"):  # both reach clock 1: the pull may run
        p.send([bytes(f) for f in encode(Message("clock", id=0, sender=worker, clock=1, meta={"clock": 1}))])
    a, b = p.replies(1)
    _same(a[0], b[0])
    assert msgpack.unpackb(a[0][0])["op"] == "ok"
    assert p.fastpath.taken == 2
    assert p.fast.core.counters == p.gen.core.counters
    assert p.fast.timings.counts() == p.gen.timings.counts()


def test_a_server_whose_lease_lapsed_refuses_alike(pairs):
    """Frozen or cut off for longer than its lease, with no peer to vouch for it: it may
    have been declared dead, so it serves nothing it shares with a replica."""
    p = pairs()
    for s in (p.fast, p.gen):
        s.lapsed = True
        s.core.fence.scheduler_at = time.monotonic() - 10
    a, b = p.both(_pull("f32", np.array([1, 2], dtype=np.uint64)))
    _same(a, b)
    assert msgpack.unpackb(a[0])["meta"]["code"] == "not_owner"
    assert p.fastpath.taken == 0


def test_compressed_replies_and_small_message_limits_are_left_to_the_general_path(pairs):
    p = pairs(compression="zstd")
    _same(*p.both(_pull("f64", np.arange(0, 1000, 50, dtype=np.uint64))))  # 20 x 3 float64: not compressed
    assert p.fastpath.taken == 1
    keys = np.arange(20, dtype=np.uint64)
    for s in (p.fast, p.gen):
        s.core._create(TableSpec("wide", 64, "float32"))
        s.core.tables["wide"].push(keys, np.tile(np.arange(64, dtype=np.float32), (keys.size, 1)))
    a, b = p.both(_pull("wide", keys))  # 5 KiB that compress: the general path compresses them
    _same(a, b)
    assert msgpack.unpackb(a[0])["frames"][0][2] == "zstd"
    assert p.fastpath.taken == 1
    small = pairs(limits=ClusterLimits(max_message_bytes=120))
    a, b = small.both(_pull("i32", np.arange(10, dtype=np.uint64)))  # 80 B of keys + the header
    _same(a, b)
    assert msgpack.unpackb(a[0])["op"] == "error" and small.fastpath.taken == 0

"""Bad input, twice: through the client API (typed psd errors) and sent raw to the
daemons (an ``error`` reply whose meta.code names the problem). After every bad
request the daemon still answers, and the table is exactly what it was."""
from __future__ import annotations

import asyncio
import struct
import time

import msgpack
import numpy as np
import pytest
import zmq
import zstandard

import psd
from psd.client.aio import AsyncTable
from psd.codec import Limits, Message, decode, encode
from psd.store.table import TableSpec
from psd.transport import RpcSocket, async_context, connect_dealer

from conftest import daemon_keys, desc, header, pack, server_ranges

TOP = 2**64 - 1
NAME = "bad"
WIDTH = 2


def u64(*keys) -> np.ndarray:
    return np.array(keys, dtype=np.uint64)


@pytest.fixture(scope="module")
def seeded(cluster3, kv3):
    """Table ``bad`` (int64, width 2) with known values on every server."""
    ranges = server_ranges(cluster3)
    t = kv3.table(NAME, width=WIDTH, dtype="int64", updater="sum")
    keys = np.unique(np.concatenate([u64(0, 1, 2, TOP - 1, TOP),
                                     *[u64(r.begin, r.begin + 1, r.begin + 5, r.last) for r in ranges]]))
    values = (np.arange(keys.size * WIDTH, dtype=np.int64).reshape(-1, WIDTH) + 1) * 3
    kv3.wait(t.push(keys, values))
    np.testing.assert_array_equal(t.pull(keys), values)
    return t, keys, values, ranges


def assert_intact(seeded) -> None:
    t, keys, values, _ = seeded
    np.testing.assert_array_equal(t.pull(keys), values)
    np.testing.assert_array_equal(t.pull(u64(3, 4, TOP - 2)), np.zeros((3, WIDTH), np.int64))


# -- (a) the client refuses bad input with a typed error ------------------------------
def _i64(rows):
    return np.ones((rows, WIDTH), np.int64)


CLIENT_CASES = [
    # (what, call(table), error class, words the message must contain)
    ("unsorted keys", lambda t: t.push([9, 4], _i64(2)), psd.KeysError, ["unsorted", "position 1"]),
    ("unsorted keys (pull)", lambda t: t.pull(u64(9, 4, 12)), psd.KeysError, ["unsorted"]),
    ("duplicate keys", lambda t: t.push([4, 4], _i64(2)), psd.KeysError, ["duplicate"]),
    ("duplicate keys (pushpull)", lambda t: t.pushpull([1, 4, 4], _i64(3)), psd.KeysError, ["duplicate"]),
    ("negative keys", lambda t: t.pull([-1, 4]), psd.KeysError, ["non-negative"]),
    ("float keys", lambda t: t.pull(np.array([1.0, 2.0])), psd.KeysError, ["integers", "float64"]),
    ("2-d keys", lambda t: t.pull(np.zeros((2, 2), np.uint64)), psd.KeysError, ["1-d"]),
    ("keys out of range", lambda t: t.pull([0, 2**64]), psd.KeysError, ["2**64"]),
    ("wrong value width", lambda t: t.push([1, 4], np.ones((2, 3), np.int64)), psd.ValuesError,
     ["shape", "(2, 2)", "(2, 3)"]),
    ("wrong value count", lambda t: t.push([1, 4, 9], _i64(2)), psd.ValuesError, ["shape", "(3, 2)"]),
    ("1-d values, width 2", lambda t: t.push([1, 4], np.ones(2, np.int64)), psd.ValuesError, ["shape"]),
    ("wrong value dtype", lambda t: t.push([1, 4], np.ones((2, 2))), psd.ValuesError, ["int64", "float64"]),
    ("wrong value dtype (span)", lambda t: t.push_span(7, np.ones((2, 2), np.int32)), psd.ValuesError,
     ["int32"]),
    ("0-d span values", lambda t: t.push_span(7, np.int64(1)), psd.ValuesError, ["shape"]),
    ("span past the end", lambda t: t.pull_span(TOP, 2), psd.KeysError, ["key space"]),
]


@pytest.mark.parametrize("what,call,cls,words", CLIENT_CASES, ids=[c[0] for c in CLIENT_CASES])
def test_client_rejects(seeded, what, call, cls, words):
    t = seeded[0]
    with pytest.raises(cls) as e:
        call(t)
    assert isinstance(e.value, psd.BadRequestError)
    for w in words:
        assert w in str(e.value), f"{what}: {w!r} not in {e.value}"
    assert_intact(seeded)


def test_client_unknown_table_is_reported_by_the_servers(kv3, seeded):
    ghost = psd.Table(kv3, AsyncTable(kv3.aio, TableSpec("ghost", WIDTH, "int64")))
    ts = ghost.push(u64(1, 2**63, TOP), _i64(3))
    with pytest.raises(psd.UnknownTableError, match="'ghost'") as e:
        kv3.wait(ts)
    assert e.value.node and e.value.node.startswith("S")  # the server found it
    with pytest.raises(psd.UnknownTableError, match="'ghost'"):
        ghost.pull(u64(1, TOP))
    with pytest.raises(psd.UnknownTableError):
        ghost.pull_span(2**63 - 1, 2)
    assert_intact(seeded)


def test_client_unknown_updater(kv3, seeded):
    with pytest.raises(psd.UnknownUpdaterError, match="'sun'") as e:
        kv3.table("typo", width=1, dtype="float32", updater="sun")
    assert "known: " in str(e.value) and "sum" in str(e.value)
    with pytest.raises(psd.BadRequestError, match="dtype"):
        kv3.table("typo", width=1, dtype="float16")
    with pytest.raises(psd.BadRequestError, match="width"):
        kv3.table("typo", width=0, dtype="float32")
    assert_intact(seeded)


# -- (b) the server daemon rejects the same things sent raw ---------------------------------
def _push(table, keys, values, **meta_extra) -> list:
    return encode(Message("push", id=4242, sender="raw", table=table, meta=meta_extra, arrays=[keys, values]))


def _mid(seeded):
    """A range led by S1 and keys inside it."""
    r = next(r for r in seeded[3] if r.node == "S1")
    return r, r.begin + 10, r.begin + 20, r.begin + 30


def _elsewhere(seeded, r) -> int:
    """A key led by another server than ``r``'s, above ``r``."""
    return next((x.begin for x in seeded[3] if x.node != r.node and x.begin > r.last), None) or \
        next(x.begin for x in seeded[3] if x.node != r.node)


def _forged_zstd_frame(content_size: int) -> bytes:
    block = (1 | (0 << 1) | (4 << 3)).to_bytes(3, "little") + b"abcd"  # last raw block of 4 bytes
    return bytes.fromhex("28b52ffd") + bytes([0xE0]) + struct.pack("<Q", content_size) + block


def _raw_cases(seeded):
    r, a, b, c = _mid(seeded)
    first = seeded[3][0]
    last = seeded[3][-1]
    other = _elsewhere(seeded, r)
    k3 = u64(a, b, c)
    v3 = np.ones((3, WIDTH), np.int64)
    h = lambda op, **kw: header(op, **({"id": 77, "table": NAME} | kw))  # noqa: E731
    keys_bytes = k3.tobytes()
    vals = v3
    zstd_vals = zstandard.ZstdCompressor().compress(np.zeros((600, WIDTH), np.int64).tobytes())
    return [
        # (name, server address, frames, code, words in the message)
        ("unsorted keys", r, _push(NAME, u64(c, a, b), v3), "bad_keys", ["unsorted"]),
        ("duplicate keys", r, _push(NAME, u64(a, b, b), v3), "bad_keys", ["duplicate"]),
        ("unsorted keys (pull)", r, encode(Message("pull", id=5, table=NAME, arrays=[u64(c, a)])),
         "bad_keys", ["unsorted"]),
        ("duplicate keys (pushpull)", r, encode(Message("pushpull", id=5, table=NAME,
                                                        arrays=[u64(a, a), np.ones((2, 2), np.int64)])),
         "bad_keys", ["duplicate"]),
        ("int64 keys", r, _push(NAME, k3.astype(np.int64), v3), "bad_keys", ["uint64"]),
        ("2-d keys", r, _push(NAME, k3.reshape(3, 1), v3), "bad_keys", ["1-d"]),
        ("values of wrong width", r, _push(NAME, k3, np.ones((3, 3), np.int64)), "bad_values", ["shape"]),
        ("values of wrong count", r, _push(NAME, k3, np.ones((2, 2), np.int64)), "bad_values", ["(3, 2)"]),
        ("values of wrong dtype", r, _push(NAME, k3, v3.astype(np.float64)), "bad_values", ["float64"]),
        ("values of wrong dtype (int32)", r, _push(NAME, k3, v3.astype(np.int32)), "bad_values", ["int32"]),
        ("unknown table", r, _push("nope", k3, v3), "unknown_table", ["'nope'"]),
        ("once not a pair", r, encode(Message("push", id=5, table=NAME, meta={"rid": 9, "once": ["J1/0"]},
                                              arrays=[k3, v3])), "protocol", ["meta.once"]),
        ("once with a negative step", r, encode(Message("push", id=5, table=NAME, meta={"rid": 9, "once": ["J1/0", -1]},
                                                        arrays=[k3, v3])), "protocol", ["meta.once"]),
        ("no table", r, _push(None, k3, v3), "unknown_table", ["None"]),
        ("keys of another server", r, _push(NAME, u64(other, other + 1), np.ones((2, 2), np.int64)),
         "not_owner", ["does not"]),
        ("keys straddling two servers", r, _push(NAME, u64(a, other), np.ones((2, 2), np.int64)),
         "not_owner", ["does not"]),
        ("span past the end", last, encode(Message("push", id=6, table=NAME, meta={"spans": [[TOP, 2]]},
                                                   arrays=[np.ones((2, 2), np.int64)])),
         "bad_keys", ["past the end"]),
        ("malformed span", r, encode(Message("pull", id=6, table=NAME, meta={"spans": [[a]]})),
         "protocol", ["span"]),
        ("negative span", r, encode(Message("pull", id=6, table=NAME, meta={"spans": [[a, -1]]})),
         "protocol", ["span"]),
        ("spans not a list", r, encode(Message("pull", id=6, table=NAME, meta={"spans": "all"})),
         "protocol", ["span"]),
        ("overlapping spans", r, encode(Message("pull", id=6, table=NAME, meta={"spans": [[a, 5], [a + 2, 5]]})),
         "bad_keys", ["overlap"]),
        ("huge span", r, encode(Message("pull", id=6, table=NAME, meta={"spans": [[a, 2**40]]})),
         "too_large", ["span"]),
        ("span values of wrong count", r, encode(Message("push", id=6, table=NAME, meta={"spans": [[a, 3]]},
                                                         arrays=[np.ones((2, 2), np.int64)])),
         "bad_values", ["(3, 2)"]),
        ("span and keys", r, _push(NAME, k3, v3, spans=[[a, 3]]), "protocol", ["payload frame"]),
        ("push without values", r, encode(Message("push", id=8, table=NAME, arrays=[k3])),
         "protocol", ["payload frame"]),
        ("keys frame shorter than its header", r,
         [pack(h("push", frames=[desc(k3), desc(vals)])), keys_bytes[:-8], vals.tobytes()],
         "protocol", ["bytes"]),
        ("keys frame longer than its header", r,
         [pack(h("push", frames=[desc(k3), desc(vals)])), keys_bytes + b"\0" * 8, vals.tobytes()],
         "protocol", ["bytes"]),
        ("values frame shorter than its header", r,
         [pack(h("push", frames=[desc(k3), desc(vals)])), keys_bytes, vals.tobytes()[:-1]],
         "protocol", ["bytes"]),
        ("declared byte count disagrees with shape", r,
         [pack(h("push", frames=[desc(k3), ["<i8", [3, 2], "none", 47]])), keys_bytes, vals.tobytes()],
         "protocol", ["declared"]),
        ("fewer frames than described", r,
         [pack(h("push", frames=[desc(k3), desc(vals)])), keys_bytes], "protocol", ["payload frames"]),
        ("more frames than described", r,
         [pack(h("push", frames=[desc(k3)])), keys_bytes, vals.tobytes()], "protocol", ["payload frames"]),
        ("header is not msgpack", r, [b"\xc1" + bytes(range(200, 256)), keys_bytes], "protocol", ["msgpack"]),
        ("header is truncated msgpack", r, [pack(h("pull"))[:-3]], "protocol", ["msgpack"]),
        ("header is an empty frame", r, [b""], "protocol", ["msgpack"]),
        ("header is a msgpack list", r, [msgpack.packb([1, "push", 2])], "protocol", ["map"]),
        ("header is a msgpack int", r, [msgpack.packb(7)], "protocol", ["map"]),
        ("unknown op", r, encode(Message("frobnicate", id=9, table=NAME)), "protocol", ["'frobnicate'"]),
        ("create_table on the data socket", r,
         encode(Message("create_table", id=9, meta={"spec": {"name": "x", "width": 1, "dtype": "int64"}})),
         "protocol", ["'create_table'"]),
        ("wrong protocol version", r, [pack(h("pull", v=99, frames=[desc(k3)])), keys_bytes],
         "protocol", ["version 99"]),
        ("no protocol version", r, [pack({k: v for k, v in h("ping").items() if k != "v"})],
         "protocol", ["version"]),
        ("id is a string", r, [pack(h("ping", id="seven"))], "protocol", ["'id'"]),
        ("meta is a list", r, [pack(h("ping", meta=[1]))], "protocol", ["'meta'"]),
        ("op is missing", r, [pack({k: v for k, v in h("ping").items() if k != "op"})], "protocol", ["'op'"]),
        ("dtype not allowed", r, [pack(h("pull", frames=[["<c8", [3], "none", 24]])), b"\0" * 24],
         "protocol", ["dtype"]),
        ("3-d shape", r, [pack(h("pull", frames=[["<u8", [1, 1, 3], "none", 24]])), keys_bytes],
         "protocol", ["shape"]),
        ("unknown codec", r, [pack(h("pull", frames=[["<u8", [3], "lz4", 24]])), keys_bytes],
         "protocol", ["codec"]),
        ("corrupt zstd", r, [pack(h("push", frames=[desc(k3), ["<i8", [600, 2], "zstd", 9600]])),
                             keys_bytes, zstd_vals[:-5]], "protocol", ["zstd"]),
        ("zstd frame claiming 16 TiB", r, [pack(h("push", frames=[desc(k3), ["<i8", [3, 2], "zstd", 48]])),
                                          keys_bytes, _forged_zstd_frame(2**44)], "protocol", ["zstd"]),
        ("empty array of absurd width", r, [pack(h("pull", frames=[["<u8", [0, 2**62], "none", 0]])), b""],
         "too_large", ["limits"]),
        ("too many frames", r, [pack(h("pull"))] + [b""] * 20, "too_large", ["frames"]),
        ("first server: unsorted", first, _push(NAME, u64(5, 3), np.ones((2, 2), np.int64)), "bad_keys",
         ["unsorted"]),
    ]


class _NameOnly:  # stands in for a ServerRange when only the case names are wanted
    def __init__(self, node):
        self.node, self.begin, self.last, self.address = node, 0, 1, ""


RAW_NAMES = [c[0] for c in _raw_cases((None, None, None, [_NameOnly("S1"), _NameOnly("S0")]))]


@pytest.mark.parametrize("case", RAW_NAMES)
def test_server_rejects_raw(seeded, raw_dealer, case):
    name, r, frames, code, words = next(c for c in _raw_cases(seeded) if c[0] == case)
    d = raw_dealer(r.address)
    reply = d.exchange(frames)
    assert reply.op == "error", f"{name}: {reply}"
    assert reply.meta["code"] == code, f"{name}: {reply.meta}"
    for w in words:
        assert w in reply.meta["message"], f"{name}: {w!r} not in {reply.meta['message']!r}"
    assert reply.sender.startswith("S")
    head = _readable_id(frames[0])
    assert reply.id == (head if head is not None else 0)
    d.ping()  # the same connection still gets answers
    assert_intact(seeded)


def _readable_id(head: bytes):
    try:
        h = msgpack.unpackb(head)
    except Exception:
        return None
    return h.get("id") if isinstance(h, dict) and isinstance(h.get("id"), int) else None


def test_server_never_answers_a_reply(seeded, raw_dealer):
    """An unsolicited ok/error is dropped: answering it could make two peers echo forever."""
    r, *_ = _mid(seeded)
    d = raw_dealer(r.address)
    d.send_frames(encode(Message("ok", id=3, sender="raw")))
    d.send_frames(encode(Message("error", id=4, sender="raw", meta={"code": "x"})))
    d.send_frames([pack(header("ok", v=99))])  # undecodable, but a reply: still no answer
    assert d.recv_frames(timeout=0.5) is None
    d.ping()
    assert_intact(seeded)


def test_server_answers_edge_requests(seeded, raw_dealer):
    """Valid but unusual requests: empty key lists and spans get an empty (0, width) answer."""
    r, a, b, c = _mid(seeded)
    d = raw_dealer(r.address)
    empty = np.empty(0, np.uint64)
    for msg in (Message("pull", table=NAME, arrays=[empty]),
                Message("pushpull", table=NAME, arrays=[empty, np.empty((0, WIDTH), np.int64)]),
                Message("pull", table=NAME, meta={"spans": [[a, 0]]})):
        reply = d.request(msg)
        assert reply.op == "ok", reply.meta
        assert reply.arrays[0].shape == (0, WIDTH) and reply.arrays[0].dtype == np.int64
    reply = d.request(Message("push", table=NAME, arrays=[empty, np.empty((0, WIDTH), np.int64)]))
    assert reply.op == "ok", reply.meta
    status = d.request(Message("status"))
    assert status.op == "ok" and status.meta["counters"]["errors"] >= 0
    assert_intact(seeded)


def test_scheduler_rejects_raw_table_specs(cluster3, seeded, raw_dealer):
    d = raw_dealer(cluster3.scheduler)
    cases = [
        ({"name": "u", "width": 1, "dtype": "float32", "updater": "nope"}, "unknown_updater", "'nope'"),
        ({"name": NAME, "width": 3, "dtype": "int64", "updater": "sum"}, "table_mismatch", "width=2"),
        ({"name": "u", "width": 1, "dtype": "complex64"}, "bad_request", "dtype"),
        ({"name": "u", "width": -1, "dtype": "float32"}, "bad_request", "width"),
        ({"name": "u", "dtype": "float32"}, "bad_request", "'width'"),
        ("not a map", "bad_request", "map"),
    ]
    for spec, code, word in cases:
        reply = d.request(Message("create_table", meta={"spec": spec}))
        assert reply.op == "error" and reply.meta["code"] == code, (spec, reply.meta)
        assert word in reply.meta["message"], (spec, reply.meta)
    reply = d.exchange([b"\x93\x01\x02"])  # a msgpack list, not a header map
    assert reply.op == "error" and reply.meta["code"] == "protocol"
    assert d.request(Message("ping")).op == "ok"
    assert "u" not in cluster3.status()["tables"]
    assert_intact(seeded)


def test_a_rejected_register_leaves_no_node_behind(cluster3, seeded, raw_dealer):
    before = {n["id"] for n in cluster3.status()["nodes"]}
    d = raw_dealer(cluster3.scheduler, curve=daemon_keys())  # a client key may not register a server
    reply = d.request(Message("register", meta={"role": "server"}))  # no address
    assert reply.op == "error" and reply.meta["code"] == "bad_request" and "address" in reply.meta["message"]
    assert {n["id"] for n in cluster3.status()["nodes"]} == before


# -- size limits -----------------------------------------------------------------------------
LIMIT = 1 << 20


@pytest.fixture(scope="module")
def small():
    """A one-server cluster whose messages may be at most 1 MiB, with a seeded table."""
    with psd.LocalCluster(servers=1, limits={"max_message_bytes": LIMIT}) as cluster:
        kv = psd.connect(cluster)
        try:
            t = kv.table("lim", width=4, dtype="float64")
            keys = u64(0, 7, 2**63, TOP)
            values = np.arange(16, dtype=np.float64).reshape(4, 4)
            kv.wait(t.push(keys, values))
            yield cluster, kv, t, keys, values
        finally:
            kv.close()


def _small_intact(small) -> None:
    _, _, t, keys, values = small
    np.testing.assert_array_equal(t.pull(keys), values)


def test_server_rejects_a_message_over_the_limit(small, raw_dealer):
    cluster, _, _, _, _ = small
    [address] = [n["address"] for n in cluster.status()["nodes"] if n["role"] == "server"]
    d = raw_dealer(address)
    n = 40_000  # 40k keys and 40k x 4 float64 values: 1.6 MB
    keys = np.arange(1000, 1000 + n, dtype=np.uint64)
    frames = encode(Message("push", id=99, table="lim", arrays=[keys, np.ones((n, 4))]))
    assert LIMIT < sum(memoryview(f).nbytes for f in frames) < 2 * LIMIT
    reply = d.exchange(frames)
    assert reply.op == "error" and reply.meta["code"] == "too_large", reply.meta
    assert str(LIMIT) in reply.meta["message"]
    assert reply.id == 99
    d.ping()
    _small_intact(small)
    np.testing.assert_array_equal(small[2].pull(keys[:5]), np.zeros((5, 4)))  # nothing applied


def test_server_drops_a_frame_far_over_the_limit(small, raw_dealer):
    """Past twice the limit ZeroMQ cuts the connection before the frame is buffered."""
    cluster, _, _, _, _ = small
    [address] = [n["address"] for n in cluster.status()["nodes"] if n["role"] == "server"]
    d = raw_dealer(address)
    d.send_frames([pack(header("ping", id=5)), b"\0" * (3 * LIMIT)])
    assert d.recv_frames(timeout=1.0) is None
    assert cluster.servers[0].proc.poll() is None
    raw_dealer(address).ping()
    _small_intact(small)


def test_client_refuses_oversize_requests(small):
    _, kv, t, _, _ = small
    n = 40_000  # 320 kB of keys + 1.28 MB of values
    keys = np.arange(n, dtype=np.uint64)
    with pytest.raises(psd.MessageTooLargeError, match="max_message_bytes") as e:
        t.push(keys, np.ones((n, 4)))
    assert isinstance(e.value, psd.ProtocolError)
    with pytest.raises(psd.MessageTooLargeError):
        t.pushpull(keys, np.ones((n, 4)))
    with pytest.raises(psd.MessageTooLargeError):
        t.push_span(0, np.ones((n, 4)))
    with pytest.raises(psd.MessageTooLargeError):
        t.pull_span(0, 2**28)  # more keys than limits.max_keys
    # a pull whose answer would be over the limit is refused by the server, at once
    with pytest.raises(psd.MessageTooLargeError, match="reply"):
        t.pull(keys)
    _small_intact(small)
    fresh = keys[:10] + np.uint64(5_000_000)
    kv.wait(t.push(fresh, np.ones((10, 4))))  # the worker still works
    np.testing.assert_array_equal(t.pull(fresh[8:] + np.uint64(1))[:, 0], [1.0, 0.0])


# -- the client side of the wire ----------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("answer", ["too large", "bad version"])
async def test_an_undecodable_reply_fails_its_request_at_once(answer):
    """A reply the client cannot decode fails the request it answers (typed, at once),
    instead of leaving it to time out."""
    ctx = async_context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    rpc = RpcSocket(connect_dealer(ctx, f"tcp://127.0.0.1:{port}", security=None), "W-test",  # a plaintext fake
                    limits=Limits(max_message_bytes=1 << 16))
    serve = asyncio.create_task(rpc.serve())
    try:
        call = asyncio.create_task(rpc.call(Message("ping"), timeout=20))
        route, *frames = await asyncio.wait_for(router.recv_multipart(), 5)
        req = decode(frames)
        if answer == "too large":
            reply = encode(Message("ok", id=req.id, sender="S9", arrays=[np.zeros(20_000)]))
            cls = psd.MessageTooLargeError
        else:
            reply = [pack(header("ok", id=req.id, v=99))]
            cls = psd.ProtocolError
        t0 = time.monotonic()
        await router.send_multipart([route, *reply])
        with pytest.raises(cls):
            await asyncio.wait_for(call, 5)
        assert time.monotonic() - t0 < 2.0
        assert not rpc.pending
    finally:
        serve.cancel()
        await asyncio.gather(serve, return_exceptions=True)
        rpc.sock.close(0)
        router.close(0)

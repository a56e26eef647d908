"""Key caching (issue 17): a worker sends a key list whole once, then by its signature.

Unit tests of the server's cache (LRU bounds, collisions refused, stale and forged
references refused), raw requests to a real server (a signature it does not hold is
refused ``keys_unknown``, nothing applied, and the refusal breaks the sender's stream),
the byte counts per stage, and real clusters whose tables come out bit-identical with
and without key caching across a server SIGKILL and a live join.
"""
from __future__ import annotations

import numpy as np
import pytest

import psd
from psd.codec import Message
from psd.codec.signature import KC_MIN_KEYS, key_ref, signature
from psd.codec.traffic import Traffic, saved
from psd.codec import encode
from psd.core import keycache as keycache_mod
from psd.core.keycache import KeyCache
from psd.errors import KeysUnknownError, ProtocolError

from conftest import server_ranges, wait_for


def keys_of(*ks) -> np.ndarray:
    return np.array(ks, dtype=np.uint64)


def span(lo: int, n: int, step: int = 1) -> np.ndarray:
    return np.arange(lo, lo + n * step, step, dtype=np.uint64)


# -- the cache --------------------------------------------------------------------------
def test_store_then_resolve_by_signature():
    c = KeyCache()
    keys = span(10, 100, 3)
    sig = c.store("W1", "t", keys)
    assert sig == signature(keys)
    got = c.resolve("W1", "t", key_ref(keys))
    np.testing.assert_array_equal(got, keys)
    assert c.stats()["hits"] == 1 and c.stats()["bytes"] == keys.nbytes


def test_kept_list_is_a_copy_of_the_senders_buffer():
    c = KeyCache()
    keys = span(0, 80)
    ref = key_ref(keys)
    c.store("W1", "t", keys)
    keys[5] = 999  # the sender's buffer changes (a received frame is reused, say)
    np.testing.assert_array_equal(c.resolve("W1", "t", ref), span(0, 80))


@pytest.mark.parametrize("who,table", [("W2", "t"), ("W1", "other")])
def test_lists_are_per_sender_and_table(who, table):
    c = KeyCache()
    keys = span(0, 70)
    c.store("W1", "t", keys)
    with pytest.raises(KeysUnknownError):
        c.resolve(who, table, key_ref(keys))


def test_forged_and_stale_references_are_refused():
    c = KeyCache()
    keys = span(100, 64)
    sig, n, first, last = key_ref(keys)
    c.store("W1", "t", keys)
    for ref in ([sig ^ 1, n, first, last],   # a signature never sent
                [sig, n + 1, first, last],   # the right signature, another length
                [sig, n, first + 1, last],   # ... another first key
                [sig, n, first, last - 1]):  # ... another last key
        with pytest.raises(KeysUnknownError) as err:
            c.resolve("W1", "t", ref)
        assert err.value.code == "keys_unknown"
    assert c.stats()["misses"] == 4 and c.stats()["hits"] == 0


@pytest.mark.parametrize("ref", [None, [1, 2, 3], [1, 0, 0, 0], [1, 2, 3, -1], [1, 2, 3, 2**64], ["a", 1, 2, 3],
                                 [True, 1, 2, 3], {"sig": 1}])
def test_malformed_reference_is_a_protocol_error(ref):
    with pytest.raises(ProtocolError):
        KeyCache().resolve("W1", "t", ref)


def test_lru_bound_by_entries_evicts_the_least_recently_used():
    c = KeyCache(max_entries=3)
    lists = [span(1000 * i, 64) for i in range(4)]
    for keys in lists[:3]:
        c.store("W1", "t", keys)
    c.resolve("W1", "t", key_ref(lists[0]))  # used: the oldest is now lists[1]
    c.store("W1", "t", lists[3])
    assert len(c) == 3 and c.stats()["evicted"] == 1
    with pytest.raises(KeysUnknownError):
        c.resolve("W1", "t", key_ref(lists[1]))
    for keys in (lists[0], lists[2], lists[3]):
        c.resolve("W1", "t", key_ref(keys))


def test_lru_bound_by_bytes():
    c = KeyCache(max_bytes=3 * 64 * 8)
    for i in range(10):
        c.store("W1", "t", span(1000 * i, 64))
        assert c.bytes <= c.max_bytes
    assert len(c) == 3
    assert c.store("W1", "t", span(0, 1000)) is None  # larger than the whole cache: not kept
    assert c.bytes <= c.max_bytes


def test_collision_poisons_the_signature(monkeypatch):
    """Two different lists with one signature: neither is answered from the cache again."""
    monkeypatch.setattr(keycache_mod, "signature", lambda keys: 42)
    c = KeyCache()
    a, b = span(0, 64), span(0, 64, 2)
    assert c.store("W1", "t", a) == 42
    assert c.store("W1", "t", b) is None  # refused: the signature is taken by another list
    assert c.stats()["collisions"] == 1
    for keys in (a, b):
        with pytest.raises(KeysUnknownError, match="collision"):
            c.resolve("W1", "t", [42, 64, int(keys[0]), int(keys[-1])])
    assert c.store("W1", "t", a) is None  # and not kept again
    assert c.bytes == 0


def test_forget_sender_and_tables():
    c = KeyCache()
    c.store("W1", "t", span(0, 64))
    c.store("W1", "u", span(0, 64))
    c.store("W2", "t", span(0, 64))
    c.forget(sender="W1")
    assert len(c) == 1
    c.forget(tables={"t"})
    assert len(c) == 0 and c.bytes == 0


# -- byte counts ----------------------------------------------------------------------
def test_traffic_counts_each_stage():
    keys, values = span(0, 1000), np.zeros((1000, 1), np.float32)
    t = Traffic()
    whole = Message("push", table="t", meta={"kcs": True}, arrays=[keys, values])
    t.count_sent(whole, encode(whole, "zstd"))
    cached = Message("push", table="t", meta={"kc": key_ref(keys)}, arrays=[values])
    frames = encode(cached, "zstd")
    t.count_sent(cached, frames)
    s = t.sent
    assert s["raw"] == 2 * (keys.nbytes + values.nbytes)  # a cached list counts as if sent whole
    assert s["after_kc"] == keys.nbytes + 2 * values.nbytes
    assert s["after_zstd"] < s["after_kc"] - values.nbytes  # zeros: zstd takes most of them
    assert s["after_zstd"] == sum(len(f) for f in frames[1:]) + sum(len(f) for f in encode(whole, "zstd")[1:])
    assert s["wire"] > s["after_zstd"] and s["messages"] == 2 and s["kc_messages"] == 1
    assert saved(s) == pytest.approx(1 - s["after_zstd"] / s["raw"])


# -- a real server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def one():
    with psd.LocalCluster(servers=1) as cluster:
        yield cluster


def _pull(d, table, keys, sender="raw-kc"):
    return d.request(Message("pull", table=table, sender=sender, arrays=[keys]))


def test_server_keeps_a_list_and_refuses_what_it_does_not_hold(one, raw_dealer):
    """Whole with ``kcs``: kept and named in the reply; by signature: applied to those
    keys; forged, stale, another sender's or table's: ``keys_unknown``, nothing applied."""
    kv = psd.connect(one)
    try:
        kv.table("kc", dtype="int64")
        kv.table("kc2", dtype="int64")
        d = raw_dealer(server_ranges(one)[0].address)
        keys = span(5, 200, 7)
        ones = np.ones((keys.size, 1), np.int64)
        reply = d.request(Message("push", table="kc", sender="raw-kc", meta={"kcs": True}, arrays=[keys, ones]))
        assert reply.op == "ok" and reply.meta["kc"] == signature(keys)
        ref = key_ref(keys)
        reply = d.request(Message("push", table="kc", sender="raw-kc", meta={"kc": ref}, arrays=[2 * ones]))
        assert reply.op == "ok", reply
        expect = 3 * ones
        np.testing.assert_array_equal(_pull(d, "kc", keys).arrays[0], expect)
        sig, n, first, last = ref
        bad = {"forged": ("raw-kc", "kc", [sig ^ 0x5A5A, n, first, last]),
               "stale length": ("raw-kc", "kc", [sig, n - 1, first, last]),
               "stale first key": ("raw-kc", "kc", [sig, n, first + 7, last]),
               "another sender": ("raw-other", "kc", ref),
               "another table": ("raw-kc", "kc2", ref)}
        for what, (sender, table, r) in bad.items():
            reply = d.request(Message("push", table=table, sender=sender, meta={"kc": r}, arrays=[5 * ones]))
            assert reply.op == "error" and reply.meta["code"] == "keys_unknown", (what, reply)
            reply = d.request(Message("pull", table=table, sender=sender, meta={"kc": r}))
            assert reply.op == "error" and reply.meta["code"] == "keys_unknown", (what, reply)
        np.testing.assert_array_equal(_pull(d, "kc", keys).arrays[0], expect)  # nothing applied
        np.testing.assert_array_equal(_pull(d, "kc2", keys).arrays[0], 0 * ones)
        # a pull by signature (no keys frame: not the fast path) answers the same values
        reply = d.request(Message("pull", table="kc", sender="raw-kc", meta={"kc": ref}))
        np.testing.assert_array_equal(reply.arrays[0], expect)
        # malformed: spans with a signature, a keys frame besides it
        reply = d.request(Message("pull", table="kc", sender="raw-kc", meta={"kc": ref, "spans": [[0, 5]]}))
        assert reply.meta["code"] == "protocol", reply
        reply = d.request(Message("push", table="kc", sender="raw-kc", meta={"kc": ref}, arrays=[keys, ones]))
        assert reply.meta["code"] == "protocol", reply
        np.testing.assert_array_equal(_pull(d, "kc", keys).arrays[0], expect)
        def counted():  # (heartbeats carry the full stats every few beats)
            server = next(n for n in one.status()["nodes"] if n["role"] == "server")
            kc = server.get("key_cache") or {}
            return kc.get("misses", 0) >= 10 and kc.get("hits", 0) >= 2 and kc.get("stored", 0) >= 1
        wait_for(counted, 10.0, "the key cache's counts in psd status")
    finally:
        kv.close()


def test_a_refused_signature_breaks_the_stream(one, raw_dealer):
    """``keys_unknown`` is a breaking refusal: what the sender sent after it on the same
    stream is refused out of order, so resending from there keeps the order."""
    kv = psd.connect(one)
    try:
        kv.table("kcs", dtype="int64")
        d = raw_dealer(server_ranges(one)[0].address)
        keys = span(0, 100)
        ones = np.ones((keys.size, 1), np.int64)
        reply = d.request(Message("push", table="kcs", sender="raw-sq", meta={"kc": key_ref(keys), "sq": [7, 0]},
                                  arrays=[ones]))
        assert reply.meta["code"] == "keys_unknown"
        reply = d.request(Message("push", table="kcs", sender="raw-sq", meta={"sq": [7, 1]}, arrays=[keys, ones]))
        assert reply.meta["code"] == "out_of_order" and reply.meta["data"]["from"] == 0, reply
        reply = d.request(Message("push", table="kcs", sender="raw-sq", meta={"sq": [8, 0]}, arrays=[keys, ones]))
        assert reply.op == "ok"
        np.testing.assert_array_equal(_pull(d, "kcs", keys).arrays[0], ones)
    finally:
        kv.close()


def test_client_recovers_from_a_list_the_server_does_not_hold(one):
    """The worker believes the server holds a list it does not (as after a restart under
    the same name): refused, sent again whole, applied once, and kept from then on."""
    kv = psd.connect(one)
    try:
        t = kv.table("kcr", dtype="int64")
        keys = span(3, 500, 5)
        ones = np.ones((keys.size, 1), np.int64)
        core = kv.aio.core
        server = next(iter(core.ring.addresses))
        sig, n, first, last = key_ref(keys)
        from collections import OrderedDict
        core.known[server] = OrderedDict({(t._t.spec.name, sig): (n, first, last)})
        kv.wait(t.push(keys, ones))
        assert core.kc_counters["refused"] == 1 and core.kc_counters["kept"] == 1
        kv.wait(t.push(keys, ones))
        np.testing.assert_array_equal(t.pull(keys), 2 * ones)
        assert core.kc_counters["by_signature"] == 3  # the refused one, the second push, the pull
    finally:
        kv.close()


def test_a_repeated_pull_sends_its_keys_once(one):
    """1e5 keys pulled ten times: the keys cross once, counted at every stage on both ends."""
    kv = psd.connect(one)
    try:
        t = kv.table("kcp", dtype="float32")
        keys = span(0, 100_000, 11)
        kv.wait(t.push(keys, np.ones((keys.size, 1), np.float32)))  # (whole: acknowledged as kept)
        before = kv.traffic()["sent"]
        server_before = _server_traffic(one)
        for _ in range(10):
            np.testing.assert_array_equal(t.pull(keys), np.ones((keys.size, 1), np.float32))
        after = kv.traffic()["sent"]
        sent = {k: after[k] - before[k] for k in after}
        assert sent["raw"] == 10 * keys.nbytes
        assert sent["after_kc"] == 0  # the push already sent the list whole: every pull names it
        assert sent["kc_messages"] == 10
        server = _server_traffic(one)
        got = {k: server["received"][k] - server_before["received"][k] for k in sent}
        assert got["raw"] == sent["raw"] and got["after_kc"] == sent["after_kc"]
        assert got["after_zstd"] == sent["after_zstd"] == 0
        assert sent["wire"] < 2000 and got["wire"] >= sent["wire"]  # (and the status request asked here)
        assert server["sent"]["raw"] - server_before["sent"]["raw"] >= 10 * keys.size * 4
    finally:
        kv.close()


def _server_traffic(cluster) -> dict:
    """The traffic of the only server, as its status says it (fresh: asked directly)."""
    from conftest import RawDealer
    d = RawDealer(server_ranges(cluster)[0].address)
    try:
        return d.request(Message("status")).meta["traffic"]
    finally:
        d.close()


def test_without_key_caching_every_request_carries_its_keys(one):
    config = one.config.replace(key_caching=False)
    kv = psd.connect(one, config)
    try:
        t = kv.table("kcoff", dtype="float32")
        keys = span(0, 1000)
        for _ in range(3):
            t.pull(keys)
        sent = kv.traffic()["sent"]
        assert sent["kc_messages"] == 0 and sent["raw"] == sent["after_kc"] == 3 * keys.nbytes
    finally:
        kv.close()


def test_small_lists_are_sent_whole():
    """Fewer than KC_MIN_KEYS keys: whole, so a small pull keeps the server's fast path."""
    from psd.core.client import ClientCore, Send
    from psd.cluster.assignment import Assignment
    from psd.cluster.rows import Rows
    from psd.schema import TableSpec
    ring = _one_server_ring()
    core = ClientCore("W1", 5.0, ring)
    spec = TableSpec("t", 1, "float32", "sum")
    _, effects = core.issue("pull", spec, Rows(keys=span(0, KC_MIN_KEYS - 1)), 0.0)
    (send,) = [e for e in effects if type(e) is Send]
    assert "kcs" not in send.msg.meta and len(send.msg.arrays) == 1
    _, effects = core.issue("pull", spec, Rows(keys=span(0, KC_MIN_KEYS)), 0.0)
    (send,) = [e for e in effects if type(e) is Send]
    assert send.msg.meta["kcs"] is True


def _one_server_ring():
    from psd.cluster.assignment import Assignment
    from psd.cluster.ranges import KEY_SPACE_END, Range
    return Assignment(version=1, ranges=(Range(0, KEY_SPACE_END),), owners=(("S1",),),
                      addresses={"S1": "tcp://127.0.0.1:1"})

"""Communication filters (issue 17): the pure filter code within its documented bounds,
bad settings refused naming the key, and real servers: a filtered table reaches the
unfiltered one (significant + flush, quantize with feedback), a quantized push survives
replication, and a push naming a filter the server does not know is refused whole.
The logistic-regression job with and without kkt: tests/test_filters_job.py."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import psd
from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.cluster.rows import Rows
from psd.codec import Message
from psd.codec.message import error_reply
from psd.core.client import ClientCore, Send
from psd.errors import ConfigError, NotReplicatedError, UnknownFilterError
from psd.filters import TableInfo, build_chain, decode_values, parse_filters
from psd.filters.lossy import dequantize, quantize
from psd.schema import TableSpec

from conftest import server_ranges

SUM = TableInfo("t", "float32", 2, "sum")
AGG = TableInfo("w", "float32", 3, "prox_l1", {"lr": 0.7, "l1": 1e-4, "aggregate": True})


def rows(seed: int, n: int = 400, width: int = 2, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 10_000, size=n, dtype=np.uint64))
    return keys, (rng.standard_normal((keys.size, width)) * scale).astype(np.float32)


# -- pure: bounds ----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), to=st.sampled_from(["int8", "float16"]), scale=st.sampled_from([1e-6, 1.0, 1e4]))
def test_quantize_one_message_within_its_bound(seed, to, scale):
    _, v = rows(seed, scale=scale)
    v = v.astype(np.float64)
    q, s = quantize(v, to)
    err = np.abs(dequantize(q, s, np.dtype(np.float64)) - v)
    bound = s / 2 if to == "int8" else np.abs(v) * 2.0**-11 + s * 2.0**-25
    assert (err <= bound * (1 + 1e-9) + 1e-300).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), to=st.sampled_from(["int8", "float16"]))
def test_quantize_feedback_keeps_the_running_sum_within_one_message(seed, to):
    """With error feedback, what the receiver added up differs from the true sum by at
    most the last message's error; a flush then makes it exact (up to rounding)."""
    chain = build_chain([{"quantize": {"to": to}}], SUM)
    keys, _ = rows(seed)
    rng = np.random.default_rng(seed + 1)
    truth = np.zeros((keys.size, 2))
    got = np.zeros((keys.size, 2))
    for _ in range(20):
        v = rng.standard_normal((keys.size, 2)).astype(np.float32)
        truth += v
        k, q, meta = chain.apply(keys, v)
        assert q.dtype == np.dtype(to) and meta["flt"] == ["quantize"]
        got += decode_values(meta, q)
        last_scale = np.asarray(meta["q"][1])
    bound = last_scale / 2 if to == "int8" else np.abs(truth).max(axis=0) * 2.0**-10 + last_scale * 2.0**-24
    assert (np.abs(got - truth) <= bound + 1e-5).all()
    k, r = chain.residual()
    got[np.searchsorted(keys, k)] += r
    np.testing.assert_allclose(got, truth, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), threshold=st.sampled_from([0.0, 0.1, 1.0, 5.0]))
def test_significant_holds_back_at_most_the_threshold(seed, threshold):
    chain = build_chain([{"significant": {"threshold": threshold}}], SUM)
    keys, _ = rows(seed)
    rng = np.random.default_rng(seed)
    truth = np.zeros((keys.size, 2))
    got = np.zeros((keys.size, 2))
    sent = 0
    for _ in range(15):
        sub = np.sort(rng.choice(keys, keys.size // 2, replace=False))
        v = (rng.standard_normal((sub.size, 2)) * 0.3).astype(np.float32)
        truth[np.searchsorted(keys, sub)] += v
        k, out, _ = chain.apply(sub, v)
        sent += k.size
        got[np.searchsorted(keys, k)] += out
        assert (np.abs(got - truth) <= threshold + 1e-5).all()
    if threshold == 0.0:
        np.testing.assert_allclose(got, truth, atol=1e-5)
    k, r = chain.residual()
    got[np.searchsorted(keys, k)] += r
    np.testing.assert_allclose(got, truth, atol=1e-5)
    if threshold >= 1.0:
        assert sent < 15 * (keys.size // 2) * 0.8  # it does leave rows out


def test_keep_keys_sends_zeros_for_what_it_holds_back():
    chain = build_chain([{"significant": {"threshold": 0.5, "keep_keys": True}}], SUM)
    keys = np.array([1, 2, 3], np.uint64)
    k, v, _ = chain.apply(keys, np.array([[0.1, 0], [0.9, 0], [0, -0.7]], np.float32))
    assert k.tolist() == [1, 2, 3]
    np.testing.assert_allclose(v, [[0, 0], [0.9, 0], [0, -0.7]], atol=1e-7)
    k, r = chain.residual()
    assert k.tolist() == [1] and r[0, 0] == pytest.approx(0.1)
    skip = build_chain([{"random_skip": {"p": 0.5, "keep_keys": True}}], SUM)
    k, v, _ = skip.apply(np.arange(1000, dtype=np.uint64), np.ones((1000, 2), np.float32))
    assert k.size == 1000 and set(np.unique(v).tolist()) == {0.0, 2.0}


def test_significant_relative_to_the_pulled_value():
    chain = build_chain([{"significant": {"threshold": 0.1, "relative": True}}], SUM)
    keys = np.array([1, 2], np.uint64)
    chain.observe(keys, np.array([[10.0, 10.0], [0.01, 0.01]]))
    k, _, _ = chain.apply(keys, np.full((2, 2), 0.5, np.float32))
    assert k.tolist() == [2]  # 0.5 is 5% of 10, 50x of 0.01
    k, v, _ = chain.apply(keys, np.full((2, 2), 0.6, np.float32))
    assert k.tolist() == [1, 2] and v[0, 0] == pytest.approx(1.1)  # 1.1 > 1: the accumulated change


def test_random_skip_is_unbiased():
    chain = build_chain([{"random_skip": {"p": 0.75, "seed": 3}}], TableInfo("t", "float64", 1, "sum"))
    keys = np.arange(200_000, dtype=np.uint64)
    k, v, _ = chain.apply(keys, np.ones((keys.size, 1)))
    assert 0.24 < k.size / keys.size < 0.26
    assert v.sum() / keys.size == pytest.approx(1.0, abs=0.01)
    assert (v == 4.0).all()


def test_kkt_pulled_skips_zero_weights_that_cannot_move_and_rechecks():
    chain = build_chain(["kkt"], AGG)  # l1 from the table, delta l1/10, at most 8 skips in a row
    kkt = chain.get("kkt")
    assert (kkt.l1, kkt.delta, kkt.pulled, kkt.recheck) == (1e-4, 1e-5, True, 8)
    keys = np.array([1, 2, 3, 4, 5, 6], np.uint64)
    pushed = np.ones((6, 3), np.float32)
    k, _, _ = chain.apply(keys, pushed)
    assert k.tolist() == [1, 2, 3, 4, 5, 6]  # nothing pulled yet: everything goes
    # rows (w, g of the last step, h): zero, g 0; zero, g over the margin; non-zero; zero but
    # never stepped (h 0); zero, g half the margin; zero, g just inside it
    chain.observe(keys, np.array([[0, 0, 1], [0, 2e-4, 1], [0.3, 0, 1], [0, 0, 0], [0, 4.5e-5, 1],
                                  [0, 8.9e-5, 1]]))
    sent = [chain.apply(keys, pushed)[0].tolist() for _ in range(18)]
    never = {2, 3, 4}
    assert all(never <= set(s) for s in sent)
    count = {key: sum(key in s for s in sent) for key in (1, 5, 6)}
    # key 1 (g 0): 8 skips, then sent: 2 of 18; key 5 (|g| = margin/2): 4 skips, sent; key 6: always
    assert count == {1: 2, 5: 3, 6: 18}
    assert sent[0] == [2, 3, 4, 6] and sent[8] == [1, 2, 3, 4, 6]
    assert kkt.unchanged(keys).tolist() == [False, False, False, False, True, False]  # sent / skipped last
    chain.apply(keys, pushed)
    assert kkt.unchanged(keys).tolist() == [True, False, False, False, True, False]


def test_kkt_pushed_uses_the_gradient_pushed():
    info = TableInfo("w", "float32", 1, "adagrad", {"lr": 0.1, "l1": 0.01})
    chain = build_chain([{"kkt": {"delta": 0.0}}], info)
    keys = np.array([1, 2, 3], np.uint64)
    chain.observe(keys, np.array([[0.0], [0.0], [0.5]]))
    k, v, _ = chain.apply(keys, np.array([[0.005], [0.05], [0.001]], np.float32))
    assert k.tolist() == [2, 3]


def test_chain_counts_bytes_after_each_filter():
    chain = build_chain([{"significant": {"threshold": 0.5}}, {"quantize": {"to": "int8"}}, "zstd"], SUM)
    keys = np.arange(100, dtype=np.uint64)
    v = np.zeros((100, 2), np.float32)
    v[:10] = 1.0
    k, q, meta = chain.apply(keys, v)
    c = chain.stats()
    assert c["raw"] == 100 * 8 + 100 * 8 and c["after_significant"] == 10 * 8 + 10 * 8
    assert c["after_quantize"] == c["out"] == 10 * 8 + 10 * 2 and k.size == 10 and chain.zstd == (1, 4096)
    assert meta["flt"] == ["significant", "quantize"] and meta["q"][0] == "int8" and meta["q"][2] == "float32"


# -- pure: settings refused, naming the key --------------------------------------------------
@pytest.mark.parametrize("entries,info,needle", [
    (["nope"], SUM, "filters[0]: unknown filter 'nope'"),
    ([{"significant": {}}], SUM, "filters[0].threshold: missing"),
    ([{"significant": {"threshold": -1}}], SUM, "filters[0].threshold: expected a number >= 0"),
    (["zstd", {"quantize": {"to": "int4"}}], SUM, "filters[1].to: expected float16 or int8"),
    ([{"quantize": {"bits": 8}}], SUM, "filters[0].bits: unknown option"),
    ([{"random_skip": {"p": 1.0}}], SUM, "filters[0].p: expected a probability"),
    ([{"zstd": {"level": 30}}], SUM, "filters[0].level"),
    (["kkt", "kkt"], AGG, "filters[1]: filter 'kkt' is listed twice"),
    ("kkt", SUM, "filters: expected a list"),
    ([{"significant": {"threshold": 1}}], AGG, "filters[0]: filter 'significant' holds rows back"),
    (["quantize"], TableInfo("c", "int64", 1, "sum"), "filters[0]: filter 'quantize' changes values"),
    (["kkt"], SUM, "filters[0].l1: missing"),
    ([{"kkt": {"l1": 0.1, "delta": 0.2}}], SUM, "filters[0].delta: expected a number below l1"),
    ([{"kkt": {"gradient": "pushed"}}], AGG, "filters[0].gradient: 'pushed'"),
    (["quantize", {"significant": {"threshold": 1}}], SUM, "filters[0]: quantize must be the last"),
    ([{"significant": {"threshold": 1, "keep_keys": True}}], TableInfo("a", "float32", 1, "adagrad", {"l1": 0.1}),
     "filters[0].keep_keys: sends zeros"),
])
def test_bad_settings_are_refused_naming_the_key(entries, info, needle):
    with pytest.raises(ConfigError) as err:
        build_chain(entries, info)
    assert needle in str(err.value)


def test_every_problem_is_listed():
    with pytest.raises(ConfigError) as err:
        parse_filters([{"significant": {"threshold": "x"}}, "what", {"kkt": {"recheck": -1}}])
    assert len(err.value.data["problems"]) == 3


@pytest.mark.parametrize("meta,arr", [
    ({"flt": ["gzip9"]}, np.zeros((2, 1), np.float32)),
    ({"flt": "quantize"}, np.zeros((2, 1), np.float32)),
    ({"flt": ["quantize"]}, np.zeros((2, 1), np.int8)),                                  # no meta.q
    ({"flt": ["quantize"], "q": ["int8", [1.0], "float32"]}, np.zeros((2, 1), np.float16)),  # frame mismatch
    ({"flt": ["quantize"], "q": ["int8", [float("nan")], "float32"]}, np.zeros((2, 1), np.int8)),
    ({"flt": ["quantize"], "q": ["int8", [1.0, 2.0, 3.0], "float32"]}, np.zeros((2, 2), np.int8)),
    ({"flt": ["kkt"], "q": ["int8", [1.0], "float32"]}, np.zeros((2, 1), np.int8)),
])
def test_receiver_refuses_what_it_cannot_read(meta, arr):
    with pytest.raises(UnknownFilterError):
        decode_values(meta, arr)


# -- real servers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two():
    with psd.LocalCluster(servers=2, replication=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def kv(two):
    kv = psd.connect(two)
    try:
        yield kv
    finally:
        kv.close()


def test_significant_and_flush_reach_the_unfiltered_table(kv):
    """Two servers, replication 2: up to the threshold before the flush, the same table
    (float rounding) after it; far fewer rows sent."""
    keys = np.arange(0, 30_000, 3, dtype=np.uint64)
    plain = kv.table("sig_plain", width=2)
    sig = kv.table("sig", width=2, filters=[{"significant": {"threshold": 0.05}}])
    rng = np.random.default_rng(5)
    for _ in range(8):
        v = (rng.standard_normal((keys.size, 2)) * 0.01).astype(np.float32)
        kv.wait(plain.push(keys, v))
        kv.wait(sig.push(keys, v))
    want = plain.pull(keys)
    before = sig.pull(keys)
    assert np.abs(before - want).max() <= 0.05 + 1e-5
    assert np.abs(before - want).max() > 0.01  # (something was held back)
    stats = kv.traffic()["filters"]["tables"]["sig"]
    assert stats["rows_out"] < 0.5 * stats["rows_in"]
    kv.flush()
    np.testing.assert_allclose(sig.pull(keys), want, atol=1e-5)
    # the same counts on the worker's Prometheus page
    from types import SimpleNamespace
    from psd.roles.metrics import worker_families
    page = "".join(f.render() for f in worker_families(SimpleNamespace(kv=kv.aio, shards_run=0, current=None)))
    assert f'psd_worker_filter_rows_total{{table="sig",kept="in"}} {stats["rows_in"]}' in page
    assert f'psd_worker_filter_bytes_total{{table="sig",stage="after_significant"}} {stats["after_significant"]}' in page


def test_quantized_pushes_are_applied_and_replicated(kv, two):
    """int8 pushes with feedback land within one message's error, on both copies (the
    primary forwards decoded rows): each server's answer for its ranges is read directly."""
    keys = np.arange(1, 40_000, 7, dtype=np.uint64)
    plain = kv.table("q_plain")
    q = kv.table("q8", filters=[{"quantize": {"to": "int8"}}, {"zstd": {"level": 3, "threshold": 0}}])
    rng = np.random.default_rng(9)
    for _ in range(6):
        v = rng.standard_normal((keys.size, 1)).astype(np.float32)
        kv.wait(plain.push(keys, v))
        kv.wait(q.push(keys, v))
    want = plain.pull(keys)
    got = q.pull(keys)
    assert np.abs(got - want).max() <= 4.5 / 127 * 0.5 + 1e-3  # |v| < 4.5 here; one message's error
    t = kv.traffic()
    f = t["filters"]["tables"]["q8"]
    assert f["raw"] == 6 * keys.size * (8 + 4)  # keys + float32 values
    assert f["after_quantize"] == 6 * keys.size * (8 + 1)  # keys + int8
    kv.flush()
    np.testing.assert_allclose(q.pull(keys), want, atol=1e-4)


def test_unknown_filter_is_refused_by_a_real_server_nothing_applied(kv, two, raw_dealer):
    t = kv.table("unk", dtype="float32")
    d = raw_dealer(server_ranges(two)[0].address)
    keys = np.array([3, 5, 8], np.uint64)
    vals = np.ones((3, 1), np.float32)
    for meta, arr in ((({"flt": ["topk"]}), vals),
                      ({"flt": ["quantize"], "q": ["int8", [1.0], "float32"]}, vals),  # frame is float32
                      ({"flt": ["quantize"], "q": ["int4", [1.0], "float32"]}, np.ones((3, 1), np.int8))):
        reply = d.request(Message("push", table="unk", sender="raw-f", meta=meta, arrays=[keys, arr]))
        assert reply.op == "error" and reply.meta["code"] == "unknown_filter", reply
    reply = d.request(Message("push", table="unk", sender="raw-f", meta={"flt": ["topk"]}, arrays=[keys, vals]))
    assert "topk" in reply.meta["message"]
    np.testing.assert_array_equal(t.pull(keys), 0 * vals)  # nothing applied
    ok = d.request(Message("push", table="unk", sender="raw-f",
                           meta={"flt": ["quantize"], "q": ["int8", [0.5], "float32"]},
                           arrays=[keys, np.full((3, 1), 4, np.int8)]))
    assert ok.op == "ok", ok  # the server still serves, and a well-formed one applies
    np.testing.assert_array_equal(t.pull(keys), 2 * vals)


def test_bad_filters_refused_before_the_table_is_made(kv, two):
    with pytest.raises(ConfigError, match=r"filters\[0\]\.threshold: missing"):
        kv.table("never_made", filters=["significant"])
    assert "never_made" not in two.status()["tables"]


def test_a_tables_zstd_stage_overrides_the_sockets_setting():
    """Level and threshold per message (Message.zstd, not on the wire); level 0: off."""
    from psd.codec import decode, encode
    vals = np.zeros((4096, 1), np.float32)
    plain = encode(Message("push", arrays=[vals]), "zstd")
    assert len(plain[1]) < 1000  # the cluster's zstd (level 1, from 4096 bytes)
    off = encode(Message("push", arrays=[vals], zstd=(0, 0)), "zstd")
    assert memoryview(off[1]).nbytes == vals.nbytes
    small = np.zeros((100, 1), np.float32)
    assert len(encode(Message("push", arrays=[small]), "zstd")[1]) == small.nbytes  # under 4096 bytes
    assert len(encode(Message("push", arrays=[small], zstd=(19, 64)), "none")[1]) < small.nbytes
    np.testing.assert_array_equal(decode(encode(Message("push", arrays=[small], zstd=(19, 64)))).arrays[0], small)
    chain = build_chain([{"zstd": {"level": 19, "threshold": 64}}], SUM)
    assert chain.zstd == (19, 64) and chain.apply(np.arange(3, dtype=np.uint64), np.ones((3, 2), np.float32))[2] == {}


def test_a_part_sent_again_keeps_its_tables_zstd_stage():
    """A resend (after ``not_replicated``, or on a new connection after a drop) is built
    anew from the part's message: it must carry the table's zstd stage as the first send
    did, not fall back to the socket's setting."""
    ring = Assignment(version=1, ranges=(Range(0, KEY_SPACE_END),), owners=(("S0",),), addresses={"S0": "tcp://S0"})
    core = ClientCore("W0", 10.0, ring)
    rows = Rows(keys=np.array([10, 20], np.uint64), values=np.ones((2, 1), np.float32), zstd=(19, 64))
    _, effects = core.issue("push", TableSpec("t", 1, "float32"), rows, 0.0)
    [first] = [e.msg for e in effects if isinstance(e, Send)]
    assert first.zstd == (19, 64)
    core.answered("S0", error_reply(first, NotReplicatedError("S1 refused it"), "S0"), first.id, 0.01)
    [retry] = [e.msg for e in core.tick(2.0) if isinstance(e, Send)]
    assert retry.zstd == (19, 64)
    [again] = [e.msg for e in core.connection_lost("S0", 2.1) if isinstance(e, Send)]
    assert again.id != retry.id and again.zstd == (19, 64)


def test_significant_on_an_integer_table_sends_whole_counts_and_loses_none():
    """Integer tables take significant (counts held back whole, sent whole) but not the
    filters that round or rescale (decision 103)."""
    info = TableInfo("counts", "int64", 2, "sum")
    chain = build_chain([{"significant": {"threshold": 5}}], info)
    rng = np.random.default_rng(7)
    keys = np.arange(50, dtype=np.uint64)
    total = np.zeros((50, 2), np.int64)
    applied = np.zeros((50, 2), np.int64)
    for _ in range(20):
        v = rng.integers(-3, 4, (50, 2)).astype(np.int64)
        total += v
        k, out, meta = chain.apply(keys, v)
        assert out.dtype == np.int64 and "q" not in meta
        applied[k.astype(np.int64)] += out
        assert np.abs(total - applied).max() <= 5      # the bound: the residual, threshold per entry
    k, rest = chain.residual()
    applied[k.astype(np.int64)] += rest
    assert np.array_equal(applied, total)              # after a flush: exactly
    for name in ("quantize", {"random_skip": {"p": 0.5}}):
        with pytest.raises(ConfigError, match="only zstd and significant apply to integer tables"):
            build_chain([name], info)

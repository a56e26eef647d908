"""Filters on pull replies (issue 17): the pure code within its documented bounds, the
token chain that never lets a worker fill in rows older than the bound, bad settings
refused naming the key, and real servers: filtered pulls within the bound across
pushes and a failover, a pull naming an unknown pull filter refused, the server serving on."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import psd
from psd.apps import APPS
from psd.errors import ConfigError, ProtocolError, PsdError, UnknownFilterError
from psd.filters.pull import (
    PullCopies,
    PullFilters,
    build_pull,
    check_pf,
    from_bf16,
    to_bf16,
)
from psd.jobs.spec import parse_job

F32 = np.dtype(np.float32)
BF16_REL = 2.0**-8  # 8 significant bits, rounded to nearest


def _keys_values(seed: int, n: int = 600, width: int = 2):
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 50_000, size=n, dtype=np.uint64))
    vals = np.zeros((keys.size, width), np.float32)
    some = rng.random(keys.size) < 0.5
    vals[some] = rng.standard_normal((int(some.sum()), width)).astype(np.float32)
    return keys, vals


class Pair:
    """One server's pull filters and one worker's copies, talking through encode/decode."""

    def __init__(self, entries, width: int = 2, server: PullFilters | None = None):
        self.pf = check_pf(build_pull(entries, "float32", width), width)
        self.server = server or PullFilters(seed=3)
        self.worker = PullCopies()
        self.width = width
        self.last: dict = {}

    def pull(self, keys, values, sender: str = "W0", deliver: bool = True) -> np.ndarray | None:
        pf = dict(self.pf)
        token = self.worker.token("S0", "t")
        if token is not None:
            pf["b"] = token
        arrays, pr = self.server.encode(sender, "t", keys, values, pf, F32)
        self.last = pr
        if not deliver:  # the answer is lost on the way
            return None
        return self.worker.decode("S0", "t", keys, pr, arrays, F32, self.width)


def _walk(rng, vals, frac=0.2, step=0.05):
    out = vals.copy()
    moved = rng.random(vals.shape[0]) < frac
    out[moved] += (rng.standard_normal((int(moved.sum()), vals.shape[1])) * step).astype(np.float32)
    return out


# -- pure: bounds -----------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), threshold=st.sampled_from([0.0, 1e-3, 0.02]), quantize=st.booleans(),
       relative=st.booleans())
def test_every_pull_is_within_the_documented_bound(seed, threshold, quantize, relative):
    entries = [{"significant": {"threshold": threshold, "relative": relative}}] + (["quantize"] if quantize else [])
    pair = Pair(entries + ["sparse"])
    keys, vals = _keys_values(seed)
    rng = np.random.default_rng(seed + 1)
    for i in range(8):
        sub = keys[rng.random(keys.size) < 0.8] if i % 3 == 2 else keys  # key lists vary too
        want = vals[np.searchsorted(keys, sub)]
        got = pair.pull(sub, want)
        err = np.abs(got.astype(np.float64) - want)
        # against the published row the worker holds: relative to it, or absolute
        base = threshold * np.abs(got.astype(np.float64)) if relative else threshold
        bound = np.maximum(base, BF16_REL * np.abs(want.astype(np.float64)) if quantize else 0.0)
        assert (err <= bound * (1 + 1e-6) + 1e-30).all(), (i, float((err - bound).max()))
        if threshold == 0.0 and not quantize:
            assert np.array_equal(got, want)  # lossless: bit-identical
        vals = _walk(rng, vals)


def test_only_moved_rows_travel_and_zeros_are_left_out():
    pair = Pair([{"significant": {"threshold": 0}}, "sparse"])
    keys, vals = _keys_values(7, n=4000)
    pair.pull(keys, vals)
    assert pair.last["fill"] == "zero" and pair.server.counters["rows_sent"] == int((vals != 0).any(axis=1).sum())
    sent = pair.server.counters["rows_sent"]
    moved = vals.copy()
    moved[::50] += 1.0
    got = pair.pull(keys, moved)
    assert np.array_equal(got, moved)
    assert pair.last["fill"] == "copy" and pair.server.counters["rows_sent"] - sent == moved[::50].shape[0]


def test_bfloat16_is_round_to_nearest_even_with_the_range_of_float32():
    v = np.array([0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, 1e-38, -7.25, 1 / 3], np.float32)
    back = from_bf16(to_bf16(v))
    assert np.array_equal(back[:3], v[:3]) and back[3] == 1.0 and back[4] == 1 + 2**-6  # ties to even
    assert (np.abs(back.astype(np.float64) - v) <= BF16_REL * np.abs(v.astype(np.float64))).all()


def test_workers_get_the_same_bits_between_two_publications():
    """Two workers pulling a key between the same two publications read the same row,
    whatever each held before: an aggregating table's kkt decides alike on every worker."""
    server = PullFilters(seed=1)
    a = Pair([{"significant": {"threshold": 0.1}}, "quantize"], server=server)
    b = Pair([{"significant": {"threshold": 0.1}}, "quantize"], server=server)
    keys, vals = _keys_values(11)
    rng = np.random.default_rng(2)
    a.pull(keys, vals, "W0")
    for _ in range(5):
        vals = _walk(rng, vals, frac=0.5, step=0.08)
        got_a = a.pull(keys, vals, "W0")
        got_b = b.pull(keys[::2], vals[::2], "W1")  # another key list, another history
        assert np.array_equal(got_a[::2], got_b)


def test_a_lost_answer_gets_every_row_next_never_a_stale_copy():
    pair = Pair([{"significant": {"threshold": 0}}])
    keys, vals = _keys_values(5)
    pair.pull(keys, vals)
    changed = vals + 1.0
    assert pair.pull(keys, changed, deliver=False) is None  # the server moved on; we did not
    again = changed + 1.0
    got = pair.pull(keys, again)
    assert pair.last["fill"] == "zero" and np.array_equal(got, again)
    assert pair.server.counters["resets"] == 1


def test_a_restarted_server_matches_no_old_token():
    pair = Pair([{"significant": {"threshold": 0}}])
    keys, vals = _keys_values(6)
    pair.pull(keys, vals)
    pair.server = PullFilters()  # (a new process: fresh state, tokens from a new random start)
    got = pair.pull(keys, vals + 2)
    assert pair.last["fill"] == "zero" and np.array_equal(got, vals + 2)


def test_state_over_its_memory_bound_is_dropped_whole():
    pair = Pair([{"significant": {"threshold": 0}}], server=PullFilters(max_bytes=10_000))
    keys, vals = _keys_values(8, n=2000)
    pair.pull(keys, vals)
    assert pair.server.nbytes == 0  # over the bound at once: nothing kept
    got = pair.pull(keys, vals * 2)
    assert pair.last["fill"] == "zero" and np.array_equal(got, vals * 2)


# -- pure: refusals ---------------------------------------------------------------------------
@pytest.mark.parametrize("entries,needle", [
    ([{"significant": {"threshold": -1}}], "pull_filters[0].threshold: expected a number >= 0"),
    (["sparse", "zstd"], "pull_filters[1]: unknown filter 'zstd'"),
    ([{"quantize": {"to": "int8"}}], "pull_filters[0].to: expected bfloat16"),
    (["significant"], "pull_filters[0].threshold: missing"),
    ([{"significant": {"threshold": [0.1, 0.2, 0.3]}}], "pull_filters[0].threshold: expected one number or 2"),
    ([{"significant": {"threshold": 0.1, "relativ": True}}], "pull_filters[0].relativ: unknown option"),
])
def test_bad_settings_are_refused_naming_the_key(entries, needle):
    with pytest.raises(ConfigError) as err:
        build_pull(entries, "float32", 2)
    assert needle in str(err.value)


def test_value_filters_are_refused_on_integer_tables():
    with pytest.raises(ConfigError, match=r"pull_filters\[0\]: pull filter 'quantize' changes values"):
        build_pull(["quantize"], "int64", 1)
    assert build_pull(["sparse"], "int64", 1) == {"f": ["sparse"]}


def test_a_job_file_with_a_bad_pull_filter_is_refused_naming_the_key(tmp_path):
    spec = {"app": "logreg", "data": {"generator": "sparse_logreg", "examples": 100, "features": 50},
            "output": str(tmp_path), "pull_filters": [{"significant": {"threshold": "lots"}}]}
    with pytest.raises(ConfigError, match=r"job.yaml: pull_filters\[0\].threshold: expected a number"):
        parse_job(spec, "job.yaml", APPS)


@pytest.mark.parametrize("pf", [{"f": ["gzip"]}, {"f": "sparse"}, {"f": ["significant"]},
                                {"f": ["quantize"], "q": "int4"}, {"f": ["sparse", "sparse"]},
                                {"f": ["significant"], "t": 0.1, "r": False, "b": -1}])
def test_the_server_refuses_pull_filters_it_cannot_run(pf):
    with pytest.raises(UnknownFilterError):
        check_pf(pf, 2)


def test_the_worker_refuses_answers_it_cannot_read():
    copies = PullCopies()
    keys = np.arange(10, dtype=np.uint64)
    vals = np.zeros((10, 1), np.float32)
    with pytest.raises(UnknownFilterError, match="'delta9'"):
        copies.decode("S0", "t", keys, {"f": ["delta9"], "n": 10, "sel": "all"}, [vals], F32, 1)
    with pytest.raises(ProtocolError, match="copy this worker does not hold"):
        copies.decode("S0", "t", keys, {"f": ["significant"], "n": 10, "sel": "idx", "fill": "copy", "b": 4, "t": 5},
                      [np.zeros(0, np.uint32), vals[:0]], F32, 1)
    with pytest.raises(ProtocolError, match="values must be"):
        copies.decode("S0", "t", keys, {"f": ["quantize"], "n": 10, "sel": "all"}, [vals], F32, 1)
    assert copies.copies == {}  # nothing kept from any of them


# -- real servers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    with psd.LocalCluster(servers=3, replication=2) as c:
        yield c


@pytest.fixture(scope="module")
def kv(cluster):
    kv = psd.connect(cluster)
    try:
        yield kv
    finally:
        kv.close()


KEYS = np.unique(np.random.default_rng(0).integers(0, 2**64 - 1, size=6000, dtype=np.uint64))


def test_filtered_pulls_stay_within_the_bound_and_send_less(kv):
    t = kv.table("pf", width=2, updater="assign",
                 pull_filters=[{"significant": {"threshold": 0.01}}, "quantize", "sparse"])
    rng = np.random.default_rng(1)
    vals = np.zeros((KEYS.size, 2), np.float32)
    vals[::4] = rng.standard_normal((vals[::4].shape[0], 2)).astype(np.float32)
    for _ in range(5):
        kv.wait(t.push(KEYS, vals))
        got = t.pull(KEYS)
        assert np.abs(got.astype(np.float64) - vals).max() <= max(0.01, BF16_REL * np.abs(vals).max()) + 1e-7
        vals = _walk(rng, vals, frac=0.1)
    counts = kv.traffic()["pull_filters"]
    assert counts["deltas"] >= 3 * 3 and counts["rows_sent"] < 0.3 * counts["rows"]
    deadline = time.monotonic() + 5
    while True:  # the servers' side in psd status (a heartbeat behind)
        sides = [n.get("pull_filters") or {} for n in kv.status()["nodes"] if n["role"] == "server"]
        if sum(s.get("rows_sent", 0) for s in sides) == counts["rows_sent"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(s.get("rows_sent", 0) for s in sides) == counts["rows_sent"]
    assert sum(s.get("deltas", 0) for s in sides) == counts["deltas"]


def test_a_pull_naming_an_unknown_pull_filter_is_refused_and_the_server_serves_on(kv):
    t = kv.table("pf_bad", width=1, pull_filters=["sparse"])
    kv.wait(t.push(KEYS, np.ones((KEYS.size, 1), np.float32)))
    kv.aio.pull_filters[t.name] = {"f": ["telepathy"]}  # (what a newer worker might send)
    with pytest.raises(PsdError, match="'telepathy'"):
        t.pull(KEYS)
    kv.aio.pull_filters[t.name] = {"f": ["sparse"]}
    assert np.array_equal(t.pull(KEYS), np.ones((KEYS.size, 1), np.float32))


def test_after_a_failover_pulls_get_every_row_again(kv, cluster):
    """The new primaries hold no chain for this worker: full answers, exact rows."""
    t = kv.table("pf_fail", width=1, updater="assign", pull_filters=[{"significant": {"threshold": 0}}])
    vals = np.arange(KEYS.size, dtype=np.float32).reshape(-1, 1)
    kv.wait(t.push(KEYS, vals))
    assert np.array_equal(t.pull(KEYS), vals)
    full = kv.aio.core.pull_copies.counters["rows_sent"]
    assert np.array_equal(t.pull(KEYS), vals)  # a delta of nothing
    assert kv.aio.core.pull_copies.counters["rows_sent"] == full
    cluster.kill_server(0)
    vals = vals + 1
    kv.wait(t.push(KEYS, vals))
    assert np.array_equal(t.pull(KEYS), vals)


def test_a_held_pull_whose_encoding_fails_is_answered_and_the_clock_goes_on():
    """A pull the consistency gate held runs inside another request's handler (here a
    clock): a failure encoding its answer refuses that pull, and nothing else."""
    from psd.codec import Message
    from psd.config import ClusterConfig
    from psd.core.effects import Refuse
    from psd.core.server import ServerCore
    from psd.schema import TableSpec

    core = ServerCore(ClusterConfig(security="none", consistency="sequential", num_workers=1), secure=False)
    core.node_id = "S0"
    core._create(TableSpec("t", 1, "float32", "sum"))

    def broken(*args, **kwargs):
        raise IndexError("a bug")
    core.pulls.encode = broken
    keys = np.arange(100, dtype=np.uint64)
    held = core.handle(None, Message("pull", id=1, sender="W0", table="t", clock=1,
                                     meta={"pf": {"f": ["sparse"]}}, arrays=[keys]), 0.0)
    assert held == []  # waits for clock 1
    out = core.handle(None, Message("clock", id=2, sender="W0", clock=1, meta={"clock": 1}), 0.0)
    refused = [e for e in out if isinstance(e, Refuse)]
    assert len(refused) == 1 and refused[0].request.id == 1 and "a bug" in str(refused[0].error)


def test_a_worker_that_cannot_rebuild_an_answer_fails_that_pull_only():
    from psd.cluster.ring import consistent_hash
    from psd.cluster.rows import Rows
    from psd.core.client import ClientCore, Done, Send
    from psd.schema import TableSpec

    ring = consistent_hash(("S0",), 1, vnodes=4, replication=1, addresses={"S0": "tcp://S0"})
    core = ClientCore("W0", 10.0, ring)
    spec = TableSpec("t", 1, "float32", "sum")
    keys = np.arange(100, dtype=np.uint64)

    def broken(*args, **kwargs):
        raise IndexError("a bug")
    core.pull_copies.decode = broken
    ts, effects = core.issue("pull", spec, Rows(keys=keys, meta={"pf": {"f": ["sparse"]}}), 0.0)
    sent = next(e for e in effects if isinstance(e, Send))
    assert sent.msg.meta["pf"] == {"f": ["sparse"]}
    reply = sent.msg.reply(arrays=[np.zeros((100, 1), np.float32)], meta={"pr": {"f": ["sparse"], "n": 100,
                                                                            "sel": "all"}})
    done = [e for e in core.answered("S0", reply, sent.msg.id, 0.1) if isinstance(e, Done)]
    assert len(done) == 1 and done[0].ts == ts and "IndexError: a bug" in str(done[0].error)

"""One message per server (decision 97): a request goes to each primary server as one
message, whatever the replicas of the ranges it touches there, and each primary forwards
one message per replica server.

The real-process test counts the servers' own counters (``push``, ``pull``, ``replicated``)
for a push and a pull of keys spread over the whole key space at replication 2 on 3
servers; the same request planned the old way (one message per owner tuple, the client's
``one_message_per_server`` switch) shows the count it replaces. The core tests drive a
``ServerCore`` directly through the in-flight states the grouping brings: a forward that
holds part of a request, a request that comes back as a piece from another primary, a
message partly led and partly replicated here, a malformed ``meta.cover``.
"""
from __future__ import annotations

import numpy as np
import pytest

import psd
from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.cluster.ring import consistent_hash
from psd.cluster.rows import Rows
from psd.cluster.routing import by_primary
from psd.codec import Message
from psd.config import ClusterConfig
from psd.core.client import ClientCore, Send
from psd.core.effects import Refuse, Reply
from psd.core.server import ServerCore
from psd.errors import NotOwnerError, ProtocolError
from psd.schema import TableSpec

SERVERS = ("S0", "S1", "S2")
SPEC = TableSpec("t", 1, "int64")


def _spread(n: int, seed: int = 5) -> np.ndarray:
    """``n`` sorted unique keys spread over the whole key space (every range gets some)."""
    rng = np.random.default_rng(seed)
    return np.unique(rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64))


# -- the client's cut --------------------------------------------------------------------------
def test_a_full_push_is_one_part_per_server_not_per_owner_tuple():
    ring = consistent_hash(SERVERS, 1, vnodes=16, replication=2, addresses={s: f"tcp://{s}" for s in SERVERS})
    keys = _spread(5000)
    tuples = {owners for owners, _ in Rows(keys=keys).groups(ring)}
    assert len(tuples) == 6  # every ordered pair of the three servers leads or replicates some range

    def sends(one_per_server: bool) -> list[Send]:
        core = ClientCore("W0", 10.0, ring)
        core.one_message_per_server = one_per_server
        _ts, effects = core.issue("push", SPEC, Rows(keys=keys, values=np.ones((keys.size, 1), np.int64)), 0.0)
        return [e for e in effects if isinstance(e, Send)]

    new, old = sends(True), sends(False)
    assert sorted(s.server for s in new) == list(SERVERS)
    assert len(old) == 6
    for send in new:  # each message holds exactly the keys its server leads, in order
        led = [k for k in keys.tolist() if ring.owners_at(k)[0] == send.server]
        assert send.msg.arrays[0].tolist() == led


def test_a_small_request_is_cut_key_by_key_exactly_as_a_big_one(monkeypatch):
    """Requests of up to SMALL_CUT keys take a per-key search (the simulation's and small
    pulls' path); it gives the same groups and slices as the vectorised cut, edges of
    ranges included (keys equal to a range's first key)."""
    import psd.cluster.routing as routing
    ring = consistent_hash(SERVERS, 1, vnodes=4, replication=2, addresses={s: f"tcp://{s}" for s in SERVERS})
    begins = [r.begin for r in ring.ranges[1:]]
    rng = np.random.default_rng(7)
    cases = [np.unique(rng.integers(0, 2**64 - 1, size=int(rng.integers(1, 17)), dtype=np.uint64))
             for _ in range(300)]
    picks = [[begins[i] - (i % 2) for i in rng.integers(0, len(begins), 8).tolist()] for _ in range(100)]
    cases += [np.unique(np.array(pick, dtype=np.uint64)) for pick in picks]  # (first keys, and the key before)
    small = [routing.group_keys(ring, keys) for keys in cases]
    monkeypatch.setattr(routing, "SMALL_CUT", 0)
    assert small == [routing.group_keys(ring, keys) for keys in cases]
    assert sum(len(g) > 1 for g in small) > 100, "most cases should span several owner groups"


def test_by_primary_merges_owner_groups_and_keeps_rows_apart():
    groups = [(("S0", "S1"), [(0, 3), (9, 12)]), (("S1", "S0"), [(3, 5)]), (("S0", "S2"), [(5, 9)])]
    assert by_primary(groups) == [("S0", [(0, 3), (5, 9), (9, 12)]), ("S1", [(3, 5)])]


def test_a_big_push_fills_its_pieces_across_ranges():
    """A push over MAX_PUSH_BYTES goes in pieces; a piece takes rows of several ranges of
    its server, so the count is set by the bytes, not by the number of ranges."""
    from psd.core.client import MAX_PUSH_BYTES
    ring = consistent_hash(SERVERS, 1, vnodes=16, replication=2, addresses={s: f"tcp://{s}" for s in SERVERS})
    keys = _spread(300_000)  # 4.8 MB of keys and values
    per = MAX_PUSH_BYTES // 16  # rows of a piece (8 bytes of key, 8 of value)
    primary = np.array([o[0] for o in ring.owners])[np.searchsorted(ring.inner_begins, keys, side="right")]

    def sends(pack: bool) -> list[Send]:
        core = ClientCore("W0", 10.0, ring)
        core.budget = 1 << 40
        core.one_message_per_server = pack
        _ts, effects = core.issue("push", SPEC, Rows(keys=keys, values=np.ones((keys.size, 1), np.int64)), 0.0)
        return [e for e in effects if isinstance(e, Send)]

    new = sends(True)
    for server in SERVERS:
        mine = [s.msg.arrays[0] for s in new if s.server == server]
        assert len(mine) == -(-int((primary == server).sum()) // per)
        np.testing.assert_array_equal(np.concatenate(mine), keys[primary == server])
    assert len(sends(False)) >= len(ring.ranges)  # before: a piece per range at least


# -- the server core: partial forwards and mixed messages --------------------------------------
A, B, C = Range(0, 1000), Range(1000, 2000), Range(2000, KEY_SPACE_END)


def _core(node: str, owners: tuple, version: int = 1) -> ServerCore:
    core = ServerCore(ClusterConfig(security="none"), secure=False)
    core.node_id = node
    core.ring = Assignment(version=version, ranges=(A, B, C), owners=owners,
                           addresses={s: f"tcp://{s}" for s in SERVERS})
    core._create(SPEC)
    core.fence.confirmed(0.0)  # (the scheduler answered a heartbeat: it serves shared ranges)
    return core


def _replicate(core: ServerCore, keys: list[int], rid: int, **meta) -> list:
    msg = Message("replicate", id=rid, sender=meta.pop("sender", "S0"), table="t", ring=core.ring.version,
                  meta={"origin": "W0", "rid": rid, **meta},
                  arrays=[np.array(keys, np.uint64), np.ones((len(keys), 1), np.int64)])
    return core.handle(None, msg, 0.0)


def _value(core: ServerCore, keys: list[int]) -> list[int]:
    return core.tables["t"].pull(np.array(keys, np.uint64)).ravel().tolist()


def test_the_primary_forwards_each_replica_its_rows_once_naming_their_ranges():
    s0 = _core("S0", (("S0", "S1"), ("S0", "S2"), ("S1", "S2")))
    keys = np.array([10, 20, 1500, 1600], np.uint64)
    out = s0.handle(None, Message("push", id=1, sender="W0", table="t", meta={"rid": 7},
                                  arrays=[keys, np.ones((4, 1), np.int64)]), 0.0)
    asks = {e.node: e.msg for e in out if type(e).__name__ == "Ask"}
    assert set(asks) == {"S1", "S2"} and s0.counters["replicated"] == 2
    assert asks["S1"].arrays[0].tolist() == [10, 20] and asks["S1"].meta["cover"] == [[0, 999]]  # range A
    assert asks["S2"].arrays[0].tolist() == [1500, 1600] and asks["S2"].meta["cover"] == [[1000, 1999]]  # B
    assert _value(s0, keys.tolist()) == [1, 1, 1, 1]


def test_a_forward_past_max_cover_goes_in_several_that_never_share_a_range(monkeypatch):
    import psd.core.server as server
    monkeypatch.setattr(server, "MAX_COVER", 1)
    s0 = _core("S0", (("S0", "S1"), ("S0", "S2"), ("S0", "S1")))
    keys = np.array([10, 20, 1500, 2500, 2600], np.uint64)
    out = s0.handle(None, Message("push", id=1, sender="W0", table="t", meta={"rid": 7},
                                  arrays=[keys, np.ones((5, 1), np.int64)]), 0.0)
    fwd = [(e.node, e.msg.arrays[0].tolist(), e.msg.meta["cover"]) for e in out if type(e).__name__ == "Ask"]
    assert fwd == [("S1", [10, 20], [[0, 999]]), ("S1", [2500, 2600], [[2000, 2**64 - 1]]),
                   ("S2", [1500], [[1000, 1999]])]
    s1 = _core("S1", (("S0", "S1"), ("S0", "S2"), ("S0", "S1")))
    for _node, k, cover in fwd[:2]:  # both halves of one id apply, and neither twice
        for _ in range(2):
            _replicate(s1, k, 7, cover=cover)
    assert _value(s1, [10, 20, 2500, 2600]) == [1, 1, 1, 1]


def test_a_replica_counts_a_partial_forward_for_its_rows_only():
    """S1 replicated rows [10, 20] of request 7 (the rest went to S2). S0 died; a newer
    ring gives S1 range B too, and the worker's piece of request 7 for B reaches it from
    B's new primary, naming 7 as its original: S1 applies it (it never had those rows)
    and still not the rows it had."""
    s1 = _core("S1", (("S0", "S1"), ("S0", "S2"), ("S1", "S2")))
    assert type(_replicate(s1, [10, 20], 7, cover=[[10, 20]])[-1]) is Reply
    assert _value(s1, [10, 20]) == [1, 1]
    assert type(_replicate(s1, [10, 20], 7, cover=[[10, 20]])[-1]) is Reply  # the primary sent it again
    assert _value(s1, [10, 20]) == [1, 1]
    s1.ring = Assignment(version=2, ranges=(A, B, C), owners=(("S1", "S2"), ("S2", "S1"), ("S1", "S2")),
                         addresses=s1.ring.addresses)
    _replicate(s1, [10, 1500, 1600], 901, orig=[7], sender="S2")  # a piece: fresh id, naming 7
    assert _value(s1, [10, 20, 1500, 1600]) == [1, 1, 1, 1]


def test_with_the_whole_id_noted_the_pieces_rows_would_be_lost(monkeypatch):
    """The test above bites: noting a partial forward's id as applied whole (what a replica
    did before decision 97) skips the rows of B, which the replica never had."""
    import psd.core.server as server
    monkeypatch.setattr(server, "_cover", lambda value, rows: None)
    s1 = _core("S1", (("S0", "S1"), ("S0", "S2"), ("S1", "S2")))
    _replicate(s1, [10, 20], 7, cover=[[10, 20]])
    s1.ring = Assignment(version=2, ranges=(A, B, C), owners=(("S1", "S2"), ("S2", "S1"), ("S1", "S2")),
                         addresses=s1.ring.addresses)
    _replicate(s1, [1500, 1600], 901, orig=[7], sender="S2")
    assert _value(s1, [1500, 1600]) == [0, 0]


def test_a_partial_forward_id_travels_with_a_copy_of_its_range():
    s1 = _core("S1", (("S0", "S1"), ("S0", "S2"), ("S1", "S2")))
    _replicate(s1, [10, 20], 7, cover=[[10, 20]])
    senders, counts, rids = s1._seen_for_copy(A)
    assert ("W0", 7) in set(zip(np.repeat(senders, counts.astype(int)).tolist(), rids.tolist()))
    assert ("W0", 7) not in s1.seen and s1.partly.applied_in("W0", 7) == [Range(10, 21)]


@pytest.mark.parametrize("cover, why", [
    ([[10, 15]], "does not hold every row"),
    ([[20, 30], [5, 10]], "ascending, disjoint"),
    ([[10, -1]], "ascending, disjoint"),
    ("10-20", "list of 1 to"),
])
def test_a_malformed_cover_is_refused_and_nothing_applied(cover, why):
    s1 = _core("S1", (("S0", "S1"), ("S0", "S2"), ("S1", "S2")))
    out = _replicate(s1, [10, 20], 7, cover=cover)
    assert type(out[-1]) is Refuse and isinstance(out[-1].error, ProtocolError) and why in str(out[-1].error)
    assert _value(s1, [10, 20]) == [0, 0] and ("W0", 7) not in s1.seen and not s1.partly.applied_in("W0", 7)


def test_a_message_partly_led_partly_replicated_here_is_refused_whole():
    """A newer ring made S2 the primary of B, which S0 now only replicates: a message the
    worker cut by the older ring (A and B to S0) is refused, nothing of it applied or
    forwarded, and its id not noted; the worker re-cuts it and each piece applies once."""
    s0 = _core("S0", (("S0", "S1"), ("S2", "S0"), ("S1", "S2")), version=2)
    keys = np.array([10, 1500], np.uint64)
    push = Message("push", id=1, sender="W0", table="t", ring=1, meta={"rid": 7},
                   arrays=[keys, np.ones((2, 1), np.int64)])
    out = s0.handle(None, push, 0.0)
    assert len(out) == 1 and type(out[0]) is Refuse and isinstance(out[0].error, NotOwnerError)
    assert "S2 leads key 1500" in str(out[0].error) and out[0].error.data["ring"] == 2
    assert _value(s0, [10, 1500]) == [0, 0] and ("W0", 7) not in s0.seen and s0.counters["replicated"] == 0
    # the worker's pieces: A to S0 (fresh id naming 7), B to S2, whose forward reaches S0
    s0.handle(None, Message("push", id=2, sender="W0", table="t", ring=2, meta={"rid": 8, "orig": [7]},
                            arrays=[keys[:1], np.ones((1, 1), np.int64)]), 0.0)
    _replicate(s0, [1500], 9, orig=[7], sender="S2")
    assert _value(s0, [10, 1500]) == [1, 1]


def test_a_range_copy_replaces_the_rows_its_receiver_kept_of_it():
    """Found by the simulation's seed 187 (sequential) once the new cut changed its schedule:
    a server registered again under a new name kept rows of a range it had applied a push
    to; a copy of that range then brought the same push, still kept for the clock boundary
    on its source, and it applied twice. The copy now replaces the receiver's rows of it."""
    s5 = _core("S5", (("S4", "S5"), ("S0", "S2"), ("S1", "S2")))
    s5.incoming = [A]
    s5.tables["t"].push(np.array([10, 20], np.uint64), np.ones((2, 1), np.int64))  # kept from its old name
    wire = [A.begin, A.end - 1]
    copy = [Message("install", table="t", ring=1, meta={"range": wire, "copy": "S4.1", "state_fields": []},
                    arrays=[np.array([20], np.uint64), np.full((1, 1), 5, np.int64)]),
            Message("install", table="t", ring=1, meta={"range": wire, "copy": "S4.1", "kept": 2, "origin": "W0"},
                    arrays=[np.array([10], np.uint64), np.ones((1, 1), np.int64)]),
            Message("install", ring=1, meta={"range": wire, "copy": "S4.1", "senders": [], "final": True},
                    arrays=[np.empty(0, np.uint64), np.empty(0, np.uint64)])]
    for i, msg in enumerate(copy):
        msg.id, msg.sender = 100 + i, "S4"
        assert type(s5.handle(None, msg, 0.0)[-1]) is Reply
    assert _value(s5, [10, 20]) == [1, 5] and not s5.incoming


# -- real daemons: the messages a full push and pull take ---------------------------------------
@pytest.fixture(scope="module")
def cluster():
    with psd.LocalCluster(servers=3, replication=2) as c:
        yield c


def _counts(cluster, raw_dealer) -> dict[str, dict]:
    """Each server's counters, by node id (read off its data socket: exact, now)."""
    out = {}
    for child in cluster.servers:
        d = raw_dealer(child.address)
        out[d.request(Message("ping")).meta["node"]] = d.request(Message("status")).meta["counters"]
    return out


def _delta(after: dict, before: dict, what: str) -> dict[str, int]:
    return {node: after[node][what] - before[node][what] for node in after}


def test_a_full_push_and_pull_take_one_message_per_server(cluster, raw_dealer):
    keys = _spread(30_000)
    values = np.arange(keys.size, dtype=np.float32).reshape(-1, 1)
    with psd.connect(cluster) as kv:
        w = kv.table("w", width=1, dtype="float32", updater="sum")
        ring = kv.aio.ring
        pairs = {(o[0], r) for o, _ in Rows(keys=keys).groups(ring) for r in o[1:]}
        assert len(ring.servers) == 3 and len(pairs) == 6  # each primary has both others as replicas

        before = _counts(cluster, raw_dealer)
        kv.wait(w.push(keys, values))
        np.testing.assert_array_equal(w.pull(keys), values)
        after = _counts(cluster, raw_dealer)
        pushes, pulls = _delta(after, before, "push"), _delta(after, before, "pull")
        forwards = _delta(after, before, "replicated")
        print(f"one per server: pushes {pushes}, pulls {pulls}, forwards {forwards}")
        assert pushes == {n: 1 for n in ring.servers}, pushes   # 3 messages, not 6
        assert pulls == {n: 1 for n in ring.servers}, pulls
        assert sum(forwards.values()) == len(pairs) == 6 and set(forwards.values()) == {2}, forwards

        kv.aio.core.one_message_per_server = False  # the same push, one message per owner tuple
        before = after
        kv.wait(w.push(keys, values))
        after = _counts(cluster, raw_dealer)
        old = _delta(after, before, "push")
        print(f"one per owner tuple: pushes {old}, forwards {_delta(after, before, 'replicated')}")
        assert sum(old.values()) == 6, old
        kv.aio.core.one_message_per_server = True
        np.testing.assert_array_equal(w.pull(keys), 2 * values)


# -- chained placement: 3 messages and 3 forwards ------------------------------------------------
@pytest.fixture(scope="module")
def chained_cluster():
    with psd.LocalCluster(servers=3, replication=2, placement="chained") as c:
        yield c


def test_chained_placement_makes_a_full_push_three_messages_and_three_forwards(chained_cluster, raw_dealer):
    """With ``placement: chained`` every range a server leads has the same replica, so the
    full push of the test above is one message per server and one forward per server."""
    st = chained_cluster.status()
    assert st["placement"] == "chained"
    keys = _spread(30_000, seed=6)
    values = np.arange(keys.size, dtype=np.float32).reshape(-1, 1)
    with psd.connect(chained_cluster) as kv:
        w = kv.table("w", width=1, dtype="float32", updater="sum")
        ring = kv.aio.ring
        assert [list(o) for o in ring.owners] == [r["owners"] for r in st["ranges"]]  # the scheduler's ring
        assert set(ring.owners) == {("S0", "S1"), ("S1", "S2"), ("S2", "S0")}
        before = _counts(chained_cluster, raw_dealer)
        kv.wait(w.push(keys, values))
        np.testing.assert_array_equal(w.pull(keys), values)
        after = _counts(chained_cluster, raw_dealer)
        pushes, pulls = _delta(after, before, "push"), _delta(after, before, "pull")
        forwards = _delta(after, before, "replicated")
        print(f"chained: pushes {pushes}, pulls {pulls}, forwards {forwards}")
        assert pushes == pulls == forwards == {n: 1 for n in ring.servers}, (pushes, pulls, forwards)

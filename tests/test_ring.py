"""The consistent-hashing ring, replica chains and the transfers between rings (pure logic)."""
from __future__ import annotations

import bisect

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.cluster.ring import (Transfer, consistent_hash, lost_ranges, on_server_death,
                              on_server_join, on_server_leave, overlay, plan_transfers,
                              point, rebalance, ring_points)

TOP = KEY_SPACE_END - 1

server_id = st.one_of(st.integers(0, 40).map(lambda i: f"s{i}"),
                      st.text(alphabet="ab#-:.", min_size=1, max_size=5))
server_sets = st.sets(server_id, min_size=1, max_size=8)
vnode_counts = st.integers(1, 24)
replications = st.integers(1, 4)
keys = st.integers(0, TOP)

SETTINGS = settings(max_examples=100, deadline=None)


# -- helpers -------------------------------------------------------------------------
def check_structure(a: Assignment, servers: set[str], replication: int) -> None:
    assert a.ranges[0].begin == 0 and a.ranges[-1].end == KEY_SPACE_END
    for r, s in zip(a.ranges, a.ranges[1:]):
        assert r.end == s.begin  # sorted, disjoint, no gap
    assert all(r.size > 0 for r in a.ranges)
    assert len(a.owners) == len(a.ranges)
    want = min(replication, len(servers))
    for o in a.owners:
        assert len(o) == want == len(set(o)) and set(o) <= servers
    for o, p in zip(a.owners, a.owners[1:]):
        assert o != p  # adjacent equal owner tuples are merged


def brute_owners(pts, key, replication):
    """The successor rule, straight from the definition, over sorted (point, server)."""
    j = bisect.bisect_left([p for p, _ in pts], key) % len(pts)
    chain = []
    for step in range(len(pts)):
        s = pts[(j + step) % len(pts)][1]
        if s not in chain:
            chain.append(s)
    return tuple(chain[:replication])


def boundary_keys(servers, vnodes):
    out = {0, TOP}
    for p, _ in ring_points(servers, vnodes):
        out.update({p, min(p + 1, TOP), max(p - 1, 0)})
    return sorted(out)


def primary_share(a: Assignment) -> dict[str, float]:
    share: dict[str, float] = {}
    for r, o in zip(a.ranges, a.owners):
        share[o[0]] = share.get(o[0], 0) + r.size / KEY_SPACE_END
    return share


# -- hashing and basic shapes --------------------------------------------------------
def test_points_are_pinned():
    # blake2b(f"{server}#{i}", 8 bytes) big-endian: must never change, or servers of two
    # builds would disagree about the ring
    assert point("s0", 0) == 0x6a19289a9c8ebd84
    assert point("server-1", 3) == 0x1e4f770e3ad65390
    a = consistent_hash(["a", "b", "c"], 1, vnodes=4, replication=2)
    assert a.ranges[0] == Range(0, 0x29b462fdb384314d) and a.owners[0] == ("c", "a")
    assert a.owners[-1] == ("c", "a") and a.ranges[-1].begin == 0xf0b9b1a19777196e


def test_empty_and_single():
    empty = consistent_hash([], 3, addresses={"x": "tcp://x"})
    assert empty.ranges == () and empty.owners == () and empty.version == 3
    one = consistent_hash(["only"], 1, vnodes=8, replication=3)
    assert one.ranges == (Range(0, KEY_SPACE_END),) and one.owners == (("only",),)


def test_bad_arguments():
    with pytest.raises(ValueError):
        consistent_hash(["a"], 1, vnodes=0)
    with pytest.raises(ValueError):
        consistent_hash(["a"], 1, replication=0)


def test_range_convention_at_a_point():
    # a key equal to a ring point belongs to that point's server; the next key to the next
    servers = ["a", "b", "c", "d"]
    pts = ring_points(servers, 8)
    a = consistent_hash(servers, 1, vnodes=8)
    for (p, s), (_, nxt) in zip(pts, pts[1:]):
        assert a.owners_at(p) == (s,)
        assert a.owners_at(p + 1) == (nxt,)
    # above the highest point the ring wraps to the lowest point's server
    assert a.owners_at(TOP) == (pts[0][1],) == a.owners_at(0)


@SETTINGS
@given(server_sets, vnode_counts, replications)
def test_structure(servers, vnodes, replication):
    a = consistent_hash(sorted(servers), 7, vnodes=vnodes, replication=replication)
    assert a.version == 7
    check_structure(a, servers, replication)
    assert a.servers == tuple(sorted(servers))  # every server owns something at these sizes
    if replication >= len(servers):
        assert all(set(o) == servers for o in a.owners)


@SETTINGS
@given(st.lists(server_id, min_size=1, max_size=8, unique=True), vnode_counts,
       replications, st.randoms(use_true_random=False))
def test_independent_of_server_order(servers, vnodes, replication, rnd):
    shuffled = list(servers)
    rnd.shuffle(shuffled)
    a = consistent_hash(servers, 1, vnodes=vnodes, replication=replication)
    b = consistent_hash(shuffled, 1, vnodes=vnodes, replication=replication)
    assert a == b


@SETTINGS
@given(server_sets, vnode_counts, replications, st.lists(keys, max_size=20))
def test_lookup_matches_successor_rule(servers, vnodes, replication, extra):
    a = consistent_hash(servers, 1, vnodes=vnodes, replication=replication)
    pts = sorted((point(s, i), s) for s in servers for i in range(vnodes))
    for k in boundary_keys(servers, vnodes) + extra:
        want = brute_owners(pts, k, replication)
        i = a.find(k)
        assert k in a.ranges[i] and a.owners_of(i) == want == a.owners_at(k)


# -- the consistent-hashing properties -----------------------------------------------
@SETTINGS
@given(st.sets(server_id, min_size=2, max_size=8), vnode_counts, replications, st.data())
def test_removing_a_server_moves_only_its_ranges(servers, vnodes, replication, data):
    gone = data.draw(st.sampled_from(sorted(servers)))
    old = consistent_hash(servers, 1, vnodes=vnodes, replication=replication)
    new = consistent_hash(servers - {gone}, 2, vnodes=vnodes, replication=replication)
    check_structure(new, servers - {gone}, replication)
    for piece, was, now in overlay(old, new):
        if gone not in was:
            assert now == was, piece  # untouched, replicas included
            continue
        survivors = tuple(s for s in was if s != gone)
        assert now[:len(survivors)] == survivors  # dropped, the rest keeps its order
        if was[0] == gone and replication >= 2:
            assert now[0] == was[1]  # the first replica is promoted
    for r in old.ranges_of(gone):
        assert gone in old.owners_at(r.begin)


@SETTINGS
@given(server_sets, server_id, vnode_counts, replications)
def test_adding_a_server_only_takes_ranges(servers, joining, vnodes, replication):
    servers = servers - {joining}
    if not servers:
        return
    old = consistent_hash(servers, 1, vnodes=vnodes, replication=replication)
    new = consistent_hash(servers | {joining}, 2, vnodes=vnodes, replication=replication)
    for piece, was, now in overlay(old, new):
        assert now[0] in (was[0], joining)  # no primary moves between old servers
        if joining not in now:
            assert now == was
        else:  # inserted into the chain; the rest keeps its order (tail may drop off)
            rest = tuple(s for s in now if s != joining)
            assert was[:len(rest)] == rest


@pytest.mark.parametrize("servers", [
    ["s0", "s1", "s2", "s3"],
    ["alpha", "beta", "gamma", "delta"],
    ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.4:7000"],
    ["server-0", "server-1", "server-2", "server-3"],
])
def test_balance_with_64_vnodes(servers):
    share = primary_share(consistent_hash(servers, 1, vnodes=64))
    assert sorted(share) == sorted(servers)
    assert abs(sum(share.values()) - 1.0) < 1e-9
    fair = 1 / len(servers)
    for s, x in share.items():
        assert 0.5 * fair <= x <= 2 * fair, (s, x)


def test_more_vnodes_balance_better():
    servers = [f"s{i}" for i in range(8)]
    spread = []
    for v in (1, 256):
        share = primary_share(consistent_hash(servers, 1, vnodes=v))
        spread.append(max(share.values()) / min(share.values()))
    assert spread[1] < spread[0] and spread[1] < 1.5


# -- Assignment helpers and wire form ------------------------------------------------
def test_assignment_helpers():
    a = consistent_hash(["a", "b", "c"], 1, vnodes=4, replication=2)
    for node in "abc":
        led = a.led_by(node)
        assert led == [r for i, r in enumerate(a.ranges) if a.primary_of(i) == node]
        assert set(led) <= set(a.ranges_of(node))
    assert sum(len(a.led_by(n)) for n in "abc") == len(a.ranges)
    assert a.owners_of(0) == a.owners[0]
    assert a.led_by("nobody") == [] and Assignment(version=0).owners_at(5) == ()


@SETTINGS
@given(server_sets, vnode_counts, replications)
def test_wire_round_trip(servers, vnodes, replication):
    addr = {s: f"tcp://{i}" for i, s in enumerate(sorted(servers))}
    a = consistent_hash(servers, 9, vnodes=vnodes, replication=replication, addresses=addr)
    wire = msgpack.unpackb(msgpack.packb(a.to_wire()), strict_map_key=False)
    assert Assignment.from_wire(wire) == a


# -- transfers -----------------------------------------------------------------------
def check_plan(old: Assignment, new: Assignment, live: set[str]) -> None:
    transfers = plan_transfers(old, new, live)
    lost = lost_ranges(old, new, live)
    assert transfers == sorted(transfers, key=lambda t: (t.range, t.src, t.dst))
    # same (src, dst) never appears on two touching ranges: they were merged
    by_pair: dict = {}
    for t in transfers:
        by_pair.setdefault((t.src, t.dst), []).append(t.range)
    for runs in by_pair.values():
        for r, s in zip(runs, runs[1:]):
            assert r.end < s.begin
    for r, s in zip(lost, lost[1:]):
        assert r.end < s.begin
    lost_keys = {piece.begin for r in lost for piece, _, _ in overlay(old, new)
                 if piece.begin in r}
    for piece, was, now in overlay(old, new):
        covering = [t for t in transfers if t.range.begin <= piece.begin < t.range.end]
        live_old = [s for s in was if s in live]
        if was and not live_old:
            assert piece.begin in lost_keys and covering == []
            continue
        assert piece.begin not in lost_keys
        need = [s for s in now if s not in was] if live_old else []
        assert sorted(t.dst for t in covering) == sorted(need)
        for t in covering:
            assert t.src == live_old[0]  # old primary if live, else first live replica
            assert t.range.begin <= piece.begin and piece.end <= t.range.end


@SETTINGS
@given(server_sets, server_sets, st.sets(server_id, max_size=8), vnode_counts,
       replications)
def test_plan_transfers_between_any_rings(before, after, live, vnodes, replication):
    old = consistent_hash(before, 1, vnodes=vnodes, replication=replication)
    new = consistent_hash(after, 2, vnodes=vnodes, replication=replication)
    check_plan(old, new, live)
    check_plan(old, new, before)  # nobody died: nothing is lost
    assert lost_ranges(old, new, before) == []
    assert plan_transfers(old, old, live) == [] and plan_transfers(new, new, after) == []


def test_first_ring_needs_no_transfers():
    new = consistent_hash(["a", "b"], 1, replication=2)
    assert plan_transfers(Assignment(version=0), new, {"a", "b"}) == []
    assert lost_ranges(Assignment(version=0), new, {"a", "b"}) == []


def test_transfers_are_merged_and_prefer_the_primary():
    old = Assignment(version=1, ranges=(Range(0, 10), Range(10, 20), Range(20, KEY_SPACE_END)),
                     owners=(("a", "b"), ("a", "c"), ("b", "a")))
    new = Assignment(version=2, ranges=(Range(0, KEY_SPACE_END),), owners=(("d",),))
    assert plan_transfers(old, new, {"a", "b", "c"}) == [
        Transfer(Range(0, 20), "a", "d"), Transfer(Range(20, KEY_SPACE_END), "b", "d")]
    # a dead: its first live replica serves, in chain order
    assert plan_transfers(old, new, {"b", "c"}) == [
        Transfer(Range(0, 10), "b", "d"), Transfer(Range(10, 20), "c", "d"),
        Transfer(Range(20, KEY_SPACE_END), "b", "d")]
    assert lost_ranges(old, new, {"b", "c"}) == []
    assert lost_ranges(old, new, {"c"}) == [Range(0, 10), Range(20, KEY_SPACE_END)]
    assert lost_ranges(old, new, set()) == [Range(0, KEY_SPACE_END)]


# -- membership changes --------------------------------------------------------------
@SETTINGS
@given(st.sets(server_id, min_size=2, max_size=8), vnode_counts, st.integers(2, 4),
       st.data())
def test_death_with_replicas_loses_nothing(servers, vnodes, replication, data):
    dead = data.draw(st.sampled_from(sorted(servers)))
    addr = {s: f"tcp://{s}" for s in servers}
    cur = consistent_hash(servers, 4, vnodes=vnodes, replication=replication, addresses=addr)
    ring, transfers, lost = on_server_death(cur, dead, servers, vnodes=vnodes,
                                            replication=replication)
    assert ring == consistent_hash(servers - {dead}, 5, vnodes=vnodes,
                                   replication=replication,
                                   addresses={s: a for s, a in addr.items() if s != dead})
    assert lost == []
    assert all(dead not in (t.src, t.dst) for t in transfers)
    for r in cur.led_by(dead):  # promotion: the old first replica leads now
        assert ring.owners_at(r.begin)[0] == cur.owners_at(r.begin)[1]
    # after the copies every owner in the new ring holds every key it owns
    holds = {s: [r for r in cur.ranges_of(s)] for s in servers - {dead}}
    for t in transfers:
        holds[t.dst].append(t.range)
    for piece, _, now in overlay(cur, ring):
        for s in now:
            assert any(r.begin <= piece.begin and piece.end <= r.end for r in holds[s])


def test_death_without_replicas_loses_its_ranges():
    servers = {"a", "b", "c", "d"}
    cur = consistent_hash(servers, 1, vnodes=16)
    change = on_server_death(cur, "b", servers - {"b"}, vnodes=16, replication=1)
    assert change.ring.version == 2
    merged = []
    for r in cur.led_by("b"):
        if merged and merged[-1].end == r.begin:
            merged[-1] = Range(merged[-1].begin, r.end)
        else:
            merged.append(r)
    assert change.lost == merged and change.transfers == []


@SETTINGS
@given(server_sets, server_id, vnode_counts, replications)
def test_join_copies_only_to_the_newcomer(servers, joining, vnodes, replication):
    servers = servers - {joining}
    if not servers:
        return
    cur = consistent_hash(servers, 1, vnodes=vnodes, replication=replication)
    ring, transfers, lost = on_server_join(cur, joining, servers, vnodes=vnodes,
                                           replication=replication, address="tcp://new")
    assert lost == [] and ring.version == 2 and ring.addresses == {joining: "tcp://new"}
    assert transfers and all(t.dst == joining and t.src in servers for t in transfers)
    assert sorted(r for t in transfers for r in [t.range]) == sorted(
        t.range for t in plan_transfers(cur, ring, servers))
    covered = sum(t.range.size for t in transfers)
    assert covered == sum(r.size for r in ring.ranges_of(joining))


@SETTINGS
@given(st.sets(server_id, min_size=2, max_size=8), vnode_counts, replications, st.data())
def test_leave_drains_from_the_leaver(servers, vnodes, replication, data):
    leaving = data.draw(st.sampled_from(sorted(servers)))
    cur = consistent_hash(servers, 1, vnodes=vnodes, replication=replication)
    ring, transfers, lost = on_server_leave(cur, leaving, servers, vnodes=vnodes,
                                            replication=replication, version=10)
    assert lost == [] and ring.version == 10 and leaving not in ring.servers
    assert all(t.dst != leaving for t in transfers)
    for r in cur.led_by(leaving):  # where it led it hands its own data over
        for t in transfers:
            if t.range.begin <= r.begin < t.range.end:
                assert t.src == leaving
    check_plan(cur, ring, servers)


def test_rebalance_keeps_and_drops_addresses():
    cur = consistent_hash(["a", "b"], 3, addresses={"a": "tcp://a", "b": "tcp://b"})
    change = rebalance(cur, ["a", "c"], ["a", "b"], vnodes=16, replication=1,
                       addresses={"c": "tcp://c"})
    assert change.ring.version == 4
    assert change.ring.addresses == {"a": "tcp://a", "c": "tcp://c"}
    assert change.lost == [] and {t.dst for t in change.transfers} == {"a", "c"}
    assert {t.src for t in change.transfers} <= {"a", "b"}

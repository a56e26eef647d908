"""Chained replica placement (``placement: chained``, issue 15 item 4): the replicas of
every range a server leads are the servers after it in sorted id order. Pure logic: the
owner tuples, what a death, a join and a leave change and copy, that the ring is a
function of the member set alone, and the option's validation."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psd.cluster.assignment import Assignment
from psd.cluster.ring import (consistent_hash, joint, on_server_death, on_server_join, on_server_leave,
                              overlay, rebalance)
from psd.config import PLACEMENTS, config_from_dict
from psd.errors import ConfigError
from psd.jobs.spec import parse_job

from test_ring import check_plan, check_structure, server_id, server_sets, vnode_counts

replications = st.integers(1, 4)
#: half test_ring's examples: the same strategies, and the suite is near its time budget
SETTINGS = settings(max_examples=50, deadline=None)


def after(members, server: str, n: int) -> tuple[str, ...]:
    """``server`` and the ``n - 1`` servers after it, cyclic, in sorted id order."""
    order = sorted(members)
    i = order.index(server)
    return tuple(order[(i + k) % len(order)] for k in range(min(n, len(order))))


def chained(servers, version=1, *, vnodes=16, replication=2, **kw) -> Assignment:
    return consistent_hash(servers, version, vnodes=vnodes, replication=replication, placement="chained", **kw)


def preceding(members, server: str, n: int) -> set[str]:
    """The ``n`` servers before ``server`` in sorted id order (cyclic; itself excluded)."""
    order = sorted(members)
    i = order.index(server)
    return {order[(i - k) % len(order)] for k in range(1, n + 1)} - {server}


def changed(old: Assignment, new: Assignment) -> list[tuple]:
    """The pieces whose owner tuple differs between two rings: (piece, old, new)."""
    return [(piece, was, now) for piece, was, now in overlay(old, new) if was != now]


# -- owner tuples --------------------------------------------------------------------------------
@SETTINGS
@given(server_sets, vnode_counts, replications)
def test_every_range_is_replicated_on_the_servers_after_its_primary(servers, vnodes, replication):
    a = chained(servers, vnodes=vnodes, replication=replication)
    check_structure(a, servers, replication)
    for o in a.owners:
        assert o == after(servers, o[0], replication)
    # the primaries are the hash's, as with spread placement: only the replicas differ
    spread = consistent_hash(servers, 1, vnodes=vnodes, replication=replication)
    assert [(p, o[0]) for p, o, _ in overlay(a, a)] == [(p, o[0]) for p, o, _ in overlay(spread, spread)]


def test_three_servers_at_replication_two_have_three_owner_tuples_not_six():
    servers = ["S0", "S1", "S2"]
    assert set(chained(servers).owners) == {("S0", "S1"), ("S1", "S2"), ("S2", "S0")}
    assert len(set(consistent_hash(servers, 1, vnodes=16, replication=2).owners)) == 6
    # ids sort as text: S10 comes between S1 and S2, the same for every node
    assert set(chained(["S1", "S2", "S10"]).owners) == {("S1", "S10"), ("S10", "S2"), ("S2", "S1")}


@SETTINGS
@given(server_sets, vnode_counts, replications, st.randoms(use_true_random=False))
def test_every_server_and_the_scheduler_compute_the_same_ring(servers, vnodes, replication, rnd):
    """The ring depends on the member set only: not on the order members are listed in,
    repeats, or the addresses; and its wire form (what servers and workers are sent)
    carries it whole."""
    listed = sorted(servers) * 2
    rnd.shuffle(listed)
    addr = {s: f"tcp://{i}" for i, s in enumerate(sorted(servers))}
    a = chained(servers, 3, vnodes=vnodes, replication=replication, addresses=addr)
    b = chained(listed, 3, vnodes=vnodes, replication=replication, addresses=dict(reversed(addr.items())))
    assert a == b
    wire = msgpack.unpackb(msgpack.packb(a.to_wire()), strict_map_key=False)
    assert Assignment.from_wire(wire) == a


# -- membership changes --------------------------------------------------------------------------
@SETTINGS
@given(st.sets(server_id, min_size=2, max_size=8), vnode_counts, st.integers(2, 4), st.data())
def test_death_promotes_the_successor_and_loses_nothing(servers, vnodes, replication, data):
    dead = data.draw(st.sampled_from(sorted(servers)))
    survivors = servers - {dead}
    cur = chained(servers, 4, vnodes=vnodes, replication=replication)
    ring, transfers, lost = on_server_death(cur, dead, servers, vnodes=vnodes, replication=replication,
                                            placement="chained")
    assert ring == chained(survivors, 5, vnodes=vnodes, replication=replication)
    assert lost == [] and all(dead not in (t.src, t.dst) for t in transfers)
    # while the copies run (the joint ring), the dead server's successor leads all it led
    successor = after(servers, dead, 2)[1]
    mid = joint(cur, ring, survivors, 6)
    for r in cur.led_by(dead):
        assert mid.owners_at(r.begin)[0] == successor
    # and is the source of every copy of them
    for t in transfers:
        if cur.owners_at(t.range.begin)[0] == dead:
            assert t.src == successor
    # only the dead server's arcs and those of its predecessors change owners
    touched = preceding(servers, dead, replication - 1) | {dead}
    for _piece, was, _now in changed(cur, ring):
        assert was[0] in touched
    # after the copies every owner in the new ring holds every key it owns
    holds = {s: cur.ranges_of(s) for s in survivors}
    for t in transfers:
        holds[t.dst].append(t.range)
    for piece, _, now in overlay(cur, ring):
        for s in now:
            assert any(r.begin <= piece.begin and piece.end <= r.end for r in holds[s])
    check_plan(cur, ring, survivors)


@SETTINGS
@given(server_sets, server_id, vnode_counts, replications)
def test_join_moves_only_what_it_must(servers, joining, vnodes, replication):
    """A joiner takes the arcs its points hash to (with its chain) and enters the chains
    of its predecessors; nothing else changes owners, and copies go only to it and, for
    the arcs it now leads, to its successors."""
    servers = servers - {joining}
    if not servers:
        return
    members = servers | {joining}
    cur = chained(servers, 1, vnodes=vnodes, replication=replication)
    ring, transfers, lost = on_server_join(cur, joining, servers, vnodes=vnodes, replication=replication,
                                           address="tcp://new", placement="chained")
    assert lost == [] and ring == chained(members, 2, vnodes=vnodes, replication=replication,
                                          addresses={joining: "tcp://new"})
    touched = preceding(members, joining, replication - 1) | {joining}
    for _piece, was, now in changed(cur, ring):
        assert now[0] in touched
        if now[0] != joining:
            assert was[0] == now[0]  # a predecessor keeps leading; only its chain takes the joiner in
    successors = set(after(members, joining, replication))
    for t in transfers:
        assert t.dst in successors and t.src in servers
        if t.dst != joining:
            assert all(o[0] == joining for o in ring.owners[ring.find(t.range.begin):ring.find(t.range.end - 1) + 1])
    check_plan(cur, ring, servers)


@SETTINGS
@given(st.sets(server_id, min_size=2, max_size=8), vnode_counts, replications, st.data())
def test_leave_drains_from_the_leaver_and_moves_only_what_it_must(servers, vnodes, replication, data):
    leaving = data.draw(st.sampled_from(sorted(servers)))
    staying = servers - {leaving}
    cur = chained(servers, 1, vnodes=vnodes, replication=replication)
    ring, transfers, lost = on_server_leave(cur, leaving, servers, vnodes=vnodes, replication=replication,
                                            version=10, placement="chained")
    assert lost == [] and ring == chained(staying, 10, vnodes=vnodes, replication=replication)
    assert all(t.dst != leaving for t in transfers)
    for t in transfers:  # where it led it hands its own data over
        if cur.owners_at(t.range.begin)[0] == leaving:
            assert t.src == leaving
    touched = preceding(servers, leaving, replication - 1) | {leaving}
    for _piece, was, _now in changed(cur, ring):
        assert was[0] in touched
    check_plan(cur, ring, servers)


def test_switching_placement_is_a_ring_change_like_any_other():
    """A cluster whose config changes placement moves to the new ring at its next change
    (same members): only replicas move, every primary stays."""
    servers = {"S0", "S1", "S2", "S3"}
    cur = consistent_hash(servers, 1, vnodes=16, replication=2)
    ring, transfers, lost = rebalance(cur, servers, servers, vnodes=16, replication=2, placement="chained")
    assert ring == chained(servers, 2) and lost == [] and transfers
    for piece, was, now in overlay(cur, ring):
        assert was[0] == now[0]
    check_plan(cur, ring, servers)


# -- the option ----------------------------------------------------------------------------------
def test_an_unknown_placement_is_refused_by_name():
    with pytest.raises(ValueError, match=r"placement must be one of spread, chained, got 'ring'"):
        consistent_hash(["a"], 1, placement="ring")
    with pytest.raises(ConfigError) as err:
        config_from_dict({"placement": "chain"}, "cluster.yaml")
    assert str(err.value) == "cluster.yaml: placement: expected one of spread, chained, got 'chain'"
    assert PLACEMENTS[0] == "spread" and config_from_dict({}).placement == "spread"


def test_a_job_file_names_a_bad_placement_in_its_cluster_section():
    from psd.apps import APPS
    job = {"app": "cms", "servers": 3, "workers": 1, "cluster": {"replication": 2, "placement": "chaned"}}
    with pytest.raises(ConfigError, match=r"job.yaml: cluster: placement: expected one of spread, chained, "
                                          r"got 'chaned'"):
        parse_job(job, "job.yaml", APPS)
    job["cluster"]["placement"] = "chained"
    assert parse_job(job, "job.yaml", APPS).cluster["placement"] == "chained"


def test_a_death_copies_more_from_fewer_servers_when_chained():
    """The trade-off in numbers (docs/design-decisions.md, decision 120): the key space
    copied after a death (the mean over each member dying) and the servers it is copied
    from, chained against spread, at replication 2."""
    def death(placement: str, n: int) -> tuple[float, int]:
        servers = {f"S{i}" for i in range(n)}
        cur = consistent_hash(servers, 1, vnodes=16, replication=2, placement=placement)
        total, sources = 0, set()
        for dead in sorted(servers):
            _ring, transfers, _ = on_server_death(cur, dead, servers, vnodes=16, replication=2, placement=placement)
            total += sum(t.range.size for t in transfers)
            if dead == "S0":
                sources = {t.src for t in transfers}
        return total / 2**64 / n, len(sources)
    for n in (5, 8, 16):
        (spread, spread_from), (chain, chain_from) = death("spread", n), death("chained", n)
        assert chain > spread and chain_from == 2 < spread_from, (n, spread, chain, spread_from, chain_from)

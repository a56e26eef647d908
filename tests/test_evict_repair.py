"""Copies of an evicting table that came to differ are repaired (decision 153).

An evict record can miss a copy (its primary dies after sending it to some replicas, or
a replica at a newer ring refuses it), and a push can reach two copies at different
points of their sequences (a worker's resend to a new primary that one copy had applied
and the other not). These tests drive ``ServerCore``s through each interleaving, with no
sockets and no clock: a new primary aligns its replicas' rows with its own, a replica's
answer to a forward says whether it applied the push then or before, and a record from
an older ring deletes what its sender still leads.
"""
from __future__ import annotations

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.codec import Message
from psd.codec.message import error_reply
from psd.config import ClusterConfig
from psd.core.effects import Ask, Refuse, Reply
from psd.core.server import ServerCore
from psd.errors import ProtocolError
from psd.schema import TableSpec
from psd.store.table import _digests

SPEC = TableSpec("b", 1, "int64", "sum", {"max_rows": 3})
A, B = Range(0, 1000), Range(1000, KEY_SPACE_END)
NODES = ("S0", "S1", "S2")
ADDRS = {s: f"tcp://{s}" for s in NODES}


class Cluster:
    """Cores that talk through a queue of their asks, delivered when a test says."""

    def __init__(self, owners_a: tuple, owners_b: tuple = ("S0",)):
        self.cores: dict[str, ServerCore] = {}
        self.asks: list[tuple[str, Ask]] = []
        self.now = 0.0
        self.older: set[str] = set()  # nodes whose answers leave out meta.applied
        for node in NODES:
            core = ServerCore(ClusterConfig(security="none", consistency="eventual"), secure=False)
            core.node_id = node
            core.ring = self.ring(1, owners_a, owners_b)
            core._create(SPEC)
            core.fence.confirmed(0.0)
            self.cores[node] = core

    @staticmethod
    def ring(version: int, owners_a: tuple, owners_b: tuple) -> Assignment:
        return Assignment(version=version, ranges=(A, B), owners=(owners_a, owners_b), addresses=ADDRS)

    def take(self, node: str, effects: list) -> list:
        self.asks += [(node, e) for e in effects if isinstance(e, Ask)]
        return [e for e in effects if not isinstance(e, Ask)]

    def push(self, node: str, rid: int, keys, value: int = 1, worker: str = "W0") -> list:
        keys = np.array(keys, np.uint64)
        msg = Message("push", id=rid, sender=worker, table="b", meta={"rid": rid},
                      arrays=[keys, np.full((keys.size, 1), value, np.int64)])
        return self.take(node, self.cores[node].handle(None, msg, self.now))

    def set_ring(self, node: str, version: int, owners_a: tuple, owners_b: tuple = ("S0",)) -> None:
        ring = self.ring(version, owners_a, owners_b)
        out = self.take(node, self.cores[node].control(Message("ring", meta={"ring": ring.to_wire()}), self.now))
        assert not [e for e in out if isinstance(e, Refuse)], out
        self.tick(node)  # (alignments go from ticks, not from the ring change)

    def tick(self, node: str) -> None:
        """The bounds' part of a tick (what it sends, without the liveness pings)."""
        core = self.cores[node]
        core.fence.confirmed(self.now)
        core.bounds.tick(self.now)
        self.take(node, core._take())

    def deliver(self, op: str | None = None, to: str | None = None, drop: bool = False) -> int:
        """Deliver (or ``drop``) the queued asks of ``op`` to ``to`` (None: any), in order,
        and their answers; returns how many."""
        todo = [(src, a) for src, a in self.asks if (op is None or a.msg.op == op) and (to is None or a.node == to)]
        for src, ask in todo:
            self.asks.remove((src, ask))
            if drop:
                continue
            ask.msg.sender = src
            dst = self.cores[ask.node]
            for e in self.take(ask.node, dst.handle(None, ask.msg, self.now)):
                reply = e.msg if isinstance(e, Reply) else error_reply(e.request, e.error, ask.node)
                if ask.node in self.older:
                    reply.meta.pop("applied", None)
                self.take(src, self.cores[src].answered(ask.token, reply, None, self.now))
        return len(todo)

    def settle(self) -> None:
        while self.deliver():
            pass

    def rows(self, node: str) -> dict[int, int]:
        table = self.cores[node].tables["b"]
        keys, _ = table.digests_in(0, KEY_SPACE_END)
        return dict(zip(keys.tolist(), table.pull(keys)[:, 0].tolist()))


def _evicted_on_one_replica(drop_to: str) -> Cluster:
    """S0 leads A with replicas S1 and S2; four pushes of one key each, so the fourth
    evicts key 1 (three rows a primary), and the evict record to ``drop_to`` is lost
    with S0, which dies: the next ring makes S1 the primary."""
    c = Cluster(("S0", "S1", "S2"))
    for rid, key in enumerate((1, 2, 3, 4), 1):
        c.push("S0", rid, [key])
        c.deliver("replicate")
    c.deliver("evict", to=drop_to, drop=True)
    c.settle()
    assert 1 not in c.rows("S0")
    return c


def test_a_new_primary_aligns_a_replica_that_missed_its_predecessors_evict_record():
    c = _evicted_on_one_replica(drop_to="S2")
    assert 1 in c.rows("S2") and 1 not in c.rows("S1")
    c.set_ring("S2", 2, ("S1", "S2"))
    c.set_ring("S1", 2, ("S1", "S2"))  # S1 leads A anew: it aligns S2 with itself
    c.settle()
    assert c.rows("S1") == c.rows("S2") == {2: 1, 3: 1, 4: 1}


def test_a_new_primary_that_missed_the_record_evicts_what_its_replica_lacks():
    c = _evicted_on_one_replica(drop_to="S1")
    assert 1 in c.rows("S1") and 1 not in c.rows("S2")
    c.set_ring("S2", 2, ("S1", "S2"))
    c.set_ring("S1", 2, ("S1", "S2"))
    c.settle()  # S2 lacks key 1: S1 evicts it, and its record reaches S2
    assert c.rows("S1") == c.rows("S2") == {2: 1, 3: 1, 4: 1}
    # later pushes agree too: a key made again starts from nothing on both
    c.push("S1", 9, [1], value=4)
    c.settle()
    assert c.rows("S1") == c.rows("S2")


def test_an_alignment_goes_from_ticks_a_bounded_part_at_a_time(monkeypatch):
    """The ring change only plans it (digesting millions of rows there froze the event
    loop for seconds); each tick sends ALIGN_KEYS keys, over disjoint sub-ranges."""
    monkeypatch.setattr("psd.core.bounds.ALIGN_KEYS", 1)
    c = Cluster(("S0", "S1", "S2"))
    for rid, key in enumerate((5, 6, 7), 1):
        c.push("S0", rid, [key])
    c.settle()
    c.cores["S2"].tables["b"].push(np.array([6, 9], np.uint64), np.array([[7], [1]], np.int64))  # (rows that differ)
    c.set_ring("S2", 2, ("S1", "S2"))
    s1 = c.cores["S1"]
    s1.control(Message("ring", meta={"ring": c.ring(2, ("S1", "S2"), ("S0",)).to_wire()}), c.now)
    assert not [e for e in s1._take() if isinstance(e, Ask) and e.msg.op == "align"]
    covers = []
    for _ in range(5):
        c.tick("S1")
        sent = [a for _, a in c.asks if a.msg.op == "align"]
        assert len(sent) <= 1 and all(a.msg.arrays[0].size <= 1 for a in sent)
        covers += [pair for a in sent for pair in a.msg.meta["cover"]]
        c.settle()
    assert covers == [[0, 5], [6, 6], [7, 999]]
    assert c.rows("S1") == c.rows("S2") == {5: 1, 7: 1}


def test_an_alignment_whose_answer_is_lost_goes_again_after_request_timeout():
    """Nothing resends an align whose answer was lost with its connection: its call is
    given up after request_timeout (freeing it) and the alignment planned again."""
    c = Cluster(("S0", "S1", "S2"))
    c.cores["S1"].tables["b"].push(np.array([5], np.uint64), np.array([[1]], np.int64))  # (S2 lacks it)
    c.set_ring("S2", 2, ("S1", "S2"))
    c.set_ring("S1", 2, ("S1", "S2"))
    (src, ask), = [(s, a) for s, a in c.asks if a.msg.op == "align"]
    c.asks.remove((src, ask))
    ask.msg.sender = src
    c.take("S2", c.cores["S2"].handle(None, ask.msg, c.now))  # (its answer lost)
    s1 = c.cores["S1"]
    c.now += s1.config.request_timeout
    c.tick("S1")  # (gives up on it and sends it again)
    assert c.deliver("align") == 1
    c.settle()
    assert not s1.calls.outstanding() and not s1.bounds._asked
    assert c.rows("S1") == c.rows("S2") == {}


def test_an_alignment_compares_values_and_waits_for_the_replicas_ring():
    c = Cluster(("S0", "S1", "S2"))
    c.push("S0", 1, [5])
    c.settle()
    c.cores["S2"].tables["b"].push(np.array([5], np.uint64), np.array([[7]], np.int64))  # (a row that differs)
    c.set_ring("S1", 2, ("S1", "S2"))
    assert c.deliver("align") == 1  # S2 is still at ring v1: refused, sent again later
    assert c.rows("S2") == {5: 8}
    c.set_ring("S2", 2, ("S1", "S2"))
    c.now += c.cores["S1"].config.heartbeat_interval
    c.take("S1", c.cores["S1"].tick(c.now))
    c.settle()
    assert c.rows("S1") == c.rows("S2") == {}


def test_an_alignment_skips_ranges_being_copied_in_and_is_not_sent_while_the_gate_keeps_pushes():
    c = Cluster(("S0", "S1", "S2"))
    c.push("S0", 1, [5])
    c.settle()
    s2 = c.cores["S2"]
    s2.tables["b"].push(np.array([6], np.uint64), np.array([[1]], np.int64))
    c.set_ring("S2", 2, ("S1", "S2"))
    s2.incoming = [A]  # (a copy of A is on its way to S2: it replaces S2's rows of A)
    s1 = c.cores["S1"]
    s1.gate.hold_all()  # (a checkpoint's hold: our rows are not yet what we forwarded)
    c.set_ring("S1", 2, ("S1", "S2"))
    assert c.deliver("align") == 0
    s1.gate.release_cut()
    c.take("S1", s1.tick(c.now))
    assert c.deliver("align") == 1
    assert c.rows("S2") == {5: 1, 6: 1}


def test_an_alignment_waits_for_the_primarys_restore_and_skips_what_the_replica_restores():
    """A checkpoint replaces the rows of a range being restored: aligning them meanwhile
    evicted restored rows on one copy and not the other (the primary defers those pieces;
    the replica skips them, as it does a range being copied in)."""
    c = Cluster(("S0", "S1", "S2"))
    c.push("S0", 1, [5])
    c.settle()
    s1, s2 = c.cores["S1"], c.cores["S2"]
    c.set_ring("S2", 2, ("S1", "S2"))
    s1.restoring = [A]
    c.set_ring("S1", 2, ("S1", "S2"))
    c.tick("S1")
    assert c.deliver("align") == 0 and s1.bounds._aligns  # (deferred, not dropped)
    s1.restoring = []  # (its restore is done; S2's is not)
    s2.restoring = [A]
    s2.tables["b"].push(np.array([6], np.uint64), np.array([[1]], np.int64))  # (restored there already)
    c.tick("S1")
    assert c.deliver("align") == 1
    c.settle()
    assert c.rows("S1") == {5: 1} and c.rows("S2") == {5: 1, 6: 1}


def _resent_to_the_new_primary(c: Cluster) -> None:
    """W0's push reaches S2 from S0, which dies before S1 gets it; S1 leads next, and W0
    sends the push again to it."""
    c.push("S0", 1, [7], value=2)
    c.deliver("replicate", to="S2")
    c.deliver("replicate", to="S1", drop=True)
    for node in ("S2", "S1"):
        c.set_ring(node, 2, ("S1", "S2"))
    c.settle()
    c.push("S1", 1, [7], value=2)
    c.settle()


def test_a_push_applied_anew_by_the_primary_but_before_by_a_replica_is_evicted():
    """S2 applied W0's push from S0, which died before S1 got it; W0 sends it again to
    S1, which applies it now: S2 applied it at another point of the sequence (before
    evictions S1 made since), so the two rows may differ. S1 evicts its keys."""
    c = Cluster(("S0", "S1", "S2"))
    _resent_to_the_new_primary(c)
    assert c.rows("S1") == c.rows("S2") == {}
    assert c.cores["S1"].tables["b"].bounded.counts["evicted"] == 1


def test_a_push_resent_by_the_primary_and_applied_anew_by_a_replica_is_evicted():
    c = Cluster(("S0", "S1", "S2"))
    c.push("S0", 1, [7], value=2)
    c.deliver("replicate", to="S1")
    c.deliver("replicate", to="S2", drop=True)
    for node in ("S2", "S1"):
        c.set_ring(node, 2, ("S1", "S2"))
    c.settle()  # (the alignment: S2 lacks key 7, so S1 evicts it)
    c.push("S1", 1, [7], value=2)  # S1 applied it before: it forwards it again, S2 applies it now
    c.settle()
    assert c.rows("S1") == c.rows("S2") == {}


def test_a_forward_sent_again_for_a_lost_answer_evicts_nothing():
    """S2 applies a forward whose answer is lost; the next forward's answer shows it, and
    S0 sends it again: S2 answers from its seen ids that it applied it before. That is
    the first send, not a different point of the sequence: the acknowledged push stays."""
    c = Cluster(("S0", "S1", "S2"))
    c.push("S0", 1, [7], value=5)
    (src, ask), = [(s, a) for s, a in c.asks if a.msg.op == "replicate" and a.node == "S2"]
    c.asks.remove((src, ask))
    ask.msg.sender = src
    c.take("S2", c.cores["S2"].handle(None, ask.msg, c.now))  # (applied; its answer lost)
    c.deliver("replicate", to="S1")
    c.push("S0", 2, [8], value=1)
    c.settle()
    s0 = c.cores["S0"]
    assert s0.calls.resent == 1 and s0.tables["b"].bounded.counts["evicted"] == 0
    assert c.rows("S0") == c.rows("S1") == c.rows("S2") == {7: 5, 8: 1}


def test_forwards_both_copies_apply_at_the_same_point_evict_nothing():
    c = Cluster(("S0", "S1", "S2"))
    for rid in (1, 2):
        c.push("S0", rid, [7], value=1)
        c.settle()
    c.push("S0", 2, [7], value=1)  # (a resend both copies applied before)
    c.settle()
    assert c.rows("S0") == c.rows("S1") == c.rows("S2") == {7: 2}
    assert all(c.cores[n].tables["b"].bounded.counts["evicted"] == 0 for n in NODES)


def test_an_older_replica_that_says_nothing_of_what_it_applied_is_taken_at_its_word():
    c = Cluster(("S0", "S1", "S2"))
    c.older.add("S2")  # (a replica older than decision 153: no meta.applied in its answers,
    c.cores["S2"].handlers.pop("align")  # and no alignments)
    _resent_to_the_new_primary(c)
    assert c.rows("S1") == c.rows("S2") == {7: 2}
    assert c.cores["S1"].tables["b"].bounded.counts["evicted"] == 0


def test_an_older_replica_refusing_an_alignment_is_not_asked_again():
    c = Cluster(("S0", "S1", "S2"))
    c.cores["S2"].handlers.pop("align")  # (a server older than decision 153)
    for node in ("S2", "S1"):
        c.set_ring(node, 2, ("S1", "S2"))
    assert c.deliver("align") == 1
    c.now += 10.0
    c.take("S1", c.cores["S1"].tick(c.now))
    assert c.deliver("align") == 0


def test_an_evict_record_from_an_older_ring_deletes_what_its_sender_still_leads():
    """S0 evicts keys of A and B at ring v1; S1, already at v2 where S2 leads B, deletes
    those of A (S0 still leads A) and answers, rather than refusing the whole record and
    keeping rows S0 deleted (the keys of B are S2's to align)."""
    c = Cluster(("S0", "S1"), ("S0", "S1"))
    s0 = c.cores["S0"]
    for key in (10, 2000):
        s0.tables["b"].push(np.array([key], np.uint64), np.array([[1]], np.int64))
        c.cores["S1"].tables["b"].push(np.array([key], np.uint64), np.array([[1]], np.int64))
    c.set_ring("S1", 2, ("S0", "S1"), ("S2", "S1"))
    s0.bounds.evict_differing(s0.tables["b"], np.array([10, 2000], np.uint64), c.now)
    c.take("S0", s0._take())
    out = []
    for src, ask in c.asks:
        ask.msg.sender = src
        out += c.cores[ask.node].handle(None, ask.msg, c.now)
    assert [type(e) for e in out] == [Reply]
    assert c.rows("S1") == {2000: 1}


def test_answers_are_trusted_only_for_what_was_asked():
    """An alignment's answer evicts only keys inside the pieces aligned, and a forward's
    answer whose meta.applied is not two booleans changes nothing."""
    c = Cluster(("S0", "S1", "S2"), ("S1", "S2"))
    s1 = c.cores["S1"]
    s1.tables["b"].push(np.array([5, 2000], np.uint64), np.array([[1], [1]], np.int64))
    c.cores["S2"].tables["b"].push(np.array([5, 2000], np.uint64), np.array([[1], [1]], np.int64))
    c.set_ring("S2", 2, ("S1", "S2"), ("S1", "S2"))
    c.set_ring("S1", 2, ("S1", "S2"), ("S1", "S2"))  # (it leads A anew: aligns A only)
    (src, ask), = [(s, a) for s, a in c.asks if a.msg.op == "align"]
    c.asks.remove((src, ask))
    lying = ask.msg.reply(arrays=[np.array([2000], np.uint64)])  # (a key of B, which it led already)
    c.take("S1", s1.answered(ask.token, lying, None, c.now))
    assert c.rows("S1") == {5: 1, 2000: 1}
    c.push("S1", 1, [6])
    (src, ask), = [(s, a) for s, a in c.asks if a.msg.op == "replicate"]
    c.asks.remove((src, ask))
    odd = ask.msg.reply(meta={"applied": [1, "yes"]})
    c.take("S1", s1.answered(ask.token, odd, None, c.now))
    assert c.rows("S1") == {5: 1, 6: 1, 2000: 1} and s1.tables["b"].bounded.counts["evicted"] == 0


def test_an_alignment_is_checked_whole():
    c = Cluster(("S1", "S2"))
    s2 = c.cores["S2"]
    keys = np.array([5, 3], np.uint64)
    bad = Message("align", sender="S1", table="b", ring=1, meta={"cover": [[0, 999]]},
                  arrays=[keys, np.zeros(2, np.uint64)])
    out = s2.handle(None, bad, 0.0)
    assert [type(e) for e in out] == [Refuse]
    outside = Message("align", sender="S1", table="b", ring=1, meta={"cover": [[0, 9]]},
                      arrays=[np.array([50], np.uint64), np.zeros(1, np.uint64)])
    (refused,) = s2.handle(None, outside, 0.0)
    assert isinstance(refused.error, ProtocolError)


def test_row_digests_tell_rows_apart():
    rows = np.array([[1, 2], [1, 2], [2, 1], [0, 0], [0, -1 << 62]], np.int64)
    d = _digests(rows)
    assert d[0] == d[1] and len(set(d.tolist())) == 4
    # (rows and their negations collided: a multiply alone carries a difference only upward)
    signs = np.array([[1.5, 2.5], [-1.5, -2.5], [3.0, -7.0], [-3.0, 7.0]])
    assert len(set(_digests(signs).tolist())) == 4
    odd = np.arange(6, dtype=np.float32).reshape(2, 3)  # (12 bytes a row: padded)
    assert _digests(odd).shape == (2,) and _digests(odd)[0] != _digests(odd)[1]

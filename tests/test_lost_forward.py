"""A forward lost at the end of its stream: the primary finds it and sends it again.

The simulation found it (seed 6024, decision 125): a primary applied a push and
forwarded it; the connection to the replica dropped with the forward on it, and nothing
followed on that stream to show the replica a gap. The push waited request_timeout and
failed, applied on the primary and not on the replica: copies disagreed for good. These
tests drive two ``ServerCore``s through that interleaving, with no sockets and no clock.
"""
from __future__ import annotations

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.codec import Message
from psd.codec.message import error_reply
from psd.config import ClusterConfig
from psd.core.effects import Ask, Forget, Refuse, Reply
from psd.core.server import ServerCore
from psd.schema import TableSpec

SPEC = TableSpec("t", 1, "int64")
RING = Assignment(version=1, ranges=(Range(0, KEY_SPACE_END),), owners=(("S0", "S1"),),
                  addresses={s: f"tcp://{s}" for s in ("S0", "S1")})
KEYS = np.array([10, 20], np.uint64)


def _core(node: str) -> ServerCore:
    core = ServerCore(ClusterConfig(security="none"), secure=False)
    core.node_id = node
    core.ring = RING
    core._create(SPEC)
    core.fence.confirmed(0.0)
    return core


def _push(primary: ServerCore, rid: int, value: int, now: float) -> Ask:
    out = primary.handle("W0", Message("push", id=rid, sender="W0", table="t", meta={"rid": rid},
                                       arrays=[KEYS, np.full((2, 1), value, np.int64)]), now)
    forwards = [e for e in out if isinstance(e, Ask) and e.msg.op == "replicate"]
    assert len(forwards) == 1 and not [e for e in out if isinstance(e, (Reply, Refuse))], out
    return forwards[0]


def _deliver(ask: Ask, replica: ServerCore, primary: ServerCore, now: float) -> list:
    """``ask`` reaches the replica; its answer reaches the primary: the primary's effects."""
    msg = ask.msg
    msg.sender = primary.node_id
    answers = [e for e in replica.handle("S0", msg, now) if isinstance(e, (Reply, Refuse))]
    assert len(answers) == 1, answers
    a = answers[0]
    reply = a.msg if isinstance(a, Reply) else error_reply(a.request, a.error, replica.node_id)
    return primary.answered(ask.token, reply, None, now)


def _ping_answered(primary: ServerCore, replica: ServerCore, now: float) -> list:
    pings = [e for e in primary.tick(now) if isinstance(e, Ask) and e.msg.op == "peer_ping"]
    assert len(pings) == 1, pings
    return _deliver(pings[0], replica, primary, now)


def _acks(effects: list) -> list:
    return [e for e in effects if isinstance(e, Reply) and e.route == "W0"]


def test_a_forward_lost_last_on_its_stream_is_sent_again_after_a_later_ping_is_answered():
    primary, replica = _core("S0"), _core("S1")
    assert _acks(_deliver(_push(primary, 1, 1, 0.0), replica, primary, 0.0))  # push 1 acked
    _push(primary, 2, 4, 0.01)  # its forward is lost with the connection; nothing follows it
    out = _ping_answered(primary, replica, 0.05)
    probes = [e for e in out if isinstance(e, Ask) and e.msg.op == "peer_ping"]
    assert len(probes) == 1 and probes[0].msg.meta.get("sq") is not None, \
        f"a ping answered after an unanswered forward must probe the stream, got {out}"
    # the replica admitted forward 0 only: the probe is refused, and the stream sends again
    out = _deliver(probes[0], replica, primary, 0.06)
    again = [e for e in out if isinstance(e, Ask)]
    assert [e.msg.op for e in again] == ["replicate", "peer_ping"]
    assert again[0].msg.meta["rid"] == 2 and again[0].msg.meta["sq"][1] == 0  # a new epoch, from 0
    acks = _acks(_deliver(again[0], replica, primary, 0.07))
    assert len(acks) == 1 and acks[0].msg.id == 2  # the worker's push 2 is acknowledged now
    assert not [e for e in _deliver(again[1], replica, primary, 0.07) if isinstance(e, Ask)]
    for core in (primary, replica):  # both copies hold both pushes, once each
        assert core.tables["t"].pull(KEYS).ravel().tolist() == [5, 5]
    assert primary.counters["probes"] == 1 and not primary._probes


def test_no_probe_while_every_forward_is_answered():
    primary, replica = _core("S0"), _core("S1")
    _deliver(_push(primary, 1, 1, 0.0), replica, primary, 0.0)
    out = _ping_answered(primary, replica, 0.05)
    assert not [e for e in out if isinstance(e, Ask)] and primary.counters["probes"] == 0


def test_a_forward_whose_answer_was_lost_is_sent_again_not_applied_again_and_its_push_acked():
    """The probe is admitted (nothing was lost on the way there), so the forward's answer
    was: the forward goes again, the replica answers it without applying it again, and
    the push is acknowledged now instead of failing after request_timeout."""
    primary, replica = _core("S0"), _core("S1")
    fwd = _push(primary, 1, 1, 0.0)
    fwd.msg.sender = "S0"
    replica.handle("S0", fwd.msg, 0.0)  # applied on the replica; its answer is lost
    probes = [e for e in _ping_answered(primary, replica, 0.05) if isinstance(e, Ask)]
    assert [e.msg.op for e in probes] == ["peer_ping"]
    out = _deliver(probes[0], replica, primary, 0.06)
    assert [e.token for e in out if isinstance(e, Forget)] == [fwd.token]
    again = [e for e in out if isinstance(e, Ask)]
    assert [(e.msg.op, e.msg.meta["rid"]) for e in again] == [("replicate", 1)]
    acks = _acks(_deliver(again[0], replica, primary, 0.07))
    assert len(acks) == 1 and acks[0].msg.id == 1 and acks[0].msg.op == "ok"
    for core in (primary, replica):
        assert core.tables["t"].pull(KEYS).ravel().tolist() == [1, 1]
    assert primary.calls.outstanding() == 0 and not primary.acks.pending


def test_a_forward_whose_answer_was_lost_before_a_later_answered_one_is_sent_again_at_once():
    """Decision 139: a later forward on the stream answered shows the earlier one was
    admitted and answered at once, its answer lost; it is no longer pending on the stream
    (no probe would find it), so it goes again now, is applied once, and its push is acked."""
    primary, replica = _core("S0"), _core("S1")
    first = _push(primary, 1, 1, 0.0)
    first.msg.sender = "S0"
    replica.handle("S0", first.msg, 0.0)  # applied on the replica; its answer is lost
    out = _deliver(_push(primary, 2, 4, 0.01), replica, primary, 0.01)
    assert [e.msg.id for e in _acks(out)] == [2]
    assert [e.token for e in out if isinstance(e, Forget)] == [first.token]
    again = [e for e in out if isinstance(e, Ask)]
    assert [(e.msg.op, e.msg.meta["rid"]) for e in again] == [("replicate", 1)]
    acks = _acks(_deliver(again[0], replica, primary, 0.02))
    assert len(acks) == 1 and acks[0].msg.id == 1 and acks[0].msg.op == "ok"
    for core in (primary, replica):
        assert core.tables["t"].pull(KEYS).ravel().tolist() == [5, 5]
    assert primary.calls.outstanding() == 0 and not primary.acks.pending


def test_a_probe_lost_as_well_is_forgotten_not_left_waiting():
    """A probe lost with the connection (a replica that drops every message over its
    limit drops the resent forward and the probe behind it) must not wait for good: the
    next answered ping forgets it and sends one fresh probe, and request_timeout ends a
    probe no ping outlived."""
    primary, replica = _core("S0"), _core("S1")
    _push(primary, 1, 1, 0.0)  # lost
    first = [e for e in _ping_answered(primary, replica, 0.05) if isinstance(e, Ask)]
    assert [e.msg.op for e in first] == ["peer_ping"]  # the probe, lost too
    out = _ping_answered(primary, replica, 1.0)
    assert [e.token for e in out if isinstance(e, Forget)] == [first[0].token]
    assert [e.msg.op for e in out if isinstance(e, Ask)] == ["peer_ping"]
    assert primary.counters["probes"] == 2 and len(primary._probes) == 1
    out = primary.tick(1.0 + primary.config.request_timeout)
    assert any(isinstance(e, Forget) for e in out) and not primary._probes


def test_a_probe_to_a_server_that_left_the_ring_is_forgotten():
    primary, replica = _core("S0"), _core("S1")
    _push(primary, 1, 1, 0.0)  # lost
    [probe] = [e for e in _ping_answered(primary, replica, 0.05) if isinstance(e, Ask)]
    alone = Assignment(version=2, ranges=(Range(0, KEY_SPACE_END),), owners=(("S0",),), addresses={"S0": "tcp://S0"})
    out = primary.control(Message("ring", meta={"ring": alone.to_wire(), "final": True}), 0.1)
    assert probe.token in [e.token for e in out if isinstance(e, Forget)] and not primary._probes
    assert primary.calls.outstanding() == 0, "nothing may wait for an answer from a server that left"


def test_a_liveness_ping_to_a_server_that_left_the_ring_is_forgotten():
    primary = _core("S0")
    [ping] = [e for e in primary.tick(0.05) if isinstance(e, Ask) and e.msg.op == "peer_ping"]  # unanswered
    alone = Assignment(version=2, ranges=(Range(0, KEY_SPACE_END),), owners=(("S0",),), addresses={"S0": "tcp://S0"})
    out = primary.control(Message("ring", meta={"ring": alone.to_wire(), "final": True}), 0.1)
    assert ping.token in [e.token for e in out if isinstance(e, Forget)]
    assert primary.calls.outstanding() == 0, "nothing may wait for an answer from a server that left"

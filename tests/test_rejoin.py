"""A server declared dead while it lived (frozen or cut off): what it acknowledges as it
wakes, and what it keeps when it registers again under a new name.

The pushes it acknowledged and keeps for the clock boundary must still be applied, though
the workers it waits for left while it was out of the cluster and their ``worker_left``
went to the live servers only (decision 146; seed 140 of the simulation's restore
settings). A range only it holds may be restored elsewhere ``restore_unavailable_after``
after its death: past its lease plus that long it acknowledges nothing there (decision
147). A ``ServerCore`` driven by hand: no sockets, no clock.
"""
from __future__ import annotations

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.codec import Message
from psd.config import ClusterConfig
from psd.core.effects import Refuse, Rejoin, Reply
from psd.core.server import ServerCore
from psd.schema import TableSpec

SPEC = TableSpec("t", 1, "int64")
A, B = Range(0, 1000), Range(1000, KEY_SPACE_END)
ADDRS = {s: f"tcp://{s}" for s in ("S0", "S1", "S2")}
KEYS = np.array([10, 20], np.uint64)


def _kept_push() -> ServerCore:
    """S0 leads A alone (replication 1), sequential; W0 pushed 5 to keys 10 and 20 at
    clock 0 and it was acked, kept until W1 finishes clock 0."""
    core = ServerCore(ClusterConfig(security="none", consistency="sequential", replication=1), secure=False)
    core.node_id = "S0"
    core.ring = Assignment(version=1, ranges=(A, B), owners=(("S0",), ("S1",)), addresses=ADDRS)
    core._create(SPEC)
    core.fence.confirmed(0.0)
    for w in ("W0", "W1"):
        core.handle(None, Message("clock", sender=w, meta={"clock": 0}), 0.0)
    out = core.handle(None, Message("push", id=1, sender="W0", table="t", clock=0, meta={"rid": 1},
                                    arrays=[KEYS, np.full((2, 1), 5, np.int64)]), 0.0)
    assert [type(e) for e in out] == [Reply] and out[0].msg.op == "ok"
    assert len(core.gate.kept()) == 1 and core.tables["t"].pull(KEYS).ravel().tolist() == [0, 0]
    return core


def _declared_dead_and_back(core: ServerCore, gone: list[str] | None) -> None:
    """The scheduler says S0 is dead; S0 registers again and is S2, with A given back."""
    out = core.heartbeat_answered({"known": True, "state": "dead"}, 5.0, 5.0)
    assert any(isinstance(e, Rejoin) for e in out)
    ring = Assignment(version=3, ranges=(A, B), owners=(("S2",), ("S1",)), addresses=ADDRS)
    meta = {"node": "S2", "ring": ring.to_wire(), "tables": [SPEC.to_wire()]}
    if gone is not None:
        meta["gone_workers"] = gone
    core.registered(meta, 5.1)


def test_a_kept_push_is_applied_when_its_workers_left_while_the_server_was_out():
    core = _kept_push()
    _declared_dead_and_back(core, ["W0", "W1"])  # both left meanwhile: nobody else will say so
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [5, 5]
    assert core.gate.kept() == [] and core.gate.live_workers() == set()



def test_a_kept_push_that_fails_does_not_leave_the_rejoin_half_done():
    """The first departed worker's leave releases a kept push whose apply raises: the
    error is logged, and the rejoin still finishes (both workers left, both watched)."""
    core = _kept_push()
    p = core.gate.policy(None)
    clock, seq, _apply, what = p._pushes[0]

    def fails():
        raise MemoryError("apply failed")
    p._pushes[0] = (clock, seq, fails, what)
    _declared_dead_and_back(core, ["W0", "W1"])
    assert core.node_id == "S2" and core.gate.live_workers() == set()
    assert {"W0", "W1"} <= set(core.forgetting)

def test_only_the_workers_listed_as_gone_leave_the_gate():
    core = _kept_push()
    _declared_dead_and_back(core, ["W0"])  # W1 is still in the group: its clock closes clock 0
    assert core.gate.live_workers() == {"W1"} and len(core.gate.kept()) == 1
    core.handle(None, Message("clock", sender="W1", meta={"clock": 1}), 5.2)
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [5, 5]


def test_an_answer_without_the_list_changes_nothing():
    core = _kept_push()
    _declared_dead_and_back(core, None)  # (an older scheduler)
    assert core.gate.live_workers() == {"W0", "W1"} and len(core.gate.kept()) == 1


def test_the_scheduler_lists_the_departed_workers_to_a_registering_server():
    from psd.core.scheduler import SchedulerCore
    core = SchedulerCore(ClusterConfig(security="none"), secure=False, now=0.0)

    def answer(msg: Message, now: float) -> Message:
        return next(e.msg for e in core.handle(None, msg, now) if isinstance(e, Reply) and e.msg.id == msg.id)

    assert [answer(Message("register", id=i, meta={"role": "worker"}), 0.0).meta["node"] for i in (1, 2)] \
        == ["W0", "W1"]
    answer(Message("leave", id=3, sender="W0"), 0.1)
    server = answer(Message("register", id=4, meta={"role": "server", "address": "tcp://s:1"}), 0.2)
    assert server.meta["gone_workers"] == ["W0"]
    assert "gone_workers" not in answer(Message("register", id=5, meta={"role": "worker"}), 0.3).meta


def _alone(restore_after: float) -> ServerCore:
    """S0 leads every key alone (replication 1), its lease last confirmed at time 0
    (lease: (2 x 4 - 1) x 0.1 s = 0.7 s)."""
    core = ServerCore(ClusterConfig(security="none", replication=1, heartbeat_interval=0.1, heartbeat_misses=4),
                      secure=False)
    core.node_id = "S0"
    core.ring = Assignment(version=1, ranges=(A, B), owners=(("S0",), ("S0",)), addresses=ADDRS)
    core._create(SPEC)
    core.fence.confirmed(0.0)
    core.restore_after = restore_after
    return core


def _push(core: ServerCore, rid: int, now: float) -> list:
    return core.handle(None, Message("push", id=rid, sender="W0", table="t", meta={"rid": rid},
                                     arrays=[KEYS, np.full((2, 1), 1, np.int64)]), now)


def test_a_range_only_it_holds_is_fenced_once_it_could_have_been_restored_elsewhere():
    core = _alone(0.5)
    assert [e.msg.op for e in _push(core, 1, 1.1) if isinstance(e, Reply)] == ["ok"]  # lease lapsed, grace holds
    out = _push(core, 2, 1.25)  # 0.7 + 0.5 s after its last confirmation: it may have been replaced
    assert [type(e) for e in out] == [Refuse] and out[0].error.code == "not_owner"
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [1, 1]  # nothing of the refused one applied
    core.heartbeat_answered({"known": True, "state": "active"}, 1.3, 1.31)
    assert [e.msg.op for e in _push(core, 3, 1.32) if isinstance(e, Reply)] == ["ok"]


def test_without_restores_a_range_only_it_holds_is_always_served():
    core = _alone(0)
    assert [e.msg.op for e in _push(core, 1, 100.0) if isinstance(e, Reply)] == ["ok"]


def test_the_scheduler_tells_a_server_how_soon_its_ranges_may_be_restored():
    from psd.core.scheduler import SchedulerCore
    with_restores = ClusterConfig(security="none", checkpoint_dir="/nonexistent", restore_unavailable_after=42)
    for cfg, want in ((ClusterConfig(security="none"), 0), (with_restores, 42)):
        core = SchedulerCore(cfg, secure=False, now=0.0)
        out = core.handle(None, Message("register", id=1, meta={"role": "server", "address": "tcp://s:1"}), 0.0)
        meta = next(e.msg.meta for e in out if isinstance(e, Reply) and e.msg.id == 1)
        assert meta["restore_after"] == want
        server = ServerCore(cfg, secure=False)
        server.registered(meta, 0.0)
        assert server.restore_after == want

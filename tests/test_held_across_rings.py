"""What a server decides when a ring changes under requests it has not finished: a pull
the consistency gate holds, and a range copy from an attempt the scheduler gave up on (sent at an older ring).

Both were found by the simulation with joins and placement switches under chained
placement (decision 122); they are older than it. These tests drive a ``ServerCore``
through the exact interleaving, with no sockets and no clock.
"""
from __future__ import annotations

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range, range_to_wire
from psd.codec import Message
from psd.config import ClusterConfig
from psd.core.effects import Refuse, Reply
from psd.core.server import ServerCore
from psd.schema import TableSpec

SPEC = TableSpec("t", 1, "int64")
A, B = Range(0, 1000), Range(1000, KEY_SPACE_END)
ADDRS = {s: f"tcp://{s}" for s in ("S0", "S1")}


def _core(consistency: str = "eventual") -> ServerCore:
    core = ServerCore(ClusterConfig(security="none", consistency=consistency), secure=False)
    core.node_id = "S0"
    core.ring = Assignment(version=1, ranges=(A, B), owners=(("S0",), ("S1",)), addresses=ADDRS)
    core._create(SPEC)
    core.fence.confirmed(0.0)
    return core


def _ring(core: ServerCore, version: int, owners: tuple, *, final: bool, incoming=()) -> None:
    ring = Assignment(version=version, ranges=(A, B), owners=owners, addresses=ADDRS)
    out = core.control(Message("ring", meta={"ring": ring.to_wire(), "final": final,
                                             "incoming": [range_to_wire(r) for r in incoming]}), 0.0)
    assert not [e for e in out if isinstance(e, Refuse)], out


def _clock(core: ServerCore, worker: str, clock: int) -> list:
    return core.handle(None, Message("clock", sender=worker, meta={"clock": clock}), 0.0)


def test_a_pull_held_across_a_ring_that_moved_its_rows_is_refused_not_answered_empty():
    core = _core("sequential")
    for w in ("W0", "W1"):
        _clock(core, w, 0)
    keys = np.array([10, 20], np.uint64)
    out = core.handle(None, Message("push", id=1, sender="W0", table="t", clock=0, meta={"rid": 1},
                                    arrays=[keys, np.full((2, 1), 5, np.int64)]), 0.0)
    assert [type(e) for e in out] == [Reply]
    _clock(core, "W0", 1)
    # W0's pull at clock 1 waits for W1 to finish clock 0 (it must see W1's clock-0 pushes)
    assert core.handle(None, Message("pull", id=2, sender="W0", table="t", clock=1, meta={"rid": 2},
                                     arrays=[keys]), 0.0) == []
    # meanwhile a ring change moves range A to S1 (its final ring: S0 drops the rows)
    _ring(core, 2, (("S1", "S0"), ("S1",)), final=False)
    _ring(core, 3, (("S1",), ("S1",)), final=True)
    out = _clock(core, "W1", 1)
    answers = [e for e in out if isinstance(e, (Reply, Refuse))]
    assert len(answers) == 1 and isinstance(answers[0], Refuse), \
        f"the held pull must be refused (S0 no longer has its rows), got {answers}"
    assert answers[0].error.code == "not_owner"


def test_a_held_pull_whose_rows_stay_is_answered_after_a_ring_change():
    core = _core("sequential")
    for w in ("W0", "W1"):
        _clock(core, w, 0)
    keys = np.array([10, 20], np.uint64)
    core.handle(None, Message("push", id=1, sender="W0", table="t", clock=0, meta={"rid": 1},
                              arrays=[keys, np.full((2, 1), 5, np.int64)]), 0.0)
    _clock(core, "W0", 1)
    core.handle(None, Message("pull", id=2, sender="W0", table="t", clock=1, meta={"rid": 2}, arrays=[keys]), 0.0)
    _ring(core, 2, (("S0", "S1"), ("S1",)), final=True)  # S0 still leads A
    answers = [e for e in _clock(core, "W1", 1) if isinstance(e, (Reply, Refuse))]
    assert len(answers) == 1 and isinstance(answers[0], Reply)
    assert answers[0].msg.arrays[0].ravel().tolist() == [5, 5]


def _install(core: ServerCore, ring: int, attempt: str, keys: list[int], value: int) -> list:
    return core.handle(None, Message("install", sender="S9", table="t", ring=ring,
                                     meta={"range": range_to_wire(B), "copy": attempt, "state_fields": []},
                                     arrays=[np.array(keys, np.uint64), np.full((len(keys), 1), value, np.int64)]), 0.0)


def test_a_late_copy_from_an_abandoned_attempt_is_refused_and_replaces_nothing():
    core = _core()
    _ring(core, 2, (("S0",), ("S1", "S0")), final=False, incoming=[B])  # attempt 1 copies B to S0
    _ring(core, 3, (("S0",), ("S1", "S0")), final=False, incoming=[B])  # given up; attempt 2
    assert [type(e) for e in _install(core, 3, "S1.2", [5000], 7)] == [Reply]  # attempt 2's rows
    out = _install(core, 2, "S9.1", [5000, 6000], 1)  # attempt 1's, late
    assert [type(e) for e in out] == [Refuse] and out[0].error.code == "stale_ring"
    assert core.tables["t"].pull(np.array([5000, 6000], np.uint64)).ravel().tolist() == [7, 0]

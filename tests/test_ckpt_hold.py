"""A checkpoint's hold (phase 1) is bounded: a server whose cut does not come within the
hold's ``within`` lets the pushes it held through by itself and refuses the cut if it
comes later (decision 148). A ``ServerCore`` driven by hand: no sockets, no clock.
"""
from __future__ import annotations

import numpy as np

from psd.codec import Message
from psd.core.effects import Refuse, Reply
from psd.core.server import ServerCore
from psd.schema import TableSpec

from servercores import lone_server

SPEC = TableSpec("t", 1, "int64")
KEYS = np.array([10, 20], np.uint64)


def _core() -> ServerCore:
    return lone_server(SPEC)


def _hold(core: ServerCore, meta: dict, now: float) -> None:
    out = core.control(Message("ckpt_hold", id=1, meta=meta), now)
    assert [e.msg.op for e in out if isinstance(e, Reply)] == ["ok"]
    pushed = core.handle(None, Message("push", id=2, sender="W0", table="t", clock=0, meta={"rid": 2},
                                       arrays=[KEYS, np.full((2, 1), 3, np.int64)]), now + 0.1)
    assert [e.msg.op for e in pushed if isinstance(e, Reply)] == ["ok"]  # acked, held
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [0, 0]


def _cut(core: ServerCore, now: float) -> list:
    return core.control(Message("ckpt_cut", id=3, meta={"cut": 1, "workers": ["W0"], "folder": "/nonexistent",
                                                         "timeout": 5}), now)


def test_a_hold_whose_cut_never_comes_lets_its_pushes_through_and_refuses_a_late_cut():
    core = _core()
    _hold(core, {"within": 1.0}, 0.0)
    core.tick(0.9)
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [0, 0]  # within the bound: still held
    core.tick(1.05)
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [3, 3]
    out = _cut(core, 1.2)
    assert [type(e) for e in out] == [Refuse] and out[0].error.code == "unavailable"
    assert all(p.cut is None for p in core.gate.policies.values())  # (the refused cut holds nothing)


def test_a_cut_within_the_bound_is_taken_and_an_unbounded_hold_waits():
    core = _core()
    _hold(core, {"within": 1.0}, 0.0)
    assert not [e for e in _cut(core, 0.5) if isinstance(e, Refuse)]
    core.tick(5.0)  # the cut, not the hold's bound, decides now: it still waits for W0's clock 1
    assert core._checkpoint is not None and all(p.cut == 1 for p in core.gate.policies.values())
    old = _core()
    _hold(old, {}, 0.0)  # an older scheduler's hold: no bound
    old.tick(100.0)
    assert old.tables["t"].pull(KEYS).ravel().tolist() == [0, 0]


def test_a_malformed_cut_is_refused_and_leaves_the_hold_and_its_bound():
    """A cut without its clock is refused by name before anything changes: the hold and
    its bound stay, so the held pushes still go through by themselves at the bound."""
    core = _core()
    _hold(core, {"within": 1.0}, 0.0)
    out = core.control(Message("ckpt_cut", id=3, meta={"workers": ["W0"], "timeout": 1}), 0.2)
    refused = [e.error for e in out if isinstance(e, Refuse)]
    assert len(refused) == 1 and refused[0].code == "protocol" and "needs cut" in str(refused[0])
    core.tick(1.05)
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [3, 3]
    assert all(p.cut is None for p in core.gate.policies.values())

"""A checkpoint fails as soon as one server fails it: a server declared dead fails the
hold or the cut at once (``Calls.first_failure``), instead of the checkpoint holding the
ring lock, and every other server holding pushes, until the others answer. Those wait
for the workers to reach the cut, and workers may be waiting for the dead server's
ranges, which a restore brings back only once the ring lock is free (found by the
simulation: BSP with restore, seed 500038 of RESTORE_MIXED_FOUND in tests/test_sim.py).
The released servers drop a cut under way. Cores driven by hand: no sockets, no clock.
"""
from __future__ import annotations

from psd.codec import Message
from psd.core.effects import Refuse, Reply
from psd.core.procedures import Calls, Runner, failure
from tests.test_ckpt_hold import KEYS, _core, _cut, _hold


class _Driver:
    """A Runner and what it asked, forgot and resumed its procedures with."""

    def __init__(self) -> None:
        self.asked, self.forgotten, self.got = [], [], []
        self.runner = Runner(lambda node, msg, token: self.asked.append((node, token)),
                             lambda node, token: self.forgotten.append((node, token)), lambda do, token: None)

    def start(self, first_failure: bool, now: float = 0.0) -> None:
        def proc():
            self.got.append((yield Calls([("S0", Message("a")), ("S1", Message("b"))], timeout=60.0,
                                         first_failure=first_failure)))
        self.runner.start(proc(), now)

    def answer(self, i: int, reply: Message, now: float) -> bool:
        return self.runner.answered(self.asked[i][1], reply, None, now)


def test_calls_with_first_failure_resume_when_a_node_is_gone():
    d = _Driver()
    d.start(first_failure=True)
    d.runner.node_gone("S0", 1.0)
    assert len(d.got) == 1 and "S0 is gone" in str(failure(d.got[0][0])) and d.got[0][1] is None
    assert d.forgotten == d.asked  # (S1's answer is no longer awaited either)
    assert not d.answer(1, Message("ok"), 2.0)
    d.start(first_failure=True, now=3.0)  # S0 is gone: nobody is asked
    assert len(d.asked) == 2 and len(d.got) == 2 and d.got[1][1] is None


def test_calls_with_first_failure_resume_at_a_refusal():
    d = _Driver()
    d.start(first_failure=True)
    d.answer(1, Message("error", meta={"code": "unavailable", "message": "no"}), 1.0)
    assert len(d.got) == 1 and d.got[0][0] is None and failure(d.got[0][1]) is not None
    assert d.forgotten == [d.asked[0]]


def test_calls_without_it_wait_for_every_answer():
    d = _Driver()
    d.start(first_failure=False)
    d.runner.node_gone("S0", 1.0)
    assert d.got == []
    d.answer(1, Message("ok"), 2.0)
    assert len(d.got) == 1 and failure(d.got[0][0]) is not None and d.got[0][1].op == "ok"


def test_a_release_during_a_cut_lets_the_held_pushes_through_and_drops_the_cut():
    core = _core()
    _hold(core, {"within": 1.0}, 0.0)
    assert not [e for e in _cut(core, 0.5) if isinstance(e, Refuse)]  # waits for W0's clock 1
    out = core.control(Message("ckpt_release", id=4), 0.6)
    assert [e.msg.op for e in out if isinstance(e, Reply)] == ["ok"]
    assert core._checkpoint is None and all(p.cut is None for p in core.gate.policies.values())
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [3, 3]
    assert not [e for e in core.tick(10.0) if isinstance(e, Refuse)]  # (no cut left to time out)

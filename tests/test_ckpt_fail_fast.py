"""A checkpoint step fails at its first failure, not once every server has answered: a
cut may wait a minute for a lagging worker while it holds ``RING_LOCK``, and the ring
change of a server that died meanwhile waited that long too (mixed soak, seed 503097:
pushes its death left on only some replicas stayed there, copies disagreed). And a
server told to release drops the cut under way, whose timeout would otherwise release
a later checkpoint's hold, and so does a new hold (a restarted scheduler's). Driven by
hand: a ``Runner``, a ``ServerCore``; no sockets.
"""
from __future__ import annotations

import numpy as np

from psd.codec import Message
from psd.core.checkpoints import _all
from psd.core.procedures import Calls, Runner
from psd.core.effects import Reply
from psd.errors import PsdError

from tests.test_ckpt_hold import KEYS, _core, _cut, _hold


def _runner():
    asked, forgotten = [], []
    runner = Runner(lambda node, msg, token: asked.append((node, token)),
                    lambda node, token: forgotten.append((node, token)), lambda do, token: None)
    return runner, asked, forgotten


def _step(servers, raise_errors=True, fail_fast=True):
    """A procedure of one ``_all`` step over ``servers``: what it returned or raised."""
    def proc():
        return (yield from _all(servers, lambda: Message("ckpt_cut"), 60.0, raise_errors=raise_errors,
                                fail_fast=fail_fast))
    ended = []
    return proc(), ended, lambda result, error: ended.append((result, error))


def test_a_checkpoint_step_fails_when_a_server_it_waits_for_is_declared_gone():
    runner, asked, forgotten = _runner()
    gen, ended, done = _step(["S0", "S1", "S2"])
    runner.start(gen, 0.0, done)
    assert [n for n, _ in asked] == ["S0", "S1", "S2"]
    runner.node_gone("S2", 1.0)
    assert not ended  # (resumed at the next tick: never from inside the call that failed)
    runner.tick(1.05)
    assert len(ended) == 1 and "S2 is gone" in str(ended[0][1])  # not at S0's and S1's answers
    assert sorted(n for n, _ in forgotten) == ["S0", "S1", "S2"]
    assert not runner.answered(asked[0][1], Message("ok"), None, 2.0)  # (no longer awaited)


def test_a_checkpoint_step_fails_at_a_refusal_and_one_to_a_gone_server_at_once():
    runner, asked, _ = _runner()
    gen, ended, done = _step(["S0", "S1"])
    runner.start(gen, 0.0, done)
    runner.answered(asked[1][1], Message("error", meta={"code": "unavailable", "message": "disk full"}), None, 0.5)
    runner.tick(0.55)
    assert len(ended) == 1 and "disk full" in str(ended[0][1])
    runner.node_gone("S1", 1.0)
    gen, ended, done = _step(["S0", "S1"])
    runner.start(gen, 2.0, done)
    assert len(ended) == 1 and "S1 is gone" in str(ended[0][1]) and len(asked) == 2  # nothing asked


def test_a_release_and_other_calls_still_wait_for_every_answer():
    runner, asked, _ = _runner()
    gen, ended, done = _step(["S0", "S1"], raise_errors=False, fail_fast=False)  # (the release)
    runner.start(gen, 0.0, done)
    runner.node_gone("S1", 1.0)
    runner.tick(1.1)
    assert not ended
    runner.answered(asked[0][1], Message("ok"), None, 1.5)
    assert len(ended) == 1 and ended[0][1] is None
    assert Calls([], 1.0).all_or_nothing is False


def test_a_restore_waits_for_every_server_even_after_a_refusal():
    """The restore at start-up is not a step that fails fast: until every server has
    answered, one may still be loading, and workers must not see a ring meanwhile."""
    runner, asked, _ = _runner()
    gen, ended, done = _step(["S0", "S1"], fail_fast=False)
    runner.start(gen, 0.0, done)
    runner.answered(asked[1][1], Message("error", meta={"code": "unavailable", "message": "bad file"}), None, 0.5)
    runner.tick(0.6)
    assert not ended
    runner.answered(asked[0][1], Message("ok"), None, 1.0)
    assert len(ended) == 1 and "bad file" in str(ended[0][1])


def test_a_failure_answered_while_the_step_still_asks_resumes_after_every_ask_went_out():
    """A driver may answer an ask at once (no route to that server yet) while it still
    carries out the same step's other asks: the procedure's next message (a release)
    must not overtake them."""
    sent = []
    runner = None

    def ask(node, msg, token):
        sent.append((node, msg.op))
        if node == "S0":  # answered from inside the ask, as a driver with no route does
            runner.answered(token, None, PsdError("no route to S0"), 0.0)
    runner = Runner(ask, lambda node, token: None, lambda do, token: None)

    def proc():
        try:
            yield from _all(["S0", "S1", "S2"], lambda: Message("ckpt_hold"), 1.0, fail_fast=True)
        except PsdError:
            yield from _all(["S0", "S1", "S2"], lambda: Message("ckpt_release"), 1.0, raise_errors=False)
    runner.start(proc(), 0.0)
    runner.tick(0.05)
    assert sent[:3] == [("S0", "ckpt_hold"), ("S1", "ckpt_hold"), ("S2", "ckpt_hold")]
    assert [op for _, op in sent[3:]] == ["ckpt_release"] * 3


def test_a_release_drops_the_cut_under_way_so_its_timeout_spares_the_next_hold():
    core = _core()
    _hold(core, {"within": 10.0}, 0.0)
    _cut(core, 0.5)  # (the cut waits for W0 to reach clock 1)
    core.control(Message("ckpt_release", id=4), 1.0)  # another server's step failed
    core.tick(1.1)
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [3, 3]
    core.control(Message("ckpt_hold", id=5, meta={"within": 10.0}), 2.0)  # the next checkpoint
    core.fence.confirmed(5.9)
    pushed = core.handle(None, Message("push", id=6, sender="W0", table="t", clock=0, meta={"rid": 6},
                                       arrays=[KEYS, np.full((2, 1), 4, np.int64)]), 5.9)
    assert [e.msg.op for e in pushed if isinstance(e, Reply)] == ["ok"]
    core.tick(6.0)  # past the first cut's timeout (5 s after it came)
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [3, 3]  # the new hold still holds it
    assert all(p.cut is not None for p in core.gate.policies.values())


def test_a_new_hold_ends_a_cut_an_earlier_checkpoint_left_behind():
    """The scheduler restarted (or a standby took over) while a cut waited here: no
    release comes. The next checkpoint's hold ends that cut, or the old cut, released
    once W0 reaches its clock, would let through pushes the new hold must keep."""
    core = _core()
    _hold(core, {"within": 10.0}, 0.0)
    _cut(core, 0.5)  # waits for W0 to reach clock 1; no release ever comes
    core.control(Message("ckpt_hold", id=5, meta={"within": 10.0}), 2.0)  # the new scheduler's checkpoint
    core.fence.confirmed(2.1)
    core.handle(None, Message("clock", id=7, sender="W0", clock=0, meta={"clock": 1}), 2.2)
    core.handle(None, Message("push", id=8, sender="W0", table="t", clock=1, meta={"rid": 8},
                              arrays=[KEYS, np.full((2, 1), 4, np.int64)]), 2.3)
    assert core.tables["t"].pull(KEYS).ravel().tolist() == [3, 3]  # the new hold keeps the clock-1 push

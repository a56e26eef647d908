"""What a server decides when a ring changes under requests it has not finished: a pull
or a pushpull the consistency gate holds, and a range copy from an attempt the scheduler
gave up on (sent at an older ring); and what the worker does with a pushpull whose pull
part was refused.

Both were found by the simulation with joins and placement switches under chained
placement (decision 122); they are older than it. These tests drive a ``ServerCore``
through the exact interleaving, with no sockets and no clock.
"""
from __future__ import annotations

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range, range_to_wire
from psd.cluster.rows import Rows
from psd.codec import Message
from psd.codec.message import error_reply
from psd.config import ClusterConfig
from psd.core.client import AskRing, ClientCore, Done, Send
from psd.core.effects import Refuse, Reply
from psd.core.pushpull import PULL_REFUSABLE, PULL_REFUSED
from psd.core.server import ServerCore
from psd.errors import NotOwnerError, NotReplicatedError, PsdTimeoutError
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


def _flagged(rid: int) -> dict:
    """A current client's pushpull meta: it takes a ``pull_refused`` answer."""
    return {"rid": rid, PULL_REFUSABLE: True}


def _w0_ahead(value: int) -> tuple[ServerCore, np.ndarray, list]:
    """A sequential core where W0 pushed ``value`` to keys 10 and 20 at clock 0 and
    moved on to clock 1 while W1 is still at clock 0: W0's next reads are held."""
    core = _core("sequential")
    for w in ("W0", "W1"):
        _clock(core, w, 0)
    keys = np.array([10, 20], np.uint64)
    pushed = core.handle(None, Message("push", id=1, sender="W0", table="t", clock=0, meta={"rid": 1},
                                       arrays=[keys, np.full((2, 1), value, np.int64)]), 0.0)
    _clock(core, "W0", 1)
    return core, keys, pushed


def test_a_pull_held_across_a_ring_that_moved_its_rows_is_refused_not_answered_empty():
    core, keys, pushed = _w0_ahead(5)
    assert [type(e) for e in pushed] == [Reply]
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
    core, keys, _ = _w0_ahead(5)
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


def test_a_pushpull_held_across_a_ring_that_moved_its_rows_acks_the_push_and_refuses_the_pull():
    """Decision 129: its push was applied (once), so it is acknowledged; its pull part is
    refused not_owner in the reply's meta, never answered from the rows the final ring dropped."""
    core, keys, _ = _w0_ahead(1)
    out = core.handle(None, Message("pushpull", id=2, sender="W0", table="t", clock=1, meta=_flagged(2),
                                    arrays=[keys, np.full((2, 1), 4, np.int64)]), 0.0)
    assert out == []  # held: W1 has not finished clock 0
    _ring(core, 2, (("S1", "S0"), ("S1",)), final=False)
    _ring(core, 3, (("S1",), ("S1",)), final=True)
    answers = [e for e in _clock(core, "W1", 1) if isinstance(e, (Reply, Refuse))]
    assert len(answers) == 1 and isinstance(answers[0], Reply), answers
    reply = answers[0].msg
    assert reply.op == "ok" and reply.arrays == [] and reply.meta[PULL_REFUSED]["code"] == "not_owner"
    assert reply.meta[PULL_REFUSED]["data"] == {"ring": 3}
    assert core.counters["pull_refused"] == 1


def test_an_older_client_s_held_pushpull_is_refused_whole_with_nothing_applied():
    """Decision 143: a pushpull without ``meta.pull_refusable`` (a client older than
    decision 129, which would fail on ``pull_refused`` although its push stands) is held
    whole: nothing of it is applied or recorded while held, and once the ring moved its
    rows it is refused ``not_owner``, so the client's resend is applied once."""
    core, keys, _ = _w0_ahead(1)
    pushed = core.counters["keys_pushed"]
    out = core.handle(None, Message("pushpull", id=2, sender="W0", table="t", clock=1, meta={"rid": 2},
                                    arrays=[keys, np.full((2, 1), 4, np.int64)]), 0.0)
    assert out == []  # held: W1 has not finished clock 0
    assert core.counters["keys_pushed"] == pushed and not core._seen_before(("W0", 2), [])
    _ring(core, 2, (("S1", "S0"), ("S1",)), final=False)
    _ring(core, 3, (("S1",), ("S1",)), final=True)
    answers = [e for e in _clock(core, "W1", 1) if isinstance(e, (Reply, Refuse))]
    assert len(answers) == 1 and isinstance(answers[0], Refuse), answers
    assert answers[0].error.code == "not_owner" and answers[0].request.id == 2
    assert core.counters["keys_pushed"] == pushed and not core._seen_before(("W0", 2), [])
    assert core.counters["pull_refused"] == 0 and not core.holding.get("W0"), core.holding


def test_an_older_client_s_held_pushpull_whose_rows_stay_is_pushed_and_answered_once_released():
    """Held whole and released at the same ring: its push is applied then (kept for the
    clock boundary under sequential), and its pull part sees the clock-0 pushes only."""
    core, keys, _ = _w0_ahead(1)
    pushed = core.counters["keys_pushed"]
    assert core.handle(None, Message("pushpull", id=2, sender="W0", table="t", clock=1, meta={"rid": 2},
                                     arrays=[keys, np.full((2, 1), 4, np.int64)]), 0.0) == []
    assert core.counters["keys_pushed"] == pushed
    answers = [e for e in _clock(core, "W1", 1) if isinstance(e, (Reply, Refuse))]
    assert len(answers) == 1 and isinstance(answers[0], Reply), answers
    assert answers[0].msg.arrays[0].ravel().tolist() == [1, 1]
    assert core.counters["keys_pushed"] == pushed + 2 and core._seen_before(("W0", 2), [])
    for w in ("W0", "W1"):
        _clock(core, w, 2)
    pull = core.handle(None, Message("pull", id=3, sender="W0", table="t", clock=2, meta={"rid": 3},
                                     arrays=[keys]), 0.0)
    assert pull[0].msg.arrays[0].ravel().tolist() == [5, 5]


def test_an_older_client_s_pushpull_released_past_its_clock_stays_out_of_pulls_of_that_clock():
    """Released when the floor jumps past its clock (the slow worker left), an older
    client's pushpull pushes only then: the gate keeps that push in its (clock, arrival)
    place, so a pull of the same clock released after it does not see it, as it would not
    have had the push arrived with the request; it is applied before the drain ends."""
    core = _core("sequential")
    for w in ("W0", "W1"):
        _clock(core, w, 0)
    keys = np.array([10, 20], np.uint64)
    _clock(core, "W0", 1)
    assert core.handle(None, Message("pushpull", id=2, sender="W0", table="t", clock=1, meta={"rid": 2},
                                     arrays=[keys, np.full((2, 1), 4, np.int64)]), 0.0) == []
    assert core.handle(None, Message("pull", id=3, sender="W0", table="t", clock=1, meta={"rid": 3},
                                     arrays=[keys]), 0.0) == []
    _clock(core, "W0", 2)
    out = core.control(Message("worker_left", meta={"worker": "W1"}), 0.0)  # the floor: 0 -> 2
    answers = {e.msg.id: e.msg.arrays[0].ravel().tolist() for e in out if isinstance(e, Reply) and e.msg.arrays}
    assert answers == {2: [0, 0], 3: [0, 0]}, out
    assert core.tables["t"].pull(keys).ravel().tolist() == [4, 4]


def test_a_held_pushpull_and_pull_whose_rows_are_being_restored_are_answered_refused():
    """Decision 140: the recheck after a ring change may fail on rows being restored from
    a checkpoint (unavailable), not only on rows moved away: the pushpull's push is still
    acknowledged with its pull part refused, the held pull is refused, nothing held leaks,
    and the clock that released them is not refused."""
    core = _core("sequential")
    for w in ("W0", "W1"):
        _clock(core, w, 0)
    keys = np.array([10, 20], np.uint64)
    _clock(core, "W0", 1)
    assert core.handle("W0", Message("pushpull", id=2, sender="W0", table="t", clock=1, meta=_flagged(2),
                                     arrays=[keys, np.full((2, 1), 5, np.int64)]), 0.0) == []
    assert core.handle("W0", Message("pull", id=3, sender="W0", table="t", clock=1, meta={"rid": 3},
                                     arrays=[keys]), 0.0) == []
    _ring(core, 2, (("S0",), ("S1",)), final=True)  # a ring change; S0 still leads A
    core.restoring.append(A)
    out = _clock(core, "W1", 1)  # releases both
    answers = {e.msg.id if isinstance(e, Reply) else e.request.id: e for e in out if isinstance(e, (Reply, Refuse))}
    assert sorted(answers) == [2, 3], out
    assert isinstance(answers[2], Reply) and answers[2].msg.meta[PULL_REFUSED]["code"] == "unavailable"
    assert isinstance(answers[3], Refuse) and answers[3].error.code == "unavailable"
    assert not core.holding.get("W0"), core.holding


# -- the worker's side: the partial answer -------------------------------------------------
def _client_ring(version: int, owners: tuple) -> Assignment:
    return Assignment(version=version, ranges=(A, B), owners=owners, addresses=ADDRS)


def test_the_worker_counts_the_push_done_and_sends_the_refused_pull_part_again_alone():
    """A pushpull answered with its push acknowledged and its pull part refused: the pull
    is re-cut by the new ring and sent as a plain pull (no values, a fresh id); the push is
    never sent again; the request ends with the new owner's values."""
    core = ClientCore("W0", 10.0, _client_ring(1, (("S0",), ("S1",))))
    keys = np.array([10, 20, 5000], np.uint64)
    ts, effects = core.issue("pushpull", SPEC, Rows(keys=keys, values=np.ones((3, 1), np.int64)), 0.0)
    sends = {e.server: e.msg for e in effects if isinstance(e, Send)}
    assert sorted(sends) == ["S0", "S1"] and all(m.op == "pushpull" for m in sends.values())
    assert all(m.meta[PULL_REFUSABLE] is True for m in sends.values())  # (it takes pull_refused)
    s0, s1 = sends["S0"], sends["S1"]
    out = core.answered("S1", s1.reply(arrays=[np.array([[7]], np.int64)], ring=1), s1.id, 0.01)
    assert not [e for e in out if isinstance(e, (Send, Done))]
    refused = {"code": "not_owner", "message": "S0 does not lead keys in [10, 20] at ring v3", "data": {"ring": 3}}
    out = core.answered("S0", s0.reply(ring=3, meta={PULL_REFUSED: refused}), s0.id, 0.02)
    assert not [e for e in out if isinstance(e, (Send, Done))]  # (waits for the ring the refusal names)
    assert [e for e in out if isinstance(e, AskRing)]
    out = core.use_ring(_client_ring(3, (("S1",), ("S1",))), 0.03)
    again = [e for e in out if isinstance(e, Send)]
    assert len(again) == 1 and again[0].server == "S1", out
    pull = again[0].msg
    assert pull.op == "pull" and len(pull.arrays) == 1 and pull.arrays[0].tolist() == [10, 20]
    assert pull.meta["rid"] not in (s0.meta["rid"], s1.meta["rid"]) and PULL_REFUSABLE not in pull.meta
    out = core.answered("S1", pull.reply(arrays=[np.array([[5], [6]], np.int64)], ring=3), pull.id, 0.04)
    done = [e for e in out if isinstance(e, Done)]
    assert len(done) == 1 and done[0].ts == ts and done[0].error is None
    assert done[0].result.ravel().tolist() == [5, 6, 7]
    assert ts in core.rerouted
    assert not core.requests and not core.queue and not core.sent


def test_a_refused_pull_part_sent_before_the_worker_has_the_new_ring_goes_as_a_pull_to_the_old_owner():
    """If the queue's pause ends before the ring arrives, the part goes again to the same
    server, still as a plain pull (that server refuses it not_owner as any misrouted pull)."""
    core = ClientCore("W0", 10.0, _client_ring(1, (("S0",), ("S1",))))
    keys = np.array([10], np.uint64)
    ts, effects = core.issue("pushpull", SPEC, Rows(keys=keys, values=np.ones((1, 1), np.int64)), 0.0)
    [first] = [e.msg for e in effects if isinstance(e, Send)]
    refused = {"code": "not_owner", "message": "moved", "data": {"ring": 3}}
    core.answered("S0", first.reply(ring=3, meta={PULL_REFUSED: refused}), first.id, 0.01)
    again = [e for e in core.tick(1.0) if isinstance(e, Send)]
    assert [(e.server, e.msg.op, len(e.msg.arrays)) for e in again] == [("S0", "pull", 1)]


def test_a_newer_ring_sends_the_worker_s_clock_again_to_every_server_behind_the_resent_parts():
    """Decision 138: a server that took ranges over counts a worker unsynced (and holds its
    sequential pulls) until a clock sent at its ring arrives, and a BSP worker waits for its
    pull before it clocks again; so a newer ring sends the current clock again, to every
    server of it, behind the parts it re-sends (the same value: idempotent)."""
    core = ClientCore("W0", 10.0, _client_ring(1, (("S0",), ("S1",))))
    core.clock(0.0)
    ts, effects = core.issue("push", SPEC, Rows(keys=np.array([10], np.uint64), values=np.ones((1, 1), np.int64)),
                             0.01)
    [push] = [e.msg for e in effects if isinstance(e, Send)]
    out = core.use_ring(_client_ring(2, (("S1",), ("S1",))), 0.02)
    sends = [(e.server, e.msg.op, e.msg.ring, e.msg.meta.get("clock")) for e in out if isinstance(e, Send)]
    assert sends == [("S1", "push", 2, None), ("S0", "clock", 2, 1), ("S1", "clock", 2, 1)], sends
    assert not [e for e in core.use_ring(_client_ring(2, (("S1",), ("S1",))), 0.03) if isinstance(e, Send)]
    fresh = ClientCore("W1", 10.0, _client_ring(1, (("S0",), ("S1",))))  # never clocked: nothing to vouch for
    assert not [e for e in fresh.use_ring(_client_ring(2, (("S1",), ("S1",))), 0.0) if isinstance(e, Send)]


def test_a_pull_part_sent_again_after_its_push_was_acked_times_out_as_a_pull_not_as_not_replicated():
    """Decision 140: an earlier try of the pushpull answered not_replicated; the retry is
    acked with its pull part refused; if the pull sent again then times out, the error
    is a timeout, not NotReplicatedError for a push that was acknowledged."""
    core = ClientCore("W0", 10.0, _client_ring(1, (("S0",), ("S1",))))
    ts, effects = core.issue("pushpull", SPEC, Rows(keys=np.array([10], np.uint64), values=np.ones((1, 1), np.int64)),
                             0.0)
    [first] = [e.msg for e in effects if isinstance(e, Send)]
    core.answered("S0", error_reply(first, NotReplicatedError("S1 refused it"), "S0"), first.id, 0.01)
    [retry] = [e.msg for e in core.tick(2.0) if isinstance(e, Send)]
    refused = {"code": "not_owner", "message": "moved", "data": {"ring": 3}}
    core.answered("S0", retry.reply(ring=3, meta={PULL_REFUSED: refused}), retry.id, 2.01)
    core.use_ring(_client_ring(3, (("S1",), ("S1",))), 2.02)  # the pull goes to S1, unanswered
    done = [e for e in core.tick(10.0) if isinstance(e, Done)]
    assert len(done) == 1 and done[0].ts == ts
    # (a part re-cut after a not_owner refusal times out as still misrouted)
    assert isinstance(done[0].error, (PsdTimeoutError, NotOwnerError)), done[0].error
    assert not isinstance(done[0].error, NotReplicatedError)


def test_a_push_whose_retry_was_acked_times_out_as_a_timeout_not_as_not_replicated():
    """A part answered not_replicated and then acknowledged when sent again holds its
    replicas: if another part of the request then times out, the error says so, not
    NotReplicatedError for the part that was acknowledged."""
    core = ClientCore("W0", 10.0, _client_ring(1, (("S0",), ("S1",))))
    keys = np.array([10, 5000], np.uint64)
    ts, effects = core.issue("push", SPEC, Rows(keys=keys, values=np.ones((2, 1), np.int64)), 0.0)
    sends = {e.server: e.msg for e in effects if isinstance(e, Send)}
    assert sorted(sends) == ["S0", "S1"]
    core.answered("S0", error_reply(sends["S0"], NotReplicatedError("S1 refused it"), "S0"), sends["S0"].id, 0.01)
    [retry] = [e.msg for e in core.tick(2.0) if isinstance(e, Send) and e.server == "S0"]
    core.answered("S0", retry.reply(ring=1), retry.id, 2.01)    # acked; S1's part never is
    done = [e for e in core.tick(10.0) if isinstance(e, Done)]
    assert len(done) == 1 and done[0].ts == ts
    assert isinstance(done[0].error, PsdTimeoutError), done[0].error

"""A dropped connection loses the answers on it too: a part whose admission a later
answer confirmed (its own answer still to come: a push waits for its replicas, a pull
behind it is answered at once) is sent again, not left to fail after request_timeout
(mixed soak, seed 503074: a BSP worker, and under ``bounded`` every other worker's pulls,
waited that long). ``ClientCore`` driven by hand; only the simulation tells a core of a
drop (``connection_lost``).
"""
from __future__ import annotations

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.cluster.rows import Rows
from psd.codec import Message
from psd.core.client import ClientCore, Send
from psd.schema import TableSpec

SPEC = TableSpec("t", 1, "int64")
KEYS = np.array([10, 20], np.uint64)


def test_a_part_admitted_whose_answer_the_drop_lost_is_sent_again():
    ring = Assignment(version=1, ranges=(Range(0, KEY_SPACE_END),), owners=(("S0",),), addresses={"S0": "tcp://S0"})
    core = ClientCore("W0", 8.0, ring)
    push_ts, effects = core.issue("push", SPEC, Rows(keys=KEYS, values=np.ones((2, 1), np.int64)), 0.0)
    [push] = [e.msg for e in effects if isinstance(e, Send)]
    pull_ts, effects = core.issue("pull", SPEC, Rows(keys=KEYS), 0.001)
    [pull] = [e.msg for e in effects if isinstance(e, Send)]
    done = core.answered("S0", pull.reply(arrays=[np.ones((2, 1), np.int64)]), pull.id, 0.002)
    assert [e.ts for e in done if not isinstance(e, Send)] == [pull_ts]  # the push: admitted, unanswered
    [again] = [e.msg for e in core.connection_lost("S0", 0.003) if isinstance(e, Send)]
    assert (again.op, again.meta["rid"]) == ("push", push.meta["rid"]) and again.id != push.id
    done = core.answered("S0", again.reply(), again.id, 0.004)
    assert [(e.ts, e.error) for e in done if not isinstance(e, Send)] == [(push_ts, None)]

"""A pulled view of a table is lent to ZeroMQ, not copied (docs/design-decisions.md,
decision 59): it must stay unwritten until ZeroMQ reports the send complete.

libzmq reads a zero-copy frame through a raw pointer, later, on its I/O thread; what
keeps the memory alive and unchanged must therefore be the transport's word that the
send is over, not the lifetime of whichever Python object pyzmq happens to keep. The
stand-in below sends like libzmq does: it keeps the address of the bytes and the array
that owns the memory (so it is not freed), drops every other reference at once, reads
the bytes only when the test completes the send, and reports completion through a
tracker. A table that judged lending by a weak reference to the view it handed out saw
that view die at once and wrote into the storage still being sent (the reply changed
under ZeroMQ); with leases the write goes to a fresh copy until the tracker says done.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import zmq

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.codec import Message, decode
from psd.config import ClusterConfig
from psd.core.effects import Reply
from psd.core.server import ServerCore
from psd.schema import TableSpec
from psd.transport import rpc as rpc_module
from psd.transport.rpc import RpcSocket


class LateTracker:
    def __init__(self) -> None:
        self.done = False


class LateZeroMQ:
    """Stands in for libzmq's send: copies a small frame at once; for a zero-copy frame it
    keeps only its address, its length and the array that owns the memory, and reads the
    bytes when ``complete`` is called (as the I/O thread would, later)."""

    def __init__(self) -> None:
        self.messages: list[list] = [[]]  # frames of each message: bytes, or (address, nbytes, owner, tracker)

    def send(self, sock, frame, flags, copy=True, track=False):
        tracker = None
        if copy:
            item = bytes(frame)
        else:
            mv = memoryview(frame)
            owner = mv.obj
            while isinstance(owner, np.ndarray) and isinstance(owner.base, np.ndarray):
                owner = owner.base  # the table's storage, not the view handed out
            tracker = LateTracker()
            item = (np.frombuffer(mv, dtype=np.uint8).ctypes.data, mv.nbytes, owner, tracker)
            del mv  # libzmq keeps a pointer, not the Python view
        self.messages[-1].append(item)
        if not flags & zmq.SNDMORE:
            self.messages.append([])
        return tracker if track else None

    def complete(self) -> list[list[bytes]]:
        """The I/O thread reads every message now and lets go of their frames."""
        out = []
        for frames in self.messages[:-1]:
            read = []
            for f in frames:
                if isinstance(f, bytes):
                    read.append(f)
                else:
                    address, nbytes, _owner, tracker = f
                    read.append(ctypes.string_at(address, nbytes))
                    tracker.done = True
            out.append(read)
        self.messages = [[]]
        return out


@pytest.fixture
def late(monkeypatch):
    stand_in = LateZeroMQ()
    monkeypatch.setattr(rpc_module, "_send", stand_in.send)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    yield stand_in, RpcSocket(sock, "S0")
    sock.close(0)
    ctx.term()


def _core() -> ServerCore:
    core = ServerCore(ClusterConfig(security="none"), secure=False)
    core.node_id = "S0"
    core.ring = Assignment(version=1, ranges=(Range(0, KEY_SPACE_END),), owners=(("S0",),),
                           addresses={"S0": "tcp://127.0.0.1:1"})
    core._create(TableSpec("t", 1, "int64"))
    return core


def _send(rpc: RpcSocket, effects: list) -> list:
    """Send the core's replies; returns the leases they carried."""
    leases = []
    for e in effects:
        assert type(e) is Reply and e.msg.op == "ok", e
        leases += e.leases
        rpc.reply_now(e.route, e.msg, e.leases)
    return leases


def test_a_lent_view_stays_unwritten_until_zeromq_is_done_with_it(late):
    stand_in, rpc = late
    core = _core()
    n = 100_000  # 800 KB: lent, not copied
    keys = np.arange(n, dtype=np.uint64)  # a dense run (hash rows are never lent: decision 132)
    ones = np.ones((n, 1), np.int64)
    pulls, leases = [], []
    for i in range(4):
        _send(rpc, core.handle(None, Message("push", id=2 * i, sender="W0", table="t", meta={"rid": 2 * i},
                                             arrays=[keys, ones]), 0.0))
        leases += _send(rpc, core.handle(None, Message("pull", id=2 * i + 1, sender="W0", table="t",
                                                       meta={"rid": 2 * i + 1}, arrays=[keys]), 0.0))
        pulls.append(2 * i + 1)
    assert len(leases) == 4, "every pull's reply should be lent, not copied"
    replies = [decode(frames) for frames in stand_in.complete()]  # only now does "libzmq" read them
    got = {r.id: r.arrays[0] for r in replies if r.arrays}
    assert sorted(got) == pulls
    for k, msg_id in enumerate(pulls):
        seen = np.unique(got[msg_id])
        assert seen.tolist() == [k + 1], f"pull {k} was sent as {seen[:5]}, but was answered after {k + 1} pushes"
    assert not any(lease.held() for lease in leases)  # every lease released by its tracker


def test_a_released_lease_lets_the_next_write_go_in_place(late):
    stand_in, rpc = late
    core = _core()
    keys = np.arange(50_000, dtype=np.uint64)
    _send(rpc, core.handle(None, Message("push", id=1, sender="W0", table="t", meta={"rid": 1},
                                         arrays=[keys, np.ones((keys.size, 1), np.int64)]), 0.0))
    _send(rpc, core.handle(None, Message("pull", id=2, sender="W0", table="t", meta={"rid": 2}, arrays=[keys]), 0.0))
    storage = core.tables["t"].vals
    stand_in.complete()
    _send(rpc, core.handle(None, Message("push", id=3, sender="W0", table="t", meta={"rid": 3},
                                         arrays=[keys, np.ones((keys.size, 1), np.int64)]), 0.0))
    assert core.tables["t"].vals is storage, "no lease was held: the write should not have copied the table"

"""The blocking client's small pull: one message to one server, built in one step.

A pull of fewer than ``SMALL_PULL`` keys that fall in one range goes to that range's
primary as a single message, and its answer is read straight off that server's
socket, without the general request machinery (plan, parts, encode, futures, decode,
assemble), which costs several times the message itself at this size. Whenever the
answer is not a plain reply of the expected shape (an error, a compressed reply, a
ring change, no answer yet), the pull becomes a part of the general machinery under
its own request id (``SmallPull.adopt``), which re-routes, waits, decodes and names
errors; it is never asked twice.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from psd.client.plan import Part, next_rid
from psd.cluster.rows import Rows
from psd.codec import Message, decode
from psd.codec.message import PROTOCOL_VERSION
from psd.errors import PsdError
from psd.store.table import SMALL_PULL, TableSpec
from psd.transport.rpc import RpcSocket, readable, recv_frames

if TYPE_CHECKING:
    from psd.client.aio import AsyncKVWorker

_packb = msgpack.packb
_unpackb = msgpack.unpackb


def send(kv: "AsyncKVWorker", spec: TableSpec, keys: np.ndarray) -> "SmallPull | None":
    """Send the pull if it is small and has one owner; None if not (nothing was sent)."""
    n = keys.size
    ring = kv.ring
    begins = ring.inner_begin_list
    if not 0 < n < SMALL_PULL or begins is None or not ring.ranges:
        return None
    i = bisect_right(begins, int(keys[0]))
    if i != bisect_right(begins, int(keys[-1])):
        return None
    server = ring.owners[i][0]
    rpc = kv.server_socket(server)
    if rpc is None:
        return None
    keys = np.ascontiguousarray(keys)  # (a strided view cannot be sent as it is)
    pull = SmallPull(rpc, server, spec, keys, ring.version, kv.clock_value)
    header = _packb({"v": PROTOCOL_VERSION, "op": "pull", "id": pull.msg_id, "src": rpc.node_id, "tbl": spec.name,
                     "ring": ring.version, "clk": pull.clock, "meta": {"rid": pull.rid},
                     "frames": [["<u8", [n], "none", keys.nbytes]]}, use_bin_type=True)
    try:
        rpc.send_raw(None, [header, keys])
    except Exception:
        return None
    return pull


class SmallPull:
    """A small pull in flight: reads its server's socket, takes its own answer and
    hands every other message to the socket's usual handling."""

    def __init__(self, rpc: RpcSocket, server: str, spec: TableSpec, keys: np.ndarray, ring: int, clock: int):
        self.rpc, self.server, self.spec, self.keys = rpc, server, spec, keys
        self.ring, self.clock = ring, clock
        self.msg_id, self.rid = RpcSocket.next_id(), next_rid()
        self.answered = False
        #: the pulled rows, once answered with a plain reply of the expected shape
        self.values: np.ndarray | None = None
        #: any other answer (an error; a compressed reply), decoded, or why it could not be
        self.reply: Message | Exception | None = None
        n, dtype = keys.size, spec.np_dtype
        self._expect = [[dtype.str, [n, spec.width], "none", n * spec.width * dtype.itemsize]]
        self._shape, self._dtype = (n, spec.width), dtype

    def read(self) -> None:
        """Read what waits on the socket, until the answer is among it."""
        rpc = self.rpc
        raw = rpc.raw
        while not self.answered and readable(raw):
            frames = recv_frames(raw, 0)  # in place: the payload, and a header of any size
            if not self._take(frames):
                rpc.receive(frames)
        if self.answered:
            rpc.recheck()  # messages behind the answer: the loop's next pass reads them

    def _take(self, frames: list) -> bool:
        if len(frames[0]) > self.rpc.limits.max_header_bytes:
            return False  # (not ours: the socket's own handling refuses it)
        try:
            h = _unpackb(frames[0], raw=False, strict_map_key=True)
        except Exception:
            return False
        if type(h) is not dict or h.get("id") != self.msg_id or h.get("op") not in ("ok", "error"):
            return False
        self.answered = True
        self.rpc.note_received(frames)
        if h["op"] == "ok" and h.get("frames") == self._expect and len(frames) == 2:
            body = frames[1].buffer
            if len(body) == self._expect[0][3]:
                self.values = np.ndarray(self._shape, self._dtype, body)
                return True
        try:  # anything else the general way: the codec's checks, then plan.assemble's
            self.reply = decode(frames, self.rpc.limits)
        except PsdError as err:
            self.reply = err
        return True

    def adopt(self, kv: "AsyncKVWorker") -> dict:
        """The pull as a part of the general machinery (``kv._collect``/``_complete``),
        under its own request id: an answer already read is its result; one still to
        come resolves it; a ring change re-cuts it. Nothing is sent again."""
        fut = kv._loop.create_future()
        if isinstance(self.reply, Message):
            fut.set_result(self.reply)
        elif isinstance(self.reply, Exception):
            fut.set_exception(self.reply)
        else:
            self.rpc.pending[self.msg_id] = fut
        rows = Rows(keys=self.keys)
        msg = rows.to_message("pull", table=self.spec.name, ring=self.ring, clock=self.clock,
                              meta={"rid": self.rid})
        msg.id, msg.sender = self.msg_id, self.rpc.node_id
        part = Part(self.server, [(0, self.keys.size)], msg, rows)
        return {id(part): (part, fut, self.ring)}

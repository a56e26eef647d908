"""The blocking client's small pull: one message to one server, written and read in one step.

A pull of fewer than ``SMALL_PULL`` keys that fall in one range goes to that range's
primary as a single message. The request is issued through the client's core like any
other (its stream place, its id, its fate on a refusal or a ring change are the core's),
but its header is packed directly and its answer is read straight off that server's
socket and handed to the core without the general decoding, which costs several times
the message itself at this size. Any other answer (an error, a compressed reply) is
decoded the general way; anything else on the socket goes to the socket's usual
handling.
"""
from __future__ import annotations

import time
from bisect import bisect_right
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from psd.cluster.rows import Rows
from psd.codec import Message, decode
from psd.codec.message import PROTOCOL_VERSION
from psd.core.client import Send
from psd.errors import PsdError
from psd.schema import SMALL_PULL, TableSpec
from psd.transport.rpc import RpcSocket, readable, recv_frames

if TYPE_CHECKING:
    import asyncio

    from psd.client.aio import AsyncKVWorker

_packb = msgpack.packb
_unpackb = msgpack.unpackb


def send(kv: "AsyncKVWorker", spec: TableSpec, keys: np.ndarray) -> "SmallPull | None":
    """Issue the pull if it is small and has one owner; None if not (nothing was issued)."""
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
    fut = kv._loop.create_future()
    ts, effects = kv.core.issue("pull", spec, Rows(keys=keys), time.monotonic())
    kv._results[ts] = fut
    req = kv.core.requests.get(ts)
    mine = req.parts[0].msg if req is not None and len(req.parts) == 1 else None
    pull = SmallPull(kv, rpc, server, spec, keys, fut)
    for e in effects:
        if type(e) is Send and e.msg is mine and e.server == server:
            pull.msg_id = e.msg.id
            header = _packb({"v": PROTOCOL_VERSION, "op": "pull", "id": e.msg.id, "src": e.msg.sender,
                             "tbl": spec.name, "ring": e.msg.ring, "clk": e.msg.clock, "meta": e.msg.meta,
                             "frames": [["<u8", [n], "none", keys.nbytes]]}, use_bin_type=True)
            try:
                rpc.send_raw(None, [header, keys])
            except PsdError as err:
                kv._answered(server, e.msg.id, err)
        else:
            kv._run([e])
    return pull


class SmallPull:
    """A small pull in flight: reads its server's socket, takes its own answer and
    hands every other message to the socket's usual handling."""

    def __init__(self, kv: "AsyncKVWorker", rpc: RpcSocket, server: str, spec: TableSpec, keys: np.ndarray,
                 fut: "asyncio.Future"):
        self.kv, self.rpc, self.server, self.spec, self.keys, self.fut = kv, rpc, server, spec, keys, fut
        self.msg_id: int | None = None  # None: queued behind other parts, not sent yet
        #: answered the short way: a plain reply of the expected shape, read in place
        self.short = False
        n, dtype = keys.size, spec.np_dtype
        self._expect = [[dtype.str, [n, spec.width], "none", n * spec.width * dtype.itemsize]]
        self._shape, self._dtype = (n, spec.width), dtype

    @property
    def answered(self) -> bool:
        return self.fut.done()

    def read(self) -> None:
        """Read what waits on the socket, until the answer is among it."""
        rpc = self.rpc
        raw = rpc.raw
        while not self.fut.done() and readable(raw):
            frames = recv_frames(raw, 0)  # in place: the payload, and a header of any size
            if not self._take(frames):
                rpc.receive(frames)
        if self.fut.done():
            rpc.recheck()  # messages behind the answer: the loop's next pass reads them

    def _take(self, frames: list) -> bool:
        if self.msg_id is None or len(frames[0]) > self.rpc.limits.max_header_bytes:
            return False  # (not ours: the socket's own handling takes it)
        try:
            h = _unpackb(frames[0], raw=False, strict_map_key=True)
        except Exception:
            return False
        if type(h) is not dict or h.get("id") != self.msg_id or h.get("op") not in ("ok", "error"):
            return False
        self.rpc.note_received(frames)
        self.rpc.traffic.count_received_plain(frames)  # (a small pull's answer: uncompressed)
        reply: Message | Exception
        if h["op"] == "ok" and h.get("frames") == self._expect and len(frames) == 2 and type(h.get("src")) is str:
            body = frames[1].buffer
            if len(body) == self._expect[0][3]:
                values = np.ndarray(self._shape, self._dtype, body)
                reply = Message("ok", id=self.msg_id, sender=h["src"], table=h.get("tbl"), arrays=[values])
                self.short = True
                self.kv._answered(self.server, self.msg_id, reply)
                return True
        try:  # anything else the general way: the codec's checks, then the core's
            reply = decode(frames, self.rpc.limits)
        except PsdError as err:
            reply = err
        self.kv._answered(self.server, self.msg_id, reply)
        return True

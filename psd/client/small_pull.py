"""The blocking client's small pull: one message to one server, built in one step.

A pull of fewer than ``SMALL_PULL`` keys that fall in one range goes to that range's
primary as a single message, and its answer is read straight off that server's
socket, without the general request machinery (plan, parts, encode, futures, decode,
assemble), which costs several times the message itself at this size. Whenever the
answer is not a plain reply of the expected shape (an error, a ring change, no
answer yet), the caller drops it and issues the pull the general way, which
re-routes, retries and names errors. A pull changes nothing on the server, so asking
twice is harmless.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from psd.client.plan import next_rid
from psd.codec.message import PROTOCOL_VERSION
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
    rpc = kv.server_socket(ring.owners[i][0])
    if rpc is None:
        return None
    keys = np.ascontiguousarray(keys)  # (a strided view cannot be sent as it is)
    msg_id = RpcSocket.next_id()
    header = _packb({"v": PROTOCOL_VERSION, "op": "pull", "id": msg_id, "src": rpc.node_id, "tbl": spec.name,
                     "ring": ring.version, "clk": kv.clock_value, "meta": {"rid": next_rid()},
                     "frames": [["<u8", [n], "none", keys.nbytes]]}, use_bin_type=True)
    try:
        rpc.send_raw(None, [header, keys])
    except Exception:
        return None
    return SmallPull(rpc, msg_id, spec, n)


class SmallPull:
    """A small pull in flight: reads its server's socket, takes its own answer and
    hands every other message to the socket's usual handling."""

    def __init__(self, rpc: RpcSocket, msg_id: int, spec: TableSpec, n: int):
        self.rpc, self.msg_id = rpc, msg_id
        self.answered = False
        #: the pulled rows, once answered with a plain reply of the expected shape
        self.values: np.ndarray | None = None
        dtype = spec.np_dtype
        self._expect = [[dtype.str, [n, spec.width], "none", n * spec.width * dtype.itemsize]]
        self._shape, self._dtype = (n, spec.width), dtype

    def read(self) -> None:
        """Read what waits on the socket, until the answer is among it."""
        rpc = self.rpc
        raw = rpc.raw
        while not self.answered and readable(raw):
            frames = recv_frames(raw, 1)  # the header as bytes, the payload in place
            if not self._take(frames):
                rpc.receive(frames)

    def _take(self, frames: list) -> bool:
        try:
            h = _unpackb(frames[0], raw=False, strict_map_key=True)
        except Exception:
            return False
        if type(h) is not dict or h.get("id") != self.msg_id or h.get("op") not in ("ok", "error"):
            return False  # (not ours: the socket's own handling names what is wrong with it)
        self.answered = True
        self.rpc.note_received(frames)
        if h["op"] == "ok" and h.get("frames") == self._expect and len(frames) == 2:
            body = frames[1].buffer
            if len(body) == self._expect[0][3]:
                self.values = np.ndarray(self._shape, self._dtype, body)
        return True

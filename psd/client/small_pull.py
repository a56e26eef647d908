"""The blocking client's small pull: one message to one server, built in one step.

A pull of fewer than ``SMALL_PULL`` keys that fall in one range goes to that range's
primary as a single message, without the general request machinery (plan, parts,
encode, assemble), which costs several times the message itself at this size. The
reply comes back through the socket's usual reader. Whenever the answer is not a
plain reply of the expected shape (an error, a ring change, no answer yet), the
caller drops it and issues the pull the general way, which re-routes, retries and
names errors. A pull changes nothing on the server, so asking twice is harmless.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from psd.client.plan import next_rid
from psd.codec.message import PROTOCOL_VERSION
from psd.store.table import SMALL_PULL, TableSpec
from psd.transport.rpc import RpcSocket

if TYPE_CHECKING:
    import asyncio

    from psd.client.aio import AsyncKVWorker

_packb = msgpack.packb


def send(kv: "AsyncKVWorker", spec: TableSpec, keys: np.ndarray) -> tuple[RpcSocket, int, "asyncio.Future"] | None:
    """Send the pull if it is small and has one owner: (socket, request id, reply future);
    None if it is not (nothing was sent)."""
    n = keys.size
    ring = kv.ring
    begins = ring.inner_begin_list
    if not 0 < n < SMALL_PULL or begins is None or not ring.ranges:
        return None
    i = bisect_right(begins, int(keys[0]))
    if i != bisect_right(begins, int(keys[-1])):
        return None
    rpc = kv._servers.get(ring.owners[i][0])
    if rpc is None:
        return None
    keys = np.ascontiguousarray(keys)  # (a strided view cannot be sent as it is)
    msg_id = next(RpcSocket._ids)
    header = _packb({"v": PROTOCOL_VERSION, "op": "pull", "id": msg_id, "src": rpc.node_id, "tbl": spec.name,
                     "ring": ring.version, "clk": kv.clock_value, "meta": {"rid": next_rid()},
                     "frames": [["<u8", [n], "none", keys.nbytes]]}, use_bin_type=True)
    fut = kv._loop.create_future()
    rpc.pending[msg_id] = fut
    try:
        rpc.send_raw(None, [header, keys])
    except Exception:
        rpc.forget(msg_id)
        return None
    return rpc, msg_id, fut


def values(fut: "asyncio.Future", spec: TableSpec, n: int) -> np.ndarray | None:
    """The pulled rows, if the reply is a plain one of the expected shape; else None."""
    if not fut.done() or fut.cancelled() or fut.exception() is not None:
        return None
    reply = fut.result()
    if reply.op != "ok" or len(reply.arrays) != 1:
        return None
    out = reply.arrays[0]
    if out.shape != (n, spec.width) or out.dtype != spec.np_dtype:
        return None
    return out

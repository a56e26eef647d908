"""A server's connections to the other servers: forwards to replicas and range copies."""
from __future__ import annotations

import asyncio

from psd.codec import Limits
from psd.transport import RpcSocket, async_context, connect_dealer
from psd.transport.security import Curve
from psd.transport.shm import Budget
from psd.transport.sockets import dealer_options


class Peers:
    def __init__(self, node_id: str, limits: Limits, compression: str, curve: Curve | None, stripes: int = 1,
                 shm: Budget | None = None):
        """``curve``: the daemons' keys; peers present the server pair to each other.
        ``stripes``: connections per peer under CurveZMQ (large forwards and range
        copies are striped over them: psd/transport/stripes.py). ``shm``: the server's
        shared-memory budget (forwards to a peer of this host)."""
        self.shm = shm
        self.node_id = node_id
        self.stripes = stripes
        self.curve = curve
        self.limits = limits
        self.compression = compression
        self._rpc: dict[str, RpcSocket] = {}
        self._tasks: list[asyncio.Task] = []

    def get(self, node: str, address: str) -> RpcSocket:
        """The connection to ``node``, opened on first use. One connection per peer keeps
        everything sent to it (forwards, then a range copy) in order."""
        rpc = self._rpc.get(node)
        if rpc is None:
            rpc = RpcSocket(connect_dealer(async_context(), address, self.limits.max_message_bytes,
                                           security=self.curve),
                            self.node_id, limits=self.limits, compression=self.compression, shm=self.shm)
            if self.curve is not None and self.stripes > 1:
                rpc.stripe(address, self.stripes, dealer_options(self.limits.max_message_bytes, self.curve))
            self._rpc[node] = rpc
            self._tasks.append(asyncio.ensure_future(rpc.serve()))
        rpc.node_id = self.node_id
        return rpc

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for rpc in self._rpc.values():
            rpc.close()

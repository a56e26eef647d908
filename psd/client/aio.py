"""The asyncio worker API: ``kv = await psd.aio.connect(addr)``.

Requests are sent the moment they are issued (so two pushes from one worker reach a
server in issue order) and tracked by timestamp; ``wait(ts)`` awaits one. A request
that reaches a server which no longer owns its keys is re-planned on a fresh ring
and resent, once per ring change.
"""
from __future__ import annotations

import asyncio
import itertools
import logging

import numpy as np

from psd.client.plan import Part, assemble, check_keys, check_span, check_values, plan
from psd.cluster.assignment import Assignment
from psd.codec import Limits, Message
from psd.config import ClusterConfig
from psd.errors import MessageTooLargeError, NotOwnerError, PsdError, PsdTimeoutError, StartupError
from psd.store.table import TableSpec
from psd.transport import RpcSocket, async_context, connect_dealer
from psd.transport.rpc import raise_if_error

log = logging.getLogger("psd.client")

MAX_REROUTES = 5


class AsyncKVWorker:
    """A worker's connection to the cluster: one socket to the scheduler and one per server."""

    def __init__(self, scheduler: str, config: ClusterConfig):
        self.scheduler = scheduler
        self.config = config
        self.node_id = "W?"
        self.ring = Assignment(version=0)
        self.limits = config.limits
        self._servers: dict[str, RpcSocket] = {}
        self._tasks: list[asyncio.Task] = []
        self._ts = itertools.count(1)
        self._inflight: dict[int, asyncio.Future] = {}
        self.clock_value = 0
        self.closed = False

    # -- connection --------------------------------------------------------------
    async def _connect(self, role: str = "worker", heartbeat: bool = True) -> "AsyncKVWorker":
        ctx = async_context()
        self._link = RpcSocket(connect_dealer(ctx, self.scheduler), self.node_id, limits=self.limits)
        self._tasks.append(asyncio.create_task(self._link.serve()))
        try:
            reply = await self._link.call(Message("register", meta={"role": role}),
                                          timeout=self.config.request_timeout)
        except PsdTimeoutError:
            await self.close()
            raise StartupError(f"no scheduler answered at {self.scheduler}; is `psd scheduler` running "
                               f"there (or pass the right --scheduler)?") from None
        self.node_id = self._link.node_id = reply.meta["node"]
        lim = reply.meta.get("limits", {})
        self.limits = Limits(max_message_bytes=lim.get("max_message_bytes", self.limits.max_message_bytes),
                             max_keys=lim.get("max_keys", self.limits.max_keys))
        self._use_ring(Assignment.from_wire(reply.meta["ring"]))
        self.heartbeat_interval = reply.meta.get("heartbeat_interval", 0.5)
        if heartbeat:
            self._tasks.append(asyncio.create_task(self._heartbeat(self.heartbeat_interval)))
        return self

    def _use_ring(self, ring: Assignment) -> None:
        if ring.version < self.ring.version:
            return
        self.ring = ring
        ctx = async_context()
        for node, address in ring.addresses.items():
            if node not in self._servers:
                rpc = RpcSocket(connect_dealer(ctx, address), self.node_id, limits=self.limits,
                                compression=self.config.compression)
                self._servers[node] = rpc
                self._tasks.append(asyncio.create_task(rpc.serve()))

    async def refresh_ring(self) -> Assignment:
        reply = await self._link.call(Message("get_ring"), timeout=self.config.request_timeout)
        self._use_ring(Assignment.from_wire(reply.meta["ring"]))
        return self.ring

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._link.call(Message("heartbeat", clock=self.clock_value), timeout=max(1.0, 4 * interval))
            except PsdError as e:
                log.debug("%s: heartbeat failed: %s", self.node_id, e)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.node_id != "W?":
                await self._link.call(Message("leave"), timeout=1.0)
        except PsdError:
            pass
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rpc in [self._link, *self._servers.values()]:
            rpc.fail_pending(PsdError("connection closed"))
            rpc.sock.close(0)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # -- API ---------------------------------------------------------------------
    async def table(self, name: str, width: int = 1, dtype: str = "float32", updater: str = "sum",
                    **options) -> "AsyncTable":
        """Create the table, or open it if it exists with the same settings."""
        spec = TableSpec(name, width, dtype, updater, options).validate()
        reply = await self._link.call(Message("create_table", meta={"spec": spec.to_wire()}),
                                      timeout=self.config.request_timeout)
        return AsyncTable(self, TableSpec.from_wire(reply.meta["spec"]))

    def clock(self) -> int:
        """Finish this worker's iteration: tell every server, after the iteration's pushes
        (same connections, so they arrive first). Returns the new clock."""
        self.clock_value += 1
        for node in self.ring.addresses:
            rpc = self._servers.get(node)
            if rpc is not None:
                rpc.send_now(Message("clock", sender=self.node_id, clock=self.clock_value,
                                     meta={"clock": self.clock_value}))
        return self.clock_value

    async def wait(self, ts: int):
        """Block until request ``ts`` is done; returns a pull's values (None for a push)."""
        fut = self._inflight.get(ts)
        if fut is None:
            return None  # finished and collected already
        try:
            return await fut
        finally:
            self._inflight.pop(ts, None)

    async def wait_all(self) -> None:
        for ts in list(self._inflight):
            await self.wait(ts)

    async def status(self) -> dict:
        return (await self._link.call(Message("status"), timeout=self.config.request_timeout)).meta

    async def call_scheduler(self, op: str, timeout: float | None = None, **meta) -> dict:
        reply = await self._link.call(Message(op, meta=meta), timeout=timeout or self.config.request_timeout)
        return reply.meta

    # -- requests ------------------------------------------------------------------
    def _send(self, parts: list[Part]) -> list[asyncio.Future]:
        futs = []
        for part in parts:
            rpc = self._servers.get(part.server)
            if rpc is None:
                raise PsdError(f"no connection to {part.server}; ring v{self.ring.version} is inconsistent")
            futs.append(rpc.request(part.msg))
        return futs

    async def _finish(self, parts: list[Part], futs: list[asyncio.Future], replan
                      ) -> tuple[list[Part], list[Message]]:
        """Await every part; re-plan and resend parts a server refused as not-owner.
        Returns the final parts (re-planning may split them) with their replies."""
        timeout = self.config.request_timeout
        for _ in range(MAX_REROUTES):
            results = await asyncio.gather(*(asyncio.wait_for(f, timeout) for f in futs),
                                           return_exceptions=True)
            replies: list[Message] = []
            retry: list[int] = []
            for i, r in enumerate(results):
                if isinstance(r, asyncio.TimeoutError):
                    raise PsdTimeoutError(f"{parts[i].server} did not answer {parts[i].msg.op} within {timeout} s",
                                          node=parts[i].server)
                if isinstance(r, BaseException):
                    raise r
                if r.op == "error" and r.meta.get("code") == NotOwnerError.code:
                    retry.append(i)
                replies.append(r)
            for i, r in enumerate(replies):
                if i not in retry:
                    raise_if_error(r)
            if not retry:
                return parts, replies
            await self.refresh_ring()
            new_parts, new_futs = [], []
            for i in range(len(parts)):
                if i in retry:
                    sub = replan(parts[i].i0, parts[i].i1)
                    new_parts += sub
                    new_futs += self._send(sub)
                else:
                    new_parts.append(parts[i])
                    done = asyncio.get_running_loop().create_future()
                    done.set_result(replies[i])
                    new_futs.append(done)
            parts, futs = new_parts, new_futs
        raise NotOwnerError(f"request still misrouted after {MAX_REROUTES} ring refreshes")

    def _track(self, fut: asyncio.Future) -> int:
        ts = next(self._ts)
        self._inflight[ts] = fut
        return ts

    def _request(self, op: str, spec: TableSpec, *, keys=None, values=None, span=None, n: int = 0,
                 after=None) -> asyncio.Future:
        """Issue one request and return a future of its result (values for a pull, None
        for a push). It is sent now, so requests leave in issue order, unless it names
        timestamps in ``after``: then it is sent once those are done."""
        deps = [self._inflight[t] for t in (after or ()) if t in self._inflight]
        issued = None if deps else self._issue(op, spec, keys, values, span)

        async def run():
            nonlocal issued
            if deps:
                await asyncio.gather(*deps)
                issued = self._issue(op, spec, keys, values, span)
            parts, replies = await self._finish(*issued)
            if op == "push":
                return None
            if n == 0:
                return np.empty((0, spec.width), dtype=spec.np_dtype)
            return assemble(parts, replies, n, spec)

        return asyncio.ensure_future(run())

    def _issue(self, op: str, spec: TableSpec, keys, values, span) -> tuple[list[Part], list, callable]:
        def replan(i0: int, i1: int) -> list[Part]:
            if span is not None:
                sub = plan(op, spec, self.ring, values=None if values is None else values[i0:i1],
                           span=(span[0] + i0, i1 - i0), clock=self.clock_value)
            else:
                sub = plan(op, spec, self.ring, keys=keys[i0:i1],
                           values=None if values is None else values[i0:i1], clock=self.clock_value)
            for p in sub:
                p.i0 += i0
                p.i1 += i0
            return sub
        parts = plan(op, spec, self.ring, keys=keys, values=values, span=span, clock=self.clock_value)
        return parts, self._send(parts), replan


class AsyncTable:
    """A handle on one table; all calls go through the worker that opened it."""

    def __init__(self, kv: AsyncKVWorker, spec: TableSpec):
        self.kv = kv
        self.spec = spec
        self.name = spec.name
        self.width = spec.width
        self.dtype = spec.np_dtype

    def _prepare(self, keys, values=None):
        keys = check_keys(keys, self.kv.limits.max_keys)
        if values is not None:
            values = check_values(self.spec, values, keys.size)
            size = keys.nbytes + values.nbytes
            if size > self.kv.limits.max_message_bytes:
                raise_too_large(size, self.kv.limits.max_message_bytes)
        return keys, values

    def push(self, keys, values, after: list[int] | None = None) -> int:
        """Send a push now (or once the timestamps in ``after`` are done); returns its
        timestamp (``await kv.wait(ts)``)."""
        keys, values = self._prepare(keys, values)
        return self.kv._track(self.kv._request("push", self.spec, keys=keys, values=values, after=after))

    def push_span(self, lo: int, values, after: list[int] | None = None) -> int:
        """Push rows for the dense keys lo, lo+1, ... (no keys on the wire)."""
        values = np.asarray(values)
        count = values.shape[0] if values.ndim else 0
        check_span(lo, count)
        values = check_values(self.spec, values, count)  # a 0-d array is a ValuesError, not IndexError
        if values.nbytes > self.kv.limits.max_message_bytes:
            raise_too_large(values.nbytes, self.kv.limits.max_message_bytes)
        return self.kv._track(self.kv._request("push", self.spec, values=values, span=(int(lo), count),
                                               after=after))

    def pull_async(self, keys, after: list[int] | None = None) -> int:
        """Send a pull; returns its timestamp; ``await kv.wait(ts)`` returns the values."""
        keys, _ = self._prepare(keys)
        return self.kv._track(self.kv._request("pull", self.spec, keys=keys, n=keys.size, after=after))

    async def pull(self, keys, after: list[int] | None = None) -> np.ndarray:
        keys, _ = self._prepare(keys)
        return await self.kv._request("pull", self.spec, keys=keys, n=keys.size, after=after)

    async def pull_span(self, lo: int, count: int) -> np.ndarray:
        check_span(lo, count)
        if count > self.kv.limits.max_keys:
            raise MessageTooLargeError(f"span of {count} keys, limit is {self.kv.limits.max_keys}; "
                                       f"split the request")
        return await self.kv._request("pull", self.spec, span=(int(lo), int(count)), n=int(count))

    async def pushpull(self, keys, values) -> np.ndarray:
        """Push, then pull the same keys after the push is applied (one round trip)."""
        keys, values = self._prepare(keys, values)
        return await self.kv._request("pushpull", self.spec, keys=keys, values=values, n=keys.size)


def raise_too_large(size: int, limit: int):
    raise MessageTooLargeError(f"request is {size} bytes, over the cluster's max_message_bytes {limit}; "
                               f"push fewer keys at a time")


async def connect(scheduler: str, config: ClusterConfig | None = None, *, role: str = "worker",
                  heartbeat: bool = True) -> AsyncKVWorker:
    """Register with the scheduler at ``scheduler`` and return a connected worker.
    ``heartbeat=False`` leaves heartbeats to the caller (the sync facade)."""
    kv = AsyncKVWorker(scheduler, config or ClusterConfig())
    return await kv._connect(role, heartbeat)

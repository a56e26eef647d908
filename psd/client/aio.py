"""The asyncio worker API: ``kv = await psd.aio.connect(addr)``.

Requests are sent the moment they are issued (so two pushes from one worker reach a
server in issue order) and tracked by timestamp; ``wait(ts)`` awaits one. A request
that reaches a server which no longer owns its keys is re-planned on a fresh ring
and resent, once per ring change.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os

import numpy as np

from psd.client.plan import Part, _rids, assemble, check_keys, check_span, check_values, plan, replan
from psd.cluster.rows import Rows
from psd.cluster.assignment import Assignment
from psd.codec import SCHEDULER_REPLY_HEADER_BYTES, Limits, Message
from psd.config import ClusterConfig
from psd.errors import (AuthError, MessageTooLargeError, NotOwnerError, NotReplicatedError, ProtocolError,
                        PsdError, PsdTimeoutError, StartupError)
from psd.store.table import TableSpec, check_namespace, qualified
from psd.transport import RpcSocket, async_context, connect_dealer, security
from psd.transport.security import Curve, HandshakeWatch, refusal_error
from psd.transport.sockets import connect_watched
from psd.transport.rpc import raise_if_error

log = logging.getLogger("psd.client")

#: how often an unanswered request checks whether the ring moved its keys
RETRY_TICK = 0.05
#: how often a request unanswered for long asks the scheduler for the ring
RING_POLL = 1.0
#: seconds one attempt of a scheduler request waits before asking again
SCHEDULER_ATTEMPT = 2.0


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
        #: tables opened by ``table(name)`` are ``<namespace>/<name>`` (a job's worker runs its
        #: app in the job's namespace); None: the default namespace, names as given
        self.namespace: str | None = None
        #: this process's CurveZMQ keys for the cluster (None: plaintext); set by connect()
        self.curve: Curve | None = None

    # -- connection --------------------------------------------------------------
    async def _connect(self, role: str = "worker", heartbeat: bool = True) -> "AsyncKVWorker":
        self._loop = asyncio.get_running_loop()
        ctx = async_context()
        sock, watch = connect_watched(ctx, self.scheduler, security=self.curve)
        self._link = RpcSocket(sock, self.node_id, handler=self._on_scheduler, loop=self._loop,
                               limits=dataclasses.replace(self.limits, max_header_bytes=SCHEDULER_REPLY_HEADER_BYTES))
        self._tasks.append(asyncio.create_task(self._link.serve()))
        try:
            reply = await self._register(role, watch)
        except PsdTimeoutError:
            await self.close()
            raise StartupError(f"no scheduler answered at {self.scheduler}; is `psd scheduler` running "
                               f"there (or pass the right --scheduler)?") from None
        except AuthError:
            await self.close()
            raise
        finally:
            watch.close()  # the data path carries no monitor
        self.node_id = self._link.node_id = reply.meta["node"]
        lim = reply.meta.get("limits", {})
        self.limits = Limits(max_message_bytes=lim.get("max_message_bytes", self.limits.max_message_bytes),
                             max_keys=lim.get("max_keys", self.limits.max_keys))
        self._use_ring(Assignment.from_wire(reply.meta["ring"]))
        self.heartbeat_interval = reply.meta.get("heartbeat_interval", 0.5)
        if heartbeat:
            self._tasks.append(asyncio.create_task(self._heartbeat(self.heartbeat_interval)))
        return self

    async def _register(self, role: str, watch: HandshakeWatch) -> Message:
        """``register``, raising AuthError as soon as the scheduler refuses our handshake
        (no keys, an unlisted key, the wrong server key) rather than timing out."""
        register = asyncio.ensure_future(self._link.call(Message("register", meta={"role": role}),
                                                         timeout=self.config.request_timeout))
        refused = asyncio.ensure_future(watch.failure())
        try:
            await asyncio.wait({register, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
            if not register.done():
                register.cancel()
        if register.done() and not register.cancelled():
            return register.result()
        raise refusal_error(refused.result(), self.scheduler, self.curve)

    async def _on_scheduler(self, route, msg: Message) -> Message:
        """The scheduler pushes ring changes so unanswered requests move at once."""
        if msg.op != "ring":
            raise ProtocolError(f"a worker does not handle {msg.op!r}")
        self._use_ring(Assignment.from_wire(msg.meta["ring"]))
        return msg.reply()

    def _use_ring(self, ring: Assignment) -> None:
        if ring.version < self.ring.version:
            return
        self.ring = ring
        ctx = async_context()
        for node, address in ring.addresses.items():
            if node not in self._servers:
                rpc = RpcSocket(connect_dealer(ctx, address, security=self.curve), self.node_id, limits=self.limits,
                                compression=self.config.compression, loop=self._loop)
                self._servers[node] = rpc
                self._tasks.append(self._loop.create_task(rpc.serve()))

    async def refresh_ring(self) -> Assignment:
        reply = await self._link.call(Message("get_ring"), timeout=self.config.request_timeout)
        self._use_ring(Assignment.from_wire(reply.meta["ring"]))
        return self.ring

    async def _heartbeat(self, interval: float) -> None:
        # not `while True`: on Python 3.11 asyncio.wait_for returns the reply instead of
        # raising when a cancel coincides with it, so close() could wait on us forever
        while not self.closed:
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
            rpc.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # -- API ---------------------------------------------------------------------
    async def table(self, name: str, width: int = 1, dtype: str = "float32", updater: str = "sum",
                    **options) -> "AsyncTable":
        """Create the table, or open it if it exists with the same settings."""
        spec = TableSpec(qualified(self.namespace, name), width, dtype, updater, options).validate()
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
        """Ask the scheduler, re-asking every few seconds until ``timeout``: a request sent
        while the scheduler restarts can be lost with its old connection. Callers make
        their requests safe to repeat (job reports carry a sequence number)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.config.request_timeout)
        while True:
            attempt = min(SCHEDULER_ATTEMPT, max(0.1, deadline - loop.time()))
            try:
                return (await self._link.call(Message(op, meta=meta), timeout=attempt)).meta
            except PsdTimeoutError:
                if loop.time() >= deadline:
                    raise PsdTimeoutError(f"the scheduler at {self.scheduler} did not answer {op} within "
                                          f"{timeout or self.config.request_timeout} s") from None
                log.info("%s: no answer to %s yet; asking the scheduler again", self.node_id, op)

    # -- requests ------------------------------------------------------------------
    def server_socket(self, node: str) -> RpcSocket | None:
        """The connection to server ``node``, if the ring has given us its address."""
        return self._servers.get(node)

    def _send(self, part: Part) -> asyncio.Future:
        rpc = self._servers.get(part.server)
        if rpc is None:
            raise PsdError(f"no connection to {part.server}; ring v{self.ring.version} has no address for it")
        return rpc.request(part.msg)

    def _send_all(self, parts: list[Part]) -> dict:
        """Send every part now; the pending table ``_finish`` works from."""
        return {id(p): (p, self._send(p), self.ring.version) for p in parts}

    async def _finish(self, spec: TableSpec, pending: dict) -> tuple[list[Part], list[Message]]:
        try:
            return await self._await_parts(spec, pending)
        finally:  # given up (an error, a timeout): the parts still out are awaited no more
            for part, fut, _ in pending.values():
                fut.cancel()
                rpc = self._servers.get(part.server)
                if rpc is not None:
                    rpc.forget(part.msg.id)

    async def _await_parts(self, spec: TableSpec, pending: dict) -> tuple[list[Part], list[Message]]:
        """Await every part. A part refused as not-owner, or still unanswered when the
        ring changes (its server died or handed the range over), is re-cut by the new
        ring and resent under the same request id, so it is applied exactly once. A push
        answered not_replicated (a replica refused it) is resent the same way until
        ``request_timeout``, then raised. Returns the final parts (re-planning may split
        them) with their replies."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout
        done: list[tuple[Part, Message]] = []
        next_refresh = loop.time() + RING_POLL
        #: request id -> its last not_replicated answer, raised if still unacked at the deadline
        not_replicated: dict[int, Message] = {}
        resends = 0  # rounds of not_replicated resends: the pause before each doubles
        while pending:
            await asyncio.wait([f for _, f, _ in pending.values()], timeout=RETRY_TICK,
                               return_when=asyncio.FIRST_COMPLETED)
            refused, unreplicated = [], []
            for key, (part, fut, version) in list(pending.items()):
                if fut.done():
                    del pending[key]
                    reply = fut.result()
                    code = reply.meta.get("code") if reply.op == "error" else None
                    if code == NotOwnerError.code:
                        refused.append(part)
                    elif code == NotReplicatedError.code and loop.time() < deadline:
                        unreplicated.append(part)  # applied on the primary, not yet on a replica
                        not_replicated[part.msg.meta.get("rid")] = reply
                    else:
                        not_replicated.pop(part.msg.meta.get("rid"), None)
                        done.append((part, raise_if_error(reply)))
                elif version != self.ring.version and self._moved(part):
                    del pending[key]
                    fut.cancel()
                    refused.append(part)
            if unreplicated:
                # the same request again, after a pause: the primary answers a resend by
                # forwarding it again, and each server applies it once
                await asyncio.sleep(max(0.0, min(1.0, RETRY_TICK * 2 ** resends, deadline - loop.time())))
                resends += 1
                if loop.time() >= deadline:  # (never resend past it: servers forget quiet senders)
                    raise_if_error(not_replicated[unreplicated[0].msg.meta.get("rid")])
                for part in unreplicated:
                    for sub in self._recut(part, spec):
                        pending[id(sub)] = (sub, self._send(sub), self.ring.version)
            if refused:
                if loop.time() > deadline:
                    raise self._misrouted(refused)
                if any(p.server in self.ring.addresses and not self._moved(p) for p in refused):
                    await self.refresh_ring()  # a server knows a newer ring than we do
                    await asyncio.sleep(RETRY_TICK / 4)
                    if loop.time() >= deadline:
                        raise self._misrouted(refused)
                for part in refused:
                    for sub in self._recut(part, spec):
                        pending[id(sub)] = (sub, self._send(sub), self.ring.version)
            elif pending and loop.time() > deadline:
                for part, _, _ in pending.values():
                    if part.msg.meta.get("rid") in not_replicated:
                        raise_if_error(not_replicated[part.msg.meta["rid"]])
                part = next(iter(pending.values()))[0]
                raise PsdTimeoutError(f"{part.server} did not answer {part.msg.op} within "
                                      f"{self.config.request_timeout} s", node=part.server)
            elif pending and loop.time() > next_refresh:
                next_refresh = loop.time() + RING_POLL  # in case a ring notice was lost
                await self.refresh_ring()
        return [p for p, _ in done], [r for _, r in done]

    def _misrouted(self, parts: list[Part]) -> NotOwnerError:
        return NotOwnerError(f"{len(parts)} request part(s) still misrouted at ring v{self.ring.version} "
                             f"after {self.config.request_timeout} s")

    def _recut(self, part: Part, spec: TableSpec) -> list[Part]:
        """Re-plan a part by the current ring. Sent whole, it keeps its request id (a
        resend); cut into pieces, each piece gets a fresh id and names the ids it was cut
        from (meta.orig): a server that applied the original then answers a piece as a
        resend, but never mistakes one piece for another piece of the same request."""
        subs = replan(part, spec, self.ring, part.msg.clock)  # the clock it was issued at
        orig = part.msg.meta.get("orig")
        if len(subs) > 1:
            orig = [*(orig or []), part.msg.meta["rid"]][-64:]
            for sub in subs:
                sub.msg.meta["rid"] = next(_rids)
        if orig:
            for sub in subs:
                sub.msg.meta["orig"] = orig
        return subs

    def _moved(self, part: Part) -> bool:
        """Whether the current ring sends any of the part's rows to another server."""
        groups = part.rows.groups(self.ring)
        return len(groups) != 1 or groups[0][0][0] != part.server

    def _track(self, fut: asyncio.Future, keeps_result: bool = False) -> int:
        """Name a request by timestamp. A push that succeeds is forgotten at once (waiting
        on it later returns at once), so fire-and-forget pushes do not pile up; a failed
        push, and a pull's values, stay until ``wait(ts)`` collects them."""
        ts = next(self._ts)
        self._inflight[ts] = fut
        if not keeps_result:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() or self._inflight.pop(ts, None))
        return ts

    def _issue(self, op: str, spec: TableSpec, rows: Rows) -> dict:
        """Cut a request by the ring and send every part now."""
        return self._send_all(plan(op, spec, self.ring, rows, clock=self.clock_value))

    async def _complete(self, op: str, spec: TableSpec, n: int, pending: dict):
        parts, replies = await self._finish(spec, pending)
        return _result(op, spec, n, parts, replies)

    def _collect(self, op: str, spec: TableSpec, n: int, pending: dict) -> tuple[bool, object]:
        """The result, if every part already has its final answer: ``(True, result)``;
        else ``(False, None)`` and ``_complete`` takes over (re-routing, errors, timeouts)."""
        parts, replies = [], []
        for part, fut, _ in pending.values():
            if not fut.done() or fut.cancelled() or fut.exception() is not None:
                return False, None
            reply = fut.result()
            if reply.op == "error":
                return False, None
            parts.append(part)
            replies.append(reply)
        return True, _result(op, spec, n, parts, replies)

    def _request(self, op: str, spec: TableSpec, rows: Rows, after=None) -> asyncio.Future:
        """Issue one request and return a future of its result (values for a pull, None
        for a push). It is sent now, so requests leave in issue order, unless it names
        timestamps in ``after``: then it is sent once those are done."""
        deps = [self._inflight[t] for t in (after or ()) if t in self._inflight]
        if not deps:  # send now, not in the task: a later request or clock() must not overtake it
            return self._loop.create_task(self._complete(op, spec, rows.count, self._issue(op, spec, rows)))

        async def run():
            await asyncio.gather(*deps)
            return await self._complete(op, spec, rows.count, self._issue(op, spec, rows))
        return self._loop.create_task(run())


def _result(op: str, spec: TableSpec, n: int, parts: list[Part], replies: list[Message]):
    if op == "push":
        return None
    if n == 0:
        return np.empty((0, spec.width), dtype=spec.np_dtype)
    return assemble(parts, replies, n, spec)


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
        return self.kv._track(self.kv._request("push", self.spec, Rows(keys=keys, values=values), after))

    def push_span(self, lo: int, values, after: list[int] | None = None) -> int:
        """Push rows for the dense keys lo, lo+1, ... (no keys on the wire)."""
        values = np.asarray(values)
        count = values.shape[0] if values.ndim else 0
        check_span(lo, count)
        values = check_values(self.spec, values, count)  # a 0-d array is a ValuesError, not IndexError
        if values.nbytes > self.kv.limits.max_message_bytes:
            raise_too_large(values.nbytes, self.kv.limits.max_message_bytes)
        rows = Rows(spans=[(int(lo), count)] if count else [], values=values)
        return self.kv._track(self.kv._request("push", self.spec, rows, after))

    def pull_async(self, keys, after: list[int] | None = None) -> int:
        """Send a pull; returns its timestamp; ``await kv.wait(ts)`` returns the values."""
        return self.kv._track(self.kv._request("pull", self.spec, self.pull_rows(keys), after), keeps_result=True)

    async def pull(self, keys, after: list[int] | None = None) -> np.ndarray:
        return await self.kv._request("pull", self.spec, self.pull_rows(keys), after)

    async def pull_span(self, lo: int, count: int) -> np.ndarray:
        return await self.kv._request("pull", self.spec, self.span_rows(lo, count))

    async def pushpull(self, keys, values) -> np.ndarray:
        """Push, then pull the same keys after the push is applied (one round trip)."""
        return await self.kv._request("pushpull", self.spec, self.pushpull_rows(keys, values))

    # checked rows of each kind of request (shared with the blocking client)
    def pull_rows(self, keys) -> Rows:
        keys, _ = self._prepare(keys)
        return Rows(keys=keys)

    def span_rows(self, lo: int, count: int) -> Rows:
        check_span(lo, count)
        if count > self.kv.limits.max_keys:
            raise MessageTooLargeError(f"span of {count} keys, limit is {self.kv.limits.max_keys}; "
                                       f"split the request")
        return Rows(spans=[(int(lo), int(count))] if count else [])

    def pushpull_rows(self, keys, values) -> Rows:
        keys, values = self._prepare(keys, values)
        return Rows(keys=keys, values=values)


def raise_too_large(size: int, limit: int):
    raise MessageTooLargeError(f"request is {size} bytes, over the cluster's max_message_bytes {limit}; "
                               f"push fewer keys at a time")


async def connect(scheduler: str, config: ClusterConfig | None = None, *, role: str = "worker",
                  heartbeat: bool = True, namespace: str | None = None) -> AsyncKVWorker:
    """Register with the scheduler at ``scheduler`` and return a connected worker.
    ``heartbeat=False`` leaves heartbeats to the caller (the sync facade); ``namespace``:
    open tables in that namespace (docs/jobs.md, "Namespaces")."""
    config = config or ClusterConfig()
    kv = AsyncKVWorker(scheduler, config)
    kv.namespace = None if namespace is None else check_namespace(namespace)
    # the public API is an entry point like the command line: it alone reads PSD_KEYS here
    kv.curve = security.for_client(scheduler, security=config.security, keys=config.keys,
                                   env_keys=os.environ.get("PSD_KEYS"))
    return await kv._connect(role, heartbeat)

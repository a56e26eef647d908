"""The asyncio worker API: ``kv = await psd.aio.connect(addr)``.

Requests are sent the moment they are issued (so two pushes from one worker reach a
server in issue order) and tracked by timestamp; ``wait(ts)`` awaits one. What happens
to a request (cut by the ring, sent again after a refusal or a ring change, finished or
failed) is decided by ``psd.core.client.ClientCore``; this module carries out its
effects on the sockets and turns its results into futures.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.rows import Rows
from psd.cluster.schedulers import after, lost_after, named_leader
from psd.codec import SCHEDULER_REPLY_HEADER_BYTES, Limits, Message
from psd.codec.signature import KC_MIN_KEYS
from psd.codec.traffic import total as traffic_total
from psd.config import ClusterConfig
from psd.core.client import RETRY_TICK, AskRing, ClientCore, Done, Send
from psd.filters import FilterChain, TableInfo, build_chain
from psd.filters.pull import build_pull
from psd.errors import (AuthError, BadRequestError, MessageTooLargeError, NotLeaderError, ProtocolError,
                        PsdError, PsdTimeoutError, StartupError)
from psd.schema import TableSpec, check_keys, check_namespace, check_span, check_values, qualified, too_large
from psd.transport import RpcSocket, async_context, connect_dealer, security
from psd.transport.heartbeat import HeartbeatThread
from psd.transport.security import Curve, HandshakeWatch, refusal_error
from psd.transport.shm import Budget, ShmSettings, sweep
from psd.transport.sockets import connect_watched, dealer_options
from psd.transport.stripes import stripe_count

log = logging.getLogger("psd.client")

#: seconds one attempt of a scheduler request waits before asking again
SCHEDULER_ATTEMPT = 2.0
#: how long a first send that found no connection yet (a handshake still going, or being
#: refused) is tried again before giving up
REGISTER_RETRY = 0.05
#: seconds between two rounds of shared-memory upkeep (frees not yet sent, new handshakes)
SHM_TICK = 1.0


class AsyncKVWorker:
    """A worker's connection to the cluster: one socket to the scheduler and one per server."""

    def __init__(self, scheduler: str, config: ClusterConfig):
        self.scheduler = scheduler
        #: every scheduler's address (the leader's and the standbys'): the link moves to
        #: whichever leads (docs/fault-tolerance.md, "Standby scheduler")
        self.schedulers: list[str] = [scheduler, *(a for a in config.standby if a != scheduler)]
        self._answered_at = 0.0
        #: heartbeat threads to move with the link (keepalive(), the sync client's)
        self.threads: list[HeartbeatThread] = []
        self.config = config
        self.node_id = "W?"
        self.limits = config.limits
        self.core = ClientCore("W?", config.request_timeout)
        self.core.key_caching = config.key_caching
        self._servers: dict[str, RpcSocket] = {}
        self._tasks: list[asyncio.Task] = []
        self._ts = itertools.count(1)
        self._inflight: dict[int, asyncio.Future] = {}
        self._results: dict[int, asyncio.Future] = {}  # the core's timestamp -> its request's future
        self._refreshing: asyncio.Task | None = None
        self.closed = False
        #: set once the scheduler answers a heartbeat saying we were declared dead (cut
        #: off or stalled past worker_timeout): a job's shard of ours went to another
        #: worker; a worker daemon then gives it up and registers again
        self.expelled = asyncio.Event()
        #: options every table opened here gets unless given (a job's consistency: the
        #: worker daemon sets it while it runs the job, so a job submitted to a cluster of
        #: another default runs under its own model)
        self.table_defaults: dict = {}
        #: filter chains by qualified table name (kv.table(..., filters=...)): their
        #: residuals and per-key state outlive any one table handle
        self.filters: dict[str, FilterChain] = {}
        #: pull filters by qualified table name: the ``meta.pf`` its pulls carry
        self.pull_filters: dict[str, dict] = {}
        #: tables opened by ``table(name)`` are ``<namespace>/<name>`` (a job's worker runs its
        #: app in the job's namespace); None: the default namespace, names as given
        self.namespace: str | None = None
        #: this process's CurveZMQ keys for the cluster (None: plaintext); set by connect()
        self.curve: Curve | None = None
        #: shared memory with the servers of this host (config shm*; docs/operations.md)
        self.shm = Budget(ShmSettings(config.shm, config.shm_min_bytes, config.shm_max_bytes, config.shm_dir))
        if config.shm:
            sweep(config.shm_dir)

    @property
    def ring(self) -> Assignment:
        return self.core.ring

    @property
    def clock_value(self) -> int:
        return self.core.clock_value

    # -- connection --------------------------------------------------------------
    async def _connect(self, role: str = "worker", heartbeat: bool = True) -> "AsyncKVWorker":
        self._loop = asyncio.get_running_loop()
        ctx = async_context()
        sock, watch = connect_watched(ctx, self.scheduler, security=self.curve)
        self._link = RpcSocket(sock, self.node_id, handler=self._on_scheduler, loop=self._loop,
                               limits=dataclasses.replace(self.limits, max_header_bytes=SCHEDULER_REPLY_HEADER_BYTES))
        self._tasks.append(asyncio.create_task(self._link.serve()))
        try:
            reply = await self._register_with_leader(role, watch)
        except PsdTimeoutError:
            await self.close()
            raise StartupError(f"no scheduler answered at {self.scheduler}; is `psd scheduler` running "
                               f"there (or pass the right --scheduler)?") from None
        except AuthError:
            await self.close()
            raise
        finally:
            watch.close()  # the data path carries no monitor
        self.node_id = self._link.node_id = self.core.node_id = reply.meta["node"]
        lim = reply.meta.get("limits", {})
        self.limits = Limits(max_message_bytes=lim.get("max_message_bytes", self.limits.max_message_bytes),
                             max_keys=lim.get("max_keys", self.limits.max_keys))
        budget = lim.get("max_inflight_bytes")
        if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
            self.core.budget = budget
        self._use_ring(Assignment.from_wire(reply.meta["ring"]))
        self.heartbeat_interval = reply.meta.get("heartbeat_interval", 0.5)
        if heartbeat:
            self._tasks.append(asyncio.create_task(self._heartbeat(self.heartbeat_interval)))
        self._tasks.append(asyncio.create_task(self._ticks()))
        return self

    async def _register_with_leader(self, role: str, watch: HandshakeWatch) -> Message:
        """``register`` with the scheduler that leads: a standby's refusal names it."""
        deadline = self._loop.time() + self.config.request_timeout
        while True:
            left = deadline - self._loop.time()
            attempt = min(2 * SCHEDULER_ATTEMPT, left) if len(self.schedulers) > 1 else left
            try:
                reply = await self._register(role, watch, max(0.05, attempt))
                break
            except (NotLeaderError, PsdTimeoutError) as e:
                if len(self.schedulers) < 2 or self._loop.time() >= deadline:
                    raise
                leader = named_leader(e.data, self.schedulers) if isinstance(e, NotLeaderError) else None
                if leader is not None:
                    self._switch(leader, "a standby named the leader")
                else:
                    self._switch(after(self.schedulers, self.scheduler), str(e))
                    await asyncio.sleep(min(0.2, max(0.0, deadline - self._loop.time())))
        schedulers = reply.meta.get("schedulers")
        if isinstance(schedulers, list) and all(isinstance(a, str) for a in schedulers):
            self.schedulers[:] = list(dict.fromkeys([self.scheduler, *schedulers[:16]]))
        self._answered_at = self._loop.time()
        return reply

    # -- the scheduler that leads --------------------------------------------------
    def _switch(self, address: str, why: str) -> None:
        if address == self.scheduler:
            return
        log.warning("%s: moving from the scheduler at %s to %s (%s)", self.node_id, self.scheduler, address, why)
        self._link.move(self.scheduler, address)
        self.scheduler = address
        for thread in self.threads:
            thread.scheduler = address
        self._answered_at = self._loop.time()

    def _scheduler_failed(self, err: Exception) -> None:
        """A standby named the leader: go there; silence past a dead node's: the next one."""
        if isinstance(err, NotLeaderError):
            leader = named_leader(err.data, self.schedulers)
            if leader is not None:
                self._switch(leader, "a standby named the leader")
        elif len(self.schedulers) > 1 and self._loop.time() - self._answered_at > lost_after(
                getattr(self, "heartbeat_interval", self.config.heartbeat_interval), self.config.heartbeat_misses):
            self._switch(after(self.schedulers, self.scheduler), "no answer")

    async def _ask(self, msg: Message, timeout: float) -> Message:
        """A request to the scheduler that leads, moving to it as needed (with standbys);
        without standbys, one attempt of ``timeout``."""
        deadline = self._loop.time() + timeout
        while True:
            left = deadline - self._loop.time()
            attempt = min(SCHEDULER_ATTEMPT, left) if len(self.schedulers) > 1 else left
            try:
                reply = await self._link.call(Message(msg.op, meta=msg.meta, clock=msg.clock),
                                              timeout=max(0.05, attempt))
                self._answered_at = self._loop.time()
                return reply
            except (NotLeaderError, PsdTimeoutError) as e:
                if len(self.schedulers) < 2 or self._loop.time() >= deadline:
                    raise
                self._scheduler_failed(e)
                if isinstance(e, NotLeaderError):
                    await asyncio.sleep(min(0.1, self.config.heartbeat_interval))

    async def _register(self, role: str, watch: HandshakeWatch, timeout: float) -> Message:
        """``register``, raising AuthError as soon as the scheduler refuses our handshake
        (no keys, an unlisted key, the wrong server key) rather than timing out. A send
        that finds no connection yet (the refused handshake tore it down) waits for the
        handshake's verdict and tries again."""
        refused = asyncio.ensure_future(watch.failure())
        deadline = self._loop.time() + timeout
        try:
            while True:
                register = asyncio.ensure_future(self._link.call(Message("register", meta={"role": role}),
                                                                 timeout=max(0.01, deadline - self._loop.time())))
                await asyncio.wait({register, refused}, return_when=asyncio.FIRST_COMPLETED)
                if refused.done():
                    register.cancel()
                    raise refusal_error(refused.result(), self.scheduler, self.curve)
                err = register.exception()
                if err is None:
                    return register.result()
                if not _no_connection(err) or self._loop.time() >= deadline:
                    raise err
                await asyncio.wait({refused}, timeout=REGISTER_RETRY)
                if refused.done():
                    raise refusal_error(refused.result(), self.scheduler, self.curve)
        finally:
            refused.cancel()

    async def _on_scheduler(self, route, msg: Message) -> Message:
        """The scheduler pushes ring changes so unanswered requests move at once."""
        if msg.op != "ring":
            raise ProtocolError(f"a worker does not handle {msg.op!r}")
        self._use_ring(Assignment.from_wire(msg.meta["ring"]))
        return msg.reply()

    def _use_ring(self, ring: Assignment, down: list[str] | None = None) -> None:
        ctx = async_context()
        for node, address in ring.addresses.items():
            if node not in self._servers:
                rpc = RpcSocket(connect_dealer(ctx, address, security=self.curve), self.node_id, limits=self.limits,
                                compression=self.config.compression, loop=self._loop, shm=self.shm,
                                on_reply=lambda msg_id, reply, node=node: self._answered(node, msg_id, reply))
                stripes = stripe_count(self.config.stripes)
                if self.curve is not None and stripes > 1:  # encryption on several cores
                    rpc.stripe(address, stripes, dealer_options(None, self.curve))
                self._servers[node] = rpc
                self._tasks.append(self._loop.create_task(rpc.serve()))
        self._run(self.core.use_ring(ring, time.monotonic(), down))

    async def refresh_ring(self) -> Assignment:
        reply = await self._ask(Message("get_ring"), self.config.request_timeout)
        self._use_ring(Assignment.from_wire(reply.meta["ring"]), _down(reply))
        return self.ring

    async def _refresh(self) -> None:
        try:
            reply = await self._link.call(Message("get_ring"), timeout=min(SCHEDULER_ATTEMPT,
                                                                            self.config.request_timeout))
            self._answered_at = self._loop.time()
            self._use_ring(Assignment.from_wire(reply.meta["ring"]), _down(reply))
        except PsdError as e:  # the scheduler restarting or cut off: the core asks again later
            log.debug("%s: asking for the ring failed: %s", self.node_id, e)
            self._scheduler_failed(e)
            self._run(self.core.use_ring(self.core.ring, time.monotonic()))
        finally:
            self._refreshing = None

    async def _heartbeat(self, interval: float) -> None:
        # not `while True`: on Python 3.11 asyncio.wait_for returns the reply instead of
        # raising when a cancel coincides with it, so close() could wait on us forever
        while not self.closed:
            await asyncio.sleep(interval)
            try:
                reply = await self._link.call(Message("heartbeat", clock=self.clock_value),
                                              timeout=max(1.0, 4 * interval))
            except PsdError as e:
                log.debug("%s: heartbeat failed: %s", self.node_id, e)
                self._scheduler_failed(e)
                continue
            self._answered_at = self._loop.time()
            if (reply.meta.get("state") in ("dead", "left") or reply.meta.get("known") is False) \
                    and not self.expelled.is_set():
                log.warning("%s: the scheduler declared this worker dead (cut off or stalled past "
                            "worker_timeout)", self.node_id)
                self.expelled.set()

    async def _ticks(self) -> None:
        shm_at = self._loop.time()
        while not self.closed:
            await asyncio.sleep(RETRY_TICK)
            self.tick()
            if self._loop.time() - shm_at >= SHM_TICK:
                shm_at = self._loop.time()
                for rpc in list(self._servers.values()):
                    rpc.shm_tick()

    def tick(self) -> None:
        """The core's timers: deadlines, pauses before sending again, ring polls; and
        replies whose striped chunks did not all come."""
        now = time.monotonic()
        for rpc in self._servers.values():
            rpc.expire_stripes(now)
        self._run(self.core.tick(now))

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
        for fut in self._results.values():
            if not fut.done():
                fut.set_exception(PsdError("connection closed"))
        self._results.clear()
        for rpc in [self._link, *self._servers.values()]:
            rpc.fail_pending(PsdError("connection closed"))
            rpc.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # -- carrying out the core's effects ------------------------------------------------
    def _run(self, effects: list) -> None:
        for e in effects:
            kind = type(e)
            if kind is Send:
                rpc = self._servers.get(e.server)
                try:
                    if rpc is None:
                        raise PsdError(f"no connection to {e.server}; ring v{self.ring.version} has no address for it")
                    rpc.send_now(e.msg)
                except PsdError as err:
                    self._run(self.core.answered(e.server, err, e.msg.id, time.monotonic()))
            elif kind is Done:
                fut = self._results.pop(e.ts, None)
                if fut is not None and not fut.done():
                    if e.error is None:
                        fut.set_result(e.result)
                    else:
                        fut.set_exception(e.error)
            elif kind is AskRing:
                if self._refreshing is None and not self.closed:
                    self._refreshing = self._loop.create_task(self._refresh())
            else:
                raise TypeError(f"unknown effect {e!r}")

    def _answered(self, server: str, msg_id: int, reply: Message | Exception) -> None:
        self._run(self.core.answered(server, reply, msg_id, time.monotonic()))

    # -- API ---------------------------------------------------------------------
    async def table(self, name: str, width: int = 1, dtype: str = "float32", updater: str = "sum",
                    filters: list | None = None, pull_filters: list | None = None, **options) -> "AsyncTable":
        """Create the table, or open it if it exists with the same settings. ``filters``:
        what this worker's pushes to it go through (psd.filters; docs/jobs.md, "Filters"),
        checked here (ConfigError naming the key); None keeps the table's chain, if any.
        ``pull_filters``: what the servers' answers to this worker's pulls of it go
        through (psd.filters.pull; docs/jobs.md, "Filters on pulls"); None keeps them."""
        spec = TableSpec(qualified(self.namespace, name), width, dtype, updater,
                         {**self.table_defaults, **options}).validate()
        chain = pulls = None
        if filters is not None:  # checked before the table is created: nothing half done
            chain = build_chain(filters, TableInfo(spec.name, spec.dtype, spec.width, spec.updater, spec.options))
        if pull_filters is not None:
            pulls = build_pull(pull_filters, spec.dtype, spec.width)
        reply = await self._ask(Message("create_table", meta={"spec": spec.to_wire()}), self.config.request_timeout)
        table = AsyncTable(self, TableSpec.from_wire(reply.meta["spec"]))
        if filters is not None:
            if chain is None:
                self.filters.pop(spec.name, None)
            else:
                chain.table_spec = table.spec  # (what a flush pushes to)
                self.filters[spec.name] = chain
        if pull_filters is not None:
            if pulls is None:
                self.pull_filters.pop(spec.name, None)
            else:
                self.pull_filters[spec.name] = pulls
        return table

    async def flush(self) -> None:
        """Push every residual the filters hold back (``significant``, ``quantize``'s
        error feedback) and wait until they are applied: after it, the tables hold all
        that was pushed, up to float rounding. Run at the end of every job."""
        pending = []
        for chain in self.filters.values():
            keys, values = chain.residual()
            if keys.size:
                rows = Rows(keys=keys, values=values, zstd=chain.zstd)
                pending.append(self._track(self._request("push", chain.table_spec, rows)))
        for ts in pending:
            await self.wait(ts)

    def clock(self) -> int:
        """Finish this worker's iteration: tell every server, after the iteration's pushes
        (same streams, so they arrive first). Returns the new clock."""
        self._run(self.core.clock(time.monotonic()))
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

    def keepalive(self) -> HeartbeatThread:
        """Heartbeats from a thread, started now (``stop()`` it when done): for a process
        whose event loop long numpy work may hold past the failure timeout."""
        thread = HeartbeatThread(self.scheduler, self.node_id, self.heartbeat_interval, lambda: self.clock_value,
                                 security=self.curve)
        self.threads.append(thread)
        thread.start()
        return thread

    async def status(self) -> dict:
        return (await self._ask(Message("status"), self.config.request_timeout)).meta

    async def call_scheduler(self, op: str, timeout: float | None = None, **meta) -> dict:
        """Ask the scheduler, re-asking every few seconds until ``timeout``: a request sent
        while the scheduler restarts can be lost with its old connection. Callers make
        their requests safe to repeat (job reports carry a sequence number)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.config.request_timeout)
        while True:
            attempt = min(SCHEDULER_ATTEMPT, max(0.1, deadline - loop.time()))
            try:
                reply = await self._link.call(Message(op, meta=meta), timeout=attempt)
                self._answered_at = loop.time()
                return reply.meta
            except NotLeaderError as e:
                if loop.time() >= deadline:
                    raise
                self._scheduler_failed(e)
                await asyncio.sleep(min(0.1, self.config.heartbeat_interval))
            except PsdTimeoutError as e:
                self._scheduler_failed(e)
                if loop.time() >= deadline:
                    raise PsdTimeoutError(f"the scheduler at {self.scheduler} did not answer {op} within "
                                          f"{timeout or self.config.request_timeout} s") from None
                log.info("%s: no answer to %s yet; asking the scheduler again", self.node_id, op)

    # -- requests ------------------------------------------------------------------
    def traffic(self) -> dict:
        """Bytes this worker sent to and received from servers after each stage (raw,
        after key caching, after zstd, on the wire: psd.codec.traffic), its key-caching
        counts (``key_cache``) and its filters' bytes (``filters``: per table, and
        ``held_back``, so ``sent.raw + held_back`` is what the pushes meant)."""
        out = traffic_total(rpc.traffic.snapshot() for rpc in self._servers.values())
        out["key_cache"] = dict(self.core.kc_counters)
        # filters run before the rest (``sent.raw`` is what they left): per table, the bytes
        # given to them and after each; ``held_back``: what pushes meant less what they sent
        per_table = {name: chain.stats() for name, chain in self.filters.items()}
        out["filters"] = {"tables": per_table, "held_back": sum(c["raw"] - c["out"] for c in per_table.values())}
        out["pull_filters"] = dict(self.core.pull_copies.counters)
        return out

    def server_socket(self, node: str) -> RpcSocket | None:
        """The connection to server ``node``, if the ring has given us its address."""
        return self._servers.get(node)

    def issue(self, op: str, spec: TableSpec, rows: Rows, once: list | None = None) -> tuple[int, asyncio.Future]:
        """Issue a request now: the core's timestamp for it, and its result's future."""
        fut = self._loop.create_future()
        ts, effects = self.core.issue(op, spec, rows, time.monotonic(), once)
        self._results[ts] = fut
        self._run(effects)
        return ts, fut

    def _track(self, fut: asyncio.Future, keeps_result: bool = False) -> int:
        """Name a request by timestamp. A push that succeeds is forgotten at once (waiting
        on it later returns at once), so fire-and-forget pushes do not pile up; a failed
        push, and a pull's values, stay until ``wait(ts)`` collects them."""
        ts = next(self._ts)
        self._inflight[ts] = fut
        if not keeps_result:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() or self._inflight.pop(ts, None))
        return ts

    def _request(self, op: str, spec: TableSpec, rows: Rows, after=None, once=None) -> asyncio.Future:
        """Issue one request and return a future of its result (values for a pull, None
        for a push). It is sent now, so requests leave in issue order, unless it names
        timestamps in ``after``: then it is issued once those are done."""
        deps = [self._inflight[t] for t in (after or ()) if t in self._inflight]
        if not deps:  # issued now, not in a task: a later request or clock() must not overtake it
            return self.issue(op, spec, rows, once)[1]

        async def run():
            await asyncio.gather(*deps)
            return await self.issue(op, spec, rows, once)[1]
        return self._loop.create_task(run())


def _once(once) -> list | None:
    """A push's ``once`` identity, checked: (name, step)."""
    if once is None:
        return None
    name, step = once
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise BadRequestError(f"once: the name must be 1 to 200 characters, got {name!r:.80}")
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or not 0 <= step < 2**62:
        raise BadRequestError(f"once: the step must be an integer from 0 to 2**62 - 1, got {step!r}")
    return [name, int(step)]


def _down(reply: Message) -> list[str] | None:
    """The ring's owners the scheduler says are down (None from an older scheduler)."""
    down = reply.meta.get("down")
    return [str(s) for s in down] if isinstance(down, list) else None


def _no_connection(err: Exception) -> bool:
    """A send that found no peer to queue to (the DEALER's connection not there yet)."""
    return isinstance(err, PsdError) and "send queue is full" in str(err)


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
                raise too_large(size, self.kv.limits.max_message_bytes)
        return keys, values

    @property
    def filters(self) -> FilterChain | None:
        """The filters this worker's pushes to the table go through, if any."""
        return self.kv.filters.get(self.name)

    def push(self, keys, values, after: list[int] | None = None, once: tuple[str, int] | None = None) -> int:
        """Send a push now (or once the timestamps in ``after`` are done); returns its
        timestamp (``await kv.wait(ts)``). ``once=(name, step)``: the push's identity
        whoever sends it (``JobContext.once``): a server that applied a push of that
        identity to some rows applies no other to them, so a shard run again after its
        worker died is not counted twice (docs/fault-tolerance.md, "Exactly once").
        The table's filters, if any, choose and shrink the rows that go."""
        keys, values = self._prepare(keys, values)
        chain = self.filters
        if chain is None:
            rows = Rows(keys=keys, values=values)
        else:
            keys, values, meta = chain.apply(keys, values)
            rows = Rows(keys=keys, values=values, meta=meta or None, zstd=chain.zstd)
        return self.kv._track(self.kv._request("push", self.spec, rows, after, _once(once)))

    def observe(self, keys, values):
        """A pull's answer: the filters judge later pushes by it. Returns ``values``."""
        chain = self.filters
        if chain is not None and keys is not None:
            chain.observe(keys, values)
        return values

    def push_span(self, lo: int, values, after: list[int] | None = None, once: tuple[str, int] | None = None) -> int:
        """Push rows for the dense keys lo, lo+1, ... (no keys on the wire); ``once`` as
        for ``push``."""
        values = np.asarray(values)
        count = values.shape[0] if values.ndim else 0
        check_span(lo, count)
        values = check_values(self.spec, values, count)  # a 0-d array is a ValuesError, not IndexError
        if values.nbytes > self.kv.limits.max_message_bytes:
            raise too_large(values.nbytes, self.kv.limits.max_message_bytes)
        rows = Rows(spans=[(int(lo), count)] if count else [], values=values)
        return self.kv._track(self.kv._request("push", self.spec, rows, after, _once(once)))

    def pull_async(self, keys, after: list[int] | None = None) -> int:
        """Send a pull; returns its timestamp; ``await kv.wait(ts)`` returns the values."""
        rows = self.pull_rows(keys)
        fut = self.kv._request("pull", self.spec, rows, after)
        if self.filters is not None:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() or self.observe(rows.keys, f.result()))
        return self.kv._track(fut, keeps_result=True)

    async def pull(self, keys, after: list[int] | None = None) -> np.ndarray:
        rows = self.pull_rows(keys)
        return self.observe(rows.keys, await self.kv._request("pull", self.spec, rows, after))

    async def pull_span(self, lo: int, count: int) -> np.ndarray:
        return await self.kv._request("pull", self.spec, self.span_rows(lo, count))

    async def pushpull(self, keys, values) -> np.ndarray:
        """Push, then pull the same keys after the push is applied (one round trip)."""
        return await self.kv._request("pushpull", self.spec, self.pushpull_rows(keys, values))

    # checked rows of each kind of request (shared with the blocking client)
    def pull_rows(self, keys) -> Rows:
        keys, _ = self._prepare(keys)
        pf = self.kv.pull_filters.get(self.name)
        if pf is not None and keys.size >= KC_MIN_KEYS:  # (fewer keys: the small-pull path, unfiltered)
            return Rows(keys=keys, meta={"pf": pf})
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

"""The server role: owns key ranges of every table and applies pushes to them.

Requests are handled one at a time on the event loop, so pushes that arrive on one
connection are applied in the order they were sent, and a pull sees every push
acknowledged before it was sent.
"""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import check_sorted_unique
from psd.codec import Message
from psd.config import ClusterConfig
from psd.errors import (BadRequestError, KeysError, MessageTooLargeError, NotOwnerError, ProtocolError,
                        TableMismatchError, UnknownTableError)
from psd.roles.consistency import Gate, Policy, Setting
from psd.store import Table, TableSpec
from psd.transport import RpcSocket, Route, async_context, bind_router, connect_dealer

log = logging.getLogger("psd.server")


class Server:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.node_id = "S?"
        self.tables: dict[str, Table] = {}
        self.ring = Assignment(version=0)
        self.owned: list = []
        self.counters = {"push": 0, "pull": 0, "pushpull": 0, "errors": 0,
                         "keys_pushed": 0, "keys_pulled": 0}
        self.started = time.time()
        self.gate = Gate(Setting(config.consistency, config.max_delay, config.num_workers,
                                 tuple(config.auto_delay_bounds)))
        self.handlers = {"push": self.on_push, "pull": self.on_pull, "pushpull": self.on_pushpull,
                         "clock": self.on_clock, "status": self.on_status, "ping": self.on_ping}
        self.control_handlers = {"create_table": self.on_create_table, "ring": self.on_ring,
                                 "worker_left": self.on_worker_left, "ping": self.on_ping}

    # -- lifecycle -----------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready) -> None:
        ctx = async_context()
        limits = self.config.limits
        sock, self.address = bind_router(ctx, self.config.bind, limits.max_message_bytes)
        self.data = RpcSocket(sock, self.node_id, limits=limits, compression=self.config.compression,
                              handler=self.handle, router=True)
        self.link = RpcSocket(connect_dealer(ctx, self.config.scheduler), self.node_id,
                              limits=limits, handler=self.handle_control)
        link_task = asyncio.create_task(self.link.serve())
        try:
            await self.register()
            serve = asyncio.create_task(self.data.serve())
            beat = asyncio.create_task(self.heartbeat_loop())
            ready(self.address)
            log.info("%s serving at %s, ring v%d", self.node_id, self.address, self.ring.version)
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({serve, beat, waiter}, return_when=asyncio.FIRST_COMPLETED)
            for t in (serve, beat, waiter):
                t.cancel()
            for t in done:
                if t is not waiter and not t.cancelled() and t.exception():
                    raise t.exception()
        finally:
            link_task.cancel()
            self.data.sock.close(0)
            self.link.sock.close(0)
            log.info("%s stopped", self.node_id)

    async def register(self) -> None:
        reply = await self.link.call(Message("register", meta={"role": "server", "address": self.address}),
                                     timeout=self.config.request_timeout)
        self.node_id = self.data.node_id = self.link.node_id = reply.meta["node"]
        for spec in reply.meta.get("tables", []):
            self._create(TableSpec.from_wire(spec))
        self._set_ring(Assignment.from_wire(reply.meta["ring"]))

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                await self.link.call(Message("heartbeat", meta={"stats": self.stats()}),
                                     timeout=max(1.0, 4 * self.config.heartbeat_interval))
            except Exception as e:  # the scheduler may be restarting; keep serving
                log.warning("%s: heartbeat failed: %s", self.node_id, e)

    # -- control plane (from the scheduler) ----------------------------------
    async def handle_control(self, route: Route, msg: Message) -> Message:
        handler = self.control_handlers.get(msg.op)
        if handler is None:
            raise ProtocolError(f"unknown control op {msg.op!r}")
        return handler(route, msg)

    def on_create_table(self, route: Route, msg: Message) -> Message:
        self._create(TableSpec.from_wire(msg.meta.get("spec")))
        return msg.reply()

    def on_ring(self, route: Route, msg: Message) -> Message:
        self._set_ring(Assignment.from_wire(msg.meta["ring"]))
        return msg.reply()

    def on_worker_left(self, route: Route, msg: Message) -> Message:
        """A worker died or left: it no longer holds back anyone's clock."""
        worker = msg.meta.get("worker")
        if not isinstance(worker, str):
            raise BadRequestError("worker_left: meta.worker must be a worker id")
        self.gate.leave(worker, time.monotonic())
        log.info("%s: %s left the worker group", self.node_id, worker)
        return msg.reply()

    def _create(self, spec: TableSpec) -> None:
        have = self.tables.get(spec.name)
        if have is None:
            self.tables[spec.name] = Table(spec)
        elif have.spec != spec:
            raise TableMismatchError(f"table {spec.name!r} exists as {have.spec}, not {spec}")

    def _set_ring(self, ring: Assignment) -> None:
        if ring.version < self.ring.version:
            return
        self.ring = ring
        self.owned = ring.ranges_of(self.node_id)
        for r in self.owned:
            log.info("%s owns %s at ring v%d", self.node_id, r, ring.version)

    # -- data plane ------------------------------------------------------------
    async def handle(self, route: Route, msg: Message) -> Message:
        handler = self.handlers.get(msg.op)
        if handler is None:
            self.counters["errors"] += 1
            raise ProtocolError(f"unknown op {msg.op!r}; expected one of {', '.join(sorted(self.handlers))}")
        try:
            return handler(route, msg)
        except Exception:
            self.counters["errors"] += 1
            raise

    def _table(self, msg: Message) -> Table:
        table = self.tables.get(msg.table) if msg.table is not None else None
        if table is None:
            raise UnknownTableError(f"unknown table {msg.table!r}; create it with kv.table(...) first")
        return table

    def _keys(self, msg: Message, table: Table, n_arrays: int) -> tuple[np.ndarray | None, int, int]:
        """(keys, lo, count) of a request: keys frame, or a dense span in the header."""
        span = msg.meta.get("span")
        if span is not None:
            if (not isinstance(span, list) or len(span) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in span)):
                raise ProtocolError("meta.span must be [lo, count] of non-negative integers")
            lo, count = span
            if lo + count > 1 << 64:
                raise KeysError(f"span [{lo}, {lo + count}) runs past the end of the key space")
            if count > self.config.limits.max_keys:  # a span costs no bytes to ask for, only to answer
                raise MessageTooLargeError(f"span of {count} keys, limit is {self.config.limits.max_keys}; "
                                           f"split the request")
            if len(msg.arrays) != n_arrays:
                raise ProtocolError(f"{msg.op} by span expects {n_arrays} payload frame(s), got {len(msg.arrays)}")
            self._check_owner(lo, lo + count - 1, count, msg)
            return None, lo, count
        if len(msg.arrays) != n_arrays + 1:
            raise ProtocolError(f"{msg.op} expects {n_arrays + 1} payload frame(s) (keys first), got {len(msg.arrays)}")
        keys = msg.arrays[0]
        if keys.dtype != np.uint64 or keys.ndim != 1:
            raise KeysError(f"keys frame must be 1-d uint64, got {keys.dtype.name} with shape {keys.shape}")
        check_sorted_unique(keys)
        if keys.size:
            self._check_owner(int(keys[0]), int(keys[-1]), keys.size, msg)
        return keys, 0, keys.size

    def _check_owner(self, first: int, last: int, count: int, msg: Message) -> None:
        if count == 0:
            return
        for r in self.owned:
            if first in r:
                if last in r:
                    return
                break
        raise NotOwnerError(f"{self.node_id} does not own keys [{first}, {last}] at ring v{self.ring.version}",
                            ring=self.ring.version)

    def _policy(self, table: Table) -> Policy:
        return self.gate.policy(table.spec.consistency_override)

    def _push_now_or_later(self, msg: Message, table: Table, policy: Policy
                           ) -> tuple[np.ndarray | None, int, int]:
        """Check everything first, then apply (or, under sequential, keep for the clock
        boundary): a request is applied whole or not at all."""
        keys, lo, count = self._keys(msg, table, 1)
        values = table.check_values(msg.arrays[1 if keys is not None else 0], count)

        def apply() -> None:
            if keys is None:
                table.push_span(lo, values)
            else:
                table.push(keys, values)

        policy.push(msg.sender, msg.clock, apply)
        self.counters["keys_pushed"] += count
        return keys, lo, count

    def _answer_pull(self, route: Route, msg: Message, table: Table, policy: Policy, keys, lo: int,
                     count: int) -> None:
        def run() -> None:
            self.counters["keys_pulled"] += count
            values = table.pull_span(lo, count) if keys is None else table.pull(keys)
            self.data.reply_now(route, msg.reply(arrays=[values], ring=self.ring.version))

        policy.pull((msg.sender, msg.id), msg.sender, msg.clock, run, time.monotonic())

    def on_push(self, route: Route, msg: Message) -> Message:
        table = self._table(msg)
        self._push_now_or_later(msg, table, self._policy(table))
        self.counters["push"] += 1
        return msg.reply(ring=self.ring.version)

    def on_pull(self, route: Route, msg: Message) -> None:
        table = self._table(msg)
        keys, lo, count = self._keys(msg, table, 0)
        self.counters["pull"] += 1
        self._answer_pull(route, msg, table, self._policy(table), keys, lo, count)

    def on_pushpull(self, route: Route, msg: Message) -> None:
        table = self._table(msg)
        policy = self._policy(table)
        keys, lo, count = self._push_now_or_later(msg, table, policy)
        self.counters["pushpull"] += 1
        self._answer_pull(route, msg, table, policy, keys, lo, count)

    def on_clock(self, route: Route, msg: Message) -> None:
        """A worker finished an iteration; one-way (no reply), sent after its pushes."""
        clock = msg.meta.get("clock")
        if not isinstance(clock, int) or isinstance(clock, bool) or clock < 0:
            raise ProtocolError("clock: meta.clock must be a non-negative integer")
        self.gate.clock(msg.sender, clock, time.monotonic())

    def on_ping(self, route: Route, msg: Message) -> Message:
        return msg.reply(meta={"node": self.node_id})

    def on_status(self, route: Route, msg: Message) -> Message:
        return msg.reply(meta=self.stats())

    def stats(self) -> dict:
        return {
            "tables": {name: {"keys": t.num_keys, "bytes": t.nbytes} for name, t in self.tables.items()},
            "counters": dict(self.counters),
            "bytes_in": self.data.bytes_in, "bytes_out": self.data.bytes_out,
            "messages_in": self.data.messages_in, "messages_out": self.data.messages_out,
            "ring": self.ring.version,
            "consistency": self.gate.stats(),
            "uptime": time.time() - self.started,
        }

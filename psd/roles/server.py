"""The server role: leads some key ranges and replicates others, for every table.

Requests are handled one at a time on the event loop, so pushes that arrive on one
connection are applied in the order they were sent. A push is applied on the range's
primary, forwarded as is to the range's replicas (one message per replica, in the
primary's order, so every copy applies the same updates in the same order), and
acknowledged to the worker only when every replica holds it. Requests carry
(sender, rid) ids; a resend of something already applied is acknowledged, not
applied again.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import Range, bounds, range_from_wire, range_to_wire
from psd.cluster.ring import overlay
from psd.cluster.rows import Rows
from psd.codec import Message
from psd.config import ClusterConfig
from psd.errors import (BadRequestError, LimitError, MessageTooLargeError, NotOwnerError, NotReplicatedError,
                        ProtocolError, PsdTimeoutError, TableMismatchError, UnknownTableError)
from psd.roles.consistency import Gate, Policy, Setting
from psd.roles.fast_pull import FastPull
from psd.roles.peers import Peers
from psd.roles.range_copy import copy_ids, copy_range, copy_rows, id_pieces
from psd.roles.seen import Covered, Seen
from psd.store import Table, TableSpec
from psd.store.table import Usage
from psd.store.checkpoint import read_server_file, write_server_file
from psd.transport import RpcSocket, Route, async_context, bind_router, connect_dealer
from psd.transport.heartbeat import HeartbeatThread
from psd.transport.refusals import RefusalLog
from psd.transport.security import ROLE_SERVER, Curve, forbidden
from psd.transport.metrics import Timings

log = logging.getLogger("psd.server")

#: request_timeouts after a worker left before its request ids are forgotten
FORGET_AFTER = 10
#: how often an unacknowledged forward checks whether its replica left the ring
FORWARD_TICK = 0.05
#: names of dropped tables remembered, so a range copy still on its way for one is skipped
DROPPED_KEPT = 4096
#: request ids are copied with a range as uint64 frames (Seen.to_arrays): larger or
#: negative ones would make every later copy of this server's ranges fail
MAX_RID = (1 << 64) - 1
#: data-plane ops only another server sends (a push's copy to a replica, a range copy):
#: under CurveZMQ they must come with the server key, or a client key could write any
#: range past the ownership checks. The control ops need no check: they arrive on the
#: link this server opened to the scheduler, whose server key the handshake verified.
DAEMON_OPS = {"replicate": "replicate (a primary's copy of a push to its replicas)",
              "install": "install (a range copy from another server)"}


def _request_id(value, what: str) -> int | None:
    """``meta.rid``: nil, or an integer in [0, 2**64)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_RID:
        raise ProtocolError(f"{what} must be nil or a request id, an integer in [0, 2**64); got {value!r:.60}")
    return value


class Server:
    def __init__(self, config: ClusterConfig, *, curve: Curve | None):
        """``curve``: the daemons' keys (security: curve), or None for plaintext."""
        self.config = config
        self.curve = curve
        self.node_id = "S?"
        self.tables: dict[str, Table] = {}
        self.ring = Assignment(version=0)
        self.incoming: list[Range] = []      # ranges being copied to us: forwards wait for the copy
        self.seen = Seen()
        self.covered = Covered()
        self.acks: dict[tuple[str, int], asyncio.Future] = {}  # pushes awaiting replica acks
        self.counters = {"push": 0, "pull": 0, "pushpull": 0, "errors": 0, "replicated": 0,
                         "duplicates": 0, "keys_pushed": 0, "keys_pulled": 0, "limit_refusals": 0,
                         "not_replicated": 0}
        #: bytes of table storage held here (limits.max_memory_bytes), plus those that pushes
        #: the consistency gate holds may still add; replicas that said they are full
        self.usage = Usage()
        self.reserved = 0
        self.full_replicas: dict[str, int] = {}
        self.forward_refusals = RefusalLog()  # one log line per replica and reason a minute
        self.forgetting: set[str] = set()  # departed workers whose request ids go once they are quiet
        self.dropped: OrderedDict[str, None] = OrderedDict()
        self.started = time.time()
        self.timings = Timings(("op", "outcome"))  # requests and their handling time, for /metrics
        #: when the event loop last ran on time, and when we noticed it had stalled (frozen
        #: by SIGSTOP, say) for so long that the scheduler may have declared us dead: from
        #: then on we serve no request until a heartbeat sent after it is answered "active"
        self.awake_at = time.monotonic()
        self.stalled_at: float | None = None
        self.stop_event: asyncio.Event | None = None
        self.gate = Gate(Setting(config.consistency, config.max_delay, config.num_workers,
                                 tuple(config.auto_delay_bounds)))
        self.handlers = {"push": self.on_push, "pull": self.on_pull, "pushpull": self.on_pushpull,
                         "clock": self.on_clock, "replicate": self.on_replicate, "install": self.on_install,
                         "status": self.on_status, "ping": self.on_data_ping}
        if curve is not None:  # security: none has no key roles: everything stays open
            for op in DAEMON_OPS:
                self.handlers[op] = self._daemons_only(op, self.handlers[op])
        self.control_handlers = {"create_table": self.on_create_table, "ring": self.on_ring,
                                 "transfer": self.on_transfer, "worker_left": self.on_worker_left,
                                 "shutdown": self.on_shutdown, "ping": self.on_ping,
                                 "ckpt_hold": self.on_ckpt_hold, "ckpt_cut": self.on_ckpt_cut,
                                 "ckpt_release": self.on_ckpt_release, "restore": self.on_restore,
                                 "drop_tables": self.on_drop_tables}

    # -- lifecycle -----------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready) -> None:
        self.stop_event = stop
        ctx = async_context()
        limits = self.config.limits
        sock, self.address = bind_router(ctx, self.config.bind, limits.max_message_bytes, security=self.curve)
        self.data = RpcSocket(sock, self.node_id, limits=limits, compression=self.config.compression,
                              handler=self.handle, router=True, fast=FastPull(self),
                              busy_poll=self.config.busy_poll_us * 1e-6,
                              adaptive_poll=self.config.adaptive_poll_us * 1e-6,
                              # not while a push waits for its replicas' acks (on the peers'
                              # sockets, which the loop reads only once the spin is over)
                              spin_ok=lambda: not self.acks,
                              identify=frozenset(DAEMON_OPS) if self.curve else False)
        # concurrent: a checkpoint waits on the control link for worker clocks, and the
        # news that a worker died must still get through meanwhile
        self.link = RpcSocket(connect_dealer(ctx, self.config.scheduler, security=self.curve), self.node_id,
                              limits=limits, handler=self.handle_control, concurrent=True)
        self.peers = Peers(self.node_id, limits, self.config.compression, self.curve)
        link_task = asyncio.create_task(self.link.serve())
        keepalive = None
        try:
            await self.register()
            keepalive = HeartbeatThread(self.config.scheduler, self.node_id, self.config.heartbeat_interval,
                                        lambda: 0, security=self.curve)
            keepalive.start()
            serve = asyncio.create_task(self.data.serve())
            beat = asyncio.create_task(self.heartbeat_loop())
            ready(self.address)
            log.info("%s serving at %s, ring v%d", self.node_id, self.address, self.ring.version)
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({serve, beat, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done and not self.draining and getattr(stop, "drain", True):
                await self.drain()
            for t in (serve, beat, waiter):
                t.cancel()
            for t in done:
                if t is not waiter and not t.cancelled() and t.exception():
                    raise t.exception()
        finally:
            if keepalive is not None:
                keepalive.stop()
            link_task.cancel()
            self.peers.close()
            self.data.close()
            self.link.close()
            log.info("%s stopped", self.node_id)

    draining = False
    #: where GET /metrics is served (config `metrics`), once bound; announced in stats()
    metrics_address: str | None = None

    async def drain(self) -> None:
        """SIGTERM: hand our ranges to the others before exiting (bounded by the timeout)."""
        self.draining = True
        if len(self.ring.servers) <= 1:
            return
        log.info("%s draining: handing its ranges over", self.node_id)
        try:
            await self.link.call(Message("leave"), timeout=self.config.request_timeout)
        except Exception as e:
            log.warning("%s: drain failed (%s); exiting anyway", self.node_id, e)

    async def register(self) -> None:
        reply = await self.link.call(Message("register", meta={"role": "server", "address": self.address}),
                                     timeout=self.config.request_timeout)
        self.node_id = self.data.node_id = self.link.node_id = self.peers.node_id = reply.meta["node"]
        for spec in reply.meta.get("tables", []):
            self._create(TableSpec.from_wire(spec))
        self._set_ring(Assignment.from_wire(reply.meta["ring"]))
        self.awake_at = time.monotonic()

    async def heartbeat_loop(self) -> None:
        watch = asyncio.ensure_future(self._watch_stalls())
        try:
            await self._heartbeats()
        finally:
            watch.cancel()

    def _stall_check(self) -> None:
        """Notice an event-loop stall long enough (the scheduler's dead time less one
        heartbeat interval) that we may have been declared dead meanwhile: our ranges
        may be stale. A shorter stall (a busy loop on a loaded machine) is no sign."""
        now = time.monotonic()
        silent = now - self.awake_at
        cfg = self.config
        if self.stalled_at is None and silent > (2 * cfg.heartbeat_misses - 1) * cfg.heartbeat_interval:
            self.stalled_at = now
            log.warning("%s: its event loop stalled for %.2f s (frozen?); serving nothing until the "
                        "scheduler confirms it is still a member", self.node_id, silent)

    async def _watch_stalls(self) -> None:
        while True:
            self._stall_check()
            self.awake_at = time.monotonic()
            await asyncio.sleep(self.config.heartbeat_interval / 2)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            sent = time.monotonic()
            try:
                reply = await self.link.call(Message("heartbeat", meta={"stats": self.stats()}),
                                             timeout=max(1.0, 4 * self.config.heartbeat_interval))
            except Exception as e:  # the scheduler may be restarting; keep serving
                log.warning("%s: heartbeat failed: %s", self.node_id, e)
                continue
            if (self.stalled_at is not None and sent > self.stalled_at and reply.meta.get("known")
                    and reply.meta.get("state") in ("active", "suspect")):
                log.info("%s: the scheduler still counts it as a member; serving again", self.node_id)
                self.stalled_at = None
            if reply.meta.get("state") in ("dead", "left") or reply.meta.get("known") is False:
                # we were frozen or cut off and the cluster moved on: our ranges are stale
                log.error("%s was removed from the cluster (ring v%s); stopping without serving "
                          "stale ranges", self.node_id, reply.meta.get("ring"))
                self.ring = Assignment(version=self.ring.version)
                self.draining = True
                self.stop_event.set()
                return

    # -- control plane (from the scheduler) ----------------------------------
    async def handle_control(self, route: Route, msg: Message) -> Message:
        handler = self.control_handlers.get(msg.op)
        if handler is None:
            raise ProtocolError(f"unknown control op {msg.op!r}")
        return await handler(route, msg)

    async def on_create_table(self, route: Route, msg: Message) -> Message:
        self._create(TableSpec.from_wire(msg.meta.get("spec")))
        return msg.reply()

    async def on_ring(self, route: Route, msg: Message) -> Message:
        self.incoming = [range_from_wire(w) for w in msg.meta.get("incoming", [])]
        self._set_ring(Assignment.from_wire(msg.meta["ring"]))
        self.full_replicas.clear()  # ranges move: every replica says again whether it is full
        if msg.meta.get("final"):
            self._drop_unowned()
        return msg.reply()

    async def on_drop_tables(self, route: Route, msg: Message) -> Message:
        """Forget tables (a namespace dropped, a job's tables at its end): their memory is
        freed here; a range copy of one still on its way is skipped."""
        names = msg.meta.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadRequestError("drop_tables: meta.names must be a list of table names")
        dropped, freed = [], 0
        for name in names:
            table = self.tables.pop(name, None)
            self.dropped[name] = None
            self.dropped.move_to_end(name)
            if table is not None:
                freed += table.nbytes
                table.detach()
                dropped.append(name)
        while len(self.dropped) > DROPPED_KEPT:
            self.dropped.popitem(last=False)
        self.full_replicas.clear()  # they may have freed memory too
        if dropped:
            log.info("%s dropped %d table(s) (%s), freeing %d bytes; it holds %d bytes", self.node_id,
                     len(dropped), ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""), freed,
                     self.usage.bytes)
        return msg.reply(meta={"dropped": dropped, "freed": freed})

    async def on_worker_left(self, route: Route, msg: Message) -> Message:
        """A worker died or left: it no longer holds back anyone's clock."""
        worker = msg.meta.get("worker")
        if not isinstance(worker, str):
            raise BadRequestError("worker_left: meta.worker must be a worker id")
        self.gate.leave(worker, time.monotonic())
        log.info("%s: %s left the worker group", self.node_id, worker)
        self._watch_departed(worker)
        return msg.reply()

    def _watch_departed(self, worker: str) -> None:
        if worker not in self.forgetting:  # (told twice: a death, then a leave; or by a copy)
            self.forgetting.add(worker)
            self._forget_when_quiet(worker, -1)

    def _forget_when_quiet(self, worker: str, seen_then: int) -> None:
        """Forget a departed worker's request ids (up to 65,536, kept for exactly-once)
        once nothing of it has arrived here for FORGET_AFTER request_timeouts: a worker
        resends a request only while it keeps trying (every second at most), so a quiet
        one resends nothing; one declared dead that still pushes stays remembered."""
        now = self.seen.activity(worker)
        if now == seen_then:
            self.seen.forget(worker)
            self.covered.forget(worker)
            self.forgetting.discard(worker)
            return
        asyncio.get_running_loop().call_later(FORGET_AFTER * self.config.request_timeout,
                                              self._forget_when_quiet, worker, now)

    async def on_shutdown(self, route: Route, msg: Message) -> Message:
        log.info("%s: asked to shut down", self.node_id)
        self.draining = True
        self.stop_event.set()
        return msg.reply()

    async def on_ping(self, route: Route, msg: Message) -> Message:
        return self.on_data_ping(route, msg)

    def on_data_ping(self, route: Route, msg: Message) -> Message:
        return msg.reply(meta={"node": self.node_id})

    def _create(self, spec: TableSpec) -> None:
        have = self.tables.get(spec.name)
        if have is None:
            self.tables[spec.name] = Table(spec, self.usage)
            self.dropped.pop(spec.name, None)
        elif have.spec != spec:
            raise TableMismatchError(f"table {spec.name!r} exists as {have.spec}, not {spec}")

    def _set_ring(self, ring: Assignment) -> None:
        if ring.version < self.ring.version:
            return
        self.ring = ring
        led = ring.led_by(self.node_id)
        held = ring.ranges_of(self.node_id)
        log.info("%s at ring v%d: leads %d range(s), holds %d, copying in %d", self.node_id, ring.version,
                 len(led), len(held), len(self.incoming))

    def _drop_unowned(self) -> None:
        held = self.ring.ranges_of(self.node_id)
        for name, table in self.tables.items():
            dropped = table.retain(held)
            if dropped:
                log.info("%s: dropped %d keys of %r it no longer holds (ring v%d)", self.node_id, dropped,
                         name, self.ring.version)

    # -- ownership -------------------------------------------------------------
    def _owner_groups(self, rows: Rows):
        return rows.groups(self.ring) if rows.count else []

    def awake(self) -> bool:
        """False while we serve nothing: after a stall the scheduler may have declared
        us dead (``_stall_check``), until a heartbeat is answered "active"."""
        self._stall_check()
        return self.stalled_at is None

    def _check_primary(self, rows: Rows, msg: Message) -> list[tuple[tuple[str, ...], list]]:
        if not self.awake():
            raise NotOwnerError(f"{self.node_id} was stalled and may have been removed from the ring; "
                                f"it serves again once the scheduler confirms it", ring=self.ring.version)
        groups = self._owner_groups(rows)
        for owners, _ in groups:
            if owners[0] != self.node_id:
                first, last = rows.first_last()
                raise NotOwnerError(f"{self.node_id} does not lead keys in [{first}, {last}] at ring "
                                    f"v{self.ring.version}", ring=self.ring.version)
        return groups

    # -- data plane ------------------------------------------------------------
    def handle(self, route: Route, msg: Message) -> Message | None:
        """Every data-plane handler is plain code, so the transport answers a request
        inside its read callback, without a task."""
        handler = self.handlers.get(msg.op)
        if handler is None:
            self.counters["errors"] += 1
            raise ProtocolError(f"unknown op {msg.op!r}; expected one of {', '.join(sorted(self.handlers))}")
        started = time.perf_counter()
        try:
            out = handler(route, msg)
        except Exception as e:
            self.counters["errors"] += 1
            self.timings.observe((msg.op, getattr(e, "code", "internal")), time.perf_counter() - started)
            raise
        self.timings.observe((msg.op, "ok"), time.perf_counter() - started)
        return out

    @staticmethod
    def _daemons_only(op: str, handler):
        """``handler``, refusing (ForbiddenError) a request that did not come with the
        server key. Only the ops of DAEMON_OPS are wrapped: push and pull pay nothing."""
        def guarded(route: Route, msg: Message):
            if msg.peer != ROLE_SERVER:
                raise forbidden(op, DAEMON_OPS[op], msg.peer)
            return handler(route, msg)
        return guarded

    def _table(self, msg: Message) -> Table:
        table = self.tables.get(msg.table) if msg.table is not None else None
        if table is None:
            raise UnknownTableError(f"unknown table {msg.table!r}; create it with kv.table(...) first")
        return table

    def _rows(self, msg: Message, table: Table, with_values: bool) -> Rows:
        """Parse and check everything before anything is applied."""
        rows = Rows.from_message(msg, self.config.limits, with_values)
        if with_values:
            rows.values = table.check_values(rows.values, rows.count)
        return rows

    def policy(self, table: Table) -> Policy:
        """The consistency policy that gates ``table``'s requests."""
        return self.gate.policy(table.spec.consistency_override)

    def _rid(self, msg: Message) -> tuple[str, int] | None:
        rid = _request_id(msg.meta.get("rid"), "meta.rid")
        return None if rid is None else (msg.sender, rid)

    @staticmethod
    def _cut_from(msg: Message, sender: str) -> list[tuple[str, int]]:
        """Ids of the requests this one was cut from (meta.orig): a worker that re-cuts an
        unanswered request by a newer ring gives each piece a fresh id and names the
        original, so a server that applied the original treats the piece as a resend,
        while two pieces of one request stay two requests."""
        orig = msg.meta.get("orig")
        if orig is None:
            return []
        if (not isinstance(orig, list) or len(orig) > 64
                or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= MAX_RID for o in orig)):
            raise ProtocolError("meta.orig must be a list of at most 64 request ids")
        return [(sender, o) for o in orig]

    def _seen_before(self, rid: tuple[str, int], cut_from: list[tuple[str, int]]) -> bool:
        """Whether this request (or the one it was cut from) was applied here; a resend
        keeps its id among the sender's newest, however long it is resent for."""
        for key in (rid, *cut_from):
            if key in self.seen:
                self.seen.touch(*key)
                return True
        return False

    def _apply_push(self, msg: Message, table: Table, rows: Rows, origin: str, reserve: int = 0) -> None:
        """Apply now, or (sequential) at the clock boundary, or after a checkpoint cut.
        ``reserve``: bytes the push may add, counted against the memory limit until it
        is applied."""
        self.gate.note_push(msg.clock)
        if reserve:
            self.reserved += reserve

            def apply() -> None:
                self.reserved -= reserve
                rows.push_into(table)
        else:
            def apply() -> None:
                rows.push_into(table)
        self.policy(table).push(origin, msg.clock, apply)
        self.counters["keys_pushed"] += rows.count

    # -- the memory limit ------------------------------------------------------------
    @staticmethod
    def _count_new(table: Table, rows: Rows) -> int:
        """Rows whose keys ``table`` does not hold yet (a push would insert them)."""
        if rows.keys is not None:
            present = table.count_present(rows.keys)
        else:
            present = sum(table.count_present_span(lo, n) for lo, n in rows.spans)
        return rows.count - present

    def _check_memory(self, table: Table, todo: Rows, rows: Rows, groups) -> int:
        """Refuse, before anything is applied or forwarded, a push that would add keys
        beyond limits.max_memory_bytes here, or to ranges whose replica said it is full.
        Returns the bytes to reserve for it. O(1) unless the server is near its limit
        (then one lookup of the pushed keys); pushes to stored keys always pass."""
        limit = self.config.limits.max_memory_bytes
        if limit is None and not self.full_replicas:
            return 0
        most = todo.count * table.row_bytes
        if not self.full_replicas and self.usage.bytes + self.reserved + most <= limit:
            return most
        new = self._count_new(table, todo) * table.row_bytes
        if new and limit is not None and self.usage.bytes + self.reserved + new > limit:
            self.counters["limit_refusals"] += 1
            raise LimitError(
                f"push to table {table.spec.name!r} refused: its {new // table.row_bytes} new "
                f"key(s) would add {new} bytes to the {self.usage.bytes + self.reserved} it holds, over its "
                f"limits.max_memory_bytes {limit}; nothing was applied on {self.node_id} (parts of the "
                f"same push led by other servers may have been). Push to keys that exist, drop tables "
                f"(psd drop), add servers, or raise limits.max_memory_bytes on the servers",
                limit="max_memory_bytes", max=limit, used=self.usage.bytes + self.reserved, requested=new)
        for owners, slices in groups if new and self.full_replicas else ():
            full = [n for n in owners[1:] if n in self.full_replicas]
            if full and self._count_new(table, rows.take(slices)):
                self.counters["limit_refusals"] += 1
                raise LimitError(
                    f"push to table {table.spec.name!r} refused: it adds keys to ranges "
                    f"replicated on {', '.join(full)}, which reached its limits.max_memory_bytes "
                    f"({self.full_replicas[full[0]]} bytes held); nothing was applied on {self.node_id} "
                    f"(parts led by other servers may have been). Drop tables (psd drop), "
                    f"add servers, or raise limits.max_memory_bytes on the servers",
                    limit="max_memory_bytes", replica=full[0], used=self.full_replicas[full[0]])
        return new

    def _replica_full(self) -> dict:
        """What a replica tells the primary in its answer to a forward: whether it can
        take no new key (the primary then refuses pushes that add keys to its ranges)."""
        limit = self.config.limits.max_memory_bytes
        if limit is None or self.usage.bytes < limit:
            return {}
        return {"full": True, "bytes": self.usage.bytes}

    def _push(self, msg: Message, table: Table, rows: Rows) -> asyncio.Future | None:
        """The primary's half of a push: apply, forward to replicas. Returns None when it
        may be acknowledged now, else a future done when every replica holds it."""
        groups = self._check_primary(rows, msg)
        rid = self._rid(msg)
        cut_from = self._cut_from(msg, msg.sender)
        if rid is not None and self._seen_before(rid, cut_from):
            self.counters["duplicates"] += 1
            pending = next((self.acks[r] for r in (rid, *cut_from) if r in self.acks), None)
            if pending is not None:
                return pending  # a resend: answer when the original is answered
            # applied here before, perhaps as a replica of a primary that died before
            # forwarding to every replica, or refused by one: forward it again (replicas
            # apply it once)
            forwards = self._forward(msg, table, rows, groups, rid)
            return self._track_acks(rid, forwards) if forwards else None
        todo = self.covered.not_applied(rows, [rid, *cut_from]) if rid is not None else rows
        if todo is not None:
            reserve = self._check_memory(table, todo, rows, groups)
            self._apply_push(msg, table, todo, msg.sender, reserve)
        if rid is not None:
            self.seen.add(*rid)
            self.covered.note_piece(rows, cut_from)
        forwards = self._forward(msg, table, rows, groups, rid)
        if not forwards:
            return None
        return self._track_acks(rid, forwards)

    def _track_acks(self, rid: tuple[str, int] | None, forwards: list) -> asyncio.Future:
        """A future done when every replica holds the push: listed in ``acks`` meanwhile
        (a resend waits for it; the reader does not spin while any waits)."""
        done = asyncio.ensure_future(self._await_replicas(forwards))
        # read here, so that a refusal nobody awaits (a held pull's push, at shutdown) is
        # not reported as never retrieved
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        if rid is not None:
            self.acks[rid] = done
            done.add_done_callback(lambda _: self.acks.pop(rid, None))
        return done

    def _forward(self, msg: Message, table: Table, rows: Rows, groups, rid) -> list:
        """Send the push to every replica of its rows; one message per replica server."""
        by_replica: dict[str, list] = {}
        for owners, slices in groups:
            for node in owners[1:]:
                by_replica.setdefault(node, []).extend(slices)
        out = []
        for node, slices in by_replica.items():
            sub = rows if len(by_replica) == 1 and len(groups) == 1 else rows.take(sorted(slices))
            meta = {"origin": msg.sender, "rid": rid[1] if rid else None}
            if msg.meta.get("orig"):
                meta["orig"] = msg.meta["orig"]
            fwd = sub.to_message("replicate", table=table.spec.name, ring=self.ring.version, clock=msg.clock,
                                 meta=meta)
            address = self.ring.addresses.get(node)
            if address is None:
                continue
            peer = self.peers.get(node, address)
            out.append((node, peer.request(fwd), lambda peer=peer, i=fwd.id: peer.forget(i)))
            self.counters["replicated"] += 1
        return out

    async def _await_replicas(self, forwards) -> None:
        """Until every replica answered, or left the ring (its successor copies from us).
        Raises NotReplicatedError when one refused: the push must not be acknowledged
        (this primary's death would lose it); the client resends it, and a resend forwards
        it again (replicas apply it once)."""
        refused = None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.request_timeout
        for node, fut, forget in forwards:
            while True:
                try:
                    reply = await asyncio.wait_for(asyncio.shield(fut), FORWARD_TICK)
                    if reply.op == "error":
                        refused = refused or (node, reply.meta.get("code"), reply.meta.get("message"))
                        repeats = self.forward_refusals.note(f"{node}/{reply.meta.get('code')}", time.monotonic())
                        if repeats is not None:
                            log.warning("%s: replica %s refused a forward: %s%s", self.node_id, node,
                                        reply.meta.get("message"),
                                        f" ({repeats} more like it not logged)" if repeats else "")
                    elif reply.meta.get("full"):
                        if node not in self.full_replicas:
                            log.warning("%s: replica %s reached its memory limit (%s bytes): pushes that add "
                                        "keys to its ranges are refused", self.node_id, node,
                                        reply.meta.get("bytes"))
                        self.full_replicas[node] = int(reply.meta.get("bytes") or 0)
                    else:
                        self.full_replicas.pop(node, None)
                    break
                except asyncio.TimeoutError:
                    if node not in self.ring.servers:
                        fut.cancel()
                        forget()
                        break
                    if loop.time() > give_up:  # (e.g. it dropped a message over its own limits)
                        fut.cancel()
                        forget()
                        refused = refused or (node, "timeout", f"no answer within {self.config.request_timeout} s")
                        break
                except Exception as e:
                    log.warning("%s: forward to %s failed: %s", self.node_id, node, e)
                    if node in self.ring.servers:  # (one that left is copied to by its successor)
                        refused = refused or (node, "failed", str(e))
                    break
        if refused is not None:
            node, code, message = refused
            self.counters["not_replicated"] += 1
            raise NotReplicatedError(
                f"the push was applied on {self.node_id}, but its replica {node} refused it ({code}: "
                f"{message}), so it is not durable: it would be lost with {self.node_id}. The client "
                f"resends it (each server applies it once) until request_timeout; fix what {node} "
                f"names (a limits setting that differs between servers?)", replica=node, reason=str(code))

    def _when_replicated(self, route: Route, msg: Message, replicated: asyncio.Future, reply: Message) -> None:
        """Send ``reply`` once every replica holds the push, or the refusal if one did not."""
        def send(fut: asyncio.Future) -> None:
            err = None if fut.cancelled() else fut.exception()
            if err is None:
                self.data.reply_now(route, reply)
            else:
                self.data.answer_error(route, msg, err)
        if replicated.done():
            send(replicated)
        else:
            replicated.add_done_callback(send)

    def on_push(self, route: Route, msg: Message) -> Message | None:
        table = self._table(msg)
        rows = self._rows(msg, table, with_values=True)
        self.counters["push"] += 1
        reply = msg.reply(ring=self.ring.version)
        replicated = self._push(msg, table, rows)
        if replicated is None:
            return reply
        self._when_replicated(route, msg, replicated, reply)
        return None

    def _check_reply_size(self, table: Table, rows: Rows) -> None:
        size = rows.count * table.width * table.dtype.itemsize
        if size > self.config.limits.max_message_bytes:  # the client could not take the answer
            raise MessageTooLargeError(f"the reply would be {size} bytes, over max_message_bytes "
                                       f"{self.config.limits.max_message_bytes}; pull fewer keys at a time")

    def _answer_pull(self, route: Route, msg: Message, table: Table, rows: Rows, after=None) -> None:
        def run() -> None:
            self.counters["keys_pulled"] += rows.count
            values = rows.pull_from(table) if rows.count else np.empty((0, table.width), table.dtype)
            if after is None or (after.done() and not after.cancelled() and after.exception() is None):
                self.data.reply_now(route, msg.reply(arrays=[values], ring=self.ring.version))
            else:  # pushpull: the pushed values must be on the replicas before we answer;
                # a copy, so that no lent view of the table waits that long (copy on write)
                reply = msg.reply(arrays=[np.array(values)], ring=self.ring.version)
                self._when_replicated(route, msg, after, reply)

        self.policy(table).pull((msg.sender, msg.id), msg.sender, msg.clock, run, time.monotonic())

    def on_pull(self, route: Route, msg: Message) -> None:
        table = self._table(msg)
        rows = self._rows(msg, table, with_values=False)
        self._check_reply_size(table, rows)
        self._check_primary(rows, msg)
        self.counters["pull"] += 1
        self._answer_pull(route, msg, table, rows)

    def on_pushpull(self, route: Route, msg: Message) -> None:
        table = self._table(msg)
        rows = self._rows(msg, table, with_values=True)
        self.counters["pushpull"] += 1
        self._answer_pull(route, msg, table, rows, after=self._push(msg, table, rows))

    def on_clock(self, route: Route, msg: Message) -> None:
        """A worker finished an iteration; one-way (no reply), sent after its pushes."""
        clock = msg.meta.get("clock")
        if not isinstance(clock, int) or isinstance(clock, bool) or clock < 0:
            raise ProtocolError("clock: meta.clock must be a non-negative integer")
        self.gate.clock(msg.sender, clock, time.monotonic())

    # -- replication -------------------------------------------------------------
    def on_replicate(self, route: Route, msg: Message) -> Message:
        """A primary forwards a push it applied; apply it the same way, once."""
        table = self._table(msg)
        rows = self._rows(msg, table, with_values=True)
        origin, rid = msg.meta.get("origin"), _request_id(msg.meta.get("rid"), "replicate: meta.rid")
        if not isinstance(origin, str):
            raise ProtocolError("replicate: meta.origin must name the worker that pushed")
        mine = self._replica_rows(rows, msg)
        if rid is not None:
            cut_from = self._cut_from(msg, origin)
            if self._seen_before((origin, rid), cut_from):
                return msg.reply(meta=self._replica_full())
            self.seen.add(origin, rid)
            if mine is not None:
                mine = self.covered.not_applied(mine, [(origin, rid), *cut_from])
            self.covered.note_piece(rows, cut_from)
        if mine is not None:
            # a replica never refuses a forward (copies would differ); near its limit it says
            # so, and its primaries refuse pushes that add keys to its ranges from then on
            limit = self.config.limits.max_memory_bytes
            self._apply_push(msg, table, mine, origin, 0 if limit is None else mine.count * table.row_bytes)
        return msg.reply(meta=self._replica_full())

    def _replica_rows(self, rows: Rows, msg: Message) -> Rows | None:
        """The rows of a forward this replica applies, judged row by row (one forward can
        span ranges we hold and ranges being copied in): rows of ranges we hold at our
        ring, minus those of ranges being copied in (the copy, which follows on this
        connection, already includes them). Rows of ranges we do not hold are skipped:
        either the primary knows a newer ring that gives them to us (their copy follows)
        or the ring moved them away from us."""
        if not rows.count:
            return None
        if not self.incoming and msg.ring <= self.ring.version:
            if all(self.node_id in owners for owners, _ in self._owner_groups(rows)):
                return rows  # the common case: we hold every row
        incoming = sorted(self.incoming)
        copying = Assignment(version=0, ranges=tuple(incoming), owners=tuple(("in",) for _ in incoming))
        ranges: list[Range] = []
        labels: list[tuple[str]] = []
        for piece, held, copied in overlay(self.ring, copying):
            label = ("apply",) if self.node_id in held and not copied else ("skip",)
            if labels and labels[-1] == label:
                ranges[-1] = Range(ranges[-1].begin, piece.end)
            else:
                ranges.append(piece)
                labels.append(label)
        view = Assignment(version=0, ranges=tuple(ranges), owners=tuple(labels))
        slices = sorted(s for label, group in rows.groups(view) if label == ("apply",) for s in group)
        return rows.take(slices) if slices else None

    # -- moving ranges -------------------------------------------------------------
    async def on_transfer(self, route: Route, msg: Message) -> Message:
        """Copy a range to another server. The copy is taken and queued in one step, on
        the connection our forwards to that server use, so the receiver can tell which
        forwards the copy already contains."""
        r = range_from_wire(msg.meta["range"])
        dst, address = msg.meta["dst"], msg.meta["address"]
        peer = self.peers.get(dst, address)
        # every message of the copy is at most half of max_message_bytes of frames (and
        # holds at least one row), so a range of any size can move; all are taken and
        # queued in this one step, in order, on the connection our forwards use
        budget = max(1, self.config.limits.max_message_bytes // 2)
        sends = []
        for name, table in self.tables.items():
            keys, vals, state = table.snapshot(r.begin, r.end)
            meta = {"range": range_to_wire(r), "state_fields": list(state)}
            row_bytes = keys.itemsize + vals.itemsize * table.width * (1 + len(state))
            step = max(1, min(budget // row_bytes, self.config.limits.max_keys))  # frames: <= max_keys rows
            for i in range(0, max(keys.size, 1), step):  # an empty range still sends one
                sends.append(peer.request(Message(
                    "install", table=name, ring=self.ring.version, meta=meta,
                    arrays=[keys[i:i + step], vals[i:i + step], *(a[i:i + step] for a in state.values())])))
        # last: the ids the copy carries, the last message marks the range complete
        pieces = id_pieces(*self._seen_for_copy(r), budget, self.config.limits.max_keys)
        for j, (senders, counts, rids) in enumerate(pieces):
            meta = {"range": range_to_wire(r), "senders": senders}
            departed = [s for s in senders if s in self.forgetting]
            if departed:  # the receiver was never told they left: it forgets them once quiet too
                meta["departed"] = departed
            if j == len(pieces) - 1:
                meta["final"] = True
            sends.append(peer.request(Message("install", ring=self.ring.version, arrays=[counts, rids], meta=meta)))
        # answers come in order: a copy may take as long as it needs while it progresses,
        # but each message must be answered within request_timeout of the one before
        for send in sends:
            reply = await asyncio.wait_for(send, self.config.request_timeout)
            if reply.op == "error":
                raise BadRequestError(f"{dst} refused the copy of {r}: {reply.meta.get('message')}")
        log.info("%s copied %s to %s (%d table(s), %d message(s))", self.node_id, r, dst, len(self.tables),
                 len(sends))
        return msg.reply()

    def _seen_for_copy(self, r: Range) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The ids a copy of ``r`` carries: every id applied here, and those copied in
        with rows in ``r``."""
        extra = self.covered.copied_into(r)
        if not extra:
            return self.seen.to_arrays()
        both = Seen(window=1 << 62)
        both.merge_arrays(*self.seen.to_arrays())
        for sender, rid in extra:
            both.add(sender, rid)
        return both.to_arrays()

    def on_install(self, route: Route, msg: Message) -> Message:
        r = copy_range(msg.meta.get("range"))
        if msg.table is not None:
            if msg.table in self.tables or msg.table not in self.dropped:
                # never refused for memory: the ring moves this range here whatever we answer,
                # so a refusal would lose it; over the limit, new keys are refused instead.
                # A chunk of the copy: rows are upserted, so chunks add up to the whole range
                table = self._table(msg)
                table.install(*copy_rows(msg, table, r))  # checked whole before anything changes
            return msg.reply()
        if "senders" not in msg.meta and not msg.meta.get("final"):
            return msg.reply()  # neither rows nor ids: nothing to do
        # the ids the copy carries (in one or more messages, the last one final); they count
        # only for rows in ``r``, which we neither lead nor apply forwards for until the final one
        senders, counts, rids = copy_ids(msg)
        departed = msg.meta.get("departed", [])
        if not isinstance(departed, list) or not all(isinstance(d, str) for d in departed):
            raise ProtocolError("install: meta.departed must list senders of this message")
        self.covered.note_copy(r, senders, counts, rids)
        for sender in senders:  # (ids arriving count as the sender's activity here)
            self.seen.stir(sender)
        for worker in set(departed) & set(senders):
            self._watch_departed(worker)
        if msg.meta.get("final"):
            self.incoming = [x for x in self.incoming if x != r]
            log.info("%s now holds %s (copied in, ring v%d)", self.node_id, r, self.ring.version)
            self._warn_over_limit(f"taking {r}")
        return msg.reply()

    # -- checkpoints -------------------------------------------------------------------
    async def on_ckpt_hold(self, route: Route, msg: Message) -> Message:
        """Phase 1: from now on apply nothing new; say the highest clock pushed so far."""
        highest = self.gate.hold_all()
        log.info("%s holds new pushes for a checkpoint (highest push clock so far: %d)", self.node_id, highest)
        return msg.reply(meta={"max_push_clock": highest})

    async def on_ckpt_cut(self, route: Route, msg: Message) -> Message:
        """Phase 2: write the ranges we lead as of the cut, once every worker's pushes of
        earlier clocks have arrived. Pushes at later clocks wait until the file is written."""
        m = msg.meta
        written = asyncio.get_running_loop().create_future()

        def snapshot() -> None:
            try:
                written.set_result(self._write_checkpoint(Path(m["folder"]), m["cut"]))
            except Exception as e:  # reported to the scheduler, which fails the checkpoint
                written.set_exception(e)

        self.gate.cut(int(m["cut"]), set(m.get("workers", [])), snapshot)
        try:
            info = await asyncio.wait_for(written, float(m.get("timeout", 60)))
        except asyncio.TimeoutError:
            self.gate.release_cut()
            clocks = self.gate.policies[self.gate.default].clocks.clocks()
            lagging = [w for w in m.get("workers", []) if w not in self.gate.left and clocks.get(w, 0) < m["cut"]]
            raise PsdTimeoutError(f"{self.node_id}: worker(s) {', '.join(lagging)} did not reach clock {m['cut']} "
                                  f"in time; a checkpoint cuts at a clock boundary, so every worker must "
                                  f"call kv.clock() after its pushes") from None
        return msg.reply(meta=info)

    async def on_ckpt_release(self, route: Route, msg: Message) -> Message:
        self.gate.release_cut()
        return msg.reply()

    def _write_checkpoint(self, folder: Path, cut: int) -> dict:
        led = self.ring.led_by(self.node_id)
        tables, keys_total = {}, 0
        for name, table in self.tables.items():
            pieces = [table.snapshot(r.begin, r.end) for r in led]
            keys = np.concatenate([p[0] for p in pieces]) if pieces else np.empty(0, np.uint64)
            vals = (np.concatenate([p[1] for p in pieces]) if pieces
                    else np.empty((0, table.width), table.dtype))
            state = {f: np.concatenate([p[2][f] for p in pieces]) if pieces
                     else np.empty((0, table.width), table.dtype) for f in table.state}
            tables[name] = (table.spec.to_wire(), keys, vals, state)
            keys_total += int(keys.size)
        path = folder / f"{self.node_id}.psd"
        size = write_server_file(path, self.node_id, self.ring.version, cut, tables)
        log.info("%s wrote checkpoint %s: %d keys, %d bytes (cut at clock %d)", self.node_id, path,
                 keys_total, size, cut)
        return {"file": path.name, "bytes": size, "keys": keys_total}

    async def on_restore(self, route: Route, msg: Message) -> Message:
        """Load the keys we hold (lead or replicate) from every file of a checkpoint."""
        folder = Path(msg.meta["folder"])
        held = self.ring.ranges_of(self.node_id)
        restored = 0
        for name in msg.meta["files"]:
            for tname, (spec, keys, vals, state) in read_server_file(folder / name).items():
                self._create(TableSpec.from_wire(spec))
                table = self.tables[tname]
                for r in held:
                    i0, i1 = bounds(keys, r.begin, r.end)
                    table.install(keys[i0:i1], vals[i0:i1], {f: a[i0:i1] for f, a in state.items()})
                    restored += int(i1 - i0)
        log.info("%s restored %d keys from %s", self.node_id, restored, folder)
        self._warn_over_limit(f"restoring {folder}")
        return msg.reply(meta={"keys": restored})

    # -- introspection -------------------------------------------------------------
    def on_status(self, route: Route, msg: Message) -> Message:
        return msg.reply(meta=self.stats())

    def _warn_over_limit(self, why: str) -> None:
        limit = self.config.limits.max_memory_bytes
        if limit is not None and self.usage.bytes > limit:
            log.warning("%s holds %d bytes after %s, over its limits.max_memory_bytes %d: pushes that add "
                        "keys are refused until tables are dropped or servers added", self.node_id,
                        self.usage.bytes, why, limit)

    def stats(self) -> dict:
        return {
            "tables": {name: {"keys": t.num_keys, "bytes": t.nbytes} for name, t in self.tables.items()},
            "counters": dict(self.counters),
            "bytes_in": self.data.bytes_in, "bytes_out": self.data.bytes_out,
            "messages_in": self.data.messages_in, "messages_out": self.data.messages_out,
            "ring": self.ring.version,
            "leads": len(self.ring.led_by(self.node_id)), "holds": len(self.ring.ranges_of(self.node_id)),
            "pending_acks": len(self.acks), "copying_in": len(self.incoming),
            "seen_senders": len(self.seen.senders() | self.covered.senders()),
            "memory": {"bytes": self.usage.bytes, "limit": self.config.limits.max_memory_bytes,
                       "reserved": self.reserved, "full_replicas": sorted(self.full_replicas)},
            "consistency": self.gate.stats(),
            "uptime": time.time() - self.started,
            "metrics": self.metrics_address,
        }

    def log_clock(self) -> int | None:
        """For log records: the slowest worker clock the consistency gate knows."""
        return self.gate.policies[self.gate.default].clocks.min_clock()

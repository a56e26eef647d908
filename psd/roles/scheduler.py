"""The scheduler role: membership, heartbeats, the range assignment, tables, jobs, status.

It holds no parameters. Servers and workers register on one ROUTER socket; the same
connection carries the scheduler's own requests down to them (ring changes, new tables).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path

import msgpack

from psd.cluster.assignment import Assignment
from psd.cluster.clocks import stragglers
from psd.cluster.health import assess
from psd.cluster.jobs import JobBook, check_report
from psd.cluster.liveness import Liveness, State
from psd.cluster.stats import MAX_ADDRESS, check_stats
from psd.codec import Message
from psd.config import ClusterConfig
from psd.errors import (BadRequestError, LimitError, ProtocolError, PsdError, TableMismatchError,
                        UnknownTableError, describe)
from psd.jobs.spec import check_submitted
from psd.roles import scheduler_state
from psd.roles.checkpoints import Checkpoints
from psd.roles.ring_changes import RingChanges
from psd.schema import TableSpec
from psd.schema import check_namespace, namespace_of
from psd.transport import RpcSocket, Route, async_context, bind_router
from psd.transport.security import OPERATOR, ROLE_SERVER, ROLE_WORKER, Curve, forbidden
from psd.transport.metrics import Timings

log = logging.getLogger("psd.scheduler")

#: the longest ``checkpoint`` wait (``meta.wait``, seconds) accepted (or request_timeout, if longer)
MAX_CHECKPOINT_WAIT = 24 * 3600.0
#: the largest job map ``submit`` keeps (msgpack bytes): every ``job_poll`` answer to a
#: worker carries it, and an answer must fit the 64 KiB header limit (codec ``Limits``)
MAX_JOB_BYTES = 32 * 1024
#: worker clocks (a heartbeat's ``clk``) are iteration counts: 0 to 2**63 - 1
MAX_CLOCK = 2**63 - 1
#: what a worker key (authorized/workers/) may not do: an operator's ops
OPERATOR_OPS = {"drain": "drain (moving a server's ranges away and stopping it)",
                "drop_tables": "drop_tables (dropping tables)",
                "checkpoint": "checkpoint (writing every table to disk)",
                "submit": "submit (starting a job)"}
#: worker numbers reserved with each save of the state: one save per this many joins
ID_BLOCK = 64
#: ended jobs still listed (status, job_status, saved state); older ones are forgotten
KEEP_ENDED_JOBS = 64
#: dead or departed workers still listed (status, saved state); older ones are forgotten
KEEP_GONE_WORKERS = 256


def _operators_only(op: str, what: str, handler):
    """``handler``, refusing (ForbiddenError) a request that came with a worker key."""
    async def guarded(route: Route, msg: Message):
        if msg.peer is not None and msg.peer.startswith(ROLE_WORKER):
            raise forbidden(op, what, msg.peer, needs=OPERATOR)
        return await handler(route, msg)
    return guarded


class Scheduler:
    #: where GET /metrics is served (config `metrics`), once bound
    metrics_address: str | None = None

    def __init__(self, config: ClusterConfig, bind: str | None = None, *, curve: Curve | None):
        """``curve``: the daemons' keys (security: curve), or None for plaintext."""
        self.config = config
        self.curve = curve
        self.bind = bind or config.scheduler
        self.node_id = "H"
        self.liveness = Liveness(config.heartbeat_interval, config.heartbeat_misses, config.worker_timeout)
        self.routes: dict[str, Route] = {}
        #: node -> the role of the key that registered it (``Message.peer``; None under
        #: security: none): requests in a node's name must come with that key
        self.registered_by: dict[str, str | None] = {}
        self.addresses: dict[str, str] = {}
        self.stats: dict[str, dict] = {}
        self.counts = {"server": 0, "worker": 0}
        #: node numbers saved as handed out already (blocks of ID_BLOCK): a restart after
        #: a crash resumes above them, so a name is never handed out twice
        self.ids_saved = {"server": 0, "worker": 0}
        self.ring = Assignment(version=0)
        self.tables: dict[str, TableSpec] = {}
        self._creating: dict[str, asyncio.Future] = {}  # tables the servers are being told about
        self._tidying: set[str] = set()  # servers being told to drop tables they should not hold
        self.jobs = JobBook()
        self.worker_clocks: dict[str, int] = {}
        self.ring_changes = RingChanges(self)
        self.checkpoints = Checkpoints(self)
        self.state_dir = Path(config.state_dir) if config.state_dir else None
        self.resumed = bool(self.state_dir and scheduler_state.load(self, self.state_dir, time.monotonic()))
        if self.resumed:
            self.checkpoints.pending_restore = None  # the servers still hold the data
            log.info("resumed from %s: ring v%d, %d table(s), %d job(s)", self.state_dir, self.ring.version,
                     len(self.tables), len(self.jobs.jobs))
        else:
            for spec in self.checkpoints.tables_to_restore():
                self.tables[spec["name"]] = TableSpec.from_wire(spec)
        self._dirty = False
        self.flagged: set[str] = set()  # workers currently flagged as stragglers
        self.started = time.time()
        self.timings = Timings(("op", "outcome"))  # requests and their latency, for /metrics
        self.metrics_at: dict[str, str] = {}  # metrics endpoints workers announced (meta.metrics)
        #: dead servers a server registered since has made up for (health: not DEGRADED for them)
        self.replaced: set[str] = set()
        self.handlers = {
            "register": self.on_register, "heartbeat": self.on_heartbeat, "leave": self.on_leave,
            "drain": self.on_drain, "checkpoint": self.on_checkpoint,
            "get_ring": self.on_get_ring, "create_table": self.on_create_table,
            "status": self.on_status, "ping": self.on_ping,
            "drop_tables": self.on_drop_tables,
            "submit": self.on_submit, "job_poll": self.on_job_poll,
            "job_report": self.on_job_report, "job_status": self.on_job_status,
        }
        for op, what in OPERATOR_OPS.items():
            self.handlers[op] = _operators_only(op, what, self.handlers[op])

    async def run(self, stop: asyncio.Event, ready) -> None:
        sock, self.address = bind_router(async_context(), self.bind, self.config.limits.max_message_bytes,
                                         security=self.curve)
        # identify: every request's key role (msg.peer), under CurveZMQ; the scheduler is
        # not on the data path, and several of its checks depend on the request's content
        self.rpc = RpcSocket(sock, self.node_id, limits=self.config.limits, handler=self.handle,
                             router=True, concurrent=True, identify=self.curve is not None)
        serve = asyncio.create_task(self.rpc.serve())
        ticker = asyncio.create_task(self.tick_loop())
        periodic = (asyncio.create_task(self.checkpoints.periodic(self.config.checkpoint_interval))
                    if self.config.checkpoint_interval and self.config.checkpoint_dir else None)
        ready(self.address)
        log.info("scheduler at %s", self.address)
        for job in self.jobs.jobs.values():  # a job that ended while we were down
            if job.ended:
                asyncio.ensure_future(self._job_ended(job))
        try:
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({serve, ticker, waiter}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not waiter and t.exception():
                    raise t.exception()
        finally:
            self.save()  # job progress and membership are otherwise saved on the next tick
            serve.cancel()
            ticker.cancel()
            if periodic:
                periodic.cancel()
            self.rpc.close()

    def save(self) -> None:
        """Persist now (ring and table changes)."""
        if self.state_dir is not None:
            scheduler_state.save(self, self.state_dir)
            self._dirty = False

    def touch(self) -> None:
        """Persist soon (job progress, membership): the tick loop writes it."""
        self._dirty = True

    async def handle(self, route: Route, msg: Message) -> Message | None:
        handler = self.handlers.get(msg.op)
        if handler is None:
            raise ProtocolError(f"unknown op {msg.op!r}; expected one of {', '.join(sorted(self.handlers))}")
        started = time.perf_counter()
        outcome = "internal"
        try:
            out = await handler(route, msg)
            outcome = "ok"
            return out
        except PsdError as e:
            outcome = e.code
            raise
        finally:
            self.timings.observe((msg.op, outcome), time.perf_counter() - started)

    def log_clock(self) -> int | None:
        """For log records: the slowest live worker's clock."""
        live = set(self.liveness.live("worker"))
        return min((c for w, c in self.worker_clocks.items() if w in live), default=None)

    # -- who may ask --------------------------------------------------------------
    def _check_sender(self, msg: Message) -> None:
        """Under CurveZMQ, a request in a registered node's name (``src``) must come with
        the key that registered it: the server key for a server, the registering
        client's key for a worker. Another key could otherwise keep a node alive, take
        over its route, feed it stats or clocks, make it leave or take its job ranks.
        Names that are no node's are left to each handler."""
        if self.curve is None:
            return
        peer = self.liveness.peers.get(msg.sender)
        if peer is None:
            return
        need = ROLE_SERVER if peer.role == "server" else self.registered_by.get(msg.sender)
        if need is None:  # a worker resumed from a scheduler.json that did not say who registered it
            self.registered_by[msg.sender] = msg.peer
            return
        if msg.peer != need:
            raise forbidden(msg.op, f"{msg.op} in the name of {peer.role} {msg.sender}", msg.peer,
                            needs=ROLE_SERVER if need == ROLE_SERVER else f"the key that registered {msg.sender}")

    # -- membership ------------------------------------------------------------
    async def on_register(self, route: Route, msg: Message) -> Message:
        role = msg.meta.get("role")
        if role not in ("server", "worker"):
            raise BadRequestError(f"register: role must be 'server' or 'worker', got {role!r}")
        if role == "server" and self.curve is not None and msg.peer != ROLE_SERVER:
            raise forbidden("register", "register as a server", msg.peer)
        address = msg.meta.get("address")
        if role == "server" and (not isinstance(address, str) or not address.startswith("tcp://")
                                 or len(address) > MAX_ADDRESS):
            raise BadRequestError(f"register: a server must give its tcp:// address (at most {MAX_ADDRESS} "
                                  f"characters), got {describe(address)}", field="meta.address")
        prefix = "S" if role == "server" else "W"
        node = f"{prefix}{self.counts[role]}"
        self.counts[role] += 1
        self.liveness.join(node, role, time.monotonic())
        self.routes[node] = route
        self.registered_by[node] = msg.peer
        if role == "server":
            self.addresses[node] = address
            dead = [p.node for p in self.liveness.peers.values()
                    if p.role == "server" and p.state == State.DEAD and p.node not in self.replaced]
            if dead:
                self.replaced.add(dead[0])
            self.save()
            # the new server takes its ranges once it serves; joins queue behind other changes
            asyncio.ensure_future(self.ring_changes.rebalance(f"{node} joined"))
        elif self.counts[role] > self.ids_saved[role]:
            # saved before the node hears its id, a block at a time: a scheduler that
            # crashed before saving it handed the same id to the next node, whose first
            # pushes the servers then took for resends of the old node's
            before, self.ids_saved[role] = self.ids_saved[role], self.counts[role] + ID_BLOCK
            try:
                self.save()
            except Exception:
                self.ids_saved[role] = before  # (the next registration tries again)
                raise
        log.info("%s joined as %s%s, ring v%d", node, role,
                 f" at {self.addresses[node]}" if role == "server" else "", self.ring.version)
        return msg.reply(meta={"node": node, "ring": self.ring.to_wire(),
                               "tables": [t.to_wire() for t in self.tables.values()],
                               "heartbeat_interval": self.config.heartbeat_interval,
                               "limits": {"max_message_bytes": self.config.limits.max_message_bytes,
                                          "max_keys": self.config.limits.max_keys}})

    async def _to_servers(self, msg_factory, exclude: str | None = None) -> list:
        calls = []
        for node in self.liveness.live("server"):
            if node == exclude:
                continue
            msg = msg_factory if isinstance(msg_factory, Message) else msg_factory()
            calls.append(self.rpc.call(Message(msg.op, meta=msg.meta), self.routes[node],
                                       timeout=self.config.request_timeout))
        return await asyncio.gather(*calls, return_exceptions=True)

    async def on_heartbeat(self, route: Route, msg: Message) -> Message:
        stats = msg.meta.get("stats")
        if stats is not None and self.curve is not None and msg.peer != ROLE_SERVER:
            raise forbidden("heartbeat", "a heartbeat carrying server stats", msg.peer)
        self._check_sender(msg)
        # checked whole before anything is recorded (with security: none, anyone can send a
        # heartbeat in any node's name, and what is kept shows in every later status)
        if stats is not None:
            stats = check_stats(stats)
        metrics = msg.meta.get("metrics")
        if metrics is not None and (not isinstance(metrics, str) or not metrics or len(metrics) > MAX_ADDRESS):
            raise BadRequestError(f"heartbeat: meta.metrics: expected the HOST:PORT of a metrics endpoint (at most "
                                  f"{MAX_ADDRESS} characters), got {describe(metrics)}", field="meta.metrics")
        if not 0 <= msg.clock <= MAX_CLOCK:
            raise BadRequestError(f"heartbeat: clk: expected a worker clock from 0 to 2**63 - 1, got {msg.clock}",
                                  field="clk")
        state = self.liveness.seen(msg.sender, time.monotonic())
        if state is None:
            return msg.reply(meta={"known": False})
        if msg.meta.get("link", True):
            # heartbeats on a node's registration connection renew its route (after a
            # scheduler restart ZeroMQ reconnects it under a new identity); the sync
            # client's heartbeat thread has its own socket and says link=False;
            # what we asked it on the old connection is answered on the new one
            old, self.routes[msg.sender] = self.routes.get(msg.sender), route
            self.rpc.reroute(old, route)
        # only a live member's numbers are kept: a dead or departed node's stay as they were
        role = self.liveness.peers[msg.sender].role if state == State.ACTIVE else None
        if role == "worker":
            self.worker_clocks[msg.sender] = max(msg.clock, self.worker_clocks.get(msg.sender, 0))
        if role == "server" and stats is not None:
            self.stats[msg.sender] = stats
            if "peers" in stats:  # its word on the other servers: the failure detector's evidence
                self.liveness.report(msg.sender, stats["peers"], time.monotonic())
            self._tidy(msg.sender, stats.get("tables"))
        if metrics is not None:
            self.metrics_at[msg.sender] = metrics
        return msg.reply(meta={"known": True, "state": state.value, "ring": self.ring.version})

    async def on_leave(self, route: Route, msg: Message) -> Message:
        if msg.sender not in self.liveness.peers:
            return msg.reply()  # not a member (never registered, or forgotten by a restart): nothing to do
        self._check_sender(msg)
        if msg.sender.startswith("S"):
            await self.ring_changes.rebalance(f"{msg.sender} drains", exclude=msg.sender)
        self.liveness.leave(msg.sender)
        log.info("%s left", msg.sender)
        if msg.sender.startswith("W"):
            await self._worker_gone(msg.sender)
        return msg.reply()

    async def on_checkpoint(self, route: Route, msg: Message) -> Message:
        """`psd checkpoint`: a consistent cut of every table, written by the servers."""
        wait = msg.meta.get("wait", self.config.request_timeout)
        longest = max(MAX_CHECKPOINT_WAIT, self.config.request_timeout)
        if (not isinstance(wait, (int, float)) or isinstance(wait, bool) or not math.isfinite(wait)
                or not 0 < wait <= longest):
            raise BadRequestError(f"checkpoint: meta.wait: expected a number of seconds above 0 and at most "
                                  f"{longest:.0f}, got {describe(wait)}", field="meta.wait")
        return msg.reply(meta=await self.checkpoints.take(timeout=float(wait)))

    async def on_drain(self, route: Route, msg: Message) -> Message:
        """`psd drain NODE`: hand a server's ranges to the others, then stop it."""
        node = msg.meta.get("node")
        if not isinstance(node, str) or node not in self.addresses or node not in self.liveness.live("server"):
            raise BadRequestError(f"drain: {node!r} is not a live server; see `psd status`")
        await self.ring_changes.rebalance(f"{node} drains", exclude=node)
        self.liveness.leave(node)
        await self.rpc.call(Message("shutdown"), self.routes[node], timeout=self.config.request_timeout)
        return msg.reply(meta={"ring": self.ring.version})

    async def _worker_gone(self, worker: str) -> None:
        """Servers stop waiting for a worker that died or left; its shards go to others."""
        for job_id, rank in self.jobs.release(worker):
            log.warning("job %s: shard %d of %s goes back to the pool", job_id, rank, worker)
        self.touch()
        self.worker_clocks.pop(worker, None)
        self.flagged.discard(worker)
        # a long-lived cluster sees workers come and go with every job: only the newest
        # gone ones stay listed (status, saved state); the rest are forgotten everywhere
        for node in self.liveness.forget_gone("worker", KEEP_GONE_WORKERS):
            for kept in (self.routes, self.registered_by, self.stats, self.metrics_at, self.worker_clocks):
                kept.pop(node, None)
            self.flagged.discard(node)
        await self._to_servers(Message("worker_left", meta={"worker": worker}))

    async def tick_loop(self) -> None:
        step = self.config.heartbeat_interval / 2
        last = time.monotonic()
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            late, last = now - last - step, now
            if late > self.config.heartbeat_interval:
                # our own loop stalled (frozen, starved of CPU): the beats sent meanwhile
                # are still unread in the socket, so that time counts against nobody
                log.warning("the scheduler's event loop stalled for %.2f s; that time does not count as "
                            "anyone's missed heartbeats", late)
                self.liveness.excuse(late)
            for node, old, new in self.liveness.tick(now):
                log.warning("%s: %s -> %s (ring v%d)", node, old.value, new.value, self.ring.version)
                if new == State.DEAD and node.startswith("W"):
                    await self._worker_gone(node)
                if new == State.DEAD and node.startswith("S"):
                    asyncio.ensure_future(self.ring_changes.rebalance(f"{node} died"))
                self.touch()
            self._flag_stragglers()
            if self._dirty:
                self.save()

    def _flag_stragglers(self) -> None:
        live = {w: c for w, c in self.worker_clocks.items() if w in self.liveness.live("worker")}
        now = set(stragglers(live, self.config.straggler_lag))
        for worker in now - self.flagged:
            lag = sorted(live.values())[len(live) // 2] - live[worker]
            log.warning("%s is a straggler: clock %d, %d behind the median", worker, live[worker], lag)
            for job in self.jobs.jobs.values():
                ranks = [r for r, w in job.ranks.items() if w == worker]
                if job.state == "running" and ranks:
                    job.metrics.append({"event": "straggler", "worker": worker, "rank": ranks[0],
                                        "clock": live[worker], "lag": lag, "time": time.time()})
        self.flagged = now

    async def on_get_ring(self, route: Route, msg: Message) -> Message:
        return msg.reply(meta={"ring": self.ring.to_wire()})

    async def on_ping(self, route: Route, msg: Message) -> Message:
        return msg.reply(meta={"node": self.node_id, "servers": len(self.liveness.live("server"))})

    # -- tables ----------------------------------------------------------------
    def _check_new_table(self, name: str) -> None:
        """Before a table is added: limits.max_tables, and no table in the namespace of a
        job whose tables were dropped when it ended."""
        namespace = namespace_of(name) or ""
        job = self.jobs.jobs.get(namespace)
        if job is not None and job.tables_dropped:
            raise BadRequestError(f"cannot create table {name!r}: job {job.id} has ended and its tables "
                                  f"were dropped (set keep_tables: true in the job file to keep them)")
        if self.jobs.forgotten(namespace) and not any(namespace_of(n) == namespace for n in self.tables):
            raise BadRequestError(f"cannot create table {name!r}: job {namespace} ended long ago and its tables "
                                  f"are gone (set keep_tables: true in the job file to keep them)")
        limit = self.config.limits.max_tables
        if len(self.tables) >= limit:
            raise LimitError(f"cannot create table {name!r}: the cluster has {len(self.tables)} tables and "
                             f"limits.max_tables is {limit}; drop tables no longer needed (psd drop) or raise "
                             f"limits.max_tables in the scheduler's config", limit="max_tables", max=limit,
                             used=len(self.tables))

    async def on_create_table(self, route: Route, msg: Message) -> Message:
        spec = TableSpec.from_wire(msg.meta.get("spec"))
        creating = self._creating.get(spec.name)
        if creating is not None:  # another worker is creating it: answer when the servers have it
            await asyncio.shield(creating)
        have = self.tables.get(spec.name)
        if have is not None:
            if have != spec:
                raise TableMismatchError(
                    f"table {spec.name!r} already exists with width={have.width}, dtype={have.dtype}, "
                    f"updater={have.updater}, options={have.options}; open it with the same settings")
            return msg.reply(meta={"spec": have.to_wire(), "created": False})
        self._check_new_table(spec.name)
        # listed before the servers are told, so a server registering meanwhile gets it too
        self.tables[spec.name] = spec
        done = self._creating[spec.name] = asyncio.get_running_loop().create_future()
        try:
            results = await self._to_servers(Message("create_table", meta={"spec": spec.to_wire()}))
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                self.tables.pop(spec.name, None)  # (or dropped meanwhile)
                raise errors[0] if isinstance(errors[0], PsdError) else BadRequestError(str(errors[0]))
        finally:
            del self._creating[spec.name]
            done.set_result(None)
        self.save()
        log.info("table %r created: width %d, %s, updater %s", spec.name, spec.width, spec.dtype, spec.updater)
        return msg.reply(meta={"spec": spec.to_wire(), "created": True})

    async def on_drop_tables(self, route: Route, msg: Message) -> Message:
        """`psd drop`: forget the tables of a namespace, or the named ones, on every server."""
        namespace, names = msg.meta.get("namespace"), msg.meta.get("tables")
        if (namespace is None) == (names is None):
            raise BadRequestError("drop_tables: give meta.namespace or meta.tables (a list of names), not both")
        if namespace is not None:
            check_namespace(namespace)
            names = [n for n in self.tables if namespace_of(n) == namespace]
        elif not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadRequestError("drop_tables: meta.tables must be a list of table names")
        else:
            unknown = [n for n in names if n not in self.tables]
            if unknown:
                raise UnknownTableError(f"drop_tables: no table {', '.join(map(repr, unknown))}; "
                                        f"nothing was dropped")
        return msg.reply(meta={"dropped": await self._drop(names, f"asked by {msg.sender}")})

    async def _drop(self, names: list[str], why: str) -> list[str]:
        """Forget ``names`` and tell every live server to free them (a server that does not
        answer is told again after its next heartbeat lists them: ``_tidy``)."""
        for name in names:
            self.tables.pop(name, None)
        self.save()
        if names:
            log.info("dropping %d table(s) (%s): %s", len(names), why,
                     ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
            try:
                results = await self._to_servers(Message("drop_tables", meta={"names": names}))
            except Exception as e:  # no route to a server yet (just resumed): _tidy tells it later
                results = [e]
            for result in results:
                if isinstance(result, Exception):
                    log.warning("a server did not drop %d table(s) now (%s); it is told again", len(names), result)
        return names

    def _tidy(self, node: str, held) -> None:
        """A server's heartbeat lists a table the cluster does not have (dropped while the
        server did not answer, or a create that failed elsewhere): tell it to drop it."""
        if not isinstance(held, dict) or node in self._tidying:
            return
        stale = lambda: [n for n in held if n not in self.tables and n not in self._creating]  # noqa: E731
        if not stale() or node not in self.routes:
            return
        self._tidying.add(node)

        async def tell() -> None:
            try:
                extra = stale()  # again, just before sending: a create of one of them may have begun
                if not extra:
                    return
                await self.rpc.call(Message("drop_tables", meta={"names": extra}), self.routes[node],
                                    timeout=self.config.request_timeout)
                log.info("%s told to drop %d table(s) the cluster no longer has", node, len(extra))
            except Exception as e:
                log.warning("%s: could not drop stale tables: %s", node, e)
            finally:
                self._tidying.discard(node)

        asyncio.ensure_future(tell())

    async def _job_ended(self, job) -> None:
        """A job is done or failed: drop its namespace unless its file says keep_tables."""
        if not (job.keep_tables or job.tables_dropped):
            job.tables_dropped = True
            await self._drop([n for n in self.tables if namespace_of(n) == job.id], f"job {job.id} {job.state}")
        self._forget_old_jobs()

    def _forget_old_jobs(self) -> None:
        """A long-lived cluster runs job after job: the newest KEEP_ENDED_JOBS ended ones
        stay (status, job_status, saved state), older ones and their metrics go."""
        for job_id in self.jobs.prune_ended(KEEP_ENDED_JOBS):
            log.info("job %s forgotten (ended; the newest %d ended jobs are kept)", job_id, KEEP_ENDED_JOBS)
            self.touch()

    # -- jobs --------------------------------------------------------------------
    async def on_submit(self, route: Route, msg: Message) -> Message:
        spec = msg.meta.get("job")
        workers = msg.meta.get("workers")
        problems = check_submitted(spec, workers)  # the job file's top-level rules (psd/jobs/spec.py)
        if problems:
            raise BadRequestError("; ".join(problems))
        size = len(msgpack.packb(spec, use_bin_type=True))
        if size > MAX_JOB_BYTES:
            raise BadRequestError(f"submit: meta.job: expected a job map of at most {MAX_JOB_BYTES} bytes (msgpack), "
                                  f"got {size}: it travels to every worker in one header; name data files "
                                  f"with a glob rather than one by one", field="meta.job")
        job = self.jobs.submit(spec, workers)
        self.save()
        log.info("job %s submitted: app %s on %d workers", job.id, spec.get("app"), workers)
        return msg.reply(meta={"job": job.id})

    async def on_job_poll(self, route: Route, msg: Message) -> Message:
        self._check_sender(msg)
        got = self.jobs.poll(msg.sender)
        if got is None:
            return msg.reply(meta={"job": None})
        job, rank = got
        return msg.reply(meta={"job": job.id, "spec": job.spec, "rank": rank,
                               "num_workers": job.num_workers, "shards": [rank]})

    async def on_job_report(self, route: Route, msg: Message) -> Message:
        self._check_sender(msg)
        m = msg.meta
        if isinstance(m.get("job"), str) and self.jobs.forgotten(m["job"]):
            return msg.reply(meta={"ignored": f"job {m['job']} ended and was forgotten"})  # (a late resend)
        if not isinstance(m.get("job"), str) or m.get("job") not in self.jobs.jobs:  # a list is unhashable
            raise BadRequestError(f"job_report: unknown job {describe(m.get('job'))}", field="meta.job")
        report = check_report(self.jobs.jobs[m["job"]], m)
        holder = self.jobs.jobs[m["job"]].ranks.get(report["rank"])
        if holder != msg.sender:
            # only the rank's worker reports on it: a report can fail or end the job, and
            # ending it drops its tables (a worker key may not drop tables otherwise)
            raise BadRequestError(f"job_report: rank {report['rank']} of job {m['job']} is held by "
                                  f"{holder or 'no worker'}, not {msg.sender}; take a rank with job_poll first",
                                  field="meta.rank")
        self.touch()
        job = self.jobs.report(m["job"], reporter=msg.sender, **report)
        if job.ended:
            log.info("job %s %s", job.id, job.state)
            await self._job_ended(job)
        return msg.reply()

    async def on_job_status(self, route: Route, msg: Message) -> Message:
        job_id, start = msg.meta.get("job"), msg.meta.get("metrics_from", 0)
        job = self.jobs.jobs.get(job_id) if isinstance(job_id, str) else None  # a list is unhashable
        if job is None:
            raise BadRequestError(f"unknown job {job_id!r:.80}")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise BadRequestError(f"job_status: metrics_from must be an integer >= 0, got {start!r:.80}")
        return msg.reply(meta=job.to_dict(start))

    # -- status ------------------------------------------------------------------
    async def on_status(self, route: Route, msg: Message) -> Message:
        st = self.status()
        st["health"] = assess(st)
        return msg.reply(meta=st)

    def status(self) -> dict:
        now = time.monotonic()
        nodes = []
        for p in self.liveness.peers.values():
            stats = self.stats.get(p.node, {})
            nodes.append({"id": p.node, "role": p.role, "address": self.addresses.get(p.node, ""),
                          "state": p.state.value, "last_heartbeat": round(now - p.last_seen, 3),
                          "replaced": p.node in self.replaced,
                          "clock": self.worker_clocks.get(p.node) if p.role == "worker" else None,
                          "straggler": p.node in self.flagged,
                          "consistency": stats.get("consistency", {}),
                          "counters": stats.get("counters", {}), "memory": stats.get("memory", {}),
                          "bytes_in": stats.get("bytes_in", 0), "bytes_out": stats.get("bytes_out", 0),
                          "metrics": stats.get("metrics") or self.metrics_at.get(p.node)})
        tables = {}
        by_namespace: dict[str, dict] = {}
        for name, spec in self.tables.items():
            per_server = {n: s.get("tables", {}).get(name, {}) for n, s in self.stats.items()}
            tables[name] = {**spec.to_wire(), "namespace": namespace_of(name),
                            "keys": sum(v.get("keys", 0) for v in per_server.values()),
                            "bytes": sum(v.get("bytes", 0) for v in per_server.values()),
                            "per_server": per_server}
            by_namespace.setdefault(namespace_of(name) or "", {})[name] = {
                "keys": tables[name]["keys"], "bytes": tables[name]["bytes"]}
        ranges = [{"begin": r.begin, "last": r.end - 1, "owners": list(o)}
                  for r, o in zip(self.ring.ranges, self.ring.owners)]
        live = {w: c for w, c in self.worker_clocks.items() if w in self.liveness.live("worker")}
        clocks = {"workers": live, "slowest": min(live.values()) if live else None,
                  "fastest": max(live.values()) if live else None, "stragglers": sorted(self.flagged),
                  "consistency": self.config.consistency, "max_delay": self.config.max_delay}
        return {"scheduler": self.address, "uptime": round(time.time() - self.started, 1),
                "clocks": clocks, "ring_changing": self.ring_changes.busy,
                "checkpoints": self.checkpoints.status(),
                "replication": self.config.replication, "metrics": self.metrics_address,
                "ring_version": self.ring.version, "nodes": nodes, "ranges": ranges, "tables": tables,
                "jobs": [{**j.to_dict(len(j.metrics)), "tables": by_namespace.get(j.id, {})}
                         for j in self.jobs.jobs.values()]}

"""The scheduler role: membership, heartbeats, the range assignment, tables, jobs, status.

It holds no parameters. Servers and workers register on one ROUTER socket; the same
connection carries the scheduler's own requests down to them (ring changes, new tables).
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from psd.cluster.assignment import Assignment
from psd.cluster.clocks import stragglers
from psd.cluster.jobs import JobBook
from psd.cluster.liveness import Liveness, State
from psd.codec import Message
from psd.config import ClusterConfig
from psd.errors import BadRequestError, ProtocolError, PsdError, TableMismatchError
from psd.roles import scheduler_state
from psd.roles.checkpoints import Checkpoints
from psd.roles.ring_changes import RingChanges
from psd.store import TableSpec
from psd.transport import RpcSocket, Route, async_context, bind_router

log = logging.getLogger("psd.scheduler")


class Scheduler:
    def __init__(self, config: ClusterConfig, bind: str | None = None):
        self.config = config
        self.bind = bind or config.scheduler
        self.node_id = "H"
        self.liveness = Liveness(config.heartbeat_interval, config.heartbeat_misses, config.worker_timeout)
        self.routes: dict[str, Route] = {}
        self.addresses: dict[str, str] = {}
        self.stats: dict[str, dict] = {}
        self.counts = {"server": 0, "worker": 0}
        self.ring = Assignment(version=0)
        self.tables: dict[str, TableSpec] = {}
        self._creating: dict[str, asyncio.Future] = {}  # tables the servers are being told about
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
        self.handlers = {
            "register": self.on_register, "heartbeat": self.on_heartbeat, "leave": self.on_leave,
            "drain": self.on_drain, "checkpoint": self.on_checkpoint,
            "get_ring": self.on_get_ring, "create_table": self.on_create_table,
            "status": self.on_status, "ping": self.on_ping,
            "submit": self.on_submit, "job_poll": self.on_job_poll,
            "job_report": self.on_job_report, "job_status": self.on_job_status,
        }

    async def run(self, stop: asyncio.Event, ready) -> None:
        sock, self.address = bind_router(async_context(), self.bind, self.config.limits.max_message_bytes)
        self.rpc = RpcSocket(sock, self.node_id, limits=self.config.limits, handler=self.handle,
                             router=True, concurrent=True)
        serve = asyncio.create_task(self.rpc.serve())
        ticker = asyncio.create_task(self.tick_loop())
        periodic = (asyncio.create_task(self.checkpoints.periodic(self.config.checkpoint_interval))
                    if self.config.checkpoint_interval and self.config.checkpoint_dir else None)
        ready(self.address)
        log.info("scheduler at %s", self.address)
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
            sock.close(0)

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
        return await handler(route, msg)

    # -- membership ------------------------------------------------------------
    async def on_register(self, route: Route, msg: Message) -> Message:
        role = msg.meta.get("role")
        if role not in ("server", "worker"):
            raise BadRequestError(f"register: role must be 'server' or 'worker', got {role!r}")
        address = msg.meta.get("address")
        if role == "server" and (not isinstance(address, str) or not address.startswith("tcp://")):
            raise BadRequestError("register: a server must give its tcp:// address")
        prefix = "S" if role == "server" else "W"
        node = f"{prefix}{self.counts[role]}"
        self.counts[role] += 1
        self.liveness.join(node, role, time.monotonic())
        self.routes[node] = route
        if role == "server":
            self.addresses[node] = address
            self.save()
            # the new server takes its ranges once it serves; joins queue behind other changes
            asyncio.ensure_future(self.ring_changes.rebalance(f"{node} joined"))
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
        state = self.liveness.seen(msg.sender, time.monotonic())
        if state is None:
            return msg.reply(meta={"known": False})
        if msg.meta.get("link", True):
            # heartbeats on a node's registration connection renew its route (after a
            # scheduler restart ZeroMQ reconnects it under a new identity); the sync
            # client's heartbeat thread has its own socket and says link=False
            self.routes[msg.sender] = route
        if msg.sender.startswith("W"):
            self.worker_clocks[msg.sender] = max(msg.clock, self.worker_clocks.get(msg.sender, 0))
        stats = msg.meta.get("stats")
        if isinstance(stats, dict):
            self.stats[msg.sender] = stats
        return msg.reply(meta={"known": True, "state": state.value, "ring": self.ring.version})

    async def on_leave(self, route: Route, msg: Message) -> Message:
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
        if not isinstance(wait, (int, float)) or isinstance(wait, bool) or wait <= 0:
            raise BadRequestError("checkpoint: meta.wait must be a positive number of seconds")
        return msg.reply(meta=await self.checkpoints.take(timeout=float(wait)))

    async def on_drain(self, route: Route, msg: Message) -> Message:
        """`psd drain NODE`: hand a server's ranges to the others, then stop it."""
        node = msg.meta.get("node")
        if node not in self.addresses or node not in self.liveness.live("server"):
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
        await self._to_servers(Message("worker_left", meta={"worker": worker}))

    async def tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval / 2)
            for node, old, new in self.liveness.tick(time.monotonic()):
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
        # listed before the servers are told, so a server registering meanwhile gets it too
        self.tables[spec.name] = spec
        done = self._creating[spec.name] = asyncio.get_running_loop().create_future()
        try:
            results = await self._to_servers(Message("create_table", meta={"spec": spec.to_wire()}))
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                del self.tables[spec.name]
                raise errors[0] if isinstance(errors[0], PsdError) else BadRequestError(str(errors[0]))
        finally:
            del self._creating[spec.name]
            done.set_result(None)
        self.save()
        log.info("table %r created: width %d, %s, updater %s", spec.name, spec.width, spec.dtype, spec.updater)
        return msg.reply(meta={"spec": spec.to_wire(), "created": True})

    # -- jobs --------------------------------------------------------------------
    async def on_submit(self, route: Route, msg: Message) -> Message:
        spec = msg.meta.get("job")
        workers = msg.meta.get("workers")
        if not isinstance(spec, dict) or not isinstance(workers, int) or workers < 1:
            raise BadRequestError("submit: needs meta.job (a map) and meta.workers (an integer >= 1)")
        job = self.jobs.submit(spec, workers)
        self.save()
        log.info("job %s submitted: app %s on %d workers", job.id, spec.get("app"), workers)
        return msg.reply(meta={"job": job.id})

    async def on_job_poll(self, route: Route, msg: Message) -> Message:
        got = self.jobs.poll(msg.sender)
        if got is None:
            return msg.reply(meta={"job": None})
        job, rank = got
        return msg.reply(meta={"job": job.id, "spec": job.spec, "rank": rank,
                               "num_workers": job.num_workers, "shards": [rank]})

    async def on_job_report(self, route: Route, msg: Message) -> Message:
        m = msg.meta
        if m.get("job") not in self.jobs.jobs or not isinstance(m.get("rank"), int):
            raise BadRequestError(f"job_report: unknown job {m.get('job')!r} or missing rank")
        self.touch()
        job = self.jobs.report(m["job"], m["rank"], progress=m.get("progress"), metrics=m.get("metrics"),
                               done=bool(m.get("done")), error=m.get("error"), summary=m.get("summary"),
                               seq=m.get("seq") if isinstance(m.get("seq"), int) else None,
                               reporter=msg.sender)
        if job.state in ("done", "failed"):
            log.info("job %s %s", job.id, job.state)
        return msg.reply()

    async def on_job_status(self, route: Route, msg: Message) -> Message:
        job = self.jobs.jobs.get(msg.meta.get("job"))
        if job is None:
            raise BadRequestError(f"unknown job {msg.meta.get('job')!r}")
        return msg.reply(meta=job.to_dict(int(msg.meta.get("metrics_from", 0))))

    # -- status ------------------------------------------------------------------
    async def on_status(self, route: Route, msg: Message) -> Message:
        return msg.reply(meta=self.status())

    def status(self) -> dict:
        now = time.monotonic()
        nodes = []
        for p in self.liveness.peers.values():
            stats = self.stats.get(p.node, {})
            nodes.append({"id": p.node, "role": p.role, "address": self.addresses.get(p.node, ""),
                          "state": p.state.value, "last_heartbeat": round(now - p.last_seen, 3),
                          "clock": self.worker_clocks.get(p.node) if p.role == "worker" else None,
                          "straggler": p.node in self.flagged,
                          "consistency": stats.get("consistency", {}),
                          "counters": stats.get("counters", {}),
                          "bytes_in": stats.get("bytes_in", 0), "bytes_out": stats.get("bytes_out", 0)})
        tables = {}
        for name, spec in self.tables.items():
            per_server = {n: s.get("tables", {}).get(name, {}) for n, s in self.stats.items()}
            tables[name] = {**spec.to_wire(),
                            "keys": sum(v.get("keys", 0) for v in per_server.values()),
                            "bytes": sum(v.get("bytes", 0) for v in per_server.values()),
                            "per_server": per_server}
        ranges = [{"begin": r.begin, "last": r.end - 1, "owners": list(o)}
                  for r, o in zip(self.ring.ranges, self.ring.owners)]
        live = {w: c for w, c in self.worker_clocks.items() if w in self.liveness.live("worker")}
        clocks = {"workers": live, "slowest": min(live.values()) if live else None,
                  "fastest": max(live.values()) if live else None, "stragglers": sorted(self.flagged),
                  "consistency": self.config.consistency, "max_delay": self.config.max_delay}
        return {"scheduler": self.address, "uptime": round(time.time() - self.started, 1),
                "clocks": clocks, "ring_changing": self.ring_changes.busy,
                "checkpoints": self.checkpoints.status(),
                "replication": self.config.replication,
                "ring_version": self.ring.version, "nodes": nodes, "ranges": ranges, "tables": tables,
                "jobs": [j.to_dict(len(j.metrics)) for j in self.jobs.jobs.values()]}

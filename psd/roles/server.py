"""The server daemon: sockets, timers and files around the server's core.

Every decision (apply, hold, forward, acknowledge, refuse) is made by
``psd.core.server.ServerCore``, which is handed each message with the time and returns
effects; this module carries them out: replies on the data socket or the link to the
scheduler, requests to other servers (their answers go back to the core), files, and the
stop. It also runs the heartbeats to the scheduler and the core's clock (``tick``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from pathlib import Path

from psd.cluster.schedulers import after, lost_after, named_leader
from psd.codec import Message
from psd.codec.traffic import total as traffic_total
from psd.config import ClusterConfig
from psd.core.effects import DATA, Ask, Follow, Forget, Refuse, Rejoin, Reply, Stop, Tell, Write
from psd.core.server import ServerCore
from psd.roles.fast_pull import FastPull
from psd.roles.peers import Peers
from psd.store.checkpoint import load_server_file
from psd.store.kernels import warm as warm_store
from psd.errors import NotLeaderError, PsdError
from psd.transport import RpcSocket, Route, async_context, bind_router, connect_dealer
from psd.transport.heartbeat import HeartbeatThread
from psd.transport.metrics import Timings
from psd.transport.security import Curve
from psd.transport.shm import Budget, ShmSettings, sweep
from psd.transport.stripes import stripe_count

log = logging.getLogger("psd.server")

#: how often the core's timers are checked (unanswered forwards, stalled copies, pings)
TICK = 0.05
#: seconds between two sweeps of shared memory (segments of dead processes, frees)
SHM_TICK = 2.0


def prepare_store() -> None:
    """The store's compiled loops, before the server registers: no request waits for the
    compiler (loaded from numba's disk cache, or compiled once per machine). The daemon
    runs this before the role (``run_daemon(prepare=...)``); idempotent."""
    started = time.monotonic()
    cache = warm_store()
    log.info("store ready in %.1f s (compiled loops: %s)", time.monotonic() - started,
             f"numba cache {cache}" if cache else "no disk cache, compiled in memory")


class Server:
    #: where GET /metrics is served (config `metrics`), once bound; announced in stats()
    metrics_address: str | None = None

    def __init__(self, config: ClusterConfig, *, curve: Curve | None):
        """``curve``: the daemons' keys (security: curve), or None for plaintext."""
        self.config = config
        self.curve = curve
        self.core = ServerCore(config, secure=curve is not None)
        self.started = time.time()
        self.timings = Timings(("op", "outcome"))  # requests and their handling time, for /metrics
        self.stop_event: asyncio.Event | None = None
        self._asks: dict[int, tuple[RpcSocket, int]] = {}  # core token -> (connection, message id)
        self.keepalive: HeartbeatThread | None = None
        #: set once the first registration is answered: the scheduler may send the ring
        #: (and a restore) right behind its answer, and both need our node id
        self._registered = asyncio.Event()
        #: the scheduler our link is on (it moves to the leader after a takeover), and
        #: when it last answered
        self.scheduler_address = config.scheduler
        self._answered_at = time.monotonic()

    # what logs and /metrics read
    @property
    def node_id(self) -> str:
        return self.core.node_id

    @property
    def ring(self):
        return self.core.ring

    def log_clock(self) -> int | None:
        return self.core.log_clock()

    # -- lifecycle -----------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready) -> None:
        self.stop_event = stop
        warm_store()  # (at once: the daemon ran prepare_store before the start-up clock)
        cfg = self.config
        # one I/O thread per stripe a client may open: CurveZMQ then decrypts and encrypts
        # a striped message on several cores (psd/transport/stripes.py)
        ctx = async_context(io_threads=stripe_count(cfg.stripes) if self.curve is not None else 1)
        limits = cfg.limits
        shm = Budget(ShmSettings(cfg.shm, cfg.shm_min_bytes, cfg.shm_max_bytes, cfg.shm_dir))
        if cfg.shm:
            gone = sweep(cfg.shm_dir)  # what processes killed before us left behind
            if gone:
                log.info("removed %d shared-memory segment(s) of dead processes", len(gone))
        sock, self.address = bind_router(ctx, cfg.bind, limits.max_message_bytes, security=self.curve)
        self.data = RpcSocket(sock, self.node_id, limits=limits, compression=cfg.compression,
                              handler=self.handle, router=True, fast=FastPull(self),
                              busy_poll=cfg.busy_poll_us * 1e-6, adaptive_poll=cfg.adaptive_poll_us * 1e-6,
                              # not while a push waits for its replicas' acks (on the peers'
                              # sockets, which the loop reads only once the spin is over)
                              spin_ok=lambda: not self.core.acks,
                              # every request's key role: daemons' ops need the server key,
                              # and a worker key may be limited to some namespaces
                              identify=self.curve is not None, shm=shm)
        # concurrent: control requests are answered by effects, some of them later (a copy,
        # a checkpoint), and the news that a worker died must get through meanwhile
        self.link = RpcSocket(connect_dealer(ctx, cfg.scheduler, security=self.curve), self.node_id,
                              limits=limits, handler=self.handle_control, concurrent=True)
        self.peers = Peers(self.node_id, limits, cfg.compression, self.curve, stripe_count(cfg.stripes), shm)
        link_task = asyncio.create_task(self.link.serve())
        tasks: list[asyncio.Task] = []
        try:
            await self.register()
            self.keepalive = HeartbeatThread(cfg.scheduler, self.node_id, cfg.heartbeat_interval,
                                             lambda: 0, security=self.curve)
            self.keepalive.start()
            tasks = [asyncio.create_task(self.data.serve()), asyncio.create_task(self._heartbeats()),
                     asyncio.create_task(self._ticks())]
            ready(self.address)
            log.info("%s serving at %s, ring v%d", self.node_id, self.address, self.ring.version)
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({*tasks, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done and not self.core.draining and getattr(stop, "drain", True):
                await self.drain()
            for t in (*tasks, waiter):
                t.cancel()
            for t in done:
                if t is not waiter and not t.cancelled() and t.exception():
                    raise t.exception()
        finally:
            if self.keepalive is not None:
                self.keepalive.stop()
            link_task.cancel()
            self.peers.close()
            self.data.close()
            self.link.close()
            log.info("%s stopped", self.node_id)

    async def drain(self) -> None:
        """SIGTERM: hand our ranges to the others before exiting (bounded by the timeout)."""
        self.core.draining = True
        if len(self.ring.servers) <= 1:
            return
        log.info("%s draining: handing its ranges over", self.node_id)
        try:
            await self.link.call(Message("leave"), timeout=self.config.request_timeout)
        except Exception as e:
            log.warning("%s: drain failed (%s); exiting anyway", self.node_id, e)

    async def register(self, previous: str | None = None, ring: int | None = None) -> None:
        meta = {"role": "server", "address": self.config.advertised(self.address)}
        if previous is not None:
            meta.update(previous=previous, ring=ring)
        reply = await self._call_leader(Message("register", meta=meta), self.config.request_timeout)
        self._execute(self.core.registered(reply.meta, time.monotonic()))
        self.data.node_id = self.link.node_id = self.peers.node_id = self.node_id
        self._registered.set()
        if self.keepalive is not None:
            self.keepalive.node_id = self.node_id

    async def _rejoin(self, effect: Rejoin) -> None:
        """Register again after the cluster declared us dead (or forgot us): as a new
        member, keeping what the ring still gives us. Retried until it works or we stop.

        The scheduler starts our join's ring change as soon as it has answered, so its
        ring can arrive before we have read that answer: control messages wait for it
        (``_registered``), or the answer's older ring would replace the newer one, and
        forwards for ranges the newer ring gives us would be skipped as not ours."""
        self._registered.clear()
        while not self.stop_event.is_set():
            try:
                await self.register(previous=effect.previous, ring=effect.ring)
                log.info("%s rejoined the cluster (was %s)", self.node_id, effect.previous)
                return
            except Exception as e:
                log.warning("%s: registering again failed (%s); retrying", effect.previous, e)
                await asyncio.sleep(self.config.heartbeat_interval)

    # -- finding the leader among the schedulers (docs/fault-tolerance.md, "Standby scheduler") --
    def _switch(self, address: str, why: str) -> None:
        if address == self.scheduler_address:
            return
        log.warning("%s: moving its link from the scheduler at %s to %s (%s)", self.node_id,
                    self.scheduler_address, address, why)
        self.link.move(self.scheduler_address, address)
        self.scheduler_address = address
        if self.keepalive is not None:
            self.keepalive.scheduler = address
        self._answered_at = time.monotonic()

    def _refused_by_standby(self, err: NotLeaderError) -> None:
        leader = named_leader(err.data, self.core.schedulers)
        if leader is not None:
            self._switch(leader, "a standby named the leader")

    def _maybe_rotate(self) -> None:
        """No answer from our scheduler for as long as a dead node's silence: try the next."""
        others = [a for a in self.core.schedulers if a != self.scheduler_address]
        cfg = self.config
        if others and time.monotonic() - self._answered_at > lost_after(cfg.heartbeat_interval, cfg.heartbeat_misses):
            self._switch(after(self.core.schedulers, self.scheduler_address), "no answer")

    async def _call_leader(self, msg: Message, timeout: float) -> Message:
        """A request to whichever scheduler leads: a standby's refusal names it, silence
        moves on to the next address (only with standbys configured)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            attempt = min(max(1.0, 8 * self.config.heartbeat_interval), left) if len(self.core.schedulers) > 1 else left
            try:
                reply = await self.link.call(Message(msg.op, meta=msg.meta), timeout=max(0.05, attempt))
                self._answered_at = time.monotonic()
                return reply
            except NotLeaderError as e:
                self._refused_by_standby(e)
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(self.config.heartbeat_interval)
            except PsdError:
                if len(self.core.schedulers) < 2 or time.monotonic() >= deadline:
                    raise
                self._maybe_rotate()

    async def _heartbeats(self) -> None:
        """The loop's heartbeats: they carry our stats and tell us whether we are still a
        member (the keepalive thread only keeps us from being declared dead meanwhile)."""
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.heartbeat_interval)
            if self.core.rejoining:
                continue
            sent = time.monotonic()
            stats = self.core.heartbeat_stats(sent)
            try:
                reply = await self.link.call(Message("heartbeat", meta={"stats": stats or self.stats()}),
                                             timeout=max(1.0, 4 * cfg.heartbeat_interval))
            except NotLeaderError as e:
                self._refused_by_standby(e)
                continue
            except Exception as e:  # the scheduler may be restarting or cut off; keep serving
                log.warning("%s: heartbeat failed: %s", self.node_id, e)
                self._maybe_rotate()
                continue
            self._answered_at = time.monotonic()
            self._execute(self.core.heartbeat_answered(reply.meta, sent, time.monotonic()))

    async def _ticks(self) -> None:
        shm_at = time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            self.data.expire_stripes(now)  # striped requests whose chunks did not all come
            self._execute(self.core.tick(now))
            if now - shm_at >= SHM_TICK:
                shm_at = now
                self._shm_upkeep()

    def _shm_upkeep(self) -> None:
        """Segments of dead processes go (a SIGKILLed worker's), and what dead peers held
        comes back to the pools."""
        if self.config.shm:
            sweep(self.config.shm_dir)
        self.data.shm_tick()
        for rpc in self.peers._rpc.values():
            rpc.shm_tick()

    # -- carrying out the core's effects ----------------------------------------------
    def _execute(self, effects: list) -> None:
        for e in effects:
            kind = type(e)
            if kind is Reply:
                (self.data if e.via == DATA else self.link).reply_now(e.route, e.msg, e.leases)
            elif kind is Refuse:
                (self.data if e.via == DATA else self.link).answer_error(e.route, e.request, e.error)
            elif kind is Ask:
                rpc = self.peers.get(e.node, e.address)
                fut = rpc.request(e.msg)
                self._asks[e.token] = (rpc, e.msg.id)
                fut.add_done_callback(partial(self._answered, e.token))
            elif kind is Forget:
                asked = self._asks.pop(e.token, None)
                if asked is not None:
                    asked[0].forget(asked[1])
            elif kind is Tell:
                self.peers.get(e.node, e.address).send_now(e.msg)
            elif kind is Write:
                try:
                    result, err = e.write(), None
                except Exception as x:  # reported to the scheduler, which fails the checkpoint
                    result, err = None, x
                self._execute(self.core.written(e.token, result, err, time.monotonic()))
            elif kind is Stop:
                self.stop_event.set()
            elif kind is Rejoin:
                asyncio.ensure_future(self._rejoin(e))
            elif kind is Follow:
                self._switch(e.address, "it voted for it to lead")
            else:
                raise TypeError(f"unknown effect {e!r}")

    def _answered(self, token: int, fut: asyncio.Future) -> None:
        if self._asks.pop(token, None) is None:
            return  # forgotten
        if fut.cancelled():
            return
        err = fut.exception()
        reply = None if err is not None else fut.result()
        self._execute(self.core.answered(token, reply, err, time.monotonic()))

    # -- requests ----------------------------------------------------------------
    def handle(self, route: Route, msg: Message) -> None:
        """Every data-plane request is plain code: the transport answers it inside its
        read callback, without a task. Replies go out as the core's effects."""
        started = time.perf_counter()
        if msg.op == "status":
            self.data.reply_now(route, msg.reply(meta=self.stats()))
            return None
        effects = self.core.handle(route, msg, time.monotonic())
        outcome = "ok"
        for e in effects:
            if type(e) is Refuse and e.request is msg:
                outcome = getattr(e.error, "code", "internal")
        self._execute(effects)
        self.timings.observe((msg.op, outcome), time.perf_counter() - started)
        return None

    def handle_control(self, route: Route, msg: Message):
        if not self._registered.is_set():
            return self._once_registered(route, msg)
        if msg.op == "restore":
            try:
                folder = Path(msg.meta["folder"])
                files = [load_server_file(folder / name) for name in msg.meta["files"]]
            except Exception as err:
                self.link.answer_error(route, msg, err)
                return None
            self._execute(self.core.restore(msg, files, time.monotonic()))
            return None
        self._execute(self.core.control(msg, time.monotonic()))
        return None

    async def _once_registered(self, route: Route, msg: Message) -> None:
        """A control message that overtook the answer to our registration (the link
        handles messages as they come; the answer's waiter runs later)."""
        await self._registered.wait()
        return self.handle_control(route, msg)

    # -- introspection -------------------------------------------------------------
    def stats(self) -> dict:
        st = self.core.stats(time.monotonic())
        peers = list(self.peers._rpc.values()) if getattr(self, "peers", None) is not None else []
        st["traffic"] = traffic_total([self.data.traffic.snapshot(), *(p.traffic.snapshot() for p in peers)])
        st.update({"bytes_in": self.data.bytes_in, "bytes_out": self.data.bytes_out,
                   "messages_in": self.data.messages_in, "messages_out": self.data.messages_out,
                   "uptime": time.time() - self.started, "metrics": self.metrics_address,
                   # striped messages: requests put back together, given up (chunks lost),
                   # replies sent striped, and the clients that opened stripes
                   "stripes": {**self.data.assembler.stats(), "sent": self.data.striped_out,
                               "clients": len(self.data.assembler.groups)}})
        if getattr(self, "data", None) is not None and self.data.shm is not None:
            st["shm"] = self.data.shm_stats()
        return st

"""The scheduler daemon: its socket, its clock and its state file around the scheduler's core.

Every decision (who is a member, who is dead, which ring, what a job does) is made by
``psd.core.scheduler.SchedulerCore``. This module reads and writes ``scheduler.json``,
finds the newest checkpoint at start, keeps how to reach each node (the ROUTER identity
of the connection it registered or last heartbeated on), and carries out the core's
effects. It holds no parameters. Servers and workers register on its one ROUTER
socket; the same connection carries the scheduler's own requests down to them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from functools import partial
from pathlib import Path

from psd.codec import Message
from psd.config import ClusterConfig
from psd.core.effects import Ask, DropRoute, Forget, Notify, Refuse, Reply, Run, Save
from psd.core.scheduler import KEEP_ENDED_JOBS, KEEP_GONE_WORKERS, SchedulerCore  # noqa: F401 (tests read them)
from psd.cluster.assignment import Assignment
from psd.errors import NotLeaderError, PsdError
from psd.roles.standby import Standby, watch_peers
from psd.store.checkpoint import latest
from psd.transport import RpcSocket, Route, async_context, bind_router
from psd.transport.metrics import Timings
from psd.transport.security import Curve

log = logging.getLogger("psd.scheduler")

#: the scheduler's durable state, in ``state_dir``
STATE_FILE = "scheduler.json"


def read_state(folder: Path) -> dict | None:
    path = folder / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_state(folder: Path, state: dict) -> None:
    """Replace the state file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, folder / STATE_FILE)


class Scheduler:
    #: where GET /metrics is served (config `metrics`), once bound
    metrics_address: str | None = None

    def __init__(self, config: ClusterConfig, bind: str | None = None, *, curve: Curve | None,
                 check_job=None):
        """``curve``: the daemons' keys (security: curve), or None for plaintext;
        ``check_job(job, workers)``: the problems of a submitted job (the command line
        passes the job file's rules)."""
        self.config = config
        self.curve = curve
        self.bind = bind or config.scheduler
        self.state_dir = Path(config.state_dir) if config.state_dir else None
        self.check_job = check_job
        self.routes: dict[str, Route] = {}
        self._asks: dict[int, tuple[int, asyncio.Future | None]] = {}  # token -> (message id, call)
        self.timings = Timings(("op", "outcome"))  # requests and their latency, for /metrics
        self._arrived: dict = {}  # (route, request id) -> (op, arrival): for the timings
        self.started = time.time()
        saved = read_state(self.state_dir) if self.state_dir else None
        #: with standby schedulers, every scheduler starts as a standby and leads only once
        #: elected (or, on a new cluster, as the first one); without, it leads at once
        self.standby: Standby | None = None
        self.core: SchedulerCore | None = None
        if config.standby:
            self.standby = Standby(config, self.bind, curve, saved, self._save_copy)
        else:
            self._lead(saved)

    def _lead(self, saved: dict | None, epoch: int | None = None, rings=(), elected: bool = True,
              tables=()) -> None:
        found = latest(Path(self.config.checkpoint_dir)) if self.config.checkpoint_dir and saved is None else None
        now = time.monotonic()
        self.core = SchedulerCore(self.config, secure=self.curve is not None, now=now,
                                  wall_offset=time.time() - now, saved=saved, checkpoint=found,
                                  check_job=self.check_job)
        self.resumed = self.core.resumed
        if epoch is not None and elected:
            self.core.take_over(epoch, list(rings), now, list(tables))
        elif epoch is not None:  # the first scheduler of a new cluster
            self.core.state.epoch = epoch
            self.core.save()
        self._execute(self.core._take())  # (jobs that ended while we were down, say)

    def _save_copy(self, state: dict) -> None:
        """A standby's copy of the leader's state, in its own state_dir."""
        if self.state_dir is not None:
            write_state(self.state_dir, state)

    # what logs, status and /metrics read
    node_id = "H"

    @property
    def ring(self):
        return self.core.ring if self.core is not None else Assignment(version=0)

    @property
    def checkpoints(self):
        return self.core.checkpoints

    def log_clock(self) -> int | None:
        return self.core.log_clock() if self.core is not None else None

    def status(self) -> dict:
        return self.core.status(time.monotonic())

    def save(self) -> None:
        """Persist now (a standby's copy is saved as it comes)."""
        if self.state_dir is not None and self.core is not None:
            write_state(self.state_dir, self.core.state.to_dict())

    async def run(self, stop: asyncio.Event, ready) -> None:
        sock, self.address = bind_router(async_context(), self.bind, self.config.limits.max_message_bytes,
                                         security=self.curve)
        # identify: every request's key role (msg.peer), under CurveZMQ; the scheduler is
        # not on the data path, and several of its checks depend on the request's content
        self.rpc = RpcSocket(sock, SchedulerCore.node_id, limits=self.config.limits, handler=self.handle,
                             router=True, concurrent=True, identify=self.curve is not None)
        serve = asyncio.create_task(self.rpc.serve())
        ready(self.address)
        tasks = {serve}
        try:
            waiter = asyncio.create_task(stop.wait())
            if self.standby is not None:
                log.info("scheduler at %s, standby: following the leader", self.address)
                following = asyncio.create_task(self.standby.until_leading())
                done, _ = await asyncio.wait({serve, following, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if following not in done:
                    following.cancel()
                    return
                won = following.result()
                self._lead(won.state, won.epoch, won.rings, elected=won.elected, tables=won.tables)
                tasks.add(asyncio.create_task(watch_peers(self.config, self.bind, self.curve, won.epoch)))
            self.core.address = self.address
            self.core.metrics_address = self.metrics_address
            tasks.add(asyncio.create_task(self._ticks()))
            log.info("scheduler at %s%s", self.address,
                     f", leading at epoch {self.core.state.epoch}" if self.standby is not None else "")
            done, _ = await asyncio.wait({*tasks, waiter}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not waiter and t.exception():
                    raise t.exception()
        finally:
            self.save()  # job progress and membership are otherwise saved on the next tick
            for t in tasks:
                t.cancel()
            self.rpc.close()

    async def _ticks(self) -> None:
        step = self.config.heartbeat_interval / 2
        while True:
            await asyncio.sleep(step)
            self._execute(self.core.tick(time.monotonic()))

    # -- requests ---------------------------------------------------------------------
    def handle(self, route: Route, msg: Message) -> None:
        if self.core is None:  # a standby: it names the leader it follows, and does nothing else
            sb = self.standby
            self.rpc.answer_error(route, msg, NotLeaderError(
                f"the scheduler at {self.bind} is a standby; the leader is "
                f"{sb.leader or 'not known to it yet'}" + (f" (ask {sb.leader})" if sb.leader else ""),
                leader=sb.leader or "", epoch=sb.candidacy.epoch))
            return None
        self._arrived[(route, msg.id)] = (msg.op, time.perf_counter())
        effects = self.core.handle(route, msg, time.monotonic())
        self._note_route(route, msg, effects)
        self._execute(effects)
        return None

    def _timed(self, route: Route, msg_id: int, outcome: str) -> None:
        """A request answered: from its arrival to its answer (a ring change, drain or
        checkpoint takes as long as the servers do)."""
        arrived = self._arrived.pop((route, msg_id), None)
        if arrived is not None:
            self.timings.observe((arrived[0], outcome), time.perf_counter() - arrived[1])

    def _note_route(self, route: Route, msg: Message, effects: list) -> None:
        """How to reach a node: the connection it registered on, renewed by the heartbeats
        it sends on it (after a scheduler restart ZeroMQ reconnects it under a new
        identity; the sync client's heartbeat thread has its own socket and says
        link=False). What we asked on the old connection is answered on the new one."""
        if msg.op not in ("register", "heartbeat"):
            return
        for e in effects:
            if type(e) is Reply and e.msg.id == msg.id:
                if msg.op == "register" and "node" in e.msg.meta:
                    self.routes[e.msg.meta["node"]] = route
                elif msg.op == "heartbeat" and e.msg.meta.get("known") and msg.meta.get("link", True):
                    old, self.routes[msg.sender] = self.routes.get(msg.sender), route
                    self.rpc.reroute(old, route)

    def _execute(self, effects: list) -> None:
        for e in effects:
            kind = type(e)
            if kind is Reply:
                self.rpc.reply_now(e.route, e.msg)
                self._timed(e.route, e.msg.id, "ok")
            elif kind is Refuse:
                self.rpc.answer_error(e.route, e.request, e.error)
                self._timed(e.route, e.request.id, getattr(e.error, "code", "internal"))
            elif kind is Ask:
                self._ask(e.node, e.msg, e.token)
            elif kind is Forget:
                asked = self._asks.pop(e.token, None)
                if asked is not None:
                    self.rpc.forget(asked[0])
            elif kind is Notify:
                route = self.routes.get(e.node)
                if route is not None:
                    fut = self.rpc.request(e.msg, route)
                    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
                    # a worker that died meanwhile never answers: stop waiting in time
                    asyncio.get_running_loop().call_later(self.config.request_timeout, self.rpc.forget, e.msg.id)
            elif kind is Save:
                if self.state_dir is not None:
                    write_state(self.state_dir, e.state)
            elif kind is Run:
                try:
                    result, err = e.fn(), None
                except Exception as x:
                    result, err = None, x
                self._execute(self.core.answered(e.token, result, err, time.monotonic()))
            elif kind is DropRoute:
                self.routes.pop(e.node, None)
            else:
                raise TypeError(f"unknown effect {e!r}")

    def _ask(self, node: str, msg: Message, token: int) -> None:
        route = self.routes.get(node)
        if route is None:
            self._execute(self.core.answered(token, None, PsdError(f"no route to {node}"), time.monotonic()))
            return
        fut = self.rpc.request(msg, route)
        self._asks[token] = (msg.id, fut)
        fut.add_done_callback(partial(self._answered, token))

    def _answered(self, token: int, fut: asyncio.Future) -> None:
        asked = self._asks.pop(token, None)
        if asked is None or fut.cancelled():
            return
        self.rpc.forget(asked[0])
        err = fut.exception()
        self._execute(self.core.answered(token, None if err is not None else fut.result(), err, time.monotonic()))

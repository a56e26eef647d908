"""The daemons of the simulation: the real cores, driven as their daemons drive them.

``SimServer``, ``SimScheduler`` and ``SimWorker`` do what ``psd.roles.server``,
``psd.roles.scheduler`` and ``psd.client.aio`` do with sockets and timers: register,
heartbeat, tick, and carry out the cores' effects, here on the simulated network. The
decisions are the cores' own code, unchanged.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

from psd.cluster.assignment import Assignment
from psd.cluster.rows import Rows
from psd.codec import Message
from psd.codec.message import error_reply
from psd.config import ClusterConfig
from psd.core import client as client_core
from psd.core.effects import (DATA, Ask, DropRoute, Forget, Notify, Refuse, Rejoin, Reply, Run, Save, Stop, Tell,
                              Write)
from psd.core.scheduler import SchedulerCore
from psd.core.keycache import KeyCache
from psd.core.server import ServerCore
from psd.errors import PsdError, RemoteError
from psd.schema import TableSpec
from psd.sim.world import Connection, Process, World
from psd.store.table import Table

SCHEDULER = "sched"
#: the data-plane ops whose states ``SimServer.note_state`` counts
STATE_OPS = ("push", "pull", "pushpull", "replicate")


def _error(request: Message, err: Exception, sender: str) -> Message:
    if not isinstance(err, PsdError):
        err = RemoteError(f"internal error handling {request.op}: {err!r}")
    return error_reply(request, err, sender)


def address_of(process: str) -> str:
    """A simulated server's address: what it registers (tcp://, like a real one)."""
    return f"tcp://{process}:1"


def process_of(address: str) -> str:
    name = _PROCESS_OF.get(address)
    if name is None:
        name = _PROCESS_OF[address] = address.removeprefix("tcp://").rsplit(":", 1)[0]
    return name


#: address -> process name (asked for every message a simulated node sends or answers)
_PROCESS_OF: dict[str, str] = {}


def _lend_all(spec: TableSpec, usage) -> Table:
    return Table(spec, usage, lend_min_bytes=0, small_pull=0)


class _Caller:
    """Requests a process sent and waits answers for: message id -> what to do with it."""

    def __init__(self) -> None:
        self.waiting: dict[int, Callable[[Message], None]] = {}

    def request(self, world: World, conn: Connection, me: str, msg: Message, answer: Callable[[Message], None],
                sender: str) -> None:
        msg.id = next(world.ids)
        msg.sender = sender
        self.waiting[msg.id] = answer
        world.send(conn, me, msg)

    def answered(self, msg: Message) -> bool:
        answer = self.waiting.pop(msg.id, None)
        if answer is None:
            return False
        answer(msg)
        return True


#: key lists a simulated server keeps (a daemon: KEY_CACHE_ENTRIES)
SIM_KEY_LISTS = 6


class SimServer(Process):
    def __init__(self, world: World, name: str, config: ClusterConfig):
        self.world, self.name, self.config = world, name, config
        self.core = ServerCore(config, secure=False, table_factory=_lend_all)
        # a key cache of a few lists: evictions, and the misses they bring, in every run
        self.core.keycache = KeyCache(max_entries=SIM_KEY_LISTS)
        self.caller = _Caller()
        self.asks: dict[int, int] = {}  # message id -> core token
        self.tokens: dict[int, int] = {}  # core token -> message id
        self.address = address_of(name)
        self.registered = False
        #: in-flight states of one message per server met here (``note_state``), counted
        #: only when asked (``Settings.count_states``: it regroups every data message)
        self.states: Counter = Counter()
        self.count_states = False
        self._in_part: set[tuple[str, int]] = set()  # (origin, rid) of forwards holding part of a push
        #: armed by the ``kill_mid_forward`` fault: called when this server dies between
        #: the forwards of one push (``_cut_mid_forward``)
        self.die_mid_forward: Callable[[], None] | None = None
        #: carries out ``Write`` effects (checkpoint files) when the run takes checkpoints
        #: (psd.sim.checkpoints); None: answered at once as written, nothing stored
        self.files = None

    def start(self) -> None:
        self.world.add(self)
        self._register(None, None)
        self.world.every(self.config.heartbeat_interval, self._heartbeat, self.name)
        self.world.every(0.05, lambda: self._execute(self.core.tick(self.world.now)), self.name)

    def _link(self) -> Connection:
        return self.world.connect(self.name, SCHEDULER)

    def _register(self, previous: str | None, ring: int | None) -> None:
        meta = {"role": "server", "address": self.address}
        if previous is not None:
            meta.update(previous=previous, ring=ring)

        def answered(reply: Message) -> None:
            if reply.op != "ok":
                self.world.after(0.1, lambda: self._register(previous, ring), self.name)
                return
            self.registered = True
            self._execute(self.core.registered(reply.meta, self.world.now))
        self.caller.request(self.world, self._link(), self.name, Message("register", meta=meta), answered,
                            self.core.node_id)

    def _heartbeat(self) -> None:
        if not self.registered or self.core.rejoining:
            return
        sent = self.world.now
        stats = self.core.heartbeat_stats(sent) or self.core.stats(sent)
        self.caller.request(self.world, self._link(), self.name, Message("heartbeat", meta={"stats": stats}),
                            lambda reply: self._execute(self.core.heartbeat_answered(reply.meta, sent,
                                                                                     self.world.now)),
                            self.core.node_id)

    def deliver(self, conn: Connection, msg: Message) -> None:
        now = self.world.now
        if msg.op in ("ok", "error"):
            if conn.server == self.name:
                return  # (we answer on these; we ask on the ones we opened)
            token = self.asks.pop(msg.id, None)
            if token is not None:
                self.tokens.pop(token, None)
                self._execute(self.core.answered(token, msg, None, now))
                return
            self.caller.answered(msg)
            return
        if conn.client == self.name and conn.server == SCHEDULER:  # the scheduler's request on our link
            if msg.op == "restore":
                if self.files is not None:  # (the daemon reads the files, then the core loads them)
                    self.files.restore(self, conn, msg)
                else:
                    self.world.send(conn, self.name, msg.reply(meta={"keys": 0}))
                return
            self._execute(self.core.control(msg, now))
            return
        if self.count_states and msg.op in STATE_OPS:
            self.note_state(msg)
        self._execute(self.core.handle(conn, msg, now))

    def note_state(self, msg: Message) -> None:
        """Count the states one message per server brings (decision 97) that this message
        is in, so a test can tell the seeds explored them: a message spanning several
        owner groups here, one led only in part here (refused whole), a forward holding
        part of a push, and a request coming back (a resend, a piece, its forward from
        another primary) to a replica that applied part of it."""
        core = self.core
        if msg.arrays and msg.arrays[0].dtype.kind == "u" and core.ring.ranges:
            groups = Rows(keys=msg.arrays[0]).groups(core.ring)
            if len(groups) > 1:
                self.states[f"{msg.op}: several owner groups"] += 1
            led = [owners[0] == core.node_id for owners, _ in groups]
            if msg.op != "replicate" and any(led) and not all(led):
                self.states[f"{msg.op}: led in part, refused whole"] += 1
        origin = msg.meta.get("origin", msg.sender)
        ids = [msg.meta.get("rid"), *(msg.meta.get("orig") or ())]
        if any((origin, i) in self._in_part for i in ids):
            self.states[f"{msg.op}: back at a server that applied part of it"] += 1
        if msg.op == "replicate" and msg.meta.get("cover") is not None:
            self.states["replicate: part of a push"] += 1
            self._in_part.add((origin, msg.meta.get("rid")))

    def _cut_mid_forward(self, effects: list) -> list:
        """The ``kill_mid_forward`` fault: of a push forwarded to two replica servers or
        more, only the first forward goes; the server stalls and dies once it arrives
        (the one replica holds its part of the push, the other never gets its own)."""
        firsts = [i for i, e in enumerate(effects) if type(e) is Ask and e.msg.op == "replicate"]
        if len({effects[i].node for i in firsts}) < 2:
            return effects
        die, self.die_mid_forward = self.die_mid_forward, None
        ask = effects[firsts[0]]
        self._execute(effects[:firsts[0] + 1])
        self.world.stall(self.name, 5.0)
        arrives = self.world.connect(self.name, process_of(ask.address)).last_delivery["up"]
        self.world.at(arrives + 1e-6, die)
        return []

    def _execute(self, effects: list) -> None:
        world, now = self.world, self.world.now
        if self.die_mid_forward is not None:
            effects = self._cut_mid_forward(effects)
        for e in effects:
            kind = type(e)
            if kind is Reply:
                conn = e.route if e.via == DATA else self._link()
                e.msg.sender = self.core.node_id
                leases = e.leases
                world.send(conn, self.name, e.msg,
                           (lambda ls=leases: [lease.release() for lease in ls]) if leases else None)
            elif kind is Refuse:
                conn = e.route if e.via == DATA else self._link()
                world.send(conn, self.name, _error(e.request, e.error, self.core.node_id))
            elif kind is Ask:
                conn = world.connect(self.name, process_of(e.address))
                e.msg.id = next(world.ids)
                e.msg.sender = self.core.node_id
                self.asks[e.msg.id] = e.token
                self.tokens[e.token] = e.msg.id
                world.send(conn, self.name, e.msg)
            elif kind is Forget:
                msg_id = self.tokens.pop(e.token, None)
                if msg_id is not None:
                    self.asks.pop(msg_id, None)
            elif kind is Tell:
                world.send(world.connect(self.name, process_of(e.address)), self.name, e.msg)
            elif kind is Write:
                if self.files is not None:
                    self.files.write(self, e)
                else:
                    self._execute(self.core.written(e.token, {"file": "sim", "bytes": 0, "keys": 0}, None, now))
            elif kind is Stop:
                world.kill(self.name)
                return
            elif kind is Rejoin:
                self._register(e.previous, e.ring)
            else:
                raise TypeError(f"unknown effect {e!r}")


class SimScheduler(Process):
    def __init__(self, world: World, config: ClusterConfig, saved: dict | None = None):
        self.world, self.name, self.config = world, SCHEDULER, config
        self.core = SchedulerCore(config, secure=False, now=world.now, saved=saved)
        self.routes: dict[str, Connection] = {}
        self.asks: dict[int, int] = {}  # message id -> token
        self.tokens: dict[int, int] = {}
        self.saved: dict | None = saved
        #: runs ``Run`` steps (a checkpoint's folder and manifest) when the run takes
        #: checkpoints (psd.sim.checkpoints); None: every step fails, "no files"
        self.files = None

    def start(self) -> None:
        self.world.add(self)
        self._execute(self.core._take())
        self.world.every(self.config.heartbeat_interval / 2, lambda: self._execute(self.core.tick(self.world.now)),
                         self.name, jitter=0.02)

    def deliver(self, conn: Connection, msg: Message) -> None:
        now = self.world.now
        if msg.op in ("ok", "error"):
            token = self.asks.pop(msg.id, None)
            if token is not None:
                self.tokens.pop(token, None)
                self._execute(self.core.answered(token, msg, None, now))
            return
        effects = self.core.handle(conn, msg, now)
        for e in effects:  # how to reach each node (psd.roles.scheduler does the same)
            if type(e) is Reply and e.msg.id == msg.id:
                if msg.op == "register" and "node" in e.msg.meta:
                    self.routes[e.msg.meta["node"]] = conn
                elif msg.op == "heartbeat" and e.msg.meta.get("known") and msg.meta.get("link", True):
                    self.routes[msg.sender] = conn
        self._execute(effects)

    def _execute(self, effects: list) -> None:
        world, now = self.world, self.world.now
        for e in effects:
            kind = type(e)
            if kind is Reply:
                e.msg.sender = "H"
                world.send(e.route, self.name, e.msg)
            elif kind is Refuse:
                world.send(e.route, self.name, _error(e.request, e.error, "H"))
            elif kind in (Ask, Notify):
                conn = self.routes.get(e.node)
                msg = e.msg
                msg.id = next(world.ids)
                msg.sender = "H"
                if kind is Ask:
                    if conn is None:
                        self._execute(self.core.answered(e.token, None, PsdError(f"no route to {e.node}"), now))
                        continue
                    self.asks[msg.id] = e.token
                    self.tokens[e.token] = msg.id
                if conn is not None:
                    world.send(conn, self.name, msg)
            elif kind is Forget:
                msg_id = self.tokens.pop(e.token, None)
                if msg_id is not None:
                    self.asks.pop(msg_id, None)
            elif kind is Save:
                self.saved = e.state
            elif kind is Run:
                if self.files is not None:
                    self.files.run_step(self, e)
                else:
                    self._execute(self.core.answered(e.token, None, PsdError("no files in the simulation"), now))
            elif kind is DropRoute:
                self.routes.pop(e.node, None)
            else:
                raise TypeError(f"unknown effect {e!r}")


class SimWorker(Process):
    """A worker process: the client core, plus a script of pushes, pulls and clocks that
    a ``Workload`` drives (psd.sim.run)."""

    def __init__(self, world: World, name: str, config: ClusterConfig):
        self.world, self.name, self.config = world, name, config
        self.core = client_core.ClientCore("W?", config.request_timeout)
        self.caller = _Caller()
        self.on_done: Callable[[int, object, PsdError | None], None] = lambda *_: None
        self.on_ready: Callable[[], None] = lambda: None
        self.ready = False
        self.asking_ring = False

    def start(self) -> None:
        self.world.add(self)

        def answered(reply: Message) -> None:
            if reply.op != "ok":
                self.world.after(0.1, self.start_again, self.name)
                return
            self.core.node_id = reply.meta["node"]
            self.ready = True
            self._execute(self.core.use_ring(Assignment.from_wire(reply.meta["ring"]), self.world.now))
            self.world.every(self.config.heartbeat_interval, self._heartbeat, self.name)
            self.world.every(client_core.RETRY_TICK, lambda: self._execute(self.core.tick(self.world.now)),
                             self.name)
            self.on_ready()
        self.caller.request(self.world, self._link(), self.name, Message("register", meta={"role": "worker"}),
                            answered, "W?")

    def start_again(self) -> None:
        self.world.processes.pop(self.name, None)
        self.start()

    def _link(self) -> Connection:
        return self.world.connect(self.name, SCHEDULER)

    def _heartbeat(self) -> None:
        self.caller.request(self.world, self._link(), self.name,
                            Message("heartbeat", clock=self.core.clock_value), lambda reply: None, self.core.node_id)

    def close(self) -> None:
        """``kv.close()``: leave (servers stop waiting for this worker's clock), then stop,
        once answered or after a second: what is unanswered fails ("connection closed") and
        is never sent again (psd.client.aio's close does the same)."""
        def stop(_reply: Message | None = None) -> None:
            if not self.alive:
                return
            for ts in list(self.core.requests):
                self.on_done(ts, None, PsdError("connection closed"))
            self.alive = False  # (not a kill: its connections stay, it just no longer acts)
        self.caller.request(self.world, self._link(), self.name, Message("leave"), stop, self.core.node_id)
        self.world.after(1.0, stop, None)

    def issue(self, op: str, spec: TableSpec, rows) -> int:
        ts, effects = self.core.issue(op, spec, rows, self.world.now)
        self._execute(effects)
        return ts

    def clock(self) -> int:
        self._execute(self.core.clock(self.world.now))
        return self.core.clock_value

    def deliver(self, conn: Connection, msg: Message) -> None:
        now = self.world.now
        if msg.op in ("ok", "error"):
            if conn.server == SCHEDULER:
                self.caller.answered(msg)
                return
            server = self._server_of(conn)
            self._execute(self.core.answered(server, msg, msg.id, now))
            return
        if msg.op == "ring":  # the scheduler's notice
            self._execute(self.core.use_ring(Assignment.from_wire(msg.meta["ring"]), now))
            self.world.send(conn, self.name, msg.reply())

    def _server_of(self, conn: Connection) -> str:
        for node, address in self.core.ring.addresses.items():
            if process_of(address) == conn.server:
                return node
        return "?"

    def connection_lost(self, conn: Connection) -> None:
        if conn.client == self.name and conn.server != SCHEDULER:
            server = self._server_of(conn)
            self._execute(self.core.connection_lost(server, self.world.now))

    def _execute(self, effects: list) -> None:
        world = self.world
        for e in effects:
            kind = type(e)
            if kind is client_core.Send:
                address = self.core.ring.addresses.get(e.server)
                if address is None:
                    self._execute(self.core.answered(e.server, PsdError(f"no address for {e.server}"), e.msg.id,
                                                     world.now))
                    continue
                world.send(world.connect(self.name, process_of(address)), self.name, e.msg)
            elif kind is client_core.Done:
                self.on_done(e.ts, e.result, e.error)
            elif kind is client_core.AskRing:
                if not self.asking_ring:
                    self.asking_ring = True

                    def got(reply: Message) -> None:
                        self.asking_ring = False
                        ring = Assignment.from_wire(reply.meta["ring"]) if reply.op == "ok" else self.core.ring
                        self._execute(self.core.use_ring(ring, world.now))
                    self.caller.request(world, self._link(), self.name, Message("get_ring"), got, self.core.node_id)
                    # an answer lost with the scheduler: ask again later
                    world.after(2.0, lambda: setattr(self, "asking_ring", False), self.name)
            else:
                raise TypeError(f"unknown effect {e!r}")

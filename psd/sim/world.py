"""The simulated world: a virtual clock, an event queue and a network, driven by a seed.

Everything the cores do happens at a virtual time, in an order the seed fixes, so a run
replays exactly. The network follows ZeroMQ over TCP as psd uses it:

* a *connection* joins a client process to a server process (the side that connected,
  and the side that bound); each direction is a FIFO: messages are delivered in the
  order sent, after a random latency;
* a *partition* blocks some directions between processes: messages wait (TCP keeps
  retransmitting them) and go through, in order, once it heals;
* a connection can *drop*: what was in flight on it, both ways, is lost, and both ends
  learn it (a worker then sends again what was not admitted);
* a process can *stall* (SIGSTOP, CPU starvation): it handles nothing and its timers do
  not fire until it resumes; or be *killed*: its state is gone, its connections drop.
"""
from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np

from psd.codec import Message


class Process:
    """Something that lives in the world: handles messages and timers (see psd.sim.nodes)."""

    name: str = "?"
    alive = True

    def deliver(self, conn: "Connection", msg: Message) -> None:
        raise NotImplementedError

    def connection_lost(self, conn: "Connection") -> None:
        """One of this process's connections dropped (default: nothing to do)."""


@dataclass(eq=False)
class Connection:
    """A connection from ``client`` to ``server`` (the one that bound). Messages keep
    their order in each direction; ``incarnation`` counts drops."""

    client: str
    server: str
    incarnation: int = 0
    last_delivery: dict = field(default_factory=lambda: {"up": 0.0, "down": 0.0})
    #: messages sent while the direction was blocked, waiting for the heal, in order
    waiting: dict = field(default_factory=lambda: {"up": [], "down": []})

    def other(self, name: str) -> str:
        return self.server if name == self.client else self.client


class World:
    def __init__(self, seed: int, latency: tuple[float, float] = (0.0002, 0.002)):
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self.processes: dict[str, Process] = {}
        self.connections: dict[tuple[str, str], Connection] = {}
        self.blocked: set[tuple[str, str]] = set()  # (from, to) directions cut
        self.stalled_until: dict[str, float] = {}
        self._deferred: dict[str, list] = {}  # a stalled process's events, in order
        self.latency = latency
        self.log: list[str] = []
        self.messages = 0
        self.last_work = 0.0  # when the last message other than a heartbeat or an answer arrived
        self.ids = itertools.count(1)  # message ids, per run: a run replays exactly

    # -- time ----------------------------------------------------------------------
    def at(self, when: float, fn: Callable[[], None], owner: str | None = None) -> None:
        """Run ``fn`` at virtual time ``when`` (on ``owner``'s behalf: deferred while it
        is stalled, dropped once it is killed)."""
        heapq.heappush(self._events, (max(when, self.now), next(self._seq), owner, fn))

    def after(self, delay: float, fn: Callable[[], None], owner: str | None = None) -> None:
        self.at(self.now + delay, fn, owner)

    def every(self, period: float, fn: Callable[[], None], owner: str, jitter: float = 0.1) -> None:
        """Call ``fn`` every ``period`` (with a little jitter) while ``owner`` lives."""
        proc, processes, random = self.processes.get(owner), self.processes, self.rng.random
        low, span = -jitter, jitter - -jitter  # (random.uniform(-jitter, jitter)'s arithmetic, inlined)

        def again() -> None:
            if processes.get(owner) is not proc or not proc.alive:
                return
            fn()
            self.at(self.now + period * (1 + (low + span * random())), again, owner)
        self.after(period * self.rng.uniform(0.1, 1.0), again, owner)

    def run(self, until: float, check: Callable[[str, Process], None] | None = None) -> None:
        """Run the events due by ``until``; after each that a process acted in,
        ``check(owner, process)`` (its name, and the process as it was when the event began)."""
        events, processes, stalled = self._events, self.processes, self.stalled_until
        pop = heapq.heappop
        while events and events[0][0] <= until:
            when, _, owner, fn = pop(events)
            self.now = when
            if owner is None:
                fn()
                continue
            proc = processes.get(owner)
            if proc is None or not proc.alive:
                continue
            if stalled and stalled.get(owner, 0.0) > when:
                self._deferred.setdefault(owner, []).append(fn)
                continue
            fn()
            if check is not None:
                check(owner, proc)
        self.now = max(self.now, until)

    # -- processes -----------------------------------------------------------------
    def add(self, proc: Process) -> None:
        self.processes[proc.name] = proc

    def kill(self, name: str) -> None:
        """SIGKILL: the process and its state are gone; its connections drop."""
        proc = self.processes.pop(name, None)
        if proc is None:
            return
        proc.alive = False
        self._deferred.pop(name, None)
        self.stalled_until.pop(name, None)
        for conn in [c for c in self.connections.values() if name in (c.client, c.server)]:
            self.drop(conn)
            del self.connections[(conn.client, conn.server)]
        self.note(f"kill {name}")

    def stall(self, name: str, seconds: float) -> None:
        """SIGSTOP for ``seconds``, then SIGCONT: everything it missed is handled then."""
        until = self.now + seconds
        self.stalled_until[name] = max(self.stalled_until.get(name, 0.0), until)
        self.note(f"stall {name} for {seconds:.2f} s")

        def resume() -> None:
            if self.stalled_until.get(name, 0.0) > self.now:
                return
            self.stalled_until.pop(name, None)
            for fn in self._deferred.pop(name, []):
                self.at(self.now, fn, name)
        self.at(until, resume)

    def note(self, what: str) -> None:
        self.log.append(f"{self.now:9.4f} {what}")

    # -- the network ---------------------------------------------------------------
    def connect(self, client: str, server: str) -> Connection:
        key = (client, server)
        conn = self.connections.get(key)
        if conn is None:
            conn = self.connections[key] = Connection(client, server)
        return conn

    def send(self, conn: Connection, sender: str, msg: Message, on_delivery: Callable[[], None] | None = None) -> None:
        """Send ``msg`` from ``sender`` on ``conn``. Its arrays are read (copied) when it
        is delivered, as libzmq reads a zero-copy frame later; ``on_delivery`` then runs
        (a lent view's lease is released)."""
        # the header is packed when sent (later changes to the Message do not travel:
        # cores change a sent message's fields, never what they hold); the payload is
        # read when delivered (zero-copy). This copy is the world's own until delivered.
        msg = Message(msg.op, msg.id, msg.sender, msg.table, msg.ring, msg.clock, msg.meta.copy(),
                      msg.arrays[:] if msg.arrays else [])
        if sender == conn.client:
            direction, dest = "up", conn.server
        else:
            direction, dest = "down", conn.client
        if self.blocked and (sender, dest) in self.blocked:
            conn.waiting[direction].append((msg, on_delivery))
            return
        self._schedule(conn, direction, dest, msg, on_delivery)

    def _schedule(self, conn: Connection, direction: str, dest: str, msg: Message, on_delivery) -> None:
        last = conn.last_delivery
        lo, hi = self.latency
        when = self.now + (lo + (hi - lo) * self.rng.random())  # (random.uniform's arithmetic)
        if last[direction] > when:
            when = last[direction]
        last[direction] = when
        heapq.heappush(self._events, (when, next(self._seq), dest,
                                      partial(self._arrive, conn, conn.incarnation, dest, msg, on_delivery)))

    def _arrive(self, conn: Connection, incarnation: int, dest: str, msg: Message, on_delivery) -> None:
        if conn.incarnation != incarnation:
            return  # lost with the connection
        if msg.arrays:
            msg.arrays = [_frozen(a) for a in msg.arrays]
        if on_delivery is not None:
            on_delivery()
        proc = self.processes.get(dest)
        if proc is not None and proc.alive:
            self.messages += 1
            if msg.op not in _NOT_WORK:
                self.last_work = self.now
            proc.deliver(conn, msg)

    def due(self, fn: Callable[[], None], until: float) -> bool:
        """Whether ``fn`` is scheduled to run by ``until``."""
        return any(when <= until and f == fn for when, _, _, f in self._events)

    def work_in_flight(self) -> bool:
        """Whether a message other than a heartbeat or an answer is on its way (or waits
        for a partition to heal)."""
        for event in self._events:
            fn = event[3]
            if type(fn) is partial and fn.func == self._arrive and fn.args[3].op not in _NOT_WORK:
                return True
        return any(msg.op not in _NOT_WORK for conn in self.connections.values()
                   for waiting in conn.waiting.values() for msg, _ in waiting)

    def drop(self, conn: Connection) -> None:
        """The connection breaks: everything in flight is lost; both ends are told."""
        conn.incarnation += 1
        for direction in ("up", "down"):
            for _msg, on_delivery in conn.waiting[direction]:
                if on_delivery is not None:
                    on_delivery()
            conn.waiting[direction] = []
        self.note(f"drop {conn.client}<->{conn.server}")
        for name in (conn.client, conn.server):
            proc = self.processes.get(name)
            if proc is not None and proc.alive:
                proc.connection_lost(conn)

    def partition(self, a: str, b: str, both: bool = True) -> None:
        self.blocked.add((a, b))
        if both:
            self.blocked.add((b, a))
        self.note(f"partition {a} {'<->' if both else '->'} {b}")

    def heal(self) -> None:
        """Every cut direction opens: the messages that waited go through, in order."""
        self.blocked.clear()
        for conn in list(self.connections.values()):
            for direction in ("up", "down"):
                waiting, conn.waiting[direction] = conn.waiting[direction], []
                sender = conn.client if direction == "up" else conn.server
                for msg, on_delivery in waiting:
                    self._schedule(conn, direction, conn.other(sender), msg, on_delivery)
        self.note("heal")


#: messages that are not progress: liveness, a worker's poll of the ring while it waits,
#: and answers (which follow a request)
_NOT_WORK = frozenset({"heartbeat", "peer_ping", "get_ring", "ok", "error"})


def _frozen(a: np.ndarray) -> np.ndarray:
    """A payload as the receiver gets it: a read-only array of its own (one that already
    is, say a forward of what was received, goes as it is: nothing can change it)."""
    if a.base is None and not a.flags.writeable:
        return a
    out = a.copy()
    out.setflags(write=False)  # (a third of the cost of ``out.flags.writeable = False``)
    return out

"""One simulated run: a cluster built from the real cores, a workload, faults from the
seed, and the invariants checked as it goes and at the end.

``simulate(seed)`` returns an ``Outcome``; its ``violations`` are empty when every
invariant held:

* no acknowledged push lost, none applied twice (each push adds its own bit pattern to
  its keys: ``1 << 2*slot``, so a key's value names exactly the pushes applied to it, and
  a push applied twice shows as a carry into the slot's second bit);
* the copies of every range agree once the run has settled (replicas converge);
* every pull sees what the consistency model promises: under ``eventual`` a worker's pull
  of its own keys sees exactly its pushes issued before it (all of them, and none after;
  one whose answer was lost with its connection and asked again, or that was sent again
  to a new owner, may see later ones: they can reach the new owner as forwards or in a
  range copy before it);
  under ``bounded`` (tau) it sees every push made at clocks < c - tau; under
  ``sequential`` exactly the pushes made at clocks < c;
* clocks and ring versions never go back on any node.

With ``bounded`` the table evicts (``max_rows``: a few rows per server), so acked pushes
may be gone by design: then no push is applied twice or invented, the copies of every
range hold the same rows once settled (a replica deletes what its primary evicted, at
the same point of the push sequence: ``evict`` records), and pulls see only pushes
they may.

The same seed gives the same run: a failing seed replays exactly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from psd.cluster.liveness import State
from psd.cluster.rows import Rows
from psd.codec import Message
from psd.config import ClusterConfig
from psd.core import ids
from psd.core.ring_changes import unavailable
from psd.errors import ConfigError
from psd.filters.pull import build_pull
from psd.schema import TableSpec
from psd.sim.nodes import SCHEDULER, SimScheduler, SimServer, SimWorker
from psd.sim.world import World

TABLE = TableSpec("sim", 1, "int64", "sum")
#: the table of ``Settings.bounded`` runs: evictions in every run
BOUNDED_TABLE = TableSpec("simb", 1, "int64", "sum", {"max_rows": 3})
#: the pull filters of ``Settings.pull_filters``: lossless, so the invariants stay exact
PULL_LOSSLESS = build_pull([{"significant": {"threshold": 0}}, "sparse"], "int64", 1)
#: the faults a run draws from (drops twice as likely as the others)
FAULTS = ("kill", "stall", "stall_long", "cut_scheduler", "cut_server_from_scheduler", "cut_server", "one_way",
          "drop", "drop", "join", "stall_scheduler", "cut_worker")
#: pushes to one key (each takes two bits of an int64: bits 2*slot and 2*slot + 1)
SLOTS = 31


@dataclass(frozen=True)
class Pace:
    """When things happen in a run, in virtual seconds: the workload's span and density,
    when faults are drawn and how long each lasts. Ranges are (low, high) of a uniform
    draw; a pace changes only these bounds, never which draws are made, so two paces
    make the same calls on the seed's generator."""

    start: float                     # the first worker starts (the others 0.05 s apart)
    step: tuple[float, float]        # a worker's gap between two steps
    duration: float                  # workload and faults; everything heals at its end
    tail: float                      # workload after the heal
    faults_from: float               # faults fall in [faults_from, duration - 0.1]
    stall: tuple[float, float]
    stall_long: tuple[float, float]  # past the failure timeout (heartbeat 0.1 s x 4 misses)
    stall_scheduler: tuple[float, float]
    cut: tuple[float, float]         # a partition of one process, or of the scheduler, heals after
    one_way: tuple[float, float]
    cut_worker: tuple[float, float]
    restart: tuple[float, float]     # a killed server's successor joins after
    retry: float                     # a worker's create_table, refused before every server joined, again after


#: the pace of every run until decision 136: 1.5 s of workload from 0.3 s, faults from
#: 0.45 s, 0.5 s of tail. The seeds that found bugs (tests/test_sim.py FOUND_SEEDS) and
#: the tests that name seeds of their own replay on it.
LONG = Pace(start=0.3, step=(0.004, 0.05), duration=1.5, tail=0.5, faults_from=0.45, stall=(0.05, 0.6),
            stall_long=(1.0, 2.5), stall_scheduler=(0.3, 2.0), cut=(0.5, 3.0), one_way=(0.3, 2.0),
            cut_worker=(0.5, 2.0), restart=(0.5, 1.5), retry=0.2)
#: the suite's pace (decision 136): the same kinds of fault and about as many steps
#: (denser, from 0.05 s: the first ring settles by 0.03 s), faults over [0.15, 0.7] s,
#: shorter stalls, cuts and restarts (a long stall still outlasts the failure timeout):
#: less virtual time, so fewer heartbeats, pings and ticks a seed
SHORT = Pace(start=0.05, step=(0.0025, 0.031), duration=0.8, tail=0.3, faults_from=0.15, stall=(0.05, 0.6),
             stall_long=(0.6, 1.2), stall_scheduler=(0.3, 1.2), cut=(0.3, 1.5), one_way=(0.2, 1.0),
             cut_worker=(0.3, 1.0), restart=(0.3, 0.8), retry=0.05)
PACES = {"long": LONG, "short": SHORT}


@dataclass
class Settings:
    servers: int = 3
    workers: int = 2
    replication: int = 2
    consistency: str = "eventual"
    max_delay: int = 1
    #: when things happen (PACES: "short", the suite's, or "long", the pace before it)
    pace: str = "short"
    settle: float = 4.0         # seconds after the workload, with every fault healed, at most
    keys_per_worker: int = 6
    outstanding: int = 6        # requests a worker keeps in flight at most
    faults: bool | tuple[str, ...] = True  # True: any kind (FAULTS); or only these kinds
    #: workers name key lists they sent before by signature (key caching), from one key
    #: on (the daemons: from KC_MIN_KEYS), to servers that keep six lists: evictions bring
    #: misses. Off by default: it changes the random schedule of every seed
    #: (tests/test_sim.py runs it on seeds of its own)
    key_caching: bool = False
    #: the workload's table evicts (BOUNDED_TABLE); off by default, like key_caching
    bounded: bool = False
    #: pulls go through the lossless pull filters (significant with threshold 0, sparse):
    #: answers are deltas against each worker's copy, tied by tokens that drops, kills and
    #: ring changes break; every pull must still read exactly what the model allows
    pull_filters: bool = False
    #: workers also push and pull dense spans of a region of consecutive keys, one block
    #: each (psd/sim/spans.py): the requests that make dense runs, which the store lends
    #: zero-copy. Off by default, like key_caching (tests/test_sim.py runs seeds of its own)
    spans: bool = False
    #: keys a push holds at most (drawn from the worker's ``keys_per_worker``): more keys,
    #: more pushes that span several owner groups of one server (decision 97)
    push_keys: int = 3
    #: count the in-flight states of one message per server the servers meet
    #: (``Outcome.states``); off by default: it regroups every data message
    count_states: bool = False
    #: where replicas go (ClusterConfig.placement): "chained" gives each server's ranges
    #: the same replicas, so a death promotes one successor for all of them and the
    #: chains of its neighbours shift (settings_for runs it on some seeds)
    placement: str = "spread"
    #: half the pushes go as a ``pushpull`` of their keys (the pull part checked as a
    #: pull issued right after the push). Off by default: it changes the random schedule
    pushpull: bool = False
    #: those pushpulls go as an older client's, without ``meta.pull_refusable``: a server
    #: holds one whole while its pull part waits, and refuses it whole ``not_owner`` if a
    #: ring change took its rows meanwhile (decision 143); the worker re-cuts and resends
    older_pushpull: bool = False
    #: a BSP workload: each worker pushes, clocks and pulls, and starts its next iteration
    #: only once both are answered; once the workload stops, each worker still waiting
    #: ends its iteration (one more clock) when answered (with checkpoints, every worker
    #: clocks on to one final clock: ``Run._final_clock``). With it, ``check_end`` checks
    #: liveness: no pull waits more than ``bsp_bound`` seconds past the heal (decision 138).
    #: Off by default: it changes the random schedule of every seed
    bsp: bool = False
    bsp_bound: float = 2.5
    #: an admin asks for checkpoints at moments of the workload (and, in half the seeds,
    #: the scheduler's timer takes them too), written to a folder of the run's own; each
    #: one with a manifest is checked to be the consistent cut it promises
    #: (psd/sim/checkpoints.py). Off by default: it changes the random schedule
    checkpoints: bool = False
    #: with ``checkpoints``: once a checkpoint has a manifest, a server dies, and with it
    #: (at replication above 1) the other owners of one range it leads; at replication 1
    #: the mix's, it dies with the only copy of its ranges. The scheduler gives them up after
    #: ``restore_unavailable_after`` and restores its ranges from the newest checkpoint
    #: (the checker then allows exactly the acked pushes only the dead copy held to be lost)
    restore: bool = False

    def config(self) -> ClusterConfig:
        return ClusterConfig(security="none", heartbeat_interval=0.1, heartbeat_misses=4, worker_timeout=4.0,
                             request_timeout=8.0, replication=self.replication, vnodes=4,
                             placement=self.placement,
                             consistency=self.consistency, max_delay=self.max_delay,
                             num_workers=self.workers if self.consistency != "eventual" else 0)


@dataclass
class PushRecord:
    worker: int
    keys: np.ndarray
    slots: list[int]
    clock: int
    issued: float
    order: int
    outcome: str = "pending"    # acked | failed | pending


@dataclass
class PullRecord:
    worker: int
    keys: np.ndarray
    clock: int
    issued: float
    order: int
    values: np.ndarray | None = None
    answered: float | None = None
    error: str | None = None
    reread: bool = False       # sent again after its connection dropped (may see later pushes)
    rerouted: bool = False     # sent again to a new owner (sequential: may see its own clock's)


@dataclass
class Outcome:
    seed: int
    settings: Settings
    violations: list[str] = field(default_factory=list)
    pushes: int = 0
    acked: int = 0
    pulls: int = 0
    messages: int = 0
    faults: list[str] = field(default_factory=list)
    #: the span workload's counts (``Settings.spans``: Spans.counts)
    spans: dict = field(default_factory=dict)
    #: the workers' key-caching counts (ClientCore.kc_counters, summed)
    kc: dict = field(default_factory=dict)
    pf: dict = field(default_factory=dict)  # the workers' pull-filter counts (Settings.pull_filters)
    #: rows evicted by primaries and deleted by replicas on their word (bounded runs)
    evicted: int = 0
    evicted_by_primary: int = 0
    #: in-flight states the servers met (SimServer.states, summed)
    states: dict = field(default_factory=dict)
    #: checkpoints asked, taken and failed (``Settings.checkpoints``: Checkpoints.check)
    checkpoints: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def describe(self) -> str:
        head = (f"seed {self.seed}: {len(self.violations)} violation(s); {self.pushes} pushes ({self.acked} acked), "
                f"{self.pulls} pulls, {self.messages} messages; faults: {', '.join(self.faults) or 'none'}")
        if self.spans:
            head += f"; spans: {self.spans['pushes']} pushes ({self.spans['acked']} acked), {self.spans['pulls']} pulls"
        return "\n".join([head, *self.violations[:10]])


class Run:
    def __init__(self, seed: int, settings: Settings):
        ids.reseed(seed)  # request ids and epochs too: the run replays exactly
        self.seed = seed
        self.s = settings
        if settings.pace not in PACES:
            raise ConfigError(f"Settings.pace: expected one of {sorted(PACES)}, got {settings.pace!r}")
        self.pace = PACES[settings.pace]
        self.table = BOUNDED_TABLE if settings.bounded else TABLE
        self.world = World(seed)
        self.rng = self.world.rng
        self.config = settings.config()
        self.outcome = Outcome(seed, settings)
        self.checkpoints = None
        #: key -> push slots allowed lost (acked, held only by a copy that died; Settings.restore)
        self.lost_ok: dict[int, set[int]] = {}
        #: key -> (time, node) of each eviction of its row (``Settings.bounded``): a row
        #: evicted may lack pushes it held (``Run._recording_evictions``)
        self.evictions: dict[int, list[tuple[float, str]]] = {}
        if settings.restore and not settings.checkpoints:
            raise ConfigError("Settings.restore: needs checkpoints=True")
        if settings.checkpoints:
            from psd.sim.checkpoints import Checkpoints  # (it builds on this module)
            self.checkpoints = Checkpoints(self)
            self.config = self.checkpoints.configure(self.config)
        self.scheduler = SimScheduler(self.world, self.config)
        self.scheduler.files = self.checkpoints
        self.servers: list[SimServer] = []
        self.workers: list[SimWorker] = []
        self.pushes: list[PushRecord] = []
        self.pulls: list[PullRecord] = []
        self.slots: dict[int, int] = {}  # key -> slots used
        self.keys = [np.sort(np.unique(np.array([self.rng.getrandbits(64) for _ in range(settings.keys_per_worker)],
                                                dtype=np.uint64))) for _ in range(settings.workers)]
        self.owner = {int(k): w for w, ks in enumerate(self.keys) for k in ks.tolist()}
        self._key_lists = [ks.tolist() for ks in self.keys]  # (the workload draws from lists)
        self._all_keys = [k for ks in self._key_lists for k in ks]
        self._order = 0
        self._inflight: dict[tuple[int, int], object] = {}
        self._cores: dict[str, _Watched] = {}  # process name -> what check_step reads
        self._seen_clocks: dict[tuple, int] = {}
        self.workload_on = True
        self.dead_workers: set[str] = set()
        #: BSP, the workload over: the workers whose last clock is still to come
        self.ending: set[int] = set()
        #: workers that leave at their next idle step (the ``leave_then_join`` fault), and
        #: those that left
        self.leaving: set[int] = set()
        self.left: set[int] = set()
        self.killed = 0
        self.spans = None
        if settings.spans:
            from psd.sim.spans import Spans  # (it builds on this module's records)
            self.spans = Spans(self)

    # -- the cluster -----------------------------------------------------------------
    def start(self) -> None:
        self.scheduler.start()
        for _ in range(self.s.servers):
            self.add_server()
        for w in range(self.s.workers):
            worker = SimWorker(self.world, f"wrk-{w}", self.config)
            worker.core.key_caching, worker.core.kc_min_keys = self.s.key_caching, 1
            worker.core.pull_refusable = not self.s.older_pushpull
            self.workers.append(worker)
            worker.on_done = lambda ts, result, error, w=w: self._done(w, ts, result, error)
            worker.on_ready = lambda w=w: self._ready(w)
            self.world.after(self.pace.start + 0.05 * w, worker.start, None)

    def add_server(self) -> SimServer:
        server = SimServer(self.world, f"srv-{len(self.servers)}", self.config)
        server.count_states = self.s.count_states
        server.files = self.checkpoints
        if self.s.bounded:
            server.core.table_factory = partial(self._recording_evictions, server, server.core.table_factory)
        self.servers.append(server)
        server.start()
        return server

    def _recording_evictions(self, server: SimServer, make, spec: TableSpec, usage):
        """``server``'s table, made by ``make``, whose evictions go to ``Run.evictions``:
        the only record of which rows a bounded table dropped by its own decision."""
        table = make(spec, usage)
        evict = table.evict

        def recorded() -> np.ndarray:
            keys = evict()
            for k in keys.tolist():
                self.evictions.setdefault(k, []).append((self.world.now, server.core.node_id))
            return keys
        table.evict = recorded
        return table

    # -- the workload ---------------------------------------------------------------
    def workload_keys(self) -> list[int]:
        """Every key the workload pushes: the random keys, and the span region's."""
        return list(self.owner) + (self.spans.region() if self.spans is not None else [])

    def _ready(self, w: int) -> None:
        worker = self.workers[w]

        def created(reply: Message) -> None:
            if reply.op != "ok":  # (the servers were not all there yet)
                self.world.after(self.pace.retry, lambda: self._ready(w), worker.name)
                return
            self.world.after(0.01, lambda: self._step(w), worker.name)
        worker.caller.request(self.world, worker._link(), worker.name,
                              Message("create_table", meta={"spec": self.table.to_wire()}), created, worker.core.node_id)

    def _step(self, w: int) -> None:
        worker = self.workers[w]
        if not self.workload_on or not worker.alive:
            return
        busy = sum(1 for (who, _) in self._inflight if who == w)
        if w in self.leaving and busy == 0:  # (a job's worker that is done: it leaves for good)
            self.leaving.discard(w)
            self.left.add(w)
            worker.close()
            return
        if self.s.bsp:
            if busy == 0:  # (the last iteration's push and pull answered: the next one)
                self._push(w)
                worker.clock()
                self._order += 1
                self._pull(w, own=False)
        elif busy < self.s.outstanding:
            roll = self.rng.random()
            if roll < 0.45:
                self._push(w, pull=self.s.pushpull and self.rng.random() < 0.5)
            elif roll < 0.75:
                self._pull(w, own=self.rng.random() < 0.5)
            else:
                worker.clock()
                self._order += 1
        self.world.after(self.rng.uniform(*self.pace.step), lambda: self._step(w), worker.name)

    def _last_clock(self, w: int, final: int = 0) -> None:
        """BSP, the workload over: the worker ends its iteration once its push and pull
        are answered (its pull may be what the others' pulls wait for), and stops; with
        ``final``, it clocks on to that clock, as a job of a fixed number of iterations
        ends every worker at one clock (``_final_clock``)."""
        worker = self.workers[w]
        if not worker.alive or w in self.left:
            return
        if any(who == w for (who, _) in self._inflight):
            self.ending.add(w)
            self.world.after(0.02, lambda: self._last_clock(w, final), worker.name)
            return
        self.ending.discard(w)
        for _ in range(max(1, final - worker.core.clock_value)):
            worker.clock()
            self._order += 1

    def _final_clock(self) -> int:
        """BSP with checkpoints: the clock every worker ends at, one past the furthest.
        A cut waits for every worker to reach it, and meanwhile holds the pushes at or
        past it, and the pulls of their workers (decision 20); a workload stopped by
        time leaves a worker behind the others, idle below a cut one of them pushed
        past, and the other's pull of its own held push then waits for the cut's
        timeout. A real job runs every worker to its last iteration."""
        if self.checkpoints is None:
            return 0
        return 1 + max(worker.core.clock_value for worker in self.workers)

    def _push(self, w: int, pull: bool = False) -> None:
        """A push of a few of the worker's keys, each to a fresh slot; ``pull``: as a
        pushpull, whose pull part counts as a pull issued just after the push."""
        worker = self.workers[w]
        if self.spans is not None and self.spans.wants():
            return self.spans.push(w)
        mine = [k for k in self._key_lists[w] if self.slots.get(k, 0) < SLOTS]
        if not mine:
            return
        chosen = sorted(self.rng.sample(mine, self.rng.randint(1, min(self.s.push_keys, len(mine)))))
        slots = []
        for k in chosen:
            slots.append(self.slots.get(k, 0))
            self.slots[k] = slots[-1] + 1
        keys = np.array(chosen, dtype=np.uint64)
        values = np.array([[1 << (2 * s)] for s in slots], dtype=np.int64)
        self._order += 1
        rec = PushRecord(w, keys, slots, worker.core.clock_value, self.world.now, self._order)
        self.pushes.append(rec)
        if not pull:
            ts = worker.issue("push", self.table, Rows(keys=keys, values=values))
            self._inflight[(w, ts)] = rec
            return
        self._order += 1
        back = PullRecord(w, keys, rec.clock, self.world.now, self._order)
        self.pulls.append(back)
        ts = worker.issue("pushpull", self.table, Rows(keys=keys, values=values))
        self._inflight[(w, ts)] = (rec, back)

    def _pull(self, w: int, own: bool) -> None:
        worker = self.workers[w]
        if self.spans is not None and self.spans.wants():
            return self.spans.pull(w, own)
        pool = self._key_lists[w] if own else self._all_keys
        n = self.rng.randint(1, min(6, len(pool)))
        keys = np.array(sorted(set(self.rng.sample(pool, n))), dtype=np.uint64)
        self._order += 1
        rec = PullRecord(w, keys, worker.core.clock_value, self.world.now, self._order)
        self.pulls.append(rec)
        rows = Rows(keys=keys, meta={"pf": PULL_LOSSLESS} if self.s.pull_filters else None)
        ts = worker.issue("pull", self.table, rows)
        self._inflight[(w, ts)] = rec

    def _done(self, w: int, ts: int, result, error, rec=None) -> None:
        rec = rec if rec is not None else self._inflight.pop((w, ts), None)
        if rec is None:
            return
        if isinstance(rec, tuple):  # a pushpull: its push, then its pull
            self._done(w, ts, None, error, rec[0])
            rec = rec[1]
        if isinstance(rec, PushRecord):
            rec.outcome = "acked" if error is None else "failed"
        else:
            rec.answered = self.world.now
            if error is None:
                rec.values = np.array(result).reshape(-1).copy()
                core = self.workers[w].core
                rec.reread = ts in core.reread
                rec.rerouted = ts in core.rerouted
            else:
                rec.error = str(error)

    # -- faults -----------------------------------------------------------------------
    def plan_faults(self) -> None:
        """A few faults at times the seed picks, healed before the run settles."""
        if not self.s.faults:
            return
        rng, end = self.rng, self.pace.duration
        kinds = FAULTS if self.s.faults is True else tuple(self.s.faults)
        for _ in range(rng.randint(1, 3)):
            at = rng.uniform(self.pace.faults_from, end - 0.1)
            kind = rng.choice(kinds)
            self.world.at(at, lambda kind=kind: self._fault(kind), None)
        self.world.at(end, self.world.heal, None)

    def _fault(self, kind: str) -> None:
        w, rng, pace = self.world, self.rng, self.pace
        live = [s for s in self.servers if s.alive and s.name in w.processes]
        if not live:
            return
        victim = rng.choice(live)
        self.outcome.faults.append(f"{kind}@{w.now:.2f}")
        if kind == "kill":
            if self.killed < self.s.replication - 1 and len(live) > 1:
                self.killed += 1
                w.kill(victim.name)
                victim.alive = False
                w.after(rng.uniform(*pace.restart), self.add_server, None)
        elif kind == "kill_mid_forward":  # (not among FAULTS: only where a test asks for it)
            if self.killed < self.s.replication - 1 and len(live) > 1:
                self.killed += 1

                def die(victim=victim) -> None:
                    w.kill(victim.name)
                    victim.alive = False
                    self.outcome.faults.append(f"died mid-forward@{w.now:.2f}")
                    w.after(rng.uniform(*pace.restart), self.add_server, None)
                victim.die_mid_forward = die
        elif kind == "leave_then_join":  # (not among FAULTS: only where a test asks for it)
            # a worker leaves once its iteration is answered; a server joins later, and must
            # not wait for the worker's clock (the scheduler told only the servers live then)
            self.leaving.add(rng.randrange(len(self.workers)))
            w.after(rng.uniform(*pace.restart), self.add_server, None)
        elif kind == "stall":
            w.stall(victim.name, rng.uniform(*pace.stall))
        elif kind == "stall_long":
            w.stall(victim.name, rng.uniform(*pace.stall_long))
        elif kind == "stall_scheduler":
            w.stall(SCHEDULER, rng.uniform(*pace.stall_scheduler))
        elif kind == "cut_scheduler":
            for other in w.processes:
                if other != SCHEDULER:
                    w.partition(SCHEDULER, other)
            w.after(rng.uniform(*pace.cut), w.heal, None)
        elif kind == "cut_server_from_scheduler":
            w.partition(victim.name, SCHEDULER)
            w.after(rng.uniform(*pace.cut), w.heal, None)
        elif kind == "cut_server":
            for other in w.processes:
                if other != victim.name:
                    w.partition(victim.name, other)
            w.after(rng.uniform(*pace.cut), w.heal, None)
        elif kind == "one_way":
            other = rng.choice([p for p in w.processes if p != victim.name])
            w.partition(victim.name, other, both=False)
            w.after(rng.uniform(*pace.one_way), w.heal, None)
        elif kind == "drop":
            conns = [c for c in w.connections.values()]
            if conns:
                w.drop(rng.choice(conns))
        elif kind == "join":
            self.add_server()
        elif kind == "cut_worker":
            worker = rng.choice(self.workers)
            w.partition(worker.name, SCHEDULER)
            w.after(rng.uniform(*pace.cut_worker), w.heal, None)

    # -- invariants --------------------------------------------------------------------
    def check_step(self, owner: str, proc) -> None:
        """What must hold after every step of the process that acted: its ring version and
        the worker clocks it knows never go back. Incremental: a gate's clocks are read
        only when their change count moved, and a process's core is looked up once."""
        if self.checkpoints is not None:
            if owner == SCHEDULER:
                if self.checkpoints.restore_check is not None:
                    self.checkpoints.restore_check.watch()
            elif isinstance(proc, SimServer) and proc.alive:
                self.checkpoints.watch_hold(proc)
        if not proc.alive:  # (killed by the step: gone from the world; or closed, and still in it)
            proc = self.world.processes.get(owner)
        core = self._cores.get(owner)
        if core is None or core.proc is not proc:
            core = self._cores[owner] = _Watched(proc, core.ring if core is not None else 0)
        if core.watch is None:
            return
        version = core.watch.ring.version
        if version != core.ring:
            if version < core.ring:
                self.violate(f"{owner} went from ring v{core.ring} back to v{version}")
            core.ring = version
        gate = core.gate
        if gate is None:
            return
        changes = core.changes
        for setting, policy in gate.policies.items():
            if changes.get(id(policy)) == policy.clocks.changes:  # (the core keeps its policies)
                continue
            changes[id(policy)] = policy.clocks.changes
            for worker, clock in policy.clocks.clocks().items():
                k = (owner, setting, worker)
                seen = self._seen_clocks.get(k, 0)
                if clock < seen:
                    self.violate(f"{owner}: {worker}'s clock went from {seen} back to {clock}")
                else:
                    self._seen_clocks[k] = clock

    def violate(self, what: str) -> None:
        if len(self.outcome.violations) < 50:
            self.outcome.violations.append(f"t={self.world.now:.4f}: {what}")

    def check_live(self) -> None:
        """BSP: every pull of a live worker is answered within ``bsp_bound`` seconds of
        when it was issued or of the heal, whichever is later (a held pull that nothing
        will release stalls its worker for good: decision 138). With ``Settings.restore``,
        or of the last restore before its answer: until then a range had no copy by design,
        and every worker may wait for one waiting for it."""
        restores = sorted(entry["time"] for entry in self.scheduler.core.restored)
        for rec in self.pulls:
            end = rec.answered if rec.answered is not None else self.world.now
            start = max([rec.issued, self.healed_at] + [t for t in restores if t <= end])
            took = end - start
            if (rec.error or "").startswith("connection closed"):
                self.violate(f"liveness: pull #{rec.order} of worker {rec.worker} at clock {rec.clock} "
                             f"(issued t={rec.issued:.3f}) was still unanswered when its worker left")
            elif took > self.s.bsp_bound:
                self.violate(f"liveness: pull #{rec.order} of worker {rec.worker} at clock {rec.clock} "
                             f"(issued t={rec.issued:.3f}) waited {took:.2f}s past the heal "
                             f"({rec.error or ('answered' if rec.answered is not None else 'unanswered')})")

    def check_end(self) -> None:
        s = self.scheduler.core.state
        ring = s.ring
        servers = {srv.core.node_id: srv for srv in self.servers if srv.alive and srv.name in self.world.processes}
        dead_workers = {w for w, p in s.liveness.peers.items() if p.role == "worker" and p.state == State.DEAD}
        acked: dict[int, set[int]] = {}
        issued: dict[int, set[int]] = {}
        for p in self.pushes:
            for k, slot in zip(p.keys.tolist(), p.slots):
                issued.setdefault(k, set()).add(slot)
                if p.outcome == "acked":
                    acked.setdefault(k, set()).add(slot)
        for k in sorted(issued):
            owners = ring.owners_at(k)
            copies = {}
            for node in owners:
                srv = servers.get(node)
                if srv is None:
                    continue
                table = srv.core.tables.get(self.table.name)
                if table is None:
                    self.violate(f"{node} owns key {k} but has no table")
                    continue
                if any(r.begin <= k < r.end for r in srv.core.incoming):
                    continue  # still being copied in
                copies[node] = int(table.pull(np.array([k], np.uint64))[0, 0])
            if not copies:
                if acked.get(k) and any(n in servers for n in owners) and not self.s.bounded:
                    self.violate(f"key {k}: no live owner answered, though acked pushes went to it")
                continue
            for node, value in copies.items():
                self._check_copy(k, node, value, acked.get(k, set()), issued.get(k, set()), owners, ring)
            if len(set(copies.values())) > 1:
                self.violate(f"key {k}: copies disagree: {copies}")
        if self.spans is not None:
            self.spans.check_copies(ring, servers)
        self._check_pulls(dead_workers)

    def _check_copy(self, k: int, node: str, value: int, acked: set[int], issued: set[int], owners, ring) -> None:
        """One live owner's copy of key ``k`` once settled: each acked push slot in it
        once, and no slot that was never pushed."""
        applied, doubled = _decode(value)
        if doubled:
            self.violate(f"key {k} on {node}: push slot(s) {sorted(doubled)} applied more than once")
        lost = acked - applied - self.lost_ok.get(k, set())
        if lost and not self.s.bounded:  # (a bounded table evicts acked pushes)
            self.violate(f"key {k} on {node}: acked push slot(s) {sorted(lost)} lost "
                         f"(owners {owners}, ring v{ring.version})")
        extra = applied - issued
        if extra:
            self.violate(f"key {k} on {node}: slot(s) {sorted(extra)} applied but never pushed")

    def _check_pulls(self, dead_workers: set[str]) -> None:
        worker_id = {i: w.core.node_id for i, w in enumerate(self.workers)}
        # each key's pushes once, as (slot, order, issued, clock, acked): not per pull
        to_key: dict[int, list[tuple[int, int, float, int, bool]]] = {}
        for p in self.pushes:
            acked = p.outcome == "acked"
            for k, s in zip(p.keys.tolist(), p.slots):
                to_key.setdefault(k, []).append((s, p.order, p.issued, p.clock, acked))
        for pull in self.pulls:
            if pull.values is None:
                continue
            for k, value in zip(pull.keys.tolist(), pull.values.tolist()):
                self._check_read(pull, k, value, to_key.get(k, ()), self.owner[k], worker_id, dead_workers)
        if self.spans is not None:
            self.spans.check_pulls(worker_id, dead_workers)

    def _check_read(self, pull: PullRecord, k: int, value: int, pushes, owner: int, worker_id: dict,
                    dead_workers: set[str]) -> None:
        """What pull ``pull`` read of key ``k`` (``value``) against the model: ``pushes``
        are the key's (slot, order, issued, clock, acked); ``owner`` the worker pushing it."""
        cons, tau = self.s.consistency, self.s.max_delay
        applied, doubled = _decode(value)
        if doubled:
            self.violate(f"a pull by worker {pull.worker} saw push slot(s) {sorted(doubled)} of key {k} "
                         f"applied more than once")
        must: set[int] = set()
        may: set[int] = {s for s, _, issued, _, _ in pushes if issued <= pull.answered}
        if owner == pull.worker and cons != "sequential":  # (under it, own pushes as everyone's)
            before = [x for x in pushes if x[1] < pull.order]
            must |= {s for s, _, _, _, acked in before if acked}
            if cons == "eventual" and not pull.reread and not pull.rerouted:
                may = {x[0] for x in before}
        if cons in ("bounded", "sequential") and worker_id[owner] not in dead_workers:
            bound = pull.clock - (tau if cons == "bounded" else 0)
            must |= {s for s, _, _, clock, acked in pushes if clock < bound and acked}
            if cons == "sequential" and not pull.rerouted and not pull.reread:
                may &= {s for s, _, _, clock, _ in pushes if clock < pull.clock}
        if self.s.bounded:
            must = set()  # (evicted rows read zero)
        elif self.lost_ok:
            must -= self.lost_ok.get(k, set())
        if not must <= applied:
            self.violate(f"pull #{pull.order} by worker {pull.worker} at clock {pull.clock} ({cons}) missed "
                         f"push slot(s) {sorted(must - applied)} of key {k}: saw {sorted(applied)}")
        if not applied <= may:
            self.violate(f"pull #{pull.order} by worker {pull.worker} at clock {pull.clock} ({cons}) saw "
                         f"push slot(s) {sorted(applied - may)} of key {k} it may not see: saw "
                         f"{sorted(applied)}, allowed {sorted(may)}")

    def quiet(self) -> bool:
        """Nothing left to happen but heartbeats: no ring change running or left to finish,
        every live server at the scheduler's ring, and every request answered, or only
        pulls held by the gate for clocks that will not come until the workers leave
        (nothing queued or in flight, no process stalled), or nothing but heartbeats for a
        second with no process stalled (a second is over twice the failure timeout).
        BSP: never while a live worker's last clock is still to come (``_last_clock``):
        the pulls the others' gates hold may wait for exactly that clock."""
        w = self.world
        if any(self.workers[i].alive for i in self.ending):
            return False
        if any(wk.core.requests or wk.core.queue for wk in self.workers if wk.alive) and not self._held_only() and \
                (w.now - w.last_work < 1.0 or any(until > w.now for until in w.stalled_until.values())):
            return False
        if self.checkpoints is not None and self.checkpoints.running():
            return False
        return self._ring_settled()

    def _held_only(self) -> bool:
        """What the workers wait for is pulls a server holds: each worker's unanswered
        requests are pulls, it has nothing queued, to retry or to ask, and nothing but
        heartbeats and answers is in flight, with no process stalled. With
        ``Settings.restore``, none is sent to a dead server: a range it alone held waits
        for the restore, and its pull goes again once its worker polls the next ring
        (``RING_POLL``); without it the schedules stay those of the suite."""
        w = self.world
        dead = {srv.core.node_id for srv in self.servers if not srv.alive} if self.s.restore else set()
        for wk in self.workers:
            core = wk.core
            if wk.alive and (core.queue or core.retries or core.awaiting_ring or wk.asking_ring
                             or any(r.op != "pull" for r in core.requests.values())
                             or any(p.server in dead for p in core.sent.values())):
                return False
        return not any(until > w.now for until in w.stalled_until.values()) and not w.work_in_flight()

    def _ring_settled(self) -> bool:
        """No ring change running or left to finish, every live server at the scheduler's
        ring, and (``Settings.restore``) no range without a live copy: the scheduler will
        restore it (requests for its keys wait for that)."""
        core = self.scheduler.core
        if core.ring_changes.busy or core.ring_changes.unfinished or not self.scheduler.alive:
            return False
        live = set(core.state.live("server"))
        if self.s.restore and (core.ring_changes.restoring or unavailable(core.state.ring, live)):
            return False
        servers = [srv for srv in self.servers if srv.alive and srv.core.node_id in live]
        return len(servers) == len(live) and all(srv.core.ring.version == core.ring.version and not srv.core.incoming
                                                 for srv in servers)

    def closed(self, until: float) -> bool:
        """Every worker has left (its ``leave`` answered once every server was told, or
        given up on), no server is due to join by ``until``, the ring has settled, nothing
        but heartbeats and answers is in flight, the scheduler waits for no answer and no
        process is stalled: what a longer close would add is heartbeats."""
        w = self.world
        return (not any(wk.alive for wk in self.workers) and not self.scheduler.tokens
                and not any(stall > w.now for stall in w.stalled_until.values())
                and not w.due(self.add_server, until) and self._ring_settled() and not w.work_in_flight())

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Outcome:
        try:
            return self._run()
        finally:
            if self.checkpoints is not None:
                self.checkpoints.close()

    def _run(self) -> Outcome:
        self.start()
        self.plan_faults()
        if self.checkpoints is not None:
            self.checkpoints.plan()
        end = self.pace.duration + self.pace.tail
        self.world.run(end, self.check_step)
        self.workload_on = False
        self.world.heal()
        settle = self.s.settle
        if self.checkpoints is not None:
            settle = self.checkpoints.workload_over(settle)
        if self.s.bsp:
            self.healed_at = self.world.now
            final = self._final_clock()
            for w in range(len(self.workers)):
                self._last_clock(w, final)
        settled = end + settle
        t = end
        while t < settled:  # (until every request is answered and the ring has settled)
            t = min(settled, t + 0.05)
            self.world.run(t, self.check_step)
            if self.quiet():
                break
        for worker in self.workers:
            if worker.alive:
                worker.close()
        closing = self.world.now + 1.0
        while self.world.now < closing:  # (until every worker has left, and a little more)
            self.world.run(min(closing, self.world.now + 0.05), self.check_step)
            if self.closed(closing):
                self.world.run(min(closing, self.world.now + 0.1), self.check_step)
                break
        if self.checkpoints is not None:
            self.checkpoints.before_end()
        self.check_end()
        if self.s.bsp:
            self.check_live()
        if self.checkpoints is not None:
            self.outcome.checkpoints = self.checkpoints.check()
        o = self.outcome
        o.pushes, o.pulls = len(self.pushes), len(self.pulls)
        o.acked = sum(p.outcome == "acked" for p in self.pushes)
        o.messages = self.world.messages
        if self.spans is not None:
            o.spans = self.spans.counts()
        for srv in self.servers:
            table = srv.core.tables.get(self.table.name) if srv.alive else None
            if table is not None and table.bounded is not None:
                o.evicted += table.bounded.counts["evicted"]
                o.evicted_by_primary += table.bounded.counts["evicted_by_primary"]
        for worker in self.workers:
            for k, v in worker.core.kc_counters.items():
                o.kc[k] = o.kc.get(k, 0) + v
            for k, v in worker.core.pull_copies.counters.items():
                o.pf[k] = o.pf.get(k, 0) + v
        for server in self.servers:
            for k, v in server.states.items():
                o.states[k] = o.states.get(k, 0) + v
        return o


class _Watched:
    """A process's core as ``check_step`` reads it: the ring version it last had (the
    highest so far of its name: a process that comes back keeps the name's record)."""

    __slots__ = ("proc", "watch", "gate", "ring", "changes")

    def __init__(self, proc, ring: int) -> None:
        core = getattr(proc, "core", None)
        self.proc = proc
        self.watch = core if getattr(core, "ring", None) is not None else None
        self.gate = getattr(core, "gate", None)
        self.ring = ring
        self.changes: dict[int, int] = {}  # id of a gate's policy -> its clocks' change count


def _decode(value: int) -> tuple[set[int], set[int]]:
    """The push slots a key's value holds, and those it holds more than once."""
    applied, doubled = set(), set()
    v, slot = value & ((1 << 64) - 1), 0
    while v:
        n = v & 3
        if n:
            applied.add(slot)
            if n > 1:
                doubled.add(slot)
        v >>= 2
        slot += 1
    return applied, doubled


def settings_for(seed: int, consistency: str) -> dict:
    """The settings of seed ``seed`` in the suite and the soak: some seeds run a larger
    cluster (4 servers, 3 workers), some more copies (replication 3), some chained
    replica placement (one seed in seven: none of the seeds other tests name)."""
    kw = {"consistency": consistency}
    if seed % 3 == 1:
        kw.update(servers=4, workers=3)
    if seed % 5 == 2:
        kw.update(replication=3)
    if seed % 7 == 5:
        kw.update(placement="chained")
    return kw


#: the optional workload features ``mixed_settings`` draws from (Settings fields)
MIX = ("key_caching", "pull_filters", "spans", "pushpull", "older_pushpull", "bsp", "checkpoints", "restore",
       "bounded")


def mixed_settings(seed: int, consistency: str, features: tuple[str, ...] = MIX) -> dict:
    """``settings_for`` plus a mix of ``features``, each drawn on about three seeds in
    ten from the seed itself (so a seed replays with its mix), with what each needs: an
    older client's pushpulls are pushpulls, a restore needs checkpoints at replication 1.
    The suite runs each feature on seeds of its own as well; this runs them together."""
    kw = settings_for(seed, consistency)
    rng = random.Random(f"mix {seed}")
    kw.update({feature: True for feature in MIX if rng.random() < 0.3 and feature in features})
    if kw.get("older_pushpull"):
        kw["pushpull"] = True
    if kw.get("restore"):
        kw.update(checkpoints=True, replication=1)
    return kw


def simulate(seed: int, **settings) -> Outcome:
    """One run of the simulation from ``seed`` (settings: see ``Settings``)."""
    return Run(seed, Settings(**settings)).run()

"""The scheduler's decisions, as a state machine with no I/O: membership and the failure
detector, ring changes, tables, checkpoints, jobs and status.

``SchedulerCore`` takes each request with the time and returns effects: replies,
requests to nodes (``Ask``, by node id: the daemon knows each node's connection),
state saves, file writes. Work that waits for other nodes (a ring change, a table
created on every server, a checkpoint) runs as procedures (``psd.core.procedures``),
resumed by ``answered`` and ``tick``. The daemon (``psd.roles.scheduler``) and the
simulation (``psd.sim``) drive it alike.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from types import GeneratorType
from typing import Callable

import msgpack

from psd.cluster.assignment import Assignment
from psd.cluster.clocks import stragglers
from psd.cluster.health import assess
from psd.cluster.jobs import check_report
from psd.cluster.liveness import State
from psd.cluster.ranges import range_to_wire
from psd.cluster.stats import MAX_ADDRESS, check_stats
from psd.codec import Message
from psd.config import ClusterConfig
from psd.core.checkpoints import Checkpoints
from psd.core.cluster_state import ID_BLOCK, ClusterState
from psd.core.effects import Ask, DropRoute, Forget, Notify, Refuse, Reply, Run, Save
from psd.core.fence import restore_after
from psd.core.procedures import Acquire, Calls, Do, Runner, Sleep, failure
from psd.core.ring_changes import RING_LOCK, RingChanges, unavailable
from psd.errors import (BadRequestError, LimitError, ProtocolError, TableMismatchError,
                        UnknownTableError, describe)
from psd.keyroles import OPERATOR, ROLE_SERVER, ROLE_WORKER, forbidden, in_scope, outside_scope, scope_of
from psd.schema import TableSpec, check_namespace, namespace_of
from psd.store.checkpoint import latest

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
#: ended jobs still listed (status, job_status, saved state); older ones are forgotten
KEEP_ENDED_JOBS = 64
#: dead or departed workers still listed (status, saved state); older ones are forgotten
KEEP_GONE_WORKERS = 256
#: ring versions a takeover skips: a ring the deposed leader sent to a few servers just
#: before it was cut off can never equal (nor outrank) the new leader's
TAKEOVER_RING_SKIP = 1000


class SchedulerCore:
    node_id = "H"

    def __init__(self, config: ClusterConfig, *, secure: bool, now: float, wall_offset: float = 0.0,
                 saved: dict | None = None, checkpoint: tuple[Path, dict] | None = None,
                 check_job: Callable[[object, object], list[str]] | None = None):
        """``saved``: the state a previous scheduler saved (resume); ``checkpoint``: the
        newest checkpoint found at start (folder, manifest); ``wall_offset``: wall-clock
        time minus ``now``'s clock, for timestamps people read; ``check_job(job, workers)``:
        the problems of a submitted job (the job file's rules, known from the apps layer,
        which the core does not import); without it only the shape is checked."""
        self.config = config
        self.secure = secure
        self.check_job = check_job or _job_shape
        self.wall_offset = wall_offset
        self.started = now
        self.state = ClusterState(config)
        self.outbox: list = []
        self.runner = Runner(self._ask, self._forget, self._do)
        self.checkpoints = Checkpoints(self.state, self.wall, checkpoint)
        self.ring_changes = RingChanges(self.state, self._publish, self._restore_then_tell_workers,
                                        self._tell_worker)
        self.resumed = saved is not None
        if saved is not None:
            self.state.load(saved, now)
            self.checkpoints.pending_restore = None  # the servers still hold the data
            log.info("resumed: ring v%d, %d table(s), %d job(s)", self.state.ring.version,
                     len(self.state.tables), len(self.state.jobs.jobs))
        else:
            for spec in self.checkpoints.tables_to_restore():
                self.state.tables[spec["name"]] = TableSpec.from_wire(spec)
        self._creating: dict[str, list] = {}  # table -> requests waiting for its creation
        #: procedures a handler started, to run once its answer is in the outbox
        self._after_reply: list = []
        self._tidying: set[str] = set()  # servers being told to drop tables they should not hold
        self._last_tick = now
        self._next_checkpoint = now + config.checkpoint_interval if config.checkpoint_interval else None
        self._isolated = False
        #: ranges with no live copy (start, end) -> since when (restore_unavailable_after)
        self._orphaned_since: dict[tuple[int, int], float] = {}
        self._orphans_of: tuple | None = None
        self._restoring_orphans = False
        self._restore_again_at = 0.0  # (pieces a restore left refused: ring_changes.restoring)
        self._no_checkpoint_until = 0.0
        #: ranges restored from a checkpoint after their servers were given up (status)
        self.restored: list[dict] = []
        self.handlers = {
            "register": self.on_register, "heartbeat": self.on_heartbeat, "leave": self.on_leave,
            "drain": self.on_drain, "checkpoint": self.on_checkpoint,
            "get_ring": self.on_get_ring, "create_table": self.on_create_table,
            "status": self.on_status, "ping": self.on_ping,
            "drop_tables": self.on_drop_tables,
            "submit": self.on_submit, "job_poll": self.on_job_poll,
            "job_report": self.on_job_report, "job_status": self.on_job_status,
            "follow": self.on_follow,
        }
        #: saves so far: a standby's ``follow`` names the last it copied, and gets the
        #: state again only when there was a save since
        self.saves = 0
        for job in self.state.jobs.jobs.values():  # a job that ended while we were down
            if job.ended:
                self._background(self._job_ended(job), now)

    # -- driving -------------------------------------------------------------------
    @property
    def ring(self) -> Assignment:
        return self.state.ring

    def wall(self, now: float) -> float:
        return now + self.wall_offset

    def _take(self) -> list:
        out = self.outbox[:]
        self.outbox.clear()
        return out

    def handle(self, route, msg: Message, now: float) -> list:
        """A request from any node or client; returns what to do."""
        handler = self.handlers.get(msg.op)
        try:
            if handler is None:
                raise ProtocolError(f"unknown op {msg.op!r}; expected one of {', '.join(sorted(self.handlers))}")
            if msg.op in OPERATOR_OPS and msg.peer is not None and msg.peer.startswith(ROLE_WORKER):
                raise forbidden(msg.op, OPERATOR_OPS[msg.op], msg.peer, needs=OPERATOR)
            out = handler(msg, now)
        except Exception as err:
            self._after_reply.clear()
            self.outbox.append(Refuse(route, msg, err))
            return self._take()
        if isinstance(out, GeneratorType):
            self.runner.start(out, now, lambda result, err: self._answer(route, msg, result, err))
        elif out is not None:
            self.outbox.append(Reply(route, out))
        while self._after_reply:
            self._background(self._after_reply.pop(0), now)
        return self._take()

    def _answer(self, route, msg: Message, result, err) -> None:
        if err is not None:
            self.outbox.append(Refuse(route, msg, err))
        elif isinstance(result, Message):
            self.outbox.append(Reply(route, result))

    def answered(self, token: int, reply, error: BaseException | None, now: float) -> list:
        """The answer to a request this scheduler sent, or the result of a file write."""
        self.runner.answered(token, reply, error, now)
        return self._take()

    def _ask(self, node: str, msg: Message, token: int) -> None:
        self.outbox.append(Ask(node, "", msg, token))

    def _forget(self, node: str, token: int) -> None:
        self.outbox.append(Forget(node, token))

    def _do(self, step, token: int) -> None:
        self.outbox.append(Run(token, step.what, step.fn))

    def _background(self, gen, now: float) -> None:
        self.runner.start(gen, now)

    def save(self) -> None:
        """Persist now (ring and table changes, node ids)."""
        self.state.dirty = False
        self.saves += 1
        self.outbox.append(Save(self.state.to_dict()))

    def _publish(self, ring: Assignment) -> None:
        self.save()

    def tick(self, now: float) -> list:
        """Liveness (deaths found, and declared only with a quorum), procedures' timers,
        stragglers, the periodic checkpoint, a save of what changed."""
        s = self.state
        step = self.config.heartbeat_interval / 2
        late, self._last_tick = now - self._last_tick - step, now
        if late > self.config.heartbeat_interval:
            # our own loop stalled (frozen, starved of CPU): the beats sent meanwhile are
            # still unread in the socket, so that time counts against nobody
            log.warning("the scheduler's event loop stalled for %.2f s; that time does not count as anyone's "
                        "missed heartbeats", late)
            s.liveness.excuse(late)
        for node, old, new in s.liveness.tick(now):
            log.warning("%s: %s -> %s (ring v%d)", node, old.value, new.value, s.ring.version)
            if new == State.DEAD:
                self.runner.node_gone(node, now)
                if node.startswith("W"):
                    self._background(self._worker_gone(node), now)
                else:
                    self._background(self.ring_changes.rebalance(f"{node} died"), now)
            s.dirty = True
        isolated = s.liveness.isolated(now)
        if isolated != self._isolated:
            self._isolated = isolated
            if isolated:
                log.error("the scheduler hears from too few servers to tell a dead server from its own isolation: "
                          "it declares no server dead and changes no ring until it hears from more")
            else:
                log.info("the scheduler hears from a majority of the servers again")
        self._flag_stragglers(now)
        self.runner.tick(now)
        if self.ring_changes.unfinished and not self.ring_changes.busy and not self._isolated:
            self._background(self.ring_changes.rebalance(f"{self.ring_changes.unfinished}, again"), now)
        self._watch_orphans(now)
        if self._next_checkpoint is not None and now >= self._next_checkpoint:
            self._next_checkpoint = now + self.config.checkpoint_interval
            if self.config.checkpoint_dir and s.live("server"):
                self._background(self._periodic_checkpoint(now), now)
        if s.dirty:
            self.save()
        return self._take()

    # -- ranges whose only copies are on dead servers -------------------------------------
    def _watch_orphans(self, now: float) -> None:
        """A range with no live copy waits for its servers ``restore_unavailable_after``
        seconds; then they are given up and it is restored from the newest checkpoint."""
        s = self.state
        wait = self.config.restore_unavailable_after
        live = s.live("server")
        seen = self._orphans_of  # (ring, live servers, their orphans): the same on most ticks
        if seen is not None and seen[0] is s.ring and seen[1] == live:
            orphans = seen[2]
        else:
            orphans = unavailable(s.ring, set(live)) if live else []
            self._orphans_of = (s.ring, live, orphans)
        since = self._orphaned_since
        current = {(r.begin, r.end) for r, _ in orphans}
        for key in list(since):
            if key not in current:
                del since[key]
        for key in current:
            since.setdefault(key, now)
        if (not wait or not self.config.checkpoint_dir or self._restoring_orphans or self._isolated
                or self.ring_changes.busy or now < self._no_checkpoint_until):
            return
        due = [(r, o) for r, o in orphans if now - since[(r.begin, r.end)] >= wait]
        again = bool(self.ring_changes.restoring) and now >= self._restore_again_at
        if due or again:
            self._restoring_orphans = True
            self._restore_again_at = now + wait  # (a failed restore is tried again this much later)
            self._background(self._restore_orphans(due, now), now)

    def _restore_orphans(self, due: list, now: float):
        """Give up the servers of the ranges ``due`` and restore what they alone held (and
        what an earlier restore left refused) from the newest checkpoint."""
        s = self.state
        try:
            found = yield Do("find the newest checkpoint", lambda: latest(Path(self.config.checkpoint_dir)))
            if found is None:
                log.error("%d key range(s) have had no live copy for %.0f s, but %s holds no checkpoint to restore "
                          "them from: still waiting for %s", len(due), self.config.restore_unavailable_after,
                          self.config.checkpoint_dir, ", ".join(sorted({x for _, o in due for x in o})))
                self._no_checkpoint_until = now + self.config.restore_unavailable_after
                return
            folder, manifest = found
            gone = sorted({x for _, o in due for x in o})
            if gone:
                s.abandoned.update(gone)
                s.dirty = True
                log.error("giving up on %s after %.0f s: restoring the %d key range(s) only %s held from checkpoint "
                          "%s; pushes to those keys since it are lost", ", ".join(gone),
                          self.config.restore_unavailable_after, len(due), "they" if len(gone) > 1 else "it", folder)
                yield from self.ring_changes.rebalance(f"restoring the ranges of {', '.join(gone)} from {folder.name}")
            else:  # (an earlier restore failed: no ring change may move its pieces meanwhile)
                yield Acquire(RING_LOCK)
            yield from self._restore_pieces(folder, manifest, gone, now)
        finally:
            self._restoring_orphans = False

    def _restore_pieces(self, folder: Path, manifest: dict, gone: list[str], now: float):
        """Restore the pieces every ring names refused, in two steps, so that no copy of
        one serves before each of its copies holds the checkpoint's rows (decision 156):
        every live server loads its part and keeps refusing it (``meta.hold``); only once
        all have answered are the pieces opened everywhere (``meta.open``). A failed load
        is tried again later on every server (none has served the pieces yet, so loading
        again loses nothing); a piece once opened is never loaded again."""
        s = self.state
        pieces = list(self.ring_changes.restoring)
        if not pieces:
            return
        wire = [range_to_wire(r) for r in pieces]
        servers = s.live("server")
        results = yield Calls([(n, Message("restore", meta={"folder": str(folder), "files": manifest["files"],
                                                            "ranges": wire, "hold": True})) for n in servers],
                              timeout=self.config.request_timeout)
        errors = [e for e in map(failure, results) if e is not None]
        if errors:
            log.error("restoring from %s failed on some servers (%s); tried again later on every server",
                      folder, errors[0])
            return
        self.ring_changes.restoring = [r for r in self.ring_changes.restoring if r not in pieces]
        yield from self._open_restored(folder, wire)
        keys = sum(r.meta.get("keys", 0) for r in results)
        self.restored.append({"ranges": [{"begin": r.begin, "last": r.end - 1} for r in pieces],
                              "checkpoint": str(folder), "servers": gone, "keys": keys,
                              "time": self.wall(now)})
        del self.restored[:-16]
        log.error("restored %d key range(s) (%d keys) from %s", len(pieces), keys, folder)

    def _open_restored(self, folder: Path, wire: list):
        """The restore's second step: every server serves the pieces. One that does not
        answer is asked again while it lives (it refuses them until then; one that stops
        answering heartbeats too is declared dead). The message is
        a ``restore`` without files, so a server older than decision 156 (which ignores
        ``meta.hold`` and opened them on its load) loads nothing and answers."""
        msg = Message("restore", meta={"folder": str(folder), "files": [], "ranges": wire, "open": True})
        pending = self.state.live("server")
        while pending:
            results = yield Calls([(n, msg) for n in pending], timeout=self.config.request_timeout)
            live = self.state.live("server")
            pending = [n for n, r in zip(pending, results) if failure(r) is not None and n in live]
            if pending:
                log.warning("%s did not open the ranges restored from %s; asked again", ", ".join(pending), folder)
                yield Sleep(self.config.heartbeat_interval)

    def _periodic_checkpoint(self, now: float):
        try:
            yield from self.checkpoints.take(now)
        except Exception as e:
            log.warning("periodic checkpoint failed: %s", e)

    def log_clock(self) -> int | None:
        """For log records: the slowest live worker's clock."""
        live = set(self.state.live("worker"))
        return min((c for w, c in self.state.worker_clocks.items() if w in live), default=None)

    # -- who may ask --------------------------------------------------------------
    def _check_sender(self, msg: Message) -> None:
        """Under CurveZMQ, a request in a registered node's name (``src``) must come with
        the key that registered it: the server key for a server, the registering
        client's key for a worker. Another key could otherwise keep a node alive, take
        over its route, feed it stats or clocks, make it leave or take its job ranks.
        Names that are no node's are left to each handler."""
        if not self.secure:
            return
        s = self.state
        peer = s.liveness.peers.get(msg.sender)
        if peer is None:
            return
        need = ROLE_SERVER if peer.role == "server" else s.registered_by.get(msg.sender)
        if need is None:  # a worker resumed from a scheduler.json that did not say who registered it
            s.registered_by[msg.sender] = msg.peer
            return
        if msg.peer != need:
            raise forbidden(msg.op, f"{msg.op} in the name of {peer.role} {msg.sender}", msg.peer,
                            needs=ROLE_SERVER if need == ROLE_SERVER else f"the key that registered {msg.sender}")

    # -- membership ------------------------------------------------------------
    def on_register(self, msg: Message, now: float) -> Message:
        s = self.state
        role = msg.meta.get("role")
        if role not in ("server", "worker"):
            raise BadRequestError(f"register: role must be 'server' or 'worker', got {role!r}")
        if role == "server" and self.secure and msg.peer != ROLE_SERVER:
            raise forbidden("register", "register as a server", msg.peer)
        address = msg.meta.get("address")
        if role == "server" and (not isinstance(address, str) or not address.startswith("tcp://")
                                 or len(address) > MAX_ADDRESS):
            raise BadRequestError(f"register: a server must give its tcp:// address (at most {MAX_ADDRESS} "
                                  f"characters), got {describe(address)}", field="meta.address")
        node = s.new_node(role)
        s.liveness.join(node, role, now)
        s.registered_by[node] = msg.peer
        if role == "server":
            s.addresses[node] = address
            dead = [p.node for p in s.liveness.peers.values()
                    if p.role == "server" and p.state == State.DEAD and p.node not in s.replaced]
            if dead:
                s.replaced.add(dead[0])
            previous = msg.meta.get("previous")
            listed = (*s.ring.servers, *(s.stable.servers if s.stable is not None else ()))
            if isinstance(previous, str) and previous in listed and previous not in s.live("server"):
                # a server declared dead registers again: the ranges only it held come back
                # to it under the new name (the next ring change plans from it). Listed in
                # the last final ring too: the joint ring that drops it may be out already,
                # and the copies it plans may fail (their source dies), leaving it the only copy
                s.rejoined[previous] = node
                log.warning("%s is %s back", node, previous)
            self.save()
            # the new server takes its ranges once it serves; joins queue behind other changes;
            # started after the answer, so the server knows its id when the ring comes
            self._after_reply.append(self.ring_changes.rebalance(f"{node} joined"))
        elif s.reserve_ids(role):
            # saved before the node hears its id, a block at a time: a scheduler that
            # crashed before saving it handed the same id to the next node, whose first
            # pushes the servers then took for resends of the old node's
            self.save()
        log.info("%s joined as %s%s, ring v%d", node, role, f" at {address}" if role == "server" else "",
                 s.ring.version)
        return msg.reply(meta={"node": node, "ring": (s.ring if role == "server" else self._workers_ring()).to_wire(),
                               **self._leadership(),
                               "tables": [t.to_wire() for t in s.tables.values()],
                               # (a server declared dead missed the worker_left notices sent
                               # meanwhile: one registering again stops waiting for these)
                               **({"gone_workers": self._gone_workers(),
                                   # (how long after a death a range only the dead one held
                                   # may be restored elsewhere: psd.core.fence)
                                   "restore_after": restore_after(self.config)} if role == "server" else {}),
                               "heartbeat_interval": self.config.heartbeat_interval,
                               "limits": {"max_message_bytes": self.config.limits.max_message_bytes,
                                          "max_keys": self.config.limits.max_keys,
                                          "max_inflight_bytes": self.config.limits.max_inflight_bytes}})

    def _gone_workers(self) -> list[str]:
        """The workers that left or died, as many as are still listed (KEEP_GONE_WORKERS):
        gone for good (one that comes back registers under a new id)."""
        return [p.node for p in self.state.liveness.peers.values()
                if p.role == "worker" and p.state in (State.DEAD, State.LEFT)]

    def _to_servers(self, msg: Message, exclude: str | None = None):
        """A procedure step: ``msg`` to every live server; their answers."""
        nodes = [n for n in self.state.live("server") if n != exclude]
        return (yield Calls([(n, Message(msg.op, meta=msg.meta)) for n in nodes], self.config.request_timeout))

    def on_heartbeat(self, msg: Message, now: float) -> Message:
        s = self.state
        stats = msg.meta.get("stats")
        if stats is not None and self.secure and msg.peer != ROLE_SERVER:
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
        state = s.liveness.seen(msg.sender, now)
        if state is None:
            return msg.reply(meta={"known": False, "epoch": s.epoch})
        # only a live member's numbers are kept: a dead or departed node's stay as they were
        role = s.liveness.peers[msg.sender].role if state == State.ACTIVE else None
        if role == "worker":
            s.worker_clocks[msg.sender] = max(msg.clock, s.worker_clocks.get(msg.sender, 0))
        if role == "server" and stats is not None:
            if "counters" in stats or msg.sender not in s.stats:  # full stats; else only the peers' ages
                s.stats[msg.sender] = stats
            else:
                s.stats[msg.sender].update(stats)
            if "peers" in stats:  # its word on the other servers: the failure detector's evidence
                s.liveness.report(msg.sender, stats["peers"], now)
            self._tidy(msg.sender, stats.get("tables"), now)
        if metrics is not None:
            s.metrics_at[msg.sender] = metrics
        return msg.reply(meta={"known": True, "state": state.value, "ring": s.ring.version, "epoch": s.epoch})

    def on_leave(self, msg: Message, now: float):
        s = self.state
        if msg.sender not in s.liveness.peers:
            return msg.reply()  # not a member (never registered, or forgotten by a restart): nothing to do
        self._check_sender(msg)
        return self._leave(msg)

    def _leave(self, msg: Message):
        s = self.state
        if msg.sender.startswith("S"):
            yield from self.ring_changes.rebalance(f"{msg.sender} drains", exclude=msg.sender)
        s.liveness.leave(msg.sender)
        log.info("%s left", msg.sender)
        if msg.sender.startswith("W"):
            yield from self._worker_gone(msg.sender)
        return msg.reply()

    def on_checkpoint(self, msg: Message, now: float):
        """`psd checkpoint`: a consistent cut of every table, written by the servers."""
        wait = msg.meta.get("wait", self.config.request_timeout)
        longest = max(MAX_CHECKPOINT_WAIT, self.config.request_timeout)
        if (not isinstance(wait, (int, float)) or isinstance(wait, bool) or not math.isfinite(wait)
                or not 0 < wait <= longest):
            raise BadRequestError(f"checkpoint: meta.wait: expected a number of seconds above 0 and at most "
                                  f"{longest:.0f}, got {describe(wait)}", field="meta.wait")
        return self._checkpoint(msg, now, float(wait))

    def _checkpoint(self, msg: Message, now: float, wait: float):
        return msg.reply(meta=(yield from self.checkpoints.take(now, timeout=wait)))

    def on_drain(self, msg: Message, now: float):
        """`psd drain NODE`: hand a server's ranges to the others, then stop it."""
        s = self.state
        node = msg.meta.get("node")
        if not isinstance(node, str) or node not in s.addresses or node not in s.live("server"):
            raise BadRequestError(f"drain: {node!r} is not a live server; see `psd status`")
        return self._drain(msg, node)

    def _drain(self, msg: Message, node: str):
        yield from self.ring_changes.rebalance(f"{node} drains", exclude=node)
        self.state.liveness.leave(node)
        (answer,) = yield Calls([(node, Message("shutdown"))], self.config.request_timeout)
        err = failure(answer)
        if err is not None:
            raise err
        return msg.reply(meta={"ring": self.state.ring.version})

    def _worker_gone(self, worker: str):
        """Servers stop waiting for a worker that died or left; its shards go to others."""
        s = self.state
        for job_id, rank in s.jobs.release(worker):
            log.warning("job %s: shard %d of %s goes back to the pool", job_id, rank, worker)
        s.dirty = True
        s.worker_clocks.pop(worker, None)
        s.flagged.discard(worker)
        # a long-lived cluster sees workers come and go with every job: only the newest
        # gone ones stay listed (status, saved state); the rest are forgotten everywhere
        for node in s.liveness.forget_gone("worker", KEEP_GONE_WORKERS):
            for kept in (s.registered_by, s.stats, s.metrics_at, s.worker_clocks):
                kept.pop(node, None)
            s.flagged.discard(node)
            self.outbox.append(DropRoute(node))
        yield from self._to_servers(Message("worker_left", meta={"worker": worker}))

    def _live_clocks(self) -> dict[str, int]:
        """The clock of every live worker (one that left or died has none)."""
        workers = set(self.state.live("worker"))
        return {w: c for w, c in self.state.worker_clocks.items() if w in workers}

    def _flag_stragglers(self, now: float) -> None:
        s = self.state
        live = self._live_clocks()
        now_flagged = set(stragglers(live, self.config.straggler_lag))
        for worker in now_flagged - s.flagged:
            lag = sorted(live.values())[len(live) // 2] - live[worker]
            log.warning("%s is a straggler: clock %d, %d behind the median", worker, live[worker], lag)
            for job in s.jobs.jobs.values():
                ranks = [r for r, w in job.ranks.items() if w == worker]
                if job.state == "running" and ranks:
                    job.metrics.append({"event": "straggler", "worker": worker, "rank": ranks[0],
                                        "clock": live[worker], "lag": lag, "time": self.wall(now)})
        s.flagged = now_flagged

    def on_get_ring(self, msg: Message, now: float) -> Message:
        """The ring, and which of its owners are down: servers declared dead that still
        hold the only copies of some ranges (a client waiting on one can say so)."""
        s = self.state
        down = sorted({o for _, owners in unavailable(s.ring, set(s.live("server"))) for o in owners})
        return msg.reply(meta={"ring": self._workers_ring().to_wire(), "down": down})

    def _workers_ring(self) -> Assignment:
        """The ring as workers may see it: none while a checkpoint restore is pending or
        under way (they wait, as for a cluster with no servers yet, and get the ring once
        the tables hold what the checkpoint had)."""
        return Assignment(version=0) if self.checkpoints.restoring else self.state.ring

    def _tell_worker(self, node: str, msg: Message) -> None:
        if not self.checkpoints.restoring:
            self.outbox.append(Notify(node, msg))

    def _restore_then_tell_workers(self):
        """After a final ring: the pending restore, if any; then the workers, who were not
        told of rings meanwhile, get this one."""
        if not self.checkpoints.restoring:
            return
        yield from self.checkpoints.restore_if_pending()
        wire = self.state.ring.to_wire()
        for node in self.state.live("worker"):
            self.outbox.append(Notify(node, Message("ring", meta={"ring": wire})))

    # -- standby schedulers ------------------------------------------------------------
    def _leadership(self) -> dict:
        """What a registering node learns of the schedulers: the epoch (a server's vote is
        per epoch) and, with standbys, every address (to find the leader after a takeover)."""
        if not self.config.standby:
            return {"epoch": self.state.epoch}
        return {"epoch": self.state.epoch, "schedulers": [self.config.scheduler, *self.config.standby]}

    def on_follow(self, msg: Message, now: float) -> Message:
        """A standby copies the state (only if there was a save since its copy, ``have``)
        and learns whether we still hear the servers; ``probe``: only the epoch."""
        if self.secure and msg.peer != ROLE_SERVER:
            raise forbidden("follow", "follow (copy the scheduler's state)", msg.peer)
        meta = {"epoch": self.state.epoch, "isolated": self._isolated, "n": self.saves}
        if not msg.meta.get("probe") and msg.meta.get("have") != self.saves:
            meta["state"] = self.state.to_dict()
        return msg.reply(meta=meta)

    def take_over(self, epoch: int, rings: list[Assignment], now: float, tables: list[dict] = ()) -> None:
        """Lead at ``epoch`` from the copied state, which may lag the old leader's by a
        save: the newest ring the voters hold counts, and the tables they hold (else the
        heartbeats' tidying would drop a table created just before the takeover); ring
        versions skip ahead (so no ring of the old leader's equals ours), node ids too;
        then the ring goes to everyone."""
        s = self.state
        for wire in tables:
            try:
                spec = TableSpec.from_wire(wire)
            except Exception as e:  # a voter's word, checked like any request's
                log.warning("a voter's table %r is not valid (%s); not adopted", wire.get("name"), e)
                continue
            if spec.name not in s.tables:
                log.warning("table %s, which the copied state lacked, is adopted from the voters", spec.name)
                s.tables[spec.name] = spec
        newest = max([s.ring, *rings], key=lambda r: r.version)
        s.epoch = epoch
        s.ring = dataclasses.replace(newest, version=newest.version + TAKEOVER_RING_SKIP)
        if s.stable is None:
            s.stable = s.ring
        for role in s.counts:
            s.counts[role] += ID_BLOCK
        self.save()
        log.warning("leading at epoch %d: ring v%d (%d server(s))", epoch, s.ring.version, len(s.ring.servers))
        self._background(self._after_takeover(now), now)

    def _after_takeover(self, since: float):
        """Everyone gets the new leader's ring, once the servers' heartbeats have told the
        daemon how to reach them (the voters move their link at once; the others find us
        within a failure timeout); then a ring change over the servers that answer
        finishes whatever change the old leader left half done."""
        s = self.state
        step = self.config.heartbeat_interval / 2
        for _ in range(int(4 * self.config.heartbeat_misses) + 1):
            if all(s.liveness.peers[n].last_seen > since for n in s.live("server")):
                break
            yield Sleep(step)
        yield from self.ring_changes.publish(self.state.ring, {}, final=True)
        yield from self.ring_changes.rebalance("a new leader took over")

    def on_ping(self, msg: Message, now: float) -> Message:
        return msg.reply(meta={"node": self.node_id, "servers": len(self.state.live("server"))})

    # -- tables ----------------------------------------------------------------
    def _check_new_table(self, name: str) -> None:
        """Before a table is added: limits.max_tables, and no table in the namespace of a
        job whose tables were dropped when it ended."""
        s = self.state
        namespace = namespace_of(name) or ""
        job = s.jobs.jobs.get(namespace)
        if job is not None and job.tables_dropped:
            raise BadRequestError(f"cannot create table {name!r}: job {job.id} has ended and its tables "
                                  f"were dropped (set keep_tables: true in the job file to keep them)")
        if s.jobs.forgotten(namespace) and not any(namespace_of(n) == namespace for n in s.tables):
            raise BadRequestError(f"cannot create table {name!r}: job {namespace} ended long ago and its tables "
                                  f"are gone (set keep_tables: true in the job file to keep them)")
        limit = self.config.limits.max_tables
        if len(s.tables) >= limit:
            raise LimitError(f"cannot create table {name!r}: the cluster has {len(s.tables)} tables and "
                             f"limits.max_tables is {limit}; drop tables no longer needed (psd drop) or raise "
                             f"limits.max_tables in the scheduler's config", limit="max_tables", max=limit,
                             used=len(s.tables))

    def on_create_table(self, msg: Message, now: float):
        spec = TableSpec.from_wire(msg.meta.get("spec"))
        self._check_scope(msg, namespace_of(spec.name), f"table {spec.name!r}")
        return self._create_table(msg, spec)

    @staticmethod
    def _check_scope(msg: Message, namespace: str | None, what: str) -> None:
        """A worker key limited to some namespaces touches only their tables and jobs."""
        if not in_scope(scope_of(msg.peer), namespace):
            raise outside_scope(msg.op, what, namespace, msg.peer)

    def _create_table(self, msg: Message, spec: TableSpec):
        s = self.state
        while spec.name in self._creating:  # another worker is creating it: answer when the servers have it
            waiting = self._creating[spec.name]
            yield from _until(waiting)
        have = s.tables.get(spec.name)
        if have is not None:
            if have != spec:
                raise TableMismatchError(
                    f"table {spec.name!r} already exists with width={have.width}, dtype={have.dtype}, "
                    f"updater={have.updater}, options={have.options}; open it with the same settings")
            return msg.reply(meta={"spec": have.to_wire(), "created": False})
        self._check_new_table(spec.name)
        if (spec.bounds.evicting and "consistency" not in spec.options
                and self.config.consistency == "sequential"):
            raise BadRequestError(f"table {spec.name!r}: eviction (max_rows, ttl_pushes, ttl_seconds) needs "
                                  f"consistency eventual or bounded, and the cluster's is sequential; give the "
                                  f"table consistency=\"eventual\" or \"bounded\"", option="consistency")
        # listed before the servers are told, so a server registering meanwhile gets it too
        s.tables[spec.name] = spec
        done = self._creating[spec.name] = [False]
        try:
            results = yield from self._to_servers(Message("create_table", meta={"spec": spec.to_wire()}))
            errors = [e for e in map(failure, results) if e is not None]
            if errors:
                s.tables.pop(spec.name, None)  # (or dropped meanwhile)
                raise errors[0]
        finally:
            del self._creating[spec.name]
            done[0] = True
        self.save()
        log.info("table %r created: width %d, %s, updater %s", spec.name, spec.width, spec.dtype, spec.updater)
        return msg.reply(meta={"spec": spec.to_wire(), "created": True})

    def on_drop_tables(self, msg: Message, now: float):
        """`psd drop`: forget the tables of a namespace, or the named ones, on every server."""
        s = self.state
        namespace, names = msg.meta.get("namespace"), msg.meta.get("tables")
        if (namespace is None) == (names is None):
            raise BadRequestError("drop_tables: give meta.namespace or meta.tables (a list of names), not both")
        if namespace is not None:
            check_namespace(namespace)
            names = [n for n in s.tables if namespace_of(n) == namespace]
        elif not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadRequestError("drop_tables: meta.tables must be a list of table names")
        else:
            unknown = [n for n in names if n not in s.tables]
            if unknown:
                raise UnknownTableError(f"drop_tables: no table {', '.join(map(repr, unknown))}; "
                                        f"nothing was dropped")
        return self._dropped(msg, names)

    def _dropped(self, msg: Message, names: list[str]):
        return msg.reply(meta={"dropped": (yield from self._drop(names, f"asked by {msg.sender}"))})

    def _drop(self, names: list[str], why: str):
        """Forget ``names`` and tell every live server to free them (a server that does not
        answer is told again after its next heartbeat lists them: ``_tidy``)."""
        s = self.state
        for name in names:
            s.tables.pop(name, None)
        self.save()
        if names:
            log.info("dropping %d table(s) (%s): %s", len(names), why,
                     ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
            results = yield from self._to_servers(Message("drop_tables", meta={"names": names}))
            for result in results:
                if failure(result) is not None:
                    log.warning("a server did not drop %d table(s) now (%s); it is told again", len(names),
                                failure(result))
        return names

    def _tidy(self, node: str, held, now: float) -> None:
        """A server's heartbeat lists a table the cluster does not have (dropped while the
        server did not answer, or a create that failed elsewhere): tell it to drop it."""
        s = self.state
        if not isinstance(held, dict) or node in self._tidying:
            return
        stale = [n for n in held if n not in s.tables and n not in self._creating]
        if not stale:
            return
        self._tidying.add(node)
        self._background(self._tell_to_drop(node, stale), now)

    def _tell_to_drop(self, node: str, names: list[str]):
        try:
            (answer,) = yield Calls([(node, Message("drop_tables", meta={"names": names}))], self.config.request_timeout)
            err = failure(answer)
            if err is None:
                log.info("%s told to drop %d table(s) the cluster no longer has", node, len(names))
            else:
                log.warning("%s: could not drop stale tables: %s", node, err)
        finally:
            self._tidying.discard(node)

    def _job_ended(self, job):
        """A job is done or failed: drop its namespace unless its file says keep_tables."""
        s = self.state
        if not (job.keep_tables or job.tables_dropped):
            job.tables_dropped = True
            yield from self._drop([n for n in s.tables if namespace_of(n) == job.id], f"job {job.id} {job.state}")
        self._forget_old_jobs()

    def _forget_old_jobs(self) -> None:
        """A long-lived cluster runs job after job: the newest KEEP_ENDED_JOBS ended ones
        stay (status, job_status, saved state), older ones and their metrics go."""
        for job_id in self.state.jobs.prune_ended(KEEP_ENDED_JOBS):
            log.info("job %s forgotten (ended; the newest %d ended jobs are kept)", job_id, KEEP_ENDED_JOBS)
            self.state.dirty = True

    # -- jobs --------------------------------------------------------------------
    def on_submit(self, msg: Message, now: float) -> Message:
        s = self.state
        spec = msg.meta.get("job")
        workers = msg.meta.get("workers")
        problems = self.check_job(spec, workers)  # the job file's top-level rules (psd/jobs/spec.py)
        if problems:
            raise BadRequestError("; ".join(problems))
        size = len(msgpack.packb(spec, use_bin_type=True))
        if size > MAX_JOB_BYTES:
            raise BadRequestError(f"submit: meta.job: expected a job map of at most {MAX_JOB_BYTES} bytes (msgpack), "
                                  f"got {size}: it travels to every worker in one header; name data files "
                                  f"with a glob rather than one by one", field="meta.job")
        job = s.jobs.submit(spec, workers)
        self.save()
        log.info("job %s submitted: app %s on %d workers", job.id, spec.get("app"), workers)
        return msg.reply(meta={"job": job.id})

    def on_job_poll(self, msg: Message, now: float) -> Message:
        self._check_sender(msg)
        scope = scope_of(msg.peer)  # a job's tables live in the namespace named by its id
        got = self.state.jobs.poll(msg.sender, may=lambda job_id: in_scope(scope, job_id))
        if got is None:
            return msg.reply(meta={"job": None})
        job, rank = got
        return msg.reply(meta={"job": job.id, "spec": job.spec, "rank": rank,
                               "num_workers": job.num_workers, "shards": [rank]})

    def on_job_report(self, msg: Message, now: float):
        s = self.state
        self._check_sender(msg)
        m = msg.meta
        if isinstance(m.get("job"), str) and s.jobs.forgotten(m["job"]):
            return msg.reply(meta={"ignored": f"job {m['job']} ended and was forgotten"})  # (a late resend)
        if not isinstance(m.get("job"), str) or m.get("job") not in s.jobs.jobs:  # a list is unhashable
            raise BadRequestError(f"job_report: unknown job {describe(m.get('job'))}", field="meta.job")
        self._check_scope(msg, m["job"], f"job {m['job']}")
        report = check_report(s.jobs.jobs[m["job"]], m)
        holder = s.jobs.jobs[m["job"]].ranks.get(report["rank"])
        if holder != msg.sender:
            # only the rank's worker reports on it: a report can fail or end the job, and
            # ending it drops its tables (a worker key may not drop tables otherwise)
            raise BadRequestError(f"job_report: rank {report['rank']} of job {m['job']} is held by "
                                  f"{holder or 'no worker'}, not {msg.sender}; take a rank with job_poll first",
                                  field="meta.rank", held_by=holder or "")
        s.dirty = True
        job = s.jobs.report(m["job"], reporter=msg.sender, **report)
        if job.ended:
            log.info("job %s %s", job.id, job.state)
            return self._reported_end(msg, job)
        return msg.reply()

    def _reported_end(self, msg: Message, job):
        yield from self._job_ended(job)
        return msg.reply()

    def on_job_status(self, msg: Message, now: float) -> Message:
        job_id, start = msg.meta.get("job"), msg.meta.get("metrics_from", 0)
        job = self.state.jobs.jobs.get(job_id) if isinstance(job_id, str) else None  # a list is unhashable
        if job is None:
            raise BadRequestError(f"unknown job {job_id!r:.80}")
        self._check_scope(msg, job.id, f"job {job.id}")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise BadRequestError(f"job_status: metrics_from must be an integer >= 0, got {start!r:.80}")
        return msg.reply(meta=job.to_dict(start))

    # -- status ------------------------------------------------------------------
    def on_status(self, msg: Message, now: float) -> Message:
        st = self.status(now)
        st["health"] = assess(st)
        return msg.reply(meta=st)

    def status(self, now: float) -> dict:
        s = self.state
        nodes = []
        for p in s.liveness.peers.values():
            stats = s.stats.get(p.node, {})
            nodes.append({"id": p.node, "role": p.role, "address": s.addresses.get(p.node, ""),
                          "state": p.state.value, "last_heartbeat": round(now - p.last_seen, 3),
                          "replaced": p.node in s.replaced,
                          "clock": s.worker_clocks.get(p.node) if p.role == "worker" else None,
                          "straggler": p.node in s.flagged,
                          "consistency": stats.get("consistency", {}),
                          "counters": stats.get("counters", {}), "memory": stats.get("memory", {}),
                          "traffic": stats.get("traffic", {}), "key_cache": stats.get("key_cache", {}),
                          "stripes": stats.get("stripes", {}),
                          "pull_filters": stats.get("pull_filters", {}),
                          "bytes_in": stats.get("bytes_in", 0), "bytes_out": stats.get("bytes_out", 0),
                          "serving": stats.get("serving"), "peers": stats.get("peers", {}),
                          "metrics": stats.get("metrics") or s.metrics_at.get(p.node)})
        tables = {}
        by_namespace: dict[str, dict] = {}
        for name, spec in s.tables.items():
            per_server = {n: st.get("tables", {}).get(name, {}) for n, st in s.stats.items()}
            tables[name] = {**spec.to_wire(), "namespace": namespace_of(name),
                            "keys": sum(v.get("keys", 0) for v in per_server.values()),
                            "bytes": sum(v.get("bytes", 0) for v in per_server.values()),
                            **_bounded_sums(per_server), "per_server": per_server}
            by_namespace.setdefault(namespace_of(name) or "", {})[name] = {
                "keys": tables[name]["keys"], "bytes": tables[name]["bytes"]}
        ranges = [{"begin": r.begin, "last": r.end - 1, "owners": list(o)}
                  for r, o in zip(s.ring.ranges, s.ring.owners)]
        live_servers = set(s.live("server"))
        waiting = [{"begin": r.begin, "last": r.end - 1, "waiting_for": list(o)}
                   for r, o in unavailable(s.ring, live_servers)] if live_servers or s.ring.ranges else []
        live = self._live_clocks()
        clocks = {"workers": live, "slowest": min(live.values()) if live else None,
                  "fastest": max(live.values()) if live else None, "stragglers": sorted(s.flagged),
                  "consistency": self.config.consistency, "max_delay": self.config.max_delay}
        return {"scheduler": getattr(self, "address", None), "uptime": round(now - self.started, 1),
                "epoch": s.epoch, "standby": list(self.config.standby),
                "clocks": clocks, "ring_changing": self.ring_changes.busy,
                "ring_unfinished": self.ring_changes.unfinished,
                "isolated": self._isolated, "unavailable": waiting, "restored": self.restored,
                "checkpoints": self.checkpoints.status(),
                "replication": self.config.replication, "placement": self.config.placement,
                "metrics": getattr(self, "metrics_address", None),
                "ring_version": s.ring.version, "nodes": nodes, "ranges": ranges, "tables": tables,
                "jobs": [{**j.to_dict(len(j.metrics)), "tables": by_namespace.get(j.id, {})}
                         for j in s.jobs.jobs.values()]}


def _until(flag: list):
    """A procedure step: wait (in short sleeps) until ``flag[0]`` is true."""
    while not flag[0]:
        yield Sleep(0.01)


def _job_shape(job, workers) -> list[str]:
    """The least a submitted job must be, when no fuller check was given."""
    problems = []
    if not isinstance(job, dict):
        problems.append(f"submit: meta.job: expected a map (a job file's contents), got {describe(job)}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        problems.append(f"submit: meta.workers: expected an integer >= 1, got {describe(workers)}")
    return problems


#: a bounded table's counts, summed over servers in ``psd status`` (psd.store.bounded)
BOUNDED_COUNTS = ("refused", "evicted", "evicted_by_primary")


def _bounded_sums(per_server: dict) -> dict:
    """Keys refused admission and rows evicted, over the live servers (each decision is
    counted once, by the primary that made it; replicas count what they deleted on its
    word as ``evicted_by_primary``)."""
    if not any("evicted" in v for v in per_server.values()):
        return {}
    return {k: sum(v.get(k, 0) for v in per_server.values()) for k in BOUNDED_COUNTS}

"""A server's decisions, as a state machine with no I/O.

``ServerCore`` holds a server's tables, ring, request memory, consistency gate and
pending replications, and decides what each message leads to: apply, hold, forward,
acknowledge, refuse. It never touches a socket or reads the clock: every call takes the
time, and returns effects (``psd.core.effects``) that the daemon (``psd.roles.server``)
or the simulation (``psd.sim``) carries out. Answers to what it asked of other servers
come back through ``answered``; ``tick`` moves its timers.

Requests are handled one at a time in the order they are admitted, so pushes that
arrive on one stream are applied in the order they were sent (``psd.core.stream``). A
push is applied on the range's primary, forwarded as is to the range's replicas (one
message per replica server, in the primary's order, so every copy applies the same
updates in the same order), and acknowledged to the worker only when every replica holds
it (``psd.core.acks``). A worker sends one message per server, whatever the replicas of
its ranges: the primary applies it whole or refuses it whole (``_check_primary``), and a
forward holding only part of it names the ranges of its rows (``meta.cover``).
Requests carry (sender, rid) ids; a resend of something already applied is
acknowledged, not applied again.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from functools import partial
from pathlib import Path

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import (KEY_SPACE_END, Range, bounds, check_sorted_unique, intersect, range_from_wire,
                               range_to_wire)
from psd.cluster.ring import leads_anew, overlay
from psd.cluster.rows import Rows
from psd.cluster.schedulers import lost_after
from psd.codec import Message
from psd.config import ClusterConfig
from psd.core.acks import Acks, Pending
from psd.core.bounds import MAX_COVER, Bounds
from psd.core.effects import LINK, Follow, Refuse, Rejoin, Reply, Stop, Write
from psd.core.election import Ballot
from psd.core.fence import Fence, restore_after
from psd.core.keycache import KeyCache
from psd.core.gate import Gate, Policy, Setting
from psd.core.peers import Call, PeerCalls
from psd.core.pushpull import PULL_REFUSABLE, PULL_REFUSED, refusal
from psd.core.range_copy import copy_ids, copy_range, copy_rows, id_pieces
from psd.core.seen import ONCE, PartlyApplied, Seen, arrays_of_ids, ids_by_sender, union_of_ids
from psd.core.stream import SEQ, Inbound, parse
from psd.errors import (BadRequestError, BusyError, KeysUnknownError, LimitError, MessageTooLargeError,
                        NotOwnerError, OutOfOrderError, ProtocolError, PsdError, PsdTimeoutError, StaleRingError,
                        TableMismatchError, UnavailableError, UnknownTableError)
from psd.filters.pull import PullFilters, check_pf
from psd.keyroles import ROLE_SERVER, ROLE_WORKER, forbidden, in_scope, outside_scope, scope_of
from psd.refusals import RefusalLog
from psd.schema import TableSpec, namespace_of
from psd.store.table import Table, Usage
from psd.store.checkpoint import AppliedIds, ServerFile, write_server_file

log = logging.getLogger("psd.server")

#: request_timeouts after a worker left before its request ids are forgotten
FORGET_AFTER = 10
#: names of dropped tables remembered, so a range copy still on its way for one is skipped
DROPPED_KEPT = 4096
#: request ids are copied with a range as uint64 frames (Seen.to_arrays): larger or
#: negative ones would make every later copy of this server's ranges fail
MAX_RID = (1 << 64) - 1
#: data-plane ops only another server sends (a push's copy to a replica, a range copy,
#: the liveness ping): under CurveZMQ they must come with the server key, or a client key
#: could write any range past the ownership checks. The control ops need no check: they
#: arrive on the link this server opened to the scheduler, whose key the handshake verified.
DAEMON_OPS = {"replicate": "replicate (a primary's copy of a push to its replicas)",
              "install": "install (a range copy from another server)",
              "peer_ping": "peer_ping (a server's liveness ping)",
              "elect": "elect (a standby scheduler asking for this server's vote)",
              "evict": "evict (a primary's eviction record for its replicas)",
              "align": "align (a primary's rows, for its replicas to compare)"}
#: one heartbeat in this many carries the full stats; the others only the peers' ages
STATS_EVERY = 5
#: refusals after which the sender sends the request again: nothing it sent after the
#: refused request may be admitted before that (the stream breaks there)
BREAKING = (NotOwnerError, UnavailableError, BusyError, KeysUnknownError)


def _request_id(value, what: str) -> int | None:
    """``meta.rid``: nil, or an integer in [0, 2**64)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_RID:
        raise ProtocolError(f"{what} must be nil or a request id, an integer in [0, 2**64); got {value!r:.60}")
    return value


class ServerCore:
    def __init__(self, config: ClusterConfig, *, secure: bool, table_factory=Table):
        """``secure``: under CurveZMQ, where ``msg.peer`` names the sender's key role;
        ``table_factory(spec, usage)``: how a table is made (the simulation's lend every row)."""
        self.config = config
        self.secure = secure
        self.table_factory = table_factory
        self.node_id = "S?"
        self.tables: dict[str, Table] = {}
        self.ring = Assignment(version=0)
        self.incoming: list[Range] = []  # ranges being copied to us: forwards wait for the copy
        #: ranges given to us to be restored from a checkpoint (their servers were given
        #: up): refused as unavailable until the restore has filled them, never served empty
        self.restoring: list[Range] = []
        self.seen = Seen()
        self.partly = PartlyApplied()
        #: key lists workers asked us to keep, named by signature in their later requests
        self.keycache = KeyCache()
        #: pull filters: rows published per table, what each worker was sent (psd.filters.pull)
        self.pulls = PullFilters()
        #: a cached key list keeps where its keys are stored (off: every push looks them up)
        self.keep_positions = True
        self._may: dict[tuple, bool] = {}  # (key role, table) -> may touch (may_touch)
        self.streams = Inbound()
        self.outbox: list = []
        self.calls = PeerCalls(self.outbox, _resendable)
        self.acks = Acks(lambda: self.node_id)
        cfg = config
        self.fence = Fence((2 * cfg.heartbeat_misses - 1) * cfg.heartbeat_interval)
        #: our vote for a leader among the schedulers (with standbys): docs/fault-tolerance.md
        self.ballot = Ballot(lost_after(cfg.heartbeat_interval, cfg.heartbeat_misses))
        #: every scheduler's address (the registration tells them)
        self.schedulers: list[str] = [cfg.scheduler, *cfg.standby]
        self.counters = {"push": 0, "pull": 0, "pushpull": 0, "errors": 0, "replicated": 0,
                         "duplicates": 0, "keys_pushed": 0, "keys_pulled": 0, "limit_refusals": 0,
                         "not_replicated": 0, "out_of_order": 0, "fenced": 0, "busy": 0,
                         "probes": 0, "pull_refused": 0}
        #: bytes of requests each sender has here unanswered (a held pull, a push waiting
        #: for its replicas), bounded by limits.max_inflight_bytes
        self.holding: dict[str, int] = {}
        #: bytes of table storage held here (limits.max_memory_bytes), plus those that pushes
        #: the consistency gate holds may still add; replicas that said they are full
        self.usage = Usage()
        self.reserved = 0
        self.full_replicas: dict[str, int] = {}
        self.forward_refusals = RefusalLog()  # one log line per replica and reason a minute
        #: departed workers whose request ids go once they are quiet: worker -> (activity, check at)
        self.forgetting: dict[str, tuple[int, float]] = {}
        self.dropped: OrderedDict[str, None] = OrderedDict()
        self.gate = Gate(Setting(cfg.consistency, cfg.max_delay, cfg.num_workers, tuple(cfg.auto_delay_bounds)))
        self.draining = False
        self.rejoining = False
        self.previous: set[str] = set()  # our names before we registered again
        #: seconds after our death a range only we hold may be restored elsewhere (the
        #: scheduler says at registration; until then our own config's): serving_alone
        self.restore_after = restore_after(config)
        #: the ring at which we last took over ranges: clocks sent before it do not vouch for them
        self.sync_version = 0
        #: ranges a copy of which is arriving, and which copy (a failed one may be tried again)
        self._copying_in: dict[Range, object] = {}
        self._copies_sent = 0
        self._beats = 0
        #: ranges copies of which we are sending (transfer): each tracked to its end
        self._copies: dict[_Copy, None] = {}  # (a dict: iterated in the order made)
        self._checkpoint: _Cut | None = None
        #: when the hold of a checkpoint whose cut has not come yet lapses (None: no hold)
        self._hold_until: float | None = None
        self._pinged: dict[str, tuple[Call, float]] = {}  # peer -> (its ping, sent at)
        #: peer -> the ordered ping sent to find a message lost at the end of its stream
        self._probes: dict[str, Call] = {}
        self._next_ping = 0.0
        self._sq: tuple[int, int] | None = None  # the stream place of the request being handled
        self.handlers = {"push": self.on_push, "pull": self.on_pull, "pushpull": self.on_pushpull,
                         "clock": self.on_clock, "replicate": self.on_replicate, "install": self.on_install,
                         "ping": self.on_ping, "peer_ping": self.on_peer_ping, "elect": self.on_elect,
                         "evict": self.on_evict, "align": self.on_align}
        #: admission and eviction of bounded tables (psd.core.bounds)
        self.bounds = Bounds(self)
        self.control_handlers = {"create_table": self.on_create_table, "ring": self.on_ring,
                                 "transfer": self.on_transfer, "worker_left": self.on_worker_left,
                                 "shutdown": self.on_shutdown, "ping": self.on_control_ping,
                                 "ckpt_hold": self.on_ckpt_hold, "ckpt_cut": self.on_ckpt_cut,
                                 "ckpt_release": self.on_ckpt_release, "drop_tables": self.on_drop_tables}

    # -- driving -------------------------------------------------------------------
    def _take(self) -> list:
        if not self.outbox:  # (most answers to peers and ticks leave nothing to do)
            return []
        out = self.outbox[:]
        self.outbox.clear()
        return out

    def handle(self, route, msg: Message, now: float) -> list:
        """A request on the data socket; returns what to do."""
        handler = self.handlers.get(msg.op)
        if handler is None:
            self.counters["errors"] += 1
            self.outbox.append(Refuse(route, msg, ProtocolError(
                f"unknown op {msg.op!r}; expected one of {', '.join(sorted(self.handlers))}")))
            return self._take()
        self._sq = None
        self.bounds.at(now)
        try:
            handler(route, msg, now)
        except Exception as err:
            self.counters["errors"] += 1
            if isinstance(err, BREAKING) and self._sq is not None:
                self.streams.break_at(msg.sender, self._sq)
            self.outbox.append(Refuse(route, msg, err))
        return self._take()

    def control(self, msg: Message, now: float) -> list:
        """A request from the scheduler on the link; returns what to do."""
        handler = self.control_handlers.get(msg.op)
        self.bounds.at(now)
        try:
            if handler is None:
                raise ProtocolError(f"unknown control op {msg.op!r}")
            handler(msg, now)
        except Exception as err:
            self.outbox.append(Refuse(None, msg, err, LINK))
        return self._take()

    def answered(self, token: int, reply: Message | None, error: Exception | None, now: float) -> list:
        """The answer (or the failure) of a request this server sent another server."""
        self.calls.answered(token, reply, error, now)
        return self._take()

    def tick(self, now: float) -> list:
        """Timers: replicas that do not answer, copies that stall, a checkpoint that
        waits too long, departed workers to forget, liveness pings to other servers."""
        self.bounds.tick(now)
        for p in list(self.acks.pending):
            for call in list(p.calls):
                if call.node not in self.ring.servers:  # it left: its successor copies from us
                    self.calls.forget(call)
                    self.acks.answered(p, call, None)
                elif now >= p.give_up_at:  # (it dropped a message over its own limits, say)
                    self.calls.forget(call)
                    self.acks.answered(p, call, (call.node, "timeout",
                                                 f"no answer within {self.config.request_timeout} s", 0))
        for node, probe in list(self._probes.items()):  # (lost with no ping answered since)
            if now - probe.sent_at >= self.config.request_timeout:
                self._forget_probe(node)
        for copy in list(self._copies):
            copy.check(now)
        if self._checkpoint is not None and now >= self._checkpoint.give_up_at:
            self._checkpoint.time_out()
        if self._hold_until is not None and now >= self._hold_until:
            self._hold_lapsed(now)
        for worker, (then, at) in list(self.forgetting.items()):
            if now >= at:
                self._forget_when_quiet(worker, then, now)
        if now >= self._next_ping:
            self._ping_peers(now)
        return self._take()

    # -- membership (the driver's heartbeat and registration) ---------------------------
    def registered(self, meta: dict, now: float) -> list:
        """The scheduler's answer to ``register``: our node id, the tables, the ring."""
        rejoin = self.rejoining
        self._heard_leader(meta, now)
        restore_after = meta.get("restore_after")
        if _is_number(restore_after) and restore_after >= 0:
            self.restore_after = restore_after
        if rejoin and self.node_id != meta["node"]:
            self.previous.add(self.node_id)
        self.node_id = meta["node"]
        self.rejoining = False
        for spec in meta.get("tables", []):
            self._create(TableSpec.from_wire(spec))
        ring = Assignment.from_wire(meta["ring"])
        if rejoin:
            # under a new name: senders open new streams to it. Its data stays until the
            # next final ring says what it holds: ranges only it had come back to it (under
            # the new name) before its join's ring change; the rest is dropped then, never
            # served meanwhile (the ring gives it nothing to lead)
            self.streams = Inbound()
            self._drop_checkpoint()
            if ring.version < self.ring.version:
                log.error("%s: the scheduler knows an older ring (v%d) than this server (v%d): it lost its "
                          "state; the data is kept until a ring says what this server holds",
                          self.node_id, ring.version, self.ring.version)
            self.ring = Assignment(version=0)
        self._set_ring(ring)
        self._missed_departures(meta.get("gone_workers"), now)
        return self._take()

    def _missed_departures(self, gone, now: float) -> None:
        """The workers that left or died while we were not in the cluster (declared dead,
        or not yet joined) were announced (``worker_left``) to the live servers only. Each
        one our gate does not know as gone leaves it now: one it counts would hold the
        pushes it keeps for the clock boundary (acked; the ranges only we held come back
        to us) for ever, and one it never heard of would count as missing (clock 0), so
        every sequential or bounded pull would wait for it for ever (decision 155). (Only
        the workers the scheduler still lists as gone: a worker that registered since its
        answer was built may already have reached us, and must not be dropped.)"""
        if not isinstance(gone, list) or not all(isinstance(w, str) for w in gone):
            log.warning("%s: the scheduler's register answer lists no departed workers; any that left "
                        "meanwhile are still waited for", self.node_id)
            return
        live = self.gate.live_workers()
        for worker in sorted(set(gone) - self.gate.left):
            if worker in live:
                log.warning("%s: %s left the worker group while this server was out of it", self.node_id, worker)
            try:  # (the gate finishes the leave whatever a released request raises: go on with the rest)
                self.gate.leave(worker, now)
            except Exception:  # noqa: BLE001 - a failed callback must not leave the rejoin half done
                log.exception("%s: a request released by %s's departure failed", self.node_id, worker)
            self._watch_departed(worker, now)

    def heartbeat_stats(self, now: float) -> dict | None:
        """What a heartbeat carries besides liveness: every STATS_EVERY-th one the full
        stats (what ``psd status`` shows); the others only what the failure detector
        needs each time (None: send the full stats, and the daemon adds its own)."""
        self._beats += 1
        if self._beats % STATS_EVERY == 1:
            return None
        return {"peers": self.fence.report(self.ring.servers, self.node_id, now), "serving": self.serving(now)}

    def _heard_leader(self, meta: dict, now: float) -> None:
        schedulers = meta.get("schedulers")
        if isinstance(schedulers, list) and schedulers and all(isinstance(a, str) for a in schedulers):
            self.schedulers = schedulers[:16]
        epoch = meta.get("epoch")
        self.ballot.heard(epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0, None, now)

    def heartbeat_answered(self, meta: dict, sent_at: float, now: float) -> list:
        self._heard_leader(meta, now)
        state, known = meta.get("state"), meta.get("known")
        if known and state in ("active", "suspect"):
            self.fence.confirmed(sent_at)
        elif (state in ("dead", "left") or known is False) and not self.draining and not self.rejoining:
            # we were frozen or cut off and the cluster moved on (or a scheduler without
            # saved state forgot us): register again, keeping what the ring still needs
            log.error("%s was removed from the cluster (ring v%s); registering again, keeping only what "
                      "the current ring gives it", self.node_id, meta.get("ring"))
            self.rejoining = True
            self.outbox.append(Rejoin(self.node_id, self.ring.version))
        return self._take()

    def _ping_peers(self, now: float) -> None:
        """Liveness pings to every other server of the ring: answered ones keep our lease
        (``Fence``), and their ages go to the scheduler with each heartbeat."""
        interval = self.config.heartbeat_interval
        self._next_ping = now + interval
        for node in self.ring.servers:
            address = self.ring.addresses.get(node)
            if node == self.node_id or address is None:
                continue
            old = self._pinged.get(node)
            if old is not None:
                if now - old[1] < 4 * interval:
                    continue  # still waiting for its answer
                self.calls.forget(old[0])
            msg = Message("peer_ping", meta={"ring": self.ring.version})
            call = self.calls.ask(node, address, msg, self._ping_answered, now, ordered=False)
            self._pinged[node] = (call, now)

    def _ping_answered(self, call: Call, reply: Message | None, error: Exception | None, now: float) -> None:
        if self._pinged.get(call.node, (None,))[0] is call:
            del self._pinged[call.node]
        if reply is None or reply.op != "ok":
            return
        if reply.meta.get("member", True):
            self.fence.peer_answered(call.node, call.sent_at, now)
        else:
            self.fence.heard(call.node, now)  # it knows a ring without us: no vouching
        self._probe_if_lost(call.node, call.sent_at, now)

    def _probe_if_lost(self, node: str, since: float, now: float) -> None:
        """``node`` answered a ping sent at ``since``: a forward (or copy, or eviction
        record) sent to it before then and still unanswered was lost with a dropped
        connection, or its answer was. If it was the last of its stream, nothing sent
        after it shows the gap, and the push it carries would wait request_timeout and
        fail with the primary holding it and the replica not: copies would differ for
        good. So send a ping on the stream (``meta.sq``): the replica admits it only if
        everything before it arrived, else refuses it ``out_of_order`` and the stream
        sends again, in order, exactly what it did not admit (decision 125)."""
        probe = self._probes.get(node)
        if probe is not None:
            if probe.sent_at >= since:
                return  # one is on its way already
            # sent before the ping just answered, and unanswered: lost as well. Forget it
            # (it would wait for good), and the stream no longer counts it
            self._forget_probe(node)
        if not self.calls.unanswered_before(node, since):
            return
        address = self.ring.addresses.get(node)
        if address is None:
            return
        self.counters["probes"] += 1
        log.info("%s: a request to %s sent before its last ping is unanswered; probing the stream", self.node_id,
                 node)
        msg = Message("peer_ping", meta={"ring": self.ring.version})
        self._probes[node] = self.calls.ask(node, address, msg, self._probe_answered, now)

    def _probe_answered(self, call: Call, reply: Message | None, error: Exception | None, now: float) -> None:
        if self._probes.get(call.node) is call:
            del self._probes[call.node]
        if reply is not None and reply.op == "ok":
            # admitted: every forward before it arrived and was answered at once, so one still
            # unanswered lost its answer. Send it again rather than let its push fail after
            # request_timeout: the replica applies a push once and answers again. (Only
            # forwards with an id: the replica could not tell a resend of one without.)
            self.calls.resend_answer_lost(call.node, call.sent_at, now, _resendable)

    def _forget_probe(self, node: str) -> None:
        """Stop waiting for ``node``'s probe: lost, timed out, or ``node`` left the ring."""
        probe = self._probes.pop(node, None)
        if probe is not None:
            self.calls.forget(probe)

    def on_peer_ping(self, route, msg: Message, now: float) -> None:
        self._daemons_only(msg)
        self._admit(msg)  # (a probe of the sender's stream carries meta.sq; a liveness ping none)
        self.fence.heard(msg.sender, now)
        self.outbox.append(Reply(route, msg.reply(meta={"ring": self.ring.version,
                                                        "member": msg.sender in self.ring.servers})))

    def serving(self, now: float) -> bool:
        """Whether our lease lets us serve ranges we share with other servers."""
        return self.fence.ok(self.node_id, self.ring.servers, now)

    def serving_alone(self, now: float) -> bool:
        """Whether we may still serve a range only we hold. Nobody else can serve it until
        the scheduler, having declared us dead, gives us up and restores it from a
        checkpoint ``restore_unavailable_after`` later; so the lease runs that much longer
        for it (0: never restored, always served). Past that, a server that wakes from a
        long stall would acknowledge pushes, before its heartbeat tells it it is dead, into
        a copy the cluster replaced and it then drops."""
        grace = self.restore_after
        return not grace or self.fence.ok(self.node_id, self.ring.servers, now - grace, note=False)

    # -- control plane (from the scheduler) ----------------------------------
    def on_create_table(self, msg: Message, now: float) -> None:
        self._create(TableSpec.from_wire(msg.meta.get("spec")))
        self.outbox.append(Reply(None, msg.reply(), LINK))

    def on_ring(self, msg: Message, now: float) -> None:
        self.incoming = [range_from_wire(w) for w in msg.meta.get("incoming", [])]
        self._set_ring(Assignment.from_wire(msg.meta["ring"]))
        restoring = {range_from_wire(w) for w in msg.meta.get("restoring") or []}
        self.restoring = sorted(r for r in restoring | set(self.restoring) if self._holds_any(r))
        self.full_replicas.clear()  # ranges move: every replica says again whether it is full
        if msg.meta.get("final"):
            self._drop_unowned()
        self.outbox.append(Reply(None, msg.reply(), LINK))

    def on_drop_tables(self, msg: Message, now: float) -> None:
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
        if names:
            self.keycache.forget(tables=set(names))
            self.pulls.forget(tables=set(names))
            self.partly.forget_once(tuple(f"{ONCE}{name}/" for name in names))
        self.full_replicas.clear()  # they may have freed memory too
        if dropped:
            log.info("%s dropped %d table(s) (%s), freeing %d bytes; it holds %d bytes", self.node_id,
                     len(dropped), ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""), freed,
                     self.usage.bytes)
        self.outbox.append(Reply(None, msg.reply(meta={"dropped": dropped, "freed": freed}), LINK))

    def on_worker_left(self, msg: Message, now: float) -> None:
        """A worker died or left: it no longer holds back anyone's clock."""
        worker = msg.meta.get("worker")
        if not isinstance(worker, str):
            raise BadRequestError("worker_left: meta.worker must be a worker id")
        self.gate.leave(worker, now)
        log.info("%s: %s left the worker group", self.node_id, worker)
        self._watch_departed(worker, now)
        self.outbox.append(Reply(None, msg.reply(), LINK))

    def _watch_departed(self, worker: str, now: float) -> None:
        if worker not in self.forgetting:  # (told twice: a death, then a leave; or by a copy)
            self.forgetting[worker] = (-1, now)

    def _forget_when_quiet(self, worker: str, then: int, now: float) -> None:
        """Forget a departed worker's request ids (up to 65,536, kept for exactly-once) and
        its stream once nothing of it has arrived here for FORGET_AFTER request_timeouts:
        a worker resends a request only while it keeps trying (every second at most), so a
        quiet one resends nothing; one declared dead that still pushes stays remembered."""
        activity = self.seen.activity(worker)
        if activity == then:
            self.seen.forget(worker)
            self.partly.forget(worker)
            self.keycache.forget(sender=worker)
            self.pulls.forget(sender=worker)
            self.streams.forget(worker)
            del self.forgetting[worker]
            return
        self.forgetting[worker] = (activity, now + FORGET_AFTER * self.config.request_timeout)

    def on_shutdown(self, msg: Message, now: float) -> None:
        log.info("%s: asked to shut down", self.node_id)
        self.draining = True
        self.outbox.append(Reply(None, msg.reply(), LINK))
        self.outbox.append(Stop("asked to shut down"))

    def on_ping(self, route, msg: Message, now: float) -> None:
        self.outbox.append(Reply(route, msg.reply(meta={"node": self.node_id})))

    def on_elect(self, route, msg: Message, now: float) -> None:
        """A standby scheduler asks for our vote (psd.core.election): granted, we link to it."""
        self._daemons_only(msg)
        epoch, candidate = msg.meta.get("epoch"), msg.meta.get("candidate")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise BadRequestError(f"elect: meta.epoch: expected an integer >= 1, got {epoch!r:.40}", field="meta.epoch")
        if candidate not in self.schedulers:
            raise BadRequestError(f"elect: meta.candidate: expected one of the schedulers "
                                  f"{', '.join(self.schedulers)}, got {candidate!r:.100}", field="meta.candidate")
        vote = self.ballot.ask(epoch, candidate, now)
        log.log(logging.WARNING if vote.granted else logging.INFO, "%s: %s vote for %s at epoch %d: %s",
                self.node_id, "a" if vote.granted else "no", candidate, epoch, vote.why)
        meta = {"granted": vote.granted, "why": vote.why, "epoch": self.ballot.epoch}
        if vote.granted:  # what the candidate's copy of the state may lack
            meta["ring"] = self.ring.to_wire()
            meta["tables"] = [t.spec.to_wire() for t in self.tables.values()]
            self.outbox.append(Follow(candidate))
        self.outbox.append(Reply(route, msg.reply(meta=meta)))

    def on_control_ping(self, msg: Message, now: float) -> None:
        self.outbox.append(Reply(None, msg.reply(meta={"node": self.node_id}), LINK))

    def _create(self, spec: TableSpec) -> None:
        have = self.tables.get(spec.name)
        if have is None:
            self.tables[spec.name] = self.table_factory(spec, self.usage)
            self.bounds.adopt(self.tables[spec.name])
            self.dropped.pop(spec.name, None)
        elif have.spec != spec:
            raise TableMismatchError(f"table {spec.name!r} exists as {have.spec}, not {spec}")

    def _set_ring(self, ring: Assignment) -> None:
        if ring.version < self.ring.version:
            return
        gone = set(self.ring.servers) - set(ring.servers)
        if self.ring.ranges and leads_anew(self.ring, ring, self.node_id):
            # we lead keys we did not: a worker's pushes to them may still be on their way to
            # their old primary; its clocks vouch for them here once it knows this ring
            self.sync_version = ring.version
            self.gate.resync()
        old, self.ring = self.ring, ring
        self.bounds.ring_changed(old)
        self.fence.forget(ring.servers)
        for node in gone:
            self._forget_probe(node)
            pinged = self._pinged.pop(node, None)
            if pinged is not None:  # (its answer may never come: nothing may wait for it)
                self.calls.forget(pinged[0])
            self.calls.drop_node(node)
        for p in list(self.acks.pending):  # a replica that left: its successor copies from us
            for call in list(p.calls):
                if call.node not in ring.servers:
                    self.calls.forget(call)
                    self.acks.answered(p, call, None)
        led = ring.led_by(self.node_id)
        held = ring.ranges_of(self.node_id)
        log.info("%s at ring v%d: leads %d range(s), holds %d, copying in %d", self.node_id, ring.version,
                 len(led), len(held), len(self.incoming))

    def _drop_unowned(self) -> None:
        self._narrow_kept(self._held_rows)  # (a range that comes back brings its own with its copy)
        # what the ring still lists under our old names (declared dead, we registered again)
        # stays: it may be the only copy, which the next ring change gives back to us
        self.previous &= set(self.ring.servers)
        held = sorted({r for node in (self.node_id, *self.previous) for r in self.ring.ranges_of(node)})
        for name, table in self.tables.items():
            dropped = table.retain(held)
            if dropped:
                log.info("%s: dropped %d keys of %r it no longer holds (ring v%d)", self.node_id, dropped,
                         name, self.ring.version)

    # -- admission and ownership ---------------------------------------------------------
    def _admit(self, msg: Message) -> None:
        """Admit the request into its sender's stream, or refuse it as out of order."""
        sq = parse(msg.meta.get(SEQ))
        if sq is None:
            return
        resume = self.streams.admit(msg.sender, sq)
        if resume is not None:
            self.counters["out_of_order"] += 1
            raise OutOfOrderError(f"{msg.op} {sq[1]} of stream {sq[0]} from {msg.sender} came before request "
                                  f"{resume} of it, which was lost or refused; send again from there",
                                  **{"epoch": sq[0], "from": resume})
        self._sq = sq

    def _daemons_only(self, msg: Message) -> None:
        """Refuse (ForbiddenError) a request of DAEMON_OPS that did not come with the server key."""
        if self.secure and msg.peer != ROLE_SERVER:
            raise forbidden(msg.op, DAEMON_OPS[msg.op], msg.peer)

    def _owner_groups(self, rows: Rows):
        return rows.groups(self.ring) if rows.count else []

    def _holds_any(self, r: Range) -> bool:
        return any(h.begin < r.end and r.begin < h.end for h in self.ring.ranges_of(self.node_id))

    def _check_restoring(self, rows: Rows) -> None:
        first, last = rows.first_last()
        for r in self.restoring:
            if r.begin <= last and first < r.end:
                raise UnavailableError(f"keys in [{max(first, r.begin)}, {min(last, r.end - 1)}] are being restored "
                                       f"from a checkpoint (their servers were given up); retry shortly")

    def _check_primary(self, rows: Rows, now: float) -> list[tuple[tuple[str, ...], list]]:
        """The rows' owner groups, if we lead every one of them; else refuse the whole
        message (nothing of it applied, its id not noted): a message to one server may
        hold ranges of several owner tuples, and the sender re-cuts it by the ring the
        refusal names, whatever part of it we still lead (decision 97)."""
        if self.restoring and rows.count:
            self._check_restoring(rows)
        groups = self._owner_groups(rows)
        for owners, slices in groups:
            if owners[0] != self.node_id:
                first, last = rows.first_last()
                raise NotOwnerError(f"{self.node_id} does not lead keys in [{first}, {last}] at ring "
                                    f"v{self.ring.version} ({owners[0]} leads key {rows.key_at(slices[0][0])} of "
                                    f"them); nothing of the {len(groups)} owner group(s) was applied",
                                    ring=self.ring.version)
        if groups and not self.serving(now) and (any(len(owners) > 1 for owners, _ in groups)
                                                 or not self.serving_alone(now)):
            self.counters["fenced"] += 1
            raise NotOwnerError(f"{self.node_id} cannot confirm it is still a member (no answer from the "
                                f"scheduler or from a majority of the servers lately) and may have been removed "
                                f"from the ring; it serves again once confirmed", ring=self.ring.version)
        return groups

    # -- data plane ------------------------------------------------------------
    def _table(self, msg: Message) -> Table:
        table = self.tables.get(msg.table) if msg.table is not None else None
        if table is None:
            raise UnknownTableError(f"unknown table {msg.table!r}; create it with kv.table(...) first")
        if msg.peer is not None and msg.peer.startswith(ROLE_WORKER) and not self.may_touch(msg.peer, msg.table):
            raise outside_scope(msg.op, f"table {msg.table!r}", namespace_of(msg.table), msg.peer)
        return table

    def may_touch(self, peer: str | None, table: str) -> bool:
        """Whether a connection's key may read and write ``table`` (a worker key may be
        limited to some namespaces); remembered per key and table."""
        key = (peer, table)
        ok = self._may.get(key)
        if ok is None:
            if len(self._may) > 4096:
                self._may.clear()
            ok = self._may[key] = in_scope(scope_of(peer), namespace_of(table))
        return ok

    def _rows(self, msg: Message, table: Table, with_values: bool, cached: bool = True) -> Rows:
        """Parse and check everything before anything is applied. ``cached``: the request
        may name its keys by signature (``meta.kc``: a worker's push, pull or pushpull),
        and ask us to keep them (``meta.kcs``); a refused signature breaks the stream
        (``keys_unknown`` is in BREAKING), so the sender resends it and what followed it
        in order, keys whole."""
        meta = msg.meta
        kc = meta.get("kc")
        if kc is not None:
            if not cached:
                raise ProtocolError(f"{msg.op} cannot name its keys by signature (meta.kc); send them")
            held = self.keycache.lookup(msg.sender, table.spec.name, kc)
            rows = Rows.from_message(msg, self.config.limits, with_values, keys=held.keys)
            if with_values and self.keep_positions:  # (a push may skip the key lookup: decision 117)
                rows.held, rows.placed = held, self.keycache.placed
        else:
            rows = Rows.from_message(msg, self.config.limits, with_values)
        if with_values:
            rows.values = table.check_values(rows.values, rows.count)
            table.refuse_nonfinite(rows.values, rows.keys, rows.spans)
        if kc is None and meta.get("kcs") and cached and rows.keys is not None and rows.count:
            rows.sig = self.keycache.store(msg.sender, table.spec.name, rows.keys)
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
        once = msg.meta.get("once")
        if orig is None and once is None:
            return []
        if orig is not None and (
                not isinstance(orig, list) or len(orig) > 64
                or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= MAX_RID for o in orig)):
            raise ProtocolError("meta.orig must be a list of at most 64 request ids")
        ids = [(sender, o) for o in orig or ()]
        if once is not None:
            # a job's push, named by its shard and step whoever sends it: a shard run again
            # after its worker died sends the same names, and what was applied is not again
            if (not isinstance(once, list) or len(once) != 2 or not isinstance(once[0], str)
                    or not 0 < len(once[0]) <= 200 or not isinstance(once[1], int) or isinstance(once[1], bool)
                    or not 0 <= once[1] <= MAX_RID):
                raise ProtocolError("meta.once must be [name (1 to 200 characters), step (an integer >= 0)]")
            ids.append((f"{ONCE}{msg.table}/{once[0]}", once[1]))
        return ids

    def _seen_before(self, rid: tuple[str, int], cut_from: list[tuple[str, int]]) -> bool:
        """Whether this request (or the one it was cut from) was applied here; a resend
        keeps its id among the sender's newest, however long it is resent for."""
        for key in (rid, *cut_from):
            if key in self.seen:
                self.seen.touch(*key)
                return True
        return False

    def _apply_push(self, msg: Message, table: Table, rows: Rows, origin: str, reserve: int = 0,
                    ids: tuple[tuple[str, int], ...] = ()) -> None:
        """Apply now, or (sequential) at the clock boundary, or after a checkpoint cut.
        ``reserve``: bytes the push may add, counted against the memory limit until it
        is applied; ``ids``: those it counts as applied under (``_own_ids``)."""
        self.gate.note_push(msg.clock)
        self._keep_or_apply(table, rows, origin, msg.clock, reserve, ids)
        self.counters["keys_pushed"] += rows.count

    def _keep_or_apply(self, table: Table, rows: Rows, origin: str, clock: int, reserve: int = 0,
                       ids: tuple[tuple[str, int], ...] = ()) -> None:
        """Apply now, or have the gate keep the push for the clock boundary. A kept push is
        applied later only to the rows the ring still gives us then (a range copy takes
        the kept pushes of its range along: ``on_transfer``)."""
        if reserve:
            self.reserved += reserve
        ring_then = self.ring.version
        kept = Kept(table.spec.name, rows, origin, ids)

        def apply() -> None:
            self.reserved -= reserve
            rows = kept.rows
            held = rows if rows is None or self.ring.version == ring_then else self._held_rows(rows)
            if held is not None:
                held.push_into(table)
        self.policy(table).push(origin, clock, apply, kept)

    def _narrow_kept(self, keep) -> None:
        """Narrow every kept push to ``keep(rows)`` (None: nothing of it is left here)."""
        for _clock, kept in self.gate.kept():
            if kept.rows is not None:
                kept.rows = keep(kept.rows)

    def _held_rows(self, rows: Rows) -> Rows | None:
        """The rows of ``rows`` in ranges we hold (lead or replicate) at our ring."""
        if not rows.count:
            return None
        groups = self._owner_groups(rows)
        names = (self.node_id, *self.previous)
        mine = [any(n in owners for n in names) for owners, _ in groups]
        if all(mine):
            return rows
        slices = sorted(s for ok, (_owners, group) in zip(mine, groups) if ok for s in group)
        return rows.take(slices) if slices else None

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

    # -- push ---------------------------------------------------------------------------
    def _push(self, msg: Message, table: Table, rows: Rows, now: float) -> Pending | None:
        """The primary's half of a push: apply, forward to replicas. Returns None when it
        may be acknowledged now, else the replications it waits for."""
        groups = self._check_primary(rows, now)
        rid = self._rid(msg)
        cut_from = self._cut_from(msg, msg.sender)
        if rid is not None and self._seen_before(rid, cut_from):
            self.counters["duplicates"] += 1
            pending = self.acks.of([rid, *cut_from])
            if pending is not None:
                return pending  # a resend: answer when the original is answered
            # applied here before, perhaps as a replica of a primary that died before
            # forwarding to every replica, or refused by one: forward it again (replicas
            # apply it once)
            return self._forward(msg, table, *self.bounds.resent(table, rows, groups), rid, now, (False, True))
        todo = self.partly.not_applied(rows, [rid, *cut_from]) if rid is not None else rows
        had = (todo is not None, todo is None or todo.count < rows.count)  # (applied now, before)
        refused = None
        if todo is not None:
            todo, refused = self.bounds.admit(table, todo)  # (bounded tables: keys not admitted yet)
            reserve = self._check_memory(table, todo, rows, groups)
            self._apply_push(msg, table, todo, msg.sender, reserve, _own_ids(rid, cut_from))
        if rid is not None:
            self.seen.add(*rid)
            self.partly.note_piece(rows, cut_from)
        pending = self._forward(msg, table, *self.bounds.forwarded(rows, refused, groups), rid, now, had)
        return self.bounds.evict(table, pending, now)

    def _forward(self, msg: Message, table: Table, rows: Rows, groups, rid, now: float,
                 had: tuple[bool, bool]) -> Pending | None:
        """Send the push to every replica of its rows: one message per replica server,
        holding the rows of every owner group it is in. A forward holding only part of
        the request names the ranges of its rows (``meta.cover``: every row of the
        request in them goes to that replica): the replica counts the request's id as
        applied for those rows only, so a piece of the request that reaches it later
        (re-cut by a newer ring, from another primary) is applied for the rest. ``had``:
        whether we applied rows of it now, and whether some before (``Bounds.watch``)."""
        by_replica: dict[str, list] = {}
        for owners, slices in groups:
            for node in owners[1:]:
                by_replica.setdefault(node, []).extend(slices)
        if not by_replica:
            return None
        pending = self.acks.start(rid, now + self.config.request_timeout)
        for node, slices in by_replica.items():
            address = self.ring.addresses.get(node)
            if address is None:
                continue
            slices.sort()
            if sum(b - a for a, b in slices) == rows.count:
                subs = [(rows, None)]
            else:
                subs = [(rows.take(chunk), cover) for chunk, cover in self._covers(rows, slices)]
            for sub, cover in subs:
                meta = {"origin": msg.sender, "rid": rid[1] if rid else None}
                if cover is not None:
                    meta["cover"] = cover
                if msg.meta.get("orig"):
                    meta["orig"] = msg.meta["orig"]
                if msg.meta.get("once") is not None:
                    meta["once"] = msg.meta["once"]
                fwd = sub.to_message("replicate", table=table.spec.name, ring=self.ring.version, clock=msg.clock,
                                     meta=meta)
                check = self.bounds.watch(table, sub, had)
                call = self.calls.ask(node, address, fwd, partial(self._forward_answered, pending, check=check), now)
                pending.calls[call] = None
                self.counters["replicated"] += 1
        if not pending.calls:
            self.acks.settle(pending)
            return None
        return pending

    def _covers(self, rows: Rows, slices) -> list[tuple[list, list[list[int]]]]:
        """``slices`` (ascending, rows of one owner group each) with their ``meta.cover``:
        the ranges of our ring that hold them as ``[first, last]`` keys, adjacent ones
        joined (the same few pairs for every push over the same ranges, which the replica
        keeps once). Past MAX_COVER pairs, in several (slices, cover): a range is never
        split between two, so no forward's cover holds another's rows."""
        ring = self.ring
        out: list[tuple[list, list[list[int]]]] = []
        for a, b in slices:
            r = ring.ranges[ring.find(rows.key_at(a))]
            cover = out[-1][1] if out else None
            if cover is not None and cover[-1][1] + 1 >= r.begin:  # (the same range, or the next)
                cover[-1][1] = max(cover[-1][1], r.end - 1)
            elif cover is not None and len(cover) < MAX_COVER:
                cover.append([r.begin, r.end - 1])
            else:
                out.append(([], [[r.begin, r.end - 1]]))
            out[-1][0].append((a, b))
        return out

    def _forward_answered(self, pending: Pending, call: Call, reply: Message | None, error: Exception | None,
                          now: float, check=None) -> None:
        """A replica's answer to a forward or an evict record; ``check(call, reply, now)``
        reads an answer to a forward of an evicting table's push (``Bounds.watch``)."""
        node = call.node
        if error is not None:
            log.warning("%s: forward to %s failed: %s", self.node_id, node, error)
            gone = node not in self.ring.servers  # (one that left is copied to by its successor)
            self.acks.answered(pending, call, None if gone else (node, "failed", str(error), 0))
            return
        self.fence.heard(node, now)
        if reply.op == "error":
            code, message = reply.meta.get("code"), reply.meta.get("message")
            repeats = self.forward_refusals.note(f"{node}/{code}", now)
            if repeats is not None:
                log.warning("%s: replica %s refused a forward: %s%s", self.node_id, node, message,
                            f" ({repeats} more like it not logged)" if repeats else "")
            ring = (reply.meta.get("data") or {}).get("ring", 0)
            self.acks.answered(pending, call, (node, str(code), str(message), ring if isinstance(ring, int) else 0))
            self.counters["not_replicated"] = self.acks.not_replicated
            return
        if reply.meta.get("full"):
            if node not in self.full_replicas:
                log.warning("%s: replica %s reached its memory limit (%s bytes): pushes that add keys to its "
                            "ranges are refused", self.node_id, node, reply.meta.get("bytes"))
            self.full_replicas[node] = int(reply.meta.get("bytes") or 0)
        else:
            self.full_replicas.pop(node, None)
        if check is not None:
            check(call, reply, now)
        self.acks.answered(pending, call, None)

    def _hold(self, msg: Message, reply_bytes: int = 0) -> int:
        """The bytes ``msg`` holds here until answered (its payload, and the reply it asks
        for), counted against its sender's budget (limits.max_inflight_bytes): a sender
        holding that much already is refused ``busy`` (it sends again later, in order)."""
        cost = sum(a.nbytes for a in msg.arrays) + reply_bytes
        held = self.holding.get(msg.sender, 0)
        limit = self.config.limits.max_inflight_bytes
        if held and held + cost > limit:
            self.counters["busy"] += 1
            raise BusyError(f"{msg.sender} holds {held} bytes of unanswered requests on {self.node_id} and this "
                            f"{msg.op} adds {cost}, over limits.max_inflight_bytes {limit}; nothing was applied: "
                            f"send it again once earlier requests are answered", held=held, limit=limit)
        self.holding[msg.sender] = held + cost
        return cost

    def _unhold(self, sender: str, cost: int) -> None:
        left = self.holding.get(sender, 0) - cost
        if left > 0:
            self.holding[sender] = left
        else:
            self.holding.pop(sender, None)

    def _answer_when(self, pending: Pending | None, route, msg: Message, reply: Message, leases=None,
                     cost: int = 0) -> None:
        """Send ``reply`` once every replica holds the push, or the refusal if one did not."""
        def done(err) -> None:
            self.counters["not_replicated"] = self.acks.not_replicated
            self._unhold(msg.sender, cost)
            if err is None:
                self.outbox.append(Reply(route, reply, leases=leases or []))
            else:
                self.outbox.append(Refuse(route, msg, err))
        if pending is None:
            done(None)
        else:
            self.acks.wait(pending, done)

    def on_push(self, route, msg: Message, now: float) -> None:
        self._admit(msg)
        table = self._table(msg)
        rows = self._rows(msg, table, with_values=True)
        self.counters["push"] += 1
        cost = self._hold(msg)
        try:
            pending = self._push(msg, table, rows, now)
        except Exception:
            self._unhold(msg.sender, cost)
            raise
        self._answer_when(pending, route, msg, msg.reply(ring=self.ring.version, meta=_kept(rows)), cost=cost)

    def _check_reply_size(self, table: Table, rows: Rows) -> None:
        size = rows.count * table.width * table.dtype.itemsize
        if size > self.config.limits.max_message_bytes:  # the client could not take the answer
            raise MessageTooLargeError(f"the reply would be {size} bytes, over max_message_bytes "
                                       f"{self.config.limits.max_message_bytes}; pull fewer keys at a time")

    def _answer_pull(self, route, msg: Message, table: Table, rows: Rows, now: float,
                     after: Pending | None = None, cost: int = 0, pf: dict | None = None,
                     gated: bool = True) -> None:
        """Answer a pull, or a pushpull's pull part, once the consistency gate lets it run
        (``gated`` False: it already did, for an older client's pushpull held whole)."""
        version = self.ring.version

        def run() -> None:
            if self.ring.version != version and rows.count:
                # held by the gate across a ring change, which may have moved its rows away
                # (a final ring drops what we no longer hold): answer only if we still lead
                # them all, else refuse it whole and the worker re-cuts it by the new ring
                try:
                    self._check_primary(rows, now)
                except PsdError as err:  # not the owner any more, or its rows being restored
                    if msg.op == "pushpull":  # its push stands (applied, forwarded): refuse the pull part only
                        self.counters["pull_refused"] += 1
                        self._answer_when(after, route, msg, msg.reply(ring=self.ring.version, meta={
                            **(_kept(rows) or {}), PULL_REFUSED: refusal(err)}), cost=cost)
                        return
                    self._unhold(msg.sender, cost)
                    self.outbox.append(Refuse(route, msg, err))
                    return
            self.counters["keys_pulled"] += rows.count
            if pf is not None:  # filtered (psd.filters.pull): a copy of the rows, encoded
                self._unhold(msg.sender, cost)
                values = rows.pull_from(table) if rows.count else np.empty((0, table.width), table.dtype)
                try:
                    arrays, pr = self.pulls.encode(msg.sender, table.spec.name, rows.keys, values, pf, table.dtype)
                except Exception as err:  # noqa: BLE001 - answered, whatever it was: a pull the gate
                    # held runs inside another request's handler, which must not stop on it
                    self.pulls.forget(sender=msg.sender)
                    self.outbox.append(Refuse(route, msg, err))
                    return
                self.outbox.append(Reply(route, msg.reply(arrays=arrays, ring=self.ring.version,
                                                          meta={**(_kept(rows) or {}), "pr": pr})))
                return
            if after is None or after.settled:
                self._unhold(msg.sender, cost)
                leases: list = []
                values = rows.pull_from(table, leases) if rows.count else np.empty((0, table.width), table.dtype)
                if after is not None and after.error is not None:
                    self.outbox.append(Refuse(route, msg, after.error))
                    for lease in leases:
                        lease.release()
                    return
                self.outbox.append(Reply(route, msg.reply(arrays=[values], ring=self.ring.version, meta=_kept(rows)),
                                         leases=leases))
            else:  # pushpull: the pushed values must be on the replicas before we answer;
                # a copy, so that no lent view of the table waits that long (copy on write)
                values = rows.pull_from(table) if rows.count else np.empty((0, table.width), table.dtype)
                self._answer_when(after, route, msg, msg.reply(arrays=[values], ring=self.ring.version,
                                                                  meta=_kept(rows)), cost=cost)

        if gated:
            self.policy(table).pull((msg.sender, msg.id), msg.sender, msg.clock, run, now)
        else:
            run()

    def on_pull(self, route, msg: Message, now: float) -> None:
        self._admit(msg)
        table = self._table(msg)
        rows = self._rows(msg, table, with_values=False)
        pf = msg.meta.get("pf")
        if pf is not None:
            pf = check_pf(pf, table.width)
            if rows.keys is None:
                raise ProtocolError("pull filters (meta.pf) need a key list; a pull by spans cannot name them")
        self._check_reply_size(table, rows)
        self._check_primary(rows, now)
        self.counters["pull"] += 1
        cost = self._hold(msg, rows.count * table.width * table.dtype.itemsize)
        self._answer_pull(route, msg, table, rows, now, cost=cost, pf=pf)

    def on_pushpull(self, route, msg: Message, now: float) -> None:
        self._admit(msg)
        table = self._table(msg)
        rows = self._rows(msg, table, with_values=True)
        self.counters["pushpull"] += 1
        cost = self._hold(msg, rows.count * table.width * table.dtype.itemsize)
        if msg.meta.get(PULL_REFUSABLE) is not True:
            self._pushpull_whole(route, msg, table, rows, now, cost)
            return
        try:
            pending = self._push(msg, table, rows, now)
        except Exception:
            self._unhold(msg.sender, cost)
            raise
        self._answer_pull(route, msg, table, rows, now, after=pending, cost=cost)

    def _pushpull_whole(self, route, msg: Message, table: Table, rows: Rows, now: float, cost: int) -> None:
        """A pushpull from a client that does not take ``pull_refused`` (no
        ``meta.pull_refusable``: one older than decision 129): the gate holds it whole, and
        its push is applied only when its pull part may run. ``_push`` checks the primary
        then, so a ring change that took its rows meanwhile refuses it whole, ``not_owner``,
        with nothing applied, and the client re-cuts and sends it again as it always did
        (decision 143). Not held, it runs at once, as a new client's does."""
        try:
            self._check_primary(rows, now)  # misrouted: refused now, not once released
        except Exception:
            self._unhold(msg.sender, cost)
            raise
        inline = [True]

        def run() -> None:
            try:
                pending = self._push(msg, table, rows, now)  # (released: the gate keeps it in order)
            except Exception as err:
                self._unhold(msg.sender, cost)
                if inline[0]:
                    raise
                # (released by another request's handler, which must not stop on it)
                self.outbox.append(Refuse(route, msg, err))
                return
            self.policy(table).after_push((msg.sender, msg.id), msg.sender, msg.clock, lambda: self._answer_pull(
                route, msg, table, rows, now, after=pending, cost=cost, gated=False), now)

        self.policy(table).pull((msg.sender, msg.id), msg.sender, msg.clock, run, now, pushes=True)
        inline[0] = False

    def on_clock(self, route, msg: Message, now: float) -> None:
        """A worker finished an iteration; one-way (no reply), sent after its pushes."""
        self._admit(msg)
        clock = msg.meta.get("clock")
        if not isinstance(clock, int) or isinstance(clock, bool) or clock < 0:
            raise ProtocolError("clock: meta.clock must be a non-negative integer")
        synced = msg.ring >= self.sync_version
        self.gate.clock(msg.sender, clock, now, synced)
        if not synced:  # (its clock counts once it knows the ring we took ranges over in)
            raise StaleRingError(f"{msg.sender}'s clock {clock} was sent at ring v{msg.ring}, before ring "
                                 f"v{self.sync_version} gave {self.node_id} ranges; ask the scheduler for the ring",
                                 ring=self.ring.version)

    # -- replication -------------------------------------------------------------
    def on_replicate(self, route, msg: Message, now: float) -> None:
        """A primary forwards a push it applied; apply it the same way, once."""
        self._daemons_only(msg)
        self._admit(msg)
        self.fence.heard(msg.sender, now)
        table = self._table(msg)
        rows = self._rows(msg, table, with_values=True, cached=False)  # (forwards carry their keys)
        origin, rid = msg.meta.get("origin"), _request_id(msg.meta.get("rid"), "replicate: meta.rid")
        if not isinstance(origin, str):
            raise ProtocolError("replicate: meta.origin must name the worker that pushed")
        cover = _cover(msg.meta.get("cover"), rows)
        self._check_forwarder(msg, rows)
        mine = held = self._replica_rows(rows, msg)
        if rid is not None:
            cut_from = self._cut_from(msg, origin)
            if self._seen_before((origin, rid), cut_from):
                self._answer_forward(route, msg, table, held, None)
                return
            if mine is not None:
                mine = self.partly.not_applied(mine, [(origin, rid), *cut_from])
            if cover is None:
                self.seen.add(origin, rid)
            else:  # part of the request: its id counts for these rows only (decision 97)
                self.partly.note_ranges(origin, rid, cover)
                self.seen.note_activity(origin)
            self.partly.note_piece(rows, cut_from)
        if mine is not None:
            # a replica never refuses a forward (copies would differ); near its limit it says
            # so, and its primaries refuse pushes that add keys to its ranges from then on
            limit = self.config.limits.max_memory_bytes
            self._apply_push(msg, table, mine, origin, 0 if limit is None else mine.count * table.row_bytes,
                             () if rid is None else _own_ids((origin, rid), cut_from))
        self._answer_forward(route, msg, table, held, mine)

    def _answer_forward(self, route, msg: Message, table: Table, held: Rows | None, todo: Rows | None) -> None:
        """Answer a forward: whether we are full, and for an evicting table whether we
        applied rows of it now or had before (``Bounds.applied``)."""
        meta = self._replica_full()
        if table.bounded is not None:
            meta = {**meta, **self.bounds.applied(table, held, todo)}
        self.outbox.append(Reply(route, msg.reply(meta=meta)))

    def on_evict(self, route, msg: Message, now: float) -> None:
        """A primary's eviction record (psd.core.bounds)."""
        self.outbox.append(Reply(route, self.bounds.on_evict(route, msg, now)))

    def on_align(self, route, msg: Message, now: float) -> None:
        """A primary that leads keys anew sends its rows' keys and digests, for us to
        compare at this point of its forwards (``Bounds.align_here``); only at its ring,
        so nothing its predecessor sends is applied here after it."""
        table = self.bounds.peers_table(msg, now)
        if len(msg.arrays) != 2 or any(a.dtype != np.uint64 or a.ndim != 1 for a in msg.arrays) \
                or msg.arrays[0].size != msg.arrays[1].size or msg.arrays[0].size > self.config.limits.max_keys:
            raise ProtocolError("align: expects two uint64 frames of as many entries (keys, digests), at most "
                                "limits.max_keys")
        keys, digests = msg.arrays
        check_sorted_unique(keys)
        cover = _cover(msg.meta.get("cover"), Rows(keys=keys), "align")
        if msg.ring != self.ring.version:
            raise StaleRingError(f"align from {msg.sender} at ring v{msg.ring}; {self.node_id} is at "
                                 f"v{self.ring.version}: send it again at our ring", ring=self.ring.version)
        differ = self.bounds.align_here(table, msg.sender, cover, keys, digests)
        self.outbox.append(Reply(route, msg.reply(arrays=[differ])))

    def _check_forwarder(self, msg: Message, rows: Rows) -> None:
        """Refuse a forward from a server that, at our newer ring, no longer leads its rows:
        we took them over (or another did), and what we acknowledged for it would not be
        on our own replicas. The primary then tells its worker ``not_owner``."""
        if msg.ring >= self.ring.version or not rows.count:
            return
        for owners, _ in rows.groups(self.ring):
            if owners[0] != msg.sender and self.node_id in owners:
                first, last = rows.first_last()
                raise NotOwnerError(f"{msg.sender} does not lead keys in [{first}, {last}] at ring "
                                    f"v{self.ring.version} ({owners[0]} does); its forward was not applied",
                                    ring=self.ring.version)

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
    def on_transfer(self, msg: Message, now: float) -> None:
        """Copy a range to another server. The copy is taken and queued in one step, on
        the stream our forwards to that server use, so the receiver can tell which
        forwards the copy already contains."""
        r = range_from_wire(msg.meta["range"])
        dst, address = msg.meta["dst"], msg.meta["address"]
        # every message of the copy is at most half of max_message_bytes of frames (and
        # holds at least one row), so a range of any size can move; all are taken and
        # queued in this one step, in order, on the stream our forwards use
        budget = max(1, self.config.limits.max_message_bytes // 2)
        self._copies_sent += 1
        attempt = f"{self.node_id}.{self._copies_sent}"  # (the receiver tells two tries of one range apart)
        sends = []
        for name, table in self.tables.items():
            keys, vals, state = table.snapshot(r.begin, r.end)
            meta = {"range": range_to_wire(r), "copy": attempt, "state_fields": list(state)}
            row_bytes = keys.itemsize + vals.itemsize * table.width * (1 + len(state))
            step = max(1, min(budget // row_bytes, self.config.limits.max_keys))  # frames: <= max_keys rows
            for i in range(0, max(keys.size, 1), step):  # an empty range still sends one
                sends.append(Message("install", table=name, ring=self.ring.version, meta=dict(meta),
                                     arrays=[keys[i:i + step], vals[i:i + step],
                                             *(a[i:i + step] for a in state.values())]))
        # then the pushes the consistency gate keeps for the clock boundary (sequential):
        # not in the rows yet, they travel along and wait there for the same boundary
        for clock, kept in self.gate.kept():
            inside = _rows_in(kept.rows, r) if kept.rows is not None else None
            if inside is not None:
                meta = {"range": range_to_wire(r), "copy": attempt, "kept": clock, "origin": kept.origin}
                if kept.ids:  # (so that the receiver's snapshots leave them out too: _checkpoint_ids)
                    meta["ids"] = [list(i) for i in kept.ids]
                sends.append(Message("install", table=kept.table, ring=self.ring.version, meta=meta,
                                     arrays=[inside.keys, inside.values]))
        # last: the ids the copy carries, the last message marks the range complete
        pieces = id_pieces(*self._seen_for_copy(r), budget, self.config.limits.max_keys)
        for j, (senders, counts, rids) in enumerate(pieces):
            meta = {"range": range_to_wire(r), "copy": attempt, "senders": senders}
            departed = [s for s in senders if s in self.forgetting]
            if departed:  # the receiver was never told they left: it forgets them once quiet too
                meta["departed"] = departed
            if j == len(pieces) - 1:
                meta["final"] = True
            sends.append(Message("install", ring=self.ring.version, arrays=[counts, rids], meta=meta))
        copy = _Copy(self, msg, r, dst, len(sends), now)
        self._copies[copy] = None
        for m in sends:
            copy.calls.append(self.calls.ask(dst, address, m, copy.answered, now))

    def _drop_rows_in(self, r: Range) -> None:
        """Forget every row we hold in ``r`` (a copy of it is arriving), in every table:
        not only those that evict (``Bounds.copy_begins``), since a push the copy's source
        keeps for the clock boundary may be in the rows we kept too."""
        outside = [x for x in (Range(0, r.begin), Range(r.end, KEY_SPACE_END)) if x.begin < x.end]
        for name, table in self.tables.items():
            held = table.num_keys and table.count_present_span(r.begin, r.end - r.begin)
            dropped = table.retain(outside) if held else 0
            if dropped:
                log.info("%s: dropped %d keys of %r in %s before its copy arrives", self.node_id, dropped, name, r)

    def _checked_kept(self, msg: Message, r: Range) -> tuple | None:
        """A push the copy's source kept for the clock boundary, checked whole: the
        arguments of ``_keep_or_apply`` (None: its table was dropped here). ``meta.ids``:
        those it counts as applied under (``Kept.ids``; none from an older peer)."""
        clock, origin, ids = msg.meta.get("kept"), msg.meta.get("origin"), msg.meta.get("ids", [])
        if not isinstance(clock, int) or isinstance(clock, bool) or clock < 0 or not isinstance(origin, str):
            raise ProtocolError("install: meta.kept must be a clock (an integer >= 0) and meta.origin a worker")
        if not isinstance(ids, list) or not all(_is_id(i) for i in ids):
            raise ProtocolError("install: meta.ids must list [sender, request id] pairs")
        if msg.table not in self.tables and msg.table in self.dropped:
            return None
        table = self._table(msg)
        rows = Rows.from_message(msg, self.config.limits, with_values=True)
        rows.values = table.check_values(rows.values, rows.count)
        if rows.count and (int(rows.keys[0]) < r.begin or int(rows.keys[-1]) >= r.end):
            raise ProtocolError(f"install: kept push rows fall outside the range {r}")
        return table, rows, origin, clock, 0, tuple((s, rid) for s, rid in ids)

    def _seen_for_copy(self, r: Range) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The ids a copy of ``r`` carries: every id applied here, and those copied in
        with rows in ``r``."""
        self.partly.age(self.seen)
        extra = self.partly.copied_into(r) + self.partly.once_ids_in(r)
        bulk = self.partly.bulk_into(r)
        if not extra and not bulk:
            return self.seen.to_arrays()
        few: dict[str, list[int]] = {}
        for sender, rid in extra:
            few.setdefault(sender, []).append(rid)
        return union_of_ids([self.seen.by_sender(), *bulk, few])

    def on_install(self, route, msg: Message, now: float) -> None:
        self._daemons_only(msg)
        self._admit(msg)
        self.fence.heard(msg.sender, now)
        r = copy_range(msg.meta.get("range"))
        attempt = msg.meta.get("copy")
        # the message checked whole before anything changes: a malformed one, or one for a
        # table we do not know, must not begin a copy (which drops what we hold of r)
        kept = rows = ids = None
        if msg.table is not None and "kept" in msg.meta:
            kept = self._checked_kept(msg, r)
        elif msg.table is not None:
            if msg.table in self.tables or msg.table not in self.dropped:
                table = self._table(msg)
                rows = copy_rows(msg, table, r)
        elif "senders" in msg.meta or msg.meta.get("final"):
            ids = copy_ids(msg)
            departed = msg.meta.get("departed", [])
            if not isinstance(departed, list) or not all(isinstance(d, str) for d in departed):
                raise ProtocolError("install: meta.departed must list senders of this message")
        if msg.ring < self.ring.version:
            # a late copy from an attempt the scheduler gave up on (its source stalled, not
            # dead): every server takes each attempt's joint ring before its copies start,
            # so a live attempt's source is at our version. Taken, it would replace what a
            # later attempt, or our own forwards since, brought.
            raise StaleRingError(f"install of {r} from {msg.sender} was sent at ring v{msg.ring}; {self.node_id} "
                                 f"is at v{self.ring.version}, where a newer copy attempt (or none) is under way",
                                 ring=self.ring.version)
        if self._copying_in.get(r, ()) != attempt:
            # a copy of r begins (or begins again): what it brings (rows, and the pushes its
            # source keeps for the clock boundary) replaces what we had of r, kept pushes and
            # rows too: rows we kept under a name we had before registering again may hold
            # pushes the source still keeps for the clock boundary, which would apply twice
            self._copying_in[r] = attempt
            self._narrow_kept(lambda rows: _rows_in(rows, r, outside=True))
            self.bounds.copy_begins(r)
            self._drop_rows_in(r)
        if msg.table is not None:
            if kept is not None:
                self._keep_or_apply(*kept)
            elif rows is not None:
                # never refused for memory: the ring moves this range here whatever we answer,
                # so a refusal would lose it; over the limit, new keys are refused instead.
                # A chunk of the copy: rows are upserted, so chunks add up to the whole range
                table.install(*rows)
            self.outbox.append(Reply(route, msg.reply()))
            return
        if ids is None:
            self.outbox.append(Reply(route, msg.reply()))  # neither rows nor ids: nothing to do
            return
        # the ids the copy carries (in one or more messages, the last one final); they count
        # only for rows in ``r``, which we neither lead nor apply forwards for until the final one
        senders, counts, rids = ids
        self.partly.note_copy(r, senders, counts, rids)
        for sender in senders:  # (ids arriving count as the sender's activity here)
            self.seen.note_activity(sender)
        for worker in sorted(set(departed) & set(senders)):
            self._watch_departed(worker, now)
        if msg.meta.get("final"):
            self._copying_in.pop(r, None)
            self.incoming = [x for x in self.incoming if x != r]
            log.info("%s now holds %s (copied in, ring v%d)", self.node_id, r, self.ring.version)
            self._warn_over_limit(f"taking {r}")
        self.outbox.append(Reply(route, msg.reply()))

    # -- checkpoints -------------------------------------------------------------------
    def on_ckpt_hold(self, msg: Message, now: float) -> None:
        """Phase 1: from now on apply nothing new; say the highest clock pushed so far.
        A cut still under way here is an earlier checkpoint's, abandoned (its scheduler
        restarted, or a standby took over): it ends first, or its snapshot or timeout
        would release this hold later."""
        within = msg.meta.get("within")
        bounded = _is_number(within) and within > 0
        if self._cut_under_way():
            log.warning("%s ends an earlier checkpoint's cut: a new checkpoint begins", self.node_id)
            self._checkpoint = None
            self._release_cut_logged()
        highest = self.gate.hold_all()
        self._hold_until = now + within if bounded else float("inf")  # (an older scheduler's: no bound)
        log.info("%s holds new pushes for a checkpoint (highest push clock so far: %d)", self.node_id, highest)
        self.outbox.append(Reply(None, msg.reply(meta={"max_push_clock": highest}), LINK))

    def _hold_lapsed(self, now: float) -> None:
        """No cut came within the hold's bound (``meta.within``): a hold or a cut lost with
        a connection, or a scheduler that died. Every push here has waited since the hold
        began, acknowledged and unreadable; let them through, and refuse the cut if it
        comes after all (the checkpoint fails, and is taken again)."""
        log.warning("%s lets through the pushes it held for a checkpoint: no cut came within the hold's bound",
                    self.node_id)
        self._hold_until = None
        self._release_cut_logged()

    def _release_cut_logged(self) -> None:
        """Let what a cut held through where no request is answered (the tick, a
        registration): a released request's callback that raises is logged; the release
        itself finished (``Gate.release_cut``)."""
        try:
            self.gate.release_cut()
        except Exception:  # noqa: BLE001 - a failed callback must not stop the timers
            log.exception("%s: a request the checkpoint cut let through failed", self.node_id)

    def on_ckpt_cut(self, msg: Message, now: float) -> None:
        """Phase 2: write the ranges we lead as of the cut, once every worker's pushes of
        earlier clocks have arrived. Pushes at later clocks wait until the file is written."""
        m = msg.meta
        try:  # (checked before any state changes: a bad cut leaves the hold and its bound as they were)
            at, timeout, workers = int(m["cut"]), float(m.get("timeout", 60)), set(m.get("workers", []))
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"ckpt_cut: bad meta ({type(err).__name__}: {err}); it needs cut (an int), "
                                f"timeout (seconds) and workers (a list of ids)") from None
        if self._hold_until is None:
            raise UnavailableError(f"{self.node_id} holds no pushes for this checkpoint (its hold lapsed or was "
                                   f"released before the cut came); take it again")
        self._hold_until = None
        if self.node_id not in self.ring.servers:
            # we hold no range (joined, our join's ring change waiting for this checkpoint):
            # no worker sends us pushes or clocks, so none is waited for; the file is empty
            workers = set()
        cut = _Cut(self, msg, now + timeout)
        self._checkpoint = cut
        self.gate.cut(at, workers, cut.snapshot)

    def on_ckpt_release(self, msg: Message, now: float) -> None:
        """The checkpoint failed (another server's step did, say): let the held pushes
        through, and drop a cut under way here, whose timeout would otherwise release a
        later checkpoint's hold."""
        self._hold_until = None
        self._checkpoint = None
        self.gate.release_cut()
        self.outbox.append(Reply(None, msg.reply(), LINK))

    def _drop_checkpoint(self) -> None:
        """We were removed from the cluster: a checkpoint we held pushes for failed without
        us (the scheduler's release, sent to our old name, may never come), or went on
        without us. Let its held pushes through; a cut under way is not written."""
        if self._cut_under_way():
            log.warning("%s lets through the pushes it held for a checkpoint: it was removed from the cluster",
                        self.node_id)
        self._checkpoint = None
        self._hold_until = None
        self._release_cut_logged()

    def _cut_under_way(self) -> bool:
        """A checkpoint's cut waits here (for workers' clocks, or its file)."""
        return self._checkpoint is not None or any(p.cut is not None for p in self.gate.policies.values())

    def written(self, token: int, result, error: Exception | None, now: float) -> list:
        """A file the core asked for (``Write``) was written, or failed."""
        cut = self._checkpoint
        if cut is not None and cut.token == token:
            cut.written(result, error)
        return self._take()

    def _checkpoint_tables(self) -> tuple[dict, int]:
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
        return tables, keys_total

    def _checkpoint_ids(self, led: list[Range]) -> list[AppliedIds]:
        """The ids of exactly the pushes a snapshot of ``led`` holds, as a copy of it
        would carry them (``_seen_for_copy``): those applied here (for every row we hold;
        copied in or forwarded in part, for some ranges; sender-free identities, for the
        ranges they have rows in), less those of pushes the gate still keeps or holds
        for the cut (noted on arrival, applied after the snapshot)."""
        if not led:
            return []
        waiting = {i for k in self.gate.waiting() for i in k.ids}
        self.partly.age(self.seen)
        groups = [(tuple(led), self.seen.to_arrays(waiting))]
        for shape, by_sender in [*self.partly.by_ranges().items(), *self.partly.bulk()]:
            inside = intersect(shape, led)
            if inside:
                groups.append((inside, arrays_of_ids(by_sender, waiting)))
        for r in led:
            once: dict[str, list[int]] = {}
            for sender, step in self.partly.once_ids_in(r):
                once.setdefault(sender, []).append(step)
            if once:
                groups.append(((r,), arrays_of_ids(once, waiting)))
        return [AppliedIds(tuple((r.begin, r.end) for r in ranges), *arrays) for ranges, arrays in groups]

    def restore(self, msg: Message, files: list[ServerFile], now: float) -> list:
        """Load the keys we hold (lead or replicate) from a checkpoint's files (read by
        the driver: ``load_server_file`` of each). The files' request ids replace ours for
        those keys: a push the checkpoint holds is not applied again when resent, one it
        lacks is. Ranges given to us empty (``meta.ranges``) are refused until served:
        with ``meta.hold`` (the scheduler's first step) they stay refused once loaded, and
        a ``meta.open`` without files (its second, once every copy loaded) serves them;
        without either (an older scheduler), they are served once loaded (decision 156)."""
        held = self.ring.ranges_of(self.node_id)
        only = msg.meta.get("ranges")
        if only is not None:  # ranges given to us empty: just those pieces of what we hold
            pieces = [range_from_wire(w) for w in only]
            held = list(intersect(held, pieces))
        if only is not None and msg.meta.get("open"):
            self._serve_restored(held)
            self.outbox.append(Reply(None, msg.reply(meta={"keys": 0}), LINK))
            return self._take()
        restored = 0
        self.bounds.at(now)
        try:
            ids = self._ids_to_restore(held, files, msg.meta.get("folder"))  # (built whole first)
            for loaded in files:
                for tname, (spec, keys, vals, state) in loaded.tables.items():
                    self._create(TableSpec.from_wire(spec))
                    table = self.tables[tname]
                    for r in held:
                        i0, i1 = bounds(keys, r.begin, r.end)
                        table.install(keys[i0:i1], vals[i0:i1], {f: a[i0:i1] for f, a in state.items()})
                        restored += int(i1 - i0)
        except Exception as err:
            self.outbox.append(Refuse(None, msg, err, LINK))
            return self._take()
        if ids is not None:
            self.partly.replace(self.seen, held, ids)
        if only is not None and not msg.meta.get("hold"):
            self._serve_restored(held)
        log.info("%s restored %d keys from %s", self.node_id, restored, msg.meta.get("folder"))
        self._warn_over_limit(f"restoring {msg.meta.get('folder')}")
        self.outbox.append(Reply(None, msg.reply(meta={"keys": restored}), LINK))
        return self._take()

    def _serve_restored(self, held: list[Range]) -> None:
        """Stop refusing the restored ranges that overlap ``held``."""
        self.restoring = [r for r in self.restoring if not any(r.begin < h.end and h.begin < r.end for h in held)]

    def _ids_to_restore(self, held: list[Range], files: list[ServerFile], folder) -> list | None:
        """The request ids the restored rows get, the files' (``_checkpoint_ids``), as
        ``PartlyApplied.replace`` takes them: ours, even those of pushes we applied to
        these rows while we held them before, count for them no more (None: nothing
        to replace)."""
        if not held:
            return None
        if any(f.ids is None for f in files):
            log.warning("%s: checkpoint %s was written without request ids (an older psd): a push it holds "
                        "whose answer was lost is applied again if its worker resends it", self.node_id, folder)
            return None
        return [(tuple(Range(b, e) for b, e in g.ranges), list(ids_by_sender(g.senders, g.counts, g.rids)))
                for f in files for g in f.ids]

    # -- introspection -------------------------------------------------------------
    def _warn_over_limit(self, why: str) -> None:
        limit = self.config.limits.max_memory_bytes
        if limit is not None and self.usage.bytes > limit:
            log.warning("%s holds %d bytes after %s, over its limits.max_memory_bytes %d: pushes that add "
                        "keys are refused until tables are dropped or servers added", self.node_id,
                        self.usage.bytes, why, limit)

    def stats(self, now: float) -> dict:
        """What ``psd status`` shows of this server (the daemon adds its transport's counts)."""
        return {
            "tables": {name: {"keys": t.num_keys, "bytes": t.nbytes, **t.bounded_stats()}
                       for name, t in self.tables.items()},
            "counters": dict(self.counters),
            "ring": self.ring.version,
            "leads": len(self.ring.led_by(self.node_id)), "holds": len(self.ring.ranges_of(self.node_id)),
            "pending_acks": len(self.acks), "copying_in": len(self.incoming),
            "seen_senders": len(self.seen.senders() | self.partly.senders()),
            "key_cache": self.keycache.stats(),
            "pull_filters": self.pulls.stats(),
            "memory": {"bytes": self.usage.bytes, "limit": self.config.limits.max_memory_bytes,
                       "reserved": self.reserved, "full_replicas": sorted(self.full_replicas)},
            "consistency": self.gate.stats(),
            "peers": self.fence.report(self.ring.servers, self.node_id, now),
            "serving": self.serving(now),
        }

    def log_clock(self) -> int | None:
        """For log records (read from any thread): the slowest worker clock the
        consistency gate knows."""
        return self.gate.policies[self.gate.default].clocks.min_clock_now()


def _is_number(value) -> bool:
    """An int or a float from a message's meta (msgpack's True is an int to isinstance)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cover(value, rows: Rows, op: str = "replicate") -> list[Range] | None:
    """``replicate``'s (or ``align``'s) ``meta.cover`` (nil, or ascending disjoint
    ``[first, last]`` key pairs holding every row of the forward) as ranges; checked whole
    before anything is applied, since a row outside it would be applied again if the
    request came back."""
    if value is None and op == "replicate":
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_COVER:
        raise ProtocolError(f"{op}: meta.cover must be a list of 1 to {MAX_COVER} [first, last] key pairs")
    out: list[Range] = []
    for pair in value:
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_RID for v in pair)
                or pair[0] > pair[1] or (out and pair[0] < out[-1].end)):
            raise ProtocolError(f"{op}: meta.cover must hold ascending, disjoint [first, last] pairs of keys "
                                f"(uint64, first <= last); got {pair!r:.80}")
        out.append(Range(pair[0], pair[1] + 1))
    if rows.count:  # (the pairs are disjoint: every row is inside iff they hold n rows between them)
        los = np.array([r.begin for r in out], dtype=np.uint64)
        his = np.array([r.end - 1 for r in out], dtype=np.uint64)
        if rows.keys is not None:
            inside = np.searchsorted(rows.keys, his, side="right") - np.searchsorted(rows.keys, los)
            ok = int(inside.sum()) == rows.count
        else:
            firsts = np.array([lo for lo, _ in rows.spans], dtype=np.uint64)
            lasts = np.array([lo + n - 1 for lo, n in rows.spans], dtype=np.uint64)
            at = np.searchsorted(los, firsts, side="right") - 1
            ok = not (at < 0).any() and not (lasts > his[np.maximum(at, 0)]).any()
        if not ok:
            raise ProtocolError(f"{op}: meta.cover does not hold every row of the message")
    return out


def _resendable(call: Call) -> bool:
    """A call whose answer alone was lost that may go again: a forward with a request id."""
    return call.msg.op == "replicate" and call.msg.meta.get("rid") is not None


def _kept(rows: Rows) -> dict | None:
    """A reply's ``meta.kc``: the signature under which we keep the request's keys (it
    asked, ``meta.kcs``), which the sender may name them by from now on."""
    return None if rows.sig is None else {"kc": rows.sig}


class Kept:
    """A push the consistency gate keeps for the clock boundary: the rows still to apply
    here (narrowed when a range leaves, a copy of it arrives, or its primary evicts keys)."""

    __slots__ = ("table", "rows", "origin", "ids")

    def __init__(self, table: str, rows: Rows | None, origin: str, ids: tuple[tuple[str, int], ...] = ()):
        """``ids``: those the push counts as applied under (``_own_ids``; a copy brings
        them along with the push)."""
        self.table, self.rows, self.origin, self.ids = table, rows, origin, ids


def _own_ids(rid: tuple[str, int] | None, cut_from: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """The ids a push counts as applied under once applied here: its own and its
    sender-free identity (``ONCE``), not those of the requests it was cut from."""
    return (*(() if rid is None else (rid,)), *(i for i in cut_from if i[0].startswith(ONCE)))


def _is_id(i) -> bool:
    """A request id on the wire: [sender, rid >= 0]."""
    return (isinstance(i, list) and len(i) == 2 and isinstance(i[0], str) and isinstance(i[1], int)
            and not isinstance(i[1], bool) and i[1] >= 0)


def _rows_in(rows: Rows, r: Range, outside: bool = False) -> Rows | None:
    """The rows of ``rows`` with keys in ``r`` (or, ``outside``, not in it), as keys and
    values; None when there are none."""
    keys = rows.keys if rows.keys is not None else np.concatenate(
        [np.arange(lo, lo + n, dtype=np.uint64) for lo, n in rows.spans]) if rows.spans else np.empty(0, np.uint64)
    i0, i1 = bounds(keys, r.begin, r.end)
    if not outside:
        return None if i0 == i1 else Rows(keys=keys[i0:i1], values=rows.values[i0:i1])
    if i0 == 0 and i1 == keys.size:
        return None
    if i0 == i1:
        return rows
    return Rows(keys=np.concatenate([keys[:i0], keys[i1:]]), values=np.concatenate([rows.values[:i0],
                                                                                    rows.values[i1:]]))


class _Copy:
    """A range copy this server sends (``transfer``): answered to the scheduler when every
    message of it was answered; failed when one is refused, or when one is not answered
    within request_timeout of the one before (a copy may take as long as it needs while
    it progresses)."""

    def __init__(self, core: ServerCore, request: Message, r: Range, dst: str, count: int, now: float):
        self.core, self.request, self.r, self.dst = core, request, r, dst
        self.calls: list[Call] = []
        self.left = count
        self.deadline = now + core.config.request_timeout

    def answered(self, call: Call, reply: Message | None, error: Exception | None, now: float) -> None:
        if self not in self.core._copies:
            return
        if error is not None or reply.op == "error":
            why = str(error) if error is not None else reply.meta.get("message")
            self._end(BadRequestError(f"{self.dst} refused the copy of {self.r}: {why}"))
            return
        self.left -= 1
        self.deadline = now + self.core.config.request_timeout
        if self.left == 0:
            log.info("%s copied %s to %s (%d table(s), %d message(s))", self.core.node_id, self.r, self.dst,
                     len(self.core.tables), len(self.calls))
            self._end(None)

    def check(self, now: float) -> None:
        if now >= self.deadline:
            self._end(PsdTimeoutError(f"{self.dst} did not answer a message of the copy of {self.r} within "
                                      f"{self.core.config.request_timeout} s"))

    def _end(self, err: PsdError | None) -> None:
        core = self.core
        core._copies.pop(self, None)
        for call in self.calls:
            core.calls.forget(call)
        if err is None:
            core.outbox.append(Reply(None, self.request.reply(), LINK))
        else:
            core.outbox.append(Refuse(None, self.request, err, LINK))


class _Cut:
    """A checkpoint cut in progress: the gate calls ``snapshot`` once every worker passed
    the cut; the file is written by the driver (``Write``) and answered when done."""

    _tokens = 0

    def __init__(self, core: ServerCore, request: Message, give_up_at: float):
        self.core, self.request, self.give_up_at = core, request, give_up_at
        _Cut._tokens += 1
        self.token = _Cut._tokens
        self.done = False

    def snapshot(self) -> None:
        core, m = self.core, self.request.meta
        self.give_up_at = float("inf")  # taken: only the write is left
        tables, keys = core._checkpoint_tables()
        ids = core._checkpoint_ids(core.ring.led_by(core.node_id))
        path = Path(m["folder"]) / f"{core.node_id}.psd"
        node, ring, cut = core.node_id, core.ring.version, m["cut"]

        def write(path=path) -> dict:
            size = write_server_file(path, node, ring, cut, tables, ids)
            log.info("%s wrote checkpoint %s: %d keys, %d bytes (cut at clock %d)", node, path, keys, size, cut)
            return {"file": path.name, "bytes": size, "keys": keys}

        core.outbox.append(Write(self.token, str(path), write))

    def written(self, result, error: Exception | None) -> None:
        core = self.core
        core._checkpoint = None
        if error is None:
            core.outbox.append(Reply(None, self.request.reply(meta=result), LINK))
        else:  # reported to the scheduler, which fails the checkpoint
            core.outbox.append(Refuse(None, self.request, error, LINK))

    def time_out(self) -> None:
        core, m = self.core, self.request.meta
        core._checkpoint = None
        try:
            lagging = core.gate.lagging(m["cut"], m.get("workers", []))
            if not lagging:  # (sequential: pushes below the cut wait for a worker not yet registered)
                lagging = [f"the group's slowest (clock {core.gate.policies[core.gate.default].clocks.min_clock()})"]
            core.outbox.append(Refuse(None, self.request, PsdTimeoutError(
                f"{core.node_id}: worker(s) {', '.join(lagging)} did not reach clock {m['cut']} in time; a checkpoint "
                f"cuts at a clock boundary, so every worker must call kv.clock() after its pushes"), LINK))
        finally:  # (the refusal first, which a callback's error must not lose; the release whatever happens)
            core._release_cut_logged()

"""A worker's request logic, as a state machine with no I/O.

``ClientCore`` cuts each request by the ring into one part per primary server (all the
ranges it leads, whatever their replicas: one message, not one per owner tuple), numbers the
parts in each server's stream (``psd.core.stream``), and decides, for every answer,
whether the request is done, must be sent again, or has failed. It never touches a
socket or reads the clock: calls take the time and return effects (``Send``, ``Done``,
``AskRing``), which ``psd.client.aio`` (or the simulation) carries out.

Order is the point. Parts leave in the order their requests were issued, and a part that
must be sent again (refused, or moved by a ring change) goes out again *before* anything
issued after it: every later part waits behind it (``queue``). A server admits a
stream's parts only in order, and after refusing one it admits nothing more of that
stream until the worker starts a new epoch, so a pull never overtakes a push issued
before it, even when the push had to be sent twice. Pushes keep their request id when
sent again (each server applies a request once); a part cut into pieces by a newer ring
gives each piece a fresh id naming the original (``meta.orig``).
"""
from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.routing import Slices, by_primary
from psd.cluster.rows import Rows
from psd.codec import Message
from psd.codec.signature import KC_MIN_KEYS, key_ref
from psd.core.ids import next_rid
from psd.core.pushpull import PULL_REFUSABLE, pull_refused
from psd.core.stream import SEQ, Outbound, parse
from psd.errors import (BusyError, KeysUnknownError, NotOwnerError, NotReplicatedError, OutOfOrderError, PsdError,
                        PsdTimeoutError, UnavailableError, ValuesError, error_from_wire)
from psd.filters.pull import PullCopies
from psd.schema import TableSpec

log = logging.getLogger("psd.client")

#: how often an unanswered request checks whether the ring moved its keys
RETRY_TICK = 0.05
#: how often a request unanswered for long asks the scheduler for the ring
RING_POLL = 1.0
#: the longest pause between two sends of a part a server keeps refusing
MAX_BACKOFF = 0.5
#: a push of keys is cut into messages of at most this many bytes of payload (``_chunked``)
MAX_PUSH_BYTES = 2 << 20
#: errors after which the server expects the part again: the stream broke there
RESEND = (NotOwnerError.code, UnavailableError.code, BusyError.code, OutOfOrderError.code, KeysUnknownError.code)
#: key lists remembered per server as held there (key caching); the oldest are forgotten
KNOWN_PER_SERVER = 4096
#: ops whose keys may be named by signature (``meta.kc``)
CACHED_OPS = ("push", "pull", "pushpull")

# -- effects -----------------------------------------------------------------------------
@dataclass(slots=True)
class Send:
    """Send ``msg`` (id, sender and stream place set) to server ``server``."""

    server: str
    msg: Message


@dataclass(slots=True)
class Done:
    """Request ``ts`` finished: ``result`` (a pull's values; None for a push) or ``error``."""

    ts: int
    result: object
    error: PsdError | None


@dataclass(slots=True)
class AskRing:
    """Ask the scheduler for the current ring (``use_ring`` when it arrives)."""


# -- requests ------------------------------------------------------------------------------
class Part:
    """The piece of a request bound for one server: the request's rows in ``slices``."""

    __slots__ = ("request", "server", "slices", "msg", "rows", "sent_ring", "sent_at", "reply", "order", "cost",
                 "ref", "kc", "values")

    def __init__(self, request: "Request | None", server: str, slices: Slices, msg: Message, rows: Rows | None,
                 order: tuple) -> None:
        self.request, self.server, self.slices, self.msg, self.rows = request, server, slices, msg, rows
        self.sent_ring = 0
        self.sent_at = 0.0
        self.reply: Message | None = None
        self.order = order  # (issue number, index): where it goes in the send queue
        self.cost = 0  # bytes it holds on its server while unanswered (0: not counted now)
        self.ref: list | None = None  # [sig, count, first, last] of its keys (key caching), once computed
        self.kc: str | None = None  # how its keys last went: "kc" (by signature), "kcs" (whole, to keep)
        self.values: np.ndarray | None = None  # a filtered pull answer's rows, rebuilt (psd.filters.pull)


class Request:
    __slots__ = ("ts", "op", "spec", "n", "rows", "parts", "deadline", "not_replicated", "misrouted",
                 "backoff", "finished", "clock", "issue", "once")

    def __init__(self, ts: int, op: str, spec: TableSpec, rows: Rows, deadline: float, clock: int, issue: int,
                 once: list | None = None):
        self.ts, self.op, self.spec, self.rows, self.n = ts, op, spec, rows, rows.count
        #: [name, step]: a push's identity whoever sends it (a job's shard and step)
        self.once = once
        self.parts: list[Part] = []
        self.deadline = deadline
        self.not_replicated: Message | None = None  # the last such answer (raised at the deadline)
        self.misrouted = False
        self.backoff = RETRY_TICK / 4
        self.finished = False
        self.clock = clock
        self.issue = issue


class ClientCore:
    def __init__(self, node_id: str, request_timeout: float, ring: Assignment | None = None):
        self.node_id = node_id
        self.request_timeout = request_timeout
        self.ring = ring or Assignment(version=0)
        self.clock_value = 0
        self.outbox: list = []
        self.requests: dict[int, Request] = {}  # unfinished, in issue order
        self.streams: dict[str, Outbound[Part]] = {}
        self.sent: dict[int, Part] = {}  # message id -> part awaiting its answer
        #: parts waiting to be sent, in issue order: nothing leaves before the head
        self.queue: list[Part] = []
        self.hold_until = 0.0  # the queue waits until then (a refusal's pause, a ring to come)
        self.awaiting_ring = False
        self.retries: list[tuple[float, Part]] = []  # not_replicated parts: (when, part)
        self._ts = itertools.count(1)
        self._issue = itertools.count(1)
        self._ids = itertools.count(1)
        self._next_poll = 0.0
        self.resent = 0  # parts sent again (refused, moved, out of order)
        #: bytes a server may hold unanswered from us (limits.max_inflight_bytes), and what
        #: each holds now: a part that would pass it waits at the head of the queue
        self.budget = 64 << 20
        self.inflight: dict[str, int] = {}
        #: requests whose part may have been served already when it was sent again (its
        #: answer lost with a dropped connection): a pull among them may see later pushes
        self.reread: set[int] = set()
        #: pulls sent again to another server (a ring change moved their keys): under
        #: ``sequential`` such a pull may also see pushes of its own clock, which the new
        #: owner applied as a replica before it (docs/consistency.md)
        self.rerouted: set[int] = set()
        #: servers declared dead that still hold the only copies of some ranges (the
        #: scheduler's word, with the ring): a request waiting on one fails as unavailable
        self.down: set[str] = set()
        #: key caching: send a key list of KC_MIN_KEYS or more keys whole once, asking the
        #: server to keep it, then by its signature; per server, the lists it said it keeps:
        #: (table, sig) -> (count, first, last). A ``keys_unknown`` refusal forgets them all
        self.key_caching = True
        self.kc_min_keys = KC_MIN_KEYS
        self.known: dict[str, OrderedDict] = {}
        self.kc_counters = {"by_signature": 0, "whole_to_keep": 0, "kept": 0, "refused": 0}
        #: copies of what servers sent in filtered pull answers, to rebuild deltas
        self.pull_copies = PullCopies()
        #: one message per server (what the rows' primaries lead, whatever the replicas);
        #: False: one per owner tuple, as before decision 97 (kept for bench_onemsg.py's
        #: side-by-side cell and to show the message-count test bites)
        self.one_message_per_server = True
        #: pushpulls say they take a ``pull_refused`` answer (``meta.pull_refusable``);
        #: False: they go as a client's older than decision 143 did, and a server holds
        #: them whole (the simulation's ``Settings.older_pushpull``)
        self.pull_refusable = True

    def _take(self) -> list:
        out = self.outbox[:]
        self.outbox.clear()
        return out

    # -- issuing -----------------------------------------------------------------------
    def issue(self, op: str, spec: TableSpec, rows: Rows, now: float, once: list | None = None) -> tuple[int, list]:
        """Issue a request: cut it by the ring and send (or queue) its parts. Returns its
        timestamp and the effects. ``once``: a push's ``[name, step]`` (``AsyncTable.push``)."""
        ts = next(self._ts)
        req = Request(ts, op, spec, rows, now + self.request_timeout, self.clock_value, next(self._issue), once)
        self.requests[ts] = req
        if rows.count == 0:
            self._finish(req, _result(req, [], []), None)
            return ts, self._take()
        self.queue.extend(self._plan(req, rows, [(0, rows.count)], None, None))
        self._flush(now)
        return ts, self._take()

    def clock(self, now: float) -> list:
        """Finish this worker's iteration: tell every server, after the iteration's pushes
        (same streams, so they are admitted first)."""
        self.clock_value += 1
        self._queue_clock()
        self._flush(now)
        return self._take()

    def _queue_clock(self) -> None:
        """Queue the current clock to every server of the ring, behind everything queued."""
        issue = next(self._issue)
        for i, node in enumerate(self.ring.addresses):
            self.queue.append(Part(None, node, [], self._clock_message(self.clock_value), None, (issue, i)))

    def _clock_message(self, value: int) -> Message:
        """Clock ``value`` at our ring. (Fields by position, in Message's order: one per
        server per clock, and keywords would cost a kwargs dict each.)"""
        return Message("clock", 0, "", None, self.ring.version, value, {"clock": value})

    def _plan(self, req: Request, rows: Rows, slices: Slices, rid, orig, op: str | None = None) -> list[Part]:
        """One part per primary server of ``rows`` (the request's rows at ``slices``) by
        the current ring (pushes of many keys in pieces: ``_chunked``), or one unplanned
        part (server "") when the ring has no servers. ``op``: the parts' op, when not
        the request's (a pushpull's pull part sent again alone: ``_pull_again``)."""
        op = op or req.op
        if not self.ring.ranges:
            part = Part(req, "", slices, Message(op), rows, (req.issue, len(req.parts)))
            req.parts.append(part)
            return [part]
        groups = self._by_server(rows)
        groups = _chunked(req, rows, groups, pack=self.one_message_per_server)
        if rid is not None and len(groups) > 1:
            orig = [*(orig or []), rid][-64:]  # pieces: fresh ids, naming the one they were cut from
        parts = []
        for server, sub_slices in groups:
            sub = rows.take(sub_slices)
            meta = {"rid": rid if rid is not None and len(groups) == 1 else next_rid()}
            if orig:
                meta["orig"] = orig
            if req.once is not None and op != "pull":
                meta["once"] = req.once
            if op == "pushpull" and self.pull_refusable:
                meta[PULL_REFUSABLE] = True  # (else a server holds it whole: decision 143)
            msg = sub.to_message(op, table=req.spec.name, ring=self.ring.version, clock=req.clock, meta=meta)
            part = Part(req, server, _compose(slices, sub_slices), msg, sub, (req.issue, len(req.parts)))
            req.parts.append(part)
            parts.append(part)
        return parts

    def _by_server(self, rows: Rows) -> list[tuple[str, Slices]]:
        """(server, row slices) of ``rows`` by the current ring: one per primary."""
        groups = rows.groups(self.ring)
        if self.one_message_per_server:
            return by_primary(groups)
        return [(owners[0], slices) for owners, slices in groups]

    # -- sending -------------------------------------------------------------------------
    def _flush(self, now: float) -> None:
        """Send queued parts, in order, until one cannot go yet."""
        if now < self.hold_until:
            return
        while self.queue:
            part = self.queue[0]
            req = part.request
            if req is not None and req.finished:
                self.queue.pop(0)
                continue
            if part.server == "":  # planned while the ring had no servers
                if not self.ring.ranges:
                    self._want_ring(now)
                    return
                self.queue.pop(0)
                req.parts.remove(part)
                self.queue[0:0] = self._plan(req, part.rows, part.slices, None, None, part.msg.op)
                continue
            if part.server not in self.ring.addresses:
                if req is None:  # a clock for a server that left: no longer needed
                    self.queue.pop(0)
                    continue
                self._want_ring(now)  # (a ring without its address: a newer one names it)
                return
            held = self.inflight.get(part.server, 0)
            if held and held + _cost(part) > self.budget:
                return  # (waits for answers to free the budget: nothing overtakes it)
            self.queue.pop(0)
            self._send(part, now)

    def _send(self, part: Part, now: float) -> None:
        stream = self.streams.get(part.server)
        if stream is None:
            stream = self.streams[part.server] = Outbound()
        msg = part.msg
        msg.id = next(self._ids)
        msg.sender = self.node_id
        msg.meta[SEQ] = stream.stamp(part)
        part.sent_ring = self.ring.version
        part.sent_at = now
        part.values = None
        self._unsent(part)
        part.cost = _cost(part)
        self.inflight[part.server] = self.inflight.get(part.server, 0) + part.cost
        self.sent[msg.id] = part  # (a clock is answered only when refused; it goes once admitted)
        self.outbox.append(Send(part.server, self._pull_base(part, self._keys_by_signature(part, msg))))

    def _keys_by_signature(self, part: Part, msg: Message) -> Message:
        """What goes on the wire for ``part``: its message, or (key caching) the same with
        its keys named by signature when the server said it keeps them; or whole, asking
        the server to keep them. ``part.msg`` keeps its keys for a resend either way."""
        part.kc = None
        rows = part.rows
        if (not self.key_caching or part.request is None or rows is None or rows.keys is None
                or rows.count < self.kc_min_keys or msg.op not in CACHED_OPS or not msg.arrays):
            return msg
        if part.ref is None:
            part.ref = key_ref(rows.keys)
        ref = part.ref
        known = self.known.get(part.server)
        held = known.get((msg.table, ref[0])) if known is not None else None
        if held is not None and held == (ref[1], ref[2], ref[3]):
            known.move_to_end((msg.table, ref[0]))
            part.kc = "kc"
            self.kc_counters["by_signature"] += 1
            return Message(msg.op, id=msg.id, sender=msg.sender, table=msg.table, ring=msg.ring, clock=msg.clock,
                           meta={**msg.meta, "kc": ref}, arrays=msg.arrays[1:], zstd=msg.zstd)
        part.kc = "kcs"
        self.kc_counters["whole_to_keep"] += 1
        return Message(msg.op, id=msg.id, sender=msg.sender, table=msg.table, ring=msg.ring, clock=msg.clock,
                       meta={**msg.meta, "kcs": True}, arrays=msg.arrays, zstd=msg.zstd)

    def _pull_base(self, part: Part, wire: Message) -> Message:
        """A filtered pull names the token of this worker's copy of what that server sent
        it (``meta.pf.b``), when it holds one: the server may then answer with the rows
        that changed only (psd.filters.pull)."""
        pf = wire.meta.get("pf") if wire.op == "pull" else None
        if pf is None:
            return wire
        pf = {k: v for k, v in pf.items() if k != "b"}
        token = self.pull_copies.token(part.server, wire.table)
        if token is not None:
            pf["b"] = token
        return Message(wire.op, id=wire.id, sender=wire.sender, table=wire.table, ring=wire.ring, clock=wire.clock,
                       meta={**wire.meta, "pf": pf}, arrays=wire.arrays, zstd=wire.zstd)

    def _kept(self, part: Part, reply: Message) -> None:
        """A success answer to keys sent whole to keep: the server keeps them when it
        names their signature (it may not: a collision, a list over its cache)."""
        if part.kc == "kcs" and part.ref is not None and reply.meta.get("kc") == part.ref[0]:
            known = self.known.setdefault(part.server, OrderedDict())
            known[(part.msg.table, part.ref[0])] = (part.ref[1], part.ref[2], part.ref[3])
            known.move_to_end((part.msg.table, part.ref[0]))
            self.kc_counters["kept"] += 1
            while len(known) > KNOWN_PER_SERVER:
                known.popitem(last=False)

    def _unsent(self, part: Part) -> None:
        """``part`` no longer holds its server's budget (answered, given up, sent again)."""
        if part.cost:
            left = self.inflight.get(part.server, 0) - part.cost
            if left > 0:
                self.inflight[part.server] = left
            else:
                self.inflight.pop(part.server, None)
            part.cost = 0

    def _want_ring(self, now: float) -> None:
        if not self.awaiting_ring:
            self.awaiting_ring = True
            self.outbox.append(AskRing())

    def _requeue(self, parts: list[Part], now: float) -> None:
        """Put parts back in the queue in their issue order (re-planned by the ring when
        their rows moved), ahead of everything issued after them."""
        fresh: list[Part] = []
        for part in parts:
            req = part.request
            if req is not None and req.finished:
                continue
            self.resent += 1
            if req is None:  # a clock: again to the same server, saying the same clock (it
                # vouches for the pushes before it, and goes again in its place among them)
                if part.server in self.ring.addresses:
                    part.msg = self._clock_message(part.msg.meta["clock"])
                    fresh.append(part)
                continue
            if self._moved(part):
                if req.op != "push":
                    self.rerouted.add(req.ts)
                req.parts.remove(part)
                fresh.extend(self._plan(req, part.rows, part.slices, part.msg.meta.get("rid"),
                                        part.msg.meta.get("orig"), part.msg.op))
            else:
                part.msg = self._again(part.msg)
                fresh.append(part)
        self.queue.extend(fresh)
        self.queue.sort(key=lambda p: p.order)

    def _again(self, msg: Message) -> Message:
        """``msg`` to send again as it was (its table's zstd stage too), at our ring, its
        stream place to be stamped anew."""
        return Message(msg.op, table=msg.table, ring=self.ring.version, clock=msg.clock,
                       meta={k: v for k, v in msg.meta.items() if k != SEQ}, arrays=msg.arrays, zstd=msg.zstd)

    def _moved(self, part: Part) -> bool:
        """Whether the current ring sends any of the part's rows elsewhere."""
        if part.rows is None or not self.ring.ranges:
            return False
        groups = part.rows.groups(self.ring)
        if self.one_message_per_server:
            return any(owners[0] != part.server for owners, _ in groups)
        return len(groups) != 1 or groups[0][0][0] != part.server

    # -- answers ---------------------------------------------------------------------------
    def answered(self, server: str, reply: Message | Exception, msg_id: int, now: float) -> list:
        """The answer to message ``msg_id`` (a decoded reply, or why it could not be read)."""
        part = self.sent.pop(msg_id, None)
        if part is None or part.server != server:
            if part is not None:
                self.sent[msg_id] = part
            return self._take()
        self._unsent(part)
        sq = parse(part.msg.meta.get(SEQ))
        stream = self.streams.get(server)
        if isinstance(reply, Exception):
            self._admitted(stream, sq)
            if part.request is not None:
                self._finish(part.request, None, reply if isinstance(reply, PsdError) else PsdError(str(reply)))
            self._flush(now)
            return self._take()
        code = reply.meta.get("code") if reply.op == "error" else None
        hint = (reply.meta.get("data") or {}).get("ring") if code is not None else None
        if isinstance(hint, int) and hint > self.ring.version:
            self._want_ring(now)  # the server acted on a newer ring than ours
        if code == KeysUnknownError.code:
            # the server lost (or never had) a list we named by signature: it restarted,
            # evicted it, or is another server now; send whole to it from here on
            self.known.pop(server, None)
            self.kc_counters["refused"] += 1
        if code in RESEND:
            if code == OutOfOrderError.code:
                resume = (reply.meta.get("data") or {}).get("from", 0)
                resume = resume if isinstance(resume, int) else 0
            else:
                resume = sq[1]
            # the stream hands back what it had not seen admitted; the refused part goes
            # again whatever the stream says (a refusal that came after its epoch was over
            # is still a refusal of this part, which is not in that epoch's list any more)
            back = (stream.refused(sq, resume) if stream is not None else None) or []
            for p in back:
                if p is not part:
                    self.sent.pop(p.msg.id, None)
                    self._unsent(p)
            if part not in back:
                back.insert(0, part)
            self._hold(part, reply, code, now)
            self._requeue(back, now)
        else:
            self._admitted(stream, sq)
            if part.kc == "kcs" and code is None:
                self._kept(part, reply)
            if part.request is not None:
                self._settle(part, reply, code, now)
        self._flush(now)
        return self._take()

    def _admitted(self, stream: Outbound | None, sq) -> None:
        """Everything up to ``sq`` was admitted: clocks among it need no answer."""
        if stream is None or sq is None:
            return
        for p in stream.admitted(sq):
            if p.request is None and self.sent.get(p.msg.id) is p:
                del self.sent[p.msg.id]
                self._unsent(p)

    def _hold(self, part: Part, reply: Message, code: str, now: float) -> None:
        """A refusal: the queue waits a moment (growing while the same request keeps being
        refused), and for the ring when the server knows a newer one."""
        if code in (OutOfOrderError.code, KeysUnknownError.code):
            return  # a lost message, or keys to send whole: send again at once
        req = part.request
        pause = RETRY_TICK / 4
        if req is not None:
            pause = req.backoff
            req.backoff = min(MAX_BACKOFF, req.backoff * 2)
            if code == NotOwnerError.code:
                req.misrouted = True
        ring = (reply.meta.get("data") or {}).get("ring")
        if code == NotOwnerError.code and (not isinstance(ring, int) or ring >= self.ring.version):
            self._want_ring(now)
        self.hold_until = max(self.hold_until, now + pause)

    def _settle(self, part: Part, reply: Message, code: str | None, now: float) -> None:
        req = part.request
        if req.finished:
            return
        if code == NotReplicatedError.code:
            if now < req.deadline:  # applied on the primary, not yet on a replica: the same again
                req.not_replicated = reply
                pause = max(0.0, min(1.0, req.backoff * 4, req.deadline - now))
                req.backoff = min(MAX_BACKOFF, req.backoff * 2)
                self.retries.append((now + pause, part))
                return
            self._finish(req, None, _error(reply))
            return
        if code is not None:
            self._finish(req, None, _error(reply))
            return
        if req.not_replicated is not None and not any(p.request is req for _, p in self.retries):
            req.not_replicated = None  # the part that was not replicated is now: no longer the error
        if part.msg.op == "pushpull":
            refused = pull_refused(reply)
            if refused is not None:
                self._pull_again(part, refused, now)
                return
        if "pr" in reply.meta:  # a filtered pull answer: rebuilt now, in the order the server sent
            try:
                part.values = self.pull_copies.decode(part.server, part.msg.table, part.rows.keys,
                                                      reply.meta["pr"], reply.arrays, req.spec.np_dtype,
                                                      req.spec.width)
            except PsdError as err:
                self._finish(req, None, err)
                return
            except Exception as err:  # a bug: fail this request loudly, read on
                log.exception("%s: could not rebuild a filtered pull answer from %s", self.node_id, part.server)
                self.pull_copies.forget(part.server)
                self._finish(req, None, PsdError(f"could not rebuild a filtered pull answer from {part.server}: "
                                                 f"{type(err).__name__}: {err}"))
                return
        part.reply = reply
        if all(p.reply is not None for p in req.parts):
            try:
                result = _result(req, req.parts, [p.reply for p in req.parts])
            except PsdError as err:
                self._finish(req, None, err)
                return
            self._finish(req, result, None)

    def _pull_again(self, part: Part, err: PsdError, now: float) -> None:
        """A pushpull part answered with its push acknowledged and its pull part refused
        (the gate held it while a ring change moved its rows: decision 129). The push is
        done and is never sent again; the part becomes a plain pull of the same rows, which
        goes again like any refused pull: in its place in the queue, to the owners by the
        ring (the one the refusal names, once we have it). Pulled by another server, it may
        see pushes issued after it (``rerouted``), as any pull sent again after a ring change."""
        req = part.request
        if err.code not in RESEND or part.rows is None:
            self._finish(req, None, err)
            return
        rows = part.rows
        part.rows = Rows(keys=rows.keys, spans=rows.spans, zstd=rows.zstd)
        part.msg = part.rows.to_message("pull", table=part.msg.table, ring=self.ring.version, clock=part.msg.clock,
                                        meta={"rid": next_rid()})
        self.rerouted.add(req.ts)
        self._hold(part, Message("error", meta={"data": err.data}), err.code, now)
        self._requeue([part], now)

    def _finish(self, req: Request, result, error: PsdError | None) -> None:
        if req.finished:
            return
        req.finished = True
        self.requests.pop(req.ts, None)
        for p in req.parts:
            if p.msg.id in self.sent and self.sent[p.msg.id] is p:
                del self.sent[p.msg.id]  # an answer still to come is ignored
                self._unsent(p)
            # the replies' arrays may be views of a server's shared memory, which goes back
            # to the server when the last of them dies: only the result keeps them now
            # (a request and its parts refer to each other, so they die at the next
            # cyclic collection, which may be far off)
            p.reply = None
        self.outbox.append(Done(req.ts, result, error))

    # -- the ring and time ------------------------------------------------------------------
    def use_ring(self, ring: Assignment, now: float, down: list[str] | None = None) -> list:
        """A ring from the scheduler (or learnt otherwise): unanswered parts whose rows it
        moves are sent again to the new owners, ahead of anything issued later. ``down``:
        the owners in it the scheduler declared dead (None: not said)."""
        self.awaiting_ring = False
        if down is not None and ring.version >= self.ring.version:
            self.down = set(down)
        if ring.version > self.ring.version:
            self.ring = ring
            moved = [p for p in self.sent.values() if p.request is not None and p.sent_ring != ring.version
                     and self._moved(p)]
            for p in moved:
                del self.sent[p.msg.id]
                self._unsent(p)
                stream = self.streams.get(p.server)
                if stream is not None:
                    stream.drop(p)
            queued = [p for p in self.queue if p.request is not None and self._moved(p)]
            if queued:
                self.queue = [p for p in self.queue if p not in queued]
            if moved or queued:
                self._requeue(moved + queued, now)
            if self.clock_value > 0:
                # the clock again at this ring, behind the parts re-sent for it (the same value:
                # idempotent): a server that took ranges over counts us unsynced, and holds
                # every sequential pull, until a clock sent knowing its ring arrives; a BSP
                # worker waits for its pull before it clocks again (decisions 130, 138)
                self._queue_clock()
            self.hold_until = min(self.hold_until, now)
        elif ring.version == self.ring.version:
            self.hold_until = min(self.hold_until, now)
        self._flush(now)
        return self._take()

    def connection_lost(self, server: str, now: float) -> list:
        """The connection to ``server`` dropped: what it had not admitted may be lost, and
        so may the answers to what it had (a later part's answer confirmed it, its own was
        on the way); send both again on a new epoch (a push is applied once, whatever
        arrives twice), or a lost answer would hold its request until request_timeout."""
        stream = self.streams.get(server)
        if stream is not None:
            back = stream.restart()
            unconfirmed = {id(p) for p in back}
            back += [p for p in self.sent.values()
                     if p.server == server and p.request is not None and id(p) not in unconfirmed]
            for p in back:
                self.sent.pop(p.msg.id, None)
                self._unsent(p)
                if p.request is not None and p.request.op != "push":
                    self.reread.add(p.request.ts)
            self._requeue(back, now)
            self._flush(now)
        return self._take()

    def tick(self, now: float) -> list:
        """Deadlines, resends after a pause, ring polls."""
        if self.retries:
            due = [p for at, p in self.retries if at <= now]
            self.retries = [(at, p) for at, p in self.retries if at > now]
            for part in due:
                if part.request.finished:
                    continue
                if self._moved(part):
                    self._requeue([part], now)  # (to its new owners, in order)
                    continue
                part.msg = self._again(part.msg)
                self._send(part, now)
        for req in list(self.requests.values()):
            if now >= req.deadline and not req.finished:
                self._finish(req, None, self._timeout(req))
        if self.requests and now >= self._next_poll:
            oldest = min((p.sent_at for p in self.sent.values() if p.request is not None), default=now)
            if now - oldest >= RING_POLL or (self.queue and now >= self.hold_until):
                self._next_poll = now + RING_POLL
                self.awaiting_ring = False  # (a ring answer may have been lost)
                self._want_ring(now)
        self._flush(now)
        return self._take()

    def _timeout(self, req: Request) -> PsdError:
        if req.not_replicated is not None:
            return _error(req.not_replicated)
        unsent = [p for p in self.queue if p.request is req]
        if unsent and not self.ring.ranges:
            return UnavailableError(f"the cluster has no live servers at ring v{self.ring.version}; start a "
                                    f"server (psd server) and retry")
        waiting = next((p for p in req.parts if p.reply is None), None)
        where = ""
        if waiting is not None:
            state = ("queued" if waiting in self.queue else "sent" if self.sent.get(waiting.msg.id) is waiting
                     else "waiting to be sent again" if any(p is waiting for _, p in self.retries) else "lost")
            where = f" (a part {state}, last sent at ring v{waiting.sent_ring}; this worker is at v{self.ring.version})"
        if waiting is not None and waiting.server in self.down:
            return UnavailableError(
                f"{waiting.server} holds the only copies of these keys and was declared dead (stalled or cut off); "
                f"it has not come back within {self.request_timeout} s{where}. The keys are unavailable until it "
                f"does (psd status lists them under 'unavailable'); retry later", server=waiting.server)
        if req.misrouted:
            return NotOwnerError(f"{len([p for p in req.parts if p.reply is None])} request part(s) still "
                                 f"misrouted after {self.request_timeout} s{where}")
        who = waiting.server if waiting is not None and waiting.server else "the cluster"
        return PsdTimeoutError(f"{who} did not answer {req.op} within {self.request_timeout} s{where}",
                               node=who or None)

    def next_wakeup(self) -> float | None:
        """When ``tick`` next has something to do (None: nothing is waiting)."""
        times = [req.deadline for req in self.requests.values()]
        times += [at for at, _ in self.retries]
        if self.queue:
            times.append(self.hold_until)
        if self.requests:
            times.append(self._next_poll)
        return min(times) if times else None


def _chunked(req: Request, rows: Rows, groups: list, pack: bool = True) -> list:
    """Server groups of a push of keys cut further into pieces of at most MAX_PUSH_BYTES:
    a server handles one message at a time, and a request of a few MiB of scattered keys
    keeps other clients' requests waiting for as long as it takes to apply (12 MB: 40 ms);
    pieces let them in between. A piece fills up across the group's slices (``pack``;
    False: each slice apart, as before decision 97), so a server gets as few pieces as
    the bytes need. A push of dense spans applies as a slice, a hundred times faster per
    byte, and goes whole."""
    if req.op != "push" or rows.values is None or rows.keys is None:
        return groups
    row_bytes = rows.values.itemsize * (rows.values.shape[1] if rows.values.ndim == 2 else 1) + 8
    if rows.count * row_bytes <= MAX_PUSH_BYTES:
        return groups
    per = max(1, MAX_PUSH_BYTES // row_bytes)
    out = []
    for server, slices in groups:
        if not pack:
            out.extend((server, [(lo, min(b, lo + per))]) for a, b in slices for lo in range(a, b, per))
            continue
        piece: Slices = []
        room = per
        for a, b in slices:
            while a < b:
                take = min(b - a, room)
                piece.append((a, a + take))
                a += take
                room -= take
                if room == 0:
                    out.append((server, piece))
                    piece, room = [], per
        if piece:
            out.append((server, piece))
    return out


def _cost(part: Part) -> int:
    """The bytes a part holds on its server until answered: its own payload, and the
    values a pull asks for."""
    cost = 0
    for a in part.msg.arrays:  # (a loop: a generator's set-up costs more than the few arrays)
        cost += a.nbytes
    req = part.request
    if req is not None and req.op != "push" and part.rows is not None:
        cost += part.rows.count * req.spec.width * req.spec.np_dtype.itemsize
    return cost


def _compose(outer: Slices, inner: Slices) -> Slices:
    """Map row slices of a sub-request (``inner``) back to rows of the whole request."""
    if len(outer) == 1 and outer[0][0] == 0:
        return list(inner)
    starts = np.cumsum([0] + [b - a for a, b in outer])
    out = []
    for i0, i1 in inner:
        while i0 < i1:
            k = int(np.searchsorted(starts, i0, side="right")) - 1
            a, b = outer[k]
            take = min(i1 - i0, (b - a) - (i0 - starts[k]))
            out.append((a + i0 - starts[k], a + i0 - starts[k] + take))
            i0 += take
    return out


def _error(reply: Message) -> PsdError:
    m = reply.meta
    return error_from_wire(str(m.get("code", "remote")), str(m.get("message", "")), reply.sender or None,
                           m.get("data") if isinstance(m.get("data"), dict) else None)


def _result(req: Request, parts: list[Part], replies: list[Message]):
    if req.op == "push":
        return None
    spec = req.spec
    if req.n == 0:
        return np.empty((0, spec.width), dtype=spec.np_dtype)
    return assemble(parts, replies, req.n, spec)


def assemble(parts: list[Part], replies: list[Message], n: int, spec: TableSpec) -> np.ndarray:
    """Values of every part's reply, placed at its rows."""
    if len(parts) == 1 and parts[0].slices == [(0, n)]:
        return _reply_values(replies[0], parts[0], spec)
    out = np.empty((n, spec.width), dtype=spec.np_dtype)
    for part, reply in zip(parts, replies):
        values = _reply_values(reply, part, spec)
        row = 0
        for a, b in part.slices:
            out[a:b] = values[row:row + b - a]
            row += b - a
    return out


def _reply_values(reply: Message, part: Part, spec: TableSpec) -> np.ndarray:
    if part.values is not None:
        return part.values
    expect = (part.rows.count, spec.width)
    if len(reply.arrays) != 1 or reply.arrays[0].shape != expect or reply.arrays[0].dtype != spec.np_dtype:
        raise ValuesError(f"{part.server} answered {reply.op} with an unexpected payload "
                          f"(wanted {spec.dtype}{list(expect)})", node=part.server)
    return reply.arrays[0]

"""Request/reply over one ZeroMQ socket, both directions at once.

A node both asks (``call``) and answers (a handler) on the same socket: the scheduler
pushes ring changes down the connection a server registered on, and a server answers
on it. Replies are the ops ``ok`` and ``error`` and carry the id of their request.
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import time
from collections import deque
from functools import partial
from typing import Awaitable, Callable, Optional

import msgpack
import zmq
from zmq.backend import Socket as _Backend

from psd.codec import Limits, Message, decode, encode
from psd.codec.message import error_reply
from psd.codec.traffic import Traffic
from psd.errors import ProtocolError, PsdError, PsdTimeoutError, RemoteError, UnavailableError, error_from_wire
from psd.refusals import RefusalLog
from psd.transport.shm import Budget
from psd.transport.shmlink import ShmLinks
from psd.transport.spin import Spin
from psd.transport.stripes import (HEAD_LEN, LOST, STRIPE_MIN_BYTES, Assembler, StripeLinks, cut, hello, on_main,
                                  stripe_route)

log = logging.getLogger("psd.transport")

Route = Optional[bytes]  # ROUTER identity of the peer; None on a DEALER
Handler = Callable[[Route, Message], Awaitable[Optional[Message]]]
#: answers some requests from their raw frames, before decoding (True), or leaves
#: them to the handler untouched (False): psd/roles/fast_pull.py
FastHandler = Callable[[Route, list], bool]

REPLY_OPS = ("ok", "error")
#: the transport's own ops: the shared-memory handshake and frees (psd/transport/shmlink.py)
SHM_OPS = ("shm_hello", "shm_free")
#: messages one pass of ``drain`` handles before the loop runs its other work (timers,
#: heartbeats, acks of forwards): a server under closed-loop load never finds its queue
#: empty, and must not starve its own heartbeats
DRAIN_BATCH = 64
#: and seconds after which a pass ends even before DRAIN_BATCH messages: 64 slow
#: requests (large pushes, say) held the loop for their sum, and a timer waits for up to
#: three passes (measured: 192 requests of 0.3 ms between two runs of a 10 ms timer)
DRAIN_SECONDS = 0.01
#: frames smaller than this are copied into ZeroMQ rather than lent (measured faster)
ZERO_COPY_BYTES = 64 * 1024

# The small-message path calls pyzmq's compiled socket methods with plain int flags:
# its Python layer (send_multipart, recv_multipart, getsockopt with enum options) cost
# about 15 us of a 10-key pull's server time (scripts/bench_pushpull.py, small pull)
_send, _recv, _get = _Backend.send, _Backend.recv, _Backend.get
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def readable(sock: zmq.Socket) -> bool:
    """A message waits on ``sock`` (ZMQ_EVENTS: also processes its pending commands)."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def send_frames(sock: zmq.Socket, frames: list, track: bool = False) -> list:
    """Send a multipart message without blocking (raises zmq.Again when the queue is
    full). Frames of ``ZERO_COPY_BYTES`` or more are lent to ZeroMQ, not copied; with
    ``track``, returns a MessageTracker for each of those (done once ZeroMQ let go)."""
    last = len(frames) - 1
    trackers = []
    for i, f in enumerate(frames):
        big = (len(f) if isinstance(f, bytes) else f.nbytes) >= ZERO_COPY_BYTES
        if big and track:
            trackers.append(_send(sock, f, _NOBLOCK | _SNDMORE if i < last else _NOBLOCK, False, True))
        else:
            _send(sock, f, _NOBLOCK | _SNDMORE if i < last else _NOBLOCK, not big)
    return trackers


def _all_done(trackers: list) -> bool:
    return all(t.done for t in trackers)


def recv_frames(sock: zmq.Socket, copied: int) -> list:
    """Receive one multipart message without blocking: its first ``copied`` frames as
    bytes (a ROUTER's identity), the rest as zmq.Frame, so neither a payload nor an
    oversized header is copied (``np.frombuffer`` reads them in place)."""
    # every frame as a zmq.Frame, whose ``more`` says whether another follows: a
    # getsockopt(RCVMORE) per frame cost about 2 us (pyzmq converts the option to its enum)
    frame = _recv(sock, _NOBLOCK, False)
    parts = [frame.bytes if copied > 0 else frame]
    i = 1
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        parts.append(frame.bytes if i < copied else frame)
        i += 1
    return parts


def _has_large(arrays: list, least: int) -> bool:
    for a in arrays:
        if a.nbytes >= least:
            return True
    return False


def is_reply(msg: Message) -> bool:
    return msg.op in REPLY_OPS




def raise_if_error(msg: Message) -> Message:
    if msg.op == "error":
        m = msg.meta
        raise error_from_wire(str(m.get("code", "remote")), str(m.get("message", "")),
                              msg.sender or None, m.get("data") if isinstance(m.get("data"), dict) else None)
    return msg


def peer_of(frame) -> str | None:
    """The User-Id libzmq attached to a received frame (``copy=False``): the role the
    ZAP handler gave the sender's connection. None on a plaintext connection, or on a
    DEALER (whose peer is the CURVE server it connected to, checked by the handshake)."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None


def _peek_header(frames, max_bytes: int) -> dict:
    """Best-effort read of a header that failed full decoding."""
    try:
        buf = getattr(frames[0], "buffer", frames[0]) if frames else b""
        if len(buf) > max_bytes:
            return {}
        head = msgpack.unpackb(buf, raw=False)
        return head if isinstance(head, dict) else {}
    except Exception:
        return {}


class RpcSocket:
    """One socket, its receive loop, and the table of requests awaiting replies."""

    _ids = itertools.count(1)

    def __init__(self, sock: zmq.Socket, node_id: str, *, limits: Limits = Limits(),
                 compression: str = "none", handler: Handler | None = None,
                 router: bool = False, concurrent: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None,
                 identify: bool | frozenset[str] = False, fast: FastHandler | None = None,
                 busy_poll: float = 0.0, adaptive_poll: float = 0.0,
                 spin_ok: Callable[[], bool] | None = None,
                 on_reply: Callable[[int, "Message | Exception"], None] | None = None,
                 shm: Budget | None = None):
        self.sock = sock
        self.node_id = node_id
        self.limits = limits
        self.compression = compression
        self.handler = handler
        self.router = router
        #: run each request as its own task (the scheduler, whose handlers call out
        #: to other nodes); otherwise one at a time, in arrival order (servers)
        self.concurrent = concurrent
        #: requests whose sender the handler needs (``msg.peer``, the connection's role):
        #: True for every one, or a set of ops (the others cost one set lookup); only a
        #: CurveZMQ ROUTER has it to read
        self.identify = identify
        self.fast = fast
        #: how long to keep checking for the next message after handling one, before
        #: the loop may sleep (config busy_poll_us and adaptive_poll_us, in seconds)
        self.spin = Spin(busy_poll, adaptive_poll)
        self.spin_ok = spin_ok
        self._spin_on = False  # the last pass ended spinning with requests still coming
        self._running: set[asyncio.Task] = set()
        #: the same socket without zmq.asyncio's wrapper: read from a loop callback
        self.raw = zmq.Socket.shadow(sock.underlying)
        #: the loop that reads it (known before ``serve`` runs when given: a client may
        #: send on a new connection before its reading task has started)
        self._loop = loop
        self._fd: int | None = None  # registered with the loop while serving
        self._closed = False
        self._paused = False
        self._draining = False
        self._recheck_due = False
        self._again_due = False
        self.pending: dict[int, asyncio.Future] = {}
        #: replies to requests sent by ``send_now`` with an id of the caller's (not
        #: ``request``): ``on_reply(id, message)``, or ``(id, error)`` for one unreadable
        self.on_reply = on_reply
        self._refusals = RefusalLog()  # rejected requests: one log line per kind a minute
        #: on a ROUTER: request id -> the connection it went to; a reply from any other
        #: connection never resolves it (a peer guessing ids must not answer for another
        #: node), unless ``reroute`` says that connection is the same peer
        self._asked: dict[int, bytes] = {}
        #: replies that came from another connection than their request went to, kept
        #: until ``reroute`` says that connection is now the same peer (ZeroMQ gave a
        #: reconnected peer a new identity): request id -> (connection, reply)
        self._strays: dict[int, tuple[bytes, Message]] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        #: bytes after each stage (raw, key caching, compression, wire), both directions
        self.traffic = Traffic()
        self.messages_in = 0
        self.messages_out = 0
        #: striped messages (psd/transport/stripes.py): what came in pieces, put back
        #: together (a ROUTER keeps each connection's order behind a carrier that waits)
        self.assembler = Assembler(2 * limits.max_message_bytes, ordered=router)
        #: a DEALER's own stripe connections to its peer, once ``stripe`` opened them
        self.links: StripeLinks | None = None
        self._stripe_seq = itertools.count(1)
        self._stripe_fds: list[int] = []
        #: messages ready to handle before the socket is read again (released from
        #: behind a carrier, while a sequential handler had paused the socket)
        self._backlog: deque = deque()
        self.striped_out = 0
        #: payload frames through shared memory with peers of this host (``shm``: the
        #: owner's settings and budget; None: always TCP)
        self.shm = ShmLinks(shm, router) if shm is not None else None

    def stripe(self, address: str, connections: int, configure) -> None:
        """Open ``connections - 1`` stripe connections to the peer at ``address`` beside
        this DEALER (``configure(sock)`` before connecting: options, CURVE keys) and say
        so to the peer: messages of STRIPE_MIN_BYTES or more go striped both ways."""
        if self.router or connections < 2 or self.links is not None:
            return
        self.links = StripeLinks(address, connections, configure)
        send_frames(self.raw, [hello(self.links.token, connections)])
        if self._fd is not None:
            self._watch_stripes()

    def move(self, old: str, new: str) -> None:
        """Move a DEALER from the peer at ``old`` to the one at ``new`` (the scheduler
        that leads now). Requests still pending are answered from there, or time out."""
        try:
            self.sock.disconnect(old)
        except zmq.ZMQError:
            pass  # not connected there
        self.sock.connect(new)

    # -- sending -------------------------------------------------------------
    def send_now(self, msg: Message, route: Route = None, leases: list | None = None) -> None:
        """Hand ``msg`` to ZeroMQ at once. Send queues are unbounded (SNDHWM 0), so this
        never waits, and messages on one socket leave in call order. ``leases``: lent
        table views among its arrays (``psd.store.table.Lease``), released once ZeroMQ
        has sent them (or at once, when nothing of them was lent to ZeroMQ)."""
        if self._closed:
            raise PsdError(f"{self.node_id}: the connection is closed")
        shm = self.shm
        if shm is not None and shm.peers and _has_large(msg.arrays, shm.settings.min_bytes):
            placed = []
            place = shm.placer(route)
            if place is not None:
                def place(buf, _place=place):
                    ref = _place(buf)
                    if ref is not None:
                        placed.append(ref)
                    return ref
            frames = encode(msg, self.compression, place)
            if placed and msg.op not in REPLY_OPS and msg.id:
                shm.remember(msg, route)  # sent again inline if the peer refuses it
        else:
            frames = encode(msg, self.compression)
        self.traffic.count_sent(msg, frames)
        self._put(route, frames, leases)

    def send_raw(self, route: Route, frames: list) -> None:
        """Send frames already encoded (a fast handler's reply, uncompressed, keys whole);
        dropped after ``close``."""
        if not self._closed:
            self.traffic.count_sent_plain(frames)
            self._put(route, frames)

    def _put(self, route: Route, frames: list, leases: list | None = None) -> None:
        if self.shm is not None and self.shm.peers:
            self.flush_frees()  # before the request: the peer may reuse them for its reply
        size = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        self.bytes_out += size
        self.messages_out += 1
        trackers = None
        try:
            if size >= STRIPE_MIN_BYTES and (self.links is not None or route in self.assembler.groups):
                trackers = self._put_striped(route, frames, bool(leases))
            else:
                if self.router:
                    frames = [route, *frames]
                trackers = send_frames(self.raw, frames, track=bool(leases))
        except zmq.Again:
            raise PsdError(f"{self.node_id}: the send queue is full; the peer is not reading") from None
        except zmq.ZMQError as err:
            if err.errno != errno.EHOSTUNREACH:
                raise
            # (a ROUTER's peer that is gone: ZMQ_ROUTER_MANDATORY says so; dropped, as ZeroMQ
            # would drop it without the option)
        finally:
            if leases:
                for lease in leases:
                    if trackers:
                        lease.track(partial(_all_done, trackers))
                    else:  # not sent, or nothing lent to ZeroMQ (compressed, say)
                        lease.release()
            self.recheck()

    def _put_striped(self, route: Route, frames: list, track: bool) -> list:
        """Send one large message as chunks over every connection to its peer, then its
        carrier on the main one (psd/transport/stripes.py)."""
        if self.links is not None:
            token, n = self.links.token, self.links.connections
            targets = [(self.raw, None), *((s, None) for s in self.links.socks)]
        else:
            token, n = self.assembler.groups[route]
            targets = [(self.raw, route), *((self.raw, stripe_route(token, i)) for i in range(1, n))]
        sends, carrier = cut(frames, token, next(self._stripe_seq), n)
        trackers: list = []
        for conn, chunk in sends:
            sock, to = targets[conn]
            if conn and self.links is not None and self.links.drop_out:
                self.links.drop_out -= 1  # (a test's fault: this chunk is lost on its stripe)
                continue
            try:
                trackers += send_frames(sock, chunk if to is None else [to, *chunk], track)
            except zmq.ZMQError as err:  # that stripe is not connected (now): on the main one
                if err.errno != errno.EHOSTUNREACH or conn == 0:
                    raise
                trackers += send_frames(self.raw, [route, *on_main(chunk)], track)
        trackers += send_frames(self.raw, carrier if route is None else [route, *carrier], track)
        self.striped_out += 1
        return trackers

    @classmethod
    def next_id(cls) -> int:
        """A request id no other request of this process has."""
        return next(cls._ids)

    def request(self, msg: Message, route: Route = None) -> asyncio.Future:
        """Send ``msg`` with a fresh id; the returned future gets the reply (or the send
        error)."""
        msg.id = self.next_id()
        msg.sender = self.node_id
        fut = (self._loop or asyncio.get_running_loop()).create_future()
        self.pending[msg.id] = fut
        if self.router:
            self._asked[msg.id] = route
        try:
            self.send_now(msg, route)
        except Exception as err:
            self.forget(msg.id)
            fut.set_exception(err)
        return fut

    def forget(self, msg_id: int) -> None:
        """Stop waiting for the reply to request ``msg_id``."""
        self.pending.pop(msg_id, None)
        self._asked.pop(msg_id, None)
        self._strays.pop(msg_id, None)

    def reroute(self, old: Route, new: Route) -> None:
        """The peer that spoke from connection ``old`` now speaks from ``new`` (the
        caller knows it is the same node: it authenticated itself there). Requests
        sent to it are answered from ``new`` from now on, and a reply that already
        came from there is delivered."""
        if old is None or old == new:
            return
        for msg_id, asked in list(self._asked.items()):
            if asked == old:
                self._asked[msg_id] = new
                stray = self._strays.pop(msg_id, None)
                if stray is not None and stray[0] == new:
                    self._resolve(stray[1], new)

    async def call(self, msg: Message, route: Route = None, timeout: float | None = 10.0) -> Message:
        fut = self.request(msg, route)
        msg_id = msg.id
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise PsdTimeoutError(f"no reply to {msg.op} within {timeout} s", node=self.node_id) from None
        finally:
            self.forget(msg_id)
        return raise_if_error(reply)

    def reply_now(self, route: Route, reply: Message, leases: list | None = None) -> None:
        """Answer from plain code (a held request released by a later event). After
        ``close`` there is no one to answer: the reply is dropped."""
        if self._closed:
            for lease in leases or ():
                lease.release()
            return
        reply.sender = self.node_id
        try:
            self.send_now(reply, route, leases)
        except Exception:
            for lease in leases or ():
                lease.release()
            raise

    # -- receiving -----------------------------------------------------------
    async def serve(self) -> None:
        """Receive until cancelled: resolve replies, hand requests to the handler.

        The socket is read from the event loop's reader callback, without zmq.asyncio's
        futures: a request whose handler does not suspend is answered inside the
        callback (measured: about half of a small pull's server time went to the
        future machinery). ZeroMQ's descriptor only signals new arrivals, so a pass
        reads until the queue is empty (or comes back for the rest, ``DRAIN_BATCH``),
        and a send made outside a pass re-checks the queue (``recheck``)."""
        self._loop = asyncio.get_running_loop()
        self._fd = self.raw.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self.drain)
        if self.links is not None:
            self._watch_stripes()
        if self.shm is not None and self.shm.hello_due():
            self._start_hello()
        try:
            self.drain()
            await self._loop.create_future()  # until cancelled
        finally:
            self._stop_reading()

    def _watch_stripes(self) -> None:
        self._unwatch_stripes()
        for sock in self.links.socks:
            fd = sock.getsockopt(zmq.FD)
            self._loop.add_reader(fd, self.drain)
            self._stripe_fds.append(fd)

    def _unwatch_stripes(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            for fd in self._stripe_fds:
                try:
                    self._loop.remove_reader(fd)
                except Exception:
                    pass
        self._stripe_fds = []

    def _stop_reading(self) -> None:
        if self._fd is not None and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._fd)
            except Exception:
                pass
        self._unwatch_stripes()
        self._fd = None

    def reconnect_stripe(self, index: int) -> None:
        """Drop stripe connection ``index`` with what it still queued, and open it again
        (tests: a stripe connection that dies mid-transfer)."""
        self._unwatch_stripes()  # (before the socket closes: its descriptor's number may be reused)
        self.links.reconnect(index)
        if self._fd is not None:
            self._watch_stripes()

    def stripe_socks(self) -> list:
        """The stripe connections' sockets (a blocking caller polls them beside ``raw``)."""
        return self.links.socks if self.links is not None else []

    def _read_stripes(self) -> None:
        """Take the chunks waiting on the stripe connections (a DEALER's)."""
        now = None
        for sock in self.links.socks:
            while readable(sock):
                frames = recv_frames(sock, 0)
                if self.links.drop_in and len(frames) == 2:
                    self.links.drop_in -= 1  # (a test's fault: this chunk is lost on its stripe)
                    continue
                if now is None:
                    now = time.monotonic()
                ready = self.assembler.feed(None, frames, now)
                if ready:
                    self._backlog.extend(ready)

    def _run_backlog(self) -> None:
        backlog = self._backlog
        while backlog and not (self._paused or self._closed):
            route, frames = backlog.popleft()
            try:
                self._handle(route, frames)
            except Exception:
                log.exception("%s: handling a message failed", self.node_id)

    def expire_stripes(self, now: float) -> None:
        """Give up striped messages whose chunks did not all come (call every tick)."""
        asm = self.assembler
        if asm.waiting or asm.chunks:
            ready = asm.expire(now)
            if ready:
                self._backlog.extend(ready)
                self._run_backlog()

    def drain(self) -> None:
        """Handle the messages waiting on the socket, up to ``DRAIN_BATCH`` of them or
        ``DRAIN_SECONDS`` of work (also
        callable outside the loop, by a blocking caller that polled the socket itself)."""
        if self._closed or self._paused:
            return
        self._draining = True  # sends in here need no re-check: the pass reads on
        raw = self.raw
        # a ROUTER's identity frame (at most 255 bytes) as bytes; the header stays a
        # zmq.Frame: a peer may send one far over max_header_bytes, and decode refuses
        # it before anything copies it (User-Id, the sender's role, is read off it too)
        copied = 1 if self.router else 0
        spin = self.spin
        try:
            if self.links is not None:
                self._read_stripes()
            if self._backlog:
                self._run_backlog()
                if self._paused or self._closed:
                    return
            until = None  # busy polling: the pass spins for next messages until then
            ends = time.perf_counter() + DRAIN_SECONDS
            for handled in range(DRAIN_BATCH):
                if handled and until is None and time.perf_counter() >= ends:
                    break  # (the rest in another pass, once the loop has run its timers;
                    # a pass that spins is bounded by its spin budget instead)
                try:
                    # ZMQ_EVENTS, not a NOBLOCK recv that ends in EAGAIN: as cheap, and
                    # no exception to build each time the queue runs dry
                    if not _get(raw, _EVENTS) & _POLLIN:
                        if not spin:
                            return
                        now = time.perf_counter()
                        budget = spin.budget(now)  # (also notes when the queue ran dry)
                        if not (handled or self._spin_on):
                            return
                        if until is None:  # one budget a pass: the loop's other work waits no longer
                            if not budget:
                                return
                            until, caught = now + budget, False
                        if not self._spin(until):
                            # requests still coming when the budget ran out: spin on in
                            # another pass, once the loop has run its other work
                            self._spin_on = caught and time.perf_counter() >= until
                            if self._spin_on:
                                self._drain_soon()
                            return
                        caught = True
                    if spin.dry_at is not None:
                        spin.arrived(time.perf_counter())
                    frames = recv_frames(raw, copied)
                except zmq.ZMQError as err:
                    if err.errno not in (zmq.ENOTSOCK, zmq.ETERM):  # not merely closed under us
                        log.error("%s: reading the socket failed: %s", self.node_id, err)
                    return
                try:
                    self._dispatch(frames)
                except Exception:  # e.g. an error reply that could not be sent either
                    log.exception("%s: handling a message failed", self.node_id)
                if self._paused or self._closed:
                    return
            self._drain_soon()  # more may wait, and the descriptor will not say so again
        finally:
            self._draining = False
            if self.shm is not None and self.shm.peers and not self._closed:
                try:
                    self.flush_frees()
                except Exception:  # never lose the rest of the pass to it
                    log.exception("%s: sending shared-memory frees failed", self.node_id)

    def _spin(self, until: float) -> bool:
        """Check for a message until ``until`` (perf_counter): True once one waits. A
        client's next request often follows within a round trip, and waking from the
        loop's sleep costs tens of microseconds of it (docs/operations.md, Latency).
        Not while ``spin_ok()`` says other work waits (a server's replica acks)."""
        if self.spin_ok is not None and not self.spin_ok():
            return False
        raw = self.raw
        while time.perf_counter() < until:
            if readable(raw):
                return True
        return False

    def _drain_soon(self) -> None:
        if self._loop is not None and not self._again_due and not self._loop.is_closed():
            self._again_due = True
            self._loop.call_soon(self._drain_again)

    def _drain_again(self) -> None:
        self._again_due = False
        self.drain()

    def recheck(self) -> None:
        """After a send, or a read outside a pass that may have left messages behind,
        look at the next loop pass for arrivals the descriptor will not announce."""
        if self._fd is not None and not self._draining and not self._recheck_due:
            self._recheck_due = True
            self._loop.call_soon(self._recheck_now)

    def _recheck_now(self) -> None:
        self._recheck_due = False
        if self._closed:
            return
        try:
            waiting = readable(self.raw) or any(readable(s) for s in self.stripe_socks())
        except zmq.ZMQError:
            return
        if waiting:
            self.drain()

    def note_received(self, frames: list) -> None:
        self.messages_in += 1
        self.bytes_in += sum(len(f) for f in frames)

    def receive(self, frames: list) -> None:
        """Handle a message read off the socket by someone else (the blocking client's
        small pull reads its answer itself and hands over whatever else it finds)."""
        self._dispatch(frames)

    def _dispatch(self, frames) -> None:
        route = None
        if self.router:
            if len(frames) < 2:
                return
            route, frames = frames[0], frames[1:]
        asm = self.assembler
        if len(frames[0]) == HEAD_LEN or asm.parked:
            ready = asm.feed(route, frames, time.monotonic())
            if ready is not None:  # part of a striped message, or held behind one
                if ready:
                    self._backlog.extend(ready)
                    self._run_backlog()
                return
        self._handle(route, frames)

    def _handle(self, route: Route, frames) -> None:
        """One whole message (as it arrived, or put back together from its stripes)."""
        if type(frames) is LOST:
            self._lost(route, frames)
            return
        self.note_received(frames)
        if self.fast is not None:
            try:
                if self.fast(route, frames):
                    self.traffic.count_received_plain(frames)
                    return
            except Exception as err:  # a bug in the fast path's checks: the general one still answers
                if self._refusals.note(f"fast/{type(err).__name__}", time.monotonic()) is not None:
                    log.exception("%s: the fast path failed on a message; handling it the general way", self.node_id)
        try:
            msg = decode(frames, self.limits, self.shm.resolver(route) if self.shm is not None else None)
        except PsdError as err:
            self._reject(route, frames, err)
            return
        except Exception as err:  # a decoder bug must not end the receive loop
            log.exception("%s: decoding a message failed", self.node_id)
            self._reject(route, frames, ProtocolError(f"message could not be decoded: {err!r}"))
            return
        self.traffic.count_received(msg, frames)
        if msg.op in REPLY_OPS:
            self._resolve(msg, route)
            return
        if msg.op in SHM_OPS and self.shm is not None:
            self._shm_op(route, msg)
            return
        if self.handler is None:
            return
        identify = self.identify
        if identify and (identify is True or msg.op in identify):
            msg.peer = peer_of(frames[0])
        try:
            out = self.handler(route, msg)
        except Exception as err:
            self.answer_error(route, msg, err)
            return
        if out is None or type(out) is Message:
            if out is not None:
                self._send_reply(route, msg, out)
            return
        # the handler suspends: finish it as a task; a sequential socket reads no
        # further message until it is done, so requests are handled in arrival order
        task = asyncio.ensure_future(self._finish(route, msg, out))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        if not self.concurrent:
            self._paused = True  # and not readable meanwhile, or the loop would spin on it
            if self._fd is not None:
                self._loop.remove_reader(self._fd)
            task.add_done_callback(self._resume)

    def _resolve(self, reply: Message, route: Route) -> None:
        if self.shm is not None and self.shm.sent:
            again = self.shm.refused_reply(reply)
            if again is not None:  # the peer refused our shared memory: the same request inline
                msg, to = again
                self._put(to, encode(msg, self.compression))
                return
        if self.router and not self._from_asked(reply.id, route):
            self._strays[reply.id] = (route, reply)  # (one per request: bounded by _asked)
            return
        fut = self.pending.pop(reply.id, None)
        if fut is None:
            if self.on_reply is not None:
                self.on_reply(reply.id, reply)
        elif not fut.done():
            fut.set_result(reply)

    def _from_asked(self, msg_id, route: Route) -> bool:
        """A reply on a ROUTER: True if it came from the connection its request went to
        (and then forget that request's route)."""
        asked = self._asked.get(msg_id, False) if isinstance(msg_id, int) else False
        if asked is False:
            return True  # no such request (any more): nothing to resolve
        if asked != route:
            repeats = self._refusals.note(f"stray/{route!r}", time.monotonic())
            if repeats is not None:  # (one line per connection a minute: ids can be guessed)
                log.warning("%s: a reply to request %d came from a connection the request was not sent to; "
                            "kept until that connection is known to be the same peer%s", self.node_id, msg_id,
                            f" ({repeats} more like it not logged)" if repeats else "")
            return False
        del self._asked[msg_id]
        self._strays.pop(msg_id, None)
        return True

    def _resume(self, _task) -> None:
        self._paused = False
        if self._fd is not None and not self._closed:
            self._loop.add_reader(self._fd, self.drain)
            self.drain()

    async def _finish(self, route: Route, msg: Message, pending) -> None:
        try:
            out = await pending
        except Exception as err:
            self.answer_error(route, msg, err)
            return
        if out is not None:
            self._send_reply(route, msg, out)

    def answer_error(self, route: Route, msg: Message, err: Exception) -> None:
        """Reply to ``msg`` with the error (a PsdError as it is, anything else as an
        internal error), and log it once per kind (RefusalLog)."""
        if isinstance(err, PsdError):
            # keyed by connection where there is one: a sender's name is its own claim
            who = route if route is not None else msg.sender
            repeats = self._refusals.note(f"{who!r}/{msg.op}/{err.code}", time.monotonic())
            if repeats is not None:  # one line per sender, op and error; repeats are counted
                log.warning("%s: %s from %s rejected: %s%s", self.node_id, msg.op, msg.sender or "?", err.message,
                            f" ({repeats} more like it not logged)" if repeats else "")
        else:  # a bug on our side: answer, log, keep serving
            log.error("%s: %s from %s failed", self.node_id, msg.op, msg.sender or "?", exc_info=err)
            err = RemoteError(f"internal error handling {msg.op}: {err!r}")
        self._send_reply(route, msg, error_reply(msg, err, self.node_id))

    def _send_reply(self, route: Route, msg: Message, out: Message) -> None:
        try:
            self.reply_now(route, out)
        except Exception as err:  # e.g. a reply that cannot be encoded: say so, keep serving
            log.exception("%s: could not send the reply to %s", self.node_id, msg.op)
            self.reply_now(route, error_reply(
                msg, RemoteError(f"internal error replying to {msg.op}: {err!r}"), self.node_id))

    def _reject(self, route: Route, frames, err: PsdError) -> None:
        """Answer an undecodable message with an error naming the problem."""
        repeats = self._refusals.note(f"malformed/{route!r}/{err.code}", time.monotonic())
        if repeats is not None:
            log.warning("%s: dropped a malformed message: %s%s", self.node_id, err.message,
                        f" ({repeats} more like it not logged)" if repeats else "")
        if self.router and route is None:
            return
        stub = Message(op="?", id=0)
        head = _peek_header(frames, self.limits.max_header_bytes)
        if head.get("op") in REPLY_OPS:
            # never answer a reply (two confused peers would echo errors forever), but fail
            # the request it answers now instead of letting it time out
            if self.router and not self._from_asked(head.get("id"), route):
                return
            fut = self.pending.pop(head.get("id"), None) if isinstance(head.get("id"), int) else None
            if fut is not None and not fut.done():
                fut.set_exception(err)
            elif fut is None and self.on_reply is not None and isinstance(head.get("id"), int):
                self.on_reply(head["id"], err)
            return
        if isinstance(head.get("id"), int) and not isinstance(head["id"], bool):  # true is no id: decode refuses it
            stub.id = head["id"]  # name the request in the reply when its id can be read
        self.reply_now(route, error_reply(stub, err, self.node_id))

    def _lost(self, route: Route, frames: list) -> None:
        """A striped message whose chunks did not all come: nothing of it is handled. A
        request is answered ``unavailable`` (its sender sends it again); a reply is
        answered so to ourselves, which makes the client core ask again."""
        err = UnavailableError("a striped message lost chunks on the way (a stripe connection dropped); "
                               "it was not handled: send it again")
        head = _peek_header(frames, self.limits.max_header_bytes)
        if head.get("op") in REPLY_OPS:
            msg_id = head.get("id")
            if type(msg_id) is int:
                log.info("%s: the reply to request %d lost striped chunks; asking again", self.node_id, msg_id)
                self._resolve(error_reply(Message(op="?", id=msg_id), err, str(head.get("src", ""))), route)
            return
        self._reject(route, frames, err)

    # -- shared memory (psd/transport/shmlink.py) ----------------------------------
    async def shm_hello(self) -> None:
        """Offer shared memory to the peer of this DEALER (after CurveZMQ admitted us)."""
        made = self.shm.hello()
        if made is None:
            return
        msg, pool, probe = made
        reply = err = None
        try:
            reply = await self.call(msg, timeout=10.0)
        except Exception as e:  # an older peer (unknown op), or none: stay on TCP
            err = e
        finally:
            try:
                os.unlink(probe)
            except OSError:
                pass
        if self._closed:
            pool.close()
            return
        if self.shm.answered(pool, reply, err):
            self._send_free([])  # on: the peer may answer through shared memory from now on

    def _shm_op(self, route: Route, msg: Message) -> None:
        if msg.op == "shm_free":
            self.shm.on_free(route, msg)
        elif self.router:
            try:
                reply = self.shm.on_hello(route, msg)
            except Exception as err:
                self.answer_error(route, msg, err)
                return
            self.reply_now(route, reply)

    def flush_frees(self) -> None:
        """Tell peers which of their segments we no longer read (one way, no reply)."""
        for route, msg in self.shm.frees():
            self._send_free(msg.meta["names"], route)

    def _send_free(self, names: list, route: Route = None) -> None:
        frames = encode(Message("shm_free", sender=self.node_id, meta={"names": names}))
        try:
            send_frames(self.raw, [route, *frames] if self.router else frames)
        except zmq.ZMQError:
            pass  # the peer is gone: it reclaims nothing, and needs nothing
        finally:
            # a send may take the descriptor's only signal of a message that arrived
            # meanwhile (as after any send: ``recheck``), which would then wait unread
            if self._loop is not None and not self._loop.is_closed():
                self.recheck()

    def shm_tick(self) -> None:
        """Upkeep, every few seconds: frees not yet sent, segments dead peers held, a new
        handshake after a refusal."""
        shm = self.shm
        if shm is None or self._closed:
            return
        if shm.peers:
            self.flush_frees()
        shm.housekeeping()
        if shm.hello_due() and self._loop is not None and self._fd is not None:
            self._start_hello()

    def _start_hello(self) -> None:
        task = self._loop.create_task(self.shm_hello())
        self._running.add(task)  # (cancelled by close)
        task.add_done_callback(self._running.discard)

    def shm_stats(self) -> dict | None:
        return self.shm.stats() if self.shm is not None else None

    def fail_pending(self, err: Exception) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()
        self._asked.clear()
        self._strays.clear()

    def close(self) -> None:
        """Stop reading and close the socket (pending requests are failed by the caller;
        handlers still running are cancelled, and later sends raise PsdError)."""
        if self.shm is not None and self.shm.peers and not self._closed:
            self.flush_frees()  # what the peer may have back (arrays still alive stay lent)
        self._closed = True
        self._stop_reading()
        for task in list(self._running):
            task.cancel()
        if self.links is not None:
            self.links.close()
        self.sock.close(0)
        if self.shm is not None:
            self.shm.close()

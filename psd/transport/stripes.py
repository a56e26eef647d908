"""Striped messages: one large message over several connections, so that CurveZMQ
encrypts it on several cores.

CurveZMQ encrypts and decrypts a connection's messages on that connection's ZeroMQ I/O
thread: one connection uses one core however large the message. A sender with stripes
cuts the big frames of a large message into chunks, sends them round-robin over its
connections to the peer (the main one and ``n - 1`` stripe connections, each its own
CURVE session, on I/O threads of their own), then sends on the main connection a
*carrier*: the message's frames with each big one replaced by its length. The
receiver puts the chunks back in place once the carrier and every chunk are there, and
hands the message on as if it had come whole on the main connection.

Order is the main connection's. On a ROUTER (a server reading requests) a carrier
still missing chunks holds back what its connection sent after it. A carrier whose
chunks are not all there within ``STRIPE_WAIT`` (a stripe connection dropped them) is
answered ``unavailable`` and reaches no handler; the sender's stream
(``psd.core.stream``) then sends it again, and the requests behind it too. A DEALER (a
client reading replies) needs no order between replies; it answers a reply that lost
chunks to itself as ``unavailable``, which makes the client ask again.

Frames of the protocol (all little-endian), told from a message header by their size
and first byte (``0xC1`` never starts valid msgpack):

* ``HELLO``  [head(kind 1, a = connections, token)]: on the main connection, once,
  before anything else: this peer stripes as ``token`` over ``a`` connections, whose
  routing ids are ``stripe_route(token, i)`` for i >= 1.
* ``CHUNK``  [head(kind 2, a = connection, b = chunk index, token, seq), bytes]: chunk
  ``j`` goes on connection ``j % connections`` (0 is the main one).
* ``CARRIER`` [head(kind 3, a = mask of replaced frames, b = connections << 24 | chunk
  bytes, token, seq), frame 0, frame 1, ...]: a replaced frame is 8 bytes, its length;
  its chunks are the next ``ceil(length / chunk bytes)`` indices, frame by frame.

A sender numbers its striped messages in order, and each connection delivers in
order, so once a connection delivered a chunk of a later message, a chunk of an earlier
one it should have carried is lost: the carrier is given up at once. ``STRIPE_WAIT``
is for a loss nothing follows.

Nothing here knows what a message means.
"""
from __future__ import annotations

import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import zmq

#: mark, kind, a (u16), b (u32), token (u64), seq (u64)
HEAD = struct.Struct("<BBHIQQ")
HEAD_LEN = HEAD.size
MARK = 0xC1
HELLO, CHUNK, CARRIER = 1, 2, 3
_LEN = struct.Struct("<Q")
#: messages with fewer bytes than this go whole on the main connection. Below it the
#: striped path's own work (more sends, a copy on reassembly) costs more than the
#: encryption it spreads (scripts/bench_security.py; docs/design-decisions.md)
STRIPE_MIN_BYTES = 1 << 20
#: frames from this size on are cut into chunks; smaller ones ride in the carrier
CHUNK_MIN_BYTES = 64 << 10
#: chunks are at most this large: several per connection let encryption on the sender
#: overlap decryption on the receiver
CHUNK_MAX_BYTES = 1 << 20
#: seconds a carrier waits for its chunks before the message counts as lost (when no
#: later chunk on the same connection has shown it lost sooner)
STRIPE_WAIT = 3.0
#: connections to one peer at most (the main one included)
MAX_STRIPES = 16
#: routes a ROUTER remembers a HELLO from (the oldest are forgotten)
MAX_GROUPS = 4096
_ROUTE = b"psd~"


def stripe_count(setting) -> int:
    """Connections per peer for config ``stripes``: an integer, or ``auto`` (the cores
    this process may run on, at most 8)."""
    if setting == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, min(cores, 8))
    return max(1, min(int(setting), MAX_STRIPES))


def stripe_route(token: int, index: int) -> bytes:
    """The routing id of stripe connection ``index`` (>= 1) of group ``token``."""
    return _ROUTE + struct.pack("<QB", token, index)


def is_marked(frame) -> bool:
    """Whether ``frame`` (bytes or zmq.Frame) is one of ours: a head, not a header."""
    if len(frame) != HEAD_LEN:
        return False
    buf = frame if isinstance(frame, (bytes, bytearray, memoryview)) else frame.buffer
    return buf[0] == MARK


def hello(token: int, connections: int) -> bytes:
    return HEAD.pack(MARK, HELLO, connections, 0, token, 0)


def cut(frames: list, token: int, seq: int, connections: int) -> tuple[list[tuple[int, list]], list]:
    """Cut a message: ([(connection, chunk frames), ...], carrier frames). Chunks are
    memoryview slices of the frames (nothing copied)."""
    big = [len(f) if isinstance(f, bytes) else f.nbytes for f in frames]
    total = sum(n for n in big if n >= CHUNK_MIN_BYTES)
    chunk = max(CHUNK_MIN_BYTES, min(CHUNK_MAX_BYTES, -(-total // connections)))
    mask = 0
    carrier: list = [None]
    sends: list[tuple[int, list]] = []
    j = 0
    for i, (f, n) in enumerate(zip(frames, big)):
        if i == 0 or n < CHUNK_MIN_BYTES or i > 15:
            carrier.append(f)
            continue
        mask |= 1 << i
        carrier.append(_LEN.pack(n))
        view = memoryview(f).cast("B")
        for start in range(0, n, chunk):
            conn = j % connections
            sends.append((conn, [HEAD.pack(MARK, CHUNK, conn, j, token, seq), view[start:start + chunk]]))
            j += 1
    carrier[0] = HEAD.pack(MARK, CARRIER, mask, connections << 24 | chunk, token, seq)
    return sends, carrier


def on_main(chunk: list) -> list:
    """A chunk sent on the main connection instead of its stripe (which is not there)."""
    _, kind, _, j, token, seq = HEAD.unpack(bytes(chunk[0]))
    return [HEAD.pack(MARK, kind, 0, j, token, seq), chunk[1]]


@dataclass
class _Waiting:
    route: object
    carrier: list
    since: float
    mask: int
    chunk: int
    connections: int
    sizes: list = field(default_factory=list)  # (position, length) of replaced frames
    needed: int = 0


class Assembler:
    """The receiving side of every peer of one socket: chunks kept until their carrier
    and all its chunks are there; carriers waiting for chunks; on a ROUTER, what each
    connection sent behind a waiting carrier, and the groups peers announced."""

    def __init__(self, max_bytes: int, ordered: bool):
        #: a ROUTER keeps each connection's messages in order behind a waiting carrier
        self.ordered = ordered
        self.max_bytes = max_bytes
        #: (token, seq) -> {index: (frame, peer role)}, oldest first
        self.chunks: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self._chunk_at: dict[tuple[int, int], float] = {}
        self.bytes = 0
        self.waiting: dict[tuple[int, int], _Waiting] = {}
        #: route -> messages its connection sent after a carrier that waits (in order;
        #: the waiting carrier itself first, as (key, None))
        self.parked: dict[object, list] = {}
        #: ROUTER: main route -> (token, connections), from HELLO
        self.groups: OrderedDict[object, tuple[int, int]] = OrderedDict()
        #: token -> {connection: the latest seq a chunk of it came with} (loss detection)
        self.latest: OrderedDict[int, dict] = OrderedDict()
        self.lost = 0       # carriers given up (chunks missing past STRIPE_WAIT)
        self.assembled = 0  # striped messages put back together
        self.dropped = 0    # chunks dropped: malformed, over the byte bound, or never claimed

    def feed(self, route, frames: list, now: float) -> list | None:
        """One message read off the socket. None: an ordinary message with nothing held
        before it (the caller handles it). Else the messages now ready, in order, as
        (route, frames) pairs (possibly none)."""
        head = frames[0]
        if len(head) == HEAD_LEN and is_marked(head):
            return self._marked(route, frames, now)
        if self.ordered and route in self.parked:
            self.parked[route].append(frames)
            return []
        return None

    def _marked(self, route, frames, now) -> list:
        _, kind, a, b, token, seq = HEAD.unpack(bytes(frames[0]))
        if kind == HELLO and len(frames) == 1:
            if self.ordered and 2 <= a <= MAX_STRIPES:
                self.groups[route] = (token, a)
                self.groups.move_to_end(route)
                while len(self.groups) > MAX_GROUPS:
                    self.groups.popitem(last=False)
            return []
        if kind == CHUNK and len(frames) == 2 and a < MAX_STRIPES:
            return self._chunk((token, seq), a, b, frames[1], now, _role(frames[0]))
        if (kind == CARRIER and 3 <= len(frames) <= 17 and a and not a & 1 and not a >> (len(frames) - 1)
                and b & 0xFFFFFF and 1 <= b >> 24 <= MAX_STRIPES):
            key = (token, seq)
            if self.ordered and route in self.parked:  # behind another waiting carrier
                self.parked[route].append(frames)
                return []
            return self._carrier(key, route, frames, a, b, now)
        self.dropped += 1
        return []

    def _chunk(self, key, conn, index, frame, now, peer) -> list:
        token, seq = key
        latest = self.latest.get(token)
        if latest is None:
            latest = self.latest[token] = {}
            while len(self.latest) > MAX_GROUPS:
                self.latest.popitem(last=False)
        ready: list = []
        if latest.get(conn, -1) < seq:
            latest[conn] = seq
            for k, w in list(self.waiting.items()):  # earlier messages this connection skipped
                if k[0] == token and k[1] < seq and k in self.waiting and self._skipped(k, w, conn):
                    ready += self._give_up(k, w, now)
        return ready + self._keep(key, index, frame, now, peer)

    def _skipped(self, key, w: "_Waiting", conn: int) -> bool:
        """Whether connection ``conn`` should have carried a chunk of ``key`` that is missing."""
        got = self.chunks.get(key, {})
        return any(j % w.connections == conn and j not in got for j in range(w.needed))

    def _keep(self, key, index, frame, now, peer) -> list:
        n = len(frame)
        if self.bytes + n > self.max_bytes:
            self._evict(n)
            if self.bytes + n > self.max_bytes:
                self.dropped += 1
                return []
        got = self.chunks.get(key)
        if got is None:
            got = self.chunks[key] = {}
            self._chunk_at[key] = now
        if index in got:
            self.dropped += 1
            return []
        got[index] = (frame, peer)
        self.bytes += n
        w = self.waiting.get(key)
        if w is not None and len(got) >= w.needed:
            return self._complete(key, w, now)
        return []

    def _carrier(self, key, route, frames, mask, b, now) -> list:
        chunk = b & 0xFFFFFF
        w = _Waiting(route, frames, now, mask, chunk, b >> 24)
        for i in range(1, len(frames) - 1):  # (original frame i is carrier frame i + 1)
            if mask >> i & 1:
                if len(frames[i + 1]) != _LEN.size:
                    self.dropped += 1
                    return []
                n = _LEN.unpack(bytes(frames[i + 1]))[0]
                if n > self.max_bytes:
                    self.dropped += 1
                    return []
                w.sizes.append((i, n))
                w.needed += -(-n // chunk)
        self.waiting[key] = w
        got = self.chunks.get(key)
        if got is not None and len(got) >= w.needed:
            return self._complete(key, w, now)
        if self.ordered:
            self.parked[route] = [key]
        latest = self.latest.get(key[0], {})
        if any(last > key[1] and self._skipped(key, w, conn) for conn, last in latest.items()):
            return self._give_up(key, w, now)  # (a later chunk already came on that connection)
        return []

    def _complete(self, key, w: _Waiting, now: float) -> list:
        """Every chunk of ``key`` is here: the message, and what waited behind it."""
        del self.waiting[key]
        got = self.chunks.pop(key)
        self._chunk_at.pop(key, None)
        self.bytes -= sum(len(f) for f, _ in got.values())
        frames = self._join(w, got)
        ready: list = []
        if frames is not None:
            self.assembled += 1
            ready.append((w.route, frames))
        else:
            self.lost += 1
            ready.append((w.route, LOST(w.carrier)))
        if self.ordered and self.parked.get(w.route, [None])[0] == key:
            ready += self._release(w.route, now)
        return ready

    def _join(self, w: _Waiting, got: dict) -> list | None:
        carrier = w.carrier
        role = _role(carrier[0])
        out = list(carrier[1:])
        j = 0
        for i, n in w.sizes:
            buf = bytearray(n)
            pos = 0
            for _ in range(-(-n // w.chunk)):
                item = got.get(j)
                j += 1
                if item is None:
                    return None
                f, peer = item
                if peer != role:  # a chunk from a connection of another key than the carrier's
                    return None
                m = len(f)
                if pos + m > n or (m != w.chunk and pos + m != n):
                    return None
                buf[pos:pos + m] = getattr(f, "buffer", f)
                pos += m
            if pos != n:
                return None
            out[i] = buf
        if len(got) != j:
            return None
        return out

    def _release(self, route, now: float) -> list:
        """Hand on what a route's connection sent behind its carrier, up to the next
        carrier that must wait."""
        queue = self.parked.pop(route)[1:]
        ready: list = []
        for k, frames in enumerate(queue):
            if len(frames[0]) == HEAD_LEN and is_marked(frames[0]):  # (the only marked frames queued)
                _, kind, a, b, token, seq = HEAD.unpack(bytes(frames[0]))
                out = self._carrier((token, seq), route, frames, a, b, now)
                if route in self.parked:  # waits again: the rest stays behind it
                    self.parked[route].extend(queue[k + 1:])
                    return ready
                ready += out
            else:
                ready.append((route, frames))
        return ready

    def expire(self, now: float) -> list:
        """Carriers that waited past STRIPE_WAIT (as LOST messages, with what queued
        behind them), and chunks no carrier claimed for twice that long, dropped."""
        ready: list = []
        for key, w in list(self.waiting.items()):
            if now - w.since >= STRIPE_WAIT and key in self.waiting:
                ready += self._give_up(key, w, now)
        for key, at in list(self._chunk_at.items()):
            if now - at < 2 * STRIPE_WAIT:
                break
            if key not in self.waiting:
                self._drop(key)
        return ready

    def _give_up(self, key, w: "_Waiting", now: float) -> list:
        """A carrier whose chunks will not all come: LOST, then what waited behind it."""
        del self.waiting[key]
        got = self.chunks.pop(key, None)
        self._chunk_at.pop(key, None)
        if got:
            self.bytes -= sum(len(f) for f, _ in got.values())
        self.lost += 1
        ready = [(w.route, LOST(w.carrier))]
        if self.ordered and self.parked.get(w.route, [None])[0] == key:
            ready += self._release(w.route, now)
        return ready

    def _drop(self, key) -> None:
        got = self.chunks.pop(key, None)
        self._chunk_at.pop(key, None)
        if got:
            self.bytes -= sum(len(f) for f, _ in got.values())
            self.dropped += len(got)

    def _evict(self, need: int) -> None:
        """Over the byte bound: drop the oldest chunks no carrier waits for."""
        for key in list(self.chunks):
            if self.bytes + need <= self.max_bytes:
                return
            if key not in self.waiting:
                self._drop(key)

    def stats(self) -> dict:
        return {"assembled": self.assembled, "lost": self.lost, "dropped_chunks": self.dropped,
                "buffered_bytes": self.bytes}


class LOST(list):
    """A carrier whose chunks did not all come: its frames (the original header first,
    so the receiver can name the message in its answer)."""

    def __init__(self, carrier: list):
        super().__init__(carrier[1:])


def _role(frame):
    """The connection's role ZeroMQ attached to a received frame (CurveZMQ), or None."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None


class StripeLinks:
    """A DEALER's stripe connections to one peer: ``connections - 1`` DEALERs with routing
    ids of their own, on a context with that many I/O threads, beside the main one."""

    _contexts: dict[int, zmq.Context] = {}

    def __init__(self, address: str, connections: int, configure, token: int | None = None):
        self.token = token if token is not None else int.from_bytes(os.urandom(8), "little")
        self.connections = connections
        self.seq = 0
        ctx = self._context(connections - 1)
        self.socks: list[zmq.Socket] = []
        for i in range(1, connections):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, stripe_route(self.token, i))
            configure(sock)
            sock.connect(address)
            self.socks.append(sock)
        self.address = address
        self._configure = configure
        #: fault knobs for tests (a stripe that loses what it carries): chunks to drop
        #: instead of sending on a stripe connection, and read off one and throw away
        self.drop_out = 0
        self.drop_in = 0

    @classmethod
    def _context(cls, io_threads: int) -> zmq.Context:
        ctx = cls._contexts.get(io_threads)
        if ctx is None or ctx.closed:
            ctx = cls._contexts[io_threads] = zmq.Context(io_threads=io_threads)
        return ctx

    def reconnect(self, index: int) -> None:
        """Drop stripe connection ``index`` (>= 1), with whatever it still queued, and open
        it again (tests: a stripe that dies mid-transfer)."""
        old = self.socks[index - 1]
        old.close(0)
        sock = self._context(self.connections - 1).socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, stripe_route(self.token, index))
        self._configure(sock)
        sock.connect(self.address)
        self.socks[index - 1] = sock

    def close(self) -> None:
        for sock in self.socks:
            sock.close(0)
        self.socks = []

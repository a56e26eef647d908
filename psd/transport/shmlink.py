"""The shared memory of one connection: the handshake that turns it on, and the frees.

An ``RpcSocket`` holds one ``ShmLinks``. On a DEALER it speaks for its one peer (key
``None``); on a ROUTER it keeps one ``ShmPeer`` per connection (route) that completed
the handshake. The handshake runs over the connection itself, after CurveZMQ has
authenticated it, so shared memory is never offered to a peer the cluster did not admit:

1. The connecting side (a worker, or a server forwarding to a peer) creates a pool and a
   probe file ``<prefix>hello`` holding 16 random bytes, and sends ``shm_hello`` with
   its host id (boot id, host name, network namespace), its pid and start time, the pool prefix and the
   nonce.
2. The bound side accepts only if shared memory is on, the host id is its own, no other
   connection claimed that prefix, and it can map the probe (a private file of its own
   user) and read the nonce back: then both see one /dev/shm. It answers with its own
   pool prefix for the replies; otherwise ``shm: false`` and a reason, and the
   connection stays on TCP.

From then on, either side may send a payload frame of ``min_bytes`` or more as a ``shm``
reference into its own pool, and a frame naming a segment outside the sender's prefix
is refused (``ShmError``). The receiver sends ``shm_free {names}`` (one way) once the
arrays it decoded from a segment are gone.
"""
from __future__ import annotations

import logging
import os
import secrets
import time

import msgpack

from psd.codec import Message
from psd.errors import ShmError
from psd.transport.shm import Budget, Mapped, Pool, alive, host_id, me, owner_of

log = logging.getLogger("psd.transport")

#: a request sent through shared memory is kept this long for an inline resend (if the
#: receiver refuses the references): longer than any request waits for its reply
KEEP_SENT = 120.0
#: seconds between two handshakes on one connection (after a refusal)
HELLO_EVERY = 1.0
NONCE_BYTES = 16


class ShmPeer:
    """One connection's shared memory: the pool we send from, the peer's we map.
    ``confirmed``: the peer said it uses it too (its first ``shm_free``); until then the
    bound side answers inline, since the connecting side may have given up waiting for
    the handshake's answer and could not read a reference."""

    __slots__ = ("pool", "mapped", "confirmed")

    def __init__(self, pool: Pool, mapped: Mapped, confirmed: bool) -> None:
        self.pool = pool
        self.mapped = mapped
        self.confirmed = confirmed

    def close(self) -> None:
        self.pool.close()
        self.mapped.close()


class ShmLinks:
    def __init__(self, budget: Budget, router: bool) -> None:
        self.budget = budget
        self.settings = budget.settings
        self.router = router
        self.peers: dict = {}
        #: requests sent with shared-memory frames, by id: (when, message, route)
        self.sent: dict[int, tuple[float, Message, object]] = {}
        self._claims: dict[str, object] = {}  # pool prefix -> the route that announced it
        self.hello_at: float | None = None
        self.frames_in = 0
        self.bytes_in = 0
        self.refused = 0  # shm frames refused (ours by the peer, or the peer's by us)

    # -- the two directions of one message -------------------------------------
    def placer(self, route):
        peer = self.peers.get(route)
        if peer is None or not peer.confirmed:
            return None
        least, pool = self.settings.min_bytes, peer.pool
        return lambda buf: pool.place(buf) if buf.nbytes >= least else None

    def resolver(self, route):
        peer = self.peers.get(route)
        if peer is None:
            return None
        resolve = peer.mapped.resolve
        own = not self.router  # a connecting side: a client's pull replies, a copy's rows

        def counted(ref, nbytes):
            view = resolve(ref, nbytes)
            self.frames_in += 1
            self.bytes_in += nbytes
            # what a connecting side receives becomes the caller's own array: writable, as
            # over TCP, whatever its size, and the segment goes back at once instead of
            # whenever the caller drops it (decision 106)
            return view.copy() if own else view
        return counted

    def remember(self, msg: Message, route) -> None:
        now = time.monotonic()
        self.sent[msg.id] = (now, msg, route)
        if len(self.sent) > 4096:  # requests never answered (timed out, peer gone)
            for msg_id in [i for i, (t, _, _) in self.sent.items() if now - t > KEEP_SENT]:
                del self.sent[msg_id]

    def refused_reply(self, reply: Message) -> tuple[Message, object] | None:
        """The request to send again inline, if ``reply`` refuses its shared memory."""
        sent = self.sent.pop(reply.id, None)
        if sent is None or reply.op != "error" or reply.meta.get("code") != ShmError.code:
            return None
        self.refused += 1
        peer = self.peers.pop(sent[2], None)
        if peer is not None:  # the peer forgot us (restarted?): back to TCP, ask again later
            log.info("shared memory refused by the peer (%s); sending inline",
                     str(reply.meta.get("message", ""))[:200])
            peer.close()
        return sent[1], sent[2]

    # -- the handshake, connecting side ----------------------------------------
    def hello_due(self) -> bool:
        return (self.settings.enabled and not self.router and None not in self.peers
                and (self.hello_at is None or time.monotonic() - self.hello_at >= HELLO_EVERY))

    def hello(self) -> tuple[Message, Pool, str] | None:
        """The ``shm_hello`` to send, its pool and probe file (None: no probe could be
        made, e.g. no /dev/shm: the connection stays on TCP)."""
        self.hello_at = time.monotonic()
        pool = Pool(self.budget)
        nonce = secrets.token_bytes(NONCE_BYTES)
        probe = os.path.join(self.settings.dir, pool.prefix + "hello")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, nonce)
            finally:
                os.close(fd)
        except OSError as e:
            log.info("no shared memory (%s: %s); this connection stays on TCP", self.settings.dir, e.strerror)
            pool.close()
            return None
        _, pid, start = me()
        meta = {"host": host_id(), "pid": pid, "start": start, "prefix": pool.prefix, "nonce": nonce}
        return Message("shm_hello", meta=meta), pool, probe

    def answered(self, pool: Pool, reply: Message | None, err: Exception | None) -> bool:
        """Take the handshake's answer; True if shared memory is on now (the caller then
        confirms it to the peer with an empty ``shm_free``)."""
        m = reply.meta if reply is not None else {}
        why = (f"no answer ({err})" if err is not None else None if m.get("shm") is True
               else str(m.get("reason", "refused"))[:200])
        if why is None and m.get("host") != host_id():
            why = "the peer is on another host"
        if why is None:
            try:
                mapped = Mapped(str(m.get("prefix")), self.settings.dir)
                pid, start = int(m["pid"]), int(m["start"])
            except (ShmError, KeyError, TypeError, ValueError) as e:
                why = f"malformed answer ({e})"
        if why is not None:
            log.info("shared memory not used on this connection: %s", why)
            pool.close()
            return False
        pool.peer = (pid, start)
        self.peers[None] = ShmPeer(pool, mapped, True)
        return True

    # -- the handshake, bound side -------------------------------------------------
    def on_hello(self, route, msg: Message) -> Message:
        m = msg.meta
        why = None
        prefix = m.get("prefix")
        if not self.settings.enabled:
            why = "shared memory is off here (shm: false)"
        elif m.get("host") != host_id():
            why = "another host"
        elif not isinstance(prefix, str) or owner_of(prefix + "hello") is None:
            why = "malformed prefix"
        elif self._claims.get(prefix, route) != route:
            why = "that prefix belongs to another connection"
        elif owner_of(prefix + "hello") != (me()[0], m.get("pid"), m.get("start")) \
                or not alive(m["pid"], m["start"]):
            why = "the prefix does not name a live process of this host"
        if why is None:
            mapped = Mapped(prefix, self.settings.dir)
            nonce = m.get("nonce")
            try:
                probe = mapped.resolve(_ref(prefix + "hello"), NONCE_BYTES)
                if not isinstance(nonce, bytes) or bytes(probe) != nonce:
                    why = "the probe does not hold the nonce"
            except ShmError as e:
                why = f"cannot read the probe ({e.message})"
            mapped.close()
        if why is not None:
            return msg.reply(meta={"shm": False, "reason": why})
        old = self.peers.pop(route, None)
        if old is not None:
            old.close()
        pool = Pool(self.budget)
        pool.peer = (m["pid"], m["start"])
        self.peers[route] = ShmPeer(pool, Mapped(prefix, self.settings.dir), False)
        self._claims[prefix] = route
        _, pid, start = me()
        return msg.reply(meta={"shm": True, "host": host_id(), "prefix": pool.prefix, "pid": pid, "start": start})

    def on_free(self, route, msg: Message) -> None:
        peer = self.peers.get(route)
        names = msg.meta.get("names")
        if peer is not None and isinstance(names, list):
            peer.confirmed = True
            peer.pool.release(names[:4096])

    # -- frees and upkeep ------------------------------------------------------------
    def frees(self) -> list[tuple[object, Message]]:
        """``shm_free`` messages for the segments whose arrays died since the last call."""
        out = []
        for route, peer in self.peers.items():
            if peer.mapped.freed:
                out.append((route, Message("shm_free", meta={"names": peer.mapped.take_freed()})))
        return out

    def housekeeping(self) -> None:
        """Take back what dead peers held, forget their connections and stale sends."""
        for route, peer in list(self.peers.items()):
            if peer.pool.reclaim():  # the peer process is gone
                del self.peers[route]
                self._claims.pop(peer.mapped.prefix, None)
                peer.close()
            else:
                peer.mapped.forget_gone()
        now = time.monotonic()
        for msg_id in [i for i, (t, _, _) in self.sent.items() if now - t > KEEP_SENT]:
            del self.sent[msg_id]

    def stats(self) -> dict:
        pools = [p.pool for p in self.peers.values()]
        return {"peers": len(self.peers), "frames_out": sum(p.placed for p in pools),
                "bytes_out": sum(p.placed_bytes for p in pools), "inline": sum(p.failed for p in pools),
                "frames_in": self.frames_in, "bytes_in": self.bytes_in, "lent": sum(p.lent() for p in pools),
                "refused": self.refused, "segment_bytes": self.budget.used}

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        self.peers.clear()
        self.sent.clear()


def _ref(name: str, offset: int = 0) -> bytes:
    return msgpack.packb([name, offset])

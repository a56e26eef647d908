"""Request/reply over one ZeroMQ socket, both directions at once.

A node both asks (``call``) and answers (a handler) on the same socket: the scheduler
pushes ring changes down the connection a server registered on, and a server answers
on it. Replies are the ops ``ok`` and ``error`` and carry the id of their request.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Awaitable, Callable, Optional

import msgpack
import zmq

from psd.codec import Limits, Message, decode, encode
from psd.errors import ProtocolError, PsdError, PsdTimeoutError, RemoteError, error_from_wire

log = logging.getLogger("psd.transport")

Route = Optional[bytes]  # ROUTER identity of the peer; None on a DEALER
Handler = Callable[[Route, Message], Awaitable[Optional[Message]]]

REPLY_OPS = ("ok", "error")


def is_reply(msg: Message) -> bool:
    return msg.op in REPLY_OPS


def error_reply(request: Message, err: PsdError, sender: str) -> Message:
    data = err.data if all(isinstance(v, (int, str, float, bool)) for v in err.data.values()) else {}
    return request.reply("error", sender=sender,
                         meta={"code": err.code, "message": err.message, "data": data})


def raise_if_error(msg: Message) -> Message:
    if msg.op == "error":
        m = msg.meta
        raise error_from_wire(str(m.get("code", "remote")), str(m.get("message", "")),
                              msg.sender or None, m.get("data") if isinstance(m.get("data"), dict) else None)
    return msg


def _peek_header(frames, max_bytes: int) -> dict:
    """Best-effort read of a header that failed full decoding."""
    try:
        buf = frames[0].buffer if frames else b""
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
                 router: bool = False, concurrent: bool = False):
        self.sock = sock
        self.node_id = node_id
        self.limits = limits
        self.compression = compression
        self.handler = handler
        self.router = router
        #: run each request as its own task (the scheduler, whose handlers call out
        #: to other nodes); otherwise one at a time, in arrival order (servers)
        self.concurrent = concurrent
        self._running: set[asyncio.Task] = set()
        self.pending: dict[int, asyncio.Future] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.messages_out = 0

    # -- sending -------------------------------------------------------------
    def send_now(self, msg: Message, route: Route = None) -> asyncio.Future:
        """Hand ``msg`` to ZeroMQ at once (send queues are unbounded, so this never
        waits); messages on one socket therefore leave in call order."""
        frames = encode(msg, self.compression)
        self.bytes_out += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        self.messages_out += 1
        if self.router:
            frames = [route, *frames]
        return self.sock.send_multipart(frames, copy=False)

    async def send(self, msg: Message, route: Route = None) -> None:
        await self.send_now(msg, route)

    def request(self, msg: Message, route: Route = None) -> asyncio.Future:
        """Send ``msg`` with a fresh id; the returned future gets the reply."""
        msg.id = next(self._ids)
        msg.sender = self.node_id
        fut = asyncio.get_running_loop().create_future()
        self.pending[msg.id] = fut
        send = self.send_now(msg, route)
        send.add_done_callback(lambda s, i=msg.id: self._send_done(s, i))
        return fut

    def _send_done(self, send: asyncio.Future, msg_id: int) -> None:
        if send.cancelled() or send.exception() is None:
            return
        fut = self.pending.pop(msg_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(send.exception())

    async def call(self, msg: Message, route: Route = None, timeout: float | None = 10.0) -> Message:
        fut = self.request(msg, route)
        msg_id = msg.id
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise PsdTimeoutError(f"no reply to {msg.op} within {timeout} s", node=self.node_id) from None
        finally:
            self.pending.pop(msg_id, None)
        return raise_if_error(reply)

    async def reply(self, route: Route, reply: Message) -> None:
        reply.sender = self.node_id
        await self.send(reply, route)

    def reply_now(self, route: Route, reply: Message) -> None:
        """Answer from plain code (a held request released by a later event)."""
        reply.sender = self.node_id
        self.send_now(reply, route)

    # -- receiving -----------------------------------------------------------
    async def serve(self) -> None:
        """Receive forever: resolve replies, hand requests to the handler."""
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            route = None
            if self.router:
                if not frames:
                    continue
                route, frames = frames[0].bytes, frames[1:]
            self.messages_in += 1
            self.bytes_in += sum(len(f) for f in frames)
            try:
                msg = decode(frames, self.limits)
            except PsdError as err:
                await self._reject(route, frames, err)
                continue
            except Exception as err:  # a decoder bug must not end the receive loop
                log.exception("%s: decoding a message failed", self.node_id)
                await self._reject(route, frames, ProtocolError(f"message could not be decoded: {err!r}"))
                continue
            if is_reply(msg):
                fut = self.pending.pop(msg.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                continue
            if self.handler is None:
                continue
            if self.concurrent:
                task = asyncio.ensure_future(self._answer(route, msg))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            else:
                await self._answer(route, msg)

    async def _answer(self, route: Route, msg: Message) -> None:
        try:
            out = await self.handler(route, msg)
        except PsdError as err:
            log.warning("%s: %s from %s rejected: %s", self.node_id, msg.op, msg.sender or "?", err.message)
            out = error_reply(msg, err, self.node_id)
        except Exception as err:  # a bug on our side: answer, log, keep serving
            log.exception("%s: %s from %s failed", self.node_id, msg.op, msg.sender or "?")
            out = error_reply(msg, RemoteError(f"internal error handling {msg.op}: {err!r}"), self.node_id)
        if out is not None:
            try:
                await self.reply(route, out)
            except Exception as err:  # e.g. a reply that cannot be encoded: say so, keep serving
                log.exception("%s: could not send the reply to %s", self.node_id, msg.op)
                await self.reply(route, error_reply(
                    msg, RemoteError(f"internal error replying to {msg.op}: {err!r}"), self.node_id))

    async def _reject(self, route: Route, frames, err: PsdError) -> None:
        """Answer an undecodable message with an error naming the problem."""
        log.warning("%s: dropped a malformed message: %s", self.node_id, err.message)
        if self.router and route is None:
            return
        stub = Message(op="?", id=0)
        head = _peek_header(frames, self.limits.max_header_bytes)
        if head.get("op") in REPLY_OPS:
            # never answer a reply (two confused peers would echo errors forever), but fail
            # the request it answers now instead of letting it time out
            fut = self.pending.pop(head.get("id"), None) if isinstance(head.get("id"), int) else None
            if fut is not None and not fut.done():
                fut.set_exception(err)
            return
        if isinstance(head.get("id"), int):
            stub.id = head["id"]  # name the request in the reply when its id can be read
        await self.reply(route, error_reply(stub, err, self.node_id))

    def fail_pending(self, err: Exception) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()

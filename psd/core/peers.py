"""Requests a server sends to other servers: forwards to replicas, range copies, pings.

Forwards and copies travel on one ordered stream per destination (``psd.core.stream``):
a replica must apply a primary's forwards in the primary's order, and a range copy must
arrive after the forwards it already contains. When a destination reports a gap
(``out_of_order``: a message lost with its connection), every call not yet admitted is
sent again, in order, on a new epoch. A message lost at the end of a stream has no
later one to reveal its gap: the server probes such a stream (``unanswered_before``, an
ordered ``peer_ping``) once a later liveness ping to that node was answered. An answer
on a stream also shows that the calls before it were admitted and answered at once: any
of them still unanswered lost its answer, and goes again if ``resendable`` allows it.
Answers come back by token through ``answered``; each call's owner gets
``on_answer(call, reply, error, now)``.
"""
from __future__ import annotations

import itertools
from typing import Callable

from psd.codec import Message
from psd.core.effects import Ask, Forget
from psd.core.stream import SEQ, Outbound
from psd.errors import OutOfOrderError

#: on_answer(call, reply or None, error or None, now)
OnAnswer = Callable[["Call", Message | None, Exception | None, float], None]


class Call:
    """One request to another server; ``sent_at``: when it was last sent (a resend after
    a gap moves it); ``sq``: its place on its stream when ordered (its ``meta.sq``);
    ``again``: sent again because its answer alone was lost (so the answer that comes is
    to a request the receiver had already handled)."""

    __slots__ = ("token", "node", "address", "msg", "on_answer", "sent_at", "ordered", "sq", "again")

    def __init__(self, node: str, address: str, msg: Message, on_answer: OnAnswer, sent_at: float,
                 ordered: bool) -> None:
        self.token = 0
        self.node, self.address, self.msg = node, address, msg
        self.on_answer, self.sent_at, self.ordered = on_answer, sent_at, ordered
        self.sq: list[int] | None = None
        self.again = False


class PeerCalls:
    def __init__(self, outbox: list, resendable: Callable[[Call], bool] = lambda call: False) -> None:
        self.outbox = outbox
        #: which calls may go again once found to have lost their answer alone (decisions 131, 139)
        self.resendable = resendable
        self._calls: dict[int, Call] = {}
        self._streams: dict[str, Outbound[Call]] = {}
        self._tokens = itertools.count(1)
        self.resent = 0  # calls sent again after a gap (a lost message)

    def ask(self, node: str, address: str, msg: Message, on_answer: OnAnswer, now: float,
            ordered: bool = True) -> Call:
        call = Call(node, address, msg, on_answer, now, ordered)
        self._send(call)
        return call

    def _send(self, call: Call) -> None:
        call.token = next(self._tokens)
        self._calls[call.token] = call
        if call.ordered:
            stream = self._streams.get(call.node)
            if stream is None:
                stream = self._streams[call.node] = Outbound()
            call.sq = call.msg.meta[SEQ] = stream.stamp(call)
        self.outbox.append(Ask(call.node, call.address, call.msg, call.token))

    def forget(self, call: Call) -> None:
        """Stop waiting for ``call``'s answer (its owner gave up, or the node left)."""
        if self._calls.pop(call.token, None) is not None:
            self.outbox.append(Forget(call.node, call.token))
        stream = self._streams.get(call.node)
        if stream is not None and call.ordered:
            stream.drop(call)

    def answered(self, token: int, reply: Message | None, error: Exception | None, now: float) -> None:
        call = self._calls.pop(token, None)
        if call is None:
            return  # forgotten meanwhile
        sq = call.sq  # (stamped by us: no need to parse it back)
        if sq is not None and reply is not None:
            if reply.op == "error" and reply.meta.get("code") == OutOfOrderError.code:
                resume = (reply.meta.get("data") or {}).get("from", 0)
                stream = self._streams.get(call.node)
                again = (stream.refused(sq, resume if isinstance(resume, int) else 0) if stream else None) or []
                if call not in again:
                    again.insert(0, call)  # (refused after its epoch was handed back: still to resend)
                for c in again:
                    if c is not call:
                        self._calls.pop(c.token, None)
                        self.outbox.append(Forget(c.node, c.token))
                    self.resent += 1
                    c.sent_at = now
                    self._send(c)
                return
            stream = self._streams.get(call.node)
            if stream is not None:
                # the calls before it on the stream were admitted, and answered at once: any
                # still unanswered lost its answer alone (not only the last one on a stream)
                self._resend([c for c in stream.admitted(sq)
                              if c is not call and c.token in self._calls and self.resendable(c)], now)
        call.on_answer(call, reply, error, now)

    def unanswered_before(self, node: str, when: float) -> bool:
        """Whether a call on ``node``'s stream, last sent before ``when``, waits for its
        answer. A connection keeps its order both ways and a server answers what its
        streams admit at once, so when a message sent at ``when`` on it is answered, such
        a call (or its answer) was lost with the connection."""
        stream = self._streams.get(node)
        return stream is not None and any(c.sent_at < when and c.token in self._calls for c in stream.pending())

    def resend_answer_lost(self, node: str, before: float, now: float, which: Callable[[Call], bool]) -> int:
        """Send again the calls to ``node`` sent before ``before`` that ``which`` picks,
        that its stream admitted and that are still unanswered: an ordered message sent at
        ``before`` was admitted and answered, so each of them arrived and was answered at
        once, and that answer was lost. Returns how many went again."""
        stream = self._streams.get(node)
        waiting = {id(c) for c in stream.pending()} if stream is not None else set()
        again = [c for c in self._calls.values()
                 if c.node == node and c.ordered and c.sent_at < before and id(c) not in waiting and which(c)]
        self._resend(again, now)
        return len(again)

    def _resend(self, calls: list[Call], now: float) -> None:
        """Send unanswered calls again, in their order, under new tokens and stamps."""
        for c in calls:
            del self._calls[c.token]
            self.outbox.append(Forget(c.node, c.token))
            self.resent += 1
            c.again = True
            c.sent_at = now
            self._send(c)

    def drop_node(self, node: str) -> None:
        """``node`` left the ring: its stream starts afresh if it ever comes back."""
        self._streams.pop(node, None)

    def outstanding(self) -> int:
        return len(self._calls)

"""Pushes a primary applied and forwarded, waiting for every replica to hold them.

A push is acknowledged to its worker only once every replica of its rows answered the
forward, or left the ring (its successor copies the range from us). A replica that
refuses, or does not answer within ``request_timeout``, makes the push
``not_replicated``: it is not durable, the worker sends it again, and the resend
forwards it again (each server applies it once). A replica that refuses because a newer
ring made it the primary of those rows makes it ``not_owner`` instead: the worker asks
the scheduler for the ring and sends it there. A resend of a push still waiting waits
for the same answers.
"""
from __future__ import annotations

from typing import Callable

from psd.errors import NotOwnerError, NotReplicatedError, PsdError

#: done(error or None): called once, when every replica answered (or failed)
Done = Callable[[PsdError | None], None]


class Pending:
    __slots__ = ("rid", "calls", "refused", "give_up_at", "waiters", "settled", "error")

    def __init__(self, rid, give_up_at: float) -> None:
        self.rid = rid
        #: peer calls (psd.core.peers.Call) still unanswered; a dict, so their order is the
        #: order they were made (a set of objects iterates in address order: not replayable)
        self.calls: dict = {}
        self.refused: tuple[str, str, str, int] | None = None  # (node, code, message, ring) of the first refusal
        self.give_up_at = give_up_at
        self.waiters: list[Done] = []
        self.settled = False
        self.error: PsdError | None = None


class Acks:
    def __init__(self, node_id: Callable[[], str]) -> None:
        self._node_id = node_id
        self.by_rid: dict[tuple[str, int], Pending] = {}
        self.pending: dict[Pending, None] = {}  # (insertion order: replayable)
        self.not_replicated = 0

    def __len__(self) -> int:
        return len(self.pending)

    def start(self, rid, give_up_at: float) -> Pending:
        p = Pending(rid, give_up_at)
        self.pending[p] = None
        if rid is not None:
            self.by_rid[rid] = p
        return p

    def of(self, rids) -> Pending | None:
        """The pending acknowledgement of any of ``rids`` (a resend waits for it)."""
        for rid in rids:
            p = self.by_rid.get(rid)
            if p is not None:
                return p
        return None

    @staticmethod
    def wait(p: Pending, done: Done) -> None:
        """Call ``done`` when ``p`` settles (now, if it has)."""
        if p.settled:
            done(p.error)
        else:
            p.waiters.append(done)

    def answered(self, p: Pending, call, refused: tuple[str, str, str, int] | None) -> None:
        """One replica answered (``refused`` None: it holds the push), or is given up on."""
        p.calls.pop(call, None)
        if refused is not None and p.refused is None:
            p.refused = refused
        self.settle(p)

    def settle(self, p: Pending) -> None:
        if p.calls or p.settled:
            return
        p.settled = True
        self.pending.pop(p, None)
        if p.rid is not None and self.by_rid.get(p.rid) is p:
            del self.by_rid[p.rid]
        if p.refused is not None:
            node, code, message, ring = p.refused
            me = self._node_id()
            if code == NotOwnerError.code:
                p.error = NotOwnerError(f"{node} leads these keys at ring v{ring}, newer than {me}'s; the push "
                                        f"was not acknowledged: send it to the new owner", ring=ring)
            else:
                self.not_replicated += 1
                p.error = NotReplicatedError(
                    f"the push was applied on {me}, but its replica {node} refused it ({code}: "
                    f"{message}), so it is not durable: it would be lost with {me}. The client "
                    f"resends it (each server applies it once) until request_timeout; fix what {node} "
                    f"names (a limits setting that differs between servers?)", replica=node, reason=str(code))
        waiters, p.waiters = p.waiters, []
        for done in waiters:
            done(p.error)

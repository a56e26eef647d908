"""Ordered request streams between two nodes.

ZeroMQ delivers the messages of one connection in order, but it can lose some when the
connection drops, and a server can refuse a request that the sender then sends again
(not the owner any more, stalled, busy). Either way, requests sent after the missing one
must not be applied before it: a pull would miss a push issued before it, or an
``assign`` or ``adagrad`` update would be applied out of order. So every data request
carries its place in its sender's stream to that node, ``meta.sq = [epoch, seq]``:

* the receiver admits a stream's requests only in sequence (``Inbound.admit``); a gap,
  or anything after a request it refused in a way the sender answers by sending again
  (``Inbound.broken_at``), is refused with ``out_of_order`` naming where to resume;
* the sender (``Outbound``) keeps every request not yet known to be admitted; any
  answer to ``seq`` other than ``out_of_order`` tells it that everything before ``seq``
  was admitted; a refusal tells it which requests were not, and it sends those again,
  in their order, on a new epoch (sequence numbers from 0).

Nothing here reads the clock or touches a socket.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from psd.core.ids import next_epoch
from psd.errors import ProtocolError

#: the header field (``meta``) that carries a request's place: [epoch, seq]
SEQ = "sq"
#: epochs and sequence numbers are non-negative integers below this
MAX_SEQ = (1 << 62) - 1

T = TypeVar("T")


def parse(value) -> tuple[int, int] | None:
    """``meta.sq``: nil (a request outside any stream: hand-made, or one-shot), or
    [epoch, seq]."""
    if value is None:
        return None
    if (type(value) is list and len(value) == 2 and type(value[0]) is int and type(value[1]) is int
            and 0 <= value[0] <= MAX_SEQ and 0 <= value[1] <= MAX_SEQ):
        return value[0], value[1]
    raise ProtocolError(f"meta.{SEQ} must be nil or [epoch, seq], two integers in [0, 2**62); got {value!r:.60}")


class _In:
    __slots__ = ("epoch", "next", "broken")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.next = 1
        self.broken: int | None = None


class Inbound:
    """The receiving side: one stream per sender, whichever connection it arrives on."""

    def __init__(self) -> None:
        self._by_sender: dict[str, _In] = {}

    def admit(self, sender: str, sq: tuple[int, int]) -> int | None:
        """None if the request at ``sq`` is next in its stream (it is now admitted), else
        the sequence number the sender must resume from (in epoch ``sq[0]``)."""
        epoch, seq = sq
        st = self._by_sender.get(sender)
        if st is None or epoch > st.epoch:
            if seq != 0:
                return 0  # a new epoch starts at 0: its first request was lost
            self._by_sender[sender] = _In(epoch)
            return None
        if epoch < st.epoch:
            return 0  # an old epoch, which its sender has given up: it resends on the new one
        if st.broken is not None:
            return st.broken
        if seq != st.next:
            return min(st.next, seq)
        st.next += 1
        return None

    def break_at(self, sender: str, sq: tuple[int, int]) -> None:
        """The admitted request at ``sq`` was refused, and its sender will send it again:
        admit nothing after it until the sender starts a new epoch."""
        st = self._by_sender.get(sender)
        if st is not None and st.epoch == sq[0] and st.broken is None:
            st.broken = sq[1]

    def forget(self, sender: str) -> None:
        self._by_sender.pop(sender, None)

    def senders(self) -> set[str]:
        return set(self._by_sender)

    def __len__(self) -> int:
        return len(self._by_sender)


@dataclass(slots=True)
class Stamp(Generic[T]):
    seq: int
    item: T


class Outbound(Generic[T]):
    """The sending side of one stream: stamps requests in sending order and keeps those
    not yet known to be admitted (with the caller's ``item`` for each)."""

    def __init__(self, epoch: int | None = None) -> None:
        # a receiver keys streams by sender name and takes a higher epoch as the sender
        # starting over: every stream this process opens or restarts outnumbers the ones before
        self.epoch = next_epoch() if epoch is None else epoch
        self.next = 0
        self._unconfirmed: list[Stamp[T]] = []

    def stamp(self, item: T) -> list[int]:
        """The ``meta.sq`` of the next request, which is ``item``."""
        seq = self.next
        self.next += 1
        self._unconfirmed.append(Stamp(seq, item))
        return [self.epoch, seq]

    def admitted(self, sq: tuple[int, int]) -> list[T]:
        """An answer other than out_of_order came for ``sq``: it and everything before it
        in its epoch were admitted; returns their items (no longer tracked here)."""
        epoch, seq = sq
        if epoch != self.epoch:
            return []
        drop = 0
        for stamp in self._unconfirmed:
            if stamp.seq > seq:
                break
            drop += 1
        if not drop:
            return []
        done = [s.item for s in self._unconfirmed[:drop]]
        del self._unconfirmed[:drop]
        return done

    def refused(self, sq: tuple[int, int], resume: int) -> list[T] | None:
        """The receiver admitted everything before ``resume`` in ``sq``'s epoch and
        nothing from it on: returns those items (to send again, in this order) and starts
        a new epoch. None if that epoch is over already (its items were handed back)."""
        epoch, _ = sq
        if epoch != self.epoch:
            return None
        back = [s.item for s in self._unconfirmed if s.seq >= resume]
        self.restart()
        return back

    def restart(self) -> list[T]:
        """Start a new epoch (the connection was lost, say); returns the items not known
        to be admitted, in order. The first request of the new epoch has seq 0."""
        back = [s.item for s in self._unconfirmed]
        self._unconfirmed = []
        self.epoch = max(self.epoch + 1, next_epoch())
        self.next = 0
        return back

    def drop(self, item: T) -> None:
        """Stop tracking ``item`` (its request was given up)."""
        self._unconfirmed = [s for s in self._unconfirmed if s.item is not item]

    def pending(self) -> list[T]:
        return [s.item for s in self._unconfirmed]

"""Views of a table's storage lent to the transport, and the rule that protects them.

A pull whose rows sit in a row in one storage array can answer with a read-only view
instead of a copy: the reply is sent zero-copy, so ZeroMQ reads the table itself. Such a
view is lent under a ``Lease``, which the transport releases only once ZeroMQ reports the
send complete (a tracked send). A write into an array while any lease on it is held
first moves that array to a fresh copy (copy on write), so what was lent never changes
while it is read. What keeps a lease held is the transport's word, not the lifetime of a
Python object: libzmq reads the memory through a pointer.
"""
from __future__ import annotations

import numpy as np

#: a pulled run of rows smaller than this is copied, not lent: the copy is cheap, and a
#: lent view still alive at the next write costs a copy of the array it lies in (the
#: transport copies messages this small into ZeroMQ anyway)
LEND_MIN_BYTES = 64 * 1024


class Lease:
    """A view of a table lent to the transport: held until ``track``'s function says the
    send is complete, or ``release`` is called (the reply was dropped, or copied)."""

    __slots__ = ("_done", "of")

    def __init__(self, of: np.ndarray | None = None) -> None:
        self._done = None  # None: not yet handed to the transport, so held
        self.of = of  # the storage array the view lies in

    def held(self) -> bool:
        done = self._done
        return done is None or not done()

    def track(self, done) -> None:
        """``done()`` turns true once the transport no longer reads the view."""
        self._done = done

    def release(self) -> None:
        self._done = _sent


def _sent() -> bool:
    return True


def storage_of(view: np.ndarray) -> np.ndarray:
    """The array that owns a view's memory (numpy points a view's base at the owner)."""
    return view.base if isinstance(view.base, np.ndarray) else view


class Leases:
    """The leases out on one table's arrays."""

    __slots__ = ("_out", "_prune_at")

    def __init__(self) -> None:
        self._out: list[Lease] = []
        self._prune_at = 64

    def lend(self, view: np.ndarray) -> Lease:
        if len(self._out) >= self._prune_at:  # amortised: many replies may be queued at once
            self._out = [lease for lease in self._out if lease.held()]
            self._prune_at = max(64, 2 * len(self._out))
        lease = Lease(storage_of(view))
        self._out.append(lease)
        return lease

    def held_on(self, array: np.ndarray) -> bool:
        """Whether a write into ``array`` must go to a copy. Forgets released leases."""
        if not self._out:
            return False
        self._out = [lease for lease in self._out if lease.held()]
        return any(lease.of is array for lease in self._out)

    def count(self) -> int:
        return sum(1 for lease in self._out if lease.held())

    def clear(self) -> None:
        self._out.clear()

"""Bounded memory for one table on one server: admission and eviction.

A table whose keys keep coming (feature ids of a stream) grows without end. Two optional
bounds (``psd.schema.TableBounds``):

- **admission**: a key absent from the table is counted in a count-min sketch and gets a
  row only at its ``admit_after``-th push; earlier pushes of it are counted, not stored.
  A count-min sketch never counts low, so a key is admitted at its K-th push or, when
  other keys share all its counters, earlier; never later.
- **eviction**: the rows of the ranges this server *leads* form a list in the order
  they were last pushed (an LRU list kept in the hash rows' ``Track``). After a push the
  oldest go while more than ``max_rows`` are listed or while the oldest is idle past the
  TTL (in pushes to the table on this server, or in seconds of the ``now`` the server
  passes). Replicated rows are stamped but not listed: only a range's primary decides,
  and its replicas delete what it names (``psd.core.bounds``), so every copy holds the
  same rows.

Nothing here reads a clock: the server hands ``now`` in (``clock``).
"""
from __future__ import annotations

import numpy as np

from psd.schema import TableBounds
from psd.store import kernels as K

#: rows of the count-min sketch (independent hashes of a key)
SKETCH_DEPTH = 4
#: the sketch halves every counter after this many counts per counter of a row, so that
#: keys counted long ago fade (a sketch that only grows admits everything in the end)
SKETCH_AGE = 16


class Track:
    """Per row of the hash rows: a stamp (last push) and links of the led rows' LRU list
    (``prev`` is ``UNLISTED`` for a row outside it); ``meta`` = head, tail, listed."""

    def __init__(self) -> None:
        self.prev = np.full(0, K.UNLISTED, np.int32)
        self.nxt = np.zeros(0, np.int32)
        self.stamp = np.zeros(0, np.int64)
        self.meta = np.array([-1, -1, 0], np.int64)
        #: the led ranges, as sorted disjoint [first, last] (keys outside are replicated);
        #: a table on its own leads every key, a server's is told at each ring (``lead``)
        self.firsts = np.zeros(1, np.uint64)
        self.lasts = np.full(1, 2**64 - 1, np.uint64)
        self.stale = False  # rows arrived unlisted (a copy, a restore): relist before deciding

    def allocated(self) -> int:
        return self.prev.nbytes + self.nxt.nbytes + self.stamp.nbytes

    def grow(self, cap: int, n: int) -> None:
        prev = np.full(cap, K.UNLISTED, np.int32)
        prev[:n] = self.prev[:n]
        nxt = np.zeros(cap, np.int32)
        nxt[:n] = self.nxt[:n]
        stamp = np.zeros(cap, np.int64)
        stamp[:n] = self.stamp[:n]
        self.prev, self.nxt, self.stamp = prev, nxt, stamp

    def compact(self, keep: np.ndarray, cap: int, row_keys: np.ndarray, n: int) -> None:
        """The rows were compacted to those where ``keep``: follow, then relist."""
        stamp = np.zeros(cap, np.int64)
        stamp[:n] = self.stamp[:keep.size][keep]
        self.prev, self.nxt, self.stamp = np.full(cap, K.UNLISTED, np.int32), np.zeros(cap, np.int32), stamp
        self.relist(row_keys, n)

    def lead(self, firsts: np.ndarray, lasts: np.ndarray, row_keys: np.ndarray, n: int) -> None:
        self.firsts, self.lasts = firsts, lasts
        self.relist(row_keys, n)

    def relist(self, row_keys: np.ndarray, n: int) -> None:
        """Rebuild the list from the stamps: the rows of led keys, oldest first (ties in
        row order, which is insertion order). O(n log n): at ring changes and copies."""
        self.prev[:] = K.UNLISTED
        self.stale = False
        led = np.zeros(n, np.bool_)
        if n and self.firsts.size:
            K.in_ranges(row_keys, n, self.firsts, self.lasts, led)
        rows = np.flatnonzero(led)
        rows = rows[np.argsort(self.stamp[rows], kind="stable")].astype(np.int32)
        m = rows.size
        if not m:
            self.meta[:] = (-1, -1, 0)
            return
        self.prev[rows[0]] = -1
        self.prev[rows[1:]] = rows[:-1]
        self.nxt[rows[:-1]] = rows[1:]
        self.nxt[rows[-1]] = -1
        self.meta[:] = (rows[0], rows[-1], m)

    def listed(self) -> np.ndarray:
        """The listed rows, oldest first (for tests and tools: a walk of the list)."""
        out, r = [], int(self.meta[0])
        while r >= 0:
            out.append(r)
            r = int(self.nxt[r])
        return np.array(out, np.int64)


class Sketch:
    """A count-min sketch of pushes of keys not (yet) stored; ages by halving."""

    def __init__(self, width: int, threshold: int):
        self.counts = np.zeros((SKETCH_DEPTH, width), np.uint32)
        self.threshold = threshold
        self.since_aged = 0

    def admit(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Which of ``keys`` may be stored: the present (``rows`` >= 0) and those whose
        count reached the threshold with this push."""
        keep = np.empty(keys.size, np.bool_)
        self.since_aged += K.cms_admit(self.counts, keys, rows, self.threshold, keep)
        if self.since_aged >= SKETCH_AGE * self.counts.shape[1]:
            self.counts >>= 1
            self.since_aged = 0
        return keep

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes


class Clock:
    """The server's latest ``now``, shared by its bounded tables (set before each step)."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


class Bounded:
    """One table's bounds on one server: what it admits, what it evicts, and counts."""

    def __init__(self, bounds: TableBounds, clock: Clock | None = None):
        self.bounds = bounds
        self.clock = clock if clock is not None else Clock()
        self.sketch = Sketch(bounds.admit_sketch, bounds.admit_after) if bounds.admit_after > 1 else None
        self.pushes = 0  # pushes applied to the table here (the TTL's unit when in pushes)
        #: keys refused (pushes of absent keys not stored), rows evicted by decisions made
        #: here (as a primary), rows deleted because a primary said so (as a replica)
        self.counts = {"refused": 0, "evicted": 0, "evicted_by_primary": 0}

    def stamp(self) -> int:
        """The stamp of a push now: milliseconds under ttl_seconds, else the push count."""
        if self.bounds.ttl_seconds is not None:
            return int(self.clock.now * 1000)
        return self.pushes

    def expired_before(self) -> int:
        """Rows stamped before this are idle past the TTL."""
        b = self.bounds
        if b.ttl_seconds is not None:
            return int((self.clock.now - b.ttl_seconds) * 1000)
        if b.ttl_pushes:
            return self.pushes - b.ttl_pushes
        return np.iinfo(np.int64).min

"""The dense part of a table: runs of consecutive keys, each held as plain arrays.

A span push (or a keyed push of consecutive keys) of at least ``RUN_MIN`` keys makes a
run: key ``lo + i`` is row ``i`` of the run's arrays, so the run is found by one binary
search over the runs and its rows by subtraction, updated through slices and pulled as a
view of one array (lent zero-copy, see ``lending``). A span that touches a run (overlaps
it or starts where it ends) joins it: appending grows the arrays by half, so streaming
spans onto the end cost O(1) amortised; a span that bridges runs merges them (a copy).
Every key of a run is stored; keys between runs live in the hash rows.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np

#: the fewest new keys that make a new run; fewer go to the hash rows (a run has a cost
#: per request that touches the table: one more binary search)
RUN_MIN = 256
#: an extended run grows its arrays by this factor, so appends are O(1) amortised
RUN_GROWTH = 1.5


class Run:
    __slots__ = ("lo", "n", "vals", "state")

    def __init__(self, lo: int, n: int, vals: np.ndarray, state: list[np.ndarray]):
        self.lo, self.n = lo, n
        self.vals = vals  # (capacity, width); rows past n are zero
        self.state = state  # one (capacity, width) array per state field of the updater

    @property
    def end(self) -> int:
        return self.lo + self.n

    def arrays(self) -> list[np.ndarray]:
        return [self.vals, *self.state]

    def reserve(self, n: int) -> None:
        """Room for ``n`` rows (new arrays if it must grow: lent views keep the old)."""
        if n > self.vals.shape[0]:
            cap = max(n, int(self.vals.shape[0] * RUN_GROWTH))
            self.vals, *self.state = [_grown(a, cap, self.n) for a in self.arrays()]


def _grown(a: np.ndarray, cap: int, n: int) -> np.ndarray:
    out = np.zeros((cap, a.shape[1]), a.dtype)
    out[:n] = a[:n]
    return out


class Runs:
    def __init__(self, width: int, dtype: np.dtype, fields: int):
        self.width, self.dtype, self.fields = width, np.dtype(dtype), fields
        self.items: list[Run] = []  # sorted by lo, disjoint, never adjacent after a cover
        self._index()

    def _index(self) -> None:
        self.los = [r.lo for r in self.items]
        self.ends = [r.end for r in self.items]
        self.firsts = np.array(self.los, np.uint64)
        self.lasts = np.array([e - 1 for e in self.ends], np.uint64)

    def new(self, lo: int, n: int, cap: int | None = None) -> Run:
        cap = n if cap is None else cap
        return Run(lo, n, np.zeros((cap, self.width), self.dtype),
                   [np.zeros((cap, self.width), self.dtype) for _ in range(self.fields)])

    @property
    def total(self) -> int:
        return sum(r.n for r in self.items)

    def allocated(self) -> int:
        return sum(a.nbytes for r in self.items for a in r.arrays())

    # -- finding --------------------------------------------------------------------------
    def holding(self, lo: int, count: int) -> Run | None:
        """The run that holds every key of lo .. lo+count-1, if one does."""
        i = bisect_right(self.los, lo) - 1
        if i >= 0 and lo + count <= self.ends[i]:
            return self.items[i]
        return None

    def overlapping(self, lo: int, hi: int) -> list[Run]:
        """Runs holding some key of [lo, hi)."""
        i = bisect_right(self.ends, lo)
        j = bisect_left(self.los, hi)
        return self.items[i:j]

    def split(self, keys: np.ndarray) -> tuple[list[tuple[Run, int, int]], np.ndarray | None]:
        """Sorted ``keys`` cut into (run, a, b): keys[a:b] lie in the run; and a mask of
        the keys in no run (None: no key is in a run)."""
        if not self.items or not keys.size:
            return [], None
        a = np.searchsorted(keys, self.firsts, "left")
        b = np.searchsorted(keys, self.lasts, "right")
        hit = np.flatnonzero(b > a)
        if not hit.size:
            return [], None
        segs = [(self.items[j], int(a[j]), int(b[j])) for j in hit.tolist()]
        rest = np.ones(keys.size, np.bool_)
        for _, i0, i1 in segs:
            rest[i0:i1] = False
        return segs, rest

    # -- changing ---------------------------------------------------------------------------
    def cover(self, lo: int, hi: int) -> Run:
        """One run holding every key of [lo, hi): the run that holds them, or the runs
        touching [lo, hi) joined with the keys between them (zeros, for the caller to
        fill from the hash rows and then update)."""
        i = bisect_left(self.ends, lo)   # first run ending at or after lo
        j = bisect_right(self.los, hi)   # runs starting at or before hi touch it
        touch = self.items[i:j]
        if len(touch) == 1 and touch[0].lo <= lo and hi <= touch[0].end:
            return touch[0]
        new_lo = min(lo, touch[0].lo) if touch else lo
        new_hi = max(hi, touch[-1].end) if touch else hi
        if len(touch) == 1 and touch[0].lo == new_lo:  # appending to one run: amortised growth
            run = touch[0]
            run.reserve(new_hi - new_lo)
            run.n = new_hi - new_lo
        else:
            run = self.new(new_lo, new_hi - new_lo)
            for old in touch:
                at = old.lo - new_lo
                for dst, src in zip(run.arrays(), old.arrays()):
                    dst[at:at + old.n] = src[:old.n]
        self.items[i:j] = [run]
        self._index()
        return run

    def retain(self, firsts: list[int], ends: list[int]) -> int:
        """Keep only the keys inside the sorted disjoint ranges [first, end); returns how
        many keys were dropped. A run cut by a range boundary becomes copies of its pieces."""
        kept, dropped = [], 0
        for run in self.items:
            pieces = []
            for b, e in zip(firsts, ends):
                a0, a1 = max(b, run.lo), min(e, run.end)
                if a0 < a1:
                    pieces.append((a0, a1))
            if pieces == [(run.lo, run.end)]:
                kept.append(run)
                continue
            dropped += run.n - sum(a1 - a0 for a0, a1 in pieces)
            for a0, a1 in pieces:
                piece = self.new(a0, a1 - a0)
                for dst, src in zip(piece.arrays(), run.arrays()):
                    dst[:] = src[a0 - run.lo:a1 - run.lo]
                kept.append(piece)
        self.items = kept
        self._index()
        return dropped

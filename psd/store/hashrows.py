"""The sparse part of a table: rows in insertion order, found through a hash index.

Rows live in one growable array, ``raw``: each row is its key (8 bytes) then the values
and the updater's state fields side by side, so that the lookup that reads a row's key
has brought in the line the update writes (one cache miss a key fewer than keys in an
array of their own, decision 132). ``row_keys`` (uint64) and ``data`` (the values and
state) are strided views of it. Rows past ``n`` are zero: a new key's row starts as
zeros, as a never-pushed key reads.
An insert appends a row and fills one index entry, so it costs O(1) amortised whatever
the table's size; the row arrays grow by a quarter and the index doubles before it is
60% full (a rehash reads the row keys in order; ``kernels`` says why not fuller).
The index and the rows, once large, each get a fresh mapping with huge pages asked for
(``_zeros``): every lookup lands on a random page of them.

Dropping rows (``retain``, or keys that move into a dense run) compacts the rows into
new arrays and rebuilds the index: O(rows), as rare as ring changes. Deleting single
rows (``delete``: a bounded table's evictions) costs O(1) a row: the index entry goes by
backward shift and the last row moves into the hole, so rows stay 0 .. n-1.

A bounded table's rows also carry an LRU list and stamps (``track``, see ``bounded``),
kept beside the rows here because every move of a row must move its links too.

``generation`` names the placement of rows: it changes whenever a stored key may move
to another row (a delete, a compaction), never on inserts (they append) or growth (rows
keep their numbers). Row numbers found under one generation hold while it lasts; it is
drawn from one process-wide counter, so no two HashRows ever share one.

A push or a pull leaves the rows of its keys behind (``Recall``): the next push, pull
or find of the same keys (a worker pulls a minibatch's weights and pushes its gradients,
or pushes and then pulls the same keys) uses those rows instead of looking every key up
again, under the same generation check, each row checked against the key it holds.
"""
from __future__ import annotations

import itertools
import mmap

import numpy as np

from psd.errors import LimitError
from psd.store import kernels as K

#: the index grows when more than this fraction of its slots would be used
MAX_LOAD = 0.6
#: rows grow by this factor (at least), so that an insert costs O(1) amortised
ROW_GROWTH = 1.25
_MIN_BITS = 10
_GENERATIONS = itertools.count(1)
#: pushes and pulls of more keys than this leave no rows behind (``Recall``): its
#: buffer holds 8 bytes a key, and a request that large is not a minibatch
RECALL_MAX = 1 << 20
#: and the buffers stay within this share of the table's own arrays, or within
#: ``RECALL_FLOOR`` bytes: memory per stored key stays where it was (decision 123)
RECALL_SHARE = 1 / 64
RECALL_FLOOR = 256 << 10
#: keys a push larger than that is applied in at a time (its rows in a temporary array)
PIECE = 1 << 16
#: arrays of at least this many bytes get an anonymous mapping of their own, with huge
#: pages asked for (``_zeros``); numpy asks for them from the same size on
HUGE_MIN = 4 << 20
_HUGE = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")


def _u64(keys: np.ndarray) -> np.ndarray:
    """Keys as the kernels take them: contiguous, aligned uint64."""
    if keys.flags.c_contiguous and keys.flags.aligned and keys.dtype == np.uint64:
        return keys
    return np.require(keys, np.uint64, "CA")


def _zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros whose untouched pages cost nothing; from ``HUGE_MIN`` bytes on, in a private
    anonymous mapping of their own with MADV_HUGEPAGE (freed with the last view of it).

    Why not np.zeros, which asks for huge pages as well: calloc serves a large request
    from the heap whenever a freed block there fits (an earlier array of the table, a
    request's temporaries), and pages the heap already mapped stay 4 KiB pages. A
    lookup in a 1e7-key table reads a random page of the index and of the rows: with
    4 KiB pages that is a TLB miss too, and a table's speed depended on where malloc
    happened to put it (a sum table measured 0.77-0.9x an adagrad one for that alone,
    decision 145)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    if not _HUGE or count * dtype.itemsize < HUGE_MIN:
        return np.zeros(shape, dtype)
    try:
        mem = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE)  # (-1: anonymous)
    except OSError:  # (no address space or mapping left: the heap may still have room)
        return np.zeros(shape, dtype)
    try:
        mem.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # (a kernel without transparent huge pages: 4 KiB pages, as before)
        pass
    return np.frombuffer(mem, dtype, count).reshape(shape)


def _index(bits: int) -> np.ndarray:
    """An empty index of 2**bits entries whose first byte starts a cache line, so that
    every ``K.LINE`` entries from slot 0 are one line."""
    line = 64 // 4
    buf = _zeros(((1 << bits) + line,), np.uint32)
    skip = (-buf.ctypes.data % 64) // 4
    return buf[skip:skip + (1 << bits)]


def _rows(cap: int, cols: int, dtype: np.dtype) -> np.ndarray:
    """``cap`` zero rows of a key then ``cols`` values (the key as 8 bytes of ``dtype``);
    pages past the rows in use stay untouched until used."""
    return _zeros((cap, 8 // dtype.itemsize + cols), dtype)


def _key_view(raw: np.ndarray) -> np.ndarray:
    """The keys of ``raw``'s rows: a uint64 view with the rows' stride (unaligned when a
    row of a 4-byte dtype is not a multiple of 8 bytes; x86 and numba read it as is)."""
    return np.ndarray((raw.shape[0],), np.uint64, buffer=raw, strides=(raw.strides[0],))


def rows2d(a: np.ndarray, dtype) -> np.ndarray:
    if a.flags.c_contiguous and a.flags.aligned and a.dtype == dtype:
        return a
    return np.require(a, dtype, "CA")


class Recall:
    """The rows the last push or pull found its keys in, under a generation.

    ``rows_of(generation, keys)`` gives those rows back for a request of as many keys
    while the generation holds and the first and last keys are the ones their rows
    hold, else None; with ``complete``, only when every key was stored (a push may skip
    its inserts then). No copy of the keys is kept: the caller checks every key against
    its row's own key (``kernels.rows_pull``, ``rows_match``), which lies on the line the
    pull or push reads anyway (decision 133), so a different list never gets another's
    rows, and the caller may reuse its array."""

    __slots__ = ("complete", "generation", "m", "rows")

    def __init__(self) -> None:
        self.generation, self.m, self.complete = 0, 0, False
        self.rows = np.empty(0, np.int64)

    @staticmethod
    def fits(m: int, table_bytes: int) -> bool:
        """Whether a request of ``m`` keys may be kept beside arrays of ``table_bytes``."""
        return 0 < m <= RECALL_MAX and 8 * m <= max(RECALL_FLOOR, table_bytes * RECALL_SHARE)

    def buffer(self, m: int) -> np.ndarray:
        """Where a request of ``m`` keys writes its rows: the kept buffer (grown) when it
        may be remembered, else a block's scratch. Forgets what was kept."""
        self.m = 0
        if m > RECALL_MAX:
            return np.empty(K.BLOCK, np.int64)
        if self.rows.size < m:
            self.rows = np.empty(min(max(m, 2 * self.rows.size), RECALL_MAX), np.int64)
        return self.rows[:m]

    def keep(self, generation: int, keys: np.ndarray, rows: np.ndarray, complete: bool = True) -> None:
        """``rows`` (what ``buffer`` gave) now hold the rows of ``keys`` (-1: absent,
        unless ``complete``)."""
        m = keys.size
        if m > RECALL_MAX or rows.size != m:
            return
        self.generation, self.m, self.complete = generation, m, complete

    def rows_of(self, generation: int, keys: np.ndarray, row_keys: np.ndarray,
                complete: bool = False) -> np.ndarray | None:
        m = self.m
        if not m or keys.size != m or generation != self.generation or (complete and not self.complete):
            return None
        rows = self.rows[:m]
        first, last = rows[0], rows[m - 1]  # (O(1): another list of other ends is told apart here)
        if (first >= 0 and row_keys[first] != keys[0]) or (last >= 0 and row_keys[last] != keys[m - 1]):
            return None
        return rows

    def forget(self) -> None:
        """Keys were inserted another way (``upsert``): rows kept as absent may be wrong."""
        self.m = 0

    def allocated(self) -> int:
        return self.rows.nbytes


class HashRows:
    def __init__(self, width: int, dtype: np.dtype, fields: int):
        """``fields``: how many state fields the updater keeps beside the values."""
        self.width, self.dtype = width, np.dtype(dtype)
        self.cols = width * (1 + fields)  # a data row: values, then each state field
        self.n = 0
        self.bits = _MIN_BITS
        self.index = _index(self.bits)
        self._use(_rows(0, self.cols, self.dtype))
        #: a bounded table's LRU list and stamps (psd.store.bounded.Track), else None
        self.track = None
        self.generation = next(_GENERATIONS)
        self.recall = Recall()
        self._scratch = np.empty(K.BLOCK, np.int64)  # (rows of a pull not kept: a block's)

    def _use(self, raw: np.ndarray) -> None:
        """Make ``raw`` the rows (``row_keys`` and ``data`` are views of it)."""
        self.raw = raw
        self.row_keys = _key_view(raw)
        self.data = raw[:, raw.shape[1] - self.cols:]

    # -- sizes -------------------------------------------------------------------------
    def _limit(self) -> int:
        """Rows that may exist before something must grow."""
        return min(self.row_keys.size, int(MAX_LOAD * (1 << self.bits)))

    def _grow(self, more: int) -> None:
        """Room for at least ``more`` rows past ``n`` (rows and index)."""
        need = self.n + max(more, 1)
        if need > self.row_keys.size:
            cap = max(need, int(self.row_keys.size * ROW_GROWTH) + 64)
            raw = _rows(cap, self.cols, self.dtype)
            raw[:self.n] = self.raw[:self.n]
            self._use(raw)
            if self.track is not None:
                self.track.grow(cap, self.n)
        if need > MAX_LOAD * (1 << self.bits):
            bits = self.bits
            while need > MAX_LOAD * (1 << bits):
                bits += 1
            self._reindex(bits)

    def _reindex(self, bits: int) -> None:
        if bits > K.MAX_BITS:
            most = int(MAX_LOAD * (1 << K.MAX_BITS))
            raise LimitError(f"a table holds at most {most} keys outside dense spans on one server; "
                             f"add servers", limit="sparse_keys", max=most)
        self.bits = bits
        self.index = _index(bits)
        K.rehash(self.index, bits, self.row_keys, self.n)

    def _bytes(self) -> int:
        return self.index.nbytes + self.raw.nbytes

    def allocated(self) -> int:
        extra = (self.track.allocated() if self.track is not None else 0) + self.recall.allocated()
        return self._bytes() + extra

    # -- batch operations --------------------------------------------------------------
    def _inserting(self, step, keys: np.ndarray, later: int = 0) -> None:
        """Run ``step(start) -> (n, stopped at)`` until every key is done, growing in
        between; growth is sized from the share of new keys seen so far, for the keys
        left and ``later`` more (the rest of a push taken in pieces)."""
        start, m = 0, keys.size + later
        while True:
            n0 = self.n
            self.n, stop = step(start)
            if stop >= keys.size:
                return
            seen = stop - start
            new_share = (self.n - n0) / seen if seen else 1.0
            # (never more than every key left: a margin past that could double the index
            # for nothing, as 1.05e7 did for a push of 1e7 new keys at load 0.6)
            self._grow(min(m - stop, int((m - stop) * new_share * 1.05) + 1))
            start = stop

    def push(self, keys: np.ndarray, grad: np.ndarray, kind: int, pt: np.ndarray, pf: np.ndarray) -> None:
        keys, grad = _u64(keys), rows2d(grad, self.dtype)
        rows = self.recall.rows_of(self.generation, keys, self.row_keys, complete=True)
        if rows is not None and K.rows_match(self.row_keys, rows, keys):  # the last request's keys: no lookup
            K.rows_push(self.data, rows, grad, kind, self.width, pt, pf)
            return
        m = keys.size
        if self.recall.fits(m, self._bytes()):
            rows = self.recall.buffer(m)
            self._push(keys, grad, kind, pt, pf, rows)
            self.recall.keep(self.generation, keys, rows)
            return
        # else in pieces, remembered by none (the kernel writes every key's row)
        self.recall.forget()
        rows = np.empty(min(m, PIECE), np.int64)
        for a in range(0, m, PIECE):
            self._push(keys[a:a + PIECE], grad[a:a + PIECE], kind, pt, pf, rows[:min(PIECE, m - a)],
                       later=max(0, m - a - PIECE))

    def _push(self, keys, grad, kind, pt, pf, rows, later: int = 0) -> None:
        self._inserting(lambda start: K.hash_push(self.index, self.bits, self._limit(), self.row_keys, self.data,
                                                  self.n, keys, grad, start, kind, self.width, pt, pf, rows),
                        keys, later)

    def touch(self, keys: np.ndarray, now: int) -> None:
        """Stamp the rows of ``keys`` (all stored) with ``now``; led rows go to the
        tail of the LRU list."""
        t = self.track
        K.hash_touch(self.index, self.bits, self.row_keys, _u64(keys), t.prev, t.nxt, t.stamp, t.meta, now,
                     t.firsts, t.lasts)

    def delete(self, keys: np.ndarray) -> int:
        """Delete the rows of ``keys`` (absent keys are skipped); returns how many went."""
        t = self.track
        self.n, deleted = K.hash_delete(self.index, self.bits, self.row_keys, self.raw.view(np.uint8), self.n,
                                        _u64(keys), t.prev, t.nxt, t.stamp, t.meta)
        if deleted:  # (the last row moved into each hole)
            self.generation = next(_GENERATIONS)
        return int(deleted)

    def upsert(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys``, inserting (as zeros) those not stored."""
        keys = _u64(keys)
        rows = np.empty(keys.size, np.int64)
        self.recall.forget()
        self._inserting(lambda start: K.hash_upsert(self.index, self.bits, self._limit(), self.row_keys, self.n,
                                                    keys, start, rows), keys)
        return rows

    def push_rows(self, rows: np.ndarray, grad: np.ndarray, kind: int, pt: np.ndarray, pf: np.ndarray,
                  keys: np.ndarray | None = None) -> None:
        """Fold ``grad`` into the given rows (found under the current generation); with
        ``keys`` (theirs), a pull of the same keys next reads these rows."""
        K.rows_push(self.data, rows, rows2d(grad, self.dtype), kind, self.width, pt, pf)
        if keys is not None:
            kept = self.recall.buffer(keys.size) if self.recall.fits(keys.size, self._bytes()) else rows[:0]
            if kept.size == keys.size:
                kept[:] = rows
                self.recall.keep(self.generation, _u64(keys), kept)

    def pull(self, keys: np.ndarray) -> np.ndarray:
        keys = _u64(keys)
        out = np.empty((keys.size, self.width), self.dtype)
        rows = self.recall.rows_of(self.generation, keys, self.row_keys)
        if rows is not None and K.rows_pull(self.index, self.bits, self.row_keys, self.data, rows, keys, out,
                                            self.width):
            return out  # (the rows the last request found, each checked against its key)
        rows = self.recall.buffer(keys.size) if self.recall.fits(keys.size, self._bytes()) else self._scratch
        found = K.hash_pull(self.index, self.bits, self.row_keys, self.data, keys, out, self.width, rows)
        self.recall.keep(self.generation, keys, rows, complete=found == keys.size)
        return out

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, int]:
        """Row of each key (-1: absent) and how many are present."""
        keys = _u64(keys)
        rows = self.recall.rows_of(self.generation, keys, self.row_keys, complete=True)
        if rows is not None and K.rows_match(self.row_keys, rows, keys):
            return rows.copy(), keys.size
        rows = np.empty(keys.size, np.int64)
        return rows, K.hash_find(self.index, self.bits, self.row_keys, keys, rows)

    def row_of(self, key: int) -> int:
        rows, _ = self.find(np.array([key], np.uint64))
        return int(rows[0])

    def rows_in(self, lo: int, last: int) -> np.ndarray:
        """Rows whose key is in [lo, last], in row order: probed key by key when the
        range is much smaller than the table, else found by one scan of the row keys."""
        if self.n == 0 or last < lo:
            return np.empty(0, np.int64)
        if last - lo + 1 < self.n // 16:
            rows = np.empty(last - lo + 1, np.int64)
            found = K.hash_find_span(self.index, self.bits, self.row_keys, np.uint64(lo), last - lo + 1, rows)
            return np.sort(rows[:found])
        if lo == 0 and last == 2**64 - 1:
            return np.arange(self.n, dtype=np.int64)
        count = K.count_range(self.row_keys, self.n, np.uint64(lo), np.uint64(last))
        rows = np.empty(count, np.int64)
        K.scan_range(self.row_keys, self.n, np.uint64(lo), np.uint64(last), rows)
        return rows

    def count_in(self, lo: int, last: int) -> int:
        if self.n == 0 or last < lo:
            return 0
        if last - lo + 1 < self.n // 16:
            return int(self.rows_in(lo, last).size)
        return int(K.count_range(self.row_keys, self.n, np.uint64(lo), np.uint64(last)))

    def sorted_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of ``rows`` ordered by key."""
        keys = self.row_keys[rows]
        order = np.argsort(keys, kind="stable")
        return keys[order], rows[order]

    def keep(self, keep: np.ndarray) -> int:
        """Keep only the rows where ``keep`` (bool, one per row) is set; returns how many
        were dropped. Writes new arrays: views lent out keep the old ones."""
        kept = int(np.count_nonzero(keep))
        dropped = self.n - kept
        if not dropped:
            return 0
        self.generation = next(_GENERATIONS)
        cap = max(kept, 1)
        raw = _rows(cap, self.cols, self.dtype)
        raw[:kept] = self.raw[:self.n][keep]
        self._use(raw)
        self.n = kept
        if self.track is not None:
            self.track.compact(keep, cap, self.row_keys, kept)
        bits = _MIN_BITS
        while kept > MAX_LOAD * (1 << bits):
            bits += 1
        self._reindex(bits)
        return dropped

    def keep_ranges(self, firsts: np.ndarray, lasts: np.ndarray) -> int:
        """Drop every row whose key is outside the sorted [first, last] ranges."""
        if not self.n:
            return 0
        keep = np.empty(self.n, np.bool_)
        K.in_ranges(self.row_keys, self.n, _u64(firsts), _u64(lasts), keep)
        return self.keep(keep)

"""One table's keys and values on one server.

Two kinds of storage, every key in exactly one of them:

- dense runs (``runs``): consecutive keys made by span pushes, held as plain arrays, so
  a dense region is updated through slices and pulled as a view (lent zero-copy);
- hash rows (``hashrows``): every other key, in rows found through a hash index, so a
  push of new keys costs O(keys pushed), not O(table) as a sorted array's insert did.

Pushes into the hash rows run the updater inside the lookup loop (``kernels``): one
pass over the keys, each visited once. Range operations (``snapshot``, ``retain``,
``count_present_span``) scan the hash rows or probe key by key, whichever is cheaper,
and return keys sorted. A pull of a dense run can be lent as a view (``lending``); a
write into a run with a lease held copies it first. Hash rows are always copied out:
their keys lie between their values (``hashrows``), so no view of them is contiguous.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from psd.errors import ValuesError
from psd.schema import (DTYPE_NAMES, NAMESPACE_SEP, SMALL_PULL, TableSpec,  # noqa: F401
                        check_namespace, namespace_of, qualified)
from psd.store import kernels as K
from psd.store.bounded import Bounded, Track
from psd.store.hashrows import HashRows, rows2d
from psd.store.lending import LEND_MIN_BYTES, Lease, Leases  # noqa: F401  (Lease: part of this module's API)
from psd.store.runs import RUN_MIN, Run, Runs
from psd.store.updaters import Updater, make_updater

KEY_END = 2**64
_NO_ROWS = np.empty(0, np.int64)


class Usage:
    """Bytes of table storage one server holds, shared by its tables, so that checking
    a limit costs O(1) (``Table`` adds and subtracts as it inserts and drops keys)."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


def _as_keys(lo: int, n: int) -> np.ndarray:
    return np.uint64(lo) + np.arange(n, dtype=np.uint64)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every bit of ``z`` reaches every bit of the result."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _digests(data: np.ndarray) -> np.ndarray:
    """One 64-bit digest per row of ``data`` (2-d), over its bytes, 8 at a time, each
    mixed in whole (a multiply alone carries a difference only upward: rows (a, b) and
    (-a, -b) of float64 collided). Rows whose bytes differ collide by chance only, about
    as often as 64-bit hashes do."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(data.shape[0], data.shape[1] * data.itemsize)
    if raw.shape[1] % 8:
        raw = np.pad(raw, ((0, 0), (0, 8 - raw.shape[1] % 8)))
    words = raw.view(np.uint64)
    out = np.full(data.shape[0], 0xCBF29CE484222325, np.uint64)
    for j in range(words.shape[1]):
        out = _mix(out ^ words[:, j])
    return out


def _cut(keys: np.ndarray, limit: int) -> int:
    """A key below which at most ``limit`` of ``keys`` (more than that, unsorted) lie,
    and some do: a quantile of every 100th key when that holds (a compare of them all),
    else just above the ``limit``-th smallest (a partition of them all, ten times the
    cost at ten million keys)."""
    sample = keys[::100]
    at = sample.size * limit * 9 // (keys.size * 10)  # (nine tenths of the way: a margin)
    if at >= 100:  # (enough of the sample below it for a fair estimate)
        cut = np.partition(sample, at)[at]
        if 0 < np.count_nonzero(keys < cut) <= limit:
            return int(cut)
    return int(np.partition(keys, limit - 1)[limit - 1]) + 1


class _State(Mapping):
    """``table.state``: the updater's state fields by name. Asking for the names is free
    (range copies check them per message); an array comes in key order, like ``keys``."""

    def __init__(self, table: "Table"):
        self._table = table

    def __getitem__(self, field: str) -> np.ndarray:
        if field not in self._table._fields:
            raise KeyError(field)
        return self._table.snapshot(0, KEY_END)[2][field]

    def __iter__(self):
        return iter(self._table._fields)

    def __len__(self) -> int:
        return len(self._table._fields)

    def __contains__(self, field) -> bool:
        return field in self._table._fields


class Table:
    def __init__(self, spec: TableSpec, usage: Usage | None = None, lend_min_bytes: int = LEND_MIN_BYTES,
                 small_pull: int = SMALL_PULL):
        """``lend_min_bytes``: the smallest run of rows a pull lends instead of copying;
        ``small_pull``: pulls of fewer keys go straight to the lookup, a copy (the simulation
        sets both to 0: every run of rows is lent, to exercise what lending must guarantee)."""
        K.warm()  # loads from the disk cache; a no-op once the daemon has warmed
        self.spec = spec
        self.lend_min_bytes = lend_min_bytes
        self.small_pull = small_pull
        self.usage = usage if usage is not None else Usage()
        self.dtype = spec.np_dtype
        self.width = spec.width
        self.updater: Updater = make_updater(spec.updater, self.dtype, spec.options, spec.width)
        self._fields = tuple(self.updater.state_fields)
        fused = self.updater.fused()
        self._fused = None if fused is None else (
            K.KINDS[fused[0]], np.array(fused[1] or (0,), self.dtype), np.array(fused[2] or (0.0,), np.float64))
        self._hash = HashRows(self.width, self.dtype, len(self._fields))
        self._runs = Runs(self.width, self.dtype, len(self._fields))
        self._leases = Leases()
        self._counted = 0  # keys whose bytes are in usage
        self._vals_view: tuple | None = None
        self.state = _State(self)
        #: whether pushes may carry NaN or infinities (table option ``allow_nonfinite``):
        #: by default they are refused, since one would poison every later read of its key
        self.check_finite = self.dtype.kind == "f" and not spec.options.get("allow_nonfinite", False)
        #: storage bytes per key: the key, its values and the updater's state rows
        self.row_bytes = 8 + self.width * self.dtype.itemsize * (1 + len(self._fields))
        #: admission and eviction (table options admit_after, max_rows, ttl_*), or None.
        #: A bounded table keeps every key in the hash rows (no dense runs): rows are
        #: evicted one by one there
        self.bounded = Bounded(spec.bounds) if spec.bounds.active else None
        if self.bounded is not None and spec.bounds.evicting:
            self._hash.track = Track()
            self.row_bytes += 16  # the row's stamp and its two links

    # -- checks ------------------------------------------------------------
    def check_values(self, values: np.ndarray, n: int) -> np.ndarray:
        if values.dtype != self.dtype:
            raise ValuesError(f"table {self.spec.name!r} holds {self.dtype.name}, values are {values.dtype.name}")
        if values.ndim == 1 and self.width == 1:
            values = values.reshape(-1, 1)
        if values.shape != (n, self.width):
            raise ValuesError(f"table {self.spec.name!r}: values must have shape ({n}, {self.width}), "
                              f"got {values.shape}")
        return values

    def refuse_nonfinite(self, values: np.ndarray, keys: np.ndarray | None = None,
                         spans: list | None = None) -> None:
        """Raise ``ValuesError`` naming the first row of a push holding a NaN or an
        infinity (unless the table allows them): one would poison every later read of its
        key. The server calls it with the other checks, before anything of the push is
        applied or kept for later; ``keys`` or ``spans`` (lo, count) name the rows' keys."""
        if not self.check_finite or not values.size:
            return
        bad = K.first_nonfinite(rows2d(values, self.dtype))
        if bad < 0:
            return
        key = None
        if keys is not None:
            key = int(keys[bad])
        elif spans:
            row = bad
            for lo, count in spans:
                if row < count:
                    key = int(lo) + row
                    break
                row -= count
        raise ValuesError(f"table {self.spec.name!r}: row {bad}" + ("" if key is None else f" (key {key})")
                          + f" holds {values[bad].tolist()!r:.80}, not finite; nothing of this push was "
                          f"applied. Push finite values, or create the table with allow_nonfinite: true",
                          table=self.spec.name, row=bad, key=key)

    def _account(self) -> None:
        n = self.num_keys
        self.usage.bytes += (n - self._counted) * self.row_bytes
        self._counted = n

    # -- lending views (copy on write) ---------------------------------------------
    def _lend(self, view: np.ndarray, leases: list | None) -> np.ndarray:
        """``view`` itself when the caller takes a lease on it (appended to ``leases``),
        else a copy: only a sender that reports its sends complete may hold a view."""
        if leases is None or view.nbytes < self.lend_min_bytes or not view.flags.c_contiguous:
            return view.copy()
        view.flags.writeable = False
        leases.append(self._leases.lend(view))
        return view

    def lent(self) -> int:
        """How many leases on this table's storage are still held."""
        return self._leases.count()

    def _own_run(self, run: Run) -> None:
        """Call before writing into a run's values in place."""
        if self._leases.held_on(run.vals):
            run.vals = run.vals.copy()

    # -- applying an update ------------------------------------------------------------
    def _run_apply(self, run: Run, off: int, values: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Fold ``values`` into rows off, off+1, ... of ``run`` (or into ``rows``)."""
        self._own_run(run)
        if self._fused is None:
            sel = slice(off, off + values.shape[0]) if rows is None else rows
            self.updater.apply(run.vals, dict(zip(self._fields, run.state)), sel, values)
            return
        kind, pt, pf = self._fused
        if rows is None and kind == K.SUM:
            run.vals[off:off + values.shape[0]] += values
        elif rows is None and kind == K.ASSIGN:
            run.vals[off:off + values.shape[0]] = values
        else:
            s1 = run.state[0] if run.state else run.vals
            s2 = run.state[1] if len(run.state) > 1 else run.vals
            K.run_push(run.vals, s1, s2, _NO_ROWS if rows is None else rows, off, rows2d(values, self.dtype),
                       kind, self.width, pt, pf)

    def _hash_apply(self, keys: np.ndarray, values: np.ndarray) -> None:
        if self._fused is not None:
            self._hash.push(keys, values, *self._fused)
            return
        rows = self._hash.upsert(keys)
        vals, state = self._hash_views()
        self.updater.apply(vals, state, rows, values)

    def _bounded_push(self, keys: np.ndarray, values: np.ndarray) -> None:
        """A push into a bounded table: hash rows only; with eviction, the rows are then
        stamped and led rows moved to the tail of the LRU list."""
        b = self.bounded
        b.pushes += 1
        if not keys.size:
            return
        self._hash_apply(keys, values)
        if self._hash.track is not None:
            self._hash.touch(keys, b.stamp())

    # -- admission and eviction (bounded tables) -------------------------------------
    def admit(self, keys: np.ndarray) -> np.ndarray | None:
        """Which of the sorted unique ``keys`` a push may store (bool mask), counting the
        absent ones in the admission sketch; None when all may (no admission)."""
        b = self.bounded
        if b is None or b.sketch is None or not keys.size:
            return None
        rows, _ = self._hash.find(keys)
        keep = b.sketch.admit(np.require(keys, np.uint64, "CA"), rows)
        b.counts["refused"] += int(keys.size - np.count_nonzero(keep))
        return keep

    def evict(self) -> np.ndarray:
        """Decide and apply evictions among the led rows (past the TTL, over the row cap,
        oldest first); returns the evicted keys, sorted, for the replicas."""
        t = self._hash.track
        if t is None or not self._hash.n:
            return np.empty(0, np.uint64)
        h, b = self._hash, self.bounded
        if t.stale:
            t.relist(h.row_keys, h.n)
        cap = b.bounds.max_rows or np.iinfo(np.int64).max
        out = np.empty(int(t.meta[2]), np.uint64)
        k = K.lru_victims(h.row_keys, t.nxt, t.stamp, t.meta, cap, b.expired_before(), out)
        if not k:
            return out[:0]
        keys = np.sort(out[:k])
        h.delete(keys)
        self._account()
        b.counts["evicted"] += k
        return keys

    def drop_keys(self, keys: np.ndarray, count: str = "evicted_by_primary") -> int:
        """Delete the rows of ``keys`` that a primary evicted (we replicate them), or,
        ``count="evicted"``, that we evict as the primary (copies found to differ)."""
        if self._hash.track is None or not keys.size or not self._hash.n:
            return 0
        gone = self._hash.delete(keys)
        self._account()
        self.bounded.counts[count] += gone
        return gone

    def digests_in(self, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The keys an evicting table stores in [begin, end), sorted, and a 64-bit digest
        of each one's row (values and state): two copies compare rows by these."""
        keys, digests, _ = self.digests_from(begin, end, KEY_END)  # (no limit)
        return keys, digests

    def digests_from(self, begin: int, end: int, limit: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``digests_in`` of [begin, upto), a first part of [begin, end) with at most
        ``limit`` keys (``upto`` = end: all of it); an alignment goes a part at a time."""
        rows = self._hash.rows_in(begin, end - 1) if begin < end else np.empty(0, np.int64)
        upto = end
        if rows.size > limit:
            keys = self._hash.row_keys[rows]
            upto = _cut(keys, limit)
            rows = rows[keys < np.uint64(upto)]
        keys, rows = self._hash.sorted_rows(rows)
        return keys, _digests(self._hash.data[rows]), upto

    def lead(self, ranges) -> None:
        """The ranges this server leads now (sorted ``Range`` list): their rows are the
        ones it may evict. Rebuilds the LRU list only when they changed."""
        t = self._hash.track
        if t is None:
            return
        spans = [(r.begin, r.end - 1) for r in ranges if r.begin < r.end]
        firsts = np.array([a for a, _ in spans], np.uint64)
        lasts = np.array([z for _, z in spans], np.uint64)
        if np.array_equal(firsts, t.firsts) and np.array_equal(lasts, t.lasts):
            return
        t.lead(firsts, lasts, self._hash.row_keys, self._hash.n)

    def bounded_stats(self) -> dict:
        b = self.bounded
        if b is None:
            return {}
        t = self._hash.track
        return {**b.counts, **({"led_rows": int(t.meta[2])} if t is not None else {})}

    def _hash_views(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The hash rows' values and state fields as (strided) views of their data."""
        d, w = self._hash.data, self.width
        return d[:, :w], {f: d[:, w * (i + 1):w * (i + 2)] for i, f in enumerate(self._fields)}

    def _cover(self, lo: int, count: int) -> Run:
        """A run holding lo .. lo+count-1: keys of the span found in the hash rows move
        into it with their values and state (every key lives in one place)."""
        run = self._runs.cover(lo, lo + count)
        if self._hash.n:
            rows = self._hash.rows_in(lo, lo + count - 1)  # (none can lie in an older run)
            if rows.size:
                at = (self._hash.row_keys[rows] - np.uint64(run.lo)).astype(np.intp)
                data, w = self._hash.data, self.width
                for i, dst in enumerate(run.arrays()):
                    dst[at] = data[rows, w * i:w * (i + 1)]
                keep = np.ones(self._hash.n, np.bool_)
                keep[rows] = False
                self._hash.keep(keep)
        return run

    # -- operations ----------------------------------------------------------
    def push(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Apply ``values`` at sorted unique ``keys`` (checked by the caller)."""
        values = self.check_values(values, keys.size)
        if self.bounded is not None:
            self._bounded_push(keys, values)
        elif keys.size and int(keys[-1]) - int(keys[0]) == keys.size - 1:
            self._push_span(int(keys[0]), values, keys)
        else:
            segs, rest = self._runs.split(keys)
            for run, a, b in segs:
                rows = (keys[a:b] - np.uint64(run.lo)).astype(np.int64)
                self._run_apply(run, 0, values[a:b], rows)
            if rest is None:
                if keys.size:
                    self._hash_apply(keys, values)
            elif rest.any():
                self._hash_apply(keys[rest], values[rest])
        self._account()

    def locate(self, keys: np.ndarray) -> tuple[int, np.ndarray] | None:
        """Where the sorted unique ``keys`` are stored: (generation, hash rows) when every
        one of them is in the hash rows, else None. For ``push_at``: a server keeps it
        with a cached key list so that the next push of the list looks no key up."""
        if not keys.size or self._fused is None:
            return None
        if self._runs.items:
            _, rest = self._runs.split(keys)
            if rest is not None and not rest.all():
                return None
        generation = self._hash.generation
        rows, found = self._hash.find(keys)
        return (generation, rows) if found == keys.size else None

    def push_at(self, keys: np.ndarray, values: np.ndarray, at: tuple[int, np.ndarray] | None
                ) -> tuple[int, np.ndarray] | None:
        """``push(keys, values)`` through rows ``locate`` found, when the rows have not
        moved since (the same generation); otherwise a push that looks the keys up, after
        which they are located again. Returns where they are now (for the next push)."""
        if at is None or at[0] != self._hash.generation or at[1].size != keys.size:
            self.push(keys, values)
            return self.locate(keys)
        values = self.check_values(values, keys.size)
        b = self.bounded
        if b is not None:
            b.pushes += 1
        self._hash.push_rows(at[1], values, *self._fused, keys=keys)
        if b is not None and self._hash.track is not None:
            self._hash.touch(keys, b.stamp())
        return at

    def push_span(self, lo: int, values: np.ndarray) -> None:
        """Apply ``values`` to the dense keys lo, lo+1, ..."""
        count = values.shape[0] if values.ndim else 0
        values = self.check_values(values, count)
        if count and self.bounded is not None:
            self._bounded_push(_as_keys(lo, count), values)
            self._account()
        elif count:
            self._push_span(lo, values)
            self._account()

    def _push_span(self, lo: int, values: np.ndarray, keys: np.ndarray | None = None) -> None:
        count = values.shape[0]
        run = self._runs.holding(lo, count)
        if run is None and (count >= RUN_MIN or self._runs.overlapping(lo - 1, lo + count + 1)):
            run = self._cover(lo, count)
        if run is not None:
            self._run_apply(run, lo - run.lo, values)
        else:  # a few new keys apart from every run
            self._hash_apply(_as_keys(lo, count) if keys is None else keys, values)

    def pull(self, keys: np.ndarray, leases: list | None = None) -> np.ndarray:
        """The rows of ``keys`` (zeros for keys never pushed). With ``leases``, the rows
        of consecutive keys in a dense run may come back as a lent view (see ``_lend``)."""
        m = keys.size
        if (m < self.small_pull or m == 1) and not self._runs.items:
            return self._hash.pull(keys)  # a few keys (one is never lent): straight to the lookup
        if m and int(keys[-1]) - int(keys[0]) == m - 1:
            return self.pull_span(int(keys[0]), m, leases)
        segs, rest = self._runs.split(keys)
        if rest is None:
            return self._hash.pull(keys)
        out = np.empty((m, self.width), self.dtype)
        for run, a, b in segs:
            out[a:b] = run.vals.take((keys[a:b] - np.uint64(run.lo)).astype(np.intp), axis=0)
        if rest.any():
            out[rest] = self._hash.pull(keys[rest])
        return out

    def pull_span(self, lo: int, count: int, leases: list | None = None) -> np.ndarray:
        if not count:
            return np.empty((0, self.width), self.dtype)
        run = self._runs.holding(lo, count)
        if run is not None:
            return self._lend(run.vals[lo - run.lo:lo - run.lo + count], leases)
        # the stored rows scattered into zeros: memory is the reply plus the rows stored
        # there, whatever the span (a 74-byte request may span max_keys keys)
        out = np.zeros((count, self.width), self.dtype)
        hi = lo + count
        for run in self._runs.overlapping(lo, hi):
            a0, a1 = max(lo, run.lo), min(hi, run.end)
            out[a0 - lo:a1 - lo] = run.vals[a0 - run.lo:a1 - run.lo]
        rows = self._hash.rows_in(lo, hi - 1)
        if rows.size:
            at = (self._hash.row_keys[rows] - np.uint64(lo)).astype(np.intp)
            out[at] = self._hash.data[rows, :self.width]
        return out

    # -- introspection -------------------------------------------------------
    @property
    def num_keys(self) -> int:
        return self._runs.total + self._hash.n

    @property
    def nbytes(self) -> int:
        """Bytes counted against the server's memory limit: ``row_bytes`` per key."""
        return self.num_keys * self.row_bytes

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the arrays behind the table (index and spare capacity included)."""
        return self._hash.allocated() + self._runs.allocated()

    def count_present(self, keys: np.ndarray) -> int:
        """How many of the sorted unique ``keys`` are stored (a push adds the others)."""
        if keys.size == 0 or self.num_keys == 0:
            return 0
        segs, rest = self._runs.split(keys)
        n = sum(b - a for _, a, b in segs)
        hk = keys if rest is None else keys[rest]
        if hk.size and self._hash.n:
            n += self._hash.find(hk)[1]
        return int(n)

    def count_present_span(self, lo: int, count: int) -> int:
        """How many of the keys lo .. lo+count-1 are stored."""
        if not count:
            return 0
        hi = lo + count
        n = sum(min(hi, r.end) - max(lo, r.lo) for r in self._runs.overlapping(lo, hi))
        return n + self._hash.count_in(lo, hi - 1)

    def detach(self) -> None:
        """The table was dropped: stop counting it (a push held by the consistency gate
        may still write into it, uncounted, before it is garbage)."""
        self.usage.bytes -= self.nbytes
        self.usage = Usage()

    # -- views for tests and tools (each a pass over the table) ----------------------------
    @property
    def keys(self) -> np.ndarray:
        """Every stored key, sorted."""
        return self.snapshot(0, KEY_END)[0]

    @property
    def vals(self) -> np.ndarray:
        """The values in key order: a view of storage (the same object while storage is
        unchanged) when the table is one dense run, else a copy."""
        if self._hash.n == 0 and len(self._runs.items) == 1:
            run = self._runs.items[0]
            cached = self._vals_view
            if cached is None or cached[0] is not run.vals or cached[1] != run.n:
                self._vals_view = cached = (run.vals, run.n, run.vals[:run.n])
            return cached[2]
        return self.snapshot(0, KEY_END)[1]

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``keys`` among the sorted stored keys and which are stored (the
        sorted store's lookup, kept for tests that compare against it)."""
        stored = self.keys
        idx = np.searchsorted(stored, keys)
        if stored.size == 0:
            return idx, np.zeros(keys.size, dtype=bool)
        present = (stored[np.minimum(idx, stored.size - 1)] == keys) & (idx < stored.size)
        return idx, present

    # -- moving ranges between servers -----------------------------------------------
    def snapshot(self, begin: int, end: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Copies of the keys, values and updater state in [begin, end), sorted by key."""
        w = self.width
        pieces = []  # (keys, rows of values then state columns), each sorted, disjoint
        for run in self._runs.overlapping(begin, end):
            a0, a1 = max(begin, run.lo), min(end, run.end)
            pieces.append((_as_keys(a0, a1 - a0),
                           [a[a0 - run.lo:a1 - run.lo] for a in run.arrays()]))
        if begin < end:
            rows = self._hash.rows_in(begin, end - 1)
            if rows.size:
                keys, rows = self._hash.sorted_rows(rows)
                data = self._hash.data[rows]
                cut = np.searchsorted(keys, np.array([p[0][0] for p in pieces], np.uint64))
                bounds = [0, *cut.tolist(), keys.size]
                hashed = [(keys[a:b], [data[a:b, w * i:w * (i + 1)] for i in range(1 + len(self._fields))])
                          for a, b in zip(bounds[:-1], bounds[1:])]
                pieces = [p for pair in zip(hashed, pieces + [None]) for p in pair if p is not None]
        pieces = [p for p in pieces if p[0].size]
        if not pieces:
            empty = np.empty((0, w), self.dtype)
            return np.empty(0, np.uint64), empty, {f: empty.copy() for f in self._fields}
        keys = np.concatenate([p[0] for p in pieces])
        cols = [np.concatenate([p[1][i] for p in pieces]) for i in range(1 + len(self._fields))]
        return keys, cols[0], dict(zip(self._fields, cols[1:]))

    def install(self, keys: np.ndarray, vals: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Take over rows copied from another server: they replace what is stored."""
        if keys.size == 0:
            return
        given = [(i, a) for i, f in enumerate(self._fields, 1) if (a := state.get(f)) is not None]
        lo, m = int(keys[0]), keys.size
        dense = int(keys[-1]) - lo == m - 1 and (m >= RUN_MIN or self._runs.overlapping(lo - 1, lo + m + 1))
        dense = dense and self.bounded is None
        if dense:
            run = self._cover(lo, m) if self._runs.holding(lo, m) is None else self._runs.holding(lo, m)
            self._own_run(run)
            arrays, at = run.arrays(), slice(lo - run.lo, lo - run.lo + m)
            arrays[0][at] = vals
            for i, a in given:
                arrays[i][at] = a
        else:
            segs, rest = self._runs.split(keys)
            for run, a, b in segs:
                self._own_run(run)
                at = (keys[a:b] - np.uint64(run.lo)).astype(np.intp)
                arrays = run.arrays()
                arrays[0][at] = vals[a:b]
                for i, s in given:
                    arrays[i][at] = s[a:b]
            hashed = np.arange(m) if rest is None else np.flatnonzero(rest)
            if hashed.size:
                rows = self._hash.upsert(keys[hashed])
                if self._hash.track is not None:  # copied rows count as pushed now
                    self._hash.track.stamp[rows] = self.bounded.stamp()
                    self._hash.track.stale = True
                d, w = self._hash.data, self.width
                d[rows, :w] = vals[hashed]
                for i, s in given:
                    d[rows, w * i:w * (i + 1)] = s[hashed]
        self._account()

    def retain(self, ranges) -> int:
        """Drop every key outside ``ranges`` (sorted Range list); returns keys dropped."""
        spans = [(r.begin, r.end) for r in ranges if r.begin < r.end]
        firsts, ends = [b for b, _ in spans], [e for _, e in spans]
        dropped = self._runs.retain(firsts, ends)
        dropped += self._hash.keep_ranges(np.array(firsts, np.uint64), np.array([e - 1 for e in ends], np.uint64))
        self._account()
        return dropped

"""One table's keys and values on one server.

Storage is a sorted uint64 key array with a values array of shape (n, width) aligned
to it. Lookups are binary searches; a run of keys that is contiguous in storage is
updated through a slice (in place, no gather/scatter). New keys are merged in, which
costs a copy of the table, so a table grows in few large steps in practice (first
touch), not on every push.

A pull of keys that sit in a row in storage can return a read-only view, not a copy:
the reply is sent zero-copy, so ZeroMQ reads the table itself (a 1e7-key pull spent as
long copying as the push spent adding). Such a view is lent under a ``Lease``, which
the transport releases only once ZeroMQ reports the send complete (a tracked send); a
write while any lease is held first moves the table to a fresh copy, so what was lent
never changes while it is read. What keeps a lease held is the transport's word, not
the lifetime of a Python object: libzmq reads the memory through a pointer.
"""
from __future__ import annotations

import numpy as np

from psd.cluster.ranges import bounds
from psd.errors import ValuesError
from psd.schema import (DTYPE_NAMES, NAMESPACE_SEP, SMALL_PULL, TableSpec,  # noqa: F401
                         check_namespace, namespace_of, qualified)
from psd.store.updaters import Updater, make_updater

#: a pulled run of rows smaller than this is copied, not lent: the copy is cheap, and a
#: lent view still alive at the next write costs a copy of the whole table (the
#: transport copies messages this small into ZeroMQ anyway)
LEND_MIN_BYTES = 64 * 1024


class Lease:
    """A view of a table lent to the transport: held until ``track``'s function says the
    send is complete, or ``release`` is called (the reply was dropped, or copied)."""

    __slots__ = ("_done",)

    def __init__(self) -> None:
        self._done = None  # None: not yet handed to the transport, so held

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


class Usage:
    """Bytes of table storage one server holds, shared by its tables, so that checking
    a limit costs O(1) (``Table`` adds and subtracts as it inserts and drops keys)."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class Table:
    def __init__(self, spec: TableSpec, usage: Usage | None = None, lend_min_bytes: int = LEND_MIN_BYTES,
                 small_pull: int = SMALL_PULL):
        """``lend_min_bytes``: the smallest run of rows a pull lends instead of copying;
        ``small_pull``: pulls of fewer keys take the direct lookup, a copy (the simulation
        sets both to 0: every run of rows is lent, to exercise what lending must guarantee)."""
        self.spec = spec
        self.lend_min_bytes = lend_min_bytes
        self.small_pull = small_pull
        self.usage = usage if usage is not None else Usage()
        self.dtype = spec.np_dtype
        self.width = spec.width
        self.updater: Updater = make_updater(spec.updater, self.dtype, spec.options, spec.width)
        self.keys = np.empty(0, dtype=np.uint64)
        self._runs_of: np.ndarray | None = None
        self.vals = np.empty((0, self.width), dtype=self.dtype)
        self.state = {f: np.empty((0, self.width), dtype=self.dtype) for f in self.updater.state_fields}
        self._leases: list[Lease] = []  # views of vals lent out (copy on write while any is held)
        self._prune_at = 64
        #: storage bytes per key: the key, its values and the updater's state rows
        self.row_bytes = 8 + self.width * self.dtype.itemsize * (1 + len(self.state))

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

    # -- lending views (copy on write) ---------------------------------------------
    def _lend(self, view: np.ndarray, leases: list | None) -> np.ndarray:
        """``view`` itself when the caller takes a lease on it (appended to ``leases``),
        else a copy: only a sender that reports its sends complete may hold a view."""
        if leases is None or view.nbytes < self.lend_min_bytes:
            return view.copy()
        view.flags.writeable = False
        if len(self._leases) >= self._prune_at:  # amortised: many replies may be queued at once
            self._leases = [lease for lease in self._leases if lease.held()]
            self._prune_at = max(64, 2 * len(self._leases))
        lease = Lease()
        self._leases.append(lease)
        leases.append(lease)
        return view

    def lent(self) -> int:
        """How many leases on this table's storage are still held."""
        return sum(1 for lease in self._leases if lease.held())

    def _own_vals(self) -> None:
        """Call before writing into ``vals`` in place."""
        if self._leases:
            if any(lease.held() for lease in self._leases):
                self.vals = self.vals.copy()
            self._leases.clear()

    # -- lookups -----------------------------------------------------------
    def _runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Runs of consecutive keys in storage: (first key, position, length) of each.
        Rebuilt only when the key array is replaced (every insert makes a new one)."""
        if self._runs_of is not self.keys:
            k = self.keys
            starts = np.concatenate(([0], np.flatnonzero(np.diff(k) != 1) + 1)) if k.size else np.empty(0, np.int64)
            self._run_index = (k[starts], starts, np.diff(np.append(starts, k.size)).astype(np.uint64))
            self._runs_of = k
        return self._run_index

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Storage positions of ``keys`` and a mask of which are present.

        Tables are often dense in places (embeddings, dense spans): when storage is
        made of few runs of consecutive keys, a key is found by a binary search over
        the runs plus an offset, which is far cheaper than searching every key. For
        absent keys only the mask matters."""
        n = self.keys.size
        if n and keys.size >= 64:
            first, pos, length = self._runs()
            if first.size * 16 <= n:
                r = np.searchsorted(first, keys, side="right") - 1
                rc = np.maximum(r, 0)
                off = keys - first[rc]  # wraps around (huge) below the first run: absent
                present = (r >= 0) & (off < length[rc])
                idx = np.where(present, pos[rc] + np.minimum(off, length[rc]).astype(np.int64), 0)
                return idx, present
        idx = np.searchsorted(self.keys, keys)
        if n == 0:
            return idx, np.zeros(keys.size, dtype=bool)
        present = self.keys[np.minimum(idx, n - 1)] == keys
        present &= idx < n
        return idx, present

    def _span(self, lo: int, count: int) -> int | None:
        """Storage offset where keys lo..lo+count-1 all sit in a row, or None."""
        i0 = int(np.searchsorted(self.keys, np.uint64(lo)))
        last = i0 + count - 1
        if last < self.keys.size and int(self.keys[i0]) == lo and int(self.keys[last]) == lo + count - 1:
            return i0  # sorted unique integers: first and last match => all between do
        return None

    def _insert(self, new_keys: np.ndarray) -> None:
        self.usage.bytes += new_keys.size * self.row_bytes
        pos = np.searchsorted(self.keys, new_keys)
        self._leases.clear()  # new arrays: what was lent stays with the old ones
        self.keys = np.insert(self.keys, pos, new_keys)
        zeros = np.zeros((new_keys.size, self.width), dtype=self.dtype)
        self.vals = np.insert(self.vals, pos, zeros, axis=0)
        for f in self.state:
            self.state[f] = np.insert(self.state[f], pos, zeros, axis=0)

    def _selector(self, keys: np.ndarray, *, create: bool):
        """A slice or index array into storage for ``keys`` (inserting if asked)."""
        if keys.size == 0:
            return slice(0, 0), None
        i0 = self._span(int(keys[0]), keys.size) if int(keys[-1]) - int(keys[0]) == keys.size - 1 else None
        if i0 is not None:
            return slice(i0, i0 + keys.size), None
        idx, present = self._locate(keys)
        if not present.all():
            if not create:
                return idx, present
            self._insert(keys[~present])
            idx, _ = self._locate(keys)
        if idx[-1] - idx[0] == keys.size - 1:
            return slice(int(idx[0]), int(idx[-1]) + 1), None
        return idx, None

    # -- operations ----------------------------------------------------------
    def push(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Apply ``values`` at sorted unique ``keys`` (checked by the caller)."""
        values = self.check_values(values, keys.size)
        sel, _ = self._selector(keys, create=True)
        self._own_vals()
        self.updater.apply(self.vals, self.state, sel, values)

    def pull(self, keys: np.ndarray, leases: list | None = None) -> np.ndarray:
        """The rows of ``keys`` (zeros for keys never pushed). With ``leases``, rows that
        sit in a row in storage may come back as a lent view (see ``_lend``)."""
        n = self.keys.size
        if 0 < keys.size < self.small_pull and n:
            # a few keys: one search and one gather beat the slice and run detection
            idx = self.keys.searchsorted(keys)
            found = self.keys.take(idx, mode="clip") == keys
            if np.count_nonzero(found) == keys.size:
                return self.vals.take(idx, axis=0)
            out = np.zeros((keys.size, self.width), dtype=self.dtype)
            out[found] = self.vals.take(idx[found], axis=0)
            return out
        sel, present = self._selector(keys, create=False)
        if present is None:
            return self._lend(self.vals[sel], leases) if isinstance(sel, slice) else self.vals[sel]
        out = np.zeros((keys.size, self.width), dtype=self.dtype)
        out[present] = self.vals[sel[present]]
        return out

    def push_span(self, lo: int, values: np.ndarray) -> None:
        """Apply ``values`` to the dense keys lo, lo+1, ..."""
        count = values.shape[0] if values.ndim else 0
        values = self.check_values(values, count)
        i0 = self._span(lo, count) if count else 0
        if i0 is None:
            self.push(np.arange(lo, lo + count, dtype=np.uint64), values)
        else:
            self._own_vals()
            self.updater.apply(self.vals, self.state, slice(i0, i0 + count), values)

    def pull_span(self, lo: int, count: int, leases: list | None = None) -> np.ndarray:
        i0 = self._span(lo, count) if count else 0
        if i0 is not None:
            return self._lend(self.vals[i0:i0 + count], leases)
        # scatter the stored keys inside the span into zeros: memory is the reply plus the
        # rows stored there, not (as looking up arange(lo, lo + count) cost) six times the
        # reply, which a 74-byte request spanning max_keys keys could ask for
        k0, k1 = bounds(self.keys, lo, lo + count)
        out = np.zeros((count, self.width), dtype=self.dtype)
        out[(self.keys[k0:k1] - np.uint64(lo)).astype(np.intp)] = self.vals[k0:k1]
        return out

    # -- introspection -------------------------------------------------------
    @property
    def num_keys(self) -> int:
        return int(self.keys.size)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.vals.nbytes + sum(a.nbytes for a in self.state.values()))

    def count_present(self, keys: np.ndarray) -> int:
        """How many of the sorted unique ``keys`` are stored (a push adds the others)."""
        if keys.size == 0 or self.keys.size == 0:
            return 0
        return int(np.count_nonzero(self._locate(keys)[1]))

    def count_present_span(self, lo: int, count: int) -> int:
        """How many of the keys lo .. lo+count-1 are stored."""
        i0, i1 = self._bounds(lo, lo + count)
        return int(i1 - i0)

    def detach(self) -> None:
        """The table was dropped: stop counting it (a push held by the consistency gate
        may still write into it, uncounted, before it is garbage)."""
        self.usage.bytes -= self.nbytes
        self.usage = Usage()

    # -- moving ranges between servers -----------------------------------------------
    def _bounds(self, begin: int, end: int) -> tuple[int, int]:
        return bounds(self.keys, begin, end)

    def snapshot(self, begin: int, end: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Copies of the keys, values and updater state in [begin, end)."""
        i0, i1 = self._bounds(begin, end)
        return (self.keys[i0:i1].copy(), self.vals[i0:i1].copy(),
                {f: a[i0:i1].copy() for f, a in self.state.items()})

    def install(self, keys: np.ndarray, vals: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Take over rows copied from another server: they replace what is stored."""
        if keys.size == 0:
            return
        sel, _ = self._selector(keys, create=True)
        self._own_vals()
        self.vals[sel] = vals
        for f, a in state.items():
            if f in self.state:
                self.state[f][sel] = a

    def retain(self, ranges) -> int:
        """Drop every key outside ``ranges`` (sorted Range list); returns keys dropped."""
        keep = np.zeros(self.keys.size, dtype=bool)
        for r in ranges:
            i0, i1 = self._bounds(r.begin, r.end)
            keep[i0:i1] = True
        dropped = int(self.keys.size - keep.sum())
        self.usage.bytes -= dropped * self.row_bytes
        if dropped:
            self._leases.clear()
            self.keys, self.vals = self.keys[keep], self.vals[keep]
            self.state = {f: a[keep] for f, a in self.state.items()}
        return dropped

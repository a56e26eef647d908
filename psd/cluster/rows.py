"""The rows a request names: sorted uint64 keys or dense key spans, plus values for a push.

One representation for the client (to cut a request by owners), the server (to check
ownership and cut forwards to replicas) and the wire (keys frame or ``meta.spans``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_DTYPE, KEY_SPACE_END, check_sorted_unique
from psd.cluster.routing import Owners, Slices, group_keys, group_spans
from psd.codec import Limits, Message
from psd.errors import KeysError, MessageTooLargeError, ProtocolError
from psd.filters.wire import decode_values


@dataclass
class Rows:
    keys: np.ndarray | None = None            # sorted, unique uint64; or None for spans
    spans: list[tuple[int, int]] | None = None  # [(lo, count), ...] ascending, disjoint
    values: np.ndarray | None = None          # (count, width), row i for the i-th key
    #: the signature under which the receiver keeps ``keys`` (key caching), when it does
    sig: int | None = None
    #: sender side: header fields every message of these rows carries (a filter's
    #: ``flt`` and ``q``), and the zstd stage of their table (level, minimum bytes)
    meta: dict | None = None
    zstd: tuple[int, int] | None = None
    #: receiver side: the key cache's entry these keys came from (psd.core.keycache.Held),
    #: whose ``at`` says where they are stored; ``placed(held, at)`` records a new place
    held: object | None = None
    placed: object | None = None

    @property
    def count(self) -> int:
        if self.keys is not None:
            return self.keys.size
        spans = self.spans
        if len(spans) == 1:  # (a dense request: asked for several times per request)
            return spans[0][1]
        return sum(n for _, n in spans)

    # -- cutting -------------------------------------------------------------------
    def groups(self, ring: Assignment) -> list[tuple[Owners, Slices]]:
        return group_keys(ring, self.keys) if self.keys is not None else group_spans(ring, self.spans)

    def take(self, slices: Slices) -> "Rows":
        """The rows in ``slices`` (ascending), as a new Rows (views when one slice)."""
        if len(slices) == 1 and slices[0][0] == 0 and slices[0][1] == self.count:
            return self  # all of them (a request that one server answers)
        vals = None
        if self.values is not None:
            vals = (self.values[slices[0][0]:slices[0][1]] if len(slices) == 1
                    else np.concatenate([self.values[a:b] for a, b in slices]))
        if self.keys is not None:
            keys = (self.keys[slices[0][0]:slices[0][1]] if len(slices) == 1
                    else np.concatenate([self.keys[a:b] for a, b in slices]))
            return Rows(keys=keys, values=vals, meta=self.meta, zstd=self.zstd)
        return Rows(spans=[self._span_of(a, b) for a, b in slices], values=vals, meta=self.meta, zstd=self.zstd)

    def _span_of(self, i0: int, i1: int) -> tuple[int, int]:
        row = 0
        for lo, n in self.spans:
            if row <= i0 and i1 <= row + n:
                return lo + (i0 - row), i1 - i0
            row += n
        raise ValueError(f"rows [{i0}, {i1}) cross a span boundary")

    def key_at(self, i: int) -> int:
        """The key of row ``i``."""
        if self.keys is not None:
            return int(self.keys[i])
        row = 0
        for lo, n in self.spans:
            if i < row + n:
                return lo + (i - row)
            row += n
        raise IndexError(f"row {i} of {row}")

    def first_last(self) -> tuple[int, int]:
        if self.keys is not None:
            return int(self.keys[0]), int(self.keys[-1])
        return self.spans[0][0], self.spans[-1][0] + self.spans[-1][1] - 1

    # -- wire ------------------------------------------------------------------------
    def to_message(self, op: str, *, table: str | None = None, ring: int = 0, clock: int = 0,
                   meta: dict | None = None) -> Message:
        """A message of these rows (``meta`` copied, with the rows' own fields)."""
        meta = dict(meta or {})
        if self.meta:
            meta.update(self.meta)
        arrays = []
        if self.keys is not None:
            arrays.append(self.keys)
        else:
            meta["spans"] = [[lo, n] for lo, n in self.spans]
        if self.values is not None:
            arrays.append(self.values)
        # (fields by position, in Message's order: keywords would cost a kwargs dict per call)
        return Message(op, 0, "", table, ring, clock, meta, arrays, None, self.zstd)

    @classmethod
    def from_message(cls, msg: Message, limits: Limits, with_values: bool,
                     keys: np.ndarray | None = None) -> "Rows":
        """Parse and check the rows of a request; raises before anything is applied.
        ``keys``: the request's keys, when it named them by signature (``meta.kc``; the
        receiver's key cache holds them, checked when they were kept): no keys frame."""
        n_values = 1 if with_values else 0
        spans = msg.meta.get("spans")
        if keys is not None:
            if spans is not None:
                raise ProtocolError(f"{msg.op} names both spans and a key list (meta.kc); send one of them")
            if len(msg.arrays) != n_values:
                raise ProtocolError(f"{msg.op} by key-list signature (meta.kc) expects {n_values} payload frame(s) "
                                    f"and no keys frame, got {len(msg.arrays)}")
            rows = cls(keys=keys)
        elif spans is not None:
            rows = cls(spans=_check_spans(spans, limits))
            if len(msg.arrays) != n_values:
                raise ProtocolError(f"{msg.op} by spans expects {n_values} payload frame(s), got {len(msg.arrays)}")
        else:
            if len(msg.arrays) != n_values + 1:
                raise ProtocolError(f"{msg.op} expects {n_values + 1} payload frame(s) (keys first), "
                                    f"got {len(msg.arrays)}")
            keys = msg.arrays[0]
            if keys.dtype != KEY_DTYPE or keys.ndim != 1:
                raise KeysError(f"keys frame must be 1-d uint64, got {keys.dtype.name} with shape {keys.shape}")
            check_sorted_unique(keys)
            rows = cls(keys=keys)
        if with_values:
            rows.values = msg.arrays[-1]
            if "flt" in msg.meta:  # filtered on the way (psd.filters): undone, or refused whole
                rows.values = decode_values(msg.meta, rows.values)
        return rows

    # -- storage ---------------------------------------------------------------------
    def push_into(self, table) -> None:
        if self.keys is not None:
            if self.held is not None:  # a cached key list: through the rows it was found in
                self.placed(self.held, table.push_at(self.keys, self.values, self.held.at))
            else:
                table.push(self.keys, self.values)
            return
        row = 0
        for lo, n in self.spans:
            table.push_span(lo, self.values[row:row + n])
            row += n

    def pull_from(self, table, leases: list | None = None) -> np.ndarray:
        """The rows' values; with ``leases``, possibly lent views of the table (Table.pull)."""
        if self.keys is not None:
            return table.pull(self.keys, leases)
        if len(self.spans) == 1:
            lo, n = self.spans[0]
            return table.pull_span(lo, n, leases)
        return np.concatenate([table.pull_span(lo, n) for lo, n in self.spans])


def _check_spans(spans, limits: Limits) -> list[tuple[int, int]]:
    if not isinstance(spans, list) or not spans or len(spans) > 4096:
        raise ProtocolError("meta.spans must be a non-empty list of at most 4096 [lo, count] pairs")
    out = []
    end = -1
    total = 0
    for s in spans:
        if (not isinstance(s, list) or len(s) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in s)):
            raise ProtocolError("each of meta.spans must be [lo, count] of non-negative integers")
        lo, n = s
        if lo + n > KEY_SPACE_END:
            raise KeysError(f"span [{lo}, {lo + n}) runs past the end of the key space")
        if lo < end:
            raise KeysError("spans must be sorted and must not overlap")
        end = lo + n
        total += n
        out.append((lo, n))
    if total > limits.max_keys:  # a span costs nothing to ask for, only to answer
        raise MessageTooLargeError(f"spans cover {total} keys, limit is {limits.max_keys}; split the request")
    return out

"""Half-open key ranges over the uint64 key space and slicing sorted keys by them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from psd.errors import KeysError

KEY_SPACE_END = 1 << 64  # one past the largest uint64 key


@dataclass(frozen=True, order=True, slots=True)
class Range:
    """Keys ``begin <= k < end``; ``end`` may be 2**64."""

    begin: int
    end: int

    def __post_init__(self):
        if not 0 <= self.begin <= self.end <= KEY_SPACE_END:
            raise ValueError(f"bad range [{self.begin}, {self.end})")

    def __contains__(self, key: int) -> bool:
        return self.begin <= key < self.end

    @property
    def size(self) -> int:
        return self.end - self.begin

    def __str__(self) -> str:
        return f"[{self.begin:#x}, {self.end:#x})"


def range_to_wire(r: Range) -> list[int]:
    return [r.begin, r.end - 1]  # msgpack cannot carry 2**64: send the last key


def range_from_wire(w) -> Range:
    return Range(int(w[0]), int(w[1]) + 1)


#: the keys' dtype (compared as a dtype: three times cheaper than against the type np.uint64)
KEY_DTYPE = np.dtype(np.uint64)


def as_keys(keys) -> np.ndarray:
    """Coerce user keys to a uint64 array and check they are sorted and unique."""
    if type(keys) is np.ndarray and keys.dtype is KEY_DTYPE and keys.ndim == 1:  # the usual case
        check_sorted_unique(keys)
        return keys
    arr = np.asarray(keys)
    if arr.dtype.kind in "fO" and isinstance(keys, (list, tuple)):
        # numpy turns [0, 2**64 - 1] into float64 (int64 and uint64 promote to float):
        # a list of Python integers is still a valid key list
        arr = _int_list(keys, arr)
    if arr.ndim != 1:
        raise KeysError(f"keys must be a 1-d array, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.uint64)
    if arr.dtype != np.uint64:
        if arr.dtype.kind not in "iu":
            raise KeysError(f"keys must be integers, got dtype {arr.dtype}")
        if arr.dtype.kind == "i" and arr.min() < 0:
            raise KeysError("keys must be non-negative (uint64)")
        arr = arr.astype(np.uint64)
    check_sorted_unique(arr)
    return arr


def _int_list(keys, fallback: np.ndarray) -> np.ndarray:
    if not all(isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)) for k in keys):
        return fallback
    if any(not 0 <= int(k) < KEY_SPACE_END for k in keys):
        raise KeysError("keys must be integers in [0, 2**64)")
    return np.array([int(k) for k in keys], dtype=np.uint64)


def is_sorted_unique(keys: np.ndarray) -> bool:
    """Strictly ascending. A few keys are compared in Python (three times faster than
    numpy's calls at ten keys); more in one compiled pass (count_nonzero, not .all(),
    which goes through numpy's Python layer)."""
    if keys.size < 32:
        last = -1
        for k in keys.tolist():
            if k <= last:
                return False
            last = k
        return True
    return not np.count_nonzero(keys[1:] <= keys[:-1])


def check_sorted_unique(keys: np.ndarray) -> None:
    if not is_sorted_unique(keys):
        bad = np.flatnonzero(keys[1:] <= keys[:-1])
        if bad.size:
            i = int(bad[0])
            kind = "duplicate" if keys[i] == keys[i + 1] else "unsorted"
            raise KeysError(f"keys must be sorted and unique: {kind} key at position {i + 1} "
                            f"({int(keys[i])} then {int(keys[i + 1])}); sort with np.unique first")


def split_sorted(keys: np.ndarray, ranges: Sequence[Range]) -> list[tuple[int, int]]:
    """For sorted ``keys`` and sorted, disjoint ``ranges``, the slice [i0, i1) of keys
    that falls into each range (empty slices included, one entry per range)."""
    bounds = np.empty(2 * len(ranges), dtype=np.uint64)
    ends_at_top = np.zeros(2 * len(ranges), dtype=bool)
    for j, r in enumerate(ranges):
        if r.begin >= KEY_SPACE_END:  # the empty range [2**64, 2**64) holds nothing
            ends_at_top[2 * j] = True
            bounds[2 * j] = 0
        else:
            bounds[2 * j] = r.begin
        if r.end >= KEY_SPACE_END:
            ends_at_top[2 * j + 1] = True
            bounds[2 * j + 1] = 0
        else:
            bounds[2 * j + 1] = r.end
    pos = np.searchsorted(keys, bounds, side="left")
    pos[ends_at_top] = keys.size
    return [(int(pos[2 * j]), int(pos[2 * j + 1])) for j in range(len(ranges))]


def bounds(keys: np.ndarray, begin: int, end: int) -> tuple[int, int]:
    """The slice [i0, i1) of sorted ``keys`` inside [begin, end) (``end`` may be 2**64)."""
    i0 = int(np.searchsorted(keys, np.uint64(begin)))
    i1 = keys.size if end >= KEY_SPACE_END else int(np.searchsorted(keys, np.uint64(end)))
    return i0, i1



def intersect(a: Sequence[Range], b: Sequence[Range]) -> tuple[Range, ...]:
    """The keys in both ``a`` and ``b``, as ranges (one per overlapping pair)."""
    return tuple(Range(max(x.begin, y.begin), min(x.end, y.end)) for x in a for y in b
                 if x.begin < y.end and y.begin < x.end)

def outside(ranges: Sequence[Range]) -> tuple[Range, ...]:
    """The key space less ``ranges``, sorted."""
    out, at = [], 0
    for r in sorted(ranges, key=lambda r: r.begin):
        if r.begin > at:
            out.append(Range(at, r.begin))
        at = max(at, r.end)
    if at < KEY_SPACE_END:
        out.append(Range(at, KEY_SPACE_END))
    return tuple(out)


def in_ranges(keys: np.ndarray, ranges: Sequence[Range]) -> np.ndarray:
    """Which of the sorted ``keys`` lie in one of ``ranges`` (bool, one per key)."""
    inside = np.zeros(keys.size, np.bool_)
    for r in ranges:
        i0, i1 = bounds(keys, r.begin, r.end)
        inside[i0:i1] = True
    return inside

def split_span(lo: int, n: int, ranges: Sequence[Range]) -> list[tuple[int, int]]:
    """For the dense key span [lo, lo+n), the (offset, count) inside each range."""
    hi = lo + n
    out = []
    for r in ranges:
        a, b = max(lo, r.begin), min(hi, r.end)
        out.append((a - lo, b - a) if a < b else (0, 0))
    return out

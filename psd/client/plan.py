"""Cutting a request by key range and putting replies back in key order (no I/O)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, as_keys, split_sorted, split_span
from psd.codec import Message
from psd.errors import KeysError, MessageTooLargeError, ValuesError
from psd.store.table import TableSpec


@dataclass
class Part:
    """The piece of a request bound for one server: rows [i0, i1) of the request."""

    server: str
    i0: int
    i1: int
    msg: Message


def check_keys(keys, max_keys: int) -> np.ndarray:
    keys = as_keys(keys)
    if keys.size > max_keys:
        raise MessageTooLargeError(f"{keys.size} keys in one request, limit is {max_keys}; split the request")
    return keys


def check_values(spec: TableSpec, values, n: int) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != spec.np_dtype:
        raise ValuesError(f"table {spec.name!r} holds {spec.dtype}, values are {values.dtype.name}; "
                          f"convert with values.astype(np.{spec.dtype})")
    if values.ndim == 1 and spec.width == 1:
        values = values.reshape(-1, 1)
    if values.shape != (n, spec.width):
        raise ValuesError(f"table {spec.name!r}: values must have shape ({n}, {spec.width}), got {values.shape}")
    return values


def check_span(lo: int, count: int) -> None:
    if not (isinstance(lo, (int, np.integer)) and isinstance(count, (int, np.integer))):
        raise KeysError("a span needs integer lo and count")
    lo, count = int(lo), int(count)  # np.uint64 sums wrap around instead of passing 2**64
    if lo < 0 or count < 0 or lo + count > KEY_SPACE_END:
        raise KeysError(f"span [{lo}, {lo + count}) is outside the key space [0, 2**64)")


def plan(op: str, spec: TableSpec, ring: Assignment, *, keys: np.ndarray | None = None,
         values: np.ndarray | None = None, span: tuple[int, int] | None = None,
         clock: int = 0, meta: dict | None = None) -> list[Part]:
    """One message per server whose range the request touches (empty pieces skipped)."""
    parts = []
    if span is not None:
        lo, count = span
        cuts = split_span(lo, count, ring.ranges)
    else:
        cuts = [(i0, i1 - i0) for i0, i1 in split_sorted(keys, ring.ranges)]
    for j, (off, count) in enumerate(cuts):
        if count == 0:
            continue
        arrays = []
        m = dict(meta or {})
        if span is not None:
            m["span"] = [span[0] + off, count]
        else:
            arrays.append(keys[off:off + count])
        if values is not None:
            arrays.append(values[off:off + count])
        msg = Message(op, table=spec.name, ring=ring.version, clock=clock, meta=m, arrays=arrays)
        parts.append(Part(ring.primary_of(j), off, off + count, msg))
    return parts


def assemble(parts: list[Part], replies: list[Message], n: int, spec: TableSpec) -> np.ndarray:
    """Values of every part's reply, placed at its rows."""
    if len(parts) == 1 and parts[0].i0 == 0 and parts[0].i1 == n:
        return _reply_values(replies[0], parts[0], spec)
    out = np.empty((n, spec.width), dtype=spec.np_dtype)
    for part, reply in zip(parts, replies):
        out[part.i0:part.i1] = _reply_values(reply, part, spec)
    return out


def _reply_values(reply: Message, part: Part, spec: TableSpec) -> np.ndarray:
    expect = (part.i1 - part.i0, spec.width)
    if len(reply.arrays) != 1 or reply.arrays[0].shape != expect or reply.arrays[0].dtype != spec.np_dtype:
        raise ValuesError(f"{part.server} answered {reply.op} with an unexpected payload "
                          f"(wanted {spec.dtype}{list(expect)})", node=part.server)
    return reply.arrays[0]

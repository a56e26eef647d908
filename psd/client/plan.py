"""Cutting a request by key range and putting replies back in key order (no I/O)."""
from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, as_keys
from psd.cluster.routing import Slices
from psd.cluster.rows import Rows
from psd.codec import Message
from psd.errors import KeysError, MessageTooLargeError, PsdError, ValuesError
from psd.store.table import TableSpec


#: request ids of this process, from a random start: servers remember ids per sender
#: name, and a name can come back (a scheduler that crashed before saving a registration
#: hands it out again); ids counted from 1 again would be taken for resends, and the
#: pushes acknowledged without being applied
_rids = itertools.count(secrets.randbits(62) + 1)


def next_rid() -> int:
    """A fresh request id (exactly-once is per sender and rid)."""
    return next(_rids)


@dataclass
class Part:
    """The piece of a request bound for one server: the request's rows in ``slices``."""

    server: str
    slices: Slices
    msg: Message
    rows: Rows


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


def plan(op: str, spec: TableSpec, ring: Assignment, rows: Rows, *, clock: int = 0,
         rid=None) -> list[Part]:
    """One message per owner group the request touches (the group's primary gets it).
    ``rid`` names the request for exactly-once: resends and re-plans keep it."""
    if rows.count and not ring.ranges:
        raise PsdError(f"the cluster has no live servers at ring v{ring.version}; start a server "
                       f"(psd server) and retry")
    parts = []
    for owners, slices in rows.groups(ring):
        sub = rows.take(slices)
        msg = sub.to_message(op, table=spec.name, ring=ring.version, clock=clock,
                             meta={"rid": rid if rid is not None else next(_rids)})
        parts.append(Part(owners[0], slices, msg, sub))
    return parts


def replan(part: Part, spec: TableSpec, ring: Assignment, clock: int) -> list[Part]:
    """Re-cut a part by a newer ring; rows keep their place in the original request."""
    subs = plan(part.msg.op, spec, ring, part.rows, clock=clock, rid=part.msg.meta["rid"])
    for sub in subs:
        sub.slices = compose(part.slices, sub.slices)
    return subs


def compose(outer: Slices, inner: Slices) -> Slices:
    """Map row slices of a sub-request (``inner``) back to rows of the whole request."""
    starts = np.cumsum([0] + [b - a for a, b in outer])
    out = []
    for i0, i1 in inner:
        while i0 < i1:
            k = int(np.searchsorted(starts, i0, side="right")) - 1
            a, b = outer[k]
            take = min(i1 - i0, (b - a) - (i0 - starts[k]))
            out.append((a + i0 - starts[k], a + i0 - starts[k] + take))
            i0 += take
    return out


def assemble(parts: list[Part], replies: list[Message], n: int, spec: TableSpec) -> np.ndarray:
    """Values of every part's reply, placed at its rows."""
    if len(parts) == 1 and parts[0].slices == [(0, n)]:
        return _reply_values(replies[0], parts[0], spec)
    out = np.empty((n, spec.width), dtype=spec.np_dtype)
    for part, reply in zip(parts, replies):
        values = _reply_values(reply, part, spec)
        row = 0
        for a, b in part.slices:
            out[a:b] = values[row:row + b - a]
            row += b - a
    return out


def _reply_values(reply: Message, part: Part, spec: TableSpec) -> np.ndarray:
    expect = (part.rows.count, spec.width)
    if len(reply.arrays) != 1 or reply.arrays[0].shape != expect or reply.arrays[0].dtype != spec.np_dtype:
        raise ValuesError(f"{part.server} answered {reply.op} with an unexpected payload "
                          f"(wanted {spec.dtype}{list(expect)})", node=part.server)
    return reply.arrays[0]

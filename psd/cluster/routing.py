"""Cutting sorted keys or dense spans by the ring into groups with the same owners.

Client and server use the same cut: the client merges the owner groups into one message
per primary server (``by_primary``), and the server checks the primary of every group
and forwards one message per replica server, the rows of every group it replicates.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import split_sorted, split_span

Owners = tuple[str, ...]
Slices = list[tuple[int, int]]  # row slices [i0, i1), ascending
#: requests of at most this many keys are cut key by key (bisect) rather than by one
#: vectorised search: cheaper below it, as numpy's fixed cost per call dominates
SMALL_CUT = 16


def group_keys(ring: Assignment, keys: np.ndarray) -> list[tuple[Owners, Slices]]:
    """Row slices of sorted ``keys`` grouped by owner tuple, groups in key order of first row.

    Every request is cut on both client and server, so this is on the hot path: the
    ring's range starts are searched in the keys in one vectorised call, and only the
    ranges that hold keys are visited in Python (a small request touches one)."""
    inner = ring.inner_begins
    if inner is None:  # not a cover of the key space in order: the general cut
        return _group(ring, split_sorted(keys, ring.ranges))
    n = keys.size
    if n == 0 or not ring.ranges:
        return []
    begins = ring.inner_begin_list
    few = keys.tolist() if n <= SMALL_CUT else None  # (one call, cheaper than two numpy scalars)
    first = bisect_right(begins, few[0] if few else int(keys[0]))
    if first == bisect_right(begins, few[-1] if few else int(keys[-1])):  # all in one range
        return [(ring.owners[first], [(0, n)])]
    owners = ring.owners
    groups: dict[Owners, Slices] = {}
    if few:  # a few keys: a search per key beats numpy's per-call cost
        j, start = first, 0
        for i, key in enumerate(few):
            at = bisect_right(begins, key)
            if at != j:
                groups.setdefault(owners[j], []).append((start, i))
                j, start = at, i
        groups.setdefault(owners[j], []).append((start, n))
        return list(groups.items())
    edges = np.empty(len(ring.ranges) + 1, dtype=np.int64)
    edges[0], edges[-1] = 0, n
    edges[1:-1] = np.searchsorted(keys, inner)
    for j in np.flatnonzero(edges[1:] > edges[:-1]).tolist():
        groups.setdefault(owners[j], []).append((int(edges[j]), int(edges[j + 1])))
    return list(groups.items())


def group_spans(ring: Assignment, spans: Sequence[tuple[int, int]]) -> list[tuple[Owners, Slices]]:
    """Row slices of the dense spans [(lo, count), ...] (rows numbered across spans)."""
    groups: dict[Owners, Slices] = {}
    row = 0
    for lo, count in spans:
        for j, (off, n) in enumerate(split_span(lo, count, ring.ranges)):
            if n:
                groups.setdefault(ring.owners[j], []).append((row + off, row + off + n))
        row += count
    return [(o, sorted(s)) for o, s in groups.items()]


def _group(ring: Assignment, cuts: Slices) -> list[tuple[Owners, Slices]]:
    groups: dict[Owners, Slices] = {}
    for j, (i0, i1) in enumerate(cuts):
        if i1 > i0:
            groups.setdefault(ring.owners[j], []).append((i0, i1))
    return list(groups.items())


def by_primary(groups: list[tuple[Owners, Slices]]) -> list[tuple[str, Slices]]:
    """Owner groups merged by their primary: one (server, ascending row slices) per
    server that leads some of the rows, in order of the first row each leads. A request
    touching ranges with different replicas but one primary goes as one message."""
    if len(groups) == 1:  # (most requests: one owner tuple, its slices ascending already)
        owners, slices = groups[0]
        return [(owners[0], list(slices))]
    merged: dict[str, Slices] = {}
    for owners, slices in groups:
        have = merged.get(owners[0])
        if have is None:
            merged[owners[0]] = list(slices)
        else:
            have.extend(slices)
    for slices in merged.values():
        slices.sort()  # (kept apart even when adjacent: a slice of spans stays in one span)
    return sorted(merged.items(), key=lambda g: g[1][0][0])

"""Cutting sorted keys or dense spans by the ring into groups with the same owners.

Client and server use the same cut: the client sends one message per owner group,
and the server checks (and forwards to replicas) by the same groups.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import split_sorted, split_span

Owners = tuple[str, ...]
Slices = list[tuple[int, int]]  # row slices [i0, i1), ascending


def group_keys(ring: Assignment, keys: np.ndarray) -> list[tuple[Owners, Slices]]:
    """Row slices of sorted ``keys`` grouped by owner tuple, groups in key order of first row."""
    return _group(ring, [(i0, i1) for i0, i1 in split_sorted(keys, ring.ranges)])


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

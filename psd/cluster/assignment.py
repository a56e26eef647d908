"""Which server owns which key range, at which version.

The scheduler builds it by consistent hashing (psd.cluster.ring).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from psd.cluster.ranges import KEY_SPACE_END, Range


@dataclass(frozen=True)
class Assignment:
    """A versioned list of (range, owners) covering the key space; owners[0] leads."""

    version: int
    ranges: tuple[Range, ...] = ()
    owners: tuple[tuple[str, ...], ...] = ()
    addresses: dict = field(default_factory=dict)  # node id -> tcp address

    @cached_property
    def inner_begins(self) -> np.ndarray | None:
        """Starts of every range but the first, as uint64, when the ranges cover the key
        space in order (they always do once built by the ring); else None."""
        r = self.ranges
        if not r or r[0].begin != 0 or r[-1].end != KEY_SPACE_END or any(
                a.end != b.begin for a, b in zip(r, r[1:])):
            return None
        return np.array([x.begin for x in r[1:]], dtype=np.uint64)

    @cached_property
    def inner_begin_list(self) -> list[int] | None:
        """``inner_begins`` as Python ints: a bisect for one key beats numpy's search."""
        inner = self.inner_begins
        return None if inner is None else inner.tolist()

    def ranges_of(self, node: str) -> list[Range]:
        return [r for r, o in zip(self.ranges, self.owners) if node in o]

    def primary_of(self, i: int) -> str:
        return self.owners[i][0]

    def owners_of(self, i: int) -> tuple[str, ...]:
        """Owners of range ``i``: the primary first, then its replicas in chain order."""
        return self.owners[i]

    def led_by(self, node: str) -> list[Range]:
        """The ranges ``node`` is primary for."""
        return [r for r, o in zip(self.ranges, self.owners) if o and o[0] == node]

    def owners_at(self, key: int) -> tuple[str, ...]:
        """Owners of the range holding ``key`` (empty if no range holds it)."""
        i = self.find(key)
        if i < len(self.ranges) and key in self.ranges[i]:
            return self.owners[i]
        return ()

    @cached_property
    def servers(self) -> tuple[str, ...]:
        """Every node that owns some range, sorted (computed once: asked on every request)."""
        return tuple(sorted({n for o in self.owners for n in o}))

    def find(self, key: int) -> int:
        """Index of the range holding ``key``."""
        lo, hi = 0, len(self.ranges)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.ranges[mid].end <= key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def to_wire(self) -> dict:
        # range ends may be 2**64, which msgpack cannot carry: send begins only
        return {"version": self.version, "begins": [r.begin for r in self.ranges],
                "owners": [list(o) for o in self.owners], "addresses": dict(self.addresses)}

    @classmethod
    def from_wire(cls, d: dict) -> "Assignment":
        begins = list(d["begins"])
        ends = begins[1:] + [KEY_SPACE_END]
        return cls(version=int(d["version"]),
                   ranges=tuple(Range(b, e) for b, e in zip(begins, ends)),
                   owners=tuple(tuple(o) for o in d["owners"]),
                   addresses=dict(d.get("addresses", {})))


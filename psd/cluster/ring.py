"""Consistent hashing with virtual nodes, replica chains and the data moves between rings.

Everything here is deterministic: no I/O, no clock, no randomness. The scheduler and every
server compute the same ring from the same server set, whatever order it arrives in.

Ring and range convention
-------------------------
Each server ``s`` puts ``vnodes`` points on the ring [0, 2**64): point ``i`` is the
big-endian 8-byte BLAKE2b digest of ``f"{s}#{i}"`` (stable across processes and Python
runs, unlike ``hash()``). Points are sorted by (value, server id), so a hash collision
between two servers is broken by id, not by input order.

A key ``k`` belongs to the first point ``p >= k`` clockwise (its *successor*), wrapping
past 2**64 - 1 to the lowest point. So the point ``p`` whose predecessor is ``q`` leads
the keys ``q < k <= p``, which as a half-open :class:`Range` is ``[q + 1, p + 1)``. The
lowest point ``p0`` also leads the wrap-around keys above the highest point ``pN``; that
arc is split into ``[0, p0 + 1)`` and ``[pN + 1, 2**64)`` so the ranges of an
:class:`Assignment` stay sorted and cover [0, 2**64) with no gap (an empty piece, when a
point sits at 2**64 - 1, is dropped).

The primary of an arc is the server of its point. Its replicas (in chain order) depend
on the *placement*:

- ``spread`` (the default): the next ``replication - 1`` *distinct* servers met clockwise
  from the point. A server's ranges are replicated on many different servers, so when it
  dies its load and the copies that restore replication spread over the survivors.
- ``chained``: the next ``replication - 1`` servers after the primary in the cyclic order
  of the sorted member ids (the paper's placement, Li et al. 2014, section 4.3: a server
  holds the ranges of its neighbours). Every range a server leads has the same replicas,
  so a primary forwards a push to ``replication - 1`` servers whatever ranges it touches.

With fewer servers than ``replication`` every server holds everything. Adjacent ranges
with the same owner tuple are merged.

Consequences the tests check, for ``spread``: removing a server changes only the owner
tuples of the ranges it owned, and there it is dropped from the tuple and the next
distinct server is appended (so where it led, its first replica is promoted); adding a
server only inserts it into owner tuples (no key moves between two servers that were both
present before). For ``chained`` (tests/test_ring_chained.py): removing or adding a
server changes the owner tuples only of the arcs it leads (there the hash gives them new
primaries) and of the arcs led by its ``replication - 1`` predecessors in the member
order (their chain now skips it, or takes it in); the joint ring of a death promotes the
dead server's successor, which held every range it led.
"""
from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.config import PLACEMENTS

Owners = tuple[str, ...]


def point(server: str, i: int) -> int:
    """The ring position of virtual node ``i`` of ``server``: a stable 64-bit hash."""
    digest = hashlib.blake2b(f"{server}#{i}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ring_points(servers: Iterable[str], vnodes: int) -> list[tuple[int, str]]:
    """Every (position, server) on the ring, sorted by position then server id."""
    if vnodes < 1:
        raise ValueError(f"vnodes must be >= 1, got {vnodes}")
    return sorted((point(s, i), s) for s in set(servers) for i in range(vnodes))


def consistent_hash(servers: Iterable[str], version: int, *, vnodes: int = 16,
                    replication: int = 1, addresses: dict | None = None,
                    placement: str = "spread") -> Assignment:
    """The ring of ``servers`` as an :class:`Assignment` (see the module docstring)."""
    if replication < 1:
        raise ValueError(f"replication must be >= 1, got {replication}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    members = sorted(set(servers))
    addresses = dict(addresses or {})
    if not members:
        return Assignment(version=version, addresses=addresses)
    pts = ring_points(members, vnodes)
    chain_len = min(replication, len(members))
    n = len(pts)

    # chained: a point's server, then the servers after it in the sorted member order
    after = {s: tuple(members[(i + k) % len(members)] for k in range(chain_len))
             for i, s in enumerate(members)} if placement == "chained" else {}

    def chain(j: int) -> Owners:  # spread: distinct servers clockwise from point j
        if after:
            return after[pts[j][1]]
        seen: list[str] = []
        for step in range(n):
            s = pts[(j + step) % n][1]
            if s not in seen:
                seen.append(s)
                if len(seen) == chain_len:
                    break
        return tuple(seen)

    # arcs in key order: [0, p0+1) -> point 0, [p_{j-1}+1, p_j+1) -> point j,
    # [pN+1, 2**64) -> point 0 again (the wrap-around)
    pieces: list[tuple[int, int, Owners]] = []
    lead = chain(0)
    pieces.append((0, pts[0][0] + 1, lead))
    for j in range(1, n):
        pieces.append((pts[j - 1][0] + 1, pts[j][0] + 1, chain(j)))
    pieces.append((pts[-1][0] + 1, KEY_SPACE_END, lead))

    ranges: list[Range] = []
    owners: list[Owners] = []
    for begin, end, own in pieces:
        if begin >= end:  # two points at one position, or a point at 2**64 - 1
            continue
        if owners and owners[-1] == own and ranges[-1].end == begin:
            ranges[-1] = Range(ranges[-1].begin, end)
        else:
            ranges.append(Range(begin, end))
            owners.append(own)
    return Assignment(version=version, ranges=tuple(ranges), owners=tuple(owners),
                      addresses=addresses)


# -- comparing two assignments ------------------------------------------------------
def overlay(old: Assignment, new: Assignment) -> list[tuple[Range, Owners, Owners]]:
    """The common refinement of two assignments: (piece, old owners, new owners) for
    every maximal piece on which neither changes, in key order. A key that one side's
    ranges do not cover counts as owned by nobody there (``()``)."""
    cuts = {0, KEY_SPACE_END}
    for a in (old, new):
        for r in a.ranges:
            cuts.add(r.begin)
            cuts.add(r.end)
    bounds = sorted(cuts)
    out = []
    i = j = 0
    for begin, end in zip(bounds, bounds[1:]):
        i = _advance(old, i, begin)
        j = _advance(new, j, begin)
        out.append((Range(begin, end), _owners_at(old, i, begin), _owners_at(new, j, begin)))
    return out


def leads_anew(old: Assignment, new: Assignment, node: str) -> bool:
    """Whether ``node`` leads in ``new`` some key it did not lead in ``old``: the question
    ``overlay`` answers as ``any(n and n[0] == node and (not o or o[0] != node) for _, o, n
    in overlay(old, new))``, without building its pieces (a server asks at every ring
    notice, several times per ring change)."""
    if old is new:
        return False
    starts = [r.begin for r in old.ranges]
    ranges, owners = old.ranges, old.owners
    for r, own in zip(new.ranges, new.owners):
        if not own or own[0] != node:
            continue
        key, i = r.begin, bisect_right(starts, r.begin) - 1
        while key < r.end:  # (the old ranges that cover r, in order, all led by node)
            if i < 0 or i >= len(ranges) or not ranges[i].begin <= key < ranges[i].end or not owners[i] \
                    or owners[i][0] != node:
                return True
            key, i = ranges[i].end, i + 1
    return False


def _advance(a: Assignment, i: int, key: int) -> int:
    while i < len(a.ranges) and a.ranges[i].end <= key:
        i += 1
    return i


def _owners_at(a: Assignment, i: int, key: int) -> Owners:
    if i < len(a.ranges) and key in a.ranges[i]:
        return tuple(a.owners[i])
    return ()


# -- data movement ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Transfer:
    """Copy the keys of ``range`` from ``src`` (a live old owner) to ``dst`` (a new owner)."""

    range: Range
    src: str
    dst: str


def _source(old_owners: Owners, live: set[str]) -> str | None:
    """The old primary if live, else the first live old replica, else None."""
    for s in old_owners:
        if s in live:
            return s
    return None


def plan_transfers(old: Assignment, new: Assignment, live: set[str]) -> list[Transfer]:
    """What must be copied so every owner in ``new`` holds its ranges.

    For each piece of the common refinement, every server that owns it in ``new`` but did
    not in ``old`` receives it from a live old owner (the old primary if live, else the
    first live old replica). Pieces with no live old owner are skipped here and reported
    by :func:`lost_ranges`. Adjacent pieces with the same (src, dst) are merged. The result
    is sorted by (range, src, dst).
    """
    return _transfers(overlay(old, new), set(live))


def _transfers(pieces: list[tuple[Range, Owners, Owners]], live: set[str]) -> list[Transfer]:
    """``plan_transfers`` over the pieces of ``overlay(old, new)``."""
    merged: dict[tuple[str, str], list[Range]] = {}
    for piece, was, now in pieces:
        src = _source(was, live)
        if src is None:
            continue
        for dst in now:
            if dst in was:
                continue
            runs = merged.setdefault((src, dst), [])
            if runs and runs[-1].end == piece.begin:
                runs[-1] = Range(runs[-1].begin, piece.end)
            else:
                runs.append(piece)
    out = [Transfer(r, src, dst) for (src, dst), runs in merged.items() for r in runs]
    out.sort(key=lambda t: (t.range, t.src, t.dst))
    return out


def lost_ranges(old: Assignment, new: Assignment, live: set[str]) -> list[Range]:
    """Key ranges whose data no live server holds: owned by someone in ``old`` but by no
    member of ``live``. They cannot be recovered (the caller logs them); their new owners
    start them empty. Keys nobody owned in ``old`` (e.g. the very first ring) held no data
    and are not lost. Adjacent pieces are merged."""
    return _lost(overlay(old, new), set(live))


def _lost(pieces: list[tuple[Range, Owners, Owners]], live: set[str]) -> list[Range]:
    """``lost_ranges`` over the pieces of ``overlay(old, new)``."""
    out: list[Range] = []
    for piece, was, _now in pieces:
        if was and _source(was, live) is None:
            if out and out[-1].end == piece.begin:
                out[-1] = Range(out[-1].begin, piece.end)
            else:
                out.append(piece)
    return out


# -- membership changes -------------------------------------------------------------
class RingChange(NamedTuple):
    """The next ring, the copies that must happen before it takes effect, and the key
    ranges whose data is gone (no live old owner)."""

    ring: Assignment
    transfers: list[Transfer]
    lost: list[Range]


def rebalance(current: Assignment, servers: Iterable[str], live: Iterable[str], *,
              vnodes: int, replication: int, version: int | None = None,
              addresses: dict | None = None, placement: str = "spread") -> RingChange:
    """The ring over ``servers`` (version ``current.version + 1`` unless given) and the
    moves from ``current`` to it, sourcing data only from ``live`` servers. Addresses are
    ``current``'s (overridden by ``addresses``), kept for the new members only."""
    members = sorted(set(servers))
    addr = {**current.addresses, **(addresses or {})}
    addr = {n: addr[n] for n in members if n in addr}  # (in member order, whatever order they came in)
    ring = consistent_hash(members, current.version + 1 if version is None else version,
                           vnodes=vnodes, replication=replication, addresses=addr,
                           placement=placement)
    live_set = set(live)
    pieces = overlay(current, ring)  # (one refinement for both)
    return RingChange(ring, _transfers(pieces, live_set), _lost(pieces, live_set))


def on_server_death(current: Assignment, dead: str, live: Iterable[str], *, vnodes: int,
                    replication: int, version: int | None = None,
                    placement: str = "spread") -> RingChange:
    """``dead`` is gone: drop it, promote replicas, re-replicate from survivors.
    ``live`` is every live server (``dead`` is ignored if listed)."""
    survivors = set(live) - {dead}
    return rebalance(current, survivors, survivors, vnodes=vnodes,
                     replication=replication, version=version, placement=placement)


def on_server_join(current: Assignment, joining: str, live: Iterable[str], *, vnodes: int,
                   replication: int, version: int | None = None,
                   address: str | None = None, placement: str = "spread") -> RingChange:
    """``joining`` enters the ring: it copies its new ranges from their old owners.
    ``live`` is the live servers already there (``joining`` may be listed too)."""
    members = set(live) | {joining}
    return rebalance(current, members, members, vnodes=vnodes, replication=replication,
                     version=version, placement=placement,
                     addresses=None if address is None else {joining: address})


def on_server_leave(current: Assignment, leaving: str, live: Iterable[str], *, vnodes: int,
                    replication: int, version: int | None = None,
                    placement: str = "spread") -> RingChange:
    """``leaving`` drains gracefully: it is out of the new ring but still alive, so it can
    be the source of its own ranges (it is their old primary where it led)."""
    staying = set(live) - {leaving}
    return rebalance(current, staying, staying | {leaving}, vnodes=vnodes,
                     replication=replication, version=version, placement=placement)


def joint(old: Assignment, new: Assignment, live: Iterable[str], version: int) -> Assignment:
    """The transition ring used while data moves from ``old`` to ``new``: every piece is
    held by its live old owners (the first of them leads, so a dead primary's first
    live replica is promoted) followed by its new owners that did not hold it. Writes
    therefore reach the servers still copying a range, and reads stay on servers that
    have it whole."""
    live_set = set(live)
    ranges: list[Range] = []
    owners: list[Owners] = []
    for piece, was, will in overlay(old, new):
        have = tuple(s for s in was if s in live_set)
        own = have + tuple(s for s in will if s not in have)
        if ranges and owners[-1] == own and ranges[-1].end == piece.begin:
            ranges[-1] = Range(ranges[-1].begin, piece.end)
        else:
            ranges.append(piece)
            owners.append(own)
    addresses = {n: a for n, a in {**old.addresses, **new.addresses}.items()
                 if any(n in o for o in owners)}
    return Assignment(version=version, ranges=tuple(ranges), owners=tuple(owners), addresses=addresses)

"""What a server has applied, so that nothing is applied twice.

``Seen`` holds request ids per sender: a worker resends a request under the same id
after a timeout or a failover, and the server (or the replica promoted in its place,
which saw the forward) answers it without applying it again. Memory is bounded per
sender: ids older than the window are forgotten, which is safe because a worker resends
only its recent requests. ``PartlyApplied`` holds requests applied here only in part
(re-cut pieces, range copies), where the id alone does not say which rows.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Collection, Iterable, Iterator

import numpy as np

from psd.cluster.ranges import Range, bounds, in_ranges, intersect, outside as outside_of
from psd.cluster.rows import Rows

WINDOW = 1 << 16
#: the prefix of a push identity that does not name its sender (``meta.once``: a job's
#: shard and step): a shard run again by another worker sends the same identities
ONCE = "once:"
#: keys remembered for such identities, all together (a re-run shard's pushes are
#: recognised row by row while their keys are kept; beyond this the oldest go)
ONCE_KEYS_KEPT = 1 << 24


def ids_by_sender(senders: list[str], counts: np.ndarray, rids: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(sender, its rids) of the frame form :meth:`Seen.to_arrays` writes."""
    if len(senders) != counts.size or int(counts.sum()) != rids.size:
        raise ValueError("seen memory: sender, count and id arrays disagree")
    start = 0
    for sender, n in zip(senders, counts.tolist()):
        yield sender, rids[start:start + n]
        start += n


def ids_of_arrays(senders: list[str], counts: np.ndarray, rids: np.ndarray) -> Iterator[tuple[str, int]]:
    """The (sender, rid) pairs of the frame form :meth:`Seen.to_arrays` writes."""
    for sender, sent in ids_by_sender(senders, counts, rids):
        for rid in sent.tolist():
            yield sender, rid


def _array(rids: Collection[int]) -> np.ndarray:
    return rids if isinstance(rids, np.ndarray) else np.fromiter(rids, dtype=np.uint64, count=len(rids))


def arrays_of_ids(by_sender: dict[str, Collection[int]], without: Collection[tuple[str, int]] = ()
                  ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The frame form (senders, how many ids each, all ids) of rids per sender, less
    those ``without`` names (a few)."""
    skip: dict[str, list[int]] = {}
    for sender, rid in without:
        skip.setdefault(sender, []).append(rid)
    senders, parts = [], []
    for sender, rids in by_sender.items():
        sent = _array(rids)
        if sender in skip:
            sent = sent[~np.isin(sent, np.array(skip[sender], dtype=np.uint64))]
        if sent.size:
            senders.append(sender)
            parts.append(sent)
    counts = np.array([a.size for a in parts], dtype=np.uint64)
    return senders, counts, np.concatenate(parts) if parts else np.empty(0, np.uint64)


def union_of_ids(sources: Iterable[dict[str, Collection[int]]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The frame form of the ids of all ``sources`` (rids per sender, oldest first),
    each id once, where it first came."""
    merged: dict[str, list[np.ndarray]] = {}
    for source in sources:
        for sender, rids in source.items():
            merged.setdefault(sender, []).append(_array(rids))
    return arrays_of_ids({sender: _first_of_each(parts) for sender, parts in merged.items()})


def _first_of_each(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    both = np.concatenate(parts)
    _, first = np.unique(both, return_index=True)
    return both[np.sort(first)]


class Seen:
    def __init__(self, window: int = WINDOW):
        self.window = window
        self._by_sender: dict[str, OrderedDict] = {}
        #: per sender, how many ids were added or resent: a sender that moves it is active
        self._activity: dict[str, int] = {}

    def __contains__(self, key: tuple[str, int]) -> bool:
        sender, rid = key
        ids = self._by_sender.get(sender)
        return ids is not None and rid in ids

    def add(self, sender: str, rid: int) -> None:
        ids = self._by_sender.setdefault(sender, OrderedDict())
        ids[rid] = None
        self.note_activity(sender)
        if len(ids) > self.window:
            ids.popitem(last=False)

    def by_sender(self) -> dict[str, Collection[int]]:
        """Every remembered id, per sender, oldest first (not to be changed)."""
        return self._by_sender

    def full(self, sender: str) -> bool:
        """Whether ``sender`` has a window of ids here: any id it sent before them is
        forgotten (not resent)."""
        return len(self._by_sender.get(sender, ())) >= self.window

    def take_all(self) -> dict[str, Collection[int]]:
        """Every remembered id, per sender, forgotten here (the senders' activity stays)."""
        ids, self._by_sender = self._by_sender, {}
        return ids

    def forget(self, sender: str) -> None:
        """Drop a sender's ids (it left, and has sent nothing here for long enough that
        it resends nothing)."""
        self._by_sender.pop(sender, None)
        self._activity.pop(sender, None)

    def note_activity(self, sender: str) -> None:
        """Count an id of ``sender`` arriving (pushed, resent, or with a range copy) as activity."""
        self._activity[sender] = self._activity.get(sender, 0) + 1

    def activity(self, sender: str) -> int:
        """Changes whenever an id of ``sender`` is added or resent."""
        return self._activity.get(sender, 0)

    def senders(self) -> set[str]:
        return set(self._by_sender)

    def touch(self, sender: str, rid: int) -> None:
        """Make a remembered id the sender's newest (it was just resent)."""
        ids = self._by_sender.get(sender)
        if ids is not None and rid in ids:
            ids.move_to_end(rid)
            self.note_activity(sender)

    def to_arrays(self, without: Collection[tuple[str, int]] = ()) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(senders, how many ids each, all ids): the memory as frames, not header, since
        it can be far larger than a header may be; less the ids ``without`` names."""
        return arrays_of_ids(self._by_sender, without)

    def merge_arrays(self, senders: list[str], counts: np.ndarray, rids: np.ndarray) -> None:
        for sender, rid in ids_of_arrays(senders, counts, rids):
            self.add(sender, rid)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_sender.values())


class PartlyApplied:
    """Rows of requests applied here that the request ids alone do not account for.

    * Pieces: a worker re-cuts an unanswered request when the ring changes; each piece
      gets a fresh id and names the original's (meta.orig). A piece can reach a server
      before the forward of the original does (they travel on different connections):
      the forward must then apply only the rows no piece covered. Kept as the keys of
      each piece, per original id.
    * Copies: a range copied in carries the ids its source had applied; those ids count
      as applied here only for rows inside that range (the source's id memory is
      global, so taking it whole would make a forward still on its way to us, with rows
      of another range, look like a resend). Kept as ranges, per id.
    * Forwards in part: a request holds rows of ranges with different replicas (one
      message per server, decision 97), so a replica gets only some of its rows; the id
      counts here only for the ranges the forward names (``meta.cover``). Kept as
      ranges, per id, as copies are; the same tuple of ranges (a push over the same
      ranges as the last one) is kept once, so an id costs about what it costs in Seen.
    """

    #: how many original requests with pieces are remembered (pieces exist only around
    #: ring changes)
    PIECES_KEPT = 4096
    #: distinct tuples of ranges kept once (``note_ranges``)
    SHAPES_KEPT = 4096
    def __init__(self, window: int = WINDOW, once_keys: int = ONCE_KEYS_KEPT) -> None:
        self._pieces: OrderedDict[tuple[str, int], list[np.ndarray]] = OrderedDict()
        #: rows applied under sender-free identities (``ONCE``): kept longer than pieces
        #: (a shard is re-run from its start), bounded by keys rather than by count
        self._once: OrderedDict[tuple[str, int], list[np.ndarray]] = OrderedDict()
        self._once_keys = 0
        self.once_keys = once_keys
        #: copied-in ids per sender, the newest ``window`` of each (as Seen keeps them:
        #: one bound for all senders let a copy carrying many senders' ids push out
        #: the recent ids of the first, whose resends would then apply twice)
        self.window = window
        self._copied: dict[str, OrderedDict[int, tuple[Range, ...]]] = {}
        self._shapes: dict[tuple[Range, ...], tuple[Range, ...]] = {}  # (one copy of each)
        #: ids a restore noted, each source's for one tuple of ranges, kept whole as
        #: arrays (per sender: rids oldest first, and sorted to look one up): a restore
        #: notes up to every id the files and the restorer's ``Seen`` hold, and copies
        #: and snapshots then take them in bulk too. Each source may hold a full window
        #: of a sender's recent ids, so none is trimmed to the window: a sender's are
        #: forgotten once ``Seen`` holds a window of its newer ids (``age``)
        self._bulk: list[tuple[tuple[Range, ...], dict[str, tuple[np.ndarray, np.ndarray]]]] = []

    @staticmethod
    def _row_keys(rows: Rows) -> np.ndarray:
        if rows.keys is not None:
            return rows.keys
        return np.concatenate([np.arange(lo, lo + n, dtype=np.uint64) for lo, n in rows.spans])

    def note_piece(self, rows: Rows, cut_from: list[tuple[str, int]]) -> None:
        if not cut_from or not rows.count:
            return
        keys = self._row_keys(rows)
        for ident in cut_from:
            if ident[0].startswith(ONCE):
                self._once.setdefault(ident, []).append(keys)
                self._once.move_to_end(ident)
                self._once_keys += keys.size
                continue
            self._pieces.setdefault(ident, []).append(keys)
            self._pieces.move_to_end(ident)
        while len(self._pieces) > self.PIECES_KEPT:
            self._pieces.popitem(last=False)
        while self._once_keys > self.once_keys and self._once:
            _, dropped = self._once.popitem(last=False)
            self._once_keys -= sum(k.size for k in dropped)

    def once_ids_in(self, r: Range) -> list[tuple[str, int]]:
        """Sender-free identities with rows applied here in ``r`` (a copy of ``r`` carries
        them, so the new holder of its rows recognises a re-run shard's pushes too)."""
        def inside(keys: np.ndarray) -> bool:
            i0, i1 = bounds(keys, r.begin, r.end)
            return i1 > i0
        return [ident for ident, pieces in self._once.items() if any(inside(k) for k in pieces)]

    def forget_once(self, prefixes: tuple[str, ...]) -> None:
        """Drop the identities of dropped tables (``ONCE`` + ``table/...``)."""
        for ident in [i for i in self._once if i[0].startswith(prefixes)]:
            self._once_keys -= sum(k.size for k in self._once.pop(ident))
        for sender in [s for s in self._copied if s.startswith(prefixes)]:
            del self._copied[sender]
        self._drop_bulk(lambda sender: sender.startswith(prefixes))

    def note_copy(self, r: Range, senders: list[str], counts: np.ndarray, rids: np.ndarray) -> None:
        for sender, rid in ids_of_arrays(senders, counts, rids):
            self.note_ranges(sender, rid, (r,))

    def note_ranges(self, sender: str, rid: int, ranges) -> None:
        """Request ``(sender, rid)`` was applied here for the rows in ``ranges`` only (a
        range copied in; a forward carrying part of the request)."""
        ids = self._copied.setdefault(sender, OrderedDict())
        ids[rid] = self._widened(ids.get(rid, ()), ranges)
        ids.move_to_end(rid)
        if len(ids) > self.window:
            ids.popitem(last=False)

    def _widened(self, have: tuple[Range, ...], ranges) -> tuple[Range, ...]:
        """The shape of an id counting for ``have`` and now for ``ranges`` too."""
        shape = have + tuple(r for r in ranges if r not in have)
        if len(self._shapes) >= self.SHAPES_KEPT:
            self._shapes.clear()  # (only sharing is lost)
        return self._shapes.setdefault(shape, shape)

    def applied_in(self, sender: str, rid: int) -> list[Range]:
        """The ranges for whose rows ``(sender, rid)`` counts as applied here (none: not
        applied in part)."""
        return list(self._copies_of((sender, rid)))

    def senders(self) -> set[str]:
        """Senders whose copied-in ids are kept."""
        return set(self._copied).union(*(by_sender for _shape, by_sender in self._bulk))

    def forget(self, sender: str) -> None:
        """Drop what is kept for a sender's ids (see ``Seen.forget``)."""
        self._copied.pop(sender, None)
        for ident in [i for i in self._pieces if i[0] == sender]:
            del self._pieces[ident]
        self._drop_bulk(lambda s: s == sender)

    def age(self, seen: Seen) -> None:
        """Forget the ids a restore noted of each sender that has sent a window of
        newer ones (``Seen.full``): it resends none of them."""
        self._drop_bulk(seen.full)

    def _drop_bulk(self, drop) -> None:
        """Forget the ids a restore noted of every sender ``drop`` names."""
        for _shape, by_sender in self._bulk:
            for sender in [s for s in by_sender if drop(s)]:
                del by_sender[sender]
        self._bulk = [(shape, by_sender) for shape, by_sender in self._bulk if by_sender]

    def bulk(self) -> list[tuple[tuple[Range, ...], dict[str, np.ndarray]]]:
        """The ids a restore noted: per tuple of ranges, rids per sender, oldest first."""
        return [(shape, {s: ordered for s, (ordered, _sorted) in by_sender.items()})
                for shape, by_sender in self._bulk]

    def bulk_into(self, r: Range) -> list[dict[str, np.ndarray]]:
        """Of ``bulk``, the ids that count for rows overlapping ``r``: passed on when we
        copy ``r`` out (``copied_into``)."""
        return [ids for shape, ids in self.bulk() if any(c.begin < r.end and r.begin < c.end for c in shape)]

    def by_ranges(self) -> dict[tuple[Range, ...], dict[str, list[int]]]:
        """Ids applied here for rows in some ranges only, per sender, grouped by those ranges."""
        out: dict[tuple[Range, ...], dict[str, list[int]]] = {}
        for sender, ids in self._copied.items():
            for rid, ranges in ids.items():
                out.setdefault(ranges, {}).setdefault(sender, []).append(rid)
        return out

    def replace(self, seen: Seen, replaced: list[Range],
                groups: list[tuple[tuple[Range, ...], Iterable[tuple[str, list[int]]]]]) -> None:
        """The rows in ``replaced`` were restored from a checkpoint: the ids that count
        for them are now those of ``groups`` (rids per sender, each group for its ranges'
        rows inside ``replaced``) and no others. The ids ``seen`` holds (applied here for
        every row) and those kept here for some ranges count from now on outside
        ``replaced`` only (a push applied here before the restore may be missing from
        it), and keys applied under sender-free identities inside it are dropped."""
        outside = outside_of(replaced)
        narrowed: dict[tuple[Range, ...], tuple[Range, ...]] = {}  # (most ids share a few shapes)
        for kept in self._copied.values():
            for rid, have in list(kept.items()):
                left = narrowed.get(have)
                if left is None:
                    cut = intersect(have, outside)
                    left = narrowed[have] = self._shapes.setdefault(cut, cut)
                if left:
                    kept[rid] = left
                else:
                    del kept[rid]
        for ident, pieces in list(self._once.items()):
            left = [k for k in (k[~in_ranges(k, replaced)] for k in pieces) if k.size]
            self._once_keys -= sum(k.size for k in pieces) - sum(k.size for k in left)
            if left:
                self._once[ident] = left
            else:
                del self._once[ident]
        self._bulk = [(left, by_sender) for left, by_sender in
                      ((intersect(shape, outside), by_sender) for shape, by_sender in self._bulk) if left]
        for shape, by_sender in groups:
            self._note_bulk(intersect(shape, tuple(replaced)), by_sender)
        ours = seen.take_all()
        self._note_bulk(outside, ours.items())

    def _note_bulk(self, ranges: tuple[Range, ...], by_sender: Iterable[tuple[str, Collection[int]]]) -> None:
        """Ids of one source of a restore, each counting for the rows in ``ranges``."""
        if not ranges:
            return
        shape = self._shapes.setdefault(ranges, ranges)
        same = next((ids for have, ids in self._bulk if have == shape), None)  # (one group per shape)
        if same is None:
            same = {}
            self._bulk.append((shape, same))
        for sender, rids in by_sender:
            sent = _array(rids)
            if sender in same:
                sent = _first_of_each([same[sender][0], sent])
            if sent.size:
                same[sender] = (sent, np.sort(sent))
        if not same:
            self._bulk.remove((shape, same))

    def copied_into(self, r: Range) -> list[tuple[str, int]]:
        """Ids applied here for rows in some ranges only (copied in with a range, or forwarded
        in part) that overlap ``r``: passed on when we copy ``r`` out."""
        overlaps: dict[int, bool] = {}  # (per tuple of ranges: most ids share a few of them)
        out = []
        for sender, ids in self._copied.items():
            for rid, ranges in ids.items():
                hit = overlaps.get(id(ranges))
                if hit is None:
                    hit = overlaps[id(ranges)] = any(c.begin < r.end and r.begin < c.end for c in ranges)
                if hit:
                    out.append((sender, rid))
        return out

    def _copies_of(self, ident: tuple[str, int]) -> tuple[Range, ...]:
        sender, rid = ident
        ids = self._copied.get(sender)
        out = ids.get(rid, ()) if ids is not None else ()
        for shape, by_sender in self._bulk:
            have = by_sender.get(sender)
            if have is not None:
                at = int(np.searchsorted(have[1], np.uint64(rid)))
                if at < have[1].size and int(have[1][at]) == rid:
                    out += tuple(c for c in shape if c not in out)
        return out

    def not_applied(self, rows: Rows, ids) -> Rows | None:
        """``rows`` minus those already applied here under one of ``ids`` by a piece or
        a copy (None if none is left)."""
        if not rows.count:
            return rows  # an empty push still counts for the consistency bookkeeping
        pieces = [k for ident in ids for k in self._pieces.get(ident, ()) or self._once.get(ident, ())]
        copied = [c for ident in ids for c in self._copies_of(ident)]
        if not pieces and not copied:
            return rows
        keys = self._row_keys(rows)
        keep = ~np.isin(keys, np.concatenate(pieces)) if pieces else np.ones(keys.size, dtype=bool)
        for c in copied:
            i0, i1 = bounds(keys, c.begin, c.end)
            keep[i0:i1] = False
        if keep.all():
            return rows
        if not keep.any():
            return None
        edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.astype(np.int8), [0]))))
        slices = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
        return Rows(keys=keys, values=rows.values).take(slices)

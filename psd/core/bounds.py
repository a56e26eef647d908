"""A server's part in bounded tables (table options admit_after, max_rows, ttl_*).

The store decides what to admit and what to evict (``psd.store.bounded``); this module
makes every copy of a range hold the same rows:

- **admission** is decided once, on the primary, when a push arrives: keys it refuses
  are neither applied nor forwarded, so replicas never see them (a replica keeps no
  sketch: it stores what its primary forwards).
- **eviction** is decided on the primary, among the rows of ranges it leads, right after
  a push (or at a tick, for a TTL in seconds). The evicted keys go to each replica of
  their range as an ``evict`` record, on the same ordered stream as the forwards, so a
  replica deletes them at the same point of the push sequence as its primary did (one
  whose gate keeps pushes, for a checkpoint cut, deletes them from those too); the
  push that caused them is acknowledged only once the replicas hold the record too.
- **repair**: a record can still miss a copy (its primary dies, or a replica at a newer
  ring refuses it), and a push resent across a failover can reach two copies at
  different points of their sequences. A server that leads keys anew aligns each
  replica's rows with its own (``align``: keys and row digests, on the stream of its
  forwards), and a replica's answer to a forward says whether it applied the push now
  or before; the primary evicts the keys found to differ (decision 153).

Pure, like the rest of ``psd.core``: time comes in as ``now``.
"""
from __future__ import annotations

import logging
from functools import partial

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import Range, bounds, in_ranges, outside
from psd.cluster.ring import leads_anew, overlay
from psd.cluster.rows import Rows
from psd.codec import Message
from psd.core.acks import Pending
from psd.errors import ProtocolError, StaleRingError
from psd.store.bounded import Clock
from psd.store.table import KEY_END, Table

log = logging.getLogger("psd.server")

#: ranges one forward or alignment may name (``meta.cover``, a pair each); a forward that
#: would need more goes as several (a ring of a thousand ranges that one replica shares)
MAX_COVER = 1024
#: keys one tick aligns at most, over all replicas and tables: a leadership change over
#: millions of rows is aligned a part a tick, not in one stall of the event loop (its
#: lease runs out in less than a second)
ALIGN_KEYS = 100_000


def _keys_of(rows: Rows) -> np.ndarray:
    if rows.keys is not None:
        return rows.keys
    return np.concatenate([np.uint64(lo) + np.arange(n, dtype=np.uint64) for lo, n in rows.spans])


def _without(rows: Rows, keys: np.ndarray) -> Rows | None:
    """The rows of ``rows`` whose keys are not in ``keys`` (None: none left)."""
    keep = ~np.isin(_keys_of(rows), keys)
    if keep.all():
        return rows
    return _take(rows, keep) if keep.any() else None


def _overlap(pieces: list[Range], ranges: list[Range]) -> list[Range]:
    """The parts of ``pieces`` inside ``ranges``, sorted, adjacent ones joined."""
    out: list[Range] = []
    for a, b in sorted((max(p.begin, r.begin), min(p.end, r.end)) for p in pieces for r in ranges):
        if a >= b:
            continue
        if out and a <= out[-1].end:
            out[-1] = Range(out[-1].begin, max(b, out[-1].end))
        else:
            out.append(Range(a, b))
    return out


def _same_rows(ours: np.ndarray, our_digests: np.ndarray, theirs: np.ndarray, their_digests: np.ndarray):
    """Which of the sorted keys ``theirs`` we hold with the same digest (bool, one each)."""
    if not ours.size:
        return np.zeros(theirs.size, np.bool_)
    at = np.minimum(np.searchsorted(ours, theirs), ours.size - 1)
    return (ours[at] == theirs) & (our_digests[at] == their_digests)


def _take(rows: Rows, keep: np.ndarray) -> Rows:
    """The rows where ``keep`` (bool, one per row), as keys (spans become keys)."""
    keys = _keys_of(rows)
    return Rows(keys=keys[keep], values=None if rows.values is None else rows.values[keep])


def _next_part(table: Table, pieces: list[Range], limit: int):
    """(cover, keys, digests, rest) of the next alignment message over the sorted
    ``pieces``: at most ``limit`` keys (the smallest) and MAX_COVER ranges; a piece with
    more keys is cut after the last one sent, the rest of it left for later."""
    cover: list[Range] = []
    keys: list[np.ndarray] = []
    digests: list[np.ndarray] = []
    n = 0
    for i, p in enumerate(pieces):
        if n >= limit or len(cover) >= MAX_COVER:
            return cover, np.concatenate(keys), np.concatenate(digests), pieces[i:]
        k, d, upto = table.digests_from(p.begin, p.end, limit - n)
        keys.append(k)
        digests.append(d)
        n += k.size
        if upto < p.end:  # (the rest of the piece goes later)
            cover.append(Range(p.begin, upto))
            return cover, np.concatenate(keys), np.concatenate(digests), [Range(upto, p.end), *pieces[i + 1:]]
        cover.append(p)
    return cover, np.concatenate(keys), np.concatenate(digests), []


class Bounds:
    def __init__(self, core):
        """``core``: the ServerCore (its ring, tables, peer calls, acks)."""
        self.core = core
        #: the ``now`` of the step being handled, read by bounded tables for TTL stamps
        self.clock = Clock()
        #: (replica, table) -> (pieces of ranges we lead anew it replicates, not before):
        #: alignments to send (``_align``)
        self._aligns: dict[tuple[str, str], tuple[list[Range], float]] = {}
        #: alignments sent, not answered: call -> (table, its cover, when we give up on it
        #: and plan it again; an answer lost with its connection is not sent again)
        self._asked: dict = {}

    def at(self, now: float) -> None:
        self.clock.now = now

    def adopt(self, table: Table) -> None:
        """A table was created here: share our clock, tell it what we lead."""
        if table.bounded is not None:
            table.bounded.clock = self.clock
            table.lead(self.core.ring.led_by(self.core.node_id))

    def ring_changed(self, old: Assignment) -> None:
        """Tell bounded tables what we lead now; align the replicas of what we lead anew."""
        led = None
        for table in self.core.tables.values():
            if table.bounded is not None:
                led = led if led is not None else self.core.ring.led_by(self.core.node_id)
                table.lead(led)
        if led is not None and old.ranges and leads_anew(old, self.core.ring, self.core.node_id):
            self._plan_aligns(old)

    # -- the primary -----------------------------------------------------------------
    @staticmethod
    def admit(table: Table, rows: Rows) -> tuple[Rows, np.ndarray | None]:
        """The rows of a push that may be stored (counting the others in the sketch),
        and the refused keys (None: none refused)."""
        if table.bounded is None or table.bounded.sketch is None or not rows.count:
            return rows, None
        keys = _keys_of(rows)
        keep = table.admit(keys)
        if keep.all():
            return rows, None
        return _take(rows, keep), keys[~keep]

    def forwarded(self, rows: Rows, refused: np.ndarray | None, groups) -> tuple[Rows, list]:
        """What the replicas get of a push: its rows without the refused keys."""
        if refused is None or not refused.size:
            return rows, groups
        keep = ~np.isin(_keys_of(rows), refused, assume_unique=True)
        rows = _take(rows, keep)
        return rows, self.core._owner_groups(rows)

    def resent(self, table: Table, rows: Rows, groups) -> tuple[Rows, list]:
        """A push applied here before, forwarded again: only the keys stored here (what
        admission let in then; the sketch is not asked twice)."""
        if table.bounded is None or table.bounded.sketch is None or not rows.count:
            return rows, groups
        found, _ = table._hash.find(_keys_of(rows))
        rows = _take(rows, found >= 0)
        return rows, self.core._owner_groups(rows)

    def evict(self, table: Table, pending: Pending | None, now: float) -> Pending | None:
        """Evict what the table's bounds say, and send the record to the replicas of
        those keys; the push that caused it waits for them too (``pending``)."""
        if table.bounded is None or self.core.policy(table).holding:
            # (while the gate keeps pushes, for a checkpoint cut, the rows are not what the
            # replicas will hold when they apply their kept pushes: decide after it)
            return pending
        keys = table.evict()
        if not keys.size:
            return pending
        return self._record(table, keys, pending, now)

    def _record(self, table: Table, keys: np.ndarray, pending: Pending | None, now: float) -> Pending | None:
        """Send the replicas of ``keys`` (sorted) the record that we evicted them."""
        core = self.core
        rows = Rows(keys=keys)
        by_replica: dict[str, list] = {}
        for owners, slices in core._owner_groups(rows):
            for node in owners[1:]:
                by_replica.setdefault(node, []).extend(slices)
        for node, slices in by_replica.items():
            address = core.ring.addresses.get(node)
            if address is None:
                continue
            if pending is None:
                pending = core.acks.start(None, now + core.config.request_timeout)
            sub = rows.take(sorted(slices))
            record = sub.to_message("evict", table=table.spec.name, ring=core.ring.version)
            call = core.calls.ask(node, address, record, partial(core._forward_answered, pending), now)
            pending.calls[call] = None
        if pending is not None and not pending.calls:
            core.acks.settle(pending)
            return None
        return pending

    def evict_differing(self, table: Table, keys: np.ndarray, now: float) -> None:
        """Evict ``keys`` that a replica's copy may hold otherwise than ours (an
        alignment, or a push applied at different points of the two sequences): a
        row no copy holds is one they agree on. Only the keys we still lead; at once,
        whatever the gate keeps (as on a replica, ``_drop``: they leave the pushes
        kept here too, so both sides apply the same kept pushes)."""
        if not keys.size:
            return
        led = self.core.ring.led_by(self.core.node_id)
        keys = np.unique(keys)
        keys = keys[in_ranges(keys, led)]
        if keys.size:
            self._drop(table, keys, count="evicted")
            self._record(table, keys, None, now)

    def tick(self, now: float) -> None:
        """Alignments: give up on those unanswered past request_timeout (planned again),
        send a part of those due. Rows idle past a TTL in seconds go even when no push
        comes."""
        self.at(now)
        for call, (name, cover, give_up_at) in list(self._asked.items()):
            if now >= give_up_at:
                del self._asked[call]
                self.core.calls.forget(call)
                self._again(call.node, name, cover, now)
        if not self.core.serving(now):  # (a server cut off may no longer lead what it led)
            return
        if self._aligns:
            self._align(now)
        for table in list(self.core.tables.values()):
            if table.bounded is not None and table.bounded.bounds.ttl_seconds is not None:
                self.evict(table, None, now)

    def copy_begins(self, r) -> None:
        """A copy of range ``r`` begins here: it replaces what we hold of ``r``. Tables
        that never delete a key can let the copy's rows overwrite ours; a table that
        evicts must drop ours first, or a row its primary evicted while we did not hear
        (we were cut off, declared dead, and came back) would outlive the copy."""
        for table in self.core.tables.values():
            if table.bounded is not None and table.bounded.bounds.evicting and table.count_present_span(
                    r.begin, r.end - r.begin):
                table.retain([x for x in (Range(0, r.begin), Range(r.end, KEY_END)) if x.begin < x.end])

    # -- copies that may differ ------------------------------------------------------------
    # An evict record can miss a copy: its primary dies after sending it to some replicas,
    # or a replica at a newer ring refuses it. And a push can reach two copies at different
    # points of their sequences (a worker's resend to a new primary that one copy had
    # applied and the other not): with evictions in between, their rows differ. Nothing
    # resends a record, so two repairs (decision 153). A primary that leads keys anew
    # compares its rows with each replica's (``align``); and a replica's answer to a
    # forward says whether it applied the push now or had before, which, unlike ours,
    # marks the push's keys as differing. Either way the primary evicts the keys found to
    # differ: a row that no copy holds is one they agree on.

    @staticmethod
    def applied(table: Table, held: Rows | None, todo: Rows | None) -> dict:
        """A replica's answer to a forward of an evicting table's push: whether it applied
        rows of it now, and whether it had applied some of the rows it ``held`` before."""
        if table.bounded is None or not table.bounded.bounds.evicting:
            return {}
        return {"applied": [todo is not None, held is not None and (todo is None or todo.count < held.count)]}

    def watch(self, table: Table, sub: Rows, had: tuple[bool, bool]):
        """What reads a replica's answer to our forward of ``sub`` (None: nothing to
        read); ``had`` says the same as ``applied`` of us, the primary."""
        if table.bounded is None or not table.bounded.bounds.evicting:
            return None
        return partial(self._compare, table, sub, had)

    def _compare(self, table: Table, sub: Rows, had: tuple[bool, bool], call, reply: Message, now: float) -> None:
        theirs = reply.meta.get("applied")
        if theirs is None:
            return  # (an older replica: it does not say)
        if not (isinstance(theirs, list) and len(theirs) == 2 and all(isinstance(x, bool) for x in theirs)):
            log.warning("%s: %s answered a forward with meta.applied %r (not two booleans): ignored",
                        self.core.node_id, call.node, theirs)
            return
        if call.again and theirs == [False, True]:
            return  # (the answer to our first send was lost: it applied the push then)
        if (had[0] and theirs[1]) or (had[1] and theirs[0]):
            self.evict_differing(table, _keys_of(sub), now)

    def _plan_aligns(self, old: Assignment) -> None:
        """At a ring where we lead keys we did not: align each replica of them with us."""
        core, me = self.core, self.core.node_id
        names = [n for n, t in core.tables.items() if t.bounded is not None and t.bounded.bounds.evicting]
        for piece, was, now_owners in overlay(old, core.ring):
            if now_owners and now_owners[0] == me and (not was or was[0] != me):
                for node in now_owners[1:]:
                    for name in names:
                        pieces, _ = self._aligns.get((node, name), ([], 0.0))
                        self._aligns[(node, name)] = ([*pieces, piece], 0.0)
        # (sent from ``tick``, a bounded part at a time: not here, inside the ring change)

    def _align(self, now: float) -> None:
        """Send a part of the alignments that are due (ALIGN_KEYS keys a tick): our keys,
        with a digest of each row, in the pieces we lead that the replica holds, on the
        stream of our forwards, so it compares them at the same point of our push
        sequence; the rest stays planned, for the next ticks. Each message covers a
        sub-range of its own, compared whole at its point. Not while our gate keeps
        pushes (our rows are not yet what we forwarded)."""
        core = self.core
        step = max(1, min(core.config.limits.max_keys, core.config.limits.max_message_bytes // 32))
        budget = ALIGN_KEYS
        for (node, name), (pieces, due) in list(self._aligns.items()):
            table = core.tables.get(name)
            if budget <= 0:
                break
            if due > now or (table is not None and core.policy(table).holding):
                continue
            del self._aligns[(node, name)]
            address = core.ring.addresses.get(node)
            ours = [r for r, o in zip(core.ring.ranges, core.ring.owners) if o and o[0] == core.node_id
                    and node in o[1:]]
            pieces = _overlap(pieces, ours)
            later = _overlap(pieces, core.restoring)  # (a restore replaces their rows: after it)
            pieces = _overlap(pieces, outside(core.restoring))
            if table is None or address is None or not (pieces or later):
                continue
            if not pieces:
                self._aligns[(node, name)] = (later, now)
                continue
            cover, keys, digests, rest = _next_part(table, pieces, min(budget, step))
            budget -= max(keys.size, len(cover))
            if rest or later:
                self._aligns[(node, name)] = ([*rest, *later], now)
            msg = Message("align", table=name, ring=core.ring.version,
                          meta={"cover": [[r.begin, r.end - 1] for r in cover]}, arrays=[keys, digests])
            call = core.calls.ask(node, address, msg, partial(self._aligned, name, cover), now)
            self._asked[call] = (name, cover, now + core.config.request_timeout)

    def _again(self, node: str, name: str, pieces: list[Range], due: float) -> None:
        """Plan the alignment of ``pieces`` again, from ``due`` on."""
        have, _ = self._aligns.get((node, name), ([], due))
        self._aligns[(node, name)] = ([*have, *pieces], due)

    def _aligned(self, name: str, pieces: list[Range], call, reply: Message | None, error: Exception | None,
                 now: float) -> None:
        """A replica's answer to an alignment: evict the keys it holds otherwise than we
        do; at an older ring than ours, on an error, or with no answer in time (``tick``)
        it aligns later (if we still lead them then)."""
        self._asked.pop(call, None)
        table = self.core.tables.get(name)
        if table is None:
            return  # (the table was dropped)
        if error is not None:  # (if it left the ring, the next try finds nothing to align)
            self._again(call.node, name, pieces, now + self.core.config.heartbeat_interval)
            return
        if reply.op == "error":
            if reply.meta.get("code") == StaleRingError.code:
                self._again(call.node, name, pieces, now + self.core.config.heartbeat_interval)
            else:  # (an older server, say: it does not know alignments)
                log.info("%s: %s refused to align %r: %s", self.core.node_id, call.node, name,
                         reply.meta.get("message"))
            return
        differ = reply.arrays[0] if reply.arrays else None
        if isinstance(differ, np.ndarray) and differ.dtype == np.uint64 and differ.ndim == 1:
            differ = np.unique(differ)  # (only keys of what we asked it to align)
            self.evict_differing(table, differ[in_ranges(differ, pieces)], now)

    def align_here(self, table: Table, sender: str, cover: list[Range], keys: np.ndarray,
                   digests: np.ndarray) -> np.ndarray:
        """A primary's alignment, at our ring: delete the rows it does not hold, and
        return the keys it holds that we lack or hold otherwise (it evicts those). Only
        in ranges it leads and we hold, not being copied in or restored (a copy or a
        checkpoint replaces them; its primary aligns after its own restore)."""
        core = self.core
        differ = []
        for r, owners in zip(core.ring.ranges, core.ring.owners):
            if not owners or owners[0] != sender or core.node_id not in owners[1:] or any(
                    r.begin < x.end and x.begin < r.end for x in (*core.incoming, *core.restoring)):
                continue
            for c in cover:
                begin, end = max(r.begin, c.begin), min(r.end, c.end)
                if begin >= end:
                    continue
                ours, our_digests = table.digests_in(begin, end)
                i0, i1 = bounds(keys, begin, end)
                theirs, their_digests = keys[i0:i1], digests[i0:i1]
                table.drop_keys(ours[~np.isin(ours, theirs, assume_unique=True)])
                differ.append(theirs[~_same_rows(ours, our_digests, theirs, their_digests)])
        return np.concatenate(differ) if differ else np.empty(0, np.uint64)

    # -- a replica ---------------------------------------------------------------------
    def peers_table(self, msg: Message, now: float) -> Table:
        """The evicting table a primary's ``evict`` or ``align`` names, the sender a
        server we now know is alive (it refuses one of a table without eviction)."""
        core = self.core
        core._daemons_only(msg)
        core._admit(msg)
        core.fence.heard(msg.sender, now)
        table = core._table(msg)
        if table.bounded is None or not table.bounded.bounds.evicting:
            raise ProtocolError(f"{msg.op}: table {msg.table!r} has no eviction (max_rows, ttl_pushes, "
                                f"ttl_seconds)")
        return table

    def on_evict(self, route, msg: Message, now: float) -> Message:
        """A primary evicted keys of ranges we replicate: delete them here too. Sent at an
        older ring than ours, only those of ranges it still leads at ours: the others'
        new primary aligns us with itself (``align_here``), and a record refused whole
        would leave ours undeleted in the ranges it still leads."""
        core = self.core
        table = self.peers_table(msg, now)
        rows = Rows.from_message(msg, core.config.limits, with_values=False)
        if msg.ring < core.ring.version and rows.count:
            led = sorted(s for owners, slices in rows.groups(core.ring) if owners and owners[0] == msg.sender
                         for s in slices)
            rows = rows.take(led) if led else Rows(keys=rows.keys[:0])
        mine = core._replica_rows(rows, msg)
        if mine is not None:
            self._drop(table, mine.keys)
        return msg.reply()

    def _drop(self, table: Table, keys: np.ndarray, count: str = "evicted_by_primary") -> None:
        """Delete ``keys`` now, and from the pushes our gate still keeps (a checkpoint cut
        here): the primary decided with every push before this record applied, and a
        forward after it may be applied before the kept ones. So every order of applying
        them leaves the rows the primary holds."""
        table.drop_keys(keys, count)
        for kept in self.core.gate.waiting():
            if kept.table == table.spec.name and kept.rows is not None:
                kept.rows = _without(kept.rows, keys)

    def stats(self, table: Table) -> dict:
        return table.bounded_stats()

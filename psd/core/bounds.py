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

Pure, like the rest of ``psd.core``: time comes in as ``now``.
"""
from __future__ import annotations

import logging
from functools import partial

import numpy as np

from psd.cluster.ranges import Range
from psd.cluster.rows import Rows
from psd.codec import Message
from psd.core.acks import Pending
from psd.errors import ProtocolError
from psd.store.bounded import Clock
from psd.store.table import KEY_END, Table

log = logging.getLogger("psd.server")


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


def _take(rows: Rows, keep: np.ndarray) -> Rows:
    """The rows where ``keep`` (bool, one per row), as keys (spans become keys)."""
    keys = _keys_of(rows)
    return Rows(keys=keys[keep], values=None if rows.values is None else rows.values[keep])


class Bounds:
    def __init__(self, core):
        """``core``: the ServerCore (its ring, tables, peer calls, acks)."""
        self.core = core
        #: the ``now`` of the step being handled, read by bounded tables for TTL stamps
        self.clock = Clock()

    def at(self, now: float) -> None:
        self.clock.now = now

    def adopt(self, table: Table) -> None:
        """A table was created here: share our clock, tell it what we lead."""
        if table.bounded is not None:
            table.bounded.clock = self.clock
            table.lead(self.core.ring.led_by(self.core.node_id))

    def ring_changed(self) -> None:
        led = None
        for table in self.core.tables.values():
            if table.bounded is not None:
                led = led if led is not None else self.core.ring.led_by(self.core.node_id)
                table.lead(led)

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

    def tick(self, now: float) -> None:
        """Rows idle past a TTL in seconds go even when no push comes."""
        self.at(now)
        if not self.core.serving(now):  # (a server cut off may no longer lead what it led)
            return
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

    # -- a replica ---------------------------------------------------------------------
    def on_evict(self, route, msg: Message, now: float) -> Message:
        """A primary evicted keys of ranges we replicate: delete them here too."""
        core = self.core
        core._daemons_only(msg)
        core._admit(msg)
        core.fence.heard(msg.sender, now)
        table = core._table(msg)
        if table.bounded is None or not table.bounded.bounds.evicting:
            raise ProtocolError(f"evict: table {msg.table!r} has no eviction (max_rows, ttl_pushes, ttl_seconds)")
        rows = Rows.from_message(msg, core.config.limits, with_values=False)
        core._check_forwarder(msg, rows)
        mine = core._replica_rows(rows, msg)
        if mine is not None:
            self._drop(table, mine.keys)
        return msg.reply()

    def _drop(self, table: Table, keys: np.ndarray) -> None:
        """Delete ``keys`` now, and from the pushes our gate still keeps (a checkpoint cut
        here): the primary decided with every push before this record applied, and a
        forward after it may be applied before the kept ones. So every order of applying
        them leaves the rows the primary holds."""
        table.drop_keys(keys)
        for kept in self.core.gate.waiting():
            if kept.table == table.spec.name and kept.rows is not None:
                kept.rows = _without(kept.rows, keys)

    def stats(self, table: Table) -> dict:
        return table.bounded_stats()

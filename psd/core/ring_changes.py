"""How the scheduler carries out a ring change without losing an acknowledged update.

1. Compute the next ring (consistent hashing over the new member set, replicas placed
   as the config's ``placement`` says) and the copies it needs
   (psd.cluster.ring.rebalance): who must receive which range from whom. A
   range whose every owner is gone is *not* given to anyone empty: it stays with its
   dead owners, unavailable, until one of them comes back (a server declared dead on
   silence may only have been cut off; its copy is the only one).
2. If anything must move, publish the *joint* ring first: each range is held by its
   live old owners (the first leads; a dead primary's replica is thereby promoted)
   plus its new owners. Every server acknowledges it before any copy starts, so from
   then on each write to a moving range is forwarded to the new owner too.
3. Ask each source (the range's primary in the joint ring) to copy the range. The
   copy travels on the same stream as the source's forwards, after the forwards it
   already contains; the receiver ignores forwards that arrive before the copy.
4. Publish the final ring: first to the servers that stop leading a range (they stop
   serving it), then to the rest, then to the workers. Servers drop what they no longer
   hold; workers send unanswered requests again to the new primaries.

Written as procedures (``psd.core.procedures``) over the cluster state: they yield the
calls they wait for and are resumed with the answers.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import Range, range_to_wire
from psd.cluster.ring import Transfer, joint, overlay, rebalance
from psd.codec import Message
from psd.core.cluster_state import ClusterState
from psd.core.procedures import Acquire, Calls

log = logging.getLogger("psd.ring")

#: the lock ring changes and checkpoints share: a range is written by one primary
RING_LOCK = "ring"
#: rounds of copies a ring change tries (planned again each time from the servers alive)
#: before it leaves the joint ring in place for a later try
COPY_ATTEMPTS = 3
#: the longest a range copy may take (it is given up earlier if its source or
#: destination dies, and its source gives up when the destination stops answering)
COPY_TIMEOUT = 24 * 3600.0


def keep_orphans(old: Assignment, new: Assignment, live: set[str],
                 abandoned: set[str] = frozenset()) -> tuple[Assignment, list[Range]]:
    """``new`` with every piece no live server held in ``old`` given back to its old
    owners (dead, but holding the only copies), and those pieces; except pieces whose
    old owners are all ``abandoned`` (given up on: their pieces are restored from a
    checkpoint), which go to their new owners."""
    ranges, owners, orphans = [], [], []
    for piece, was, will in overlay(old, new):
        own = was if was and not any(s in live for s in was) and not all(s in abandoned for s in was) else will
        if own is was and was:
            orphans.append(piece)
        if ranges and owners[-1] == own and ranges[-1].end == piece.begin:
            ranges[-1] = Range(ranges[-1].begin, piece.end)
        else:
            ranges.append(piece)
            owners.append(own)
    if not orphans:
        return new, []
    addresses = {n: a for n, a in {**old.addresses, **new.addresses}.items() if any(n in o for o in owners)}
    ring = Assignment(version=new.version, ranges=tuple(ranges), owners=tuple(owners), addresses=addresses)
    return ring, orphans


def take_back(ring: Assignment, rejoined: dict[str, str], live: set[str]) -> Assignment:
    """``ring`` with each range that has no live owner given to the owners that came back
    under new names (``rejoined``: old -> new): a server declared dead on silence and
    registered again still holds what it held, the only copy of such a range."""
    if not rejoined:
        return ring

    def current(node: str) -> str:
        seen = set()
        while node in rejoined and node not in seen:
            seen.add(node)
            node = rejoined[node]
        return node
    owners = []
    changed = False
    for o in ring.owners:
        if o and not any(x in live for x in o):
            back = tuple(dict.fromkeys(current(x) for x in o))
            if back != o and any(x in live for x in back):
                o, changed = back, True
        owners.append(o)
    if not changed:
        return ring
    addresses = dict(ring.addresses)
    return Assignment(version=ring.version, ranges=ring.ranges, owners=tuple(owners), addresses=addresses)


def unavailable(ring: Assignment, live: set[str]) -> list[tuple[Range, tuple[str, ...]]]:
    """Ranges of ``ring`` none of whose owners is live."""
    return [(r, o) for r, o in zip(ring.ranges, ring.owners) if not any(s in live for s in o)]


class RingChanges:
    """Ring changes, one at a time (``RING_LOCK``). ``publish(ring)`` is called with each
    new ring before it is sent (the scheduler saves it); ``after_final`` once a final ring
    is out (a pending checkpoint restore)."""

    def __init__(self, state: ClusterState, publish: Callable[[Assignment], None],
                 after_final: Callable[[], object], notify: Callable[[str, Message], None]):
        """``notify(node, msg)``: a message whose answer nobody waits for (a worker's ring)."""
        self.state = state
        self._published = publish
        self._after_final = after_final
        self._notify = notify
        self.running = 0
        #: a change that could not copy what it had to: the scheduler tries it again
        self.unfinished: str | None = None
        #: pieces given to new owners with no copy to take from (their owners abandoned):
        #: every ring says so until a restore has filled them (servers refuse them meanwhile)
        self.restoring: list[Range] = []

    @property
    def busy(self) -> bool:
        return self.running > 0

    def rebalance(self, reason: str, exclude: str | None = None):
        """A procedure: move to the ring over the live servers (minus ``exclude``, which
        drains). Returns the final ring."""
        self.running += 1
        try:
            yield Acquire(RING_LOCK)  # (released when the procedure ends, however it ends)
            return (yield from self._change(reason, exclude))
        finally:
            self.running -= 1

    def _change(self, reason: str, exclude: str | None):
        s = self.state
        cfg = s.config
        for attempt in range(1, COPY_ATTEMPTS + 1):
            live = set(s.live("server"))
            # where the data surely is: the last final ring, where a range none of whose
            # owners is live is its owners' that came back under new names
            base = take_back(s.stable if s.stable is not None else s.ring, s.rejoined, live)
            members = live - {exclude} if exclude else live
            change = rebalance(base, members, live, vnodes=cfg.vnodes, replication=cfg.replication,
                               addresses={n: s.addresses[n] for n in members}, placement=cfg.placement)
            target, orphans = keep_orphans(base, change.ring, live, s.abandoned)
            self.restoring = sorted(set(self.restoring) | set(_released(base, live, s.abandoned)))
            for r in orphans:
                log.error("no live copy of %s is left: it stays with its owners, unavailable, until one of them "
                          "comes back (ring v%d, %s)", r, s.ring.version, reason)
            if not change.transfers:
                break
            mid = joint(base, target, live, s.ring.version + 1)
            incoming: dict[str, list] = {}
            for t in change.transfers:
                incoming.setdefault(t.dst, []).append(range_to_wire(t.range))
            yield from self.publish(mid, incoming, final=False)
            log.info("ring v%d (joint, %s): copying %d range(s)", mid.version, reason, len(change.transfers))
            # a copy may take long: it ends when its source answers (the source fails it when
            # the destination stops answering), or when its source or destination dies
            results = yield Calls([(t.src, _transfer(t, s.addresses)) for t in change.transfers],
                                  timeout=COPY_TIMEOUT, watch=[(t.src, t.dst) for t in change.transfers])
            failed = [(t, r) for t, r in zip(change.transfers, results) if not isinstance(r, Message) or r.op != "ok"]
            if not failed:
                break
            for t, r in failed:
                log.warning("copy of %s from %s to %s failed (%s); attempt %d of %d", t.range, t.src, t.dst,
                            r.meta.get("message") if isinstance(r, Message) else r, attempt, COPY_ATTEMPTS)
            # no new owner may lead what it did not receive: plan again from where the data
            # is, with the servers alive now (another old owner may be the source)
        else:
            log.error("ring change (%s) left unfinished after %d attempts to copy; ring v%d (joint) stays until "
                      "it is tried again", reason, COPY_ATTEMPTS, s.ring.version)
            self.unfinished = reason
            return s.ring
        final = dataclasses.replace(target, version=s.ring.version + 1)
        yield from self.publish(final, {}, final=True)
        s.stable = final
        self.unfinished = None
        if final.ranges:
            yield from self._after_final()
        log.info("ring v%d (%s): %d server(s), %d range(s)", final.version, reason, len(final.servers),
                 len(final.ranges))
        return final

    def publish(self, ring: Assignment, incoming: dict[str, list], final: bool):
        """Servers acknowledge a ring before the change goes on; workers are told too. A
        final ring goes first to the servers that stop leading a range (so no range has
        two serving primaries), then to the others."""
        s = self.state
        old = s.ring
        s.ring = ring
        self._published(ring)
        wire = ring.to_wire()
        restoring = [range_to_wire(r) for r in self.restoring]
        servers = s.live("server")
        losing = set()
        if final:
            for _piece, was, will in overlay(old, ring):
                if was and (not will or will[0] != was[0]):
                    losing.add(was[0])
        waves = [[n for n in servers if n in losing], [n for n in servers if n not in losing]]
        for wave in waves:
            if not wave:
                continue
            results = yield Calls([(node, Message("ring", meta={"ring": wire, "incoming": incoming.get(node, []),
                                                                "final": final, "restoring": restoring}))
                                   for node in wave],
                                  timeout=s.config.request_timeout)
            for node, r in zip(wave, results):
                if not isinstance(r, Message) or r.op != "ok":
                    log.warning("%s did not take ring v%d: %s", node, ring.version,
                                r.meta.get("message") if isinstance(r, Message) else r)
        for node in s.live("worker"):  # best effort: workers also learn rings from refusals
            self._notify(node, Message("ring", meta={"ring": wire}))


def _released(ring: Assignment, live: set[str], abandoned: set[str]) -> list[Range]:
    """Ranges of ``ring`` whose owners are all abandoned and none live."""
    return [r for r, o in zip(ring.ranges, ring.owners)
            if o and all(x in abandoned for x in o) and not any(x in live for x in o)]


def _transfer(t: Transfer, addresses: dict) -> Message:
    return Message("transfer", meta={"range": range_to_wire(t.range), "dst": t.dst, "address": addresses[t.dst]})


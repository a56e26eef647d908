"""How the scheduler carries out a ring change without losing an acknowledged update.

1. Compute the next ring (consistent hashing over the new member set) and the copies
   it needs (psd.cluster.ring.rebalance): who must receive which range from whom.
2. If anything must move, publish the *joint* ring first: each range is held by its
   live old owners (the first leads; a dead primary's replica is thereby promoted)
   plus its new owners. Every server acknowledges it before any copy starts, so from
   then on each write to a moving range is forwarded to the new owner too.
3. Ask each source (the range's primary in the joint ring) to copy the range. The
   copy travels on the same connection as the source's forwards, after the forwards
   it already contains; the receiver ignores forwards that arrive before the copy.
4. Publish the final ring. Servers drop what they no longer hold; workers re-send
   unanswered requests to the new primaries under their original ids.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Callable

from psd.cluster.assignment import Assignment
from psd.cluster.ring import Transfer, joint, rebalance
from psd.codec import Message
from psd.cluster.ranges import range_to_wire

log = logging.getLogger("psd.ring")

#: how often a pending copy checks that its source and destination are still alive
TRANSFER_TICK = 0.1


class RingChanges:
    def __init__(self, scheduler):
        self.s = scheduler
        self.lock = asyncio.Lock()
        self.in_progress = 0

    @property
    def busy(self) -> bool:
        return self.in_progress > 0

    async def rebalance(self, reason: str, exclude: str | None = None) -> Assignment:
        """Move to the ring over the live servers (minus ``exclude``, which drains)."""
        self.in_progress += 1
        try:
            async with self.lock:
                return await self._change(reason, exclude)
        finally:
            self.in_progress -= 1

    async def _change(self, reason: str, exclude: str | None) -> Assignment:
        s = self.s
        live = set(s.liveness.live("server"))
        members = live - {exclude} if exclude else live
        cfg = s.config
        change = rebalance(s.ring, members, live, vnodes=cfg.vnodes, replication=cfg.replication,
                           addresses={n: s.addresses[n] for n in members})
        for r in change.lost:
            log.error("no live copy of %s is left: its data is lost (ring v%d, %s)", r, s.ring.version, reason)
        version = s.ring.version + 1
        if change.transfers:
            mid = joint(s.ring, change.ring, live, version)
            incoming: dict[str, list] = {}
            for t in change.transfers:
                incoming.setdefault(t.dst, []).append(range_to_wire(t.range))
            await self.publish(mid, incoming, final=False)
            log.info("ring v%d (joint, %s): copying %d range(s)", mid.version, reason, len(change.transfers))
            results = await asyncio.gather(*(self._copy(t) for t in change.transfers), return_exceptions=True)
            failed = [t for t, r in zip(change.transfers, results) if r is not True]
            for t in failed:
                log.error("copy of %s from %s to %s failed; that copy is missing", t.range, t.src, t.dst)
            version += 1
        final = dataclasses.replace(change.ring, version=version)
        await self.publish(final, {}, final=True)
        if final.ranges:
            await s.checkpoints.restore_if_pending()
        log.info("ring v%d (%s): %d server(s), %d range(s)", final.version, reason, len(final.servers),
                 len(final.ranges))
        return final

    async def publish(self, ring: Assignment, incoming: dict[str, list], final: bool) -> None:
        """Servers acknowledge a ring before the change goes on; workers are told too."""
        s = self.s
        s.ring = ring
        s.save()
        wire = ring.to_wire()
        calls = []
        for node in s.liveness.live("server"):
            msg = Message("ring", meta={"ring": wire, "incoming": incoming.get(node, []), "final": final})
            calls.append(s.rpc.call(msg, s.routes[node], timeout=s.config.request_timeout))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                log.warning("a server did not take ring v%d: %s", ring.version, r)
        for node in s.liveness.live("worker"):
            if node in s.routes:  # best effort: workers also learn rings from refusals
                notice = Message("ring", meta={"ring": wire})
                fut = s.rpc.request(notice, s.routes[node])
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
                # a worker that died meanwhile never answers: stop waiting in time
                asyncio.get_running_loop().call_later(s.config.request_timeout, s.rpc.forget, notice.id)

    async def _copy(self, t: Transfer) -> bool:
        s = self.s
        msg = Message("transfer", meta={"range": range_to_wire(t.range), "dst": t.dst,
                                        "address": s.addresses[t.dst]})
        fut = s.rpc.request(msg, s.routes[t.src])
        while True:
            done, _ = await asyncio.wait({fut}, timeout=TRANSFER_TICK)
            if done:
                reply = fut.result()
                if reply.op != "ok":  # the reason, which the source logs only once a minute per kind
                    log.warning("copying %s from %s to %s failed: %s", t.range, t.src, t.dst,
                                reply.meta.get("message"))
                return reply.op == "ok"
            alive: Callable[[str], bool] = lambda n: n in s.liveness.live("server")
            if not (alive(t.src) and alive(t.dst)):
                s.rpc.forget(msg.id)
                return False

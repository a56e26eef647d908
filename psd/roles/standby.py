"""A standby scheduler's loop: copy the leader's state, and take over when it is lost.

The rules (when the leader counts as lost, how votes are counted) are
``psd.core.election``'s; this module does the talking: ``follow`` requests to whichever
scheduler leads (learnt from the answers of the others), its copy of the state written to
its own ``state_dir``, and an election (``elect`` to every server of the copied ring)
when the rules say so. ``until_leading`` returns what the new leader starts from.
``watch_peers`` is the leader's side: a leader that learns of a higher epoch steps down.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from psd.cluster.assignment import Assignment
from psd.cluster.schedulers import lost_after
from psd.codec import Message
from psd.core.election import Candidacy
from psd.errors import NotLeaderError, PsdError
from psd.roles.peers import Peers

log = logging.getLogger("psd.scheduler")


class Deposed(PsdError):
    """Another scheduler leads at a higher epoch: this one stops leading. Exit status 1,
    which the shipped unit restarts, and the restarted scheduler follows the leader."""

    code = "deposed"


@dataclass
class Won:
    state: dict | None
    epoch: int
    rings: list[Assignment] = field(default_factory=list)
    #: the voters' tables (wire specs): one created just before the leader was lost
    tables: list[dict] = field(default_factory=list)
    #: False: the first scheduler of a new cluster, leading with nobody to ask
    elected: bool = True


def lease(config) -> float:
    """How long a leader's silence must last before it counts as lost."""
    return lost_after(config.heartbeat_interval, config.heartbeat_misses)


class Standby:
    def __init__(self, config, me: str, curve, saved: dict | None, save) -> None:
        """``me``: this scheduler's address; ``saved``: its own state file (None: none);
        ``save(state)``: writes the copy."""
        self.config, self.me, self.save = config, me, save
        self.peers = [a for a in (config.scheduler, *config.standby) if a != me]
        self.copy = saved
        self.have: int | None = None
        self.leader: str | None = None
        now = time.monotonic()
        self.candidacy = Candidacy(int((saved or {}).get("epoch", 0)), lease(config), lease(config), now)
        #: connections to the other schedulers (by address) and to the voters (by node id)
        self.link = Peers("H", config.limits, "none", curve)
        self._next_peer = 0

    # -- following --------------------------------------------------------------------
    async def until_leading(self) -> Won:
        cfg = self.config
        try:
            # a new cluster: its first scheduler leads unless another already does
            if self.me == cfg.scheduler and not _servers(self.copy) and not await self._someone_leads():
                return Won(self.copy, max(1, self.candidacy.epoch), elected=False)
            while True:
                await self._follow_once()
                won = await self._maybe_elect()
                if won is not None:
                    return won
                await asyncio.sleep(cfg.heartbeat_interval)
        finally:
            self.link.close()

    async def _someone_leads(self) -> bool:
        for _ in range(3):
            for peer in self.peers:
                if await self._ask_follow(peer, probe=True):
                    return True
            await asyncio.sleep(self.config.heartbeat_interval)
        return False

    async def _follow_once(self) -> None:
        target = self.leader
        if target is None:
            target = self.peers[self._next_peer % len(self.peers)]
            self._next_peer += 1
        await self._ask_follow(target)

    async def _ask_follow(self, address: str, probe: bool = False) -> bool:
        """One ``follow``; True if ``address`` leads."""
        cfg = self.config
        try:
            reply = await self.link.get(address, address).call(Message("follow", meta={"have": self.have, "probe": probe,
                                                                          "from": self.me}),
                                         timeout=max(0.5, 2 * cfg.heartbeat_interval))
        except NotLeaderError as e:
            data = e.data or {}
            leader = data.get("leader")
            self.candidacy.epoch = max(self.candidacy.epoch, int(data.get("epoch") or 0))
            if address == self.leader:
                self.leader = None
            if isinstance(leader, str) and leader != self.me and leader in self.peers and self.leader is None:
                self.leader = leader
            return False
        except PsdError as e:
            log.debug("standby %s: follow %s: %s", self.me, address, e)
            return False
        meta = reply.meta
        if self.leader != address:
            log.info("standby %s follows the leader at %s (epoch %s)", self.me, address, meta.get("epoch"))
        self.leader = address
        self.candidacy.heard(int(meta.get("epoch", 0)), bool(meta.get("isolated")), time.monotonic())
        if isinstance(meta.get("state"), dict):
            self.copy, self.have = meta["state"], meta.get("n")
            self.save(self.copy)
        return True

    # -- electing ---------------------------------------------------------------------
    def _voters(self) -> dict[str, str]:
        state = self.copy or {}
        ring = Assignment.from_wire(state["ring"]) if state.get("ring") else Assignment(version=0)
        live = {m["node"] for m in state.get("members", []) if m["role"] == "server"
                and m["state"] in ("active", "suspect")}
        addresses = state.get("addresses", {})
        return {n: addresses[n] for n in sorted(set(ring.servers) | live) if n in addresses}

    async def _maybe_elect(self) -> Won | None:
        now = time.monotonic()
        why = self.candidacy.should_run(now)
        voters = self._voters()
        if why is None or not voters:
            return None
        epoch = self.candidacy.start(list(voters), now)
        log.warning("standby %s runs for leader at epoch %d: %s; asking %d server(s)", self.me, epoch, why,
                    len(voters))
        timeout = max(1.0, 4 * self.config.heartbeat_interval)
        calls = {n: asyncio.ensure_future(self.link.get(n, a).call(Message("elect", meta={"epoch": epoch,
                                                                                  "candidate": self.me}),
                                                         timeout=timeout))
                 for n, a in voters.items()}
        rings, tables = [], []
        for node, call in calls.items():
            try:
                meta = (await call).meta
            except PsdError as e:
                self.candidacy.vote(node, epoch, False, str(e))
                continue
            self.candidacy.vote(node, epoch, bool(meta.get("granted")), str(meta.get("why", "")),
                                int(meta.get("epoch", 0)))
            if meta.get("granted") and isinstance(meta.get("ring"), dict):
                rings.append(Assignment.from_wire(meta["ring"]))
                tables.extend(t for t in meta.get("tables") or [] if isinstance(t, dict))
        won = self.candidacy.won()
        self.candidacy.end()
        if won:
            log.warning("standby %s won epoch %d with %d of %d votes", self.me, epoch,
                        len(self.candidacy.votes), len(voters))
            return Won(self.copy, epoch, rings, tables)
        log.warning("standby %s: no majority at epoch %d (%d of %d votes; %s)", self.me, epoch,
                    len(self.candidacy.votes), len(voters),
                    "; ".join(f"{n}: {w}" for n, w in sorted(self.candidacy.refusals.items())))
        return None


async def watch_peers(config, me: str, curve, epoch: int) -> None:
    """The leader's side: raises ``Deposed`` once another scheduler says it leads at a
    higher epoch (it won an election while we were cut off, or we are a stale restart)."""
    peers = [a for a in (config.scheduler, *config.standby) if a != me]
    link = Peers("H", config.limits, "none", curve)
    try:
        while True:
            await asyncio.sleep(max(0.2, config.heartbeat_interval * 2))
            for peer in peers:
                try:
                    meta = (await link.get(peer, peer).call(Message("follow", meta={"probe": True, "from": me}),
                                            timeout=max(0.5, 2 * config.heartbeat_interval))).meta
                    theirs, leads = int(meta.get("epoch", 0)), True
                except NotLeaderError as e:
                    theirs, leads = int((e.data or {}).get("epoch") or 0), False
                except PsdError:
                    continue
                if theirs > epoch:
                    raise Deposed(f"the scheduler at {peer} {'leads' if leads else 'knows a leader'} at epoch "
                                  f"{theirs}, above ours ({epoch}): this scheduler steps down and restarts as a "
                                  f"standby")
    finally:
        link.close()


def _servers(state: dict | None) -> bool:
    return bool(state) and any(m["role"] == "server" for m in state.get("members", []))

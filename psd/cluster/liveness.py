"""Peer liveness as named states, driven by heartbeats and ``tick(now)``.

No clock is read here: the caller passes ``now``, so tests step time by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(str, Enum):
    ACTIVE = "active"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass
class Peer:
    node: str
    role: str
    state: State
    last_seen: float
    joined: float


class Liveness:
    """A server is suspect after ``misses`` missed heartbeats and dead after twice that.

    Workers get their own, longer ``worker_timeout`` (suspect at half of it): a worker's
    death only releases its clocks and shards, while a server's stalls writes, and a
    worker deep in one long numpy call can starve even a heartbeat thread of the GIL.
    """

    def __init__(self, interval: float, misses: int, worker_timeout: float | None = None):
        self.interval = interval
        self.misses = misses
        self.worker_timeout = worker_timeout or 2 * misses * interval
        self.peers: dict[str, Peer] = {}

    def _limits(self, role: str) -> tuple[float, float]:
        if role == "worker":
            return self.worker_timeout / 2, self.worker_timeout
        return self.misses * self.interval, 2 * self.misses * self.interval

    def join(self, node: str, role: str, now: float) -> None:
        self.peers[node] = Peer(node, role, State.ACTIVE, now, now)

    def seen(self, node: str, now: float) -> State | None:
        """Record a heartbeat; a dead or departed node stays so (it must re-register)."""
        peer = self.peers.get(node)
        if peer is None:
            return None
        if peer.state in (State.DEAD, State.LEFT):
            return peer.state
        peer.last_seen = now
        peer.state = State.ACTIVE
        return peer.state

    def leave(self, node: str) -> None:
        if node in self.peers:
            self.peers[node].state = State.LEFT

    def forget_gone(self, role: str, keep: int) -> list[str]:
        """Forget all but the ``keep`` newest dead or departed peers of ``role`` (in
        joining order); returns the nodes forgotten."""
        gone = [p.node for p in self.peers.values() if p.role == role and p.state in (State.DEAD, State.LEFT)]
        drop = gone[:max(0, len(gone) - keep)]
        for node in drop:
            del self.peers[node]
        return drop

    def excuse(self, seconds: float) -> None:
        """The observer itself did not run for ``seconds`` (its event loop stalled: frozen,
        starved of CPU): the heartbeats sent meanwhile wait unread in its socket, so that
        time is nobody's silence. Without this, an observer that wakes from a stall longer
        than the dead time declares every peer dead at once, before reading their beats."""
        if seconds <= 0:
            return
        for peer in self.peers.values():
            if peer.state not in (State.DEAD, State.LEFT):
                peer.last_seen += seconds

    def tick(self, now: float) -> list[tuple[str, State, State]]:
        """Advance states; return the (node, old, new) transitions."""
        changes = []
        for peer in self.peers.values():
            if peer.state in (State.DEAD, State.LEFT):
                continue
            silent = now - peer.last_seen
            suspect_after, dead_after = self._limits(peer.role)
            new = (State.DEAD if silent > dead_after
                   else State.SUSPECT if silent > suspect_after else State.ACTIVE)
            if new != peer.state:
                changes.append((peer.node, peer.state, new))
                peer.state = new
        return changes

    def live(self, role: str) -> list[str]:
        return [p.node for p in self.peers.values()
                if p.role == role and p.state in (State.ACTIVE, State.SUSPECT)]

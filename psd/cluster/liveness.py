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
    """A node is suspect after ``misses`` missed heartbeats and dead after twice that."""

    def __init__(self, interval: float, misses: int):
        self.interval = interval
        self.misses = misses
        self.peers: dict[str, Peer] = {}

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

    def tick(self, now: float) -> list[tuple[str, State, State]]:
        """Advance states; return the (node, old, new) transitions."""
        changes = []
        for peer in self.peers.values():
            if peer.state in (State.DEAD, State.LEFT):
                continue
            silent = now - peer.last_seen
            new = (State.DEAD if silent > 2 * self.misses * self.interval
                   else State.SUSPECT if silent > self.misses * self.interval else State.ACTIVE)
            if new != peer.state:
                changes.append((peer.node, peer.state, new))
                peer.state = new
        return changes

    def live(self, role: str) -> list[str]:
        return [p.node for p in self.peers.values()
                if p.role == role and p.state in (State.ACTIVE, State.SUSPECT)]

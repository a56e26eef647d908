"""Peer liveness as named states, driven by heartbeats and ``tick(now)``.

A server's death is declared only with evidence from a quorum. The observer (the
scheduler) may itself be the one cut off: a scheduler that lost its link hears from
nobody and would otherwise declare every server dead, and the servers, told so after
the heal, would throw away the only copies. So a server silent for the dead time is
declared DEAD only when a strict majority of the voters (the scheduler and the live
servers, the silent one included) agree it is gone: the scheduler, plus every live
server whose own recent heartbeat reports no contact with it for the dead time (servers
ping each other; ``report``). Until then it stays SUSPECT, and ``isolated`` says
whether the scheduler itself hears from too few servers to decide anything. Servers
keep serving only while they hold a lease from the scheduler or from such a majority
(``psd.core.fence``), so the two majorities meet and a server the scheduler declares
dead has stopped serving.

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


def quorum(voters: int) -> int:
    """A strict majority of ``voters``."""
    return voters // 2 + 1


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
        #: per server: when its newest report arrived, and its seconds since it last heard
        #: from each other server (what it said then)
        self.reports: dict[str, tuple[float, dict[str, float]]] = {}

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
        self.reports.pop(node, None)

    def report(self, server: str, ages: dict[str, float], now: float) -> None:
        """A live server's word on how long it has not heard from each other server."""
        self.reports[server] = (now, dict(ages))

    def _fresh(self, node: str, now: float) -> bool:
        peer = self.peers.get(node)
        return (peer is not None and peer.state in (State.ACTIVE, State.SUSPECT)
                and now - peer.last_seen <= self._limits(peer.role)[0])

    def confirmers(self, node: str, now: float) -> tuple[int, int]:
        """(voters agreeing ``node`` is gone, voters in all): the scheduler, plus every
        other live server whose fresh report says it has not heard from ``node`` for the
        dead time; the voters are the scheduler and every live server, ``node`` included."""
        dead_after = self._limits("server")[1]
        servers = [p.node for p in self.peers.values() if p.role == "server"
                   and p.state in (State.ACTIVE, State.SUSPECT)]
        agree = 1
        for other in servers:
            if other == node or not self._fresh(other, now):
                continue
            at, ages = self.reports.get(other, (None, {}))
            if at is None or now - at > self._limits("server")[0]:
                continue
            age = ages.get(node)
            if age is None or age > dead_after:
                agree += 1
        return agree, len(servers) + 1

    def isolated(self, now: float) -> bool:
        """Whether the scheduler hears from too few live servers (with itself, fewer than
        a majority of the voters) to declare any of them dead."""
        servers = [p.node for p in self.peers.values() if p.role == "server"
                   and p.state in (State.ACTIVE, State.SUSPECT)]
        heard = sum(1 for n in servers if self._fresh(n, now))
        return bool(servers) and heard + 1 < quorum(len(servers) + 1)

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
        """Advance states; return the (node, old, new) transitions. A server past the
        dead time becomes DEAD only with a quorum's agreement (``confirmers``)."""
        changes = []
        for peer in self.peers.values():
            if peer.state in (State.DEAD, State.LEFT):
                continue
            silent = now - peer.last_seen
            suspect_after, dead_after = self._limits(peer.role)
            new = (State.DEAD if silent > dead_after
                   else State.SUSPECT if silent > suspect_after else State.ACTIVE)
            if new == State.DEAD and peer.role == "server":
                agree, voters = self.confirmers(peer.node, now)
                if agree < quorum(voters):
                    new = State.SUSPECT
            if new != peer.state:
                changes.append((peer.node, peer.state, new))
                peer.state = new
        for change in changes:
            if change[2] == State.DEAD:
                self.reports.pop(change[0], None)
        return changes

    def live(self, role: str) -> list[str]:
        return [p.node for p in self.peers.values()
                if p.role == role and p.state in (State.ACTIVE, State.SUSPECT)]

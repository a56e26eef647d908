"""Who leads the cluster when there are standby schedulers: the rules, with no I/O.

One scheduler leads; standbys copy its state (``follow``) and stand ready. The danger is
two leaders, each changing the ring, or a standby that takes its own cut link for the
leader's death. So a standby never takes over on its own word: it asks the servers, and
leads only with the votes of a majority of them. A server votes for a candidate only if
its own leader has been silent past the lease (it cannot vouch for a leader it does not
hear) and only once per epoch (a higher epoch than any it has seen); having voted, it
links to the candidate, so the old leader can no longer reach it. A leader that learns
of a higher epoch steps down. Epochs only grow; each scheduler saves its own.

``Candidacy`` is a standby's side, ``Ballot`` a server's. The scheduler and server
daemons carry out what they decide; ``tests/test_election.py`` tries the rules alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def majority(voters: int) -> int:
    return voters // 2 + 1


@dataclass
class Vote:
    granted: bool
    why: str


class Ballot:
    """A server's vote: for whom, at which epoch, and when it last heard its leader."""

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self.epoch = 0
        self.leader: str | None = None
        self.heard_at = -math.inf

    def heard(self, epoch: int, leader: str | None, now: float) -> None:
        """A leader answered (a heartbeat, a registration): it is alive for us."""
        if epoch >= self.epoch:
            self.epoch = epoch
            if leader:
                self.leader = leader
        self.heard_at = now

    def ask(self, epoch: int, candidate: str, now: float) -> Vote:
        if epoch <= self.epoch:
            return Vote(False, f"epoch {epoch} is not above {self.epoch}, which this server has seen "
                               f"(leader {self.leader})")
        silent = now - self.heard_at
        if silent < self.lease:
            return Vote(False, f"its leader {self.leader} answered {silent:.2f} s ago (lease {self.lease:.2f} s)")
        self.epoch, self.leader = epoch, candidate
        # the candidate has our vote; until it answers us as leader, nobody does
        self.heard_at = -math.inf
        return Vote(True, f"no word from the leader for {silent:.2f} s")


class Candidacy:
    """A standby scheduler's reading of its leader's health, and the votes it counts.

    ``takeover_after``: seconds of silence from the leader (or of the leader saying it is
    isolated: it hears too few servers itself) before running for leader; ``retry``:
    seconds between elections that failed."""

    def __init__(self, epoch: int, takeover_after: float, retry: float, now: float) -> None:
        self.epoch = epoch
        self.takeover_after = takeover_after
        self.retry = retry
        self.heard_at = now  # a standby starts by giving its leader a full timeout
        self.isolated_since: float | None = None
        self.next_try = now
        self.running: int | None = None  # the epoch of the election under way
        self._tried = epoch  # the highest epoch run for: servers that voted in it do not again
        self.votes: set[str] = set()
        self.refusals: dict[str, str] = {}
        self.voters: tuple[str, ...] = ()

    def heard(self, epoch: int, isolated: bool, now: float) -> None:
        """The leader answered ``follow``."""
        self.epoch = max(self.epoch, epoch)
        self.heard_at = now
        if not isolated:
            self.isolated_since = None
        elif self.isolated_since is None:
            self.isolated_since = now

    def leader_lost(self, now: float) -> str | None:
        """Why the leader counts as lost now (None: it does not)."""
        silent = now - self.heard_at
        if silent >= self.takeover_after:
            return f"no answer from the leader for {silent:.1f} s"
        if self.isolated_since is not None and now - self.isolated_since >= self.takeover_after:
            return f"the leader has heard from too few servers for {now - self.isolated_since:.1f} s"
        return None

    def should_run(self, now: float) -> str | None:
        if self.running is not None or now < self.next_try:
            return None
        return self.leader_lost(now)

    def start(self, voters: list[str], now: float) -> int:
        """An election among ``voters`` (the servers of the ring); returns its epoch."""
        self.running = self._tried = max(self.epoch, self._tried) + 1
        self.voters = tuple(voters)
        self.votes, self.refusals = set(), {}
        self.next_try = now + self.retry
        return self.running

    def vote(self, voter: str, epoch: int, granted: bool, why: str, seen_epoch: int = 0) -> None:
        if self.running != epoch or voter not in self.voters:
            return
        self.epoch = max(self.epoch, seen_epoch)
        if granted:
            self.votes.add(voter)
        else:
            self.refusals[voter] = why

    def won(self) -> bool:
        return self.running is not None and bool(self.voters) and len(self.votes) >= majority(len(self.voters))

    def lost(self) -> bool:
        """Too many refusals for a majority to be reached."""
        return (self.running is not None
                and len(self.voters) - len(self.refusals) < majority(len(self.voters)))

    def end(self) -> None:
        self.running = None

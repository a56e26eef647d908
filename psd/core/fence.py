"""Whether a server may still serve the ranges it leads: its membership lease.

The scheduler hands a server's ranges to their replicas only after declaring it dead,
and it declares a death only with a quorum of *voters* (the scheduler itself and the
ring's servers) on its side that have heard nothing of that server for the dead time
(``psd.cluster.liveness``). A server therefore serves a replicated range only while,
within its lease (shorter than the dead time), it has

* had a heartbeat answered by the scheduler, which then cannot declare it dead before
  the lease is over; or
* had peer pings answered by enough servers that, with itself, they are a quorum of the
  voters: any quorum the scheduler could gather would include one of them, and none of
  them reports silence while it answers.

So a server cut off from everyone stops serving before its ranges can be moved, and a
scheduler cut off from every server (which can then declare nothing) does not stop the
servers, which vouch for each other. A range with a single owner has no replica to
promote: it moves without its owner only when the scheduler gives the owner up and
restores the range from a checkpoint, ``restore_unavailable_after`` after declaring it
dead; so its owner serves it while the lease held that long ago (``ServerCore.serving_alone``;
always, with restores off). Lease times are the *send* times of the answered
messages, so the lease is never longer than what the other side promised.
"""
from __future__ import annotations

import logging
from typing import Iterable

from psd.config import ClusterConfig

log = logging.getLogger("psd.server")


def quorum(servers: int) -> int:
    """A strict majority of the voters: ``servers`` plus the scheduler."""
    return (servers + 1) // 2 + 1


def restore_after(config: ClusterConfig) -> float:
    """Seconds after a server's death its ranges with no other copy may be restored from
    a checkpoint, so how much longer its lease runs for them (0: never restored)."""
    return config.restore_unavailable_after if config.checkpoint_dir else 0


class Fence:
    def __init__(self, lease: float) -> None:
        self.lease = lease
        #: send time of the newest heartbeat the scheduler answered as from a live member
        self.scheduler_at: float | None = None
        #: per peer server: send time of the newest peer ping it answered
        self.peer_at: dict[str, float] = {}
        #: per peer server: when we last heard from it at all (its pings, its answers)
        self.heard_at: dict[str, float] = {}
        self._serving = True  # (only for logging the changes)

    def confirmed(self, sent_at: float) -> None:
        if self.scheduler_at is None or sent_at > self.scheduler_at:
            self.scheduler_at = sent_at

    def peer_answered(self, peer: str, sent_at: float, now: float) -> None:
        if sent_at > self.peer_at.get(peer, float("-inf")):
            self.peer_at[peer] = sent_at
        self.heard(peer, now)

    def heard(self, peer: str, now: float) -> None:
        self.heard_at[peer] = now

    def forget(self, keep: Iterable[str]) -> None:
        """Drop what is known of servers no longer in the ring."""
        keep = set(keep)
        for d in (self.peer_at, self.heard_at):
            for peer in [p for p in d if p not in keep]:
                del d[peer]

    def ok(self, me: str, servers: tuple[str, ...], now: float, note: bool = True) -> bool:
        """Whether the lease holds at ``now`` for ranges shared with other servers
        (``note``: log a change; off for the single-owner check at an earlier time)."""
        if self.scheduler_at is not None and now - self.scheduler_at < self.lease:
            return self._note(True, "the scheduler confirms its membership", note)
        vouch = 1 + sum(1 for p in servers if p != me and now - self.peer_at.get(p, float("-inf")) < self.lease)
        n = len(servers) if me in servers else len(servers) + 1
        if vouch >= quorum(n):
            return self._note(True, f"{vouch - 1} other server(s) answer it", note)
        return self._note(False, "neither the scheduler nor a majority of the servers answered it within "
                                 f"{self.lease:.2f} s", note)

    def _note(self, serving: bool, why: str, note: bool = True) -> bool:
        if note and serving != self._serving:
            self._serving = serving
            if serving:
                log.info("serving again: %s", why)
            else:
                log.warning("serving nothing it shares with other servers: %s (it may have been declared "
                            "dead meanwhile)", why)
        return serving

    def report(self, servers: Iterable[str], me: str, now: float) -> dict[str, float]:
        """For the scheduler: seconds since we last heard from each peer (a large number
        for one never heard from), sent with every heartbeat."""
        out = {}
        for p in servers:
            if p != me:
                at = self.heard_at.get(p)
                out[p] = round(now - at, 3) if at is not None else 1e9
        return out

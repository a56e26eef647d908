"""Heartbeats from a thread, for processes whose event loop may be busy for a while.

The sync client runs its event loop only inside API calls, so a worker computing for a
minute between calls would look dead; a server applying one huge first-touch push can
hold its loop for longer than the failure timeout. This thread keeps them alive with its
own socket; it shares nothing with the event loop but a clock value (an int). It proves
the process is alive and reachable, not that its loop is responsive: the loop's own
heartbeats carry the statistics and learn whether the node was declared dead.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import zmq

from psd.cluster.schedulers import after, named_leader
from psd.codec import Message, decode, encode
from psd.transport.security import Curve, apply_client


class HeartbeatThread(threading.Thread):
    def __init__(self, scheduler: str, node_id: str, interval: float, clock: Callable[[], int], *,
                 security: Curve | None, schedulers: list[str] | None = None, lost_after: float | None = None):
        """``schedulers``: every scheduler's address (a list its owner may update): with
        more than one, the thread moves on its own to the one that leads, named by a
        standby's refusal, or to the next one after ``lost_after`` seconds without an
        answer (the owner may also set ``scheduler``)."""
        super().__init__(name=f"psd-heartbeat-{node_id}", daemon=True)
        self.scheduler, self.node_id, self.interval, self.clock = scheduler, node_id, interval, clock
        self.security = security
        self.schedulers = schedulers if schedulers is not None else [scheduler]
        self.lost_after = lost_after if lost_after is not None else 8 * interval
        self._halt = threading.Event()

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.security is not None:
            apply_client(sock, self.security)
        at = self.scheduler
        sock.connect(at)
        answered = time.monotonic()
        try:
            while not self._halt.wait(self.interval):
                if self.scheduler != at:  # another scheduler leads now
                    sock.disconnect(at)
                    at = self.scheduler
                    sock.connect(at)
                    answered = time.monotonic()
                sock.send_multipart(encode(Message("heartbeat", sender=self.node_id, clock=self.clock(),
                                                      meta={"link": False})))
                while sock.poll(0):  # replies only say "known", or name the leader
                    answered = time.monotonic()
                    self._read(sock.recv_multipart())
                if len(self.schedulers) > 1 and time.monotonic() - answered > self.lost_after:
                    self.scheduler = after(self.schedulers, at)
        finally:
            sock.close(0)

    def _read(self, frames: list) -> None:
        try:
            reply = decode(frames)
        except Exception:
            return
        if reply.op == "error" and reply.meta.get("code") == "not_leader":
            leader = named_leader(reply.meta.get("data"), self.schedulers)
            if leader is not None:
                self.scheduler = leader

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2 * self.interval + 1)

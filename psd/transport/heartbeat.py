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
from typing import Callable

import zmq

from psd.codec import Message, encode
from psd.transport.security import Curve, apply_client


class HeartbeatThread(threading.Thread):
    def __init__(self, scheduler: str, node_id: str, interval: float, clock: Callable[[], int], *,
                 security: Curve | None):
        super().__init__(name=f"psd-heartbeat-{node_id}", daemon=True)
        self.scheduler, self.node_id, self.interval, self.clock = scheduler, node_id, interval, clock
        self.security = security
        self._halt = threading.Event()

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.security is not None:
            apply_client(sock, self.security)
        sock.connect(self.scheduler)
        try:
            while not self._halt.wait(self.interval):
                sock.send_multipart(encode(Message("heartbeat", sender=self.node_id, clock=self.clock(),
                                                      meta={"link": False})))
                while sock.poll(0):
                    sock.recv_multipart()  # replies only say "known"; drop them
        finally:
            sock.close(0)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2 * self.interval + 1)

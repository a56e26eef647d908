"""One-shot blocking requests to the scheduler, for the CLI and LocalCluster.

These do not register as a worker, so asking for status never changes what it reports.
"""
from __future__ import annotations

import itertools
import time

import zmq

from psd.cluster.schedulers import after, named_leader
from psd.codec import SCHEDULER_REPLY_HEADER_BYTES, Limits, Message, decode, encode
from psd.config import ClusterConfig
from psd.errors import NotLeaderError, PsdTimeoutError
from psd.transport import security
from psd.transport.rpc import raise_if_error
from psd.transport.security import refusal_error
from psd.transport.sockets import connect_watched

_ids = itertools.count(1)


def call(scheduler: str, op: str, timeout: float = 5.0, *, config: ClusterConfig | None = None, **meta) -> dict:
    """Send ``op`` with ``meta`` and return the reply's meta. Keys come from ``config``
    (``security``, ``keys``: the command line puts PSD_KEYS and --keys there), else
    from a LocalCluster of this process for this address. A refused handshake raises
    AuthError at once. With standby schedulers configured, the one that leads answers:
    a standby's refusal names it, and a scheduler that does not answer is passed over."""
    config = config or ClusterConfig()
    order = list(dict.fromkeys([scheduler, config.scheduler, *config.standby])) if config.standby else [scheduler]
    if len(order) == 1:
        return _call(scheduler, op, timeout, config, meta)
    deadline = time.monotonic() + timeout
    current = order[0]
    while True:
        left = deadline - time.monotonic()
        try:
            return _call(current, op, max(0.05, min(left, max(1.0, timeout / len(order)))), config, meta)
        except NotLeaderError as e:
            leader = named_leader(e.data, order)
            current = leader if leader is not None and leader != current else after(order, current)
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
        except PsdTimeoutError:
            current = after(order, current)
            if time.monotonic() >= deadline:
                raise


def _call(scheduler: str, op: str, timeout: float, config: ClusterConfig, meta: dict) -> dict:
    curve = security.for_client(scheduler, security=config.security, keys=config.keys)
    sock, watch = connect_watched(zmq.Context.instance(), scheduler, security=curve)
    try:
        msg = Message(op, id=next(_ids), sender="admin", meta=meta)
        sock.send_multipart(encode(msg))
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(watch.monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PsdTimeoutError(f"no answer from the scheduler at {scheduler} within {timeout} s; "
                                      f"is it running? (pass --scheduler ADDR)")
            ready = dict(poller.poll(int(left * 1000) + 1))
            if sock in ready:
                # copied, not zmq.Frame: pyzmq checks for signals while freeing a Frame and
                # only prints what a handler raises there, so a Ctrl-C would be lost
                reply = decode(sock.recv_multipart(), Limits(max_header_bytes=SCHEDULER_REPLY_HEADER_BYTES))
                return raise_if_error(reply).meta
            if watch.monitor in ready:
                reason = watch.poll(0)
                if reason:
                    raise refusal_error(reason, scheduler, curve)
    finally:
        try:
            watch.close()
        finally:
            sock.close(0)

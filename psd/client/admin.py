"""One-shot blocking requests to the scheduler, for the CLI and LocalCluster.

These do not register as a worker, so asking for status never changes what it reports.
"""
from __future__ import annotations

import itertools

import zmq

from psd.codec import Message, decode, encode
from psd.errors import PsdTimeoutError
from psd.transport.rpc import raise_if_error

_ids = itertools.count(1)


def call(scheduler: str, op: str, timeout: float = 5.0, **meta) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(scheduler)
        msg = Message(op, id=next(_ids), sender="admin", meta=meta)
        sock.send_multipart(encode(msg))
        if not sock.poll(int(timeout * 1000)):
            raise PsdTimeoutError(f"no answer from the scheduler at {scheduler} within {timeout} s; "
                                  f"is it running? (pass --scheduler ADDR)")
        return raise_if_error(decode(sock.recv_multipart(copy=False))).meta
    finally:
        sock.close(0)

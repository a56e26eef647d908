"""Bytes counted at every stage of sending and receiving (docs/protocol.md, "Traffic").

For each message a node sends or receives, four sizes, each after one more stage:

* ``raw``: the payload arrays (keys and values) as the request means them, keys named
  by a signature counted as if sent whole;
* ``after_kc``: the arrays that travel, after key caching (a cached key list is gone);
* ``after_zstd``: the payload frames after compression (the same when it is off, or a
  frame did not shrink);
* ``wire``: what crossed the socket: the payload frames and the msgpack header.

``raw - after_kc`` is what key caching saved; ``after_kc - after_zstd`` what zstd saved.
"""
from __future__ import annotations

STAGES = ("raw", "after_kc", "after_zstd", "wire")


def _nbytes(frame) -> int:
    return len(frame) if isinstance(frame, (bytes, bytearray)) else memoryview(getattr(frame, "buffer", frame)).nbytes


def _elided(msg) -> int:
    """Bytes of the keys a message names by signature (``meta.kc`` = [sig, count, ...])."""
    kc = msg.meta.get("kc")
    if type(kc) is list and len(kc) == 4 and type(kc[1]) is int and kc[1] > 0:
        return 8 * kc[1]
    return 0


class Traffic:
    """Per direction (``sent``, ``received``): bytes after each stage, and messages."""

    __slots__ = ("sent", "received")

    def __init__(self):
        self.sent = dict.fromkeys((*STAGES, "messages", "kc_messages"), 0)
        self.received = dict.fromkeys((*STAGES, "messages", "kc_messages"), 0)

    @staticmethod
    def _add(into: dict, msg, frames: list) -> None:
        arrays = 0
        for a in msg.arrays:
            arrays += a.nbytes
        payload = 0
        for f in frames[1:]:
            payload += _nbytes(f)
        elided = _elided(msg) if msg.meta else 0
        into["raw"] += arrays + elided
        into["after_kc"] += arrays
        into["after_zstd"] += payload
        into["wire"] += payload + _nbytes(frames[0])
        into["messages"] += 1
        if elided:
            into["kc_messages"] += 1

    def count_sent(self, msg, frames: list) -> None:
        self._add(self.sent, msg, frames)

    def count_received(self, msg, frames: list) -> None:
        self._add(self.received, msg, frames)

    @staticmethod
    def _add_plain(into: dict, frames: list) -> None:
        """Frames of a message with no key caching nor compression (a fast path's)."""
        payload = 0
        for f in frames[1:]:
            payload += _nbytes(f)
        into["raw"] += payload
        into["after_kc"] += payload
        into["after_zstd"] += payload
        into["wire"] += payload + _nbytes(frames[0])
        into["messages"] += 1

    def count_sent_plain(self, frames: list) -> None:
        self._add_plain(self.sent, frames)

    def count_received_plain(self, frames: list) -> None:
        self._add_plain(self.received, frames)

    def snapshot(self) -> dict:
        return {"sent": dict(self.sent), "received": dict(self.received)}


def total(snapshots) -> dict:
    """The sum of several ``Traffic.snapshot()``s (a node's sockets)."""
    out = {"sent": dict.fromkeys((*STAGES, "messages", "kc_messages"), 0),
           "received": dict.fromkeys((*STAGES, "messages", "kc_messages"), 0)}
    for snap in snapshots:
        for side in ("sent", "received"):
            for k, v in snap.get(side, {}).items():
                out[side][k] = out[side].get(k, 0) + v
    return out


def saved(side: dict) -> float:
    """The fraction of the raw bytes that did not cross the wire as payload (0 when none)."""
    raw = side.get("raw", 0)
    return 1.0 - side.get("after_zstd", 0) / raw if raw else 0.0

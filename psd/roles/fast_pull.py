"""The small pull, answered in one function.

A pull of a few keys is the request whose round trip a worker waits on, and on a
small request the general path's many small steps (decode to a Message, cut into
Rows, group by owners, build a reply Message, encode it) cost several times the
lookup itself. This path takes only the common case: a well-formed, uncompressed
pull of fewer than ``SMALL_PULL`` sorted unique keys, all in one range this server
leads, next in its sender's stream, with the server serving (its lease holds). For it, it makes the same checks as the general path
and answers with the same bytes. Anything else, including every request that would
fail, goes to the general path (``Server.on_pull``), which names the problem.
``tests/test_fast_pull.py`` sends the same requests down both paths and compares
the replies byte for byte.
"""
from __future__ import annotations

import time
from bisect import bisect_right
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from psd.cluster.ranges import is_sorted_unique
from psd.core.stream import SEQ, parse
from psd.codec.frames import ZSTD_MIN_BYTES
from psd.codec.message import PROTOCOL_VERSION, Message
from psd.keyroles import ROLE_WORKER
from psd.schema import SMALL_PULL
from psd.transport.rpc import peer_of

if TYPE_CHECKING:
    from psd.roles.server import Server

_unpackb = msgpack.unpackb
_packb = msgpack.packb


#: ``"op": "pull"`` as msgpack packs it (short strings are fixstr): a header without it
#: is not a pull that psd's encoder packed, and goes the general way unread here
_PULL = b"\xa2op\xa4pull"


def _buf(frame):
    return getattr(frame, "buffer", frame)


class FastPull:
    """``__call__(route, frames)`` answers a small pull and returns True, or returns
    False having changed nothing (the general path then takes the request)."""

    def __init__(self, server: "Server"):
        self.server = server  # the daemon: its core decides, its data socket answers

    def __call__(self, route, frames) -> bool:
        request = self._check(frames)
        if request is None:
            return False
        self._answer(route, *request)
        return True

    def _check(self, frames) -> tuple | None:
        """The request's parts if it is ours to answer, else None; changes nothing."""
        if len(frames) != 2:
            return None
        head = _buf(frames[0])
        if len(head) > 512 or _PULL not in bytes(head):
            return None  # not a pull (a push of one frame, say): not unpacked twice; a pull's header is small
        srv = self.server.core
        limits = srv.config.limits
        body = _buf(frames[1])
        if limits.max_frames < 2 or len(head) > limits.max_header_bytes or \
                len(head) + len(body) > limits.max_message_bytes:
            return None
        try:
            h = _unpackb(head, raw=False, strict_map_key=True)
        except Exception:
            return None
        if type(h) is not dict or h.get("op") != "pull" or h.get("v") != PROTOCOL_VERSION:
            return None
        g = h.get
        msg_id, sender, name, clock, meta, descs = g("id"), g("src"), g("tbl"), g("clk"), g("meta"), g("frames")
        if not (type(msg_id) is int and type(sender) is str and type(name) is str and type(g("ring")) is int
                and type(clock) is int and type(meta) is dict and type(descs) is list and len(descs) == 1):
            return None
        if meta and (len(meta) > 2 or "rid" not in meta or (len(meta) == 2 and SEQ not in meta)):
            return None  # spans, or anything we do not expect
        n, desc = len(body) // 8, descs[0]
        if not (type(desc) is list and len(desc) == 4 and desc[0] == "<u8" and desc[2] == "none"
                and type(desc[1]) is list and len(desc[1]) == 1 and type(desc[1][0]) is int and desc[1][0] == n
                and type(desc[3]) is int and desc[3] == 8 * n == len(body) and 0 < n < SMALL_PULL
                and n <= limits.max_keys):
            return None
        table = srv.tables.get(name)
        if table is None:
            return None
        if srv.secure:  # a worker key limited to other namespaces: the general path refuses it
            peer = peer_of(frames[0])
            if peer is not None and peer.startswith(ROLE_WORKER) and not srv.may_touch(peer, name):
                return None
        size = n * table.width * table.dtype.itemsize
        if size > limits.max_message_bytes or (size >= ZSTD_MIN_BYTES and srv.config.compression != "none"):
            return None  # (the general path compresses a reply this big)
        keys = np.frombuffer(body, dtype=np.uint64)
        if not is_sorted_unique(keys):
            return None
        if srv.restoring:
            return None  # (the general path refuses keys being restored)
        ring = srv.ring  # (the reply names the ring of when it is sent, as on_pull's does)
        begins = ring.inner_begin_list
        if begins is None or not ring.ranges:
            return None
        i = bisect_right(begins, int(keys[0]))
        if i != bisect_right(begins, int(keys[-1])) or ring.owners[i][0] != srv.node_id:
            return None
        now = time.monotonic()
        if len(ring.owners[i]) > 1 and not srv.serving(now):
            return None
        try:
            sq = parse(meta.get(SEQ))
        except Exception:
            return None
        if sq is not None and srv.streams.admit(sender, sq) is not None:
            return None  # out of order: the general path refuses it, naming where to resume
        return table, keys, msg_id, sender, name, clock, now

    def _answer(self, route, table, keys: np.ndarray, msg_id: int, sender: str, name: str, clock: int,
                now: float) -> None:
        """As Server.on_pull from its counter on: ask the gate, answer now or when it
        releases the pull; an error is counted, timed and answered as Server.handle
        and the transport do it."""
        daemon = self.server
        srv = daemon.core
        started = time.perf_counter()
        srv.counters["pull"] += 1
        data, n = daemon.data, keys.size

        def run() -> None:
            srv.counters["keys_pulled"] += n
            values = table.pull(keys)
            reply = _packb({"v": PROTOCOL_VERSION, "op": "ok", "id": msg_id, "src": srv.node_id, "tbl": name,
                            "ring": srv.ring.version, "clk": clock, "meta": {},
                            "frames": [[values.dtype.str, [n, table.width], "none", values.nbytes]]},
                           use_bin_type=True)
            data.send_raw(route, [reply, values])

        try:
            srv.policy(table).pull((sender, msg_id), sender, clock, run, now)
        except Exception as err:
            srv.counters["errors"] += 1
            daemon.timings.observe(("pull", getattr(err, "code", "internal")), time.perf_counter() - started)
            data.answer_error(route, Message("pull", id=msg_id, sender=sender, table=name, ring=srv.ring.version,
                                             clock=clock), err)
            return
        daemon.timings.observe(("pull", "ok"), time.perf_counter() - started)

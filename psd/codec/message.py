"""The in-memory form of one psd message."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROTOCOL_VERSION = 1

#: dtypes allowed in payload frames (little-endian wire names -> numpy dtype); float16
#: and int8 carry quantized values only (``meta.flt``, psd.filters), never a table's;
#: uint16 (bfloat16 bits), uint8 (a row bitmap) and uint32 (row numbers) only filtered
#: pull answers (``meta.pr``, psd.filters.pull)
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name) for name in ("<u8", "<f4", "<f8", "<i4", "<i8", "<f2", "|i1", "<u2", "|u1", "<u4")
}


@dataclass(slots=True)
class Message:
    """One request or reply: a small header plus raw numpy payloads.

    ``meta`` holds the op-specific header fields (documented per op in
    docs/protocol.md); ``arrays`` travel as their own frames, never inside the header.
    """

    op: str
    id: int = 0
    sender: str = ""
    table: str | None = None
    ring: int = 0
    clock: int = 0
    meta: dict = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)
    #: not on the wire: who the receiving transport says sent it, when the socket was
    #: asked to tell (the User-Id the ZAP handler gave the sender's connection, e.g.
    #: "server" or "client:NAME"); None when not read, or on a plaintext connection
    peer: str | None = field(default=None, compare=False, repr=False)
    #: not on the wire: how to compress this message's payload frames, overriding the
    #: socket's setting (a table's ``zstd`` filter stage): ``(level, min_bytes)``, level 0 = off
    zstd: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    def reply(self, op: str = "ok", *, sender: str = "", meta: dict | None = None,
              arrays: list[np.ndarray] | None = None, ring: int = 0) -> "Message":
        """A reply names its request by id and table. (Fields by position, in their order
        above: one reply per request, and keywords make the call twice as dear.)"""
        return Message(op, self.id, sender, self.table, ring, self.clock, meta or {}, arrays or [])

    def __repr__(self) -> str:
        arrays = ", ".join(describe_array(a) for a in self.arrays)
        return (f"Message({self.op} id={self.id} from={self.sender or '-'} "
                f"table={self.table} ring=v{self.ring} meta={self.meta} [{arrays}])")


def describe_array(a: np.ndarray) -> str:
    """Arrays in logs are shapes and sizes, never contents."""
    n = a.nbytes
    size = f"{n} B" if n < 1024 else f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"
    shape = "x".join(str(d) for d in a.shape)
    return f"<{a.dtype.name}[{shape}] {size}>"


def error_reply(request: Message, err, sender: str) -> Message:
    """The ``error`` reply to ``request`` for a PsdError: its code, message and data (the
    data's scalars only; a peer gets nothing it cannot decode)."""
    data = err.data if all(isinstance(v, (int, str, float, bool)) for v in err.data.values()) else {}
    return request.reply("error", sender=sender, meta={"code": err.code, "message": err.message, "data": data})

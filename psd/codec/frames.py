"""Encoding and decoding of the multipart wire format.

Frame 0 is a msgpack map (the header); frames 1..n are raw little-endian array
buffers described by ``header["frames"]`` as ``[dtype, shape, codec, raw_nbytes]``.
Every size is checked against :class:`Limits` before anything is allocated, and a
message either decodes completely or raises; there is no partial result.

A frame of codec ``shm`` holds a reference to bytes in a shared-memory segment instead
of the bytes: the transport decides which frames go that way (``encode``'s ``place``)
and resolves references it receives (``decode``'s ``shm``); this module only carries
them (psd/transport/shm.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import msgpack
import numpy as np
import zstandard

from psd.codec.message import DTYPES, PROTOCOL_VERSION, Message
from psd.errors import MessageTooLargeError, ProtocolError, ShmError

CODECS = ("none", "zstd", "shm")
#: payloads smaller than this are never compressed: zstd would cost more than it saves
ZSTD_MIN_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds enforced on every received message."""

    max_header_bytes: int = 64 * 1024
    max_frames: int = 16
    max_message_bytes: int = 1 << 30
    max_keys: int = 1 << 27


#: the header a client accepts in a reply from the scheduler it connected to: status
#: replies grow with the jobs, tables and servers of a long-lived cluster (daemons keep
#: the small default for what they receive from anyone)
SCHEDULER_REPLY_HEADER_BYTES = 16 << 20

_compressor = zstandard.ZstdCompressor(level=1)
_decompressor = zstandard.ZstdDecompressor()
_by_level: dict[int, zstandard.ZstdCompressor] = {1: _compressor}


def _compressor_at(level: int) -> zstandard.ZstdCompressor:
    c = _by_level.get(level)
    if c is None:
        c = _by_level[level] = zstandard.ZstdCompressor(level=level)
    return c


def encode(msg: Message, compression: str = "none", place=None) -> list:
    """Return the frames of ``msg``; arrays are passed as buffers (zero-copy).
    ``msg.zstd`` (a table's zstd stage: level, minimum bytes) overrides ``compression``.
    ``place(buffer)``: the reference frame of a copy of ``buffer`` in shared memory, or
    None to send it inline (tried before compression: shared memory moves no bytes)."""
    compressor, min_bytes = _compressor, ZSTD_MIN_BYTES
    if msg.zstd is not None:
        level, min_bytes = msg.zstd
        compression = "zstd" if level > 0 else "none"
        if level > 0:
            compressor = _compressor_at(level)
    descs = []
    payloads = []
    for a in msg.arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        name = a.dtype.str
        if name not in DTYPES:
            raise ProtocolError(f"cannot send arrays of dtype {a.dtype}; use one of "
                                f"uint64, float32, float64, int32, int64 (float16, int8, uint16, uint8, uint32: "
                                f"filtered values)")
        # memoryview.cast refuses views with a zero in the shape, e.g. (0, width)
        buf = memoryview(a).cast("B") if a.nbytes else b""
        codec = "none"
        ref = place(buf) if place is not None and a.nbytes else None
        if ref is not None:
            buf, codec = ref, "shm"
        elif compression == "zstd" and a.nbytes >= min_bytes and a.nbytes:
            packed = compressor.compress(buf)
            if len(packed) < a.nbytes:
                buf, codec = packed, "zstd"
        descs.append([name, list(a.shape), codec, a.nbytes])
        payloads.append(buf)
    header = {
        "v": PROTOCOL_VERSION, "op": msg.op, "id": msg.id, "src": msg.sender,
        "tbl": msg.table, "ring": msg.ring, "clk": msg.clock, "meta": msg.meta,
        "frames": descs,
    }
    return [msgpack.packb(header, use_bin_type=True), *payloads]


def _buffer(frame) -> memoryview:
    """zmq.Frame (copy=False), bytes or memoryview -> memoryview of its bytes."""
    buf = getattr(frame, "buffer", frame)
    return memoryview(buf)


def _expect(header: dict, key: str, types, what: str):
    value = header.get(key)
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        raise ProtocolError(f"header field {key!r} must be {what}, got {type(value).__name__}")
    return value


def decode(frames: Sequence, limits: Limits = Limits(), shm=None) -> Message:
    """Parse frames into a Message or raise ProtocolError naming what is wrong. ``shm(ref,
    nbytes)``: the bytes a ``shm`` frame's reference names, as a uint8 array (None: this
    connection agreed on no shared memory, and such a frame is refused with ShmError)."""
    if not frames:
        raise ProtocolError("empty message: expected a msgpack header frame")
    if len(frames) > limits.max_frames:
        raise MessageTooLargeError(f"message has {len(frames)} frames, limit is {limits.max_frames}")
    bufs = [_buffer(f) for f in frames]
    total = 0
    for b in bufs:
        total += b.nbytes
    if total > limits.max_message_bytes:
        raise MessageTooLargeError(f"message is {total} bytes, limit is {limits.max_message_bytes} "
                                   f"(raise limits.max_message_bytes or send smaller batches)")
    head = bufs[0]
    if head.nbytes > limits.max_header_bytes:
        raise MessageTooLargeError(f"header is {head.nbytes} bytes, limit is {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types on garbage
        raise ProtocolError(f"header frame is not valid msgpack ({type(e).__name__})") from None
    if type(header) is dict:
        # the well-formed case in one test of exact types (bool is not int here); any
        # doubt goes through the field-by-field checks below, which name the problem
        g = header.get
        op, msg_id, sender, table, ring, clock, meta, descs = (
            g("op"), g("id"), g("src"), g("tbl"), g("ring"), g("clk"), g("meta"), g("frames"))
        if (g("v") == PROTOCOL_VERSION and type(op) is str and type(msg_id) is int and type(sender) is str
                and (table is None or type(table) is str) and type(ring) is int and type(clock) is int
                and type(meta) is dict and type(descs) is list and len(descs) == len(bufs) - 1):
            if not descs:
                return Message(op, msg_id, sender, table, ring, clock, meta, [])
            if len(descs) == 1:
                d = descs[0]
                if type(d) is list and len(d) == 4 and type(d[3]) is int and 0 <= d[3] <= limits.max_message_bytes:
                    return Message(op, msg_id, sender, table, ring, clock, meta,
                                   [_decode_array(0, d, bufs[1], limits, shm)])
    return _decode_checked(header, bufs, limits, shm)


def _decode_checked(header, bufs: list, limits: Limits, shm=None) -> Message:
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} not supported (this node speaks {PROTOCOL_VERSION})")
    op = _expect(header, "op", str, "a string")
    msg_id = _expect(header, "id", int, "an integer")
    sender = _expect(header, "src", str, "a string")
    table = header.get("tbl")
    if table is not None and not isinstance(table, str):
        raise ProtocolError("header field 'tbl' must be a string or nil")
    ring = _expect(header, "ring", int, "an integer")
    clock = _expect(header, "clk", int, "an integer")
    meta = _expect(header, "meta", dict, "a map")
    descs = _expect(header, "frames", list, "a list")
    if len(descs) != len(bufs) - 1:
        raise ProtocolError(f"header describes {len(descs)} payload frames but {len(bufs) - 1} arrived")
    declared = sum(_declared_bytes(d) for d in descs)
    if declared > limits.max_message_bytes:  # compressed frames may expand: bound the sum too
        raise MessageTooLargeError(f"frames declare {declared} bytes in all, over the limits "
                                   f"(max_message_bytes {limits.max_message_bytes})")
    arrays = [_decode_array(i, d, b, limits, shm) for i, (d, b) in enumerate(zip(descs, bufs[1:]))]
    return Message(op=op, id=msg_id, sender=sender, table=table, ring=ring, clock=clock,
                   meta=meta, arrays=arrays)


def _declared_bytes(desc) -> int:
    """A descriptor's raw size if it is well formed (malformed ones fail in _decode_array)."""
    if isinstance(desc, list) and len(desc) == 4 and isinstance(desc[3], int) and not isinstance(desc[3], bool):
        return max(0, desc[3])
    return 0


def _decode_array(i: int, desc, buf: memoryview, limits: Limits, shm=None) -> np.ndarray:
    if type(desc) is list and len(desc) == 4 and desc[2] == "none" and type(desc[1]) is list:
        # the common case (uncompressed, well formed) with the fewest checks that cover it
        name, shape, _, nbytes = desc
        dtype = DTYPES.get(name) if type(name) is str else None
        if (dtype is not None and 1 <= len(shape) <= 2 and type(shape[0]) is int
                and 0 <= shape[0] <= min(limits.max_keys, limits.max_message_bytes)):
            width = shape[1] if len(shape) == 2 else 1
            if (type(width) is int and 0 <= width <= limits.max_message_bytes
                    and nbytes == shape[0] * width * dtype.itemsize == buf.nbytes <= limits.max_message_bytes):
                return np.ndarray(shape, dtype, buf)  # (np.frombuffer(...).reshape: 5x slower)
    if not (isinstance(desc, list) and len(desc) == 4):
        raise ProtocolError(f"frame {i + 1}: descriptor must be [dtype, shape, codec, nbytes]")
    name, shape, codec, nbytes = desc
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"frame {i + 1}: dtype {name!r} not allowed; use one of {sorted(DTYPES)}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError(f"frame {i + 1}: shape must be 1 or 2 non-negative integers, got {shape!r}")
    count = 1
    for d in shape:
        count *= d
    expected = count * dtype.itemsize
    if shape[0] > limits.max_keys:
        raise MessageTooLargeError(f"frame {i + 1}: declared shape {shape} has more rows than limits.max_keys "
                                   f"{limits.max_keys}; send fewer keys at a time")
    if expected > limits.max_message_bytes or any(
            d > limits.max_message_bytes for d in shape):  # (0, 2**62) is empty but unshapeable
        raise MessageTooLargeError(f"frame {i + 1}: declared shape {shape} is over limits.max_message_bytes "
                                   f"{limits.max_message_bytes}")
    if nbytes != expected:
        raise ProtocolError(f"frame {i + 1}: declared {nbytes} bytes but shape {shape} of {name} needs {expected}")
    if codec == "none":
        data = buf
    elif codec == "zstd":
        try:
            # decompress() trusts a content size in the zstd frame over max_output_size:
            # check it first so a forged size cannot make us allocate it
            declared = zstandard.frame_content_size(buf)
            if declared not in (-1, expected):
                raise ProtocolError(f"frame {i + 1}: zstd payload holds {declared} bytes but shape "
                                    f"{shape} of {name} needs {expected}")
            data = _decompressor.decompress(buf, max_output_size=expected)
        except zstandard.ZstdError as e:
            raise ProtocolError(f"frame {i + 1}: zstd payload is corrupt ({e})") from None
    elif codec == "shm":
        if shm is None:
            raise ShmError(f"frame {i + 1} is in shared memory, but this connection agreed on none; "
                           f"send it inline")
        data = shm(buf, expected)
        if len(data) != expected:
            raise ProtocolError(f"frame {i + 1}: shared memory gave {len(data)} bytes, {expected} declared")
        return data.view(dtype).reshape(shape)  # (a view: its life says when the segment is free)
    else:
        raise ProtocolError(f"frame {i + 1}: unknown codec {codec!r}; use one of {CODECS}")
    if len(data) != expected:
        raise ProtocolError(f"frame {i + 1}: {len(data)} bytes arrived but shape {shape} of {name} needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)

"""Message <-> ZeroMQ frames. Knows bytes, not sockets or roles."""
from psd.codec.message import Message, PROTOCOL_VERSION, DTYPES
from psd.codec.frames import SCHEDULER_REPLY_HEADER_BYTES, Limits, encode, decode

__all__ = ["Message", "PROTOCOL_VERSION", "DTYPES", "Limits", "encode", "decode",
           "SCHEDULER_REPLY_HEADER_BYTES"]

"""Message <-> ZeroMQ frames. Knows bytes, not sockets or roles."""
from psd.codec.message import Message, PROTOCOL_VERSION, DTYPES
from psd.codec.frames import Limits, encode, decode

__all__ = ["Message", "PROTOCOL_VERSION", "DTYPES", "Limits", "encode", "decode"]

"""Key-list signatures, for key caching (docs/protocol.md, "Key caching").

A worker that pulls and pushes the same sorted key list every iteration sends the list
once; after that it names it by its signature: the 64-bit XXH3 hash of the keys' bytes
(little-endian uint64, so the length is part of what is hashed), sent with the list's
length and its first and last key, which the receiver checks against the list it holds.
XXH3 reads about 30 GB/s (100,000 keys: 25 us), so a sender can afford to sign every
list it sends.
"""
from __future__ import annotations

import numpy as np
import xxhash

#: key lists shorter than this are never cached: their bytes are few, and a pull of so
#: few keys takes the server's fast path (psd.roles.fast_pull), which wants its keys whole
KC_MIN_KEYS = 64

_digest = xxhash.xxh3_64_intdigest


def signature(keys: np.ndarray) -> int:
    """The signature of a sorted uint64 key list: an integer in [0, 2**64)."""
    if keys.dtype != np.uint64 or keys.ndim != 1:
        raise TypeError(f"a key-list signature is of 1-d uint64 keys, not {keys.dtype}{list(keys.shape)}")
    if keys.dtype.byteorder == ">":
        keys = keys.astype("<u8")
    return _digest(np.ascontiguousarray(keys))


def key_ref(keys: np.ndarray) -> list[int]:
    """``meta.kc`` of a request that names ``keys`` by signature: [sig, count, first, last]."""
    return [signature(keys), int(keys.size), int(keys[0]), int(keys[-1])]

"""Stable, vectorised 64-bit hashing for the apps: no Python loop per item, same answer
in every process and every run (never Python's salted ``hash()``).

- :func:`mix64`: the SplitMix64 finalizer, a bijection on uint64 that scatters
  consecutive ids over the whole key space (used to spread dense ids over the ring).
- :func:`token_ids`: 64-bit ids of the whitespace-separated tokens of a byte buffer,
  by a polynomial hash over prefix sums (so every token is hashed at once), finished
  with :func:`mix64`.
- :class:`MultiplyShift`: ``depth`` independent hash functions uint64 -> [0, width),
  Thorup's vector multiply-shift (strongly universal into 32 bits for a 64-bit key
  seen as two 32-bit halves), then Lemire's multiply-shift range reduction.

All arithmetic is uint64 arrays, which wrap modulo 2**64 by design.
"""
from __future__ import annotations

import numpy as np

_U64 = np.uint64
_M32 = _U64(0xFFFFFFFF)
_S32 = _U64(32)

#: bytes that separate tokens (Python's bytes.split() set)
WHITESPACE = b" \t\n\r\x0b\x0c"
_IS_WS = np.zeros(256, dtype=bool)
_IS_WS[list(WHITESPACE)] = True


def mix64(x) -> np.ndarray:
    """SplitMix64's finalizer applied elementwise: a bijection of uint64 with good avalanche."""
    z = np.array(x, dtype=np.uint64, copy=True)
    z += _U64(0x9E3779B97F4A7C15)
    z ^= z >> _U64(30)
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


# -- tokens ------------------------------------------------------------------------
_BASE = 0x100000001B3 * 2 + 1          # an odd multiplier: invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_POW_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and BASE**-i modulo 2**64 for i < n (at least; cached, grown in powers of
    two: the largest size asked for so far is kept and serves every smaller buffer)."""
    for size, cached in _POW_CACHE.items():
        if size >= n:
            return cached
    size = 1 << max(16, (n - 1).bit_length())
    up = np.full(size, _BASE, dtype=np.uint64)
    up[0] = 1
    down = np.full(size, _BASE_INV, dtype=np.uint64)
    down[0] = 1
    cached = (np.cumprod(up, dtype=np.uint64), np.cumprod(down, dtype=np.uint64))
    _POW_CACHE.clear()  # keep one size: these are 16 bytes per buffer byte
    _POW_CACHE[size] = cached
    return cached


def token_ids(buf) -> np.ndarray:
    """The 64-bit id of every whitespace-separated token of ``buf`` (bytes-like), in order.

    A token's id depends only on its bytes: ``mix64(poly(token) ^ len * K)`` with
    ``poly(t) = sum_j (t_j + 1) * BASE**j mod 2**64``, computed for all tokens at once
    from one prefix sum over the buffer (``P[end] - P[start]``, rebased by
    ``BASE**-start``). About ten numpy passes over the bytes; no Python loop.
    """
    b = np.frombuffer(buf, dtype=np.uint8)
    n = b.size
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    word = ~_IS_WS[b]
    edges = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    if starts.size == 0:
        return np.empty(0, dtype=np.uint64)
    up, down = _powers(n + 1)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum((b.astype(np.uint64) + _U64(1)) * up[:n], dtype=np.uint64, out=prefix[1:])
    h = (prefix[ends] - prefix[starts]) * down[starts]
    h ^= (ends - starts).astype(np.uint64) * _U64(0x9E3779B97F4A7C15)
    return mix64(h)


def token_id(token: str | bytes) -> int:
    """The id :func:`token_ids` gives one token (for looking a word up)."""
    raw = token.encode() if isinstance(token, str) else bytes(token)
    ids = token_ids(raw)
    if ids.size != 1:
        raise ValueError(f"{token!r} is not exactly one whitespace-free token")
    return int(ids[0])


# -- the count-min hash family ------------------------------------------------------
class MultiplyShift:
    """``depth`` independent hash functions from uint64 keys to columns [0, width).

    Row i: ``h_i(x) = ((a_i * lo(x) + c_i * hi(x) + b_i) mod 2**64) >> 32`` with
    ``a_i, c_i, b_i`` drawn from a generator seeded by ``seed`` (Thorup, "High speed
    hashing for integers and strings", vector multiply-shift: strongly universal into
    32 bits), then ``column = (h_i(x) * width) >> 32`` (a multiply-shift range
    reduction: every column gets floor or ceil of 2**32 / width of the hash values, so
    two distinct keys collide in a row with probability at most about 1/width).
    The parameters depend only on (depth, seed): the same seed gives the same
    functions in every process.
    """

    def __init__(self, depth: int, width: int, seed: int = 0):
        if not 1 <= int(depth) <= 64:
            raise ValueError(f"depth must be in [1, 64], got {depth}")
        if not 1 <= int(width) < 1 << 32:
            raise ValueError(f"width must be in [1, 2**32), got {width}")
        self.depth, self.width, self.seed = int(depth), int(width), int(seed)
        rng = np.random.default_rng([int(seed), 0xC0FFEE])
        params = rng.integers(0, 1 << 64, size=(3, self.depth), dtype=np.uint64, endpoint=False)
        self.a, self.c, self.b = (p.reshape(-1, 1) for p in params)

    def hashes(self, x) -> np.ndarray:
        """The 32-bit hash of every key under every row: uint64 array of shape (depth, n)."""
        x = np.asarray(x, dtype=np.uint64).reshape(1, -1)
        h = self.a * (x & _M32)
        if x.size and int(x.max()) >> 32:
            h += self.c * (x >> _S32)
        h += self.b
        h >>= _S32
        return h

    def columns(self, x) -> np.ndarray:
        """Column of every key in every row: int64 array of shape (depth, n), in [0, width)."""
        h = self.hashes(x)
        h *= _U64(self.width)
        h >>= _S32
        return h.view(np.int64)

    def flat_columns(self, x) -> np.ndarray:
        """``row * width + column`` for every (row, key): int64 (depth, n), for one bincount
        over a dense (depth * width) counter array."""
        cols = self.columns(x)
        cols += (np.arange(self.depth, dtype=np.int64) * self.width).reshape(-1, 1)
        return cols


#: the public API: how apps (and their users) turn items into 64-bit ids and columns
__all__ = ["mix64", "token_ids", "token_id", "MultiplyShift", "WHITESPACE"]

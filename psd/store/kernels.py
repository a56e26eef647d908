"""The store's compiled loops: a hash index on uint64 keys and the updaters fused into it.

numpy cannot express "find this key's row, or give it one, then fold the gradient into
the row" in one pass: done in array steps it visits every key several times and builds
temporaries. These loops do it once per key, in machine code, compiled by numba.

Every function here lives in this one module on purpose: numba's disk cache is keyed by
the source file of the function it compiled, so an edit to a helper in another file
would leave callers cached with the old helper inlined.

The index is an open-addressing table (linear probing) of uint32 entries, a power of two
of them. An entry is 0 when empty, else ``fp << bits | (row + 1)``: the row of the key in
the row arrays and ``32 - bits`` bits of the key's hash (a fingerprint), so a probe
reads the row's key only when the fingerprints agree. Keys live in the rows, not in the
index: any uint64, 0 and 2**64-1 included, is a key; emptiness is the entry's. A row is
its key then its values (``hashrows``): the read that confirms a key brings in the line
its update writes, so a stored key costs two cache misses, its index slot and its row.

The index doubles before it is 60% full (``hashrows.MAX_LOAD``): an absent key's linear
probe walks about (1 + 1/(1-load)**2)/2 slots, 3.6 at 0.6 against 8.5 at the 0.745 that
5e7 keys reached under the 0.75 of before, where new keys went in at a third of the rate.
The index is aligned to cache lines (16 entries each), so a probe that runs off its line
is seen at once and the next line fetched with the rest of the block (``_fetch_block``).

A batch is taken in blocks of ``BLOCK`` keys. First the whole block's memory is asked
for: every key's index slot is prefetched, then each slot whose fingerprint matches
(those lines have arrived by then) has its row prefetched, so the cache
misses of a hundred keys overlap instead of following one another (2-3x faster than
prefetching one key ahead at a time, measured at 1e7 keys). Then each key is found (or
inserted) for real, and the updater folds the gradient rows into the rows found (a loop
per updater: one loop choosing the updater at every key ran 2-3x slower); a push folds
them in once every row of the request is known, each row asked for ``AHEAD`` rows
before it is used (``hash_push`` says why). Each key is looked up once and its row
written once. Loops over rows already known (``rows_push``, ``rows_pull``: the rows a
request found before, kept by ``hashrows`` and checked against the keys each holds)
prefetch a fixed distance ahead instead: their reads do not depend on one another.

No function here allocates storage or decides growth: the caller (``hashrows``) passes a
``limit`` of rows, and an insert loop stops at it and returns where it stopped.
"""
from __future__ import annotations

import logging
import os

import numpy as np
from llvmlite import ir
from numba import from_dtype, njit, types as T
from numba.core import cgutils
from numba.core.caching import NullCache
from numba.extending import intrinsic, overload

log = logging.getLogger("psd.store")

#: updater kinds (``updaters.Updater.fused`` names them)
SUM, ASSIGN, SGD, PROX, PROX_AGG, ADAGRAD, FTRL = range(7)
KINDS = {"sum": SUM, "assign": ASSIGN, "sgd": SGD, "prox": PROX, "prox_agg": PROX_AGG, "adagrad": ADAGRAD,
         "ftrl": FTRL}
#: dtypes the store compiles for (psd.schema.DTYPE_NAMES)
DTYPES = (np.float32, np.float64, np.int32, np.int64)
#: at most this many index slots (entries are 32 bits: row + 1 and a fingerprint >= 1 bit)
MAX_BITS = 31

#: keys per block: the keys whose memory is fetched together (128 and 256 measured alike)
BLOCK = 128

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)
_B32 = np.uint64(32)
#: index entries per 64-byte cache line (the index is allocated aligned to lines)
LINE = 16
_LOW = np.uint64(LINE - 1)


def _cached(fn):
    """``njit(cache=True)``, or plain ``njit`` when numba finds no writable cache folder
    (read-only install, no home): then each process compiles at ``warm``, slower to start
    but the same code."""
    try:
        return njit(cache=True)(fn)
    except RuntimeError as e:  # numba: "cannot cache function ...: no locator available"
        log.debug("psd.store: no disk cache for %s (%s)", fn.__name__, e)
        return njit(fn)


def _prefetch_at(context, builder, aryty, arg, at, past=0):
    """llvm.prefetch of the element of array ``arg`` (type ``aryty``) at indices ``at``,
    or of the byte ``past`` bytes after it."""
    ary = context.make_array(aryty)(context, builder, arg)
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, at, wraparound=False)
    i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    byte = builder.bitcast(ptr, i8p)
    if past:
        byte = builder.gep(byte, [ir.IntType(64)(past)])
    builder.call(fn, [byte, i32(0), i32(3), i32(1)])  # read, keep, data
    return context.get_dummy_value()


@intrinsic
def _prefetch(typingctx, arr, i):
    """Ask the CPU to start loading ``arr[i]`` into the cache (llvm.prefetch)."""
    def codegen(context, builder, sig, args):
        return _prefetch_at(context, builder, sig.args[0], args[0], [args[1]])
    return T.void(arr, i), codegen


@intrinsic
def _prefetch_values(typingctx, row_keys, r):
    """``_prefetch`` of the first value of row r, 8 bytes past its key ``row_keys[r]``:
    the key's line unless the row straddles two (12-byte rows do at 2 rows in 16)."""
    def codegen(context, builder, sig, args):
        return _prefetch_at(context, builder, sig.args[0], args[0], [args[1]], past=8)
    return T.void(row_keys, r), codegen


@intrinsic
def _prefetch_row(typingctx, arr, r):
    """``_prefetch`` of ``arr[r, 0]``: the start of a row of a 2-D array of any layout."""
    def codegen(context, builder, sig, args):
        return _prefetch_at(context, builder, sig.args[0], args[0], [args[1], context.get_constant(T.intp, 0)])
    return T.void(arr, r), codegen


@njit(inline="always")
def _mix(k):
    """A 64-bit finaliser (MurmurHash3's): neighbouring keys land far apart."""
    k ^= k >> _S33
    k *= _M1
    k ^= k >> _S33
    k *= _M2
    k ^= k >> _S33
    return k


@njit(inline="always")
def _home(h, mask):
    """The slot where the probe of hash h starts."""
    return h & mask


@njit(inline="always")
def _probe(index, bits, row_keys, k):
    """(slot, row, entry-to-store): the key's row, or -1 and the empty slot it would take."""
    h = _mix(k)
    mask = (_ONE << bits) - _ONE
    return _probe_from(index, bits, mask, row_keys, k, h, _home(h, mask))


@njit(inline="always")
def _probe_from(index, bits, mask, row_keys, k, h, s):
    """``_probe`` of key k (hash h) resumed at slot s, a slot of its probe run: every
    slot before it holds another key's entry (``_fetch_block`` walked them)."""
    fp = h >> (_B32 + bits)
    while True:
        e = np.uint64(index[s])
        if e == _ZERO:
            return s, -1, fp << bits
        if (e >> bits) == fp:
            r = np.int64(e & mask) - 1
            if row_keys[r] == k:
                return s, r, fp << bits
        s = (s + _ONE) & mask


# -- the updaters, one row at a time (mirroring the numpy rules in updaters.py exactly) --
# v[r, :w] is the value row; s[r, c1:c1+w] (and s2[r, c2:c2+w]) the updater's state. In the
# hash rows all of them are one data row (c1 = w, c2 = 2w); a run has an array per field.
@njit(inline="always")
def _sign(x):
    if x > 0.0:
        return 1.0
    if x < 0.0:
        return -1.0
    return x  # 0, -0 or nan, as np.sign


@njit(inline="always")
def _soft(x, t):
    m = abs(x) - t
    if not m > 0.0 and m == m:  # np.maximum(m, 0) keeps a nan
        m = 0.0
    return _sign(x) * m


@njit(inline="always")
def _sum(v, r, g, i, w):
    for c in range(w):
        v[r, c] += g[i, c]


@njit(inline="always")
def _assign(v, r, g, i, w):
    for c in range(w):
        v[r, c] = g[i, c]


@njit(inline="always")
def _sgd(v, r, g, i, w, lr):
    for c in range(w):
        v[r, c] -= lr * g[i, c]  # lr in the table's dtype, as numpy multiplies a float and an array


@njit(inline="always")
def _prox(v, r, g, i, w, lr, t, d):
    for c in range(w):
        u = np.float64(v[r, c]) - np.float64(lr * g[i, c])
        v[r, c] = _soft(u, t) / d


@njit(inline="always")
def _prox_agg(v, r, s, c1, g, i, pf):
    lr, l1, l2, eps = pf[0], pf[1], pf[2], pf[3]
    a0 = np.float64(s[r, c1]) + np.float64(g[i, 0])
    a1 = np.float64(s[r, c1 + 1]) + np.float64(g[i, 1])
    a2 = np.float64(s[r, c1 + 2]) + 1.0
    parts = np.float64(g[i, 2])
    parts = np.rint(parts) if np.isfinite(parts) and parts >= 1.0 else 1.0
    if a2 >= parts:
        h = a1 if a1 > 0.0 or a1 != a1 else 0.0
        a = (h + eps) / lr
        v[r, 0] = _soft(a * np.float64(v[r, 0]) - a0, l1) / (a + l2)
        v[r, 1] = a0
        v[r, 2] = a1
        a0, a1, a2 = 0.0, 0.0, 0.0
    s[r, c1] = a0
    s[r, c1 + 1] = a1
    s[r, c1 + 2] = a2


@njit(inline="always")
def _adagrad(v, r, s, c1, g, i, w, pf):
    lr, eps, l1 = pf[0], pf[1], pf[2]
    for c in range(w):
        gg = np.float64(g[i, c])
        g2 = np.float64(s[r, c1 + c]) + gg * gg
        s[r, c1 + c] = g2
        step = lr / (np.sqrt(g2) + eps)
        u = np.float64(v[r, c]) - step * gg
        v[r, c] = _soft(u, step * l1) if l1 != 0.0 else u


@njit(inline="always")
def _ftrl(v, r, s, c1, s2, c2, g, i, w, pf):
    alpha, beta, l1, l2 = pf[0], pf[1], pf[2], pf[3]
    for c in range(w):
        gg = np.float64(g[i, c])
        wv = np.float64(v[r, c])
        n0 = np.float64(s2[r, c2 + c])
        n1 = n0 + gg * gg
        sigma = (np.sqrt(n1) - np.sqrt(n0)) / alpha
        z = np.float64(s[r, c1 + c]) + (gg - sigma * wv)
        s[r, c1 + c] = z
        s2[r, c2 + c] = n1
        denom = (beta + np.sqrt(n1)) / alpha + l2
        v[r, c] = -_soft(z, l1) / denom if denom > 0.0 else 0.0


@njit
def _apply_rows(kind, v, s, c1, s2, c2, rows, g, g0, count, w, pt, pf):
    """Fold gradient rows g0 .. g0+count-1 into rows rows[0 .. count-1]."""
    if kind == SUM:
        for j in range(count):
            _sum(v, rows[j], g, g0 + j, w)
    elif kind == ASSIGN:
        for j in range(count):
            _assign(v, rows[j], g, g0 + j, w)
    else:
        _float_rows(kind, v, s, c1, s2, c2, rows, g, g0, count, w, pt, pf)


def _float_rows(kind, v, s, c1, s2, c2, rows, g, g0, count, w, pt, pf):
    """The updaters of float tables (integer tables refuse them: not compiled for those)."""


@overload(_float_rows)
def _float_rows_impl(kind, v, s, c1, s2, c2, rows, g, g0, count, w, pt, pf):
    if isinstance(v.dtype, T.Integer):
        return lambda kind, v, s, c1, s2, c2, rows, g, g0, count, w, pt, pf: None

    def impl(kind, v, s, c1, s2, c2, rows, g, g0, count, w, pt, pf):
        if kind == SGD:
            for j in range(count):
                _sgd(v, rows[j], g, g0 + j, w, pt[0])
        elif kind == PROX:
            lr, t, d = pt[0], pf[0] * pf[1], 1.0 + pf[0] * pf[2]
            for j in range(count):
                _prox(v, rows[j], g, g0 + j, w, lr, t, d)
        elif kind == PROX_AGG:
            for j in range(count):
                _prox_agg(v, rows[j], s, c1, g, g0 + j, pf)
        elif kind == ADAGRAD:
            for j in range(count):
                _adagrad(v, rows[j], s, c1, g, g0 + j, w, pf)
        elif kind == FTRL:
            for j in range(count):
                _ftrl(v, rows[j], s, c1, s2, c2, g, g0 + j, w, pf)
    return impl


#: rows ahead of the one being used whose memory a by-rows loop asks for (a plain loop
#: with one prefetch 32 rows ahead ran 1.8x a block-prefetched one, 2x no prefetch)
AHEAD = 32
_STEP = 16


# -- the hash rows: index + row arrays (row_keys, data = values then state, per row) --------
@njit(inline="always")
def _fetch_block(index, b, mask, row_keys, keys, i0, count, hs, at):
    """Start loading what keys i0 .. i0+count-1 will touch, in two passes so that the
    cache misses of the whole block overlap: first every key's index slot, then (those
    lines arrived meanwhile) the slot whose fingerprint matches, and that row (its key
    leads the row's values: one line). Leaves each key's hash in ``hs[j]`` and in ``at[j]`` the slot where its probe
    resumes (``_probe_from``): the first empty or fingerprint-matching one, or the first
    slot of the next cache line when the walk runs off its line (that line is prefetched
    then, so that crossing costs no stall of its own). Inserts of
    earlier keys of the block may fill an empty slot meanwhile; the resumed probe then
    just goes on from there."""
    for j in range(count):
        h = _mix(keys[i0 + j])
        hs[j] = h
        _prefetch(index, _home(h, mask))
    for j in range(count):
        h = hs[j]
        s = _home(h, mask)
        fp = h >> (_B32 + b)
        while True:
            e = np.uint64(index[s])
            if e == _ZERO:
                break
            if (e >> b) == fp:
                r = np.int64(e & mask) - 1
                _prefetch(row_keys, r)
                _prefetch_values(row_keys, r)
                break
            s = (s + _ONE) & mask
            if s & _LOW == _ZERO:  # off the line: fetch the next one, resume there later
                _prefetch(index, s)
                break
        at[j] = s


@njit(inline="always")
def _row(index, b, mask, limit, row_keys, n, k, h, s0):
    """(row of key k, rows): k (hash h, probe resumed at s0) is inserted if absent; row
    -1 if that would pass ``limit``."""
    s, r, tag = _probe_from(index, b, mask, row_keys, k, h, s0)
    if r < 0:
        if n >= limit:
            return -1, n
        r = n
        n += 1
        row_keys[r] = k
        index[s] = np.uint32(tag | np.uint64(r + 1))
    return r, n


@njit
def _apply_ahead(kind, data, rows, grad, lo, hi, w, pt, pf):
    """Fold gradient rows lo .. hi-1 into data rows ``rows[lo:hi]``, asking for each
    row's memory ``AHEAD`` rows before it is used."""
    for j in range(lo, min(lo + AHEAD, hi)):
        _prefetch_row(data, rows[j])
    for i0 in range(lo, hi, _STEP):
        for j in range(i0 + AHEAD, min(i0 + AHEAD + _STEP, hi)):
            _prefetch_row(data, rows[j])
        _apply_rows(kind, data, data, w, data, 2 * w, rows[i0:], grad, i0, min(_STEP, hi - i0), w, pt, pf)


@_cached
def hash_push(index, bits, limit, row_keys, data, n, keys, grad, start, kind, w, pt, pf, rows):
    """Find or insert each key from ``start`` on and fold its gradient row into its data
    row. Stops before an insert that would pass ``limit`` rows; returns (rows, next i).
    Leaves every key's row in ``rows`` (as long as ``keys``; ``HashRows`` remembers them
    for a request of the same keys).

    Each block's keys are found with no store on the way, then its absent keys are
    inserted in key order (for stored keys, 1.4x faster than a probe loop that may
    insert: at 1e7 keys, 4.4-5.1 ms against 6.5-7.7 for 1e5 keys); a block that follows
    a block of mostly new keys is probed and inserted in one loop instead (a stream of
    new keys: the extra pass cost 15%). Then the block's gradients are folded in, while
    the rows its lookups read (key and values on one line) are still in the nearest
    caches; folded in after the whole push, they had to come from memory again."""
    b = np.uint64(bits)
    mask = (_ONE << b) - _ONE
    hs, at = np.empty(BLOCK, np.uint64), np.empty(BLOCK, np.uint64)
    m = keys.size
    inline = False  # the last block was mostly new keys: insert as each is found
    for i in range(start, m, BLOCK):
        end = min(i + BLOCK, m)
        _fetch_block(index, b, mask, row_keys, keys, i, end - i, hs, at)
        absent = 0
        if inline:
            for j in range(i, end):
                n0 = n
                r, n = _row(index, b, mask, limit, row_keys, n, keys[j], hs[j - i], at[j - i])
                if r < 0:
                    _apply_rows(kind, data, data, w, data, 2 * w, rows[i:], grad, i, j - i, w, pt, pf)
                    return n, j
                rows[j] = r
                absent += n - n0
        else:
            for j in range(i, end):
                s, r, _ = _probe_from(index, b, mask, row_keys, keys[j], hs[j - i], at[j - i])
                rows[j] = r
                if r < 0:
                    at[j - i] = s  # the empty slot it found: the insert starts there
                    absent += 1
            if absent:  # (an earlier insert may fill the slot a probe stopped at: it walks on)
                for j in range(i, end):
                    if rows[j] < 0:
                        r, n = _row(index, b, mask, limit, row_keys, n, keys[j], hs[j - i], at[j - i])
                        if r < 0:  # (the rows of keys i .. j-1 are known: fold them in)
                            _apply_rows(kind, data, data, w, data, 2 * w, rows[i:], grad, i, j - i, w, pt, pf)
                            return n, j
                        rows[j] = r
        _apply_rows(kind, data, data, w, data, 2 * w, rows[i:], grad, i, end - i, w, pt, pf)
        inline = 2 * absent > end - i
    return n, m


@_cached
def hash_upsert(index, bits, limit, row_keys, n, keys, start, rows):
    """Rows of ``keys`` (inserting absent ones) into ``rows``; stops at ``limit`` like
    ``hash_push``. For installs and updaters without a fused loop."""
    b = np.uint64(bits)
    mask = (_ONE << b) - _ONE
    m = keys.size
    hs, at = np.empty(BLOCK, np.uint64), np.empty(BLOCK, np.uint64)
    for i0 in range(start, m, BLOCK):
        end = min(i0 + BLOCK, m)
        _fetch_block(index, b, mask, row_keys, keys, i0, end - i0, hs, at)
        for i in range(i0, end):
            r, n = _row(index, b, mask, limit, row_keys, n, keys[i], hs[i - i0], at[i - i0])
            if r < 0:
                return n, i
            rows[i] = r
    return n, m


@_cached
def hash_pull(index, bits, row_keys, data, keys, out, w, rows):
    """Gather the value rows of ``keys`` into ``out`` (zeros where absent); returns how
    many were present. ``rows``: as in ``hash_push`` (-1 for an absent key)."""
    b = np.uint64(bits)
    mask = (_ONE << b) - _ONE
    found, m = 0, keys.size
    keep = rows.size >= m
    hs, at = np.empty(BLOCK, np.uint64), np.empty(BLOCK, np.uint64)
    for i0 in range(0, m, BLOCK):
        end = min(i0 + BLOCK, m)
        got = rows[i0:] if keep else rows
        _fetch_block(index, b, mask, row_keys, keys, i0, end - i0, hs, at)
        for i in range(i0, end):
            _, r, _ = _probe_from(index, b, mask, row_keys, keys[i], hs[i - i0], at[i - i0])
            got[i - i0] = r
            if r >= 0:
                found += 1
                for c in range(w):
                    out[i, c] = data[r, c]
            else:
                for c in range(w):
                    out[i, c] = 0
    return found


@_cached
def hash_find(index, bits, row_keys, keys, rows):
    """Row of each key, or -1; returns how many were present."""
    b = np.uint64(bits)
    mask = (_ONE << b) - _ONE
    found, m = 0, keys.size
    hs, at = np.empty(BLOCK, np.uint64), np.empty(BLOCK, np.uint64)
    for i0 in range(0, m, BLOCK):
        end = min(i0 + BLOCK, m)
        _fetch_block(index, b, mask, row_keys, keys, i0, end - i0, hs, at)
        for i in range(i0, end):
            _, r, _ = _probe_from(index, b, mask, row_keys, keys[i], hs[i - i0], at[i - i0])
            rows[i] = r
            found += r >= 0
    return found


@_cached
def hash_find_span(index, bits, row_keys, lo, count, rows):
    """Rows stored for keys lo .. lo+count-1, probed one by one, into ``rows`` (at
    least as long as what is found); returns how many."""
    b = np.uint64(bits)
    found = 0
    for i in range(count):
        _, r, _ = _probe(index, b, row_keys, lo + np.uint64(i))
        if r >= 0:
            rows[found] = r
            found += 1
    return found


@_cached
def rehash(index, bits, row_keys, n):
    """Fill an empty index with rows 0 .. n-1 (keys known unique: no compare)."""
    b = np.uint64(bits)
    mask = (_ONE << b) - _ONE
    for r in range(n):
        h = _mix(row_keys[r])
        s = _home(h, mask)
        while index[s] != 0:
            s = (s + _ONE) & mask
        index[s] = np.uint32(((h >> (_B32 + b)) << b) | np.uint64(r + 1))


@_cached
def scan_range(row_keys, n, lo, last, rows):
    """Rows whose key is in [lo, last], in row order, into ``rows``; returns how many."""
    found = 0
    span = last - lo
    for r in range(n):
        if row_keys[r] - lo <= span:  # wraps around below lo
            rows[found] = r
            found += 1
    return found


@_cached
def count_range(row_keys, n, lo, last):
    found = 0
    span = last - lo
    for r in range(n):
        found += row_keys[r] - lo <= span
    return found


@_cached
def in_ranges(row_keys, n, firsts, lasts, keep):
    """keep[r] = whether row r's key lies in one of the sorted disjoint [first, last]."""
    for r in range(n):
        k = row_keys[r]
        j = np.searchsorted(firsts, k, side="right") - 1
        keep[r] = j >= 0 and k <= lasts[j]


# -- checking pushed values ----------------------------------------------------------------
@_cached
def first_nonfinite(v):
    """The first row of the 2-d float array ``v`` holding a NaN or an infinity, or -1.
    ``x - x`` is 0 for a finite x and NaN otherwise; a block of rows is tested as a whole
    (a loop the compiler vectorises) and searched row by row only when it holds one."""
    m, w = v.shape
    flat = v.reshape(-1)
    step = 4096 * w
    for a in range(0, m * w, step):
        b = min(a + step, m * w)
        bad = False
        for i in range(a, b):
            x = flat[i]
            bad |= (x - x) != 0.0
        if bad:
            for i in range(a, b):
                x = flat[i]
                if (x - x) != 0.0:
                    return i // w
    return -1


@_cached
def rows_push(data, rows, grad, kind, w, pt, pf):
    """Fold gradient row j into hash data row ``rows[j]``: a push whose rows were found
    before (positions kept with a cached key list), so no key is looked up."""
    _apply_ahead(kind, data, rows, grad, 0, rows.size, w, pt, pf)


@_cached
def rows_pull(index, bits, row_keys, data, rows, keys, out, w):
    """Gather the value rows ``rows`` into ``out``: a pull of the keys the last push or
    pull found (``HashRows`` remembers their rows), so no stored key is looked up. Each
    row is checked against its key (on the line the gather reads anyway): returns False
    at the first row that holds another key (``out`` is then unfinished; the caller
    looks the keys up). A row -1 (the key was absent) is looked up again: zeros if it
    still is."""
    b = np.uint64(bits)
    m = rows.size
    for j in range(min(AHEAD, m)):
        _prefetch(row_keys, max(rows[j], 0))
        _prefetch_values(row_keys, max(rows[j], 0))
    for i in range(m):
        if i + AHEAD < m:
            _prefetch(row_keys, max(rows[i + AHEAD], 0))
            _prefetch_values(row_keys, max(rows[i + AHEAD], 0))
        r = rows[i]
        if r < 0:
            _, r, _ = _probe(index, b, row_keys, keys[i])
        elif row_keys[r] != keys[i]:
            return False
        if r >= 0:
            for c in range(w):
                out[i, c] = data[r, c]
        else:
            for c in range(w):
                out[i, c] = 0
    return True


@_cached
def rows_match(row_keys, rows, keys):
    """Whether row ``rows[i]`` holds key ``keys[i]`` for every i (no row -1): a push of
    the keys the last request found checks them all before it writes any row."""
    m = rows.size
    for j in range(min(AHEAD, m)):
        _prefetch(row_keys, max(rows[j], 0))
    for i in range(m):
        if i + AHEAD < m:
            _prefetch(row_keys, max(rows[i + AHEAD], 0))
        r = rows[i]
        if r < 0 or row_keys[r] != keys[i]:
            return False
    return True


# -- dense runs: one array per field, rows addressed by offset ---------------------------------
@_cached
def run_push(v, s1, s2, rows, off, grad, kind, w, pt, pf):
    """Fold ``grad`` into rows ``rows`` of a run, or into off, off+1, ... if ``rows`` is
    empty. A run keeps each field in an array of its own (values lent as views)."""
    m, c0 = grad.shape[0], np.int64(0)  # (a literal 0 would type _apply_rows anew)
    if rows.size:
        _apply_rows(kind, v, s1, c0, s2, c0, rows, grad, 0, m, w, pt, pf)
        return
    block = np.empty(BLOCK, np.int64)
    for i in range(0, m, BLOCK):
        count = min(BLOCK, m - i)
        for j in range(count):
            block[j] = off + i + j
        _apply_rows(kind, v, s1, c0, s2, c0, block, grad, i, count, w, pt, pf)


# -- bounded tables: the led rows' LRU list, deletes, admission (psd/store/bounded.py) ----------
#: ``prev`` of a row outside the led rows' list (a replicated row, or past ``n``)
UNLISTED = -2
_GOLD = np.uint64(0x9E3779B97F4A7C15)


@njit(inline="always")
def _in_led(k, firsts, lasts):
    """Whether key k lies in one of the sorted disjoint [first, last] ranges."""
    j = np.searchsorted(firsts, k, side="right") - 1
    return j >= 0 and k <= lasts[j]


@njit(inline="always")
def _unlink(r, prev, nxt, meta):
    p, q = prev[r], nxt[r]
    if p >= 0:
        nxt[p] = q
    else:
        meta[0] = q
    if q >= 0:
        prev[q] = p
    else:
        meta[1] = p
    prev[r] = UNLISTED
    meta[2] -= 1


@njit(inline="always")
def _touch(r, lead, stamp, now, prev, nxt, meta):
    """Stamp row r; a led row becomes the list's most recent (its tail)."""
    stamp[r] = now
    if prev[r] != UNLISTED:
        if meta[1] == r:
            return
        _unlink(r, prev, nxt, meta)
    elif not lead:
        return
    t = meta[1]
    prev[r] = t
    nxt[r] = -1
    if t >= 0:
        nxt[t] = r
    else:
        meta[0] = r
    meta[1] = r
    meta[2] += 1


@_cached
def hash_touch(index, bits, row_keys, keys, prev, nxt, stamp, meta, now, firsts, lasts):
    """After a push into a bounded table: stamp the row of each (stored) key with
    ``now`` and move the rows of led keys to the tail of the LRU list, in key order.
    A second lookup pass rather than a variant of ``hash_push`` per dtype and updater:
    it costs a pass over lines the push just brought into the cache, and compiles once."""
    b = np.uint64(bits)
    mask = (_ONE << b) - _ONE
    m = keys.size
    hs, at = np.empty(BLOCK, np.uint64), np.empty(BLOCK, np.uint64)
    for i0 in range(0, m, BLOCK):
        end = min(i0 + BLOCK, m)
        _fetch_block(index, b, mask, row_keys, keys, i0, end - i0, hs, at)
        for i in range(i0, end):
            _, r, _ = _probe_from(index, b, mask, row_keys, keys[i], hs[i - i0], at[i - i0])
            if r >= 0:
                _touch(r, _in_led(keys[i], firsts, lasts), stamp, now, prev, nxt, meta)


@njit(inline="always")
def _unslot(index, b, mask, row_keys, s):
    """Empty index slot s and shift later entries of its probe run back (no tombstones:
    a lookup still stops at the first empty slot)."""
    index[s] = 0
    i, j = s, (s + _ONE) & mask
    while True:
        e = np.uint64(index[j])
        if e == _ZERO:
            return
        home = _home(_mix(row_keys[np.int64(e & mask) - 1]), mask)
        if ((j - home) & mask) >= ((j - i) & mask):
            index[i] = index[j]
            index[j] = 0
            i = j
        j = (j + _ONE) & mask


@_cached
def hash_delete(index, bits, row_keys, data, n, keys, prev, nxt, stamp, meta):
    """Delete the rows of ``keys`` (absent ones are skipped): the index entry by backward
    shift, the row by moving the last row into its place (rows stay 0 .. n-1, and rows
    past n zero). ``data``: the whole rows, keys included, as bytes (a uint8 view: one
    compile for every dtype). Returns (rows, how many deleted)."""
    b = np.uint64(bits)
    mask = (_ONE << b) - _ONE
    deleted = 0
    m, cols = keys.size, data.shape[1]
    for i in range(m):
        if i % BLOCK == 0:  # the block's index slots, and those of the rows likely to move
            for j in range(i, min(i + BLOCK, m)):
                _prefetch(index, _home(_mix(keys[j]), mask))
                last = n - 1 - (j - i)
                if last >= 0:
                    _prefetch(index, _home(_mix(row_keys[last]), mask))
        s, r, _ = _probe(index, b, row_keys, keys[i])
        if r < 0:
            continue
        if prev[r] != UNLISTED:
            _unlink(r, prev, nxt, meta)
        _unslot(index, b, mask, row_keys, s)
        last = n - 1
        if r != last:
            k = row_keys[last]
            s2, _, _ = _probe(index, b, row_keys, k)
            index[s2] = np.uint32(((np.uint64(index[s2]) >> b) << b) | np.uint64(r + 1))
            row_keys[r] = k
            for c in range(cols):  # (a loop: a slice assignment compiles 3x longer)
                data[r, c] = data[last, c]
            stamp[r] = stamp[last]
            p = prev[last]
            prev[r] = p
            if p != UNLISTED:
                q = nxt[last]
                nxt[r] = q
                if p >= 0:
                    nxt[p] = r
                else:
                    meta[0] = r
                if q >= 0:
                    prev[q] = r
                else:
                    meta[1] = r
        row_keys[last] = 0
        for c in range(cols):
            data[last, c] = 0
        stamp[last] = 0
        prev[last] = UNLISTED
        nxt[last] = 0
        n -= 1
        deleted += 1
    return n, deleted


@_cached
def lru_victims(row_keys, nxt, stamp, meta, cap, before, out):
    """Keys of the led rows to evict, oldest first, into ``out``: while more than ``cap``
    rows are listed or the oldest was stamped before ``before``. Returns how many."""
    r, taken, listed = meta[0], 0, meta[2]
    while r >= 0 and (listed - taken > cap or stamp[r] < before):
        out[taken] = row_keys[r]
        taken += 1
        r = nxt[r]
    return taken


@_cached
def cms_admit(sketch, keys, rows, threshold, keep):
    """Count each absent key (rows[i] < 0) in the count-min sketch (conservative update:
    only the counters at the minimum rise) and keep it if its count reached
    ``threshold``; present keys are kept uncounted. Returns how many were counted."""
    d, wbits = sketch.shape[0], np.uint64(sketch.shape[1] - 1)
    counted = 0
    for i in range(keys.size):
        if rows[i] >= 0:
            keep[i] = True
            continue
        k = keys[i]
        low = np.uint32(0xFFFFFFFF)
        for j in range(d):
            c = sketch[j, _mix(k + np.uint64(j + 1) * _GOLD) & wbits]
            if c < low:
                low = c
        if low < np.uint32(0xFFFFFFFF):
            low += np.uint32(1)
        for j in range(d):
            h = _mix(k + np.uint64(j + 1) * _GOLD) & wbits
            if sketch[j, h] < low:
                sketch[j, h] = low
        keep[i] = low >= threshold
        counted += 1
    return counted


# -- compiling ahead of requests ----------------------------------------------------------
def _signatures() -> dict:
    """Every signature the store calls, per kernel. Inputs that arrive from the wire may
    be read-only buffers: typed read-only here, so writable arrays match as well. The
    hash rows' keys and data are strided views of one array of rows (``hashrows``): the
    keys typed unaligned (a row of a 4-byte dtype may start at 4 bytes past a multiple
    of 8), so aligned and contiguous arrays match as well."""
    u32, u64, i64, f64, i32 = T.uint32, T.uint64, T.int64, T.float64, T.int32
    a1 = lambda t, ro=False: T.Array(t, 1, "C", readonly=ro)  # noqa: E731
    a2 = lambda t, ro=False: T.Array(t, 2, "C", readonly=ro)  # noqa: E731
    rk = T.Array(u64, 1, "A", aligned=False)  # the row keys
    rd = lambda t: T.Array(t, 2, "A")  # noqa: E731  (the rows' data)
    b = T.boolean
    sigs: dict[str, list] = {
        "hash_upsert": [T.UniTuple(i64, 2)(a1(u32), i64, i64, rk, i64, a1(u64, True), i64, a1(i64))],
        "hash_find": [i64(a1(u32), i64, rk, a1(u64, True), a1(i64))],
        "hash_find_span": [i64(a1(u32), i64, rk, u64, i64, a1(i64))],
        "rehash": [T.none(a1(u32), i64, rk, i64)],
        "scan_range": [i64(rk, i64, u64, u64, a1(i64))],
        "count_range": [i64(rk, i64, u64, u64)],
        "in_ranges": [T.none(rk, i64, a1(u64), a1(u64), a1(b))],
        "hash_push": [], "hash_pull": [], "run_push": [], "rows_push": [], "rows_pull": [],
        "rows_match": [b(rk, a1(i64, True), a1(u64, True))],
        "first_nonfinite": [i64(a2(from_dtype(np.dtype(dt)), True)) for dt in (np.float32, np.float64)],
        "lru_victims": [i64(rk, a1(i32), a1(i64), a1(i64), i64, i64, a1(u64))],
        "cms_admit": [i64(a2(u32), a1(u64, True), a1(i64), i64, a1(b))],
        "hash_touch": [T.none(a1(u32), i64, rk, a1(u64, True), a1(i32), a1(i32), a1(i64), a1(i64), i64,
                              a1(u64), a1(u64))],
        "hash_delete": [T.UniTuple(i64, 2)(a1(u32), i64, rk, a2(T.uint8), i64, a1(u64, True),
                                           a1(i32), a1(i32), a1(i64), a1(i64))],
    }
    for dt in DTYPES:
        d = from_dtype(np.dtype(dt))
        sigs["hash_push"].append(T.UniTuple(i64, 2)(a1(u32), i64, i64, rk, rd(d), i64, a1(u64, True),
                                                     a2(d, True), i64, i64, i64, a1(d), a1(f64), a1(i64)))
        sigs["hash_pull"].append(i64(a1(u32), i64, rk, rd(d), a1(u64, True), a2(d), i64, a1(i64)))
        sigs["run_push"].append(T.none(a2(d), a2(d), a2(d), a1(i64), i64, a2(d, True), i64, i64, a1(d), a1(f64)))
        sigs["rows_push"].append(T.none(rd(d), a1(i64, True), a2(d, True), i64, i64, a1(d), a1(f64)))
        sigs["rows_pull"].append(b(a1(u32), i64, rk, rd(d), a1(i64, True), a1(u64, True), a2(d), i64))
    return sigs


_warm = False


def _kernels() -> list[tuple]:
    return [(globals()[name], sigs) for name, sigs in _signatures().items()]


def _cache_dir() -> str | None:
    """The folder numba caches this module's kernels in, or None (no cache)."""
    cache = getattr(hash_push, "_cache", None)
    return getattr(cache, "_cache_path", None) if not isinstance(cache, NullCache) else None


def _locked(folder: str | None):
    """An exclusive lock on ``folder`` (or None): several daemons starting at once on
    one host (``psd run``, ``LocalCluster``) then compile once, the others load what
    the first wrote, instead of each compiling on the same cores. Taken only until one
    warm has completed (``_stamp``): loading needs no turn."""
    if folder is None:
        return None
    try:
        import fcntl
        fd = os.open(os.path.join(folder, "psd-store-warm.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


def _stamp(folder: str) -> tuple[str, str]:
    """The file that says a warm of this very source, numba and Python completed in
    ``folder``, and what it holds."""
    import sys

    import numba
    st = os.stat(__file__)
    return (os.path.join(folder, "psd-store-warm.ok"),
            f"{numba.__version__} {sys.version.split()[0]} {st.st_mtime_ns} {st.st_size}")


def _write_stamp(folder: str) -> None:
    path, stamp = _stamp(folder)
    try:
        with open(path, "w") as f:
            f.write(stamp)
    except OSError:
        pass  # (then the next start takes the lock again: slower, not wrong)


def _cache_complete(folder: str | None) -> bool:
    if folder is None:
        return False
    path, want = _stamp(folder)
    try:
        with open(path) as f:
            return f.read() == want
    except OSError:
        return False


def warm() -> str | None:
    """Compile (or load from the disk cache) every kernel for every signature the store
    uses, then forbid compiling: a request never waits for the compiler, and a call with
    an unforeseen type fails loudly instead of compiling. Idempotent.

    The first warm on a machine compiles (about 20 s on one core) and writes the cache;
    later ones load it (under a second). A cache that cannot be written (a full or
    read-only disk) is dropped and the kernels are compiled in memory. Returns the cache
    folder, or None when there is none."""
    global _warm
    if _warm:
        return _cache_dir()
    folder = _cache_dir()
    # a cache some earlier warm completed is only read: daemons starting together load it
    # side by side (numba writes each entry atomically) instead of one after another
    lock = None if _cache_complete(folder) else _locked(folder)
    try:
        try:
            for kernel, sigs in _kernels():
                for sig in sigs:
                    kernel.compile(sig)
            if folder is not None and lock is not None:
                _write_stamp(folder)
        except OSError as e:
            log.warning("psd.store: cannot write the compiled store's cache in %s (%s); compiling in "
                        "memory, as every start will", folder, e)
            folder = None
            for kernel, sigs in _kernels():
                kernel._cache = NullCache()
                for sig in sigs:
                    kernel.compile(sig)
    finally:
        if lock is not None:
            os.close(lock)
    for kernel, _ in _kernels():
        kernel.disable_compile()
    _warm = True
    return folder

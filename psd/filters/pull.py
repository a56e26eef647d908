"""Filters on pull replies: the server answers with fewer or smaller rows, the worker
rebuilds the rest. Pure numpy; docs/jobs.md, "Filters on pulls"; docs/protocol.md.

A worker chooses them per table (``kv.table(..., pull_filters=[...])``, a job's
``pull_filters:``); every pull of 64 keys or more names them in ``meta.pf`` and the
reply says what it did in ``meta.pr``.

* ``significant`` {threshold, relative}: (each one value or one per column) the server keeps, per table, the row it last
  *published* for each key pulled with this filter, and publishes a key's row again only
  when the stored row moved away from it by more than ``threshold`` in some column
  (absolute, or times ``|published|`` with ``relative``; one threshold, or one per
  column). Every worker is answered with published rows, so workers that pull a key
  between the same two publications get the same bits (an aggregating table's ``kkt``
  judges by them and must agree). Per worker the server keeps which publication of
  each key it last sent, under a token the worker names in its next pull; a pull
  naming the current token gets only the rows published since (the worker fills in
  the rest from its copy). Any other token (a reply lost, a server restarted, another
  server after a failover or a ring change, state dropped for memory) gets every row
  and starts the chain again: a worker never holds rows older than the bound.
  Threshold 0 is lossless: only rows that changed travel.
* ``quantize`` {to: bfloat16}: rows travel as the upper 16 bits of their float32 value,
  rounded to nearest even (the range of float32, 8 significant bits: half a unit in the last place): every entry is
  off by at most ``2**-8 * |v|``, zeros exact, and the same value always rounds the
  same way (no per-message scale, so all workers agree).
* ``sparse``: rows of zeros are left out of an answer that is not a delta; lossless.

Bound of what a worker holds after a pull, per entry, against the row the server held
when it answered: ``significant`` alone, ``threshold`` (relative: ``threshold *
|published|``); ``quantize`` alone, ``2**-8 * |v|``; both, the larger of the two.
"""
from __future__ import annotations

import itertools
import math
import random
from collections import OrderedDict

import numpy as np

from psd.errors import ConfigError, ProtocolError, UnknownFilterError
from psd.filters.spec import PULL_FILTERS, PULL_REQUIRED, parse_filters

#: the pull-filter names a receiver accepts (a server in ``meta.pf``, a worker in ``meta.pr``)
KNOWN_PULL = frozenset(PULL_FILTERS)
#: bytes of pull state a server keeps (published rows and what each worker was sent);
#: past it, all of it is dropped and every worker gets one full answer next
PULL_STATE_BYTES = 256 << 20
#: bytes of copies a worker keeps (rows last received, per server and table); past it, dropped
COPY_BYTES = 512 << 20
_F64 = np.dtype(np.float64)
_MAX64 = (1 << 64) - 1


# -- settings ----------------------------------------------------------------------------
def build_pull(entries, dtype: str, width: int, where: str = "pull_filters") -> dict | None:
    """The ``meta.pf`` that pulls of a table carry, checked against it (ConfigError naming
    the key), or None when there are no filters."""
    parsed = parse_filters(entries, where, PULL_FILTERS, PULL_REQUIRED)
    problems = []
    pf: dict = {"f": [n for n, _ in parsed]}
    for i, (name, opts) in enumerate(parsed):
        key = f"{where}[{i}]"
        t = opts.get("threshold")
        lossless = name == "sparse" or (name == "significant" and not any(t if isinstance(t, list) else [t]))
        if not lossless and not dtype.startswith("float"):
            problems.append(f"{key}: pull filter {name!r} changes values; the table holds {dtype}, expected "
                            f"float32 or float64 (integer tables take sparse, and significant with threshold 0)")
        if name == "significant":
            t, r = opts["threshold"], opts["relative"]
            if isinstance(t, list) and len(t) != width:
                problems.append(f"{key}.threshold: expected one number or {width} (one per column), got {len(t)}")
            if isinstance(r, list) and len(r) != width:
                problems.append(f"{key}.relative: expected true, false or {width} of them (one per column), "
                                f"got {len(r)}")
            pf["t"] = [float(x) for x in t] if isinstance(t, list) else float(t)
            pf["r"] = list(r) if isinstance(r, list) else bool(r)
        elif name == "quantize":
            pf["q"] = opts["to"]
    if problems:
        raise ConfigError("; ".join(problems), problems=problems)
    return pf if parsed else None


def check_pf(pf, width: int) -> dict:
    """A pull's ``meta.pf``, checked by the server before anything is done."""
    if type(pf) is not dict or not isinstance(pf.get("f"), list) or not 1 <= len(pf["f"]) <= 8:
        raise UnknownFilterError("meta.pf must be a map naming 1 to 8 pull filters in f")
    names = pf["f"]
    unknown = [n for n in names if not isinstance(n, str) or n not in KNOWN_PULL]
    if unknown:
        name = str(unknown[0])[:40]
        raise UnknownFilterError(f"pull filter {name!r} named in meta.pf is not known here; expected names among "
                                 f"{', '.join(sorted(KNOWN_PULL))}; nothing was answered", filter=name)
    if len(set(names)) != len(names):
        raise UnknownFilterError("meta.pf names a pull filter twice")
    if "significant" in names:
        t, r = pf.get("t"), pf.get("r")
        ok = (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0)
        if not (ok(t) or (isinstance(t, list) and len(t) == width and all(ok(x) for x in t))) or not (
                isinstance(r, bool) or (isinstance(r, list) and len(r) == width and all(isinstance(x, bool) for x in r))):
            raise UnknownFilterError(f"meta.pf: significant needs t (a number >= 0, or {width} of them) and r "
                                     f"(true or false, or {width} of them)")
        b = pf.get("b")
        if b is not None and (type(b) is not int or not 0 <= b <= _MAX64):
            raise UnknownFilterError("meta.pf.b must be the token of a previous answer (an integer)")
    if "quantize" in names and pf.get("q") != "bfloat16":
        raise UnknownFilterError("meta.pf: quantize needs q: bfloat16")
    return pf


# -- bfloat16 ----------------------------------------------------------------------------
def to_bf16(values: np.ndarray) -> np.ndarray:
    """float values as bfloat16 bits (uint16), rounded to nearest even."""
    u = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_bf16(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """What a worker makes of ``values`` sent as bfloat16, in ``dtype``."""
    return from_bf16(to_bf16(values)).astype(dtype)


# -- sorted per-key state ------------------------------------------------------------------
class _Keyed:
    """Keys with one row each in every named column. Rows are appended as keys come and
    never move; a sorted copy of the keys with the row of each finds them. Adding keys
    costs one merge of that index (16 bytes a key held), not a copy of every column."""

    def __init__(self, cols: dict[str, tuple[np.dtype, int]]):
        self.sorted = np.empty(0, np.uint64)
        self.rows = np.empty(0, np.int64)  # the row of each key of ``sorted``
        self.n = 0
        self.cols = {n: np.zeros((0, w), dt) for n, (dt, w) in cols.items()}

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The row of each of ``keys`` (sorted; -1 where not held) and which are held."""
        pos = np.searchsorted(self.sorted, keys)
        held = np.zeros(keys.size, bool)
        inside = pos < self.sorted.size
        held[inside] = self.sorted[pos[inside]] == keys[inside]
        rows = np.full(keys.size, -1, np.int64)
        rows[held] = self.rows[pos[held]]
        return rows, held

    def positions(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``keys`` (sorted, unique), adding those not held (rows of zeros);
        and which were new."""
        rows, held = self.find(keys)
        new = ~held
        if held.all():
            return rows, new
        fresh = keys[new]
        k, n = fresh.size, self.n
        if n + k > next(iter(self.cols.values())).shape[0]:
            cap = max(n + k, 2 * n, 1024)
            for name, arr in self.cols.items():
                grown = np.zeros((cap, arr.shape[1]), arr.dtype)
                grown[:n] = arr[:n]
                self.cols[name] = grown
        added = np.arange(n, n + k, dtype=np.int64)
        dest = np.searchsorted(self.sorted, fresh) + np.arange(k)
        old = np.ones(self.sorted.size + k, bool)
        old[dest] = False
        keys2, rows2 = np.empty(old.size, np.uint64), np.empty(old.size, np.int64)
        keys2[dest], rows2[dest] = fresh, added
        keys2[old], rows2[old] = self.sorted, self.rows
        self.sorted, self.rows, self.n = keys2, rows2, n + k
        rows[new] = added
        return rows, new

    @property
    def nbytes(self) -> int:
        return self.sorted.nbytes + self.rows.nbytes + sum(a.nbytes for a in self.cols.values())


class _Sent(_Keyed):
    """What one worker was last sent of one table: the publication of each key, and the token."""

    def __init__(self, token: int):
        super().__init__({"ver": (np.dtype(np.int64), 1)})
        self.token = token


# -- the server's side -------------------------------------------------------------------------
class PullFilters:
    """A server's pull filters: ``encode`` turns a pull's rows into its reply."""

    def __init__(self, max_bytes: int = PULL_STATE_BYTES, seed: int | None = None):
        self.max_bytes = max_bytes
        rng = random.Random(seed)
        # tokens and publications start at random: a restarted server matches no old token
        self._tokens = itertools.count(rng.getrandbits(62) + 1)
        self._versions = itertools.count(1)
        self.published: dict[str, _Keyed] = {}
        self.sent: OrderedDict[tuple[str, str], _Sent] = OrderedDict()
        self.counters = {"replies": 0, "rows": 0, "rows_sent": 0, "deltas": 0, "full": 0, "resets": 0}

    def encode(self, sender: str, table: str, keys: np.ndarray, values: np.ndarray, pf: dict,
               dtype: np.dtype) -> tuple[list[np.ndarray], dict]:
        """The reply's arrays and ``meta.pr`` for a pull of ``keys`` whose stored rows are
        ``values`` (n, width), under the checked ``pf``."""
        names = pf["f"]
        n = values.shape[0]
        quantize = "quantize" in names
        pr: dict = {"f": list(names), "n": n}
        c = self.counters
        c["replies"] += 1
        c["rows"] += n
        if "significant" in names:
            rows, send, pr = self._significant(sender, table, keys, values, pf, dtype, quantize, pr)
        else:
            rows = round_bf16(values, dtype) if quantize else values
            send = None
        if pr.get("fill", "zero") == "zero" and "sparse" in names:
            nonzero = (rows != 0).any(axis=1)
            send = nonzero if send is None else send & nonzero
        arrays = []
        if send is None or send.all():
            pr["sel"] = "all"
            out = rows
        else:
            k = int(np.count_nonzero(send))
            if (n + 7) // 8 <= 4 * k:
                pr["sel"] = "bits"
                arrays.append(np.packbits(send))
            else:
                pr["sel"] = "idx"
                arrays.append(np.flatnonzero(send).astype(np.uint32))
            out = rows[send]
        arrays.append(to_bf16(out) if quantize else np.ascontiguousarray(out, dtype))
        c["rows_sent"] += out.shape[0]
        return arrays, pr

    def _significant(self, sender, table, keys, values, pf, dtype, quantize, pr):
        width = values.shape[1]
        pub = self.published.get(table)
        if pub is None:
            pub = self.published[table] = _Keyed({"vals": (dtype, width), "ver": (np.dtype(np.int64), 1)})
        pos, new = pub.positions(keys)
        held = pub.cols["vals"][pos]
        cur = values.astype(_F64)
        threshold = np.broadcast_to(np.asarray(pf["t"], _F64), (1, width))
        relative = np.broadcast_to(np.asarray(pf["r"], bool), (1, width))
        limit = np.where(relative, threshold * np.abs(held.astype(_F64)), threshold) if relative.any() else threshold
        over = np.abs(cur - held.astype(_F64)) > limit
        if not threshold.all():  # threshold 0: any change, compared exactly (int64 past 2**53 too)
            over = np.where(threshold == 0, values != held, over)
        moved = new | over.any(axis=1)
        if moved.any():
            fresh = round_bf16(values[moved], dtype) if quantize else values[moved].astype(dtype)
            # a row published again with the same bits keeps its publication (nothing to resend)
            differs = new[moved] | (fresh != held[moved]).any(axis=1)
            at = pos[moved][differs]
            pub.cols["vals"][at] = fresh[differs]
            pub.cols["ver"][at, 0] = next(self._versions)
        rows = pub.cols["vals"][pos]
        ver = pub.cols["ver"][pos, 0]
        entry = (sender, table)
        state = self.sent.get(entry)
        base = pf.get("b")
        send = None
        if state is not None and base is not None and base == state.token:
            spos, sheld = state.find(keys)
            send = ~sheld
            send[sheld] = state.cols["ver"][spos[sheld], 0] != ver[sheld]
            pr["fill"], pr["b"] = "copy", base
            self.counters["deltas"] += 1
            self.sent.move_to_end(entry)
        else:  # no chain, or not this one: every row, and a new chain with these keys
            if state is not None:
                self.counters["resets"] += 1
            state = self.sent[entry] = _Sent(0)
            pr["fill"] = "zero"
            self.counters["full"] += 1
        spos, _ = state.positions(keys)
        state.cols["ver"][spos, 0] = ver
        state.token = next(self._tokens)
        pr["t"] = state.token
        self._bound()
        return rows, send, pr

    def _bound(self) -> None:
        if self.nbytes > self.max_bytes:  # every worker starts a new chain (one full answer)
            self.published.clear()
            self.sent.clear()

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.published.values()) + sum(s.nbytes for s in self.sent.values())

    def forget(self, sender: str | None = None, tables: set[str] | None = None) -> None:
        """Drop what a departed worker was sent, or every state of dropped tables."""
        for entry in [e for e in self.sent if (sender is None or e[0] == sender)
                      and (tables is None or e[1] in tables)]:
            del self.sent[entry]
        if sender is None and tables is not None:
            for name in tables:
                self.published.pop(name, None)

    def stats(self) -> dict:
        return {**self.counters, "bytes": self.nbytes, "workers_tables": len(self.sent)}


# -- the worker's side ---------------------------------------------------------------------------
class _Copy(_Keyed):
    def __init__(self, token: int, dtype: np.dtype, width: int):
        super().__init__({"vals": (dtype, width)})
        self.token = token


class PullCopies:
    """A worker's copies of the rows it was sent, per (server, table), to rebuild deltas."""

    def __init__(self, max_bytes: int = COPY_BYTES):
        self.max_bytes = max_bytes
        self.copies: OrderedDict[tuple[str, str], _Copy] = OrderedDict()
        self.counters = {"replies": 0, "rows": 0, "rows_sent": 0, "deltas": 0}

    def token(self, server: str, table: str) -> int | None:
        """The token to name in a pull to ``server`` (None: no copy, ask for every row)."""
        copy = self.copies.get((server, table))
        return None if copy is None else copy.token

    def decode(self, server: str, table: str, keys: np.ndarray, pr, arrays: list, dtype: np.dtype,
               width: int) -> np.ndarray:
        """The rows a reply with ``meta.pr`` means, for a pull of ``keys``; keeps a copy
        when the reply starts or continues a chain. Raises UnknownFilterError (nothing
        kept) for a filter not known here or a reply that does not fit."""
        if type(pr) is not dict or not isinstance(pr.get("f"), list):
            raise UnknownFilterError("meta.pr must be a map naming the pull filters in f")
        unknown = [x for x in pr["f"] if not isinstance(x, str) or x not in KNOWN_PULL]
        if unknown:
            name = str(unknown[0])[:40]
            raise UnknownFilterError(f"{server} answered with pull filter {name!r}, not known here; expected "
                                     f"names among {', '.join(sorted(KNOWN_PULL))}", filter=name)
        n = keys.size
        sel, fill, token = pr.get("sel"), pr.get("fill", "zero"), pr.get("t")
        if pr.get("n") != n or sel not in ("all", "bits", "idx") or fill not in ("zero", "copy") \
                or len(arrays) != (1 if sel == "all" else 2) or (token is not None and type(token) is not int):
            raise ProtocolError(f"{server}: a filtered pull answer that does not fit its request (meta.pr)")
        if sel == "all":
            send = None
        elif sel == "bits":
            bits = arrays[0]
            if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != (n + 7) // 8:
                raise ProtocolError(f"{server}: meta.pr bits frame must be {(n + 7) // 8} uint8")
            send = np.unpackbits(bits, count=n).astype(bool)
        else:
            idx = arrays[0]
            if idx.dtype != np.uint32 or idx.ndim != 1 or (idx.size and (int(idx.max()) >= n
                                                                          or (np.diff(idx.astype(np.int64)) <= 0).any())):
                raise ProtocolError(f"{server}: meta.pr idx frame must be ascending uint32 row numbers below {n}")
            send = np.zeros(n, bool)
            send[idx] = True
        k = n if send is None else int(np.count_nonzero(send))
        vals = arrays[-1]
        quantized = "quantize" in pr["f"]
        want = np.dtype(np.uint16) if quantized else dtype
        if vals.dtype != want or vals.shape != (k, width):
            raise ProtocolError(f"{server}: a filtered pull answer's values must be {want.name}[{k}, {width}]")
        vals = from_bf16(vals).astype(dtype) if quantized else vals
        if send is None:
            send = np.ones(n, bool)
        entry = (server, table)
        copy = self.copies.get(entry)
        if fill == "copy":
            if copy is None or copy.token != pr.get("b"):
                raise ProtocolError(f"{server} answered a pull with rows to take from a copy this worker does not "
                                    f"hold (token {pr.get('b')}); nothing was used")
            pos, held = copy.find(keys)
            if not held[~send].all():
                raise ProtocolError(f"{server} left out rows this worker holds no copy of; nothing was used")
            out = np.empty((n, width), dtype)
            out[~send] = copy.cols["vals"][pos[~send]]
        else:
            out = np.zeros((n, width), dtype)
        out[send] = vals
        c = self.counters
        c["replies"] += 1
        c["rows"] += n
        c["rows_sent"] += k
        if token is not None:
            if fill == "zero":
                copy = self.copies[entry] = _Copy(token, dtype, width)
            else:
                c["deltas"] += 1
            pos, _ = copy.positions(keys)
            copy.cols["vals"][pos] = out
            copy.token = token
            self.copies.move_to_end(entry)
            while self.copies and sum(x.nbytes for x in self.copies.values()) > self.max_bytes:
                self.copies.popitem(last=False)
        return out

    def forget(self, server: str | None = None) -> None:
        for entry in [e for e in self.copies if server is None or e[0] == server]:
            del self.copies[entry]

"""The key lists a server holds for key caching, by sender, table and signature.

A worker that sends the same key list again and again (every iteration's pull and push)
asks the server to keep it (``meta.kcs``) the first time, and from then on names it by
its signature (``meta.kc`` = [sig, count, first, last]) with no keys frame. The server
answers a signature it does not hold, or one whose count or end keys differ from the
list it holds, with ``keys_unknown`` and applies nothing; the worker sends the keys again.
Bounded (bytes and entries), least recently used first out. A signature that two
different lists of one sender and table share (a hash collision) is never answered from
the cache again: the entry is poisoned, and the worker keeps sending those keys whole.

Each list also keeps where its keys are stored in the table (``Held.at``: the hash rows
a push found, under the store's generation), so a push naming the list again folds its
values into those rows without looking a key up, unless the rows moved since
(``Table.push_at`` checks the generation; decision 117).

Pure: no I/O, no clock. docs/protocol.md, "Key caching"; docs/design-decisions.md.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from psd.codec.signature import signature
from psd.errors import KeysUnknownError, ProtocolError

#: bytes of key lists a server keeps (every sender and table together)
KEY_CACHE_BYTES = 64 << 20
#: entries a server keeps (a bound on the bookkeeping of many short lists)
KEY_CACHE_ENTRIES = 1 << 16
_MAX64 = (1 << 64) - 1


def _check_ref(kc) -> tuple[int, int, int, int]:
    if (type(kc) is not list or len(kc) != 4
            or not all(type(v) is int and 0 <= v <= _MAX64 for v in kc) or kc[1] < 1):
        raise ProtocolError("meta.kc must be [signature, count, first key, last key]: integers in [0, 2**64), "
                            "count >= 1")
    return kc[0], kc[1], kc[2], kc[3]


class Held:
    """A kept key list and, once a push used it, where its keys are stored."""

    __slots__ = ("at", "kept", "keys")

    def __init__(self, keys: np.ndarray):
        self.keys = keys
        self.at: tuple[int, np.ndarray] | None = None  # (store generation, rows): Table.locate
        self.kept = True  # False once evicted or forgotten (its bytes no longer counted)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + (self.at[1].nbytes if self.at is not None else 0)


class KeyCache:
    def __init__(self, max_bytes: int = KEY_CACHE_BYTES, max_entries: int = KEY_CACHE_ENTRIES):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        #: (sender, table, sig) -> the keys (and their rows), or None: poisoned (two lists
        #: had that signature)
        self._lists: OrderedDict[tuple[str, str, int], Held | None] = OrderedDict()
        self.bytes = 0
        self.counters = {"hits": 0, "misses": 0, "stored": 0, "evicted": 0, "collisions": 0}

    def __len__(self) -> int:
        return len(self._lists)

    def store(self, sender: str, table: str, keys: np.ndarray) -> int | None:
        """Keep ``keys`` (sorted, unique, checked by the caller) for ``sender`` and ``table``;
        returns their signature, or None when they are not kept (a collision, or a list
        larger than the whole cache)."""
        if keys.nbytes > self.max_bytes:
            return None
        sig = signature(keys)
        entry = (sender, table, sig)
        if entry in self._lists:
            held = self._lists[entry]
            self._lists.move_to_end(entry)
            if held is not None and held.keys.size == keys.size and np.array_equal(held.keys, keys):
                return sig
            if held is not None:  # the same signature for another list: neither is served again
                self.counters["collisions"] += 1
                self.bytes -= held.nbytes
                held.kept = False
                self._lists[entry] = None
            return None
        self._lists[entry] = Held(np.array(keys, dtype=np.uint64, copy=True))  # (not the sender's buffer)
        self.bytes += keys.nbytes
        self.counters["stored"] += 1
        self._evict()
        return sig

    def _evict(self) -> None:
        while self._lists and (self.bytes > self.max_bytes or len(self._lists) > self.max_entries):
            _, held = self._lists.popitem(last=False)
            if held is not None:
                self.bytes -= held.nbytes
                held.kept = False
            self.counters["evicted"] += 1

    def resolve(self, sender: str, table: str, kc) -> np.ndarray:
        """The keys ``meta.kc`` names for ``sender`` and ``table``; KeysUnknownError when
        they are not held, or do not match its count and end keys (nothing is guessed)."""
        return self.lookup(sender, table, kc).keys

    def lookup(self, sender: str, table: str, kc) -> Held:
        """``resolve``, with where the keys were last stored (``Held.at``)."""
        sig, count, first, last = _check_ref(kc)
        entry = (sender, table, sig)
        held = self._lists.get(entry)
        if held is None:
            self.counters["misses"] += 1
            why = "was poisoned by a signature collision" if entry in self._lists else "is not held here"
            raise KeysUnknownError(f"key list {sig:#018x} of {sender} for table {table!r} {why}; "
                                   f"send the keys", sig=sig)
        if held.keys.size != count or int(held.keys[0]) != first or int(held.keys[-1]) != last:
            self.counters["misses"] += 1
            raise KeysUnknownError(f"key list {sig:#018x} of {sender} for table {table!r} does not match the one "
                                   f"held here ({count} keys [{first}, {last}] named, {held.keys.size} held); "
                                   f"send the keys", sig=sig)
        self._lists.move_to_end(entry)
        self.counters["hits"] += 1
        return held

    def placed(self, held: Held, at: tuple[int, np.ndarray] | None) -> None:
        """Keep ``at`` (where ``held``'s keys are stored now) with the list, in its bytes."""
        if held.at is at:
            return
        if held.kept:  # (else evicted meanwhile: uncounted, gone with its last user)
            self.bytes += (0 if at is None else at[1].nbytes) - (0 if held.at is None else held.at[1].nbytes)
        held.at = at
        if held.kept:
            self._evict()

    def forget(self, sender: str | None = None, tables: set[str] | None = None) -> None:
        """Drop the lists of a sender (it left), or of tables (dropped)."""
        for entry in [e for e in self._lists if (sender is None or e[0] == sender)
                      and (tables is None or e[1] in tables)]:
            held = self._lists.pop(entry)
            if held is not None:
                self.bytes -= held.nbytes
                held.kept = False

    def stats(self) -> dict:
        return {"entries": len(self._lists), "bytes": self.bytes, "limit": self.max_bytes, **self.counters}

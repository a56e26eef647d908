"""The wire form of a range copy (``install`` messages), both ends of it.

A source cuts each table's rows of the range into messages of at most a byte budget
(``on_transfer`` in server.py), then sends the request ids it had applied in one or more
messages (``id_pieces``), the last one marked final. The receiver checks each message
whole before storing anything of it (``copy_rows``, ``copy_ids``): a half-checked copy
could leave a table unsorted or half-written.
"""
from __future__ import annotations

import numpy as np

from psd.cluster.ranges import KEY_SPACE_END, Range, check_sorted_unique
from psd.codec import Message
from psd.errors import KeysError, ProtocolError
from psd.store.table import Table

def copy_range(w) -> Range:
    """``meta.range`` of an install: [begin, last] with 0 <= begin <= last < 2**64."""
    if (not isinstance(w, list) or len(w) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in w)
            or not 0 <= w[0] <= w[1] < KEY_SPACE_END):
        raise ProtocolError(f"install: meta.range must be [begin, last] with 0 <= begin <= last < 2**64; got {w!r:.80}")
    return Range(w[0], w[1] + 1)


def copy_rows(msg: Message, table: Table, r: Range) -> tuple[np.ndarray, np.ndarray, dict]:
    """The keys, values and updater state of a range copy, checked whole before any of it
    is stored (a half-checked copy could leave the table unsorted or half-written)."""
    fields = msg.meta.get("state_fields", [])
    if (not isinstance(fields, list) or not all(isinstance(f, str) and f in table.state for f in fields)
            or len(set(fields)) != len(fields)):
        raise ProtocolError(f"install: meta.state_fields must name distinct state fields of table "
                            f"{table.spec.name!r} ({sorted(table.state)}); got {fields!r:.80}")
    if len(msg.arrays) != 2 + len(fields):
        raise ProtocolError(f"install: expected keys, values and {len(fields)} state frame(s), "
                            f"got {len(msg.arrays)} frame(s)")
    keys, vals, *state = msg.arrays
    if keys.dtype != np.uint64 or keys.ndim != 1:
        raise KeysError(f"install: keys must be 1-d uint64, got {keys.dtype.name} with shape {keys.shape}")
    check_sorted_unique(keys)
    if keys.size and (int(keys[0]) < r.begin or int(keys[-1]) >= r.end):
        raise KeysError(f"install: keys [{int(keys[0])}, {int(keys[-1])}] fall outside the range {r}")
    vals = table.check_values(vals, keys.size)
    return keys, vals, {f: table.check_values(a, keys.size) for f, a in zip(fields, state)}


def copy_ids(msg: Message) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The request ids a range copy carries: senders, how many ids each, the ids."""
    senders = msg.meta.get("senders", [])
    if len(msg.arrays) != 2 or not isinstance(senders, list) or not all(isinstance(s, str) for s in senders):
        raise ProtocolError("install: the final message carries meta.senders (names) and two frames, counts and ids")
    counts, rids = msg.arrays
    if (counts.dtype != np.uint64 or rids.dtype != np.uint64 or counts.ndim != 1 or rids.ndim != 1
            or counts.size != len(senders) or (counts > rids.size).any()  # the sum must not wrap around
            or int(counts.sum()) != rids.size):
        raise ProtocolError("install: counts must be uint64[len(senders)] summing to the length of the uint64 ids")
    return senders, counts, rids


#: senders named by one message of a range copy's ids (they travel in its header)
ID_PIECE_SENDERS = 256


def id_pieces(senders: list[str], counts: np.ndarray, rids: np.ndarray, budget: int,
              max_ids: int | None = None) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """Cut the (senders, counts, rids) frames of a copy's ids into pieces of at most
    ``budget`` bytes of frames and at most ``max_ids`` ids (the receiver's max_keys
    bounds every frame's length), at least one id each; one empty piece if there are none."""
    cap = max_ids if max_ids is not None else rids.size + 1
    out, cur_s, cur_c, cur_r = [], [], [], []
    size = 0
    start = 0
    for sender, n in zip(senders, counts.tolist()):
        ids = rids[start:start + n]
        start += n
        while ids.size:
            held = sum(cur_c)
            if cur_s and (size + 16 > budget or len(cur_s) >= ID_PIECE_SENDERS or held >= cap):
                out.append((cur_s, np.array(cur_c, dtype=np.uint64), np.concatenate(cur_r)))
                cur_s, cur_c, cur_r, size, held = [], [], [], 0, 0
            take = max(1, min(ids.size, (budget - size - 8) // 8, cap - held))
            cur_s.append(sender)
            cur_c.append(take)
            cur_r.append(ids[:take])
            size += 8 * (take + 1)
            ids = ids[take:]
    if cur_s or not out:
        out.append((cur_s, np.array(cur_c, dtype=np.uint64),
                    np.concatenate(cur_r) if cur_r else np.empty(0, np.uint64)))
    return out

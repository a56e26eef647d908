"""Which requests a server has applied, per sender, so a resend is applied once.

A worker resends a request under the same id after a timeout or a failover; the
server (or the replica promoted in its place, which saw the forward) answers it
without applying it again. Memory is bounded per sender: ids older than the window
are forgotten, which is safe because a worker resends only its recent requests.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import numpy as np

WINDOW = 1 << 16


def ids_of_arrays(senders: list[str], counts: np.ndarray, rids: np.ndarray) -> Iterator[tuple[str, int]]:
    """The (sender, rid) pairs of the frame form :meth:`Seen.to_arrays` writes."""
    if len(senders) != counts.size or int(counts.sum()) != rids.size:
        raise ValueError("seen memory: sender, count and id arrays disagree")
    start = 0
    for sender, n in zip(senders, counts.tolist()):
        for rid in rids[start:start + n].tolist():
            yield sender, rid
        start += n


class Seen:
    def __init__(self, window: int = WINDOW):
        self.window = window
        self._by_sender: dict[str, OrderedDict] = {}

    def __contains__(self, key: tuple[str, int]) -> bool:
        sender, rid = key
        ids = self._by_sender.get(sender)
        return ids is not None and rid in ids

    def add(self, sender: str, rid: int) -> None:
        ids = self._by_sender.setdefault(sender, OrderedDict())
        ids[rid] = None
        if len(ids) > self.window:
            ids.popitem(last=False)

    def to_arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(senders, how many ids each, all ids): the memory as frames, not header, since
        it can be far larger than a header may be."""
        senders = list(self._by_sender)
        counts = np.array([len(self._by_sender[s]) for s in senders], dtype=np.uint64)
        rids = np.fromiter((r for s in senders for r in self._by_sender[s]), dtype=np.uint64,
                           count=int(counts.sum()))
        return senders, counts, rids

    def merge_arrays(self, senders: list[str], counts: np.ndarray, rids: np.ndarray) -> None:
        for sender, rid in ids_of_arrays(senders, counts, rids):
            self.add(sender, rid)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_sender.values())

"""Which requests a server has applied, per sender, so a resend is applied once.

A worker resends a request under the same id after a timeout or a failover; the
server (or the replica promoted in its place, which saw the forward) answers it
without applying it again. Memory is bounded per sender: ids older than the window
are forgotten, which is safe because a worker resends only its recent requests.
"""
from __future__ import annotations

from collections import OrderedDict

WINDOW = 1 << 16


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

    def to_wire(self) -> list:
        return [[sender, list(ids)] for sender, ids in self._by_sender.items()]

    def merge(self, wire) -> None:
        for sender, rids in wire:
            for rid in rids:
                self.add(sender, rid)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._by_sender.values())

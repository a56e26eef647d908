"""Per-key state a sender keeps for one table: sorted keys and a row of columns each.

A filter's residuals (what it has not sent yet) and what the last pull showed live
here. Keys are added as pushes and pulls name them; lookups are ``searchsorted`` over
the sorted key array, insertions one merge per call.
"""
from __future__ import annotations

import numpy as np


class KeyState:
    def __init__(self, columns: dict[str, tuple[np.dtype, int]]):
        """``columns``: name -> (dtype, width); a new key's row is zeros."""
        self.keys = np.empty(0, np.uint64)
        self.spec = columns
        self.cols = {n: np.zeros((0, w), dt) for n, (dt, w) in columns.items()}

    def __len__(self) -> int:
        return int(self.keys.size)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``keys`` (sorted) and which of them are held."""
        pos = np.searchsorted(self.keys, keys)
        held = np.zeros(keys.size, bool)
        inside = pos < self.keys.size
        held[inside] = self.keys[pos[inside]] == keys[inside]
        return pos, held

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Positions of ``keys`` (sorted, unique), adding those not held yet."""
        pos, held = self.find(keys)
        if held.all():
            return pos
        new = keys[~held]
        at = np.searchsorted(self.keys, new)
        self.keys = np.insert(self.keys, at, new)
        for n, arr in self.cols.items():
            self.cols[n] = np.insert(arr, at, 0, axis=0)
        return np.searchsorted(self.keys, keys)

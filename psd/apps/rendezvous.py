"""Waiting for every rank of a job, through a table (only the public API).

Each rank writes one row, key = its rank, into a small ``assign`` table whose first
column is 1 once the rank is done (the rest is free for the rank's statistics); rank 0
polls the rows until all are marked. Writing a row is idempotent, so a shard that is
re-run after its worker died simply overwrites it. The table should be created with the
table option ``consistency="eventual"`` so the marks are visible at once under every
consistency model (a ``sequential`` table applies pushes only at clock boundaries).
"""
from __future__ import annotations

import asyncio

import numpy as np


async def wait_for_ranks(table, num_workers: int, poll: float = 0.02, max_poll: float = 0.25,
                         key: np.ndarray | None = None) -> np.ndarray:
    """Block until rows 0..num_workers-1 of ``table`` have column 0 >= 1; return the rows.
    ``key``: wait for these rows instead, until their last column is >= 1."""
    keys = np.arange(num_workers, dtype=np.uint64) if key is None else key
    col = 0 if key is None else -1
    while True:
        rows = await table.pull(keys)
        if np.all(rows[:, col] >= 1):
            return rows
        await asyncio.sleep(poll)
        poll = min(max_poll, poll * 1.5)

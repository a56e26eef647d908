"""A worker process for test_pushpull.py, and the data it pushes.

    python pushworker.py SCHEDULER SEED BOUNDARIES_JSON

connects, opens the tables of ``TABLES``, prints ``ready``, waits for a line on stdin
(so every worker starts pushing at the same moment), issues all its pushes without
waiting in between, waits for every one, prints ``done`` and exits. The test imports
``make_pushes`` to compute the exact reference sums.
"""
from __future__ import annotations

import json
import sys

import numpy as np

#: (name, dtype, width); every table uses updater "sum"
TABLES = [
    ("pp_i32_w1", "int32", 1),
    ("pp_i64_w3", "int64", 3),
    ("pp_f32_w3", "float32", 3),
    ("pp_f64_w1", "float64", 1),
]

TOP = 2**64 - 1


def key_pool(boundaries: list[int]) -> np.ndarray:
    """Keys every worker draws from, so pushes to one key come from several workers:
    both ends of the key space, both sides of every range boundary and of 2**63,
    small keys and random ones."""
    rng = np.random.default_rng(12345)
    special = [0, 1, 2, TOP - 1, TOP, 2**63 - 1, 2**63, 2**63 + 1]
    for b in boundaries:
        special += [b - 2, b - 1, b, b + 1]
    pool = np.concatenate([
        np.array(special, dtype=np.uint64),
        np.arange(3, 120, dtype=np.uint64),
        rng.integers(0, TOP, size=150, dtype=np.uint64, endpoint=True),
    ])
    return np.unique(pool)


def span_starts(boundaries: list[int]) -> list[int]:
    """Dense spans that cross range boundaries (a few), 2**63 and reach the top key."""
    picked = sorted({boundaries[0], boundaries[len(boundaries) // 2], boundaries[-1]})
    return [picked[0] - 5, 2**63 - 4, TOP - 7] + [b - 3 for b in picked[1:]]


SPAN_LEN = 8


def make_pushes(seed: int, boundaries: list[int]) -> list[tuple[str, str, object, np.ndarray]]:
    """The pushes worker ``seed`` makes: (table, "keys"|"span", keys or lo, values)."""
    rng = np.random.default_rng(seed)
    pool = key_pool(boundaries)
    out = []
    for name, dtype, width in TABLES:
        for _ in range(3):
            n = int(rng.integers(1, pool.size))
            keys = np.sort(rng.choice(pool, size=n, replace=False))
            values = rng.integers(-50, 51, size=(n, width)).astype(dtype)
            if width == 1 and rng.random() < 0.5:
                values = values.reshape(-1)  # 1-d values are accepted for width 1
            out.append((name, "keys", keys, values))
        out.append((name, "keys", np.empty(0, dtype=np.uint64), np.empty((0, width), dtype=dtype)))
        for lo in span_starts(boundaries):
            values = rng.integers(-50, 51, size=(SPAN_LEN, width)).astype(dtype)
            out.append((name, "span", lo, values))
    return out


def main() -> int:
    import psd

    scheduler, seed, boundaries = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    kv = psd.connect(scheduler)
    try:
        tables = {name: kv.table(name, width=width, dtype=dtype, updater="sum")
                  for name, dtype, width in TABLES}
        pushes = make_pushes(seed, boundaries)
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 3
        stamps = []
        for name, kind, where, values in pushes:
            t = tables[name]
            stamps.append(t.push(where, values) if kind == "keys" else t.push_span(where, values))
        assert all(isinstance(ts, int) for ts in stamps)
        for ts in stamps:
            kv.wait(ts)
        print("done", flush=True)
    finally:
        kv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A worker process for test_failover.py: a steady stream of acked pushes.

    python streamworker.py SCHEDULER SEED OUT_JSON [WINDOW]

connects (asyncio API), opens the tables of ``TABLES``, prints ``ready`` and waits for
``go`` on stdin. Then it pushes without pause, keeping up to WINDOW pushes in flight,
until ``stop`` arrives on stdin; it then waits for the pushes still in flight, writes
OUT_JSON and prints ``done``. OUT_JSON records, for every push, whether it was acked
(and when, as time.time(), so the test can relate acks to the moment it killed a
server) or failed (and why). Push ``i`` of worker ``seed`` is ``make_push(seed, i)``,
so the test recomputes the exact expected sums from the acked indices alone.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np

from workerprocs import stdin_go_stop

#: (name, dtype, width); every table uses updater "sum"
TABLES = [("fo_i64_w1", "int64", 1), ("fo_i64_w3", "int64", 3)]
TOP = 2**64 - 1
KEYS_PER_PUSH = 48
#: how long the worker waits for its last pushes after ``stop`` before giving up
DRAIN_TIMEOUT = 45.0


def key_pool() -> np.ndarray:
    """Every key any push touches: both ends of the key space, small keys, and random
    keys spread over the whole ring (so each push reaches every server)."""
    rng = np.random.default_rng(4242)
    special = np.array([0, 1, 2, 2**63 - 1, 2**63, TOP - 1, TOP], dtype=np.uint64)
    return np.unique(np.concatenate([special, np.arange(3, 40, dtype=np.uint64),
                                     rng.integers(0, TOP, size=1200, dtype=np.uint64, endpoint=True)]))


POOL = key_pool()


def make_push(seed: int, i: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Push ``i`` of worker ``seed``: (index into TABLES, sorted keys, int64 values)."""
    rng = np.random.default_rng([seed, i])
    t = i % len(TABLES)
    keys = np.sort(rng.choice(POOL, size=KEYS_PER_PUSH, replace=False))
    values = rng.integers(1, 1000, size=(KEYS_PER_PUSH, TABLES[t][2]), dtype=np.int64)
    return t, keys, values


def expected(acked: dict[int, list[int]]) -> list[np.ndarray]:
    """Per table: the exact sums over POOL of the pushes listed in ``acked`` (seed -> indices)."""
    out = [np.zeros((POOL.size, width), dtype=np.int64) for _, _, width in TABLES]
    for seed, indices in acked.items():
        for i in indices:
            t, keys, values = make_push(seed, i)
            out[t][np.searchsorted(POOL, keys)] += values
    return out


async def stream(scheduler: str, seed: int, out_path: str, window: int) -> int:
    import psd

    kv = await psd.aio.connect(scheduler)
    try:
        tables = [await kv.table(name, width=width, dtype=dtype, updater="sum")
                  for name, dtype, width in TABLES]
        go, stop = stdin_go_stop()
        print("ready", flush=True)
        await go.wait()
        acked: list[tuple[int, float]] = []
        failed: list[tuple[int, str]] = []
        slots = asyncio.Semaphore(window)
        running: set[asyncio.Task] = set()
        started = time.time()

        async def one(i: int, ts: int) -> None:
            try:
                await kv.wait(ts)
                acked.append((i, time.time()))
            except Exception as e:  # recorded: the test decides whether that is allowed
                failed.append((i, f"{type(e).__name__}: {e}"))
            finally:
                slots.release()

        i = 0
        while not stop.is_set():
            await slots.acquire()
            if stop.is_set():
                slots.release()
                break
            t, keys, values = make_push(seed, i)
            task = asyncio.ensure_future(one(i, tables[t].push(keys, values)))
            running.add(task)
            task.add_done_callback(running.discard)
            i += 1
        issued = i
        if running:
            await asyncio.wait(set(running), timeout=DRAIN_TIMEOUT)
        unfinished = sorted(set(range(issued)) - {a for a, _ in acked} - {f for f, _ in failed})
        with open(out_path, "w") as f:
            json.dump({"seed": seed, "node": kv.node_id, "started": started, "issued": issued,
                       "acked": acked, "failed": failed, "unfinished": unfinished}, f)
        print("done", flush=True)
        return 0
    finally:
        await kv.close()


def main() -> int:
    scheduler, seed, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    window = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    return asyncio.run(stream(scheduler, seed, out_path, window))


if __name__ == "__main__":
    sys.exit(main())

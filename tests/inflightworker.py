"""A worker process for test_sigterm.py: many pushes in flight at every moment.

    python inflightworker.py SCHEDULER SEED OUT_JSON [WINDOW [KEYS_PER_PUSH]]

connects (asyncio API), opens ``TABLE``, prints ``ready`` and waits for ``go`` on stdin.
Then it keeps WINDOW pushes in flight (issuing a new one as soon as one finishes) until
``stop`` arrives; it then waits for the pushes still in flight (at most DRAIN_TIMEOUT),
writes OUT_JSON and prints ``done``. OUT_JSON holds, for every push ``i``, when it was
issued and when it finished (``time.time()``), and how: ``"ack"`` or the error's type and
message, so the test can pick out the pushes that were in flight at a given moment.
Push ``i`` of worker ``seed`` is ``make_push(seed, i, k)``: the test recomputes the exact
sums from the acked indices alone.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np

from workerprocs import stdin_go_stop

#: (name, dtype, width), updater "sum"
TABLE = ("sg_i64_w4", "int64", 4)
TOP = 2**64 - 1
#: how long the worker waits for its last pushes after ``stop`` before giving up
DRAIN_TIMEOUT = 45.0


def key_pool() -> np.ndarray:
    """Keys spread over the whole ring (every push reaches every server), plus both ends."""
    rng = np.random.default_rng(777)
    special = np.array([0, 1, 2**63 - 1, 2**63, TOP - 1, TOP], dtype=np.uint64)
    return np.unique(np.concatenate([special, rng.integers(0, TOP, size=4000, dtype=np.uint64, endpoint=True)]))


POOL = key_pool()


def make_push(seed: int, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, i])
    keys = np.sort(rng.choice(POOL, size=k, replace=False))
    return keys, rng.integers(1, 1000, size=(k, TABLE[2]), dtype=np.int64)


def expected(acked: dict[int, list[int]], k: int) -> np.ndarray:
    """The exact sums over POOL of the pushes listed in ``acked`` (seed -> indices)."""
    out = np.zeros((POOL.size, TABLE[2]), dtype=np.int64)
    for seed, indices in acked.items():
        for i in indices:
            keys, values = make_push(seed, i, k)
            out[np.searchsorted(POOL, keys)] += values
    return out


async def stream(scheduler: str, seed: int, out_path: str, window: int, k: int) -> int:
    import psd

    kv = await psd.aio.connect(scheduler)
    try:
        name, dtype, width = TABLE
        table = await kv.table(name, width=width, dtype=dtype, updater="sum")
        go, stop = stdin_go_stop()
        print("ready", flush=True)
        await go.wait()
        records: dict[int, list] = {}  # i -> [issued, finished, outcome]
        slots = asyncio.Semaphore(window)
        running: set[asyncio.Task] = set()

        async def one(i: int, ts: int) -> None:
            try:
                await kv.wait(ts)
                outcome = "ack"
            except Exception as e:  # recorded: the test decides what is allowed
                outcome = f"{type(e).__name__}: {e}"
            finally:
                slots.release()
            records[i][1:] = [time.time(), outcome]

        i = 0
        while not stop.is_set():
            await slots.acquire()
            if stop.is_set():
                slots.release()
                break
            keys, values = make_push(seed, i, k)
            records[i] = [time.time(), None, None]
            task = asyncio.ensure_future(one(i, table.push(keys, values)))
            running.add(task)
            task.add_done_callback(running.discard)
            i += 1
        if running:
            await asyncio.wait(set(running), timeout=DRAIN_TIMEOUT)
        with open(out_path, "w") as f:
            json.dump({"seed": seed, "node": kv.node_id, "issued": i, "keys_per_push": k,
                       "pushes": [[j, *records[j]] for j in range(i)]}, f)
        print("done", flush=True)
        return 0
    finally:
        await kv.close()


def main() -> int:
    scheduler, seed, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    window = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    k = int(sys.argv[5]) if len(sys.argv) > 5 else 256
    return asyncio.run(stream(scheduler, seed, out_path, window, k))


if __name__ == "__main__":
    sys.exit(main())

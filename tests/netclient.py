"""A client for test_netcluster.py, run inside an emulated client host:

    python netclient.py SCHEDULER SEED

connects to the scheduler by its address on the emulated network (keys from PSD_KEYS,
which the host's environment sets), pushes twice to keys of its own spread over the whole
ring (so every server takes part), pulls them back and prints one JSON line: what it
read equals what it pushed, summed, or the first differences. Exit 0 only if exact.
"""
from __future__ import annotations

import json
import sys

import numpy as np

import psd


def main() -> int:
    scheduler, seed = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(seed)
    # the low byte is the seed: no two clients share a key
    keys = np.unique((rng.integers(0, 2**56, size=2000, dtype=np.uint64) << np.uint64(8)) | np.uint64(seed))
    first = rng.integers(1, 1000, size=(keys.size, 3), dtype=np.int64)
    second = rng.integers(1, 1000, size=(keys.size, 3), dtype=np.int64)
    kv = psd.connect(scheduler)
    try:
        table = kv.table("netclient", width=3, dtype="int64", updater="sum")
        kv.wait(table.push(keys, first))
        kv.wait(table.push(keys, second))
        got = table.pull(keys)
        node = kv.node_id
    finally:
        kv.close()
    wrong = np.nonzero((got != first + second).any(axis=1))[0]
    print(json.dumps({"node": node, "keys": int(keys.size), "exact": wrong.size == 0,
                      "wrong": [[int(keys[i]), got[i].tolist(), (first + second)[i].tolist()] for i in wrong[:5]]}))
    return 0 if wrong.size == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""A worker process for test_consistency.py: counts its iterations in a shared sum table.

    python clockworker.py SCHEDULER INDEX NUM_WORKERS ITERATIONS SLEEP OUT_JSON KEYS_JSON

connects, opens the int64 ``sum`` table ``TABLE``, prints ``ready <node id>`` and waits
for ``go`` on stdin (so every worker starts at the same moment). Then, for each
iteration c = 0, 1, ...:

* pulls every worker's counter key (``KEYS_JSON``: a sorted list, one key per worker,
  chosen by the test so that they lie on different servers) (the pull carries clock c) and records the counts it
  saw, when the pull was sent and when it was answered;
* sleeps ``SLEEP`` seconds (the straggler's "computation"; 0 for the fast workers);
* pushes +1 to its own counter key, without waiting for the acknowledgement;
* calls ``kv.clock()`` (clock c + 1).

So after a worker has finished iteration c - 1 its counter is c. At the end it waits for
every push, writes its records to ``OUT_JSON``, prints ``done`` and closes (leaving the
worker group).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

TABLE = "counts"


def spread_keys(status: dict, n: int) -> list[int]:
    """``n`` sorted keys from ``status["ranges"]``, each from a range whose primary differs
    from the previous key's where the ring allows, so the keys lie on several servers."""
    ranges = status["ranges"]
    picked: list[dict] = []
    for r in ranges:
        if len(picked) < n and (not picked or r["owners"][0] != picked[-1]["owners"][0]):
            picked.append(r)
    keys = {r["begin"] + 7 for r in picked if r["begin"] + 7 <= r["last"]}
    offset = 8
    while len(keys) < n:   # too few ranges: several keys per range
        for r in ranges:
            if len(keys) < n and r["begin"] + offset <= r["last"]:
                keys.add(r["begin"] + offset)
        offset += 1
    return sorted(keys)


def main() -> int:
    import psd

    scheduler, index, num_workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    iterations, sleep, out_path = int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
    keys = np.array(json.loads(sys.argv[7]), dtype=np.uint64)
    assert keys.size == num_workers
    kv = psd.connect(scheduler, psd.ClusterConfig(request_timeout=30.0))
    try:
        table = kv.table(TABLE, width=1, dtype="int64", updater="sum")
        mine = keys[index:index + 1]
        one = np.ones((1, 1), dtype=np.int64)
        print(f"ready {kv.node_id}", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 3
        records = []
        start = time.time()
        for c in range(iterations):
            sent = time.time()
            counts = table.pull(keys)[:, 0]
            records.append({"clock": c, "counts": counts.tolist(), "sent": sent, "t": time.time()})
            if sleep:
                time.sleep(sleep)
            table.push(mine, one)
            assert kv.clock() == c + 1
        kv.wait_all()
        result = {"index": index, "node": kv.node_id, "start": start, "end": time.time(),
                  "sleep": sleep, "records": records}
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, out_path)
        print("done", flush=True)
    finally:
        kv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A worker process for test_shm.py that is killed mid-transfer.

    python shmclient.py SCHEDULER TABLE ROWS

connects (shared memory on, the default), then pushes ``ROWS`` ones to the dense keys
0..ROWS-1 of ``TABLE`` over and over, printing ``acked N`` after the N-th push is
acknowledged and, right behind it, issuing the next one: whenever the test kills it,
a push is most likely in flight through a shared-memory segment.
"""
from __future__ import annotations

import sys

import numpy as np

import psd


def main() -> None:
    scheduler, table, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kv = psd.connect(scheduler)
    t = kv.table(table, width=1, dtype="float32")
    ones = np.ones((rows, 1), dtype=np.float32)
    n = 0
    ts = t.push_span(0, ones)
    while True:
        kv.wait(ts)
        n += 1
        ts = t.push_span(0, ones)  # in flight while the test reads the line
        print(f"acked {n}", flush=True)


if __name__ == "__main__":
    main()

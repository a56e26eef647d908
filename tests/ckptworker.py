"""A worker for checkpoint tests: each iteration pushes +1 to two keys that live on
different servers, then calls clock(). Runs until told to stop by a file."""
import sys
import time
from pathlib import Path

import numpy as np

import psd

scheduler, index, stop_file, pause = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
kv = psd.connect(scheduler)
t = kv.table("iters", dtype="int64")
keys = np.array([index, 2**63 + index], dtype=np.uint64)
ones = np.ones(2, dtype=np.int64)
n = 0
while not stop_file.exists() and n < 2000:
    t.pull(keys)                 # held by the consistency model
    kv.wait(t.push(keys, ones))
    kv.clock()
    n += 1
    time.sleep(pause)
kv.close()
print(n)

"""The scheduler is not a single point of failure: kill it mid-job, restart it on its
state folder, and the cluster and the job carry on."""
from __future__ import annotations

import time

import numpy as np

import psd
from psd.client import admin
from psd.local import daemon_argv

JOB = {
    "name": "sr", "app": "logreg_sgd",
    "data": {"generator": "sparse_logreg", "seed": 4, "examples": 30000, "features": 50000, "nnz": 10},
    "train": {"epochs": 6, "batch_size": 100, "learning_rate": 0.5},
}


def test_scheduler_killed_mid_job_resumes_tables_ring_and_job():
    with psd.LocalCluster(servers=3, replication=2) as cluster:
        keys = np.arange(0, 2**64 - 2**60, 2**60, dtype=np.uint64)
        with psd.connect(cluster.scheduler) as kv:
            kv.wait(kv.table("side", dtype="int64").push(keys, np.full(keys.size, 7, np.int64)))
        job = admin.call(cluster.scheduler, "submit", job=JOB, workers=2)["job"]
        workers = [cluster.spawn(f"worker{i}", daemon_argv(
            "worker", "--config", str(cluster.config_path), "--scheduler", cluster.scheduler, "--one-job"))
            for i in range(2)]
        deadline = time.monotonic() + 60
        while admin.call(cluster.scheduler, "job_status", job=job)["progress"] < 0.2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = cluster.status()
        cluster.restart_scheduler()  # SIGKILL, then a new scheduler on the same address and state
        after = cluster.status()
        assert after["ring_version"] == before["ring_version"]
        assert after["ranges"] == before["ranges"]
        assert "side" in after["tables"]
        deadline = time.monotonic() + 120
        while (st := admin.call(cluster.scheduler, "job_status", job=job))["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert st["state"] == "done" and st["shards_done"] == [0, 1]
        assert [m["epoch"] for m in st["metrics"] if "test_logloss" in m] == list(range(1, 7))
        for w in workers:
            assert w.proc.wait(30) == 0
        with psd.connect(cluster.scheduler) as kv:  # tables written before the restart are intact
            assert (kv.table("side", dtype="int64").pull(keys) == 7).all()
        # and the restarted scheduler still runs failover
        cluster.kill_server(0)
        deadline = time.monotonic() + 30
        while len({o for r in cluster.status()["ranges"] for o in r["owners"]}) != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with psd.connect(cluster.scheduler) as kv:
            assert (kv.table("side", dtype="int64").pull(keys) == 7).all()


PUSH_ONCE = """
import os, sys, numpy as np, psd
kv = psd.connect(sys.argv[1])
t = kv.table("once", dtype="int64")
kv.wait(t.push(np.array([5], np.uint64), np.array([[1]], np.int64)))
print(kv.node_id, flush=True)
os._exit(0)  # gone without leaving, as a crash would
"""


def test_a_worker_registered_before_a_scheduler_crash_is_not_reused_nor_its_request_ids():
    """Two worker processes one after the other, each gone without leaving, the
    scheduler SIGKILLed between them: each push is applied. The restarted scheduler used to hand the second worker the
    first one's node id (worker registrations were saved only with the next other
    change), and the servers then took its first request ids for resends of the first
    worker's and acknowledged its push without applying it."""
    import subprocess
    import sys
    with psd.LocalCluster(servers=1) as cluster:
        def push_once() -> str:
            out = subprocess.run([sys.executable, "-c", PUSH_ONCE, cluster.scheduler], capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, out.stderr[-2000:]
            return out.stdout.strip()

        with psd.connect(cluster.scheduler) as kv:
            kv.table("once", dtype="int64")  # (created here: creating it saves the scheduler's state)
        first = push_once()
        cluster.restart_scheduler()
        second = push_once()
        assert first != second
        with psd.connect(cluster.scheduler) as kv:
            assert kv.table("once", dtype="int64").pull(np.array([5], np.uint64)).item() == 2


def test_request_ids_start_apart_in_every_process():
    """The second line of defence: even a node id handed out twice does not make a new
    process's request ids look like resends of an old one's."""
    import subprocess
    import sys
    first = [int(subprocess.run([sys.executable, "-c", "from psd.core.ids import next_rid; print(next_rid())"],
                                capture_output=True, text=True, timeout=60, check=True).stdout) for _ in range(2)]
    assert first[0] != first[1] and min(first) > 1 << 20, first

"""Worker failure: a SIGKILLed worker's shards go to live workers and the job completes."""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from conftest import JobUnderWay, wait_for

import psd

JOB = {
    "name": "wf", "app": "logreg_sgd",
    "data": {"generator": "sparse_logreg", "seed": 3, "examples": 30000, "features": 50000, "nnz": 10},
    "train": {"epochs": 4, "batch_size": 100, "learning_rate": 0.5},
}


def test_killed_worker_shards_are_processed_by_the_others():
    with psd.LocalCluster(servers=2, heartbeat_interval=0.1, worker_timeout=1.0) as cluster:
        job = JobUnderWay(cluster, JOB, ranks=3, daemons=3)
        workers = job.daemons
        # wait until every rank is taken and rank 2 has made some progress, then kill its worker
        victim_id, victim = job.worker(2, above=0.1, below=0.9)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(5)

        final = job.end()
        assert final["state"] == "done", final.get("error")
        assert final["shards_done"] == [0, 1, 2]  # every shard processed
        assert final["ranks"]["2"] != victim_id  # by someone else
        events = [m for m in final["metrics"] if m.get("event") == "shard_released"]
        assert events and events[0]["rank"] == 2 and events[0]["worker"] == victim_id
        for w in workers:
            if w is not victim:
                assert w.proc.wait(30) == 0  # the others exit cleanly once the job is done


def test_a_departed_workers_request_ids_are_forgotten_after_a_while(raw_dealer):
    """A server keeps up to 65,536 request ids per worker for exactly-once; a cluster
    that outlives many jobs must not keep them for every worker it ever served. Once a
    worker has left and nothing of it arrived for ten request_timeouts (here 10 x 0.5 s),
    its ids are dropped; a worker still there keeps its own."""
    from psd.codec import Message
    keys = np.arange(4, dtype=np.uint64)
    with psd.LocalCluster(servers=1, request_timeout=0.5) as cluster, psd.connect(cluster) as stays:
        status = raw_dealer(cluster.servers[0].address).request
        t = stays.table("w", dtype="int64")
        stays.wait(t.push(keys, np.ones((4, 1), np.int64)))
        with psd.connect(cluster) as leaves:
            leaves.wait(leaves.table("w", dtype="int64").push(keys, np.ones((4, 1), np.int64)))
        assert status(Message("status")).meta["seen_senders"] == 2
        deadline = time.monotonic() + 40
        while status(Message("status")).meta["seen_senders"] != 1:
            assert time.monotonic() < deadline, "the departed worker's ids are still kept"
            time.sleep(0.2)
        np.testing.assert_array_equal(t.pull(keys).ravel(), np.full(4, 2))
        stays.wait(t.push(keys, np.ones((4, 1), np.int64)))
        np.testing.assert_array_equal(t.pull(keys).ravel(), np.full(4, 3))


def test_liveness_forgets_the_oldest_gone_peers_of_a_role_only():
    from psd.cluster.liveness import Liveness
    live = Liveness(interval=0.1, misses=4)
    for i in range(5):
        live.join(f"W{i}", "worker", 0.0)
    live.join("S0", "server", 0.0)
    for node in ("W0", "W1", "W3", "S0"):
        live.leave(node)
    assert live.forget_gone("worker", 1) == ["W0", "W1"]
    assert sorted(live.peers) == ["S0", "W2", "W3", "W4"]  # live ones, the newest gone one, servers
    assert live.forget_gone("worker", 1) == []


def test_the_scheduler_lists_only_the_newest_gone_workers(raw_dealer):
    """300 workers register and leave: status lists the 256 newest of them and no more
    (it kept every worker ever seen, in status, in its saved state and in every tick)."""
    from psd.codec import Message
    from psd.roles.scheduler import KEEP_GONE_WORKERS
    with psd.LocalCluster(servers=1, security="none") as cluster:
        d = raw_dealer(cluster.scheduler, curve=None)
        names = []
        for _ in range(KEEP_GONE_WORKERS + 44):
            node = d.request(Message("register", meta={"role": "worker"})).meta["node"]
            d.request(Message("leave", sender=node))
            names.append(node)
        listed = [n["id"] for n in cluster.status()["nodes"] if n["role"] == "worker"]
        assert listed == names[-KEEP_GONE_WORKERS:]
        with psd.connect(cluster) as kv:  # and the cluster still works
            t = kv.table("w", dtype="int64")
            kv.wait(t.push(np.arange(3, dtype=np.uint64), np.ones((3, 1), np.int64)))
            np.testing.assert_array_equal(t.pull(np.arange(3, dtype=np.uint64)).ravel(), np.ones(3))


def test_a_worker_declared_dead_that_still_pushes_keeps_its_request_ids(raw_dealer):
    """A worker that sends no heartbeats is declared dead after worker_timeout (1 s) and
    the servers are told it left; it keeps pushing for longer than the ten
    request_timeouts (10 x 0.3 s) a server waits before forgetting a departed worker's
    ids: they are kept while it pushes (a timer alone would have dropped them while its
    resends could still come), and dropped once it has been quiet that long."""
    import asyncio

    from psd.client.aio import connect
    from psd.codec import Message
    keys = np.arange(4, dtype=np.uint64)
    with psd.LocalCluster(servers=1, request_timeout=0.3, worker_timeout=1.0) as cluster:
        status = raw_dealer(cluster.servers[0].address).request

        async def push_unheard(seconds: float) -> str:
            kv = await connect(cluster.scheduler, heartbeat=False)  # (the internal form)
            try:
                t = await kv.table("w", dtype="int64")
                until = time.monotonic() + seconds
                while time.monotonic() < until:
                    await kv.wait(t.push(keys, np.ones((4, 1), np.int64)))
                    await asyncio.sleep(0.05)
                    assert status(Message("status")).meta["seen_senders"] == 1, "forgotten while pushing"
                return kv.node_id
            finally:
                await kv.close()

        worker = asyncio.run(push_unheard(4.5))
        st = cluster.status()
        assert next(n["state"] for n in st["nodes"] if n["id"] == worker) in ("dead", "left"), st["nodes"]
        deadline = time.monotonic() + 30
        while status(Message("status")).meta["seen_senders"] != 0:
            assert time.monotonic() < deadline, "a quiet departed worker's ids are still kept"
            time.sleep(0.2)


def test_the_scheduler_keeps_only_the_newest_ended_jobs(raw_dealer):
    """70 one-rank jobs run to the end: status and job_status keep the 64 newest; the
    older ones, metrics included, are forgotten, and their namespaces stay closed."""
    from psd.codec import Message
    from psd.roles.scheduler import KEEP_ENDED_JOBS
    with psd.LocalCluster(servers=1, security="none") as cluster:
        d = raw_dealer(cluster.scheduler, curve=None)
        worker = d.request(Message("register", meta={"role": "worker"})).meta["node"]
        ids = []
        for i in range(KEEP_ENDED_JOBS + 6):
            job = d.request(Message("submit", meta={"job": JOB, "workers": 1})).meta["job"]
            got = d.request(Message("job_poll", sender=worker)).meta
            assert got["job"] == job, got
            reply = d.request(Message("job_report", sender=worker, meta={
                "job": job, "rank": got["rank"], "done": True, "metrics": [{"step": i, "x": "y" * 100}]}))
            assert reply.op == "ok", reply.meta
            ids.append(job)
        deadline = time.monotonic() + 10
        while len(listed := [j["id"] for j in cluster.status()["jobs"]]) > KEEP_ENDED_JOBS:
            assert time.monotonic() < deadline, listed  # (pruned once each job's tables are dropped)
            time.sleep(0.05)
        assert listed == ids[-KEEP_ENDED_JOBS:]
        old = d.request(Message("job_status", meta={"job": ids[0]}))
        assert old.op == "error" and "unknown job" in old.meta["message"], old.meta
        with psd.connect(cluster, psd.ClusterConfig(security="none")) as kv:
            with pytest.raises(psd.BadRequestError, match="ended long ago"):
                kv.table(f"{ids[0]}/late", dtype="int64")


def test_a_server_that_joins_later_forgets_departed_workers_too(raw_dealer):
    """S0 is told W1 left; S1 joins afterwards and receives W1's ids with its range
    copies. It was never told W1 left: the copy says so, and S1 forgets them once quiet
    (it kept them forever)."""
    from psd.codec import Message
    keys = np.arange(0, 2**64 - 2**60, 2**60, dtype=np.uint64)  # in every range
    with psd.LocalCluster(servers=1, replication=2, request_timeout=0.5) as cluster:
        with psd.connect(cluster) as kv:
            kv.wait(kv.table("w", dtype="int64").push(keys, np.ones((keys.size, 1), np.int64)))
        cluster.add_server()
        status = raw_dealer(cluster.servers[1].address).request
        assert status(Message("status")).meta["seen_senders"] >= 1  # the ids came with the copy
        deadline = time.monotonic() + 40
        while status(Message("status")).meta["seen_senders"] != 0:
            assert time.monotonic() < deadline, "the joined server keeps a departed worker's ids"
            time.sleep(0.2)


def test_a_worker_stalled_past_the_timeout_gives_its_shard_up_and_registers_again():
    """SIGSTOP (as a cut-off host) holds a worker daemon past worker_timeout: it is
    declared dead and its shard goes to another worker. Woken up, it learns so from its
    next heartbeat answer, drops the shard without reporting on it (its reports would
    be refused: it no longer holds the rank) and registers again under a new id; the
    job ends done and the woken worker exits cleanly like the others."""
    with psd.LocalCluster(servers=2, heartbeat_interval=0.1, worker_timeout=1.0) as cluster:
        job = JobUnderWay(cluster, JOB, ranks=3, daemons=3)
        workers = job.daemons
        status = job.status
        victim_id, victim = job.worker(1, above=0.1, below=0.7)
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: status()["ranks"].get("1") not in (None, victim_id), 60, "rank 1 given to another")
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: "registering again" in victim.log_path.read_text(), 60, "the woken worker to register again")
        final = job.end()
        assert final["state"] == "done", final.get("error")
        assert final["shards_done"] == [0, 1, 2] and final["ranks"]["1"] != victim_id
        for w in workers:
            assert w.proc.wait(30) == 0, w.log_path.read_text()[-3000:]
        workers_known = [n["id"] for n in cluster.status()["nodes"] if n["role"] == "worker"]
        # the three and the victim again: each comeback is one id more, and each says so
        # in its log (a machine loaded past a second of no CPU for another worker gets
        # that one declared dead too, and back under a new id: 5 ids, rightly)
        again = sum(w.log_path.read_text().count("was declared dead; registering again") for w in workers)
        assert victim_id in workers_known and len(workers_known) == 3 + again, (workers_known, again)
        log = victim.log_path.read_text()
        assert "shard 1 was given to another worker" in log

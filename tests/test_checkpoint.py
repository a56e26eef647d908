"""Checkpoints against real daemons: restore equals, cuts are consistent, restarts resume."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import psd
from psd.client import admin

HERE = Path(__file__).parent
#: bounds for what starts processes (clusters, a CLI, worker interpreters): each wait ends
#: as soon as its condition holds, so only a failure waits them out. Beside 22 busy loops
#: the first test took 66 s (this process's fork server, 5 servers, a CLI interpreter)
#: of the suite's 120 s per-test timeout, and a worker interpreter several seconds to start
STARTS = 120.0


@pytest.mark.timeout(5 * STARTS)
def test_checkpoint_then_restart_from_folder_restores_every_table(tmp_path):
    rng = np.random.default_rng(5)
    keys = np.unique(rng.integers(0, 2**64, 4000, dtype=np.uint64))
    counts = rng.integers(-50, 50, (keys.size, 2)).astype(np.int32)
    emb = rng.standard_normal((300, 4)).astype(np.float64)
    with psd.LocalCluster(servers=3, replication=2, checkpoint_dir=str(tmp_path)) as cluster:
        with psd.connect(cluster.scheduler) as kv:
            kv.wait(kv.table("counts", width=2, dtype="int32").push(keys, counts))
            kv.wait(kv.table("emb", width=4, dtype="float64", updater="assign").push(keys[:300], emb))
            kv.clock()  # a checkpoint cuts at a clock boundary: end this worker's iteration
            out = subprocess.run([sys.executable, "-m", "psd", "checkpoint", "--scheduler", cluster.scheduler],
                                 capture_output=True, text=True, timeout=STARTS)
            assert out.returncode == 0, out.stderr
            assert "checkpoint 1" in out.stdout
            # written after the checkpoint: must not come back
            kv.wait(kv.table("counts", width=2, dtype="int32").push(keys, counts))
    folder = tmp_path / "ckpt-000001"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert sorted(t["name"] for t in manifest["tables"]) == ["counts", "emb"]
    assert (tmp_path / "LATEST").read_text() == "ckpt-000001"
    assert not list(tmp_path.rglob("*.tmp"))  # atomic: no half-written files left
    with psd.LocalCluster(servers=2, checkpoint_dir=str(tmp_path)) as cluster:  # fewer servers
        with psd.connect(cluster.scheduler) as kv:
            assert np.array_equal(kv.table("counts", width=2, dtype="int32").pull(keys), counts)
            assert np.array_equal(kv.table("emb", width=4, dtype="float64", updater="assign").pull(keys[:300]), emb)
            assert cluster.status()["checkpoints"]["restored_from"] == str(folder)


def test_checkpoint_names_the_workers_it_waits_for(tmp_path):
    with psd.LocalCluster(servers=1, checkpoint_dir=str(tmp_path)) as cluster:
        with psd.connect(cluster.scheduler) as kv:
            kv.wait(kv.table("t", dtype="int64").push([1], np.ones(1, np.int64)))  # never clocks
            with pytest.raises(psd.PsdTimeoutError, match=f"{kv.node_id}.*kv.clock"):
                admin.call(cluster.scheduler, "checkpoint", timeout=30, wait=1.0)
            kv.clock()  # now it can be cut, and the held push of the failed attempt is applied
            assert admin.call(cluster.scheduler, "checkpoint", timeout=30)["cut"] == 1
            assert kv.table("t", dtype="int64").pull([1])[0, 0] == 1


def test_corrupt_checkpoint_file_is_refused_by_name(tmp_path):
    from psd.store.checkpoint import read_server_file
    bad = tmp_path / "S0.psd"
    bad.write_bytes(b"not zstd at all")
    with pytest.raises(psd.ConfigError, match="S0.psd"):
        read_server_file(bad)


@pytest.mark.timeout(4 * STARTS)
@pytest.mark.parametrize("consistency", ["bounded", "eventual", "sequential"])
def test_checkpoint_is_a_consistent_cut(tmp_path, consistency):
    """Workers push +1 to two keys on different servers per iteration at different
    speeds; the checkpoint must hold, for every worker, both keys at the same count,
    and that count equal to the cut (exactly the pushes of clocks below it)."""
    ckpt = tmp_path / "ckpt"
    stop = tmp_path / "stop"
    with psd.LocalCluster(servers=2, checkpoint_dir=str(ckpt), consistency=consistency, max_delay=2,
                          num_workers=3, heartbeat_interval=0.1) as cluster:
        procs = [subprocess.Popen([sys.executable, str(HERE / "ckptworker.py"), cluster.scheduler, str(i),
                                   str(stop), str(pause)], stdout=subprocess.PIPE, text=True)
                 for i, pause in enumerate([0.0, 0.005, 0.03])]
        try:
            deadline = time.monotonic() + STARTS  # (three interpreters start, connect and clock)
            while min(cluster.status()["clocks"]["workers"].values() or [0]) < 5 or \
                    len(cluster.status()["clocks"]["workers"]) < 3:
                assert time.monotonic() < deadline, cluster.status()["clocks"]
                time.sleep(0.05)
            info = admin.call(cluster.scheduler, "checkpoint", timeout=60)
            stop.touch()
            for p in procs:
                assert p.wait(60) == 0
        finally:
            stop.touch()
            for p in procs:
                if p.poll() is None:
                    p.kill()
    from psd.store.checkpoint import read_server_file
    keys, vals = [], []
    for f in (ckpt / "ckpt-000001").glob("*.psd"):
        _, k, v, _ = read_server_file(f)["iters"]
        keys.append(k)
        vals.append(v[:, 0])
    got = dict(zip(np.concatenate(keys).tolist(), np.concatenate(vals).tolist()))
    cut = info["cut"]
    assert cut >= 5
    for i in range(3):
        assert got.get(i) == got.get(2**63 + i) == cut, (i, got, cut)


def _push_as(dealer, rid: int, keys: np.ndarray):
    """A push of +1 to ``keys`` under a fixed sender and request id, as a worker whose
    answer was lost sends it again (and, as a client does, while the server cannot yet
    confirm its lease: a fresh one waits for its first heartbeat's answer)."""
    from psd.codec import Message
    deadline = time.monotonic() + 10
    while True:
        reply = dealer.request(Message("push", sender="Wx", table="t", meta={"rid": rid},
                                       arrays=[keys, np.ones((keys.size, 1), np.int64)]))
        if reply.op == "ok" or reply.meta.get("code") != "not_owner" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply.op == "ok", reply


def test_a_push_resent_across_a_restore_is_applied_once(tmp_path):
    """Pushes whose answers were lost, resent once the cluster restarted from a checkpoint
    (decision 154): the one the checkpoint holds is not applied again, the one after it
    (lost with the restore) is applied once, and resending that again changes nothing."""
    from conftest import RawDealer
    keys = np.array([7, 2**63 + 7], np.uint64)
    with psd.LocalCluster(servers=1, security="none", checkpoint_dir=str(tmp_path)) as cluster:
        with psd.connect(cluster.scheduler) as kv:
            table = kv.table("t", dtype="int64")
            dealer = RawDealer(cluster.servers[0].address, curve=None)
            try:
                _push_as(dealer, 1, keys)
                kv.clock()  # (the checkpoint waits for this worker's clock)
                assert admin.call(cluster.scheduler, "checkpoint", timeout=30)["cut"] == 1
                _push_as(dealer, 2, keys)
                assert table.pull(keys).ravel().tolist() == [2, 2]
            finally:
                dealer.close()
    with psd.LocalCluster(servers=1, security="none", checkpoint_dir=str(tmp_path)) as cluster:
        with psd.connect(cluster.scheduler) as kv:
            table = kv.table("t", dtype="int64")
            assert table.pull(keys).ravel().tolist() == [1, 1]  # restored: push 2 was after the cut
            dealer = RawDealer(cluster.servers[0].address, curve=None)
            try:
                for rid in (1, 2, 2):
                    _push_as(dealer, rid, keys)
            finally:
                dealer.close()
            assert table.pull(keys).ravel().tolist() == [2, 2]


def test_a_push_resent_after_its_range_was_restored_elsewhere_is_applied_once(tmp_path):
    """The server of a range with no other copy dies; the scheduler gives it up and
    restores its range on the other server from the checkpoint (decision 154): a resend
    of the push the checkpoint holds is not applied again there, the one after it is."""
    from conftest import RawDealer, server_ranges, wait_for
    with psd.LocalCluster(servers=2, replication=1, security="none", checkpoint_dir=str(tmp_path),
                          heartbeat_interval=0.1, restore_unavailable_after=0.5) as cluster:
        ranges = server_ranges(cluster)
        victim = ranges[-1]
        keys = np.array([victim.last], np.uint64)
        with psd.connect(cluster.scheduler) as kv:
            table = kv.table("t", dtype="int64")
            dealer = RawDealer(victim.address, curve=None)
            try:
                _push_as(dealer, 1, keys)
                kv.clock()
                assert admin.call(cluster.scheduler, "checkpoint", timeout=30)["cut"] == 1
                _push_as(dealer, 2, keys)
            finally:
                dealer.close()
            cluster.kill_server(next(i for i in range(2) if cluster.servers[i].address == victim.address))
            wait_for(lambda: cluster.status()["restored"], 30, "the restore")
            heir = next(r for r in server_ranges(cluster) if victim.last in r)
            assert heir.address != victim.address
            assert table.pull(keys).ravel().tolist() == [1]  # restored: push 2 was after the cut
            dealer = RawDealer(heir.address, curve=None)
            try:
                for rid in (1, 2, 2):
                    _push_as(dealer, rid, keys)
            finally:
                dealer.close()
            assert table.pull(keys).ravel().tolist() == [2]

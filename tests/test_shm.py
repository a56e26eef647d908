"""Payload frames through shared memory between processes of one host (psd/transport/shm.py,
shmlink.py; docs/protocol.md, "Shared memory").

The pure parts (pools, mappings, the sweep, the handshake's checks) are tested in this
process; the rest on one real cluster (CurveZMQ on, as by default: the handshake runs
over authenticated connections) of 2 servers with replication 2, whose last test
SIGKILLs a server.
"""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

import psd
from psd.codec import Message, decode, encode
from psd.errors import ShmError
from psd.transport.shm import Budget, Mapped, Pool, ShmSettings, host_id, me, owner_of, sweep
from psd.transport.shmlink import ShmLinks

from conftest import wait_for

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def segments(pid: int | None = None) -> list[str]:
    """psd's segments under /dev/shm (of one process, if given)."""
    names = [n for n in os.listdir("/dev/shm") if owner_of(n) is not None]
    return [n for n in names if pid is None or owner_of(n)[1] == pid]


# -- pure parts ----------------------------------------------------------------------------
@pytest.fixture
def shm_dir(tmp_path):
    return str(tmp_path)


def make_pool(directory: str, max_bytes: int = 64 * MiB) -> Pool:
    return Pool(Budget(ShmSettings(dir=directory, max_bytes=max_bytes)))


def test_a_placed_buffer_is_mapped_in_place_and_freed_when_its_arrays_die(shm_dir):
    pool = make_pool(shm_dir)
    data = np.arange(300_000, dtype=np.float32)
    ref = pool.place(memoryview(data).cast("B"))
    name = msgpack.unpackb(ref)[0]
    assert os.stat(os.path.join(shm_dir, name)).st_mode & 0o777 == 0o600
    mapped = Mapped(pool.prefix, shm_dir)
    view = mapped.resolve(ref, data.nbytes)
    values = view.view(np.float32)[1000:]
    assert np.array_equal(values, data[1000:]) and not values.flags.writeable
    del view
    assert mapped.take_freed() == []  # a slice of it is still alive
    del values
    assert mapped.take_freed() == [name]
    assert pool.lent() == 1 and pool.release([name, "not-ours"]) == 1 and pool.lent() == 0
    assert msgpack.unpackb(pool.place(memoryview(data).cast("B")))[0] == name  # reused, not a new one
    pool.close()
    assert os.listdir(shm_dir) == []


def test_references_not_the_senders_or_out_of_bounds_are_refused(shm_dir):
    mine, other = make_pool(shm_dir), make_pool(shm_dir)
    buf = memoryview(np.ones(2 * MiB, np.uint8)).cast("B")
    ref_other = other.place(buf)
    ref_mine = mine.place(buf)
    mapped = Mapped(mine.prefix, shm_dir)
    name = msgpack.unpackb(ref_mine)[0]
    bad = {
        "another pool's segment": (ref_other, 100),
        "a path out of the folder": (msgpack.packb([mine.prefix + "1/../../etc/passwd", 0]), 100),
        "bytes past the end": (ref_mine, 64 * MiB),
        "an offset past the end": (msgpack.packb([name, 2**40]), 1),
        "a negative offset": (msgpack.packb([name, -1]), 1),
        "no msgpack": (b"\xc1garbage", 1),
        "a huge reference": (b"x" * 1000, 1),
    }
    for what, (ref, nbytes) in bad.items():
        with pytest.raises(ShmError):
            mapped.resolve(ref, nbytes)
        assert mapped.take_freed() == [], what
    # a file of ours that others may read is not a segment we trust
    os.chmod(os.path.join(shm_dir, name), 0o644)
    with pytest.raises(ShmError, match="0600"):
        Mapped(mine.prefix, shm_dir).resolve(ref_mine, 100)
    mine.close()
    other.close()


def test_a_frame_in_shared_memory_on_a_connection_without_it_is_refused():
    msg = Message("push", id=7, table="t", arrays=[np.ones((MiB, 1), np.float32)])
    frames = encode(msg, place=lambda buf: msgpack.packb(["psd-00000000-1-1-x.1", 0]))
    assert len(frames[1]) < 100  # the reference, not the bytes
    with pytest.raises(ShmError, match="agreed on none"):
        decode(frames)


def test_the_pool_stays_within_its_budget_and_then_declines(shm_dir):
    pool = make_pool(shm_dir, max_bytes=8 * MiB)
    buf = memoryview(np.ones(3 * MiB, np.uint8)).cast("B")
    refs = [pool.place(buf), pool.place(buf)]
    assert all(refs) and pool.place(buf) is None and pool.failed == 1  # all lent: inline
    pool.release([msgpack.unpackb(refs[0])[0]])
    assert pool.place(buf) is not None
    pool.close()


def test_a_pool_over_the_budget_takes_free_segments_of_other_pools(shm_dir):
    budget = Budget(ShmSettings(dir=shm_dir, max_bytes=6 * MiB))
    quiet, busy = Pool(budget), Pool(budget)
    buf = memoryview(np.ones(3 * MiB, np.uint8)).cast("B")
    quiet.release([msgpack.unpackb(quiet.place(buf))[0]])  # used once, then free
    assert busy.place(buf) is not None and busy.place(buf) is not None  # the second needs quiet's room
    assert quiet.names() == [] and budget.used == 6 * MiB
    quiet.close()
    busy.close()


def test_a_missing_folder_means_no_segment_and_no_handshake(tmp_path):
    pool = make_pool(str(tmp_path / "missing"))
    assert pool.place(memoryview(np.ones(2 * MiB, np.uint8)).cast("B")) is None
    links = ShmLinks(Budget(ShmSettings(dir=str(tmp_path / "missing"))), router=False)
    assert links.hello() is None


def test_the_sweep_removes_segments_of_dead_processes_only(shm_dir):
    ns, pid, start = me()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)
    names = {f"psd-{ns}-{dead}-{start}-abc.1": True,         # no such process any more
             f"psd-{ns}-{pid}-{start + 1}-abc.1": True,       # this pid, another start: reused pid
             f"psd-{ns}-{pid}-{start}-abc.1": False,          # this process
             f"psd-ffffffff-{dead}-{start}-abc.1": False,     # another pid namespace: not ours to judge
             "not-psd": False}
    for name in names:
        Path(shm_dir, name).write_bytes(b"x")
    removed = sweep(shm_dir)
    assert sorted(removed) == sorted(n for n, gone in names.items() if gone)
    assert sorted(os.listdir(shm_dir)) == sorted(n for n, gone in names.items() if not gone)


def test_the_handshake_is_refused_when_off_elsewhere_or_claimed(shm_dir):
    client = ShmLinks(Budget(ShmSettings(dir=shm_dir)), router=False)
    hello, pool, probe = client.hello()
    off = ShmLinks(Budget(ShmSettings(enabled=False, dir=shm_dir)), router=True)
    assert off.on_hello(b"r1", hello).meta == {"shm": False, "reason": "shared memory is off here (shm: false)"}
    server = ShmLinks(Budget(ShmSettings(dir=shm_dir)), router=True)
    elsewhere = Message("shm_hello", meta={**hello.meta, "host": "another-boot/another-host"})
    assert server.on_hello(b"r1", elsewhere).meta["reason"] == "another host"
    forged = Message("shm_hello", meta={**hello.meta, "nonce": b"0" * 16})
    assert server.on_hello(b"r1", forged).meta["reason"] == "the probe does not hold the nonce"
    assert server.on_hello(b"r1", hello).meta["shm"] is True
    assert server.on_hello(b"r2", hello).meta["reason"] == "that prefix belongs to another connection"
    assert client.answered(pool, server.on_hello(b"r1", hello), None) and None in client.peers
    assert client.placer(None) is not None
    # the bound side answers inline until the connecting side confirms (it may have
    # given up waiting for the handshake's answer): its first shm_free
    assert server.placer(b"r1") is None
    server.on_free(b"r1", Message("shm_free", meta={"names": []}))
    assert server.placer(b"r1") is not None
    os.unlink(probe)
    client.close()
    server.close()


def test_a_process_in_another_network_namespace_counts_as_another_host(shm_dir):
    """psd/testing/netcluster.py's hosts are network namespaces of one machine: they
    share /dev/shm, but must talk as hosts do (TCP)."""
    if os.geteuid() != 0 or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        pytest.skip("needs root and iproute2 to make a network namespace")
    ns = f"psdshm-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        there = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                                "from psd.transport.shm import host_id; print(host_id())"],
                               capture_output=True, text=True, check=True, env=os.environ.copy()).stdout.strip()
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=True)
    assert there and there != host_id() and there.split("/")[:2] == host_id().split("/")[:2]
    client = ShmLinks(Budget(ShmSettings(dir=shm_dir)), router=False)
    hello, pool, probe = client.hello()
    hello.meta["host"] = there
    server = ShmLinks(Budget(ShmSettings(dir=shm_dir)), router=True)
    assert server.on_hello(b"r1", hello).meta == {"shm": False, "reason": "another host"}
    os.unlink(probe)
    pool.close()


@pytest.mark.asyncio
async def test_a_peer_that_forgot_the_handshake_gets_the_request_again_inline(shm_dir):
    """A server restarted at the same address (or one that dropped our connection's
    state) refuses a reference with ``shm``: the client's transport sends the same
    request inline, the caller sees only the answer, and a new handshake follows."""
    import zmq
    import zmq.asyncio

    from psd.transport import RpcSocket

    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    seen = []

    def handler(route, msg):
        seen.append(float(msg.arrays[0].sum()))
        return msg.reply(meta={"sum": seen[-1]})

    settings = ShmSettings(dir=shm_dir)
    server = RpcSocket(router, "S-test", handler=handler, router=True, shm=Budget(settings))
    client = RpcSocket(dealer, "W-test", shm=Budget(settings))
    tasks = [asyncio.ensure_future(server.serve()), asyncio.ensure_future(client.serve())]
    try:
        for _ in range(200):  # the handshake, answered and confirmed
            if None in client.shm.peers and all(p.confirmed for p in server.shm.peers.values()) \
                    and server.shm.peers:
                break
            await asyncio.sleep(0.01)
        values = np.arange(MiB, dtype=np.float32)
        reply = await client.call(Message("push", arrays=[values]), timeout=5)
        assert reply.meta["sum"] == float(values.sum()) and client.shm_stats()["frames_out"] == 1
        for peer in server.shm.peers.values():  # the server forgets the connection
            peer.close()
        server.shm.peers.clear()
        reply = await client.call(Message("push", arrays=[2 * values]), timeout=5)
        assert reply.meta["sum"] == 2 * float(values.sum())
        assert seen == [float(values.sum()), 2 * float(values.sum())]  # applied once each
        assert client.shm_stats()["refused"] == 1 and not client.shm.peers  # TCP now
        client.shm.hello_at = None  # (skip the second's wait)
        client.shm_tick()
        for _ in range(200):
            if None in client.shm.peers:
                break
            await asyncio.sleep(0.01)
        assert None in client.shm.peers, "no new handshake"
    finally:
        for t in tasks:
            t.cancel()
        server.close()
        client.close()
        ctx.term()


# -- a real cluster ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    with psd.LocalCluster(servers=2, replication=2) as c:
        yield c


def rpc_stats(kv) -> list[dict]:
    return [rpc.shm_stats() or {} for rpc in kv.aio._servers.values()]


def wait_for_handshakes(kv, table, timeout: float = 20.0) -> None:
    """Until every server connection of ``kv`` has agreed on shared memory. The
    handshake runs beside the first requests (which go by TCP meanwhile), on the
    blocking client's loop, which runs inside its calls: small pulls keep it going."""
    deadline = time.monotonic() + timeout
    while not all(st.get("peers") for st in rpc_stats(kv)):
        assert time.monotonic() < deadline, f"no shared-memory handshake in {timeout} s: {rpc_stats(kv)}"
        table.pull_span(0, 1)
        time.sleep(0.02)


def test_pushes_and_pulls_through_shared_memory_give_the_tables_tcp_gives(cluster):
    rng = np.random.default_rng(5)
    dense = rng.standard_normal((400_000, 4)).astype(np.float32)          # 6.4 MB a push
    keys = np.unique(rng.integers(0, 2**64 - 1, 300_000, dtype=np.uint64))  # across every server
    sparse = rng.standard_normal((keys.size, 2))                           # 4.8 MB of float64
    results = {}
    for shm in (True, False):
        kv = psd.connect(cluster, psd.ClusterConfig(shm=shm))
        try:
            d = kv.table(f"dense_{shm}", width=4, dtype="float32")
            s = kv.table(f"sparse_{shm}", width=2, dtype="float64", updater="adagrad")
            for _ in range(2):
                kv.wait(d.push_span(2**40, dense))
                kv.wait(s.push(keys, sparse))
            results[shm] = (np.array(d.pull_span(2**40, dense.shape[0])), np.array(s.pull(keys)))
            stats = rpc_stats(kv)
            if shm:
                assert sum(st.get("frames_out", 0) for st in stats) >= 4, stats  # pushes went that way
                assert sum(st.get("frames_in", 0) for st in stats) >= 1, stats   # and pull replies came
                assert segments(os.getpid()), "no segment of this process"
            else:
                assert all(not st.get("peers") and not st.get("frames_out") for st in stats), stats
        finally:
            kv.close()
    assert np.array_equal(results[True][0], 2 * dense)
    assert np.array_equal(results[True][0], results[False][0])
    assert np.array_equal(results[True][1], results[False][1])
    assert not segments(os.getpid())  # closed: this process's segments are gone


def test_pulled_arrays_are_the_clients_own_and_give_their_segment_back_at_once(cluster):
    """A pull's answer through shared memory is copied out on arrival: the arrays are
    writable as over TCP, and the server reuses one segment however many of them the
    client keeps (no cyclic garbage collection needed, so it is off here)."""
    from psd.client import admin
    rows = 2 * MiB // 4
    kv = psd.connect(cluster)
    try:
        t = kv.table("reused", width=1, dtype="float32")
        kv.wait(t.push_span(0, np.ones((rows, 1), np.float32)))
        node = kv.aio.ring.owners_at(0)[0]
        address = kv.aio.ring.addresses[node]
        before = admin.call(address, "status", config=psd.ClusterConfig(keys=str(cluster.keys)))["shm"]
        kept = []
        gc.disable()
        try:
            for _ in range(20):
                kept.append(t.pull_span(0, rows))
                assert kept[-1][-1, 0] == 1 and kept[-1].flags.writeable
        finally:
            gc.enable()
        kept[0] += 1  # the caller's own memory: another pull's array does not change
        assert kept[1][0, 0] == 1 and kept[0][0, 0] == 2
        after = admin.call(address, "status", config=psd.ClusterConfig(keys=str(cluster.keys)))["shm"]
        assert after["bytes_out"] - before["bytes_out"] >= 20 * rows * 4  # through shared memory
        assert after["segment_bytes"] - before["segment_bytes"] <= 2 * rows * 4, (before, after)
    finally:
        kv.close()


def test_a_push_kept_past_its_ack_keeps_its_segment_until_applied(cluster):
    """Under sequential consistency a server acks a push and keeps it for the clock
    boundary: the sender must not reuse the segment meanwhile (it is freed when the
    server's arrays die, not with the ack)."""
    rows = 2 * MiB // 4
    first, second = np.full((rows, 1), 1, np.float32), np.full((rows, 1), 10, np.float32)
    kv = psd.connect(cluster)
    try:
        t = kv.table("kept", width=1, dtype="float32", consistency="sequential")
        wait_for_handshakes(kv, t)
        kv.clock()  # a member of the clock group now: its pushes wait for its next clock
        kv.wait(t.push_span(0, first))
        kv.wait(t.push_span(0, second))  # both acked, neither applied yet
        lent = sum(st.get("lent", 0) for st in rpc_stats(kv))
        kv.clock()
        values = t.pull_span(0, rows)
        assert lent >= 2, "both segments stay lent while the server keeps the pushes"
        assert values.min() == values.max() == 11
    finally:
        kv.close()


def test_a_reference_to_a_segment_not_the_senders_is_refused_and_nothing_applied(cluster):
    n = 2 * MiB // 4
    ones = np.ones((n, 1), np.float32)

    async def main():
        kv = await psd.aio.connect(cluster.scheduler)
        other = await psd.aio.connect(cluster.scheduler)
        try:
            t = await kv.table("forged", width=1, dtype="float32")
            await kv.wait(t.push_span(0, ones))
            o = await other.table("forged", width=1, dtype="float32")
            await other.wait(o.push_span(0, ones))
            rpc = next(r for r in kv._servers.values() if r.shm is not None and None in r.shm.peers)
            orpc = next(r for r in other._servers.values() if r.shm is not None and None in r.shm.peers)
            theirs = orpc.shm.peers[None].pool.names()[0]
            mine = rpc.shm.peers[None].pool.names()[0]
            refusals = {"another client's segment": msgpack.packb([theirs, 0]),
                        "past the end of my own": msgpack.packb([mine, 1 << 40])}
            for what, ref in refusals.items():
                msg = Message("push", table=t.name, meta={"spans": [[0, n]], "rid": 2**40},
                              arrays=[np.zeros((n, 1), np.float32)])
                msg.id, msg.sender = rpc.next_id(), kv.node_id
                fut = asyncio.get_running_loop().create_future()
                rpc.pending[msg.id] = fut
                rpc._put(None, encode(msg, place=lambda buf: ref))
                reply = await asyncio.wait_for(fut, 5)
                assert reply.op == "error" and reply.meta["code"] == "shm", (what, reply)
                assert ("not one of the sender's" if "another" in what else "outside") in reply.meta["message"]
            # nothing applied, and every server still serves, through shared memory too
            for server_rpc in kv._servers.values():
                assert (await server_rpc.call(Message("status"), timeout=5)).op == "ok"
            await kv.wait(t.push_span(0, ones))
            assert np.array_equal(await t.pull_span(0, n), 3 * ones)
        finally:
            await kv.close()
            await other.close()
    asyncio.run(main())


def test_sigkill_of_a_client_mid_transfer_loses_no_acked_push_and_leaves_no_segment(cluster):
    rows = 2 * MiB // 4
    child = subprocess.Popen([sys.executable, str(HERE / "shmclient.py"), cluster.scheduler, "killed_client",
                              str(rows)], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        acked = 0
        deadline = time.monotonic() + 30
        while acked < 8 and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line.startswith("acked "), line
            acked = int(line.split()[1])
        assert segments(child.pid), "the client sent no push through shared memory"
        child.send_signal(signal.SIGKILL)
        child.wait(5)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    kv = psd.connect(cluster, psd.ClusterConfig(shm=False))
    try:
        values = kv.table("killed_client", width=1, dtype="float32").pull_span(0, rows)
    finally:
        kv.close()
    assert values.min() == values.max() >= acked  # every acked push, each whole or not at all
    # the servers sweep every SHM_TICK (2 s): the dead client's segments go
    wait_for(lambda: not segments(child.pid), 10, "the killed client's segments to be removed")


def test_sigkill_of_a_server_mid_transfer_loses_no_acked_push_and_leaves_no_segment(cluster):
    rows = 2 * MiB // 4
    ones = np.ones((rows, 1), np.float32)
    kv = psd.connect(cluster)
    try:
        t = kv.table("killed_server", width=1, dtype="float32")
        kv.wait(t.push_span(0, ones))
        primary = kv.aio.ring.owners_at(0)[0]  # it forwards each push to its replica
        victim = cluster.server(primary)
        pid = victim.proc.pid
        wait_for(lambda: segments(pid), 5, "the server to forward through shared memory")
        acked = 1
        for i in range(6):
            ts = t.push_span(0, ones)
            if i == 2:
                cluster.kill_server(primary)  # (a push is on its way; the ring change re-routes it)
            kv.wait(ts)
            acked += 1
        values = t.pull_span(0, rows)
        assert values.min() == values.max() == acked
    finally:
        kv.close()
    wait_for(lambda: not segments(pid), 10, "the killed server's segments to be removed")

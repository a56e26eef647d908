"""A push a replica refuses is never acknowledged (real processes, replication 2).

S1 runs with a lower ``limits.max_keys`` than S0, so it refuses the forward of a push
of 500 keys that S0 leads and applied. The old primary acknowledged such a push anyway;
a SIGKILL of S0 then lost an acknowledged update. Now S0 answers ``not_replicated``,
the client resends the push under its request id until ``request_timeout`` and then
raises ``NotReplicatedError`` naming the replica; pushes the replica takes are
acknowledged and survive the primary's death."""
from __future__ import annotations

import signal
import time
import urllib.request

import numpy as np
import pytest

import psd

TIMEOUT = 2.0  # the client's request_timeout: how long it resends a refused push


def _range_led_by(kv: psd.KVWorker, leader: str, follower: str) -> tuple[int, int]:
    ring = kv.aio.ring
    for r, owners in zip(ring.ranges, ring.owners):
        if owners[0] == leader and follower in owners and r.end - r.begin > 1000:
            return r.begin, r.end
    raise AssertionError(f"no range led by {leader} with a replica on {follower}: {ring}")


def _counters(cluster: psd.LocalCluster, node: str) -> dict:
    return next(n for n in cluster.status()["nodes"] if n["id"] == node)["counters"]


def _wait_for_ring_over(cluster: psd.LocalCluster, servers: set[str], timeout: float = 20.0) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        st = cluster.status()
        if not st["ring_changing"] and {o for r in st["ranges"] for o in r["owners"]} == servers:
            return
        time.sleep(0.05)
    raise AssertionError(f"the ring did not come to be over {servers} within {timeout} s")


def test_a_push_a_replica_refuses_is_not_acknowledged_and_acked_pushes_survive():
    with psd.LocalCluster(servers=1, replication=2) as cluster:
        cluster.add_server(args=("--limits-max-keys", "100"))
        s0, s1 = cluster.node_id(0), cluster.node_id(1)
        with psd.connect(cluster, psd.ClusterConfig(request_timeout=TIMEOUT)) as kv:
            t = kv.table("w", width=1, dtype="int64")
            begin, _ = _range_led_by(kv, s0, s1)
            big = np.arange(begin, begin + 500, dtype=np.uint64)  # over S1's max_keys
            small = np.arange(begin + 600, begin + 650, dtype=np.uint64)
            ones = np.ones((big.size, 1), np.int64)

            started = time.monotonic()
            with pytest.raises(psd.NotReplicatedError) as err:
                kv.wait(t.push(big, ones))
            assert time.monotonic() - started >= TIMEOUT * 0.9  # resent until the timeout
            assert err.value.data.get("replica") == s1, err.value.data
            assert s1 in str(err.value) and "max_keys" in str(err.value), str(err.value)
            with pytest.raises(psd.NotReplicatedError):
                t.pushpull(big, ones)
            # refused again at every resend, each applied once on S0
            assert _counters(cluster, s0)["not_replicated"] >= 4
            np.testing.assert_array_equal(t.pull(big).ravel(), np.full(big.size, 2))

            # S0 still serves, and a push S1 takes is acknowledged
            kv.wait(t.push(small, np.arange(small.size, dtype=np.int64).reshape(-1, 1)))
            np.testing.assert_array_equal(t.pushpull(small, np.ones((small.size, 1), np.int64)).ravel(),
                                          np.arange(small.size) + 1)

        cluster.kill_server(0, signal.SIGKILL)
        _wait_for_ring_over(cluster, {s1})
        with psd.connect(cluster) as kv:
            t = kv.table("w", width=1, dtype="int64")
            # what was acknowledged survived S0; what was refused never reached S1
            np.testing.assert_array_equal(t.pull(small).ravel(), np.arange(small.size) + 1)
            for i in range(0, big.size, 100):  # (S1 takes at most 100 keys a request)
                np.testing.assert_array_equal(t.pull(big[i:i + 100]).ravel(), np.zeros(100))


def test_a_forward_a_replica_never_answers_is_not_acknowledged_either():
    """S1 takes messages of at most 200 kB (twice its max_message_bytes): ZeroMQ drops
    the 640 kB forward and the connection with it, so S1 never answers. The primary
    gives up after its request_timeout (1.5 s) and answers not_replicated; it used to
    wait as long as S1 stayed in the ring, and its pending acks never emptied."""
    with psd.LocalCluster(servers=1, replication=2, request_timeout=1.5, metrics="127.0.0.1:0") as cluster:
        cluster.add_server(args=("--limits-max-message-bytes", "100000"))
        s0, s1 = cluster.node_id(0), cluster.node_id(1)
        with psd.connect(cluster, psd.ClusterConfig(request_timeout=5.0)) as kv:
            t = kv.table("w", width=1, dtype="int64")
            ring = kv.aio.ring
            begin = next(r.begin for r, o in zip(ring.ranges, ring.owners)
                         if o[0] == s0 and s1 in o and r.end - r.begin > 100_000)
            big = np.arange(begin, begin + 40_000, dtype=np.uint64)  # 320 kB keys + 320 kB values
            with pytest.raises(psd.NotReplicatedError) as err:
                kv.wait(t.push(big, np.ones((big.size, 1), np.int64)))
            assert err.value.data.get("replica") == s1 and err.value.data.get("reason") == "timeout", err.value.data
            small = np.arange(begin + 50_000, begin + 50_010, dtype=np.uint64)
            kv.wait(t.push(small, np.ones((small.size, 1), np.int64)))  # S0 and S1 still serve
        node = next(n for n in cluster.status()["nodes"] if n["id"] == s0)
        assert node["counters"]["not_replicated"] >= 1
        # each forward given up on is no longer awaited (it was, forever: one entry a
        # resend); the last one gives up request_timeout after it was sent
        deadline = time.monotonic() + 10
        while (waiting := _pending_forwards(node["metrics"], s1)) != 0:
            assert time.monotonic() < deadline, f"{waiting} forward(s) to {s1} still awaited"
            time.sleep(0.2)


def _pending_forwards(metrics: str, replica: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    line = next(x for x in text.splitlines()
                if x.startswith(f'psd_server_replica_pending_forwards{{replica="{replica}"}}'))
    return float(line.split()[-1])


def test_a_request_given_up_leaves_nothing_waiting():
    """A push whose server is frozen past request_timeout raises PsdTimeoutError, and
    its part is no longer awaited on the connection (it was left there, and failed at
    close: 'Future exception was never retrieved')."""
    with psd.LocalCluster(servers=1, heartbeat_interval=1.0) as cluster, \
            psd.connect(cluster, psd.ClusterConfig(request_timeout=0.5, heartbeat_interval=1.0)) as kv:
        t = kv.table("w", width=1, dtype="int64")
        keys = np.arange(5, dtype=np.uint64)
        kv.wait(t.push(keys, np.ones((5, 1), np.int64)))
        node = cluster.node_id(0)
        server = cluster.servers[0]
        server.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(psd.PsdTimeoutError):
                kv.wait(t.push(keys, np.ones((5, 1), np.int64)))
            assert kv.aio.server_socket(node).pending == {}
        finally:
            server.proc.send_signal(signal.SIGCONT)
        np.testing.assert_array_equal(t.pull(keys).ravel(), np.full(5, 2))  # applied once, when thawed

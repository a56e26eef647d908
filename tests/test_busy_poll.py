"""``busy_poll_us`` and ``adaptive_poll_us``: spin instead of sleeping for a while, on a
real server and a real client. The spinning is seen where it costs: CPU time that a
sleeping process would not use. ``busy_poll_us`` off (the default) nothing spins but
the adaptive server spin, which follows only requests that come close together; a spin
always ends, and a server that spins under steady traffic still runs its heartbeats and
never takes itself for stalled.

The first two tests use a 1 s heartbeat so that a spin may last long enough (up to a
quarter of it) to be measured in CPU time."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

import psd

KEYS = np.arange(8, dtype=np.uint64) * 11
TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _wanted(pid: int) -> float:
    """Seconds the main thread of process ``pid`` has run or waited runnable for a core
    (the kernel's schedstat): a spin counts in full however loaded the machine is,
    where its CPU time is only the share of a core it got."""
    ran, waited = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[:2]
    return (int(ran) + int(waited)) / 1e9


def _server_cpu_after_one_pull(busy_us: int) -> tuple[float, float, float, np.ndarray]:
    """The time the server wanted a core and the CPU it spent in the 0.6 s after
    answering one pull, then its CPU in 0.6 s with no request at all; and what the
    pull read."""
    with psd.LocalCluster(servers=1, busy_poll_us=busy_us, heartbeat_interval=1.0) as cluster, \
            psd.connect(cluster) as kv:
        t = kv.table("w", width=1, dtype="int64")
        kv.wait(t.push(KEYS, np.arange(KEYS.size, dtype=np.int64).reshape(-1, 1)))
        pid = cluster.servers[0].pid
        time.sleep(0.6)  # any spin of the set-up is over
        before, wanted = _cpu(pid), _wanted(pid)
        got = t.pull(KEYS)
        time.sleep(0.6)
        after = _cpu(pid)
        wanted = _wanted(pid) - wanted
        time.sleep(0.6)
        return wanted, after - before, _cpu(pid) - after, got


def test_a_server_spins_after_answering_only_when_asked_to_and_only_for_a_while():
    # a 0.25 s spin wants a core for 0.25 s under any load (its CPU time fell to 0.05 s
    # beside two busy loops); a sleeping server uses 0.01 s of CPU (bounds with room)
    spun, _, idle, got = _server_cpu_after_one_pull(250_000)
    np.testing.assert_array_equal(got.ravel(), np.arange(KEYS.size))
    _, plain, plain_idle, _ = _server_cpu_after_one_pull(0)
    assert spun >= 0.15, f"busy_poll_us=250000: the server wanted a core for {spun:.2f} s after a pull"
    assert plain < 0.06, f"busy_poll_us=0: the server used {plain:.2f} s of CPU after a pull"
    assert idle < 0.06 and plain_idle < 0.06, (idle, plain_idle)


def _thread_sched() -> tuple[float, float]:
    """Seconds the calling thread has run and has waited runnable for a core (the
    kernel's schedstat): a spinning thread is runnable all along, on a core or waiting
    for one, whatever the load; a sleeping one is neither."""
    ran, waited = open(f"/proc/self/task/{threading.get_native_id()}/schedstat").read().split()[:2]
    return int(ran) / 1e9, int(waited) / 1e9


def _client_cpu_waiting(cluster: psd.LocalCluster, busy_us: int) -> tuple[float, float]:
    """CPU the calling thread used during a pull whose server is frozen for 0.4 s, and
    the time it wanted a core (used it or waited runnable for one)."""
    with psd.connect(cluster, psd.ClusterConfig(busy_poll_us=busy_us, heartbeat_interval=1.0)) as kv:
        t = kv.table("w", width=1, dtype="int64")
        t.pull(KEYS)
        server = cluster.servers[0]
        server.proc.send_signal(signal.SIGSTOP)
        thaw = threading.Timer(0.4, server.proc.send_signal, (signal.SIGCONT,))
        thaw.start()
        try:
            ran, waited = _thread_sched()
            np.testing.assert_array_equal(t.pull(KEYS).ravel(), np.arange(KEYS.size))
            ran2, waited2 = _thread_sched()
            return ran2 - ran, ran2 - ran + waited2 - waited
        finally:
            thaw.join()
            server.proc.send_signal(signal.SIGCONT)


def test_a_client_spins_while_it_waits_only_when_asked_to():
    with psd.LocalCluster(servers=1, heartbeat_interval=1.0) as cluster:
        with psd.connect(cluster) as kv:
            t = kv.table("w", width=1, dtype="int64")
            kv.wait(t.push(KEYS, np.arange(KEYS.size, dtype=np.int64).reshape(-1, 1)))
        _, spun = _client_cpu_waiting(cluster, 200_000)
        plain, _ = _client_cpu_waiting(cluster, 0)
    # a try spins until its 50 ms retry tick (one or two tries: 0.055 to 0.11 s measured
    # alone): the thread wants a core all that time, though under load it runs for only
    # part of it (its CPU time fell to 0.016 s of 0.1 s beside two busy loops, so CPU
    # time alone cannot tell a spin from a sleep there); a client that sleeps uses a few
    # ms of CPU (and wanted a core for under 0.01 s)
    assert spun >= 0.04, f"busy_poll_us=200000: the client wanted a core for {spun:.3f} s of its wait"
    assert plain < 0.015, f"busy_poll_us=0: the client used {plain:.3f} s of CPU waiting"


def test_a_server_under_steady_traffic_spins_in_bounded_passes():
    """A request every 12 ms with the largest spin allowed (a quarter of the 0.1 s
    heartbeat): each drain pass spins within one budget, not once per message (which
    blocked the loop for up to 64 budgets, past the 0.7 s stall alarm: the server then
    refused every request until its next heartbeat was answered)."""
    with psd.LocalCluster(servers=1, busy_poll_us=25_000) as cluster, \
            psd.connect(cluster, psd.ClusterConfig(busy_poll_us=25_000)) as kv:
        t = kv.table("w", width=1, dtype="int64")
        kv.wait(t.push(KEYS, np.arange(KEYS.size, dtype=np.int64).reshape(-1, 1)))
        slowest, until = 0.0, time.monotonic() + 2.5
        while time.monotonic() < until:
            started = time.monotonic()
            np.testing.assert_array_equal(t.pull(KEYS).ravel(), np.arange(KEYS.size))
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.012)
        log = cluster.servers[0].log_path.read_text()
    assert "stalled" not in log, log[-2000:]
    assert slowest < 0.5, f"a pull took {slowest:.2f} s"


def _server_cpu_after_bursts(adaptive_us: int) -> tuple[float, float, float]:
    """The time the server wanted a core and the CPU it spent in the 0.6 s after the last
    of 30 back-to-back pulls, and its CPU over four pulls 0.3 s apart plus four
    iterations (pull, push, clock) 0.3 s apart."""
    with psd.LocalCluster(servers=1, adaptive_poll_us=adaptive_us, heartbeat_interval=1.0) as cluster, \
            psd.connect(cluster) as kv:
        t = kv.table("w", width=1, dtype="int64")
        kv.wait(t.push(KEYS, np.arange(KEYS.size, dtype=np.int64).reshape(-1, 1)))
        pid = cluster.servers[0].pid
        time.sleep(0.6)
        for _ in range(30):  # each request follows the last answer within a round trip
            np.testing.assert_array_equal(t.pull(KEYS).ravel(), np.arange(KEYS.size))
        before, wanted = _cpu(pid), _wanted(pid)
        time.sleep(0.6)
        burst, burst_wanted = _cpu(pid) - before, _wanted(pid) - wanted
        before = _cpu(pid)
        for _ in range(4):  # further apart than the 0.2 s budget
            np.testing.assert_array_equal(t.pull(KEYS).ravel(), np.arange(KEYS.size))
            time.sleep(0.3)
        spaced = _cpu(pid) - before
        before = _cpu(pid)
        for _ in range(4):  # an iteration: a pull, a push and the one-way clock behind it
            t.pull(KEYS)
            t.push(KEYS, np.zeros((KEYS.size, 1), np.int64))
            kv.clock()
            time.sleep(0.3)
        return burst_wanted, burst, spaced + _cpu(pid) - before


def test_a_server_spins_adaptively_only_while_requests_come_close_together():
    burst, _, spaced = _server_cpu_after_bursts(200_000)
    plain_wanted, plain_burst, plain_spaced = _server_cpu_after_bursts(0)
    # after a burst the server checks for a next request for the whole 0.2 s budget: it
    # wants a core for 0.2 s under any load (its CPU time fell to 0.05 s beside busy
    # loops); requests 0.3 s apart never make it spin, nor does a push with a clock
    # right behind it, nor anything with adaptive_poll_us 0
    assert burst >= 0.12, f"adaptive_poll_us=200000: the server wanted a core for {burst:.2f} s after a burst"
    assert plain_wanted < 0.12, f"adaptive_poll_us=0: the server wanted a core for {plain_wanted:.2f} s"
    assert spaced < 0.06, f"adaptive_poll_us=200000: {spaced:.2f} s of CPU over requests 0.3 s apart"
    assert plain_burst < 0.06 and plain_spaced < 0.06, (plain_burst, plain_spaced)

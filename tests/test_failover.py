"""Failover with real processes and real signals (issue 5).

Each test starts a LocalCluster (integer tables, replication 2), runs worker processes
(tests/streamworker.py) that push without pause and record which pushes were acked,
and meanwhile SIGKILLs, SIGSTOPs/SIGCONTs, adds or drains servers. Afterwards every key
must hold exactly the sum of the acked pushes (none lost, none applied twice), and
every push must have been acked: a failover may stall writes, never fail them.

Every wait is bounded; clusters and workers are cleaned up by ``with``/``finally``
even when an assertion fails.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import psd
from psd.codec import Message, decode, encode

from streamworker import POOL, TABLES, expected
from workerprocs import WorkerProcs, closing

WORKER = Path(__file__).with_name("streamworker.py")
REPLICATION = 2
#: bound on any one wait for the cluster to reach a state (a failover takes ~1 s)
SETTLE_TIMEOUT = 20.0
#: the stall a SIGKILL may cause in this test (the benchmark checks the 1 s target;
#: a loaded 2-core CI machine must not make this flaky)
MAX_STALL = 3.0


# -- worker processes ------------------------------------------------------------------
class Stream(WorkerProcs):
    """Worker processes pushing from ``go()`` until ``stop()``; ``stop`` returns their
    records (acked indices per seed, ack times, failures)."""

    def __init__(self, scheduler: str, seeds: list[int], tmp_path: Path, window: int = 8):
        super().__init__(WORKER, scheduler, seeds, tmp_path, window, ready_timeout=SETTLE_TIMEOUT)


def check_exact(cluster: psd.LocalCluster, records: list[dict], min_acked: int = 50) -> None:
    """Every push acked, and every key holds exactly the sum of the acked pushes."""
    for r in records:
        assert not r["failed"] and not r["unfinished"], (
            f"worker {r['seed']}: {len(r['failed'])} push(es) failed, {len(r['unfinished'])} unfinished: "
            f"{r['failed'][:3]}")
        assert len(r["acked"]) == r["issued"]
    total = sum(len(r["acked"]) for r in records)
    assert total >= min_acked, f"only {total} pushes were acked; the stream hardly ran"
    want = expected({r["seed"]: [i for i, _ in r["acked"]] for r in records})
    with psd.connect(cluster.scheduler) as kv:
        for (name, dtype, width), ref in zip(TABLES, want):
            got = kv.table(name, width=width, dtype=dtype, updater="sum").pull(POOL)
            bad = np.flatnonzero((got != ref).any(axis=1))
            assert bad.size == 0, (
                f"table {name}: {bad.size} of {POOL.size} keys differ from the sum of the {total} acked "
                f"pushes, e.g. key {int(POOL[bad[0]])}: got {got[bad[0]].tolist()}, "
                f"want {ref[bad[0]].tolist()} (a diff that is a multiple of a push means lost or doubled)")


# -- cluster state ------------------------------------------------------------------------
def node_state(st: dict, node: str) -> str:
    return next(n["state"] for n in st["nodes"] if n["id"] == node)


def settled(st: dict, servers: set[str]) -> bool:
    """The ring is over exactly ``servers``, fully replicated, and no change is under way."""
    want = min(REPLICATION, len(servers))
    return (not st["ring_changing"] and {o for r in st["ranges"] for o in r["owners"]} == servers
            and all(len(r["owners"]) == want and len(set(r["owners"])) == want for r in st["ranges"]))


def wait_until(cluster: psd.LocalCluster, pred, what: str, timeout: float = SETTLE_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = cluster.status()
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; ring "
                                 f"v{st['ring_version']}, changing={st['ring_changing']}, nodes "
                                 f"{[(n['id'], n['state']) for n in st['nodes'] if n['role'] == 'server']}")
        time.sleep(0.05)


def live_servers(st: dict) -> set[str]:
    return {n["id"] for n in st["nodes"] if n["role"] == "server" and n["state"] in ("active", "suspect")}


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def max_gap(times: list[float], lo: float, hi: float) -> float:
    """The longest time with no ack, over acks in [lo, hi] (plus the ends of the window)."""
    inside = sorted(t for t in times if lo <= t <= hi)
    points = [lo, *inside, hi]
    return max(b - a for a, b in zip(points, points[1:]))


@pytest.fixture
def make_cluster():
    """``make_cluster(**settings)``: a LocalCluster closed after the test, whatever happens."""
    yield from closing(lambda servers=3, **settings: psd.LocalCluster(servers=servers, replication=REPLICATION,
                                                                       **settings))


@pytest.fixture
def streams():
    """``streams(scheduler, seeds, tmp_path)``: worker processes killed after the test."""
    yield from closing(Stream)


def test_sigkill_mid_stream_then_second_kill_exact(make_cluster, streams, tmp_path):
    cluster = make_cluster()
    st0 = cluster.status()
    servers = live_servers(st0)
    assert settled(st0, servers)
    stream = streams(cluster.scheduler, [1, 2], tmp_path)
    stream.go()
    time.sleep(1.0)
    first = cluster.node_id(1)
    cluster.kill_server(1)
    st1 = wait_until(cluster, lambda st: node_state(st, first) == "dead" and settled(st, servers - {first}),
                     f"{first} dead and replication restored")
    assert st1["ring_version"] > st0["ring_version"]
    time.sleep(0.5)  # the stream goes on over the new ring
    second = cluster.node_id(2)
    cluster.kill_server(2)
    st2 = wait_until(cluster, lambda st: node_state(st, second) == "dead"
                     and settled(st, servers - {first, second}), f"{second} dead too")
    assert st2["ring_version"] > st1["ring_version"]
    time.sleep(0.3)
    check_exact(cluster, stream.stop())


def test_sigkill_write_stall_bounded(make_cluster, streams, tmp_path):
    cluster = make_cluster()  # default heartbeat settings
    servers = live_servers(cluster.status())
    stream = streams(cluster.scheduler, [3], tmp_path)
    stream.go()
    time.sleep(1.0)
    victim = cluster.node_id(0)
    t_kill = time.time()
    cluster.kill_server(0)
    wait_until(cluster, lambda st: settled(st, servers - {victim}), f"{victim} out of the ring")
    time.sleep(1.0)
    records = stream.stop()
    check_exact(cluster, records)
    times = [t for r in records for _, t in r["acked"]]
    assert any(t > t_kill + 0.5 for t in times), "no push was acked after the kill"
    stall = max_gap(times, t_kill - 0.5, t_kill + 4.0)
    assert stall < MAX_STALL, f"writes stalled {stall:.2f} s around the SIGKILL"


def test_sigstop_declared_dead_then_sigcont_rejoins_as_a_new_member(make_cluster, streams, raw_dealer, tmp_path):
    """A server frozen past the failure timeout is declared dead and its ranges move on.
    Woken up, it must not serve its stale copy, and it must not stay out for good: it
    registers again as a new member and the ring takes it back, with no operator action."""
    cluster = make_cluster()
    st0 = cluster.status()
    servers = live_servers(st0)
    stream = streams(cluster.scheduler, [4, 5], tmp_path)
    stream.go()
    time.sleep(1.0)
    frozen = cluster.node_id(2)
    child = cluster.server(2)
    cluster.kill_server(2, sig=signal.SIGSTOP)
    wait_until(cluster, lambda st: node_state(st, frozen) == "dead" and settled(st, servers - {frozen}),
               f"frozen {frozen} declared dead and the ring moved on")
    assert child.proc.poll() is None  # only frozen
    # a client that missed the ring change asks the frozen server, with the old ring, for
    # a key it led: once awake it must neither answer from nor write to its stale copy
    name, dtype, width = TABLES[0]
    key = next(k for k in POOL.tolist() if any(r["begin"] <= k <= r["last"] and r["owners"][0] == frozen
                                               for r in st0["ranges"]))
    stale = raw_dealer(child.address)
    keys = np.array([key], dtype=np.uint64)
    stale.send_frames(encode(Message("pull", id=1, sender="W-stale", table=name, ring=st0["ring_version"],
                                     meta={"rid": 1}, arrays=[keys])))
    stale.send_frames(encode(Message("push", id=2, sender="W-stale", table=name, ring=st0["ring_version"],
                                     meta={"rid": 2}, arrays=[keys, np.full((1, width), 10**9, dtype)])))
    cluster.kill_server(2, sig=signal.SIGCONT)
    for _ in range(2):
        frames = stale.recv_frames(timeout=5.0)
        assert frames is not None, f"{frozen} answered neither request after SIGCONT"
        reply = decode(frames)
        assert reply.op == "error", f"{frozen} served {reply} from its stale ranges after it was declared dead"
    st = wait_until(cluster, lambda st: any(n["role"] == "server" and n["address"] == child.address
                                            and n["id"] != frozen and n["state"] == "active" for n in st["nodes"]),
                    f"{frozen}'s process registered again as a new member")
    rejoined = next(n["id"] for n in st["nodes"] if n["address"] == child.address and n["id"] != frozen)
    wait_until(cluster, lambda st: settled(st, servers - {frozen} | {rejoined}),
               f"the ring over the survivors and {rejoined}")
    assert child.proc.poll() is None, f"{frozen}'s process exited instead of rejoining"
    assert "registering again" in child.log_path.read_text()
    # its join's ring change must not overtake the answer to its registration (it did about
    # one run in six: the answer's older ring then replaced the newer one, forwards for the
    # ranges it gave were skipped, and acknowledged pushes were lost)
    assert "knows an older ring" not in child.log_path.read_text()
    time.sleep(0.5)
    check_exact(cluster, stream.stop())  # the stale push was applied nowhere


def test_add_and_drain_during_stream_exact(make_cluster, streams, tmp_path):
    cluster = make_cluster()
    st0 = cluster.status()
    servers = live_servers(st0)
    stream = streams(cluster.scheduler, [6, 7], tmp_path)
    stream.go()
    time.sleep(0.8)
    cluster.add_server()  # returns once the ring spans it
    joined = cluster.node_id(3)
    st1 = wait_until(cluster, lambda st: settled(st, servers | {joined}), f"{joined} in the ring")
    assert st1["ring_version"] > st0["ring_version"]
    time.sleep(0.5)
    leaving = cluster.node_id(0)
    child = cluster.server(0)
    out = subprocess.run([sys.executable, "-m", "psd", "drain", leaving, "--scheduler", cluster.scheduler],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{leaving} drained" in out.stdout
    st2 = wait_until(cluster, lambda st: settled(st, (servers | {joined}) - {leaving}), f"{leaving} drained")
    assert st2["ring_version"] > st1["ring_version"]
    assert node_state(st2, leaving) == "left"
    assert wait_exit(child.proc, 10.0) is not None, f"drained {leaving} did not exit"
    time.sleep(0.5)
    check_exact(cluster, stream.stop())


def test_sigterm_drains_a_server_during_stream_exact(make_cluster, streams, tmp_path):
    """SIGTERM (systemctl stop) hands the server's ranges over before it exits."""
    cluster = make_cluster()
    st0 = cluster.status()
    servers = live_servers(st0)
    stream = streams(cluster.scheduler, [8], tmp_path)
    stream.go()
    time.sleep(0.8)
    leaving = cluster.node_id(1)
    child = cluster.server(1)
    cluster.kill_server(1, sig=signal.SIGTERM)
    assert wait_exit(child.proc, 30.0) == 0, f"{leaving} did not exit cleanly after SIGTERM"
    st1 = wait_until(cluster, lambda st: settled(st, servers - {leaving}), f"{leaving} drained")
    assert node_state(st1, leaving) == "left"  # it left; it was not declared dead
    assert st1["ring_version"] > st0["ring_version"]
    time.sleep(0.5)
    check_exact(cluster, stream.stop())


def chained_owners(st: dict) -> bool:
    """Every range replicated on the server after its primary in sorted id order."""
    order = sorted({o for r in st["ranges"] for o in r["owners"]})
    return all(r["owners"][1:] == [order[(order.index(r["owners"][0]) + k) % len(order)]
                                   for k in range(1, len(r["owners"]))] for r in st["ranges"])


def test_sigkill_under_chained_placement_exact(make_cluster, streams, tmp_path):
    """Chained placement (docs/operations.md, "Replica placement"): the killed server's
    successor holds every range it led, leads them while the copies run, and the ring
    ends chained over the survivors, with no acked push lost or doubled."""
    cluster = make_cluster(servers=4, placement="chained")
    st0 = cluster.status()
    servers = live_servers(st0)
    assert settled(st0, servers) and chained_owners(st0) and st0["placement"] == "chained"
    assert len({tuple(r["owners"]) for r in st0["ranges"]}) == 4  # one replica server per primary
    stream = streams(cluster.scheduler, [5, 6], tmp_path)
    stream.go()
    time.sleep(1.0)
    victim = cluster.node_id(1)
    cluster.kill_server(1)
    st1 = wait_until(cluster, lambda st: node_state(st, victim) == "dead" and settled(st, servers - {victim}),
                     f"{victim} dead and replication restored")
    assert chained_owners(st1) and len({tuple(r["owners"]) for r in st1["ranges"]}) == 3
    time.sleep(0.5)  # the stream goes on over the new ring
    check_exact(cluster, stream.stop())


def test_status_json_shows_owners_and_ring_versions(make_cluster):
    cluster = make_cluster()
    versions = []

    def status_json() -> dict:
        out = subprocess.run([sys.executable, "-m", "psd", "status", "--json", "--scheduler", cluster.scheduler],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        st = json.loads(out.stdout)
        versions.append(st["ring_version"])
        return st

    def check_ring(st: dict, servers: set[str]) -> None:
        assert settled(st, servers), st["ranges"]
        assert st["replication"] == REPLICATION
        assert st["ranges"][0]["begin"] == 0 and st["ranges"][-1]["last"] == 2**64 - 1
        for a, b in zip(st["ranges"], st["ranges"][1:]):
            assert b["begin"] == a["last"] + 1
        # the primary is listed first: with 3+ servers each one leads some range
        assert {r["owners"][0] for r in st["ranges"]} == servers

    st = status_json()
    servers = live_servers(st)
    check_ring(st, servers)
    cluster.add_server()
    joined = cluster.node_id(3)
    check_ring(status_json(), servers | {joined})
    victim = cluster.node_id(1)
    cluster.kill_server(1)
    wait_until(cluster, lambda s: settled(s, (servers | {joined}) - {victim}), f"{victim} out of the ring")
    check_ring(status_json(), (servers | {joined}) - {victim})
    assert versions == sorted(versions) and len(set(versions)) == len(versions), versions

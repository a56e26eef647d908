"""Shared fixtures: real daemons on loopback and a raw ZeroMQ client for hand-made frames.

Clusters are module-scoped (one start-up per test module) and are closed by their
``with`` block even when a test or the fixture itself fails.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import zmq

import psd
from psd.codec import Limits, Message, decode, encode
from psd.transport import security

#: how long a raw socket waits for a reply before the test fails (never unbounded)
RAW_TIMEOUT = 5.0


#: the longest modules, longest first (their summed test durations in one measured run of
#: the whole suite), started first: the suite runs on two processes, each taking whole
#: modules (``-n 2 --dist loadfile``, pyproject.toml), and a long module taken last would
#: keep one process busy while the other has nothing left to do. xdist hands modules out
#: in this order only with ``--no-loadscope-reorder`` (pyproject.toml): by default it
#: reorders them by their number of tests, which put the five-test real-data module and
#: the three-test warm module near the end
LONGEST_FIRST = ("test_sim.py", "test_real_data.py", "test_partitions.py", "test_apps_models.py",
                 "test_store_warm.py", "test_cli_jobs.py", "test_netcluster.py", "test_security.py",
                 "test_cms_lda.py", "test_operations.py", "test_fuzz.py", "test_logreg_app.py",
                 "test_failover.py", "test_worker_failure.py", "test_cleanup.py", "test_consistency.py",
                 "test_ring.py", "test_codec_ranges.py", "test_standby.py", "test_metrics.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: each module keeps its order)


def pytest_sessionstart(session):
    """The store's compiled loops, in numba's disk cache before the first daemon starts:
    on a fresh machine the first compile takes ~30 s of a core, which every server
    started at once would otherwise wait for within its start-up time. Here, not in a
    fixture, so that no test's timeout counts it (on a busy machine it can take minutes);
    each pytest process warms, and the first one on a machine compiles for all."""
    from psd.store.kernels import warm
    warm()


@pytest.fixture(scope="module")
def cluster3():
    with psd.LocalCluster(servers=3) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def kv3(cluster3):
    """A blocking worker connected to ``cluster3`` (one per module)."""
    kv = psd.connect(cluster3)
    try:
        yield kv
    finally:
        kv.close()


def wait_for(cond, timeout: float, what: str):
    """Poll ``cond`` until it returns something true, and return that; fail the test
    after ``timeout`` seconds naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


# -- jobs whose workers die ------------------------------------------------------------------
class JobUnderWay:
    """A job submitted to ``ranks`` ranks with ``daemons`` worker daemons (``--one-job``;
    the spare ones run ranks whose worker died); ``worker(rank, ...)`` waits until
    every rank is taken and that one is under way, and gives its worker's id and daemon."""

    def __init__(self, cluster, job: dict, ranks: int, daemons: int):
        from psd.client import admin
        from psd.local import daemon_argv
        self.cluster, self.ranks, self._admin = cluster, ranks, admin
        self.id = admin.call(cluster.scheduler, "submit", job=job, workers=ranks)["job"]
        self.daemons = [cluster.spawn(f"worker{i}", daemon_argv(
            "worker", "--config", str(cluster.config_path), "--scheduler", cluster.scheduler, "--one-job"))
            for i in range(daemons)]

    def status(self) -> dict:
        return self._admin.call(self.cluster.scheduler, "job_status", job=self.id)

    def worker(self, rank: int, above: float, below: float = 1.0):
        st = wait_for(lambda: (lambda s: s if len(s["ranks"]) == self.ranks else None)(self.status()), 60,
                      "ranks assigned")
        worker_id = st["ranks"][str(rank)]
        wait_for(lambda: (lambda s: s["state"] == "running" and above < s["per_rank"].get(str(rank), 0.0) < below)(
            self.status()), 60, f"rank {rank} to be under way")
        daemon = wait_for(lambda: next((w for w in self.daemons if w.ready_path.exists()
                                        and w.ready_path.read_text().strip() == worker_id), None), 30,
                          f"the worker daemon of {worker_id}")
        return worker_id, daemon

    def end(self, timeout: float = 120) -> dict:
        return wait_for(lambda: (lambda s: s if s["state"] in ("done", "failed") else None)(self.status()),
                        timeout, "the job to end")


# -- where the keys live ------------------------------------------------------------
@dataclass(frozen=True)
class ServerRange:
    node: str
    address: str
    begin: int
    last: int  # inclusive; may be 2**64 - 1

    def __contains__(self, key: int) -> bool:
        return self.begin <= key <= self.last


def server_ranges(cluster, timeout: float = 10.0) -> list[ServerRange]:
    """The key ranges and their primaries, in key order, from ``cluster.status()``
    (once no ring change is in progress)."""
    deadline = time.monotonic() + timeout
    status = cluster.status()
    while status.get("ring_changing") and time.monotonic() < deadline:
        time.sleep(0.05)
        status = cluster.status()
    assert not status.get("ring_changing"), "the ring is still changing"
    addresses = {n["id"]: n["address"] for n in status["nodes"] if n["role"] == "server"}
    out = [ServerRange(r["owners"][0], addresses[r["owners"][0]], r["begin"], r["last"])
           for r in status["ranges"]]
    assert out and out[0].begin == 0 and out[-1].last == 2**64 - 1, status["ranges"]
    return out


def owner_changes(ranges: list[ServerRange]) -> list[int]:
    """Keys where the primary changes: the first key of a range led by another server
    than the range before it."""
    return [b.begin for a, b in zip(ranges, ranges[1:]) if a.node != b.node]


def server_addresses(cluster) -> list[str]:
    return [n["address"] for n in cluster.status()["nodes"] if n["role"] == "server"]


# -- a raw DEALER for hand-made frames ------------------------------------------------
_shared_keys: list[str] = []


def shared_keys() -> str:
    """A key folder (``psd keygen``) for daemons a test starts by hand, made once per
    test process and removed at exit."""
    if not _shared_keys:
        import atexit
        import shutil
        import tempfile
        folder = tempfile.mkdtemp(prefix="psd-test-keys-")
        security.keygen(folder)
        atexit.register(shutil.rmtree, folder, True)
        _shared_keys.append(folder)
    return _shared_keys[0]


def cluster_keys():
    """The CurveZMQ client keys of the LocalCluster open in this process (it exports
    PSD_KEYS while open), or None when none is (plaintext)."""
    folder = os.environ.get("PSD_KEYS")
    return security.load_client(folder) if folder else None


def daemon_keys():
    """The server key pair of the LocalCluster open in this process, for a RawDealer that
    sends what only daemons may send (``replicate``, ``install``, ``register`` as a
    server, ...: a client key is refused with ``forbidden``), or None when none is open."""
    folder = os.environ.get("PSD_KEYS")
    return security.load_daemon(folder) if folder else None


class RawDealer:
    """A bare pyzmq DEALER (LINGER 0): sends exactly the frames it is given. It speaks
    CurveZMQ with ``curve`` (default: the open LocalCluster's client keys; None for
    plaintext), through the same function every psd socket uses."""

    _ids = itertools.count(10_000)

    def __init__(self, address: str, curve="cluster"):
        self.address = address
        self.curve = cluster_keys() if curve == "cluster" else curve
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            security.apply_client(self.sock, self.curve)
        self.sock.connect(address)

    def send_frames(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def recv_frames(self, timeout: float = RAW_TIMEOUT) -> list[bytes] | None:
        """The next reply's frames, or None if nothing came within ``timeout`` seconds."""
        if not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        return self.sock.recv_multipart()

    def recv(self, timeout: float = RAW_TIMEOUT) -> Message:
        frames = self.recv_frames(timeout)
        assert frames is not None, f"no reply from {self.address} within {timeout} s"
        return decode(frames, Limits(max_message_bytes=1 << 31))

    def exchange(self, frames: list, timeout: float = RAW_TIMEOUT) -> Message:
        self.send_frames(frames)
        return self.recv(timeout)

    def request(self, msg: Message, timeout: float = RAW_TIMEOUT) -> Message:
        """Send a well-formed message (fresh id unless one is set) and return the reply."""
        if not msg.id:
            msg.id = next(self._ids)
        if not msg.sender:
            msg.sender = "raw-test"
        reply = self.exchange(encode(msg), timeout)
        assert reply.id == msg.id, f"reply {reply} does not answer request id {msg.id}"
        return reply

    def ping(self) -> Message:
        reply = self.request(Message("ping"))
        assert reply.op == "ok", reply
        return reply

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def raw_dealer():
    """``raw_dealer(address)`` opens a RawDealer that is closed after the test."""
    opened: list[RawDealer] = []

    def open_(address: str, **kw) -> RawDealer:
        d = RawDealer(address, **kw)
        opened.append(d)
        return d

    try:
        yield open_
    finally:
        for d in opened:
            d.close()


def header(op: str, *, id: int = 1, table: str | None = None, meta: dict | None = None,
           frames: list | None = None, **override) -> dict:
    """A wire header as a dict, for tests that build msgpack by hand."""
    h = {"v": psd.codec.PROTOCOL_VERSION, "op": op, "id": id, "src": "raw-test", "tbl": table,
         "ring": 0, "clk": 0, "meta": meta or {}, "frames": frames or []}
    h.update(override)
    return h


def pack(h) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


def desc(a: np.ndarray) -> list:
    """The frame descriptor ``encode`` would write for ``a`` (uncompressed)."""
    return [a.dtype.str, list(a.shape), "none", a.nbytes]


# -- the simulation's replay options -----------------------------------------------------
def pytest_addoption(parser):
    parser.addoption("--sim-seed", type=int, default=None,
                     help="run tests/test_sim.py's schedules for this one seed only (replay a failure)")
    parser.addoption("--sim-consistency", default=None, choices=["eventual", "bounded", "sequential"],
                     help="with --sim-seed: the consistency model the failing schedule ran")


@pytest.fixture
def sim_seed(request):
    """The seed to replay (``--sim-seed``), or None for the suite's seeds."""
    seed = request.config.getoption("--sim-seed")
    wanted = request.config.getoption("--sim-consistency")
    consistency = request.node.callspec.params.get("consistency") if hasattr(request.node, "callspec") else None
    if seed is not None and wanted is not None and consistency != wanted:
        pytest.skip(f"replaying seed {seed} under {wanted} only")
    return seed

#!/usr/bin/env python
"""Random existing keys through the full path: psd against a bare pyzmq + searchsorted
parameter server, side by side in one run (issue 15, target 3).

    .venv/bin/python scripts/bench_random_keys.py             # 1e7-key table, 1e5 keys a request
    .venv/bin/python scripts/bench_random_keys.py --quick     # 1e6-key table, fewer repetitions

The cell: 1 server and 1 worker on loopback, one float32 width-1 ``sum`` table holding
``--stored`` random uint64 keys (pushed once before timing); a repetition picks
``--batch`` of the stored keys at random (sorted, as the API wants) and does a push,
waits for its ack, then pulls the same keys. keys/s counts keys pushed plus keys
pulled (as ``bench_pushpull.py``'s sparse cell does).

* psd: a ``psd.LocalCluster(servers=1, security="none")`` (plaintext, like the bare
  side) and the blocking client ``psd.connect``.
* bare: one pyzmq ROUTER process holding the same keys as a sorted uint64 array and
  the values beside them; a push is ``values[searchsorted(keys, k)] += v`` then a
  one-byte ack, a pull answers ``values[searchsorted(keys, k)]``; the client is a
  plain DEALER sending the keys (and values) as raw frames, zero-copy. No checks, no
  ids, no replication: what a hand-written server would do.

The same rounds also run in this process on each side's store alone (psd's ``Table``;
the bare side's two searchsorted lines), so the table shows how much of a round trip
is the store and how much the path around it. All four alternate repetition by
repetition (the machine is shared and noisy); each figure is a median. Before timing,
each side's pull is checked against the values pushed. Only 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

#: the issue's target: psd / bare on this cell (the C++ ps-lite measured 3.9)
TARGET = 4.0
FILL_CHUNK = 1_000_000


def stored_keys(n: int, seed: int) -> np.ndarray:
    """The table's keys: ``n`` distinct random uint64, sorted (both sides make the same)."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False))
    while keys.size < n:  # (duplicates among 1e7 draws from 2**64 are unlikely, not impossible)
        keys = np.unique(np.concatenate([keys, rng.integers(0, 2**64, size=n - keys.size, dtype=np.uint64)]))
    return keys


# -- the bare side ---------------------------------------------------------------------
def bare_push(skeys: np.ndarray, vals: np.ndarray, keys: np.ndarray, v: np.ndarray) -> None:
    vals[np.searchsorted(skeys, keys)] += v


def bare_pull(skeys: np.ndarray, vals: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return vals[np.searchsorted(skeys, keys)]


def bare_server_main(conn, n: int, seed: int, parent_pid: int) -> None:
    """A ROUTER holding ``n`` sorted keys (values 1.0): b"P" keys vals -> ack, b"G" keys
    -> values, b"Q" -> quit. Exits when its parent is gone."""
    import zmq

    bc.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from psd.transport.sockets import tune_malloc
    tune_malloc()  # the allocator settings psd's daemons use
    skeys = stored_keys(n, seed)
    vals = np.ones(n, np.float32)
    ctx = zmq.Context()
    sock = bc.bare_router(ctx, conn)
    try:
        for frames in bc.bare_requests(sock, parent_pid):
            ident, op = frames[0], frames[1].bytes
            if op == b"Q":
                return
            keys = np.frombuffer(frames[2].buffer, np.uint64)
            if op == b"P":
                bare_push(skeys, vals, keys, np.frombuffer(frames[3].buffer, np.float32))
                sock.send_multipart([ident, b"k"], copy=False)
            else:
                sock.send_multipart([ident, bare_pull(skeys, vals, keys)], copy=False)
    finally:
        sock.close(0)
        ctx.term()


class Bare:
    def __init__(self, n: int, seed: int):
        import zmq

        here, there = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=bare_server_main, args=(there, n, seed, os.getpid()),
                                                    daemon=True, name="bare-searchsorted")
        self.proc.start()
        if not here.poll(600):  # (it sorts the keys first: slow on a busy machine)
            bc.stop_process(self.proc)
            raise RuntimeError("the bare server did not start")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(here.recv())

    def push(self, keys: np.ndarray, v: np.ndarray) -> None:
        self.sock.send_multipart([b"P", memoryview(keys), memoryview(v)], copy=False)
        self.sock.recv(copy=False)

    def pull(self, keys: np.ndarray) -> np.ndarray:
        self.sock.send_multipart([b"G", memoryview(keys)], copy=False)
        return np.frombuffer(self.sock.recv(copy=False).buffer, np.float32)

    def close(self) -> None:
        try:
            self.sock.send_multipart([b"Q"])
        finally:
            self.sock.close(0)
            self.ctx.term()
            self.proc.join(3)
            bc.stop_process(self.proc)


class Psd:
    def __init__(self, keys: np.ndarray):
        import psd

        self.cluster = psd.LocalCluster(servers=1, security="none", startup_timeout=300.0)
        self.cluster.__enter__()
        self.kv = psd.connect(self.cluster.scheduler, psd.ClusterConfig(security="none"))
        self.t = self.kv.table("random_keys", width=1, dtype="float32", updater="sum")
        ones = np.ones(FILL_CHUNK, np.float32)
        for i in range(0, keys.size, FILL_CHUNK):
            k = keys[i:i + FILL_CHUNK]
            self.kv.wait(self.t.push(k, ones[:k.size]))

    def push(self, keys: np.ndarray, v: np.ndarray) -> None:
        self.kv.wait(self.t.push(keys, v))

    def pull(self, keys: np.ndarray) -> np.ndarray:
        return self.t.pull(keys)

    def close(self) -> None:
        try:
            self.kv.close()
        finally:
            self.cluster.__exit__(None, None, None)


# -- the run ---------------------------------------------------------------------------
def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class PsdStore:
    """psd's store alone, in this process: the server's ``Table`` without the path."""

    def __init__(self, keys: np.ndarray):
        from psd.schema import TableSpec
        from psd.store.table import Table
        self.table = Table(TableSpec("t", 1, "float32", "sum").validate())
        ones = np.ones((FILL_CHUNK, 1), np.float32)
        for i in range(0, keys.size, FILL_CHUNK):
            k = keys[i:i + FILL_CHUNK]
            self.table.push(k, ones[:k.size])

    def push(self, keys: np.ndarray, v: np.ndarray) -> None:
        self.table.push(keys, v.reshape(-1, 1))

    def pull(self, keys: np.ndarray) -> np.ndarray:
        return self.table.pull(keys)

    def close(self) -> None:
        pass


class BareStore:
    """The bare side's two lines alone, in this process."""

    def __init__(self, keys: np.ndarray):
        self.keys, self.vals = keys, np.ones(keys.size, np.float32)

    def push(self, keys: np.ndarray, v: np.ndarray) -> None:
        bare_push(self.keys, self.vals, keys, v)

    def pull(self, keys: np.ndarray) -> np.ndarray:
        return bare_pull(self.keys, self.vals, keys)

    def close(self) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 1e6-key table, 9 repetitions")
    ap.add_argument("--stored", type=float, help="keys stored (default 1e7; 1e6 with --quick)")
    ap.add_argument("--batch", type=float, default=1e5, help="keys per push and per pull")
    ap.add_argument("--reps", type=int, help="repetitions per side (default 21; 9 with --quick)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="bench-results/random_keys", help="folder for results.json")
    args = ap.parse_args()
    n = int(args.stored or (1e6 if args.quick else 1e7))
    batch, reps = int(args.batch), args.reps or (9 if args.quick else 21)
    started = time.perf_counter()
    print(f"bench_random_keys: {n:.0e} keys stored, {batch:.0e} random existing keys a request, {reps} reps; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    keys = stored_keys(n, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    picks = [np.sort(rng.choice(keys, batch, replace=False)) for _ in range(reps + 1)]
    grad = np.full(batch, 0.5, np.float32)
    sides: dict = {}
    try:
        sides["bare"] = Bare(n, args.seed)
        sides["psd"] = Psd(keys)
        sides["psd store"] = PsdStore(keys)
        sides["bare store"] = BareStore(keys)
        print(f"  filled both in {time.perf_counter() - started:.1f} s", flush=True)
        for name, side in sides.items():  # a check round: each side returns what was pushed
            k = picks[0]
            side.push(k, grad)
            got = np.asarray(side.pull(k)).ravel()
            if not np.array_equal(got, np.full(batch, 1.5, np.float32)):
                raise AssertionError(f"{name} returned wrong values: {got[:5]} ..., expected 1.5")
        rounds: dict[str, list] = {name: [] for name in sides}
        for k in picks[1:]:
            for name, side in sides.items():
                rounds[name].append(timed(lambda: (side.push(k, grad), side.pull(k))))
    finally:
        for side in sides.values():
            side.close()
    rates = {name: 2 * batch / statistics.median(ts) for name, ts in rounds.items()}
    ratio = rates["psd"] / rates["bare"]
    print()
    print(f"{'1 server / 1 worker, float32 sum':<40} {'keys/s':>10} {'ms/round':>9}")
    for name in ("psd", "bare", "psd store", "bare store"):
        print(f"{name + (' (in process)' if 'store' in name else ' (full path)'):<40} "
              f"{bc.fmt_num(rates[name]):>10} {2e3 * batch / rates[name]:>9.2f}")
    print(f"psd / bare, full path: {ratio:.2f} (target >= {TARGET}); store alone: "
          f"{rates['psd store'] / rates['bare store']:.2f}")
    print(f"share of a psd round spent outside its store: "
          f"{1 - rates['psd'] / rates['psd store']:.2f}; of a bare round: {1 - rates['bare'] / rates['bare store']:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({
        "stored": n, "batch": batch, "reps": reps, "load_average": os.getloadavg()[0],
        "keys_per_s": rates, "psd_over_bare": ratio, "rounds_s": rounds,
        "seconds": time.perf_counter() - started}, indent=1))
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A client that keeps pushing to keys of its own and logs every acknowledged push, and
the table those acknowledgements promise: the two halves of a partition test.

    python -m psd.testing.pushlog push SCHEDULER SEED LOG.jsonl [--window 8]
    python -m psd.testing.pushlog verify SCHEDULER LOG.jsonl...

``push`` connects (the asyncio API), opens table ``netpush``, writes a header line and
pushes without pause, up to ``window`` pushes in flight, until SIGTERM or SIGINT; then it
waits for what is in flight and writes a last line. Every acknowledgement is one JSON
line, flushed at once, so the log survives a SIGKILL of the client too. Push ``i`` of
client ``seed`` is :func:`make_push` ``(seed, i)``: keys chosen from :func:`own_keys`
``(seed)`` (no other seed's), positive int64 values, summed by the servers. So the
expected table follows from the acknowledged indices alone, as in tests/streamworker.py.

What is not known: a push that failed or was still in flight may have been applied.
Values are positive, so :func:`expected` gives bounds per key: ``low`` (the acknowledged
pushes, which must all be there) and ``high`` (those plus every push that may have been
issued and not acknowledged). A correct cluster holds ``low <= value <= high``; with no
failed or unfinished push, both are equal. ``verify`` pulls every key and checks that.

While it pushes, the client also reads its keys back (``--read-every`` seconds): a read
must show every push acknowledged before it was issued (read-your-writes) and nothing
beyond what was issued before it was answered. Each read is a line; one that breaks
either bound names the keys (``PushLog.stale_reads``), one that fails names the error.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from psd.keysets import unique

TABLE = "netpush"
DTYPE = "int64"
WIDTH = 2
KEYS_PER_CLIENT = 256
KEYS_PER_PUSH = 24
#: seconds a stopping client waits for its pushes in flight before it gives up on them
DRAIN_TIMEOUT = 30.0


def own_keys(seed: int) -> np.ndarray:
    """The keys client ``seed`` pushes to: spread over the whole ring (so every server
    holds some) and disjoint from every other seed's (their low byte is the seed)."""
    if not 0 <= seed < 256:
        raise ValueError(f"seed {seed}: expected 0 to 255 (the low byte of its keys)")
    rng = np.random.default_rng([7919, seed])
    high = rng.integers(0, 2**56, size=KEYS_PER_CLIENT * 2, dtype=np.uint64)
    keys = unique((high << np.uint64(8)) | np.uint64(seed))
    return keys[:KEYS_PER_CLIENT]


def make_push(seed: int, i: int, keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Push ``i`` of client ``seed``: (sorted keys, int64 values of shape (n, WIDTH))."""
    pool = own_keys(seed) if keys is None else keys
    rng = np.random.default_rng([seed, i])
    chosen = np.sort(rng.choice(pool, size=KEYS_PER_PUSH, replace=False))
    return chosen, rng.integers(1, 1000, size=(KEYS_PER_PUSH, WIDTH), dtype=np.int64)


# -- the log ---------------------------------------------------------------------------------
@dataclass
class PushLog:
    """What one client's log says. ``issued`` is known only if it stopped cleanly."""

    seed: int
    window: int
    node: str | None = None
    started: float | None = None
    acked: list = field(default_factory=list)    # (index, time.time()) in ack order
    failed: list = field(default_factory=list)   # (index, error text)
    issued: int | None = None
    done: bool = False
    reads: list = field(default_factory=list)        # time.time() of each read answered
    stale_reads: list = field(default_factory=list)  # (time, what was wrong)
    failed_reads: list = field(default_factory=list)  # (time, error text)

    def acked_indices(self) -> set[int]:
        return {i for i, _ in self.acked}

    def uncertain(self) -> set[int]:
        """Pushes that may have been applied without an acknowledgement: failed ones,
        unfinished ones and, after a SIGKILL, any the client may have issued (it never
        has more than ``window`` in flight, so fewer than finished + window)."""
        finished = len(self.acked) + len(self.failed)
        issued = self.issued if self.issued is not None else finished + self.window
        return set(range(issued)) - self.acked_indices()

    def acked_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for _, t in self.acked)


def read_log(path: str | Path) -> PushLog:
    """A push log as written so far (a line cut short by a kill is ignored)."""
    lines = []
    for text in Path(path).read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    if not lines or "seed" not in lines[0]:
        raise ValueError(f"{path}: not a push log (no header line); did the client start?")
    head = lines[0]
    log = PushLog(seed=head["seed"], window=head["window"], node=head.get("node"), started=head.get("started"))
    for line in lines[1:]:
        if "acked" in line:
            log.acked.append((line["acked"], line["t"]))
        elif "failed" in line:
            log.failed.append((line["failed"], line["error"]))
        elif "read" in line:
            log.reads.append(line["read"])
            if line.get("wrong"):
                log.stale_reads.append((line["read"], line["wrong"]))
        elif "read_failed" in line:
            log.failed_reads.append((line["read_failed"], line["error"]))
        elif line.get("done"):
            log.issued, log.done = line["issued"], True
    return log


def expected(logs: list[PushLog]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, low, high): every key the clients own, and per key the sums the
    acknowledged pushes promise (``low``) and at most what could be there (``high``)."""
    keys = unique(np.concatenate([own_keys(log.seed) for log in logs]))
    low = np.zeros((keys.size, WIDTH), dtype=np.int64)
    high = np.zeros_like(low)
    for log in logs:
        pool = own_keys(log.seed)
        for indices, out in ((log.acked_indices(), (low, high)), (log.uncertain(), (high,))):
            for i in indices:
                k, v = make_push(log.seed, i, pool)
                rows = np.searchsorted(keys, k)
                for table in out:
                    table[rows] += v
    return keys, low, high


def problems(keys: np.ndarray, values: np.ndarray, low: np.ndarray, high: np.ndarray, limit: int = 10) -> list[str]:
    """Keys whose values are outside [low, high], at most ``limit`` named."""
    bad = np.nonzero(((values < low) | (values > high)).any(axis=1))[0]
    out = [f"key {int(keys[r]):#018x}: {values[r].tolist()} not within {low[r].tolist()} .. {high[r].tolist()}"
           f"{' (an acknowledged push is missing)' if (values[r] < low[r]).any() else ''}"
           for r in bad[:limit]]
    if bad.size > limit:
        out.append(f"... and {bad.size - limit} more keys")
    return out


# -- the client ----------------------------------------------------------------------------------
async def _slot_unless(slots: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Take a free slot, or give up once ``stop`` is set (a partition can hold every
    slot for a request_timeout; a stop must not wait for that)."""
    if stop.is_set():
        return False
    taken = asyncio.ensure_future(slots.acquire())
    halted = asyncio.ensure_future(stop.wait())
    await asyncio.wait({taken, halted}, return_when=asyncio.FIRST_COMPLETED)
    halted.cancel()
    if not stop.is_set():
        return True
    if taken.done() and not taken.cancelled():
        slots.release()
    else:
        taken.cancel()
    return False


class _Bounds:
    """Per own key, the sums of the pushes acknowledged and of those issued so far."""

    def __init__(self, seed: int, pool: np.ndarray):
        self.seed, self.pool = seed, pool
        self.acked = np.zeros((pool.size, WIDTH), dtype=np.int64)
        self.issued = np.zeros_like(self.acked)

    def add(self, table: np.ndarray, i: int) -> None:
        keys, values = make_push(self.seed, i, self.pool)
        table[np.searchsorted(self.pool, keys)] += values

    def wrong(self, values: np.ndarray, low: np.ndarray, high: np.ndarray) -> str:
        """What a read shows outside [low, high] ('' if nothing)."""
        below = np.nonzero((values < low).any(axis=1))[0]
        above = np.nonzero((values > high).any(axis=1))[0]
        parts = []
        if below.size:
            r = int(below[0])
            parts.append(f"{below.size} keys miss acknowledged pushes (key {int(self.pool[r]):#x}: "
                         f"{values[r].tolist()} < {low[r].tolist()})")
        if above.size:
            r = int(above[0])
            parts.append(f"{above.size} keys hold more than was issued (key {int(self.pool[r]):#x}: "
                         f"{values[r].tolist()} > {high[r].tolist()})")
        return "; ".join(parts)


async def _read_back(table, bounds: _Bounds, every: float, stop: asyncio.Event, write) -> None:
    """Read the own keys every ``every`` seconds until ``stop``; log each read."""
    while not stop.is_set():
        low = bounds.acked.copy()
        try:
            values = await table.pull(bounds.pool)
        except Exception as e:  # a read may fail during a partition; it must not be wrong
            write({"read_failed": time.time(), "error": f"{type(e).__name__}: {e}"})
        else:
            write({"read": time.time(), "wrong": bounds.wrong(values, low, bounds.issued)})
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def push(scheduler: str, seed: int, path: str, window: int, read_every: float = 0.0) -> int:
    import psd

    kv = await psd.aio.connect(scheduler)
    out = open(path, "a", buffering=1)  # a line at a time: what was acked survives a kill

    def write(record: dict) -> None:
        out.write(json.dumps(record) + "\n")

    try:
        table = await kv.table(TABLE, width=WIDTH, dtype=DTYPE, updater="sum")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        write({"seed": seed, "window": window, "node": kv.node_id, "started": time.time(), "pid": os.getpid()})
        pool = own_keys(seed)
        bounds = _Bounds(seed, pool)
        slots = asyncio.Semaphore(window)
        running: set[asyncio.Task] = set()
        reader = asyncio.ensure_future(_read_back(table, bounds, read_every, stop, write)) if read_every > 0 else None

        async def one(i: int, ts: int) -> None:
            try:
                await kv.wait(ts)
                bounds.add(bounds.acked, i)
                write({"acked": i, "t": time.time()})
            except Exception as e:  # logged: the test decides whether that was allowed
                write({"failed": i, "error": f"{type(e).__name__}: {e}"})
            finally:
                slots.release()

        i = 0
        while await _slot_unless(slots, stop):
            keys, values = make_push(seed, i, pool)
            bounds.add(bounds.issued, i)
            task = asyncio.ensure_future(one(i, table.push(keys, values)))
            running.add(task)
            task.add_done_callback(running.discard)
            i += 1
        if running:
            await asyncio.wait(set(running), timeout=DRAIN_TIMEOUT)
        if reader is not None:
            await asyncio.wait({reader}, timeout=DRAIN_TIMEOUT)
        write({"done": True, "issued": i})
        return 0
    finally:
        out.close()
        await kv.close()


def verify(scheduler: str, paths: list[str]) -> dict:
    """Pull every key the logs' clients own and compare with :func:`expected`."""
    import psd

    logs = [read_log(p) for p in paths]
    keys, low, high = expected(logs)
    kv = psd.connect(scheduler)
    try:
        values = kv.table(TABLE, width=WIDTH, dtype=DTYPE, updater="sum").pull(keys)
    finally:
        kv.close()
    found = problems(keys, values, low, high)
    return {"ok": not found, "problems": found, "keys": int(keys.size),
            "acked": sum(len(log.acked) for log in logs), "uncertain": sum(len(log.uncertain()) for log in logs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m psd.testing.pushlog", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", help="push until SIGTERM, logging every acknowledgement")
    p.add_argument("scheduler")
    p.add_argument("seed", type=int)
    p.add_argument("log")
    p.add_argument("--window", type=int, default=8, help="pushes in flight at most (default 8)")
    p.add_argument("--read-every", type=float, default=0.0,
                   help="seconds between reads of the own keys, checked against the log (default 0: no reads)")
    v = sub.add_parser("verify", help="pull the clients' keys and check them against their logs (JSON out)")
    v.add_argument("scheduler")
    v.add_argument("logs", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "push":
        own_keys(args.seed)  # a bad seed fails before connecting
        return asyncio.run(push(args.scheduler, args.seed, args.log, args.window, args.read_every))
    result = verify(args.scheduler, args.logs)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

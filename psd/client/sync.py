"""The blocking worker API: ``kv = psd.connect(addr)``.

It drives the asyncio client on a private event loop in the calling thread. A pull
first takes a blocking shortcut: send, then poll the servers' sockets directly; only
if an answer is slow or not plain (a ring change, an error) does the loop take over
(re-routing, resends, timeouts). Between calls the loop runs one pass, so pushes'
acknowledgements and ring notices are handled. The loop is asyncio's own, not uvloop:
it is started and stopped for every call, which costs uvloop about 40 us (it sets up
signal handling each time) and asyncio about 5. The one thread is the heartbeat
(psd/transport/heartbeat.py), which must tick while the caller computes. Inside a
running event loop, use ``psd.aio`` instead.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import zmq
from zmq.backend import zmq_poll

from psd.client import aio, small_pull
from psd.config import ClusterConfig
from psd.transport.heartbeat import HeartbeatThread
from psd.transport.rpc import readable
from psd.transport.sockets import tune_malloc

_POLLIN = int(zmq.POLLIN)

#: after a blocking call the loop runs one pass at most this often (seconds): the pass
#: only handles what the call itself did not (push acknowledgements, ring notices), and
#: costs about 25 us, a tenth of a small pull; a call the shortcut cannot finish, and
#: every other call, runs the loop anyway
TICK_EVERY = 0.005


class KVWorker:
    def __init__(self, scheduler: str, config: ClusterConfig | None = None, *, role: str = "worker",
                 namespace: str | None = None):
        config = config or ClusterConfig()
        tune_malloc()
        self._loop = asyncio.SelectorEventLoop()
        self._tick_due = 0.0
        self._busy_poll = config.busy_poll_us * 1e-6
        try:
            self.aio: aio.AsyncKVWorker = self._run(aio.connect(scheduler, config, role=role, heartbeat=False,
                                                                namespace=namespace))
        except BaseException:
            self._loop.close()
            raise
        self._heartbeat = HeartbeatThread(self.aio.scheduler, self.aio.node_id, self.aio.heartbeat_interval,
                                          lambda: self.aio.clock_value, security=self.aio.curve,
                                          schedulers=self.aio.schedulers)
        self.aio.threads.append(self._heartbeat)
        self._heartbeat.start()

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    def _tick(self) -> None:
        """One pass of the loop: callbacks that became due (acks, ring notices)."""
        self._tick_due = time.monotonic() + TICK_EVERY
        self._loop.call_soon(self._loop.stop)
        self._loop.run_forever()

    def _now(self, fn, *args):
        """Call a plain function of the asyncio client, then let the loop catch up."""
        out = fn(*args)
        self._tick()
        return out

    def _sent(self, fn, *args, after=None):
        """Call a plain function that sends at once (a push): the loop's pass, which only
        handles what arrived meanwhile, at most every TICK_EVERY; every pass when the
        request waits for others (``after``: it is sent by a task on the loop)."""
        out = fn(*args, after)
        if after:
            self._tick()
        else:
            self._tick_now_and_then()
        return out

    def _blocking(self, op: str, spec, rows):
        """Send a request and wait for it by polling its sockets (the shortcut); the loop
        finishes whatever the shortcut cannot."""
        kv = self.aio
        pull = small_pull.send(kv, spec, rows.keys) if op == "pull" and rows.keys is not None else None
        if pull is not None:  # one message, its answer read off the socket (client/small_pull.py)
            fut = pull.fut
            if not fut.done():
                self._await([pull.rpc.raw], fut.done, pull.read)
        else:
            ts, fut = kv.issue(op, spec, rows)
            req = kv.core.requests.get(ts)
            if req is not None and not fut.done():
                rpcs = [rpc for rpc in {kv.server_socket(p.server) for p in req.parts} if rpc is not None]
                socks = [rpc.raw for rpc in rpcs] + [s for rpc in rpcs for s in rpc.stripe_socks()]
                self._await(socks, fut.done, lambda: [rpc.drain() for rpc in rpcs])
        if fut.done():
            self._tick_now_and_then()
            return fut.result()
        return self._run(fut)

    def _tick_now_and_then(self) -> None:
        if time.monotonic() >= self._tick_due:
            self._tick()

    def _await(self, socks: list, done, read) -> None:
        """Wait for the sockets ``socks`` and ``read()`` them until ``done()``, for up to
        RETRY_TICK (the request was just sent: no answer can be there yet). With
        ``busy_poll_us`` set, first spin that long checking for the answer, before
        sleeping in poll: waking a sleeping thread costs tens of microseconds."""
        deadline = time.monotonic() + aio.RETRY_TICK
        spin = self._busy_poll
        items = [(sock, _POLLIN) for sock in socks]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                read()  # (whatever came at the last moment)
                return
            if spin:
                until, spin = time.perf_counter() + min(spin, left), 0.0
                while time.perf_counter() < until:
                    if any(readable(sock) for sock in socks):
                        break
            else:
                zmq_poll(items, int(left * 1000) + 1)  # (pyzmq's Socket.poll builds a Poller each call)
            read()
            if done():
                return

    @property
    def node_id(self) -> str:
        return self.aio.node_id

    def table(self, name: str, width: int = 1, dtype: str = "float32", updater: str = "sum",
              filters: list | None = None, pull_filters: list | None = None, **options) -> "Table":
        return Table(self, self._run(self.aio.table(name, width, dtype, updater, filters, pull_filters, **options)))

    def flush(self) -> None:
        """Push every residual the tables' filters hold back and wait (AsyncKVWorker.flush)."""
        self._run(self.aio.flush())

    def wait(self, ts: int):
        """Block until ``ts`` is done; returns a pull's values (None for a push). First
        the blocking shortcut: read the servers' sockets directly until the request is
        done, for up to RETRY_TICK; the loop finishes what that cannot (and runs a
        request that waits for others, a task)."""
        kv = self.aio
        fut = kv._inflight.get(ts)
        if fut is None:
            return None
        if not fut.done() and not isinstance(fut, asyncio.Task):
            rpcs = list(kv._servers.values())
            socks = [rpc.raw for rpc in rpcs] + [s for rpc in rpcs for s in rpc.stripe_socks()]
            self._await(socks, fut.done, lambda: [rpc.drain() for rpc in rpcs])
        if fut.done():
            kv._inflight.pop(ts, None)
            self._tick_now_and_then()
            return fut.result()
        return self._run(kv.wait(ts))

    def wait_all(self) -> None:
        self._run(self.aio.wait_all())

    def clock(self) -> int:
        return self._now(self.aio.clock)

    def status(self) -> dict:
        return self._run(self.aio.status())

    def traffic(self) -> dict:
        """Bytes sent and received after each stage, and key-caching counts (AsyncKVWorker.traffic)."""
        return self._now(self.aio.traffic)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._heartbeat.stop()
            self._run(self.aio.close())
            self._loop.close()

    def __enter__(self) -> "KVWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Table:
    def __init__(self, kv: KVWorker, table: aio.AsyncTable):
        self._kv = kv
        self._t = table
        self.spec = table.spec
        self.name, self.width, self.dtype = table.name, table.width, table.dtype

    def push(self, keys, values, after: list[int] | None = None, once: tuple[str, int] | None = None) -> int:
        """Send a push; returns its timestamp at once (``kv.wait(ts)`` to block); ``once``:
        see ``AsyncTable.push``."""
        return self._kv._sent(lambda *a: self._t.push(keys, values, a[0], once), after=after)

    def push_span(self, lo: int, values, after: list[int] | None = None, once: tuple[str, int] | None = None) -> int:
        return self._kv._sent(lambda *a: self._t.push_span(lo, values, a[0], once), after=after)

    def pull_async(self, keys, after: list[int] | None = None) -> int:
        """Send a pull; returns its timestamp; ``kv.wait(ts)`` returns the values."""
        return self._kv._now(self._t.pull_async, keys, after)

    @property
    def filters(self):
        return self._t.filters

    def pull(self, keys, after: list[int] | None = None) -> np.ndarray:
        if after:
            return self._kv._run(self._t.pull(keys, after))
        rows = self._t.pull_rows(keys)
        return self._t.observe(rows.keys, self._kv._blocking("pull", self.spec, rows))

    def pull_span(self, lo: int, count: int) -> np.ndarray:
        return self._kv._blocking("pull", self.spec, self._t.span_rows(lo, count))

    def pushpull(self, keys, values) -> np.ndarray:
        return self._kv._blocking("pushpull", self.spec, self._t.pushpull_rows(keys, values))


def connect(scheduler: str, config: ClusterConfig | None = None, *, namespace: str | None = None) -> KVWorker:
    """Register with the scheduler at ``scheduler`` (an address or a LocalCluster).
    ``namespace``: open tables in that namespace (a job's id, say: docs/jobs.md)."""
    return KVWorker(getattr(scheduler, "scheduler", scheduler), config, namespace=namespace)

"""The blocking worker API: ``kv = psd.connect(addr)``.

It drives the asyncio client on a private event loop in the calling thread: each call
runs the loop just long enough to send (push) or to get its answer (pull, wait).
Replies that arrive in between wait in ZeroMQ's queues. The one thread is the
heartbeat (psd/transport/heartbeat.py), which must tick while the caller computes.
Inside a running event loop, use ``psd.aio`` instead.
"""
from __future__ import annotations

import asyncio

import numpy as np

from psd.client import aio
from psd.transport.heartbeat import HeartbeatThread
from psd.config import ClusterConfig
from psd.transport import install_event_loop
from psd.transport.sockets import tune_malloc


class KVWorker:
    def __init__(self, scheduler: str, config: ClusterConfig | None = None, *, role: str = "worker"):
        config = config or ClusterConfig()
        install_event_loop(config.event_loop)
        tune_malloc()
        self._loop = asyncio.new_event_loop()
        try:
            self.aio: aio.AsyncKVWorker = self._run(aio.connect(scheduler, config, role=role, heartbeat=False))
        except BaseException:
            self._loop.close()
            raise
        self._heartbeat = HeartbeatThread(self.aio.scheduler, self.aio.node_id, self.aio.heartbeat_interval,
                                          lambda: self.aio.clock_value)
        self._heartbeat.start()

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    async def _now(self, fn, *args):
        return fn(*args)

    @property
    def node_id(self) -> str:
        return self.aio.node_id

    def table(self, name: str, width: int = 1, dtype: str = "float32", updater: str = "sum",
              **options) -> "Table":
        return Table(self, self._run(self.aio.table(name, width, dtype, updater, **options)))

    def wait(self, ts: int):
        """Block until ``ts`` is done; returns a pull's values (None for a push)."""
        return self._run(self.aio.wait(ts))

    def wait_all(self) -> None:
        self._run(self.aio.wait_all())

    def clock(self) -> int:
        return self._run(self._now(self.aio.clock))

    def status(self) -> dict:
        return self._run(self.aio.status())

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

    def push(self, keys, values, after: list[int] | None = None) -> int:
        """Send a push; returns its timestamp at once (``kv.wait(ts)`` to block)."""
        return self._kv._run(self._kv._now(self._t.push, keys, values, after))

    def push_span(self, lo: int, values, after: list[int] | None = None) -> int:
        return self._kv._run(self._kv._now(self._t.push_span, lo, values, after))

    def pull_async(self, keys, after: list[int] | None = None) -> int:
        """Send a pull; returns its timestamp; ``kv.wait(ts)`` returns the values."""
        return self._kv._run(self._kv._now(self._t.pull_async, keys, after))

    def pull(self, keys, after: list[int] | None = None) -> np.ndarray:
        return self._kv._run(self._t.pull(keys, after))

    def pull_span(self, lo: int, count: int) -> np.ndarray:
        return self._kv._run(self._t.pull_span(lo, count))

    def pushpull(self, keys, values) -> np.ndarray:
        return self._kv._run(self._t.pushpull(keys, values))


def connect(scheduler: str, config: ClusterConfig | None = None) -> KVWorker:
    """Register with the scheduler at ``scheduler`` (an address or a LocalCluster)."""
    return KVWorker(getattr(scheduler, "scheduler", scheduler), config)

"""The asyncio API: ``kv = await psd.aio.connect(addr)``."""
from psd.client.aio import AsyncKVWorker, AsyncTable
from psd.client.aio import connect as _connect
from psd.config import ClusterConfig


async def connect(scheduler, config: ClusterConfig | None = None, *,
                  namespace: str | None = None) -> AsyncKVWorker:
    """Register with the scheduler (an address or a LocalCluster) as a worker;
    ``namespace``: open tables in that namespace."""
    return await _connect(getattr(scheduler, "scheduler", scheduler), config, namespace=namespace)


__all__ = ["connect", "AsyncKVWorker", "AsyncTable"]

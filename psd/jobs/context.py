"""What an app sees of its job: its spec, its rank and shards, and a way to report."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from psd.client.aio import AsyncKVWorker


def plain(value):
    """numpy scalars and arrays -> msgpack-friendly Python values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@dataclass
class JobContext:
    job_id: str
    spec: dict
    rank: int
    num_workers: int
    shards: list[int]
    kv: AsyncKVWorker = field(repr=False)
    _seq: int = field(default=0, repr=False)

    def once(self, step: int) -> tuple[str, int]:
        """The identity of this shard's push number ``step`` (``table.push(..., once=...)``):
        the same whichever worker runs the shard, so when the scheduler gives a dead
        worker's shard to another, the pushes the servers applied already are not applied
        again. Number the pushes of a run in a fixed order (per table)."""
        return f"{self.job_id}/{self.rank}", int(step)

    async def report(self, progress: float | None = None, metrics: list[dict] | None = None,
                     summary: dict | None = None, done: bool = False, error: str | None = None) -> None:
        self._seq += 1  # lets the scheduler drop a report it already has (a re-sent one)
        meta = {"job": self.job_id, "rank": self.rank, "done": done, "seq": self._seq}
        if progress is not None:
            meta["progress"] = float(progress)
        if metrics:
            meta["metrics"] = [plain(m) | {"rank": self.rank} for m in metrics]
        if summary:
            meta["summary"] = plain(summary)
        if error:
            meta["error"] = error
        await self.kv.call_scheduler("job_report", **meta)

"""The scheduler's side of checkpoints: a consistent cut across all servers, and restore.

A checkpoint is a vector-clock cut: it holds, on every server, exactly the pushes made
at worker clocks below the cut c, whatever the consistency model. Two phases:

1. *hold*: every server stops applying new pushes and reports the highest clock it
   has seen a push for. c = 1 + the highest of those and of the workers' clocks, so no
   push at a clock >= c has been applied anywhere.
2. *cut c*: servers apply the held pushes below c, keep holding those at c or later,
   and when every live worker has reached clock c (its earlier pushes have all arrived,
   since clock messages follow pushes on each connection) write the ranges they lead.
   Then the held pushes go ahead.

The scheduler writes the manifest last; a checkpoint without one does not exist.
Ring changes wait while a checkpoint runs, so each range is written by one primary.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from psd.codec import Message
from psd.errors import BadRequestError, PsdError
from psd.store.checkpoint import checkpoint_dir, latest, write_manifest

log = logging.getLogger("psd.checkpoint")


class Checkpoints:
    def __init__(self, scheduler):
        self.s = scheduler
        self.root = Path(scheduler.config.checkpoint_dir) if scheduler.config.checkpoint_dir else None
        self.next_id = 1
        self.restored_from: str | None = None
        self.last: dict | None = None
        self.taken = self.failed = 0  # by this process, for /metrics
        if self.root is not None:
            found = latest(self.root)
            if found is not None:
                folder, manifest = found
                self.next_id = int(manifest["id"]) + 1
                self.pending_restore = (folder, manifest)
                return
        self.pending_restore = None

    def tables_to_restore(self) -> list[dict]:
        return self.pending_restore[1]["tables"] if self.pending_restore else []

    async def take(self, timeout: float = 60.0) -> dict:
        s = self.s
        if self.root is None:
            raise BadRequestError("no checkpoint_dir is configured; set it in the cluster config")
        async with s.ring_changes.lock:
            servers = s.liveness.live("server")
            workers = s.liveness.live("worker")
            ckpt_id = self.next_id
            self.next_id += 1
            folder = checkpoint_dir(self.root, ckpt_id)
            folder.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            try:
                held = await self._all(servers, lambda: Message("ckpt_hold"))
                cut = 1 + max([r.meta["max_push_clock"] for r in held] +
                              [s.worker_clocks.get(w, 0) - 1 for w in workers] + [-1])
                done = await self._all(servers, lambda: Message("ckpt_cut", meta={
                    "cut": cut, "workers": workers, "folder": str(folder), "timeout": timeout}),
                    timeout=timeout + 5)
            except BaseException:
                self.failed += 1
                await self._all(servers, lambda: Message("ckpt_release"), raise_errors=False)
                raise
            manifest = {
                "id": ckpt_id, "cut": cut, "time": time.time(), "ring": s.ring.to_wire(),
                "tables": [t.to_wire() for t in s.tables.values()],
                "files": [r.meta["file"] for r in done],
                "keys": sum(r.meta["keys"] for r in done), "bytes": sum(r.meta["bytes"] for r in done),
                "consistency": s.config.consistency,
            }
            write_manifest(self.root, ckpt_id, manifest)
            self.taken += 1
            self.last = {k: manifest[k] for k in ("id", "cut", "time", "keys", "bytes")} | {"folder": str(folder)}
            log.info("checkpoint %d written to %s: cut at clock %d, %d keys, %.2f s", ckpt_id, folder, cut,
                     manifest["keys"], time.monotonic() - started)
            return self.last

    async def _all(self, servers, make, timeout: float | None = None, raise_errors: bool = True) -> list:
        s = self.s
        results = await asyncio.gather(*(s.rpc.call(make(), s.routes[n], timeout=timeout or s.config.request_timeout)
                                         for n in servers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors and raise_errors:
            raise errors[0] if isinstance(errors[0], PsdError) else PsdError(str(errors[0]))
        return results

    async def restore_if_pending(self) -> None:
        """After the first ring: the servers load the newest checkpoint (once)."""
        if self.pending_restore is None:
            return
        folder, manifest = self.pending_restore
        self.pending_restore = None
        results = await self._all(self.s.liveness.live("server"), lambda: Message(
            "restore", meta={"folder": str(folder), "files": manifest["files"]}))
        self.restored_from = str(folder)
        log.info("restored checkpoint %s (%d keys loaded)", folder, sum(r.meta["keys"] for r in results))

    async def periodic(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.s.liveness.live("server"):
                try:
                    await self.take()
                except Exception as e:
                    log.warning("periodic checkpoint failed: %s", e)

    def status(self) -> dict:
        return {"dir": str(self.root) if self.root else None, "last": self.last,
                "restored_from": self.restored_from}

"""The scheduler's side of checkpoints: a consistent cut across all servers, and restore.

A checkpoint is a vector-clock cut: it holds, on every server, exactly the pushes made
at worker clocks below the cut c, whatever the consistency model. Two phases:

1. *hold*: every server stops applying new pushes and reports the highest clock it
   has seen a push for. c = 1 + the highest of those and of the workers' clocks, so no
   push at a clock >= c has been applied anywhere. Bounded: the step waits the
   failure detector's dead time, and a server lets go by itself if no cut follows
   within twice that (a hold, cut or release lost with a connection).
2. *cut c*: servers apply the held pushes below c, keep holding those at c or later,
   and when every live worker has reached clock c (its earlier pushes have all arrived,
   since clock messages follow pushes on each stream) write the ranges they lead.
   Then the held pushes go ahead. The workers waited for are those live once every
   server holds; any other worker's pushes count as after the cut (held, like those at
   c): one that registers later sends them all after every hold began.

The scheduler writes the manifest last; a checkpoint without one does not exist.
Ring changes wait while a checkpoint runs (``RING_LOCK``), so each range is written by
one primary. Procedures (``psd.core.procedures``); the manifest is written by the
daemon (``WriteFile``), so nothing here touches a disk.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from psd.cluster.schedulers import lost_after
from psd.codec import Message
from psd.config import ClusterConfig
from psd.core.cluster_state import ClusterState
from psd.core.procedures import Acquire, Calls, Do, failure
from psd.core.ring_changes import RING_LOCK
from psd.errors import BadRequestError, UnavailableError
from psd.store.checkpoint import checkpoint_dir, write_manifest

log = logging.getLogger("psd.checkpoint")


def hold_step(config: ClusterConfig) -> float:
    """How long the hold step waits for every server (the failure detector's dead time,
    at most ``request_timeout``); a server holds for twice that at most (``within``)."""
    return min(config.request_timeout, lost_after(config.heartbeat_interval, config.heartbeat_misses))


class Checkpoints:
    def __init__(self, state: ClusterState, wall: Callable[[float], float],
                 pending_restore: tuple[Path, dict] | None = None):
        """``wall(now)``: the wall-clock time, for a manifest; ``pending_restore``: the
        newest checkpoint found at start (folder, manifest), loaded after the first ring."""
        self.state = state
        cfg = state.config
        self.root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self._wall = wall
        self.restored_from: str | None = None
        self.last: dict | None = None
        self.taken = self.failed = 0  # by this process, for /metrics
        self.pending_restore = pending_restore
        if pending_restore is not None:
            state.next_checkpoint = max(state.next_checkpoint, int(pending_restore[1]["id"]) + 1)

    def tables_to_restore(self) -> list[dict]:
        return self.pending_restore[1]["tables"] if self.pending_restore else []

    def take(self, now: float, timeout: float = 60.0):
        """A procedure: the checkpoint, returning what ``status`` shows of it."""
        s = self.state
        if self.root is None:
            raise BadRequestError("no checkpoint_dir is configured; set it in the cluster config")
        yield Acquire(RING_LOCK)  # (released when the procedure ends, however it ends)
        servers = s.live("server")
        ckpt_id = s.next_checkpoint
        s.next_checkpoint += 1
        folder = checkpoint_dir(self.root, ckpt_id)
        try:
            absent = sorted({owners[0] for owners in s.ring.owners if owners} - set(servers))
            if absent:  # (its death's ring change waits for RING_LOCK: its ranges would be left out)
                raise UnavailableError(f"checkpoint {ckpt_id}: {', '.join(absent)} lead(s) ranges of ring "
                                       f"v{s.ring.version} but {'is' if len(absent) == 1 else 'are'} not live; "
                                       f"the ring change that follows runs first: retry shortly")
            yield Do(f"mkdir {folder}", lambda: folder.mkdir(parents=True, exist_ok=True))
            # a live server answers a hold at once: one silent for the failure detector's
            # dead time is lost (or its hold is), and meanwhile every other server holds
            # every push, so the step fails then; a server whose cut does not follow
            # within twice that lets its pushes through by itself (a lost cut, a lost release)
            step = hold_step(s.config)
            held = yield from _all(servers, lambda: Message("ckpt_hold", meta={"within": 2 * step}), step,
                                   fail_fast=True)
            # the workers the cut covers, once every server holds: any other registers after
            # that, so all its pushes reach servers that hold them (after the cut)
            workers = s.live("worker")
            cut = 1 + max([r.meta["max_push_clock"] for r in held] +
                          [s.worker_clocks.get(w, 0) - 1 for w in workers] + [-1])
            done = yield from _all(servers, lambda: Message("ckpt_cut", meta={
                "cut": cut, "workers": workers, "folder": str(folder), "timeout": timeout}), timeout + 5, fail_fast=True)
        except Exception:
            self.failed += 1
            yield from _all(servers, lambda: Message("ckpt_release"), s.config.request_timeout, raise_errors=False)
            raise
        manifest = {
            "id": ckpt_id, "cut": cut, "time": self._wall(now), "ring": s.ring.to_wire(),
            "tables": [t.to_wire() for t in s.tables.values()],
            "files": [r.meta["file"] for r in done],
            "keys": sum(r.meta["keys"] for r in done), "bytes": sum(r.meta["bytes"] for r in done),
            "consistency": s.config.consistency,
            "workers": workers,  # (the cut covers these: a worker that joined since counts as after it)
        }
        yield Do(f"manifest of {folder}", lambda: write_manifest(self.root, ckpt_id, manifest))
        self.taken += 1
        self.last = {k: manifest[k] for k in ("id", "cut", "time", "keys", "bytes")} | {"folder": str(folder)}
        log.info("checkpoint %d written to %s: cut at clock %d, %d keys", ckpt_id, folder, cut, manifest["keys"])
        return self.last

    @property
    def restoring(self) -> bool:
        """A restore is pending or under way: workers must not see a ring yet (they would
        read zeros and write into tables the restore then overwrites)."""
        return self.pending_restore is not None or self._loading

    _loading = False

    def restore_if_pending(self):
        """A procedure, after the first ring: the servers load the newest checkpoint (once)."""
        if self.pending_restore is None:
            return
        folder, manifest = self.pending_restore
        self._loading = True
        self.pending_restore = None
        try:
            results = yield from _all(self.state.live("server"), lambda: Message(
                "restore", meta={"folder": str(folder), "files": manifest["files"]}), self.state.config.request_timeout)
        finally:
            self._loading = False
        self.restored_from = str(folder)
        log.info("restored checkpoint %s (%d keys loaded)", folder, sum(r.meta["keys"] for r in results))

    def status(self) -> dict:
        return {"dir": str(self.root) if self.root else None, "last": self.last,
                "restored_from": self.restored_from}


def _all(servers: list[str], make, timeout: float, raise_errors: bool = True, fail_fast: bool = False):
    """Ask every server; raise the first error (a refusal, a failure, a timeout). With
    ``fail_fast`` (a checkpoint's hold and cut), as soon as it comes: a step that fails
    must not hold ``RING_LOCK`` waiting for the other servers (a cut may wait a minute
    for a lagging worker), or the ring change of a server that died meanwhile waits too,
    and pushes its death left on only some of their replicas stay there. (Not the
    restore: workers must not see a ring while any server may still be loading.)"""
    results = yield Calls([(n, make()) for n in servers], timeout=timeout, all_or_nothing=fail_fast)
    errors = [e for e in map(failure, results) if e is not None]
    if errors and raise_errors:
        raise errors[0]
    return results

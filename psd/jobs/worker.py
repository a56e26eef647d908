"""The worker daemon (``psd worker``): asks the scheduler for a job, runs its app on the
assigned shards, reports progress and metrics, and asks again. It sits with the jobs,
not the roles: it runs apps, which it is handed by name (an ``AppRegistry``)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback

from psd.client import aio
from psd.config import ClusterConfig
from psd.errors import BadRequestError
from psd.jobs.context import JobContext
from psd.jobs.registry import AppRegistry

log = logging.getLogger("psd.worker")

POLL_INTERVAL = 0.2
#: how often a worker daemon with a metrics endpoint tells the scheduler where it is
#: (again and again, so a restarted scheduler learns it too)
ANNOUNCE_INTERVAL = 5.0


def job_traffic(t: dict) -> dict:
    """What a worker's summary carries of ``kv.traffic()``: bytes sent and received by
    stage (``before_filters``: what the app's pushes meant) and the rows filters kept."""
    out = {side: {k: int(v) for k, v in t[side].items() if k != "messages" and k != "kc_messages"}
           for side in ("sent", "received")}
    filters = t.get("filters") or {}
    out["sent"]["before_filters"] = out["sent"]["raw"] + int(filters.get("held_back", 0))
    out["filters"] = {name: {k: v for k, v in c.items() if k != "filters"}
                      for name, c in filters.get("tables", {}).items()}
    return out


class Worker:
    kv = None
    #: where GET /metrics is served (config `metrics`), once bound
    metrics_address: str | None = None
    #: shards (job ranks) run so far, and the (job, rank) running now
    shards_run = 0
    current: tuple[str, int] | None = None

    def __init__(self, config: ClusterConfig, apps: AppRegistry, one_job: bool = False):
        """``apps``: the apps it may run, by name; ``one_job``: exit once the first job
        this worker took part in has ended (staying until then to pick up shards of
        workers that die)."""
        self.config = config
        self.apps = apps
        self.one_job = one_job

    # what log records and metrics name: read from the connection once there is one
    @property
    def node_id(self) -> str | None:
        return self.kv.node_id if self.kv is not None else None

    @property
    def ring(self):
        return self.kv.ring if self.kv is not None else None

    def log_clock(self) -> int | None:
        return self.kv.clock_value if self.kv is not None else None

    async def _announce_metrics(self, kv) -> None:
        while True:
            with contextlib.suppress(Exception):
                await kv.call_scheduler("heartbeat", timeout=ANNOUNCE_INTERVAL, metrics=self.metrics_address)
            await asyncio.sleep(ANNOUNCE_INTERVAL)

    async def run(self, stop: asyncio.Event, ready) -> None:
        """Serve jobs until ``stop`` (or, with ``one_job``, the job's end). Declared dead
        (cut off or stalled past worker_timeout), it gives up its shard, which the
        scheduler gave to another worker, and registers again under a new id."""
        job_id = None
        while True:
            kv = self.kv = await aio.connect(self.config.scheduler, self.config)
            if ready is not None:
                ready(kv.node_id)
                ready = None
            announce = (asyncio.create_task(self._announce_metrics(kv)) if self.metrics_address else None)
            # an app's numpy work can hold this loop for seconds: stay alive from a thread
            keepalive = kv.keepalive()
            log.info("%s connected to %s", kv.node_id, self.config.scheduler)
            try:
                job_id = await self._serve(kv, stop, job_id)
            finally:
                if announce is not None:
                    announce.cancel()
                keepalive.stop()
                await kv.close()
            if stop.is_set() or not kv.expelled.is_set():
                return
            log.warning("%s was declared dead; registering again", kv.node_id)

    async def _serve(self, kv, stop: asyncio.Event, job_id: str | None) -> str | None:
        """Poll for shards and run them until stopped, expelled or (``one_job``) the
        job ended; returns the job taken part in."""
        while not stop.is_set() and not kv.expelled.is_set():
            got = await kv.call_scheduler("job_poll")
            if got.get("job") is not None:
                job_id = got["job"]
                self.current, self.shards_run = (job_id, got["rank"]), self.shards_run + 1
                try:
                    await self.run_job(kv, got, stop)
                finally:
                    self.current = None
                continue  # take another shard if one is free (a dead worker's)
            if self.one_job and job_id is not None:
                st = await kv.call_scheduler("job_status", job=job_id, metrics_from=1 << 30)
                if st["state"] in ("done", "failed"):
                    break
            try:
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL)
            except asyncio.TimeoutError:
                pass
        return job_id

    async def run_job(self, kv, got: dict, stop: asyncio.Event) -> None:
        ctx = JobContext(job_id=got["job"], spec=got["spec"], rank=got["rank"],
                         num_workers=got["num_workers"], shards=list(got["shards"]), kv=kv)
        log.info("%s runs job %s (%s) as rank %d of %d", kv.node_id, ctx.job_id, ctx.spec.get("app"),
                 ctx.rank, ctx.num_workers)
        kv.namespace = ctx.job_id  # the app's tables are the job's: kv.table("w") opens "<job>/w"
        # and gate under the job's consistency, whatever the cluster's default, waiting
        # for the job's workers to join before the first clock passes
        kv.table_defaults = {k: ctx.spec[k] for k in ("consistency", "max_delay") if k in ctx.spec}
        if kv.table_defaults:
            kv.table_defaults["num_workers"] = ctx.num_workers
        try:
            app = self.apps.load(ctx.spec["app"])
            app_task = asyncio.create_task(app.run(kv, ctx))
            stopper = asyncio.create_task(stop.wait())
            expelled = asyncio.create_task(kv.expelled.wait())
            await asyncio.wait({app_task, stopper, expelled}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            expelled.cancel()
            if not app_task.done() and kv.expelled.is_set():
                # the scheduler gave our shard to another worker: what we would still
                # push or report is work done twice (our reports are refused anyway)
                app_task.cancel()
                await asyncio.wait({app_task}, timeout=5.0)
                log.warning("%s was declared dead during job %s; shard %d was given to another worker",
                            kv.node_id, ctx.job_id, ctx.rank)
                return
            if not app_task.done():
                # stopped (SIGTERM, a rolling restart): leaving hands our shard back to the
                # pool, so another worker redoes it and the job goes on
                app_task.cancel()
                log.warning("%s stopped during job %s; shard %d goes back to the pool", kv.node_id,
                            ctx.job_id, ctx.rank)
                return
            summary = app_task.result()
            await kv.flush()  # what the filters held back (docs/jobs.md, "Filters")
            await kv.wait_all()
            await ctx.report(done=True, summary={**(summary or {}), "traffic": job_traffic(kv.traffic())})
            log.info("%s finished job %s", kv.node_id, ctx.job_id)
        except Exception as e:
            if isinstance(e, BadRequestError) and "held_by" in e.data:
                # a report refused because the rank is no longer ours: we were declared dead
                # (stalled, cut off) and woke up before a heartbeat answer could say so
                log.warning("%s was declared dead during job %s; shard %d was given to another worker",
                            kv.node_id, ctx.job_id, ctx.rank)
                kv.expelled.set()
                return
            log.error("%s: job %s failed:\n%s", kv.node_id, ctx.job_id, traceback.format_exc())
            await ctx.report(error=f"{kv.node_id}: {type(e).__name__}: {e}")
        finally:
            kv.namespace = None
            kv.table_defaults = {}

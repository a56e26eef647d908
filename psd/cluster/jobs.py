"""The scheduler's book of jobs: who runs which shard, progress and metrics.

Deterministic (no I/O, no clock): the scheduler feeds it requests and heartbeats.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from psd.errors import BadRequestError, describe


#: bytes of metric records (by ``repr``) one job status reply carries at most
METRICS_REPLY_BUDGET = 24_000
#: the longest failure text a report may carry (the rest is cut)
MAX_ERROR = 4000
#: a job id as ``submit`` makes them
_JOB_ID = re.compile(r"J[1-9][0-9]*")


@dataclass
class Job:
    id: str
    spec: dict
    num_workers: int
    num_shards: int
    state: str = "waiting"  # waiting -> running -> done | failed
    ranks: dict[int, str] = field(default_factory=dict)       # rank -> worker id
    shards_done: set[int] = field(default_factory=set)
    progress: dict[int, float] = field(default_factory=dict)  # rank -> fraction in [0, 1]
    metrics: list[dict] = field(default_factory=list)
    error: str | None = None
    summary: dict = field(default_factory=dict)  # str(rank) -> that worker's summary
    report_seq: dict = field(default_factory=dict)  # "rank/worker" -> last report applied
    #: the job's tables live in namespace ``<id>``; kept or dropped when it ends (done or failed)
    keep_tables: bool = False
    tables_dropped: bool = False
    #: the order in which jobs ended (0: not yet): the newest ended are the ones kept
    ended_seq: int = 0

    @property
    def ended(self) -> bool:
        return self.state in ("done", "failed")

    def to_dict(self, metrics_from: int = 0, budget: int = METRICS_REPLY_BUDGET) -> dict:
        """The job as a status reply, with the metric records from ``metrics_from`` on, at
        most about ``budget`` bytes of them (at least one): a reply travels in one msgpack
        header, capped at 64 KiB, so a caller pages on while ``len(seen) < num_metrics``."""
        done = sum(self.progress.values()) / max(1, self.num_workers)
        metrics, size = [], 0
        for record in self.metrics[metrics_from:]:
            size += len(repr(record))  # over msgpack's size for these plain records
            if metrics and size > budget:
                break
            metrics.append(record)
        return {"id": self.id, "app": self.spec.get("app"), "name": self.spec.get("name"), "state": self.state,
                "namespace": self.id, "keep_tables": self.keep_tables, "tables_dropped": self.tables_dropped,
                "num_workers": self.num_workers, "ranks": {str(k): v for k, v in self.ranks.items()},
                "progress": min(1.0, done), "per_rank": {str(k): v for k, v in self.progress.items()}, "shards_done": sorted(self.shards_done),
                "num_shards": self.num_shards, "error": self.error, "summary": self.summary,
                "metrics": metrics, "num_metrics": len(self.metrics)}


def check_report(job: Job, meta: dict) -> dict:
    """The keyword arguments for :meth:`JobBook.report` from a ``job_report``'s meta,
    checked: ``rank`` one of the job's, ``progress`` a finite number (held to [0, 1]),
    ``metrics`` a list of maps, ``summary`` a map, ``error`` a text (cut to
    ``MAX_ERROR``); a ``BadRequestError`` naming the field otherwise, before anything
    is applied."""
    def bad(field: str, expected: str):
        raise BadRequestError(f"job_report: {field}: expected {expected}, got {describe(meta.get(field))}",
                              field=f"meta.{field}")

    rank, progress, metrics = meta.get("rank"), meta.get("progress"), meta.get("metrics")
    summary, error, seq = meta.get("summary"), meta.get("error"), meta.get("seq")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < job.num_shards:
        bad("rank", f"a rank of job {job.id}, 0 to {job.num_shards - 1}")
    if progress is not None:
        if (not isinstance(progress, (int, float)) or isinstance(progress, bool)
                or not math.isfinite(progress)):
            bad("progress", "a fraction from 0 to 1")
        progress = min(1.0, max(0.0, float(progress)))
    if metrics is not None and (not isinstance(metrics, list) or not all(isinstance(r, dict) for r in metrics)):
        bad("metrics", "a list of maps (metric records)")
    if summary is not None and not isinstance(summary, dict):
        bad("summary", "a map")
    if error is not None and not isinstance(error, str):
        bad("error", "a text")
    return {"rank": rank, "progress": progress, "metrics": metrics, "summary": summary,
            "error": error[:MAX_ERROR] if error else None, "done": bool(meta.get("done")),
            "seq": seq if isinstance(seq, int) and not isinstance(seq, bool) else None}


class JobBook:
    def __init__(self):
        self.jobs: dict[str, Job] = {}
        self._next = 1

    def submit(self, spec: dict, num_workers: int) -> Job:
        job = Job(id=f"J{self._next}", spec=spec, num_workers=num_workers, num_shards=num_workers,
                  keep_tables=spec.get("keep_tables") is True)
        self._next += 1
        self.jobs[job.id] = job
        return job

    def prune_ended(self, keep: int) -> list[str]:
        """Forget all but the ``keep`` newest ended jobs whose tables are dropped or kept
        (their metrics included); returns the ids forgotten."""
        ended = sorted((j for j in self.jobs.values() if j.ended and (j.tables_dropped or j.keep_tables)),
                       key=lambda j: j.ended_seq)
        drop = [j.id for j in ended[:max(0, len(ended) - keep)]]
        for job_id in drop:
            del self.jobs[job_id]
        return drop

    def forgotten(self, job_id: str) -> bool:
        """Whether ``job_id`` names a job this book had and has forgotten."""
        return (job_id not in self.jobs and _JOB_ID.fullmatch(job_id) is not None
                and int(job_id[1:]) < self._next)

    def poll(self, worker: str, may=lambda job_id: True) -> tuple[Job, int] | None:
        """Give ``worker`` a free rank of the oldest unfinished job it ``may`` take part
        in (its key may be limited to some jobs' namespaces), or None."""
        for job in self.jobs.values():
            if job.state in ("done", "failed") or not may(job.id):
                continue
            for rank, w in job.ranks.items():
                if w == worker and rank not in job.shards_done:
                    return job, rank
            free = [r for r in range(job.num_workers) if r not in job.ranks]
            if free:
                job.ranks[free[0]] = worker
                job.state = "running"
                return job, free[0]
        return None

    def release(self, worker: str) -> list[tuple[str, int]]:
        """A worker died: its unfinished shards go back to the pool for live workers."""
        freed = []
        for job in self.jobs.values():
            if job.state in ("done", "failed"):
                continue
            for rank, w in list(job.ranks.items()):
                if w == worker and rank not in job.shards_done:
                    del job.ranks[rank]
                    job.progress[rank] = 0.0
                    job.metrics.append({"event": "shard_released", "rank": rank, "worker": worker})
                    freed.append((job.id, rank))
        return freed

    def report(self, job_id: str, rank: int, progress: float | None = None,
               metrics: list[dict] | None = None, done: bool = False,
               error: str | None = None, summary: dict | None = None, seq: int | None = None,
               reporter: str = "") -> Job:
        job = self.jobs[job_id]
        if seq is not None:  # reports are re-sent when an answer is lost: apply each once
            key = f"{rank}/{reporter}"
            if seq <= job.report_seq.get(key, 0):
                return job
            job.report_seq[key] = seq
        if progress is not None:
            job.progress[rank] = float(progress)
        if metrics:
            job.metrics.extend(metrics)
        if summary:
            job.summary[str(rank)] = summary
        was_ended = job.ended
        if error:
            job.state, job.error = "failed", error
        if done:
            job.shards_done.add(rank)
            job.progress[rank] = 1.0
            if len(job.shards_done) == job.num_shards and job.state != "failed":
                job.state = "done"
        if job.ended and not was_ended:
            job.ended_seq = 1 + max((j.ended_seq for j in self.jobs.values()), default=0)
        return job

"""Running a job and following it to the end: the core of ``psd run`` and ``psd submit``.

A job takes the same path here as on a real cluster: it is submitted to the scheduler
and worker daemons ask for it, so the embedded default exercises the production code.
The caller chooses the apps (an :class:`~psd.jobs.registry.AppRegistry`, e.g.
``psd.apps.APPS``) and, for :func:`run_job` and :func:`run_parsed`, how a cluster is
started for the job (e.g. ``psd.local.LocalCluster.for_job``): this module imports
neither an app nor the local cluster.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from psd.client import admin
from psd.jobs.plots import plot_curves
from psd.jobs.registry import AppRegistry
from psd.jobs.spec import JobSpec, load_job

POLL = 0.2

#: starts a cluster for a job and stops it on exit: ``start(job)`` is a context manager
#: whose value has ``scheduler`` (its address) and ``add_worker(name, one_job=True)``
#: (a worker daemon process with ``name``, ``proc`` and ``log_tail()``), as
#: ``psd.local.LocalCluster.for_job`` does
StartCluster = Callable[[JobSpec], AbstractContextManager]


@dataclass
class JobRun:
    """What a job run through :func:`run_parsed` produced (also written to ``output``)."""

    job: JobSpec
    job_id: str
    state: str                  # "done", "failed" or "timed out"
    error: str | None
    summary: dict               # as in summary.json
    metrics: list[dict] = field(repr=False)  # as in metrics.jsonl
    output: Path
    seconds: float

    @property
    def exit_code(self) -> int:
        return 0 if self.state == "done" else 1


def run_job(path: str, apps: AppRegistry, start: StartCluster, output: str | None = None,
            quiet: bool = False) -> int:
    """``psd run``: the job file at ``path`` (its app found in ``apps``) on a cluster
    ``start`` starts for it; progress, outputs and the summary table as the CLI shows
    them. Returns the exit code."""
    return run_parsed(load_job(path, apps), apps, start, output, quiet, echo=True).exit_code


def run_parsed(job: JobSpec, apps: AppRegistry, start: StartCluster, output: str | Path | None = None,
               quiet: bool = True, echo: bool = False, plots: bool = True) -> JobRun:
    """Run the checked ``job`` on a fresh cluster from ``start``: submitted to its
    scheduler and run by ``job.workers`` worker daemons started for it. ``quiet`` hides
    the progress bar, ``echo`` prints the start line and the summary table as ``psd run``
    does. The outputs are written to ``output`` (default: the job's ``output``);
    ``plots=False`` skips the PNGs. A job that fails is not an exception here: look at
    ``state`` and ``error``."""
    out = Path(output or job.output)
    out.mkdir(parents=True, exist_ok=True)
    if echo:
        print(f"psd run: job {job.name!r} ({job.app}) on {job.servers} server(s) and {job.workers} "
              f"worker(s); output in {out}/", file=sys.stderr)
    started = time.monotonic()
    with start(job) as cluster:
        job_id = admin.call(cluster.scheduler, "submit", job=_submitted(job, out), workers=job.workers)["job"]
        workers = [cluster.add_worker(f"worker{i}", one_job=True) for i in range(job.workers)]
        state = _follow(cluster.scheduler, job, job_id, workers, out, quiet)
    elapsed = time.monotonic() - started
    summary = _complete(job, apps, job_id, state, out, elapsed, echo, plots)
    return JobRun(job=job, job_id=job_id, state=state["state"], error=state.get("error"), summary=summary,
                  metrics=state["metrics_all"], output=out, seconds=elapsed)


def submit_job(path: str, scheduler: str, apps: AppRegistry, output: str | None = None, follow: bool = False,
               quiet: bool = False, config=None) -> int:
    """``psd submit``: hand a job to a running cluster; its worker daemons take the shards.
    With ``follow``, show progress and write the outputs as ``psd run`` does. ``apps``:
    where the job's app is found (to check the file and draw its plots here); ``config``
    (a ClusterConfig): where the keys are (``keys``, ``security``)."""
    job = load_job(path, apps)
    job_id = admin.call(scheduler, "submit", config=config, job=_submitted(job), workers=job.workers)["job"]
    print(f"psd submit: job {job_id} ({job.app}, {job.workers} shard(s)) submitted to {scheduler}")
    if not follow:
        print(f"follow it with: psd status --scheduler {scheduler}")
        return 0
    out = Path(output or job.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    state = _follow(scheduler, job, job_id, [], out, quiet, config)
    return _finish(job, apps, job_id, state, out, time.monotonic() - started)


def _submitted(job: JobSpec, out: Path | None = None) -> dict:
    """The job as the scheduler keeps it: the file's map, with its name (the file's stem
    unless the file names it), which `psd status` shows. ``out``: the folder this run
    writes its outputs to, which ``psd run`` passes on (made absolute) as the job's
    ``output``, so the workers write the model there (``psd.apps.model.save_folder``)
    whatever ``--output`` chose; ``psd submit`` passes the file's ``output`` on as is."""
    spec = {**job.spec, "name": job.name}
    if out is not None:
        spec["output"] = str(Path(out).resolve())
    return spec


def _finish(job: JobSpec, apps: AppRegistry, job_id: str, state: dict, out: Path, elapsed: float) -> int:
    _complete(job, apps, job_id, state, out, elapsed, echo=True)
    return 0 if state["state"] == "done" else 1


def _complete(job: JobSpec, apps: AppRegistry, job_id: str, state: dict, out: Path, elapsed: float, echo: bool,
              plots: bool = True) -> dict:
    """Plots, summary.json and (with ``echo``) the summary table and any failure line."""
    if plots:
        _plot(job, apps, state["metrics_all"], out)
    summary = _summarize(job, state, out, elapsed, echo)
    if echo and state["state"] != "done":
        print(f"psd: job {job_id} {state['state']}: {state.get('error') or 'see the logs above'}",
              file=sys.stderr)
    return summary


def _follow(scheduler: str, job: JobSpec, job_id: str, workers, out: Path, quiet: bool, config=None) -> dict:
    """Page through job_status until the job ends; ``config``: keys for admin calls
    (None: those of the LocalCluster serving ``scheduler``)."""
    from tqdm import tqdm

    metrics_path = out / "metrics.jsonl"
    seen: list[dict] = []
    reported: set = set()
    deadline = time.monotonic() + job.timeout
    bar = tqdm(total=100, unit="%", desc=job.name, disable=quiet, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
    with open(metrics_path, "w") as metrics_file, bar:
        while True:
            st = admin.call(scheduler, "job_status", config=config, job=job_id, metrics_from=len(seen))
            for record in st["metrics"]:
                metrics_file.write(json.dumps(record) + "\n")
                seen.append(record)
                bar.set_postfix_str(_postfix(record), refresh=False)
            metrics_file.flush()
            if len(seen) < st.get("num_metrics", 0):
                continue  # the reply was one page of the records: fetch the rest first
            bar.n = round(100 * st["progress"], 1)
            bar.refresh()
            if st["state"] in ("done", "failed"):
                st["metrics_all"] = seen
                st["server_traffic"] = _server_traffic(scheduler, config)
                record = traffic_record(st)
                if record:
                    metrics_file.write(json.dumps(record) + "\n")
                    seen.append(record)
                return st
            dead = [w for w in workers if w.proc.poll() not in (None, 0)]
            for w in dead:
                if w not in reported:  # its shards go to the others; the job goes on
                    reported.add(w)
                    bar.write(f"psd run: {w.name} exited with code {w.proc.returncode}; "
                              f"its shards go to the other workers")
            if workers and len(dead) == len(workers):
                st.update(state="failed", metrics_all=seen,
                          error=f"every worker died; last: {dead[-1].name}:\n{dead[-1].log_tail()}")
                return st
            if time.monotonic() > deadline:
                st.update(state="timed out", metrics_all=seen, error=f"not finished within {job.timeout:.0f} s")
                return st
            time.sleep(POLL)


def _server_traffic(scheduler: str, config=None) -> dict:
    """The servers' bytes by stage, summed, from ``status``: servers send them with one
    heartbeat in five (0.5 s at the default interval), so readings 0.6 s apart are taken
    until two agree. Cumulative over each server's life; with a slower heartbeat, a
    period behind."""
    last, sides = None, {}
    for _ in range(8):  # until two readings agree on the payload bytes (pings add headers only)
        try:
            sides = _servers_now(admin.call(scheduler, "status", config=config))
        except Exception:  # (a summary without server bytes beats a failed run)
            return {}
        now = {side: stages.get("raw") for side, stages in sides.items()}
        if now == last:
            break
        last = now
        time.sleep(0.6)
    return sides


def _servers_now(st: dict) -> dict:
    sides: dict = {}
    for node in st.get("nodes", []):
        if node.get("role") != "server":
            continue
        for side, stages in (node.get("traffic") or {}).items():
            into = sides.setdefault(side, {})
            for k, v in stages.items():
                into[k] = into.get(k, 0) + v
    return sides


def traffic_record(state: dict) -> dict | None:
    """Bytes per stage of the whole job, as one metrics record (``record: traffic``):
    workers' pushes and pulls summed over ranks, servers' replies, and the fractions
    saved (1 - wire / what the requests meant)."""
    ranks = [s.get("traffic") for s in (state.get("summary") or {}).values() if isinstance(s, dict)]
    ranks = [t for t in ranks if t]
    if not ranks:
        return None
    rec: dict = {"record": "traffic"}
    for side in ("sent", "received"):
        for k in {k for t in ranks for k in t.get(side, {})}:
            rec[f"workers_{side}_{k}"] = sum(t.get(side, {}).get(k, 0) for t in ranks)
    for side, stages in (state.get("server_traffic") or {}).items():
        for k, v in stages.items():
            if k not in ("messages", "kc_messages"):
                rec[f"servers_{side}_{k}"] = v
    meant = rec.get("workers_sent_before_filters", rec.get("workers_sent_raw", 0))
    if meant:
        rec["workers_saved"] = round(1.0 - rec.get("workers_sent_wire", 0) / meant, 4)
    if rec.get("servers_sent_raw"):
        rec["servers_saved"] = round(1.0 - rec["servers_sent_wire"] / rec["servers_sent_raw"], 4)
    kept: dict = {}
    for t in ranks:
        for name, c in t.get("filters", {}).items():
            k = kept.setdefault(name.rsplit("/", 1)[-1], [0, 0])
            k[0] += c.get("rows_out", 0)
            k[1] += c.get("rows_in", 0)
    if kept:  # rows the filters let through of those pushed, per table
        rec["filtered_rows"] = {name: f"{a}/{b}" for name, (a, b) in kept.items()}
    return rec


def _postfix(record: dict) -> str:
    keys = [k for k in record if k not in ("rank", "series", "time") and isinstance(record[k], float)]
    return " ".join(f"{k}={record[k]:.4g}" for k in keys[:3])


def _plot(job: JobSpec, apps: AppRegistry, metrics: list[dict], out: Path) -> None:
    for p in getattr(apps.load(job.app), "PLOTS", []):
        style = {k: p[k] for k in ("kind", "xscale", "yscale") if k in p}
        plot_curves(metrics, p["x"], p["ys"], out / p["file"], p.get("title", job.name), **style)


def _summarize(job: JobSpec, state: dict, out: Path, elapsed: float, echo: bool = True) -> dict:
    per_rank = state.get("summary") or {}
    summary = dict(per_rank.get("0", {}))  # rank 0 evaluates; the others add their counts
    for key in ("examples", "batches"):
        if all(key in s for s in per_rank.values()) and per_rank:
            summary[key] = sum(s[key] for s in per_rank.values())
    summary.pop("rank", None)
    summary.pop("traffic", None)
    traffic = traffic_record(state)
    if traffic:
        for k in ("workers_sent_before_filters", "workers_sent_wire", "workers_received_wire", "servers_sent_wire",
                  "workers_saved", "servers_saved"):
            if k in traffic:
                summary[f"bytes_{k}" if not k.endswith("saved") else k] = traffic[k]
    summary.update(job=state.get("id"), app=job.app, state=state["state"], seconds=round(elapsed, 2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    if not echo:
        return summary
    width = max(len(k) for k in summary)
    print(f"\n{job.name}: {state['state']} in {elapsed:.1f} s")
    for k in sorted(summary):
        v = summary[k]
        print(f"  {k.ljust(width)}  {v:.4f}" if isinstance(v, float) else f"  {k.ljust(width)}  {v}")
    print(f"  {'output'.ljust(width)}  {out}/ (metrics.jsonl, summary.json, plots)")
    return summary

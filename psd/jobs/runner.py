"""``psd run JOB.yaml``: a local cluster, the job's worker daemons, progress, results.

It takes the same path as a job on a real cluster: the job is submitted to the
scheduler and worker daemons ask for it, so the embedded default exercises the
production code. :func:`run_spec` runs a job given as a dict the same way (the Python
API, e.g. ``psd.apps.logreg.fit``) and returns what it produced.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from psd.client import admin
from psd.jobs.spec import JobSpec, load_job, parse_job
from psd.local import LocalCluster, daemon_argv

POLL = 0.2


@dataclass
class JobRun:
    """What a job run through :func:`run_spec` produced (also written to ``output``)."""

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


def run_job(path: str, output: str | None = None, quiet: bool = False) -> int:
    return _run_local(load_job(path), output, quiet, echo=True).exit_code


def run_spec(spec: dict, source: str = "<python>", output: str | Path | None = None, quiet: bool = True,
             echo: bool = False, plots: bool = True) -> JobRun:
    """Run the job ``spec`` (a job file's contents as a dict) on a local cluster, as
    ``psd run`` does: checked by :func:`psd.jobs.spec.parse_job` (problems raise
    ``ConfigError`` naming ``source``), then submitted to the scheduler of a fresh
    local cluster and run by its worker daemons. ``quiet`` hides the progress bar,
    ``echo`` prints the start line and the summary table as ``psd run`` does. The job's
    outputs are written to ``output`` (default: the spec's ``output``); ``plots=False``
    skips the PNGs. A job that fails is not an exception here: look at ``state`` and
    ``error``."""
    return _run_local(parse_job(spec, source), None if output is None else str(output), quiet, echo, plots)


def _run_local(job: JobSpec, output: str | None, quiet: bool, echo: bool, plots: bool = True) -> JobRun:
    out = Path(output or job.output)
    out.mkdir(parents=True, exist_ok=True)
    if echo:
        print(f"psd run: job {job.name!r} ({job.app}) on {job.servers} server(s) and {job.workers} "
              f"worker(s); output in {out}/", file=sys.stderr)
    started = time.monotonic()
    with LocalCluster(servers=job.servers, **job.cluster) as cluster:
        job_id = admin.call(cluster.scheduler, "submit", job=_submitted(job), workers=job.workers)["job"]
        workers = [cluster.spawn(f"worker{i}", daemon_argv(
            "worker", "--config", str(cluster.config_path), "--scheduler", cluster.scheduler, "--one-job"))
            for i in range(job.workers)]
        state = _follow(cluster.scheduler, job, job_id, workers, out, quiet)
    elapsed = time.monotonic() - started
    summary = _complete(job, job_id, state, out, elapsed, echo, plots)
    return JobRun(job=job, job_id=job_id, state=state["state"], error=state.get("error"), summary=summary,
                  metrics=state["metrics_all"], output=out, seconds=elapsed)


def submit_job(path: str, scheduler: str, output: str | None = None, follow: bool = False,
               quiet: bool = False, config=None) -> int:
    """``psd submit``: hand a job to a running cluster; its worker daemons take the shards.
    With ``follow``, show progress and write the outputs as ``psd run`` does. ``config``
    (a ClusterConfig): where the keys are (``keys``, ``security``)."""
    job = load_job(path)
    job_id = admin.call(scheduler, "submit", config=config, job=_submitted(job), workers=job.workers)["job"]
    print(f"psd submit: job {job_id} ({job.app}, {job.workers} shard(s)) submitted to {scheduler}")
    if not follow:
        print(f"follow it with: psd status --scheduler {scheduler}")
        return 0
    out = Path(output or job.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    state = _follow(scheduler, job, job_id, [], out, quiet, config)
    return _finish(job, job_id, state, out, time.monotonic() - started)


def _submitted(job: JobSpec) -> dict:
    """The job as the scheduler keeps it: the file's map, with its name (the file's stem
    unless the file names it), which `psd status` shows."""
    return {**job.spec, "name": job.name}


def _finish(job: JobSpec, job_id: str, state: dict, out: Path, elapsed: float) -> int:
    _complete(job, job_id, state, out, elapsed, echo=True)
    return 0 if state["state"] == "done" else 1


def _complete(job: JobSpec, job_id: str, state: dict, out: Path, elapsed: float, echo: bool,
              plots: bool = True) -> dict:
    """Plots, summary.json and (with ``echo``) the summary table and any failure line."""
    if plots:
        _plot(job, state["metrics_all"], out)
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


def _postfix(record: dict) -> str:
    keys = [k for k in record if k not in ("rank", "series", "time") and isinstance(record[k], float)]
    return " ".join(f"{k}={record[k]:.4g}" for k in keys[:3])


def _plot(job: JobSpec, metrics: list[dict], out: Path) -> None:
    from psd.apps import load_app
    from psd.apps.plots import plot_curves

    for p in getattr(load_app(job.app), "PLOTS", []):
        style = {k: p[k] for k in ("kind", "xscale", "yscale") if k in p}
        plot_curves(metrics, p["x"], p["ys"], out / p["file"], p.get("title", job.name), **style)


def _summarize(job: JobSpec, state: dict, out: Path, elapsed: float, echo: bool = True) -> dict:
    per_rank = state.get("summary") or {}
    summary = dict(per_rank.get("0", {}))  # rank 0 evaluates; the others add their counts
    for key in ("examples", "batches"):
        if all(key in s for s in per_rank.values()) and per_rank:
            summary[key] = sum(s[key] for s in per_rank.values())
    summary.pop("rank", None)
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

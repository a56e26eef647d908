"""Running an app's job from Python, for the apps' own ``fit()`` functions.

The job runs as ``psd run`` runs it, in a child process (``python -m psd run``): a
fresh local cluster of real daemons, its worker daemons, the same outputs. A child
process and not an import because the apps sit below the local cluster in the layers
(docs/architecture.md): ``psd.estimators`` runs jobs in-process for code above them.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from psd.apps.guard import DivergedError
from psd.errors import PsdError, PsdTimeoutError

#: seconds the child gets beyond the job's own timeout (cluster start and stop)
SLACK = 60.0


@contextmanager
def run_folder(output: str | Path | None) -> Iterator[tuple[Path, bool]]:
    """``output`` resolved (created), or a temporary folder deleted at the end; and
    whether it is temporary."""
    if output is not None:
        path = Path(output).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path, False
        return
    tmp = tempfile.mkdtemp(prefix="psd-fit-")
    try:
        yield Path(tmp), True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_job(spec: dict, folder: Path, caller: str, verbose: bool = False) -> tuple[dict, list[dict]]:
    """Write ``spec`` to ``folder/job.yaml``, run it with ``psd run`` and return its
    summary and metric records. A job that does not finish raises ``PsdError`` with its
    error (``PsdTimeoutError`` when it timed out); a job file the checks refuse raises
    ``ConfigError`` with their lines."""
    from psd.errors import ConfigError

    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump({**spec, "output": str(folder)}, sort_keys=False))
    cmd = [sys.executable, "-m", "psd", "run", str(job), "--output", str(folder)]
    if not verbose:
        cmd.append("--quiet")
    timeout = float(spec.get("timeout", 3600)) + SLACK
    try:
        proc = subprocess.run(cmd, stdout=None if verbose else subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PsdTimeoutError(f"{caller}: psd run did not end within {timeout:.0f} s") from None
    if verbose and proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode == 2:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise ConfigError(f"{caller}: " + "; ".join(lines[-20:]))
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if proc.returncode != 0 or summary.get("state") != "done":
        failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("psd")] or proc.stderr.splitlines()[-5:]
        cls = (PsdTimeoutError if summary.get("state") == "timed out"
               else DivergedError if "diverged" in proc.stderr or "step is too large" in proc.stderr else PsdError)
        raise cls(f"{caller}: the job failed (exit code {proc.returncode}): " + " ".join(failed)[-4000:])
    metrics_path = folder / "metrics.jsonl"
    metrics = [json.loads(ln) for ln in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    return summary, metrics

"""The apps as Python calls on in-memory data: ``psd run`` from Python.

Each call is a job on a fresh local cluster, run exactly as ``psd run`` runs a job
file (:func:`psd.jobs.runner.run_parsed`), so calls never share tables. The app builds
the job from the arrays (``psd.apps.logreg.fit_job``) and reads back what it learned;
this module starts the cluster, runs the job and turns a failed job into an exception.
It sits above the apps and ``psd.local``, which is why the apps do not hold it.
"""
from __future__ import annotations

from pathlib import Path

from psd.apps import APPS, logreg
from psd.apps.runjob import run_folder as _folder
from psd.errors import PsdError, PsdTimeoutError
from psd.jobs.registry import AppRegistry
from psd.jobs.runner import JobRun, run_parsed
from psd.jobs.spec import parse_job
from psd.local import LocalCluster


def run_spec(spec: dict, source: str = "<python>", output: str | Path | None = None, quiet: bool = True,
             echo: bool = False, plots: bool = True, apps: AppRegistry = APPS) -> JobRun:
    """Run the job ``spec`` (a job file's contents as a dict) on a fresh local cluster,
    as ``psd run`` does: checked by :func:`psd.jobs.spec.parse_job` (problems raise
    ``ConfigError`` naming ``source``), then submitted to the cluster's scheduler and run
    by its worker daemons. ``quiet`` hides the progress bar, ``echo`` prints the start
    line and the summary table. The outputs are written to ``output`` (default: the
    spec's ``output``); ``plots=False`` skips the PNGs. A job that fails is not an
    exception here: look at ``state`` and ``error``."""
    return run_parsed(parse_job(spec, source, apps), apps, LocalCluster.for_job, output, quiet, echo, plots)


def _run_or_raise(job: dict, caller: str, folder: Path, verbose: bool, plots: bool) -> JobRun:
    """The job run by :func:`run_spec`; one that did not finish raises ``PsdError``
    (``PsdTimeoutError`` when it timed out) with its error."""
    run = run_spec(job, source=caller, output=folder, quiet=not verbose, echo=verbose, plots=plots)
    if run.state != "done":
        cls = PsdTimeoutError if run.state == "timed out" else PsdError
        raise cls(f"{caller}: job {run.job_id} {run.state}: {run.error or 'see the worker logs'}")
    return run


def fit_logreg(X, y, *, servers: int = 2, workers: int = 2, l1: float = 1e-4, l2: float = 0.0,
               output: str | Path | None = None, X_test=None, y_test=None, verbose: bool = False,
               **options) -> logreg.FitResult:
    """Train L1 logistic regression (the ``logreg`` app) on in-memory data and return
    the weights.

    ``X``: a scipy.sparse matrix (any format) or a dense 2-d numpy array, one row per
    example; ``y``: its labels, 0/1 or -1/+1. The column index is the feature's key. The
    arrays are written as a compressed ``.npz`` (``data.npz`` in the job), and the job
    runs on a fresh local cluster of ``servers`` server and ``workers`` worker daemons;
    the workers save their weights and they are merged into ``FitResult.coef``.
    ``options``: the job's ``consistency`` (default sequential, as ``logreg.fit``: both
    take their defaults from ``psd.apps.logreg.fit_job``), ``max_delay``, ``cluster``,
    ``timeout``, ``name``, and any ``train`` key (``solver``, ``passes``, ``blocks``,
    ``learning_rate``, ...). ``output``: a folder
    that keeps the arrays, the model parts, metrics.jsonl, summary.json and the plots;
    by default a temporary folder, deleted at the end (and no plots are drawn).
    ``X_test``/``y_test``: optional test data (test log-loss and AUC in the metrics).
    ``verbose``: show the progress bar and summary table.

    Bad arrays raise ``psd.BadRequestError``, bad options ``psd.ConfigError`` (both
    naming the problem); a job that fails raises ``psd.PsdError`` with its error.
    """
    with _folder(output) as (folder, temporary):
        job = logreg.fit_job(X, y, folder, servers=servers, workers=workers, l1=l1, l2=l2, X_test=X_test,
                             y_test=y_test, caller="fit_logreg", **options)
        run = _run_or_raise(job, "fit_logreg", folder, verbose, plots=not temporary)
        return logreg.fit_result(X, job, run, None if temporary else folder)

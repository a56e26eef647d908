"""Quickstart app: sparse logistic regression trained by asynchronous minibatch SGD.

Every worker generates the same seeded data set and trains on its own shards. Per
minibatch it pulls the weights of the features present, computes the mean log-loss
gradient and pushes it; the server applies ``w -= lr * g``. Workers never wait for
each other (beyond what the job's consistency model imposes on pulls); each keeps at
most two pushes in flight so its view of ``w`` is at most one of its own steps stale,
and calls ``kv.clock()`` after every minibatch. Rank 0 evaluates on the test set after
every epoch, and also every ``train.eval_every`` minibatches when that is set.

The step is data-scaled unless ``train.learning_rate`` names one: ``STEP_SCALE / (W
lambda)``, lambda the largest eigenvalue of ``X^T X / N`` over the training set (power
iteration, the same on every worker: all generate the same set) and W the number of
workers. Gradient descent on the mean log-loss is stable for steps below
``8 / lambda`` (the loss's curvature is at most ``lambda / 4``); W workers pushing
gradients of the same weights add W steps per round, hence the W. A fixed step does not
carry over between data sets: 0.5 is a tenth of what rows of 5 features take and
diverges on rows of 400 (``scripts/bench_apps.py --apps sgd``).

For experiments with stragglers, a slowed minibatch sleeps after its gradient for
``train.slow_seconds`` plus ``train.slow_factor - 1`` times its own work (so it takes
``slow_factor`` times as long). ``train.slow_rank`` names a rank whose every minibatch is
slowed; ``train.slow_chance`` slows any rank's minibatch with that probability (seeded):
transient stragglers, which come and go between workers as on a shared cluster. By
default nothing is slowed.
"""
from __future__ import annotations

import asyncio
import math
import time

import numpy as np

from psd.apps.datasets import GENERATORS, SparseDataset, shard
from psd.apps.guard import check_end
from psd.apps.metrics import auc, log_loss
from psd.apps.options import (SPARSE_LOGREG_CHECKS, Check, check_sections, check_sparse_logreg, is_finite_num,
                              is_int, is_num, merge_defaults)
from psd.errors import ConfigError

DEFAULTS: dict = {
    "data": {
        "generator": "sparse_logreg",
        "seed": 42,
        "examples": 100_000,
        "features": 1_000_000,
        "nnz": 20,
        "noise": 0.05,
        "test_fraction": 0.1,
        "signal_fraction": 0.05,
    },
    "train": {
        "epochs": 5,
        "batch_size": 500,
        "learning_rate": None,  # None: data-scaled, STEP_SCALE / (workers * lambda_max)
        "eval_every": 0,        # minibatches between rank 0's extra evaluations; 0: per epoch only
        "slow_rank": -1,        # the rank whose every minibatch is slowed; -1: none
        "slow_chance": 0.0,     # the probability that any rank's minibatch is slowed
        "slow_seconds": 0.0,    # a slowed minibatch sleeps this long after its gradient,
        "slow_factor": 1.0,     # plus (factor - 1) x its own work
    },
}
#: the data-scaled step is STEP_SCALE / (workers * lambda_max(X^T X / N)): the largest step
#: for which gradient descent on the mean log-loss stays stable (its curvature is at most
#: lambda_max / 4); in a one-worker simulation it was the best of 1, 2, 4 and 8 on rows
#: of 5, 20, 100 and 400 features (docs/jobs.md)
STEP_SCALE = 8.0
POWER_ITERATIONS = 20
POWER_ROWS = 20_000     # lambda_max of X^T X / N is a mean over rows: a prefix estimates it

TABLE = "w"
#: plots `psd run` writes from the metrics records
PLOTS = [
    {"file": "loss.png", "x": "epoch", "ys": ["test_logloss", "train_logloss"],
     "title": "logistic regression: log-loss per epoch"},
    {"file": "auc.png", "x": "time", "ys": ["test_auc"], "title": "test AUC against time (s)"},
]
REPORT_EVERY = 20  # batches between progress reports


# -- options ------------------------------------------------------------------------
# key -> (accepts the value, what was expected)
_CHECKS: dict[str, dict[str, Check]] = {
    "data": SPARSE_LOGREG_CHECKS,
    "train": {
        "epochs": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "batch_size": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "learning_rate": (lambda v: v is None or (is_finite_num(v) and v > 0),
                          "a positive number, or null for the data-scaled step"),
        "eval_every": (lambda v: is_int(v) and v >= 0, "a non-negative integer (0: once per epoch)"),
        "slow_rank": (lambda v: is_int(v) and v >= -1, "a rank (an integer >= 0), or -1 for none"),
        "slow_seconds": (lambda v: is_num(v) and 0 <= v <= 60, "a number of seconds in [0, 60]"),
        "slow_factor": (lambda v: is_finite_num(v) and 1 <= v <= 1000, "a number in [1, 1000]"),
        "slow_chance": (lambda v: is_num(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    },
}


def validate(spec: dict, source: str) -> list[str]:
    """Problems with the ``data`` and ``train`` sections, all at once, each naming file and key.

    Unknown keys are reported too: a misspelt option would otherwise silently fall
    back to its default.
    """
    problems = check_sections(spec, source, _CHECKS, app="logreg_sgd")
    if not problems:
        problems.extend(check_sparse_logreg(options(spec)["data"], source))
    return problems


def options(spec: dict) -> dict:
    """``DEFAULTS`` overlaid with the spec's ``data`` and ``train`` sections."""
    return merge_defaults(DEFAULTS, spec)


def make_data(data: dict) -> tuple[SparseDataset, SparseDataset]:
    """The (train, test) sets a ``data`` section describes; identical on every worker."""
    train, test, _ = GENERATORS[data["generator"]](
        int(data["examples"]), int(data["features"]), int(data["nnz"]), int(data["seed"]),
        noise=float(data["noise"]), signal_fraction=float(data["signal_fraction"]),
        test_fraction=float(data["test_fraction"]))
    return train, test


# -- math ---------------------------------------------------------------------------
def largest_eigenvalue(data: SparseDataset, iterations: int = POWER_ITERATIONS, seed: int = 0) -> float:
    """lambda_max of ``X^T X / N`` by power iteration from a seeded start: the largest
    curvature of the mean squared margin, which bounds the log-loss's (times 1/4).
    From below, as power iteration converges; within a few percent after 20 steps on
    the generated sets. Over the first ``POWER_ROWS`` rows (the generators shuffle)."""
    data = data.rows(0, min(len(data), POWER_ROWS))
    if len(data) == 0 or data.indices.size == 0:
        return 0.0
    cols, col = np.unique(data.indices, return_inverse=True)
    rows, vals = data.row_ids(), data.values.astype(np.float64)
    v = np.random.default_rng(seed).standard_normal(cols.size)
    lam = 0.0
    for _ in range(iterations):
        v /= np.linalg.norm(v)
        xv = np.bincount(rows, weights=vals * v[col], minlength=len(data))
        u = np.bincount(col, weights=vals * xv[rows], minlength=cols.size) / len(data)
        lam = float(np.linalg.norm(u))
        if lam == 0.0:
            return 0.0
        v = u
    return lam


def default_step(train: SparseDataset, workers: int) -> float:
    """The data-scaled step ``STEP_SCALE / (workers * lambda_max)``."""
    lam = largest_eigenvalue(train)
    return STEP_SCALE / (max(1, workers) * lam) if lam > 0 else 1.0


def _margins(batch: SparseDataset, rows: np.ndarray, w_of_entry: np.ndarray) -> np.ndarray:
    return np.bincount(rows, weights=w_of_entry * batch.values, minlength=len(batch))


def _sigmoid(m: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -m))


def gradient(batch: SparseDataset, keys_inverse: np.ndarray, w: np.ndarray,
             num_keys: int) -> tuple[np.ndarray, float]:
    """Gradient of the batch's mean log-loss w.r.t. the weights of its unique keys, and that loss.

    ``keys_inverse`` maps each stored entry to its key's position in ``w``; everything
    is a scatter-add, with no Python loop over examples.
    """
    rows = batch.row_ids()
    m = _margins(batch, rows, w[keys_inverse].astype(np.float64))
    y = batch.labels.astype(np.float64)
    loss = float(np.mean(np.logaddexp(0.0, m) - y * m))
    residual = (_sigmoid(m) - y) / len(batch)
    g = np.bincount(keys_inverse, weights=residual[rows] * batch.values, minlength=num_keys)
    return g.astype(np.float32).reshape(-1, 1), loss


async def evaluate(table, test: SparseDataset, test_keys: np.ndarray,
                   test_inverse: np.ndarray) -> dict:
    """Test log-loss and AUC under the current weights, and how many of them are non-zero."""
    w = (await table.pull(test_keys))[:, 0]
    m = _margins(test, test.row_ids(), w[test_inverse].astype(np.float64))
    return {"test_logloss": log_loss(test.labels, _sigmoid(m)),
            "test_auc": auc(test.labels, m),
            "nnz_weights": int(np.count_nonzero(w))}


# -- the app ------------------------------------------------------------------------
async def run(kv, ctx) -> dict:
    """Train for ``train.epochs`` passes over this worker's shards; returns a summary."""
    problems = validate(ctx.spec, "job spec")
    if problems:
        raise ConfigError("; ".join(problems))
    opts = options(ctx.spec)
    train_opts = opts["train"]
    epochs, batch_size = int(train_opts["epochs"]), int(train_opts["batch_size"])
    eval_every = int(train_opts["eval_every"])
    slowed = ctx.rank == int(train_opts["slow_rank"])
    slow, factor = float(train_opts["slow_seconds"]), float(train_opts["slow_factor"])
    chance = float(train_opts["slow_chance"])
    slow_rng = np.random.default_rng([int(opts["data"]["seed"]), ctx.rank, 0x510])
    start = time.perf_counter()

    # seconds of numpy work: off the event loop, so the worker's heartbeats keep flowing
    train, test = await asyncio.to_thread(make_data, opts["data"])
    lr = train_opts["learning_rate"]
    if lr is None:   # every worker computes the same step from the same generated set
        lr = await asyncio.to_thread(default_step, train, ctx.num_workers)
    lr = float(lr)
    mine = [shard(train, s, ctx.num_workers) for s in ctx.shards]
    per_epoch = sum(math.ceil(len(d) / batch_size) for d in mine)
    total = max(1, per_epoch * epochs)
    if ctx.rank == 0:
        test_keys, test_inverse = np.unique(test.indices, return_inverse=True)

    table = await kv.table(TABLE, width=1, dtype="float32", updater="sgd", lr=lr)
    pending = None
    done = 0
    summary: dict = {"rank": ctx.rank, "examples": sum(len(d) for d in mine)}
    for epoch in range(1, epochs + 1):
        loss_sum, seen = 0.0, 0
        for part in mine:
            for i0 in range(0, len(part), batch_size):
                t0 = time.perf_counter()
                batch = part.rows(i0, i0 + batch_size)
                keys, inverse = np.unique(batch.indices, return_inverse=True)
                t1 = time.perf_counter()
                w = (await table.pull(keys))[:, 0]
                t2 = time.perf_counter()
                grad, loss = gradient(batch, inverse, w, keys.size)
                if slowed or (chance and slow_rng.random() < chance):   # a deliberate straggler:
                    # a fixed sleep, and/or the minibatch's own work (not the pull, which
                    # may wait at a barrier) stretched by the factor
                    await asyncio.sleep(slow + (factor - 1) * (t1 - t0 + time.perf_counter() - t2))
                loss_sum += loss * len(batch)
                seen += len(batch)
                if pending is not None:
                    await kv.wait(pending)  # bound staleness: one push of ours unapplied at most
                pending = table.push(keys, grad) if keys.size else None
                kv.clock()
                done += 1
                if ctx.rank == 0 and eval_every and done % eval_every == 0 and done % per_epoch:
                    result = await evaluate(table, test, test_keys, test_inverse)
                    await ctx.report(progress=done / total, metrics=[
                        {"batch": done, "time": time.perf_counter() - start, **result}])
                elif done % REPORT_EVERY == 0:
                    await ctx.report(progress=done / total)
        if pending is not None:
            await kv.wait(pending)
            pending = None
        train_loss = loss_sum / seen if seen else float("nan")
        records = [{"epoch": epoch, "series": f"worker{ctx.rank}", "train_logloss": train_loss}]
        summary["train_logloss"] = train_loss
        if ctx.rank == 0:
            result = await evaluate(table, test, test_keys, test_inverse)
            records.append({"epoch": epoch, "batch": done, "time": time.perf_counter() - start, **result})
            summary.update(result)
        await ctx.report(progress=done / total, metrics=records)

    summary.update(epochs=epochs, batches=done, seconds=time.perf_counter() - start, learning_rate=lr)
    # a run that ends worse than w = 0 (log-loss log 2) or non-finite has diverged: say so
    if ctx.rank == 0:
        check_end("logreg_sgd", math.log(2.0), float(summary.get("test_logloss", math.nan)), done,
                  f"lower train.learning_rate (now {lr:.4g}) or raise train.batch_size")
    else:
        check_end("logreg_sgd", math.log(2.0), float(summary["train_logloss"]), done,
                  f"lower train.learning_rate (now {lr:.4g}) or raise train.batch_size")
    return summary

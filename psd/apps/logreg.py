"""Sparse logistic regression with L1 (and L2) regularisation, as in the paper.

The objective, over the ``N`` training examples of all workers together::

    F(w) = 1/N sum_i log(1 + exp(-y_i x_i.w)) + l1 * |w|_1 + l2 / 2 * |w|^2

Solver ``prox`` (the default) is delayed block proximal gradient (Li et al., OSDI
2014, algorithm 2). The key space is cut into ``train.blocks`` ranges; iteration
``t`` works on block ``t mod blocks``. Every worker computes, on its own shard, its
part of the block's gradient and of its diagonal curvature (both summed over its
examples and divided by ``N``, so the parts add up to the whole objective's) and
pushes them. The servers' ``prox_l1`` updater (``aggregate: true``) adds up the
parts of each key and, when the last arrives, takes one proximal step with step
size ``learning_rate / curvature``: workers push gradients only, never weights.
Every push carries how many workers hold the key, which the workers learn once at
start-up, so the server knows when a key's step is complete without any worker
waiting for another.

Workers keep the margins ``x_i.w`` of their examples and update them from the
weights they pull. Each iteration pulls the current block and the block stepped
``max_delay + 1`` iterations before, whose step the bounded-delay gate guarantees
has been applied, and calls ``kv.clock()``. The job's ``consistency``/``max_delay``
set how far workers may run ahead of each other; the block count must exceed the
delay so a block's previous step has landed before its next gradient.

Solvers ``ftrl`` and ``adagrad`` run minibatch SGD against the ``ftrl`` and
``adagrad`` updaters instead (every push is a step), evaluated once per epoch.

Evaluation is distributed: each worker adds its examples' log-loss and its keys'
share of the regulariser (each key counted once over all workers) to a small
``sum`` table under sequential consistency, and rank 0 reads the total one clock
later without holding anyone back. Rank 0 also keeps the margins of the test set
and reports test log-loss, AUC and the number of non-zero weights. After the last
iteration all workers meet at a barrier, pull the final weights and report the
exact final objective.

Data: the seeded generator of :mod:`psd.apps.datasets.synthetic`, or LIBSVM files
(``data.files``, streamed in chunks, several files as shards, feature ids used as
keys or hashed). ``model.save`` names a folder where every worker writes the
weights of its keys (``part-RANK.npz``, arrays ``keys`` and ``w``).

Known limit: the step of a key waits for the parts of every worker that holds it,
so a worker that dies mid-run leaves its keys unstepped; rerun the job.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from psd.apps.datasets import GENERATORS, SparseDataset, shard
from psd.apps.datasets.arrays import check_npz, from_arrays, load_npz, write_npz
from psd.apps.datasets.libsvm import CHUNK_ROWS, concat, expand_files, load_shard, read_chunks
from psd.apps.guard import Watch, check_end
from psd.apps.model import SAVE_CHECK, read_model, save_folder, write_model
from psd.apps.metrics import auc, log_loss
from psd.apps.rendezvous import wait_for_ranks
from psd.apps.options import (SPARSE_LOGREG_CHECKS, Check, check_sections, check_sparse_logreg, is_bool,
                              is_finite_num, is_int, merge_defaults)
from psd.errors import BadRequestError, ConfigError
from psd.filters import TableInfo, build_chain, parse_filters
from psd.filters.pull import build_pull
from psd.keysets import unique
from psd.schema import table_bounds

SOLVERS = ("prox", "ftrl", "adagrad")
#: train.learning_rate when the job does not set it: prox's eta, adagrad's lr, ftrl's alpha
DEFAULT_RATE = {"prox": 0.7, "ftrl": 0.5, "adagrad": 0.1}

DEFAULTS: dict = {
    "data": {
        # generated data (the default) ...
        "generator": "sparse_logreg",
        "seed": 42,
        "examples": 50_000,
        "features": 100_000,
        "nnz": 20,
        "noise": 0.05,
        "test_fraction": 0.1,
        "signal_fraction": 0.05,
        # ... or LIBSVM files
        "files": None,
        "test_files": None,
        "hash_features": False,
        "chunk_rows": CHUNK_ROWS,
        # ... or arrays in an .npz file (what fit_job() writes)
        "npz": None,
        "test_npz": None,
    },
    "train": {
        "solver": "prox",
        "l1": 1e-4,
        "l2": 0.0,
        "learning_rate": None,  # DEFAULT_RATE[solver]
        # prox
        "passes": 50,           # at most this many sweeps over all blocks (see tol)
        "tol": 1e-5,            # stop once a pass lowers the objective by less (relative); 0: never
        "blocks": 16,
        "curvature": True,      # per-key step lr / curvature (the paper); false: a fixed step lr
        "scaled_step": True,    # scale each block's curvature by the data's (see Design.block_step)
        "patience": 3,          # objective rises in a row (each against a pass before) that halve the step
        "eval_every": 1,        # iterations between objective reports (prox)
        # ftrl / adagrad
        "epochs": 5,
        "batch_size": 500,
        "beta": 1.0,            # ftrl
    },
    "model": {
        "save": True,           # folder for model.npz; true: the run folder, false: none
    },
    # bounded memory for the weights of the ftrl / adagrad solvers (docs/operations.md,
    # "Bounded tables"): a hashed feature stream need not keep every feature it saw
    "tables": {
        "w": {},                # admit_after, admit_sketch, max_rows, ttl_pushes, ttl_seconds
    },
}
#: the table options ``tables.w`` may set
BOUNDED_OPTIONS = ("admit_after", "admit_sketch", "max_rows", "ttl_pushes", "ttl_seconds")

GENERATOR_KEYS = ("generator", "seed", "examples", "features", "nnz", "noise", "test_fraction",
                  "signal_fraction")
FILE_KEYS = ("files", "test_files", "hash_features", "chunk_rows")
NPZ_KEYS = ("npz", "test_npz")
#: train keys that only one kind of solver reads
SOLVER_KEYS = {"passes": ("prox",), "blocks": ("prox",), "curvature": ("prox",), "eval_every": ("prox",),
               "tol": ("prox",), "scaled_step": ("prox",),
               "epochs": ("ftrl", "adagrad"), "batch_size": ("ftrl", "adagrad"), "beta": ("ftrl",)}

#: plots `psd run` writes from the metrics records
PLOTS = [
    {"file": "objective.png", "x": "time", "ys": ["objective"],
     "title": "L1 logistic regression: objective against time (s)"},
    {"file": "nnz.png", "x": "iteration", "ys": ["nnz_weights"], "title": "non-zero weights per iteration"},
    {"file": "test.png", "x": "time", "ys": ["test_logloss", "test_auc"], "title": "test log-loss and AUC"},
]
#: what to change when a run diverges (the DivergedError's advice)
ADVICE = ("lower train.learning_rate (prox: {lr}), keep train.scaled_step true, or use more "
          "train.blocks or a smaller max_delay")
MODEL_FORMAT = 1
REPORT_SECONDS = 0.5  # at most this long between progress reports


# -- options ------------------------------------------------------------------------
_FILES_OK = (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
             "a file path or glob, or a list of them")

_CHECKS: dict[str, dict[str, Check]] = {
    "data": {
        **SPARSE_LOGREG_CHECKS,
        "files": _FILES_OK,
        "test_files": _FILES_OK,
        "hash_features": (is_bool, "true or false"),
        "chunk_rows": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "npz": (lambda v: isinstance(v, str) and bool(v), "an .npz file path"),
        "test_npz": (lambda v: isinstance(v, str) and bool(v), "an .npz file path"),
    },
    "train": {
        "solver": (lambda v: v in SOLVERS, "one of " + ", ".join(SOLVERS)),
        "l1": (lambda v: is_finite_num(v) and v >= 0, "a number >= 0"),
        "l2": (lambda v: is_finite_num(v) and v >= 0, "a number >= 0"),
        "learning_rate": (lambda v: is_finite_num(v) and v > 0, "a positive number"),
        "passes": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "blocks": (lambda v: is_int(v) and 1 <= v <= 1 << 20, "an integer in [1, 1048576]"),
        "curvature": (is_bool, "true or false"),
        "scaled_step": (is_bool, "true or false"),
        "tol": (lambda v: is_finite_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "patience": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "eval_every": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "epochs": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "batch_size": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "beta": (lambda v: is_finite_num(v) and v >= 0, "a number >= 0"),
    },
    "model": {
        "save": SAVE_CHECK,
    },
    "tables": {
        "w": (lambda v: isinstance(v, dict), "a mapping of table options"),
    },
}


def _bounded_problems(source: str, spec: dict):
    """``tables.w``: the weight table's bounded-memory options, checked as the servers
    will check them (psd.schema.table_bounds), each problem naming its key."""
    def check(value) -> list[str]:
        if not isinstance(value, dict):
            return [f"{source}: tables.w: expected a mapping of table options ({', '.join(BOUNDED_OPTIONS)}), "
                    f"got {value!r:.60}"]
        unknown = [k for k in value if k not in BOUNDED_OPTIONS]
        if unknown:
            return [f"{source}: tables.w.{unknown[0]}: unknown key; expected one of {', '.join(BOUNDED_OPTIONS)}"]
        solver = (spec.get("train") or {}).get("solver", DEFAULTS["train"]["solver"])
        if value and solver not in ("ftrl", "adagrad"):
            return [f"{source}: tables.w: bounded-memory options apply to solver ftrl and adagrad (a stream "
                    f"of sparse updates), not {solver!r}; the prox solver needs every weight"]
        try:
            table_bounds("w", value)
        except BadRequestError as e:
            return [f"{source}: tables.w.{e.data.get('option', '')}: {e.message}"]
        return []
    return check


def delay_of(spec: dict) -> int:
    """How many iterations a worker may run ahead, from the job's consistency settings
    (top level, else ``cluster:``): 0 for sequential and eventual (no bound to rely
    on: refresh the block just stepped), ``max_delay`` for bounded (the upper auto
    bound for ``auto``)."""
    cluster = spec.get("cluster") if isinstance(spec.get("cluster"), dict) else {}
    consistency = spec.get("consistency", cluster.get("consistency", "eventual"))
    if consistency != "bounded":
        return 0
    delay = spec.get("max_delay", cluster.get("max_delay", 2))
    if delay == "auto":
        bounds = cluster.get("auto_delay_bounds", (0, 8))
        return int(bounds[1]) if isinstance(bounds, (list, tuple)) and len(bounds) == 2 else 8
    return int(delay) if is_int(delay) else 0


def job_consistency(spec: dict) -> str:
    """The job's consistency model (top level, else ``cluster:``, else eventual)."""
    cluster = spec.get("cluster") if isinstance(spec.get("cluster"), dict) else {}
    return str(spec.get("consistency", cluster.get("consistency", "eventual")))


def gated(spec: dict) -> bool:
    """Whether the job's consistency guarantees that a pull sees every step taken
    ``delay_of(spec) + 1`` iterations before (sequential and bounded; not eventual)."""
    return job_consistency(spec) in ("sequential", "bounded")


def validate(spec: dict, source: str) -> list[str]:
    """Problems with the ``data``, ``train`` and ``model`` sections, each naming the
    file, the key and what was expected; data files must be readable."""
    problems = check_sections(spec, source, _CHECKS, app="logreg", unused_sections=("eval",),
                              special={("tables", "w"): _bounded_problems(source, spec)})
    if problems:
        return problems
    problems.extend(check_filters(spec, source))

    data_given = spec.get("data") or {}
    from_files = [k for k in FILE_KEYS if k in data_given]
    generated = [k for k in GENERATOR_KEYS if k in data_given]
    from_npz = [k for k in NPZ_KEYS if k in data_given]
    if from_npz and "npz" not in data_given:
        problems.append(f"{source}: data.npz: missing; expected the .npz training arrays that "
                        f"data.{from_npz[0]} applies to")
    elif from_npz and (from_files or generated):
        other = (from_files or generated)[0]
        problems.append(f"{source}: data.{other}: applies to {'LIBSVM files' if from_files else 'generated data'}, "
                        f"but data.npz names arrays; expected one or the other")
    elif from_files and "files" not in data_given:
        problems.append(f"{source}: data.files: missing; expected the LIBSVM training file(s) that "
                        f"data.{from_files[0]} applies to")
    elif "files" in data_given and generated:
        problems.append(f"{source}: data.{generated[0]}: applies to generated data, but data.files names "
                        f"LIBSVM files; expected one or the other")
    opts = options(spec)
    data, train = opts["data"], opts["train"]
    if from_npz:
        for key in NPZ_KEYS:
            if data[key] is not None:
                problems.extend(check_npz(data[key], f"data.{key}", source))
    elif "files" in data_given:
        for key in ("files", "test_files"):
            if data[key] is not None:
                problems.extend(expand_files(data[key], f"data.{key}", source)[1])
    elif not problems:
        problems.extend(check_sparse_logreg(data, source))

    for key in spec.get("train") or {}:
        solvers = SOLVER_KEYS.get(key)
        if solvers and train["solver"] not in solvers:
            problems.append(f"{source}: train.{key}: applies to solver {' and '.join(solvers)}, "
                            f"not {train['solver']!r}")
    if train["solver"] == "prox":
        tau = delay_of(spec)
        if train["blocks"] <= tau:
            problems.append(f"{source}: train.blocks: expected more blocks than the job's max_delay ({tau}), "
                            f"so a block's last step has landed before its next gradient; got {train['blocks']}")
    return problems


def weight_table(spec: dict) -> tuple[str, int, str, dict]:
    """The weight table a job's solver uses: updater, width, dtype and options."""
    opts = options(spec)
    t = opts["train"]
    l1, l2, rate = float(t["l1"]), float(t["l2"]), float(t["learning_rate"])
    if t["solver"] == "prox":
        return "prox_l1", 3, "float32", {"lr": rate, "l1": l1, "l2": l2, "aggregate": True}
    if t["solver"] == "ftrl":  # (l1, l2 scaled by the rounds of an epoch in run_sgd; the filter's l1 is the job's)
        return "ftrl", 1, "float32", {"alpha": rate, "beta": float(t["beta"]), "l1": l1, "l2": l2}
    return "adagrad", 1, "float32", {"lr": rate, "l1": l1}


def filters_of(spec: dict) -> list:
    """The job's ``filters`` for the weight table; by default ``kkt`` for the prox solver
    under a gated consistency (every worker must read the same rows to skip a key
    together), none otherwise. ``filters: []`` turns it off."""
    if "filters" in spec:
        return spec["filters"] or []
    return ["kkt"] if options(spec)["train"]["solver"] == "prox" and gated(spec) else []


def pull_filters_of(spec: dict) -> list:
    """The job's ``pull_filters`` for the weight table (none by default)."""
    return spec.get("pull_filters") or []


def check_filters(spec: dict, source: str) -> list[str]:
    """Problems of the job's filters on its weight table, each naming the key."""
    entries = filters_of(spec)
    updater, width, dtype, opts = weight_table(spec)
    try:
        parsed = parse_filters(entries)
        build_chain(entries, TableInfo("w", dtype, width, updater, opts))
        build_pull(pull_filters_of(spec), dtype, width)
    except ConfigError as e:
        return [f"{source}: {p}" for p in e.data.get("problems", [e.message])]
    if updater == "prox_l1" and not gated(spec) and any(n == "kkt" for n, _ in parsed):
        i = [n for n, _ in parsed].index("kkt")
        return [f"{source}: filters[{i}]: kkt with the prox solver needs consistency sequential or bounded "
                f"(workers skip a key together only if they read the same rows); the job runs eventual"]
    return []


def options(spec: dict) -> dict:
    """``DEFAULTS`` overlaid with the spec's sections, the learning rate resolved."""
    merged = merge_defaults(DEFAULTS, spec)
    train = merged["train"]
    if train["learning_rate"] is None:
        train["learning_rate"] = DEFAULT_RATE.get(train["solver"], 0.1)
    return merged


# -- the math, shared with tests and benchmarks -----------------------------------------
def _sigmoid(m: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -m))


def _losses(m: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example log-loss at margins ``m`` for labels ``y`` in {0, 1}."""
    return np.logaddexp(0.0, m) - y * m


def objective(data: SparseDataset, keys: np.ndarray, w: np.ndarray, l1: float, l2: float = 0.0) -> float:
    """``F(w)``: mean log-loss over ``data`` plus ``l1 * |w|_1 + l2 / 2 * |w|^2``.

    ``w[i]`` is the weight of ``keys[i]`` (sorted, unique); features not in ``keys``
    have weight 0. Every worker's view and the reference solvers are scored with this."""
    keys = np.asarray(keys, dtype=np.uint64)
    w = np.asarray(w, dtype=np.float64).ravel()
    pos = np.searchsorted(keys, data.indices)
    pos = np.minimum(pos, max(keys.size - 1, 0))
    found = keys[pos] == data.indices if keys.size else np.zeros(data.nnz, dtype=bool)
    wx = np.where(found, w[pos] if keys.size else 0.0, 0.0) * data.values
    m = np.bincount(data.row_ids(), weights=wx, minlength=len(data))
    loss = float(np.mean(_losses(m, data.labels.astype(np.float64)))) if len(data) else 0.0
    return loss + l1 * float(np.abs(w).sum()) + 0.5 * l2 * float(np.sum(w * w))


@dataclass
class Design:
    """One data set's entries against a worker's sorted key list, with the margins
    ``x_i.w`` of its examples under the worker's current view of ``w``, and its entries
    grouped by block (a block is a contiguous run of the key list)."""

    rows: np.ndarray      # entry -> example
    cols: np.ndarray      # entry -> position in the key list
    vals: np.ndarray      # float64
    labels: np.ndarray    # float64 in {0, 1}
    margins: np.ndarray   # float64, one per example
    blocks: list = field(default_factory=list)  # per block: (rows, cols - block start, vals)

    @classmethod
    def of(cls, data: SparseDataset, keys: np.ndarray) -> "Design":
        cols = np.searchsorted(keys, data.indices).astype(np.int64)
        return cls(data.row_ids(), cols, data.values.astype(np.float64), data.labels.astype(np.float64),
                   np.zeros(len(data)))

    def __len__(self) -> int:
        return int(self.labels.size)

    def split(self, key_bounds: np.ndarray) -> None:
        """Group entries by block; ``key_bounds[b]:key_bounds[b + 1]`` are block b's key positions."""
        order = np.argsort(self.cols, kind="stable")
        ends = np.searchsorted(self.cols[order], key_bounds)
        self.blocks = []
        for b in range(key_bounds.size - 1):
            e = order[ends[b]:ends[b + 1]]
            self.blocks.append((self.rows[e], self.cols[e] - key_bounds[b], self.vals[e]))

    def shift(self, b: int, delta: np.ndarray) -> None:
        """Block b's weights moved by ``delta`` (one per key position in the block)."""
        rows, cols, vals = self.blocks[b]
        if rows.size:
            self.margins += np.bincount(rows, weights=delta[cols] * vals, minlength=len(self))

    def recompute(self, w: np.ndarray) -> None:
        self.margins = np.bincount(self.rows, weights=w[self.cols] * self.vals, minlength=len(self))

    def block_gradient(self, b: int, num_keys: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """``scale`` times the block's log-loss gradient and diagonal curvature, summed over
        this design's examples."""
        rows, cols, vals = self.blocks[b]
        p = _sigmoid(self.margins[rows])
        g = np.bincount(cols, weights=(p - self.labels[rows]) * vals, minlength=num_keys)
        h = np.bincount(cols, weights=p * (1.0 - p) * vals * vals, minlength=num_keys)
        return g * scale, h * scale

    def block_step(self, b: int, num_keys: int, scale: float, w: np.ndarray, l1: float, l2: float
                   ) -> tuple[np.ndarray, np.ndarray, float]:
        """The block's gradient and curvature parts (as :meth:`block_gradient`) and the
        data's step scale for it: how much more the loss curves along this worker's own
        proximal step than the diagonal model says.

        The diagonal curvature ``h`` ignores that features of one example move together:
        where an example has many features in a block (a mail's ~800 words in every
        block), ``lr / h`` overshoots many times over. Along the step ``u`` this worker
        would take alone (its ``g``, ``h`` and its share of ``l1``), the loss curves by
        ``sum_i p_i (1 - p_i) (x_i.u)^2`` while the model says ``sum_j h_j u_j^2``;
        their ratio (at least 1) is the Rayleigh quotient of the block's diagonally
        scaled Hessian along the step, a per-block Lipschitz estimate from the feature
        values. Multiplying ``h`` by it makes the step exact for the quadratic model
        along ``u``. Examples are shuffled over workers, so each worker's estimate is
        about the global one; each pushes its own scaled part."""
        g, h = self.block_gradient(b, num_keys, scale)
        rows, cols, vals = self.blocks[b]
        if not rows.size:
            return g, h, 1.0
        share = len(self) * scale             # this worker's share of the examples
        with np.errstate(divide="ignore", invalid="ignore"):
            v = h * w - g
            u = np.where(h > 0, np.sign(v) * np.maximum(np.abs(v) - l1 * share, 0.0) / (h + l2 * share), w) - w
        model = float(np.sum(h * u * u))
        if not model > 0:
            return g, h, 1.0
        t = np.bincount(rows, weights=u[cols] * vals, minlength=len(self))
        p = _sigmoid(self.margins)
        actual = float(np.sum(p * (1.0 - p) * t * t)) * scale
        return g, h, max(1.0, actual / model) if np.isfinite(actual) else 1.0

    def loss_sum(self) -> float:
        return float(_losses(self.margins, self.labels).sum())


def _take(data: SparseDataset, idx: np.ndarray) -> SparseDataset:
    """The rows ``idx`` of ``data``, in that order."""
    lengths = np.diff(data.indptr)[idx]
    indptr = np.zeros(idx.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    starts = np.repeat(data.indptr[idx], lengths)
    entry = starts + (np.arange(indptr[-1]) - np.repeat(indptr[:-1], lengths))
    return SparseDataset(indptr, data.indices[entry], data.values[entry], data.labels[idx])


# -- data ------------------------------------------------------------------------------
def load_data(data: dict, shards: list[int], num_shards: int, with_test: bool
              ) -> tuple[SparseDataset, SparseDataset | None]:
    """This worker's training rows (its shards, concatenated) and, if asked, the test set."""
    if data["npz"] is not None:  # every worker reads the arrays and keeps its shards
        full = load_npz(data["npz"])
        mine = concat(shard(full, s, num_shards) for s in shards)
        test = load_npz(data["test_npz"]) if with_test and data["test_npz"] is not None else None
        return mine, test
    if data["files"] is None:
        train, test, _ = GENERATORS[data["generator"]](
            int(data["examples"]), int(data["features"]), int(data["nnz"]), int(data["seed"]),
            noise=float(data["noise"]), signal_fraction=float(data["signal_fraction"]),
            test_fraction=float(data["test_fraction"]))
        mine = concat(shard(train, s, num_shards) for s in shards)
        return mine, (test if with_test else None)
    files, problems = expand_files(data["files"], "data.files", "job spec")
    if problems:
        raise ConfigError("; ".join(problems))
    hashed, chunk = bool(data["hash_features"]), int(data["chunk_rows"])
    mine = concat(load_shard(files, s, num_shards, hash_features=hashed, chunk_rows=chunk) for s in shards)
    test = None
    if with_test and data["test_files"] is not None:
        test_paths, problems = expand_files(data["test_files"], "data.test_files", "job spec")
        if problems:
            raise ConfigError("; ".join(problems))
        test = concat(read_chunks(test_paths, hash_features=hashed, chunk_rows=chunk))
    return mine, test


# -- the worker's side of the job -----------------------------------------------------------
class Trainer:
    """What one worker holds: its examples, its keys and its view of their weights."""

    STATS = 5  # loss sum, |w|_1 share, |w|^2 share, non-zero share, examples

    def __init__(self, kv, ctx, opts: dict, train: SparseDataset, test: SparseDataset | None):
        self.kv, self.ctx, self.opts = kv, ctx, opts
        self.t = opts["train"]
        self.l1, self.l2 = float(self.t["l1"]), float(self.t["l2"])
        self.train_data = train
        self.test_data = test
        train_keys = unique(train.indices)
        self.keys = unique(np.concatenate([train_keys, test.indices])) if test is not None else train_keys
        self.trained = np.isin(self.keys, train_keys, assume_unique=True)  # keys this worker pushes
        self.w = np.zeros(self.keys.size)
        self.train = Design.of(train, self.keys)
        self.test = Design.of(test, self.keys) if test is not None and len(test) else None
        self.users = np.zeros(self.keys.size)  # workers that push each key (0: test-only)
        self.inflight: deque = deque()
        self.unread: list = []            # rank 0: (clock, record) whose sums are not asked for yet
        self.evals: deque = deque()       # rank 0: (stats pull task, record), in clock order
        self.records: list[dict] = []
        # minibatch solvers do not minimise F step by step (docs/jobs.md): watched for
        # non-finite values and judged on the training log-loss, no step to shrink
        self.watch = Watch("logreg", int(self.t["patience"]), ADVICE.format(lr=self.t["learning_rate"]),
                           adapt=self.t["solver"] == "prox", period=int(self.t["blocks"]))
        self.last_report = time.monotonic()
        self.started = time.perf_counter()
        self.final: dict = {}
        self.kkt = None  # the weight table's kkt filter, if it has one (run_prox)

    # -- plumbing ----------------------------------------------------------------------
    async def _track(self, ts: int, limit: int = 8) -> None:
        """Remember a push; keep at most ``limit`` unacknowledged."""
        self.inflight.append(ts)
        while len(self.inflight) > limit:
            await self.kv.wait(self.inflight.popleft())

    async def _drain(self) -> None:
        while self.inflight:
            await self.kv.wait(self.inflight.popleft())

    async def clock(self) -> None:
        """End this worker's iteration once the servers have its pushes.

        The clock message cannot overtake the pushes (they leave before ``push()``
        returns); waiting for their acknowledgements as well bounds this worker to one
        unapplied iteration, at one round trip per iteration."""
        await self._drain()
        self.kv.clock()

    async def _report(self, progress: float, force: bool = False) -> None:
        await self._collect(block=force)
        now = time.monotonic()
        if force or now - self.last_report >= REPORT_SECONDS:
            records, self.records = self.records, []
            await self.ctx.report(progress=progress, metrics=records or None)
            self.last_report = now

    async def setup(self) -> dict:
        """Learn from the other workers, through two sequential ``sum`` tables, how many
        of them hold each key, the number of training examples, the largest key and the
        most minibatches any worker runs per epoch."""
        kv, ctx = self.kv, self.ctx
        self.users_table = await kv.table("users", 1, "float32", "sum", consistency="sequential")
        info = await kv.table("info", 4, "int64", "sum", consistency="sequential")
        self.stats = await kv.table("stats", self.STATS, "float64", "sum", consistency="sequential")
        own = self.keys[self.trained]
        top = int(own[-1]) if own.size else -1
        batches = math.ceil(len(self.train) / int(self.t["batch_size"]))
        row = np.array([[len(self.train), min(top, 2**63 - 1), batches, 1]], dtype=np.int64)
        if own.size:
            await self._track(self.users_table.push(own, np.ones((own.size, 1), np.float32)))
        await self._track(info.push(np.array([ctx.rank], np.uint64), row))
        await self.clock()
        rows = await info.pull(np.arange(ctx.num_workers, dtype=np.uint64))  # waits for everyone
        self.users[self.trained] = (await self.users_table.pull(own))[:, 0] if own.size else 0.0
        self.total = int(rows[:, 0].sum())
        if self.total == 0:
            raise ConfigError("the training data has no examples")
        top = int(rows[:, 1].max())
        self.key_end = 2**64 if top >= 2**63 - 1 else top + 1
        self.max_batches = int(rows[:, 2].max())
        self.share = np.zeros(self.keys.size)  # 1 / parts: each key counts once over all workers
        self.share[self.trained] = 1.0 / self.users[self.trained]
        return {"examples": self.total, "workers": int(rows[:, 3].sum())}

    # -- evaluation ------------------------------------------------------------------------
    def partial_stats(self) -> np.ndarray:
        """This worker's share of the objective: every key counted once over all workers.

        Sums of products rather than ``@``: a 1-d BLAS dot hands work to OpenBLAS's
        threads, which on a small machine shared with the other daemons made every
        call about 100 times slower than a plain numpy reduction."""
        w, share = self.w, self.share
        return np.array([[self.train.loss_sum(), np.sum(share * np.abs(w)), np.sum(share * w * w),
                          np.sum(share[w != 0]), len(self.train)]])

    def test_metrics(self) -> dict:
        if self.test is None:
            return {}
        m = self.test.margins
        return {"test_logloss": log_loss(self.test.labels, _sigmoid(m)), "test_auc": auc(self.test.labels, m)}

    async def evaluate(self, record: dict) -> None:
        """Push this worker's share of the objective under the current clock; every worker
        reads the sum after its next ``kv.clock()`` (call :meth:`after_clock`), so all
        of them see the same objective history and take the same decisions from it."""
        clock = self.kv.clock_value
        await self._track(self.stats.push(np.array([clock], np.uint64), self.partial_stats()))
        record = {**record, "time": round(time.perf_counter() - self.started, 4)}
        if self.ctx.rank == 0:
            record.update(self.test_metrics())
        self.unread.append((clock, record))

    def after_clock(self) -> None:
        """After ``kv.clock()``: ask for the sums pushed before it. A pull at this
        clock of a sequential table is answered once every worker has passed the clock
        the sum was pushed at, so it runs as a task and nobody waits for it."""
        for clock, record in self.unread:
            task = asyncio.ensure_future(self.stats.pull(np.array([clock], np.uint64)))
            self.evals.append((task, record))
        self.unread = []

    async def _collect(self, block: bool = False, until: int | None = None) -> None:
        """Turn answered stats pulls into the objective history (rank 0: and metric
        records), in order; ``block``: wait for all of them, ``until``: for those of
        iterations up to that one."""
        while self.evals:
            task, record = self.evals[0]
            wait = block or (until is not None and record["iteration"] <= until)
            if not task.done() and not wait:
                break
            self.evals.popleft()
            s = (await task)[0]
            loss = s[0] / self.total
            record.update(objective=loss + self.l1 * s[1] + 0.5 * self.l2 * s[2], train_logloss=loss,
                          l1_norm=s[1], nnz_weights=int(round(s[3])))
            self.watch.add(record["iteration"], record["objective"])
            if self.ctx.rank == 0:
                self.records.append(record)
                self.records.extend(self.watch.events)
            self.watch.events = []
            self.final = record

    async def barrier(self) -> None:
        """Return once every worker has reached this clock with all its pushes applied."""
        await self._drain()
        await self.stats.pull(np.array([2**64 - 1], np.uint64))

    async def finish(self, table, record: dict) -> dict:
        """The exact final objective: barrier, pull every weight, recompute the margins."""
        self.after_clock()
        await self._collect(block=True)
        await self.barrier()
        # the weight column; with kkt, not the keys every worker skipped at their last push:
        # no step since this worker last pulled them
        pos = np.flatnonzero(~self.kkt.unchanged(self.keys)) if self.kkt is not None else np.arange(self.keys.size)
        if pos.size:
            self.w[pos] = (await table.pull(self.keys[pos]))[:, 0]
        self.train.recompute(self.w)
        if self.test is not None:
            self.test.recompute(self.w)
        await self.evaluate(record)
        await self.clock()
        self.after_clock()
        await self._collect(block=True)
        await self._drain()
        if self.t["solver"] == "prox":
            start = self.watch.history[0][1] if self.watch.history else self.final["objective"]
            check_end("logreg", start, float(self.final["objective"]), int(record["iteration"]), self.watch.advice)
        else:   # above the log-loss of w = 0 (log 2): worse than knowing nothing
            check_end("logreg", math.log(2.0), float(self.final["train_logloss"]), int(record["iteration"]),
                      f"lower train.learning_rate (now {self.t['learning_rate']}) or raise train.batch_size")
        await self.save()
        return self.final

    async def save(self) -> None:
        """``model.save``: every worker writes its keys' weights (``parts/part-RANK.npz``),
        then rank 0, once every rank has, merges them into ``model.npz`` and
        ``model.json`` (:mod:`psd.apps.model`). The parts must reach rank 0's disk: one
        machine, or a shared folder."""
        folder = save_folder(self.opts["model"]["save"], self.ctx.spec)
        if folder is None:
            return
        path = Path(folder) / "parts"
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".part-{self.ctx.rank:05d}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, keys=self.keys[self.trained], w=self.w[self.trained].astype(np.float32))
        tmp.replace(path / f"part-{self.ctx.rank:05d}.npz")
        ranks = await self.kv.table("ranks", 1, "float64", "assign", consistency="eventual")
        await self.kv.wait(ranks.push(np.array([self.ctx.rank], np.uint64), np.ones((1, 1))))
        if self.ctx.rank != 0:
            return
        await wait_for_ranks(ranks, self.ctx.num_workers)
        keys, w = load_model(folder)
        data = self.opts["data"]
        write_model(folder, "logreg", {"keys": keys, "w": w}, {
            "keys": ("feature ids hashed by SplitMix64 (psd.apps.hashing.mix64)" if data["hash_features"]
                     else "feature ids (column j of X is key j)"),
            "hash_features": bool(data["hash_features"]),
            "objective": "mean log-loss + l1 |w|_1 + l2/2 |w|^2, no intercept; P(y=1|x) = sigmoid(x.w)",
            "options": {**{k: self.t[k] for k in ("solver", "l1", "l2", "learning_rate")},
                        "consistency": job_consistency(self.ctx.spec), "max_delay": delay_of(self.ctx.spec)},
            "final": {k: self.final.get(k) for k in ("objective", "nnz_weights", "test_auc", "test_logloss")
                      if k in self.final},
        })

    # -- solvers ---------------------------------------------------------------------------
    async def run_prox(self) -> dict:
        t, kv = self.t, self.kv
        blocks, passes = int(t["blocks"]), int(t["passes"])
        iterations = blocks * passes
        eval_every = int(t["eval_every"])
        tau = delay_of(self.ctx.spec)
        gate = gated(self.ctx.spec)
        updater, width, dtype, wopts = weight_table(self.ctx.spec)
        table = await kv.table("w", width, dtype, updater, filters=filters_of(self.ctx.spec),
                               pull_filters=pull_filters_of(self.ctx.spec), **wopts)
        kkt = self.kkt = table.filters.get("kkt") if table.filters is not None else None
        edges = [self.key_end * b // blocks for b in range(blocks + 1)]  # Python ints: no uint64 wrap
        bounds = np.array([np.searchsorted(self.keys, np.uint64(e)) if e < 2**64 else self.keys.size
                           for e in edges], dtype=np.int64)
        self.train.split(bounds)
        if self.test is not None:
            self.test.split(bounds)
        designs = [d for d in (self.train, self.test) if d is not None]
        scale = 1.0 / self.total
        use_curvature, scaled = bool(t["curvature"]), bool(t["scaled_step"])
        tol = float(t["tol"])
        lag = tau + 2   # iterations until an evaluation's sum is readable without waiting
        watch = self.watch

        async def refresh(bs: list[int]) -> None:
            spans = [(int(bounds[b]), int(bounds[b + 1])) for b in bs]
            pos = np.concatenate([np.arange(lo, hi) for lo, hi in spans]) if spans else np.empty(0, np.int64)
            if kkt is not None and pos.size:
                # keys every worker skipped at their last push were not stepped: their rows are
                # as last pulled (the server's side of the KKT filter: nothing to send)
                pos = pos[~kkt.unchanged(self.keys[pos])]
            if not pos.size:
                return
            new = self.w.copy()
            new[pos] = (await table.pull(self.keys[pos]))[:, 0]
            for b, (lo, hi) in zip(bs, spans):
                delta = new[lo:hi] - self.w[lo:hi]
                if delta.any():
                    self.w[lo:hi] += delta
                    for d in designs:
                        d.shift(b, delta)

        def evaluated(i: int) -> bool:
            return i % eval_every == 0 or i % blocks == 0   # pass ends always: the stopping rule

        await refresh(list(range(blocks)))  # a table left by an earlier run need not be zero
        stopped, it, ratios = "passes", 0, []
        while it < iterations:
            # every worker reads the same evaluation at the same iteration: the same decisions
            j = it - lag
            if j >= 0 and evaluated(j):
                await self._collect(until=j)
                if tol > 0 and j % blocks == 0 and j >= 2 * blocks and watch.converged(j, j - blocks, tol):
                    stopped = "converged"
                    break
            b = it % blocks
            stale = it - 1 - tau
            # block b last changed at its step a pass ago, which a gated job pulled as the
            # stale block tau + 1 iterations later: only the stale block is new (half the
            # keys of an iteration's pulls); under eventual the step may have been late
            fresh = {stale % blocks} if stale >= 0 else set()
            await refresh(sorted(fresh if gate and it >= blocks else fresh | {b}))
            if evaluated(it):
                await self.evaluate({"iteration": it, "pass": round(it / blocks, 4)})
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            g, h, ratio = (self.train.block_step(b, hi - lo, scale, self.w[lo:hi], self.l1, self.l2)
                           if use_curvature and scaled else (*self.train.block_gradient(b, hi - lo, scale), 1.0))
            ratios.append(ratio)
            mine = self.trained[lo:hi]
            if mine.any():
                parts = self.users[lo:hi][mine]
                curv = (h[mine] * ratio if use_curvature else 1.0 / parts) * watch.scale
                rows = np.stack([g[mine], curv, parts], axis=1).astype(np.float32)
                await self._track(table.push(self.keys[lo:hi][mine], rows))
            await self.clock()
            self.after_clock()
            it += 1
            await self._report(it / iterations)
        final = await self.finish(table, {"iteration": it, "pass": round(it / blocks, 4)})
        return {"iterations": it, "passes": round(it / blocks, 4), "max_passes": passes, "blocks": blocks,
                "stopped": stopped, "step_shrinks": watch.shrinks,
                "step_ratio_median": round(float(np.median(ratios)), 3) if ratios else 1.0, **final}

    async def run_sgd(self) -> dict:
        t, kv = self.t, self.kv
        solver = t["solver"]
        epochs, batch_size = int(t["epochs"]), int(t["batch_size"])
        rate = float(t["learning_rate"])
        bounded = dict(self.opts["tables"]["w"])  # (table options: admission, eviction)
        entries = filters_of(self.ctx.spec)
        if solver == "ftrl":
            # FTRL's l1/l2 weigh the sum of all pushed gradients; a push is a minibatch mean,
            # so one epoch adds up about N / batch_size of them
            rounds = math.ceil(self.total / batch_size)
            entries = [{"kkt": {"l1": self.l1}} if e == "kkt" else e for e in entries]  # (not the scaled l1)
            table = await kv.table("w", 1, "float32", "ftrl", alpha=rate, beta=float(t["beta"]),
                                   l1=self.l1 * rounds, l2=self.l2 * rounds, filters=entries,
                                   pull_filters=pull_filters_of(self.ctx.spec), **bounded)
        else:
            table = await kv.table("w", 1, "float32", "adagrad", lr=rate, l1=self.l1, filters=entries,
                                   pull_filters=pull_filters_of(self.ctx.spec), **bounded)
        rng = np.random.default_rng([int(self.opts["data"].get("seed", 0)), self.ctx.rank])
        n = len(self.train_data)
        done = 0
        total_steps = epochs * self.max_batches
        for epoch in range(1, epochs + 1):
            order = rng.permutation(n)
            for i in range(self.max_batches):
                rows = order[i * batch_size:(i + 1) * batch_size]
                if rows.size:
                    batch = _take(self.train_data, np.sort(rows))
                    keys, inverse = np.unique(batch.indices, return_inverse=True)
                    w = (await table.pull(keys))[:, 0].astype(np.float64)
                    m = np.bincount(batch.row_ids(), weights=w[inverse] * batch.values, minlength=len(batch))
                    r = (_sigmoid(m) - batch.labels) / len(batch)
                    g = np.bincount(inverse, weights=r[batch.row_ids()] * batch.values, minlength=keys.size)
                    if solver == "adagrad" and self.l2:
                        g += self.l2 * w
                    await self._track(table.push(keys, g.astype(np.float32).reshape(-1, 1)))
                await self.clock()
                done += 1
                await self._report(done / total_steps)
            record = {"epoch": epoch, "iteration": done}
            if epoch < epochs:
                await self.barrier()
                if self.keys.size:
                    self.w = (await table.pull(self.keys))[:, 0].astype(np.float64)
                self.train.recompute(self.w)
                if self.test is not None:
                    self.test.recompute(self.w)
                await self.evaluate(record)
                await self.clock()
                self.after_clock()
                await self._report(done / total_steps)
        final = await self.finish(table, {"epoch": epochs, "iteration": done})
        return {"epochs": epochs, "batches": done, **final}


async def run(kv, ctx) -> dict:
    """Train on this worker's shards; rank 0's summary carries the final objective."""
    problems = validate(ctx.spec, "job spec")
    if problems:
        raise ConfigError("; ".join(problems))
    opts = options(ctx.spec)
    start = time.perf_counter()
    # seconds of parsing or generating: off the event loop, so heartbeats keep flowing
    train, test = await asyncio.to_thread(load_data, opts["data"], ctx.shards, ctx.num_workers, ctx.rank == 0)
    trainer = Trainer(kv, ctx, opts, train, test)
    info = await trainer.setup()
    trainer.started = time.perf_counter()
    if opts["train"]["solver"] == "prox":
        result = await trainer.run_prox()
    else:
        result = await trainer.run_sgd()
    await trainer._report(1.0, force=True)
    summary = {"rank": ctx.rank, "examples": len(train),
               "train_seconds": round(time.perf_counter() - trainer.started, 3),
               "load_seconds": round(trainer.started - start, 3)}
    if ctx.rank == 0:
        summary.update({k: v for k, v in result.items() if k not in ("time", "iteration", "pass", "epoch")},
                       solver=opts["train"]["solver"], l1=trainer.l1, l2=trainer.l2,
                       total_examples=info["examples"])
    return summary


# -- the Python API: train on in-memory arrays ------------------------------------------------
#: the consistency of a job built by :func:`fit_job` (``logreg.fit`` and
#: ``psd.estimators.fit_logreg`` both) when the caller names none. Sequential, not the
#: shipped job's bounded delay of 1: on data whose examples have features in every block
#: (text), a block's gradient taken before the previous block's step has landed
#: overshoots with it, and the SpamAssassin mails ended 50 passes 0.9% above
#: scikit-learn's objective under a delay of 1 against 0.4% without (docs/jobs.md).
#: ``consistency="bounded"`` (``max_delay`` 1 unless given) trades that for speed when a
#: worker straggles.
FIT_CONSISTENCY = "sequential"
#: fit_job() options that go to the top level of the job (the rest of **options are train keys)
FIT_JOB_KEYS = ("name", "consistency", "max_delay", "cluster", "timeout")


def load_model(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The weights the workers saved with ``model.save`` (``parts/part-RANK.npz``),
    merged: sorted keys and their weights (workers that share a key wrote the same
    value). :class:`Model` reads the merged ``model.npz`` instead."""
    parts = []
    for path in sorted((Path(folder) / "parts").glob("part-*.npz")):
        with np.load(path) as z:
            parts.append((z["keys"], z["w"]))
    if not parts:
        raise ConfigError(f"{folder}: no model parts (parts/part-RANK.npz) found")
    keys = np.concatenate([k for k, _ in parts])
    w = np.concatenate([v for _, v in parts])
    keys, first = np.unique(keys, return_index=True)
    return keys, w[first].astype(np.float64)


@dataclass
class FitResult:
    """What ``psd.estimators.fit_logreg`` learned: ``coef[j]`` is the weight of column
    ``j`` of ``X``."""

    coef: np.ndarray                      # float64, one per column of X
    summary: dict                         # as summary.json: objective, nnz_weights, train_logloss, ...
    metrics: list[dict] = field(repr=False)  # as metrics.jsonl: one record per evaluated iteration
    output: Path | None                   # the job's folder, or None when it was temporary
    job_id: str = ""
    seconds: float = 0.0                  # the whole run, cluster start-up included
    header: dict = field(default_factory=dict)  # model.json

    @property
    def objective(self) -> float:
        """F(coef) on the training data, as the workers computed it at the end."""
        return float(self.summary["objective"])

    @property
    def keys(self) -> np.ndarray:
        """The columns with a non-zero weight (uint64, sorted)."""
        return np.flatnonzero(self.coef).astype(np.uint64)

    @property
    def values(self) -> np.ndarray:
        """Their weights."""
        return self.coef[self.coef != 0]

    def decision_function(self, X) -> np.ndarray:
        """Margins ``X @ coef`` (X sparse or dense, with at most ``coef.size`` columns)."""
        return np.asarray(X @ self.coef[:X.shape[1]]).ravel()

    def predict_proba(self, X) -> np.ndarray:
        """P(y = 1 | x) per row of ``X``."""
        return _sigmoid(self.decision_function(X))


def _columns(X) -> int:
    return int(X.shape[1] if hasattr(X, "shape") else np.asarray(X).shape[1])


def fit_job(X, y, folder: Path, *, servers: int = 2, workers: int = 2, l1: float = 1e-4, l2: float = 0.0,
            X_test=None, y_test=None, caller: str = "fit_job", **options) -> dict:
    """The job that trains this app on in-memory data (``psd.estimators.fit_logreg``
    runs it): the arrays checked and written to ``folder/data`` as compressed ``.npz``
    (``data.npz`` in the job), the model saved to ``folder/model`` (earlier parts there
    removed), the outputs in ``folder``.

    ``X``: a scipy.sparse matrix (any format) or a dense 2-d numpy array, one row per
    example; ``y``: its labels, 0/1 or -1/+1. The column index is the feature's key.
    ``options``: the job's ``consistency`` (default ``FIT_CONSISTENCY``, sequential),
    ``max_delay`` (1 under ``bounded`` unless given), ``cluster``, ``timeout``, ``name``,
    and any ``train`` key (``solver``, ``passes``, ``blocks``, ``learning_rate``, ...).
    ``X_test``/``y_test``:
    optional test data (test log-loss and AUC in the metrics). Bad arrays or an unknown
    option raise ``psd.BadRequestError`` naming ``caller``, before anything is written.
    """
    data = from_arrays(X, y)
    n_features = _columns(X)
    if (X_test is None) != (y_test is None):
        raise BadRequestError("X_test and y_test: give both or neither")
    test = None
    if X_test is not None:
        test = from_arrays(X_test, y_test, "X_test")
        if _columns(X_test) != n_features:
            raise BadRequestError(f"X_test has {_columns(X_test)} columns but X has {n_features}; "
                                  f"expected the same features")
    job: dict = {"name": "logreg_fit", "app": "logreg", "servers": servers, "workers": workers,
                 "consistency": FIT_CONSISTENCY}
    train: dict = {"l1": l1, "l2": l2}
    for key, value in options.items():
        if key in FIT_JOB_KEYS:
            job[key] = value
        elif key in _CHECKS["train"]:
            train[key] = value
        else:
            raise BadRequestError(f"{caller}(): unknown option {key!r}; expected one of "
                                  f"{', '.join(FIT_JOB_KEYS + tuple(_CHECKS['train']))}")
    if job.get("consistency") == "bounded":
        job.setdefault("max_delay", 1)
    job["train"] = train
    job["data"] = {"npz": str(write_npz(folder / "data" / "train.npz", data))}
    if test is not None:
        job["data"]["test_npz"] = str(write_npz(folder / "data" / "test.npz", test))
    model = folder  # model.npz and model.json in the run folder, the parts in parts/
    for old in [*model.glob("parts/part-*.npz"), model / "model.json"]:  # an earlier run's must not mix in
        old.unlink(missing_ok=True)
    job["model"] = {"save": str(model)}
    job["output"] = str(folder)
    return job


def fit_result(X, job: dict, run, output: Path | None) -> FitResult:
    """What the finished :func:`fit_job` ``job`` on ``X`` learned: the weights its
    workers saved, one per column of ``X``. ``run``: the job's ``psd.jobs.runner.JobRun``;
    ``output``: the folder the result names (None when it was temporary)."""
    model = Model.load(job["model"]["save"])
    return FitResult(coef=model.dense(_columns(X)), summary=run.summary, metrics=run.metrics, output=output,
                     job_id=run.job_id, seconds=run.seconds, header=model.header)


@dataclass
class Model:
    """A saved logreg model (``model.npz``: ``keys`` uint64 sorted, ``w`` float64 their
    weights; ``model.json``: the header, :mod:`psd.apps.model`)."""

    keys: np.ndarray
    w: np.ndarray
    header: dict = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path) -> "Model":
        """The model a run wrote into ``folder`` (its ``model.save``)."""
        arrays, header = read_model(folder, "logreg")
        return cls(arrays["keys"].astype(np.uint64), arrays["w"].astype(np.float64), header)

    def dense(self, columns: int) -> np.ndarray:
        """The weights as a vector indexed by key, for keys below ``columns``."""
        coef = np.zeros(int(columns))
        inside = self.keys < np.uint64(columns)
        coef[self.keys[inside].astype(np.int64)] = self.w[inside]
        return coef

    def decision_function(self, X) -> np.ndarray:
        """Margins ``x.w`` per row: ``X`` a scipy.sparse matrix or dense array whose
        column j is key j, or a :class:`SparseDataset` (as the LIBSVM reader gives,
        hashed keys included)."""
        if isinstance(X, SparseDataset):
            pos = np.minimum(np.searchsorted(self.keys, X.indices), max(self.keys.size - 1, 0))
            hit = self.keys[pos] == X.indices if self.keys.size else np.zeros(X.nnz, bool)
            wx = np.where(hit, self.w[pos] if self.keys.size else 0.0, 0.0) * X.values
            return np.bincount(X.row_ids(), weights=wx, minlength=len(X))
        return np.asarray(X @ self.dense(_columns(X))).ravel()

    def predict_proba(self, X) -> np.ndarray:
        """P(y = 1 | x) per row of ``X``."""
        return _sigmoid(self.decision_function(X))



def fit(X, y, *, servers: int = 2, workers: int = 2, l1: float = 1e-4, l2: float = 0.0,
        output: str | Path | None = None, X_test=None, y_test=None, verbose: bool = False,
        **options) -> FitResult:
    """Train L1 logistic regression on in-memory data (as ``psd.estimators.fit_logreg``,
    but run by ``psd run`` in a child process; :mod:`psd.apps.runjob`). ``output``
    keeps the run folder (model.npz, model.json, metrics, plots); by default it is
    temporary. Arguments, defaults and errors as :func:`fit_job` (the one source of the
    defaults, ``psd.estimators.fit_logreg``'s too); a run that diverges raises
    ``psd.apps.guard.DivergedError`` saying what to change."""
    from psd.apps.runjob import run_folder, run_job

    with run_folder(output) as (folder, temporary):
        job = fit_job(X, y, folder, servers=servers, workers=workers, l1=l1, l2=l2, X_test=X_test,
                      y_test=y_test, caller="logreg.fit", **options)
        summary, metrics = run_job(job, folder, "logreg.fit", verbose)
        model = Model.load(folder)
        return FitResult(coef=model.dense(_columns(X)), summary=summary, metrics=metrics,
                         output=None if temporary else folder, job_id=str(summary.get("job", "")),
                         seconds=float(summary.get("seconds", 0.0)), header=model.header)

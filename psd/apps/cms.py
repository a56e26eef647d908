"""Count-min sketch: workers stream items and push counter increments; queries take the
minimum of an item's counters.

The sketch is ``depth`` rows of ``width`` int64 counters, kept on the servers in one
table (width 1, updater ``sum``). Counter ``(row, column)`` is key
``row * STRIDE(depth) + column`` with ``STRIDE = (2**64 - 1) // depth``: each row is a
dense key range of its own, and the rows sit far apart on the key ring, so with several
servers they land on different servers. ``width = ceil(e / epsilon)`` and
``depth = ceil(ln(1 / delta))`` (or given directly); then for every item x
``estimate(x) >= count(x)`` always, and ``estimate(x) - count(x) > epsilon * N`` with
probability at most ``delta`` (N: the stream length; Cormode & Muthukrishnan 2005).

Workers. Each worker streams its shard in batches of ``train.batch_size`` items: it
counts the batch's items locally (``np.bincount`` over the id space for the generator,
``np.unique`` for hashed text tokens), hashes each *distinct* item with the ``depth``
functions of :class:`psd.apps.hashing.MultiplyShift`, adds the counts into a dense
``depth * width`` array with one weighted ``np.bincount``, and pushes that array (one
dense span per row; a sparse push when the batch touched under a quarter of the
counters). At most ``train.in_flight`` pushes are outstanding. The sketch table is
always ``eventual`` (a table option): nothing reads it while streaming, and pushes then
apply on arrival, so the final queries see every acknowledged push whatever the job's
consistency model.

Data. ``data.generator: zipf`` (the default): a seeded Zipf-like stream of ids in
[0, vocabulary), made in blocks of 65,536 items, block j from
``default_rng([seed, j])`` by inverse-CDF sampling of a continuous power law in float32
(ids whose probability is under about 2**-24 are quantized: the extreme tail is not
exactly Zipf). Blocks are dealt out to workers as contiguous ranges, so the stream is
the same for any number of workers. Or ``data.files``: text files (plain, or gzip
``.gz``/``.dz``) cut into shards by bytes (see :mod:`psd.apps.datasets.text`); the
items are the whitespace-separated tokens, as 64-bit ids from
:func:`psd.apps.hashing.token_ids`.

Measuring. Every worker times its insert path (local counting, hashing, the bincount,
issuing pushes, and waiting for push acknowledgements) apart from producing the items
(generating or reading and tokenising), and reports items per second of both:
``inserts_per_s`` (insert path only) and ``items_per_s`` (end to end, wall clock).

Queries. When every rank is done (each writes a row to a small ``ranks`` table and
rank 0 waits for all of them), rank 0 recomputes the exact counts of the whole stream
(the same seeded blocks, or the same file shards), queries ``eval.queries`` distinct
items (the ``eval.heavy`` most frequent and a seeded uniform sample of the rest), pulls
their counters and reports, per item, the true count, the estimate and the error as
metric records (``series: query``) next to the bound ``epsilon * N``, plus a summary:
underestimates (must be 0), the fraction of queries over the bound (at most ``delta``
with high probability), mean and max error.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque

import numpy as np

from psd.apps.datasets.text import _open, check_files, expand_files, iter_shard_token_ids, plan_shards
from psd.apps.hashing import MultiplyShift, token_ids
from psd.apps.model import SAVE_CHECK, read_model, save_folder, write_model
from psd.apps.options import Check, check_sections, is_int, is_num, merge_defaults
from psd.apps.rendezvous import wait_for_ranks
from psd.errors import ConfigError
from psd.filters import TableInfo, build_chain

DEFAULTS: dict = {
    "data": {
        "generator": "zipf",
        "seed": 42,
        "items": 20_000_000,      # stream length, all workers together
        "vocabulary": 1_000_000,  # distinct ids the generator draws from
        "exponent": 1.1,          # Zipf exponent
        "files": None,            # text files instead of the generator
    },
    "sketch": {
        "epsilon": 0.001,         # width = ceil(e / epsilon)
        "delta": 0.01,            # depth = ceil(ln(1 / delta))
        "width": None,            # explicit width (instead of epsilon)
        "depth": None,            # explicit depth (instead of delta)
        "seed": 1,                # seed of the hash functions
        "save": True,             # folder for model.npz and model.json; true: the run folder
        "candidates": 1000,       # most frequent items kept by name in the model (heavy_hitters)
    },
    "train": {
        "batch_size": 1 << 21,    # items counted locally before one push
        "in_flight": 2,           # pushes outstanding before the worker waits
        "report_every": 8,        # batches between progress reports
    },
    "eval": {
        "queries": 2000,          # distinct items queried at the end
        "heavy": 100,             # of which the most frequent ones
    },
}

GEN_BLOCK = 1 << 16
MAX_WIDTH = 1 << 27
#: plots `psd run` writes from the metrics records
PLOTS = [
    {"file": "error.png", "x": "true", "ys": ["error", "bound"], "kind": "scatter",
     "xscale": "log", "yscale": "symlog",
     "title": "count-min: overestimate against true frequency (bound: epsilon * N)"},
    {"file": "throughput.png", "x": "time", "ys": ["inserts_per_s"],
     "title": "count-min: inserts/s per worker (insert path) against time (s)"},
]
QUERY_CHUNK = 500   # query records per report


# -- options ------------------------------------------------------------------------
_CHECKS: dict[str, dict[str, Check]] = {
    "data": {
        "generator": (lambda v: v == "zipf", "'zipf' (or give data.files instead)"),
        "seed": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
        "items": (lambda v: is_int(v) and 1 <= v <= 1 << 40, "an integer in [1, 2**40]"),
        "vocabulary": (lambda v: is_int(v) and 1 <= v <= 1 << 28, "an integer in [1, 2**28]"),
        "exponent": (lambda v: is_num(v) and 0 < v <= 5, "a number in (0, 5]"),
        "files": (lambda v: True, ""),   # checked by check_files (see validate)
    },
    "sketch": {
        "epsilon": (lambda v: is_num(v) and math.e / MAX_WIDTH <= v < 1,
                    f"a number in [{math.e / MAX_WIDTH:.3g}, 1)"),
        "delta": (lambda v: is_num(v) and 1e-20 <= v < 1, "a number in [1e-20, 1)"),
        "width": (lambda v: v is None or (is_int(v) and 1 <= v <= MAX_WIDTH), f"an integer in [1, {MAX_WIDTH}]"),
        "depth": (lambda v: v is None or (is_int(v) and 1 <= v <= 64), "an integer in [1, 64]"),
        "seed": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
        "save": SAVE_CHECK,
        "candidates": (lambda v: is_int(v) and 0 <= v <= 1_000_000, "an integer in [0, 1000000]"),
    },
    "train": {
        "batch_size": (lambda v: is_int(v) and 1 <= v <= 1 << 26, "an integer in [1, 2**26]"),
        "in_flight": (lambda v: is_int(v) and 1 <= v <= 64, "an integer in [1, 64]"),
        "report_every": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    },
    "eval": {
        "queries": (lambda v: is_int(v) and 1 <= v <= 1_000_000, "an integer in [1, 1000000]"),
        "heavy": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    },
}
_GENERATOR_KEYS = ("generator", "items", "vocabulary", "exponent")


def validate(spec: dict, source: str) -> list[str]:
    """Problems with the ``data``, ``sketch``, ``train`` and ``eval`` sections, each naming
    file and key; unknown keys too (a misspelt option would silently fall back)."""
    problems = check_sections(
        spec, source, _CHECKS, app="cms", unused_sections=("tables", "model"),
        special={("data", "files"): lambda v: [] if v is None else check_files(v, source, "data.files")})
    problems += check_filters(spec, source)
    if problems:
        return problems
    data = spec.get("data") or {}
    if data.get("files") is not None:
        for key in _GENERATOR_KEYS:
            if key in data:
                problems.append(f"{source}: data.{key}: only for the zipf generator; this job "
                                f"reads data.files (give one or the other)")
    sketch = {k: v for k, v in (spec.get("sketch") or {}).items() if k not in ("save", "candidates")}
    for explicit, derived in (("width", "epsilon"), ("depth", "delta")):
        if sketch.get(explicit) is not None and derived in sketch:
            problems.append(f"{source}: sketch.{explicit}: give sketch.{explicit} or "
                            f"sketch.{derived}, not both")
    ev = options(spec)["eval"]
    if ev["heavy"] > ev["queries"]:
        problems.append(f"{source}: eval.heavy: expected at most eval.queries ({ev['queries']}), "
                        f"got {ev['heavy']!r}")
    if not problems:
        width, _ = sketch_shape(options(spec)["sketch"])
        if width > MAX_WIDTH:
            problems.append(f"{source}: sketch.epsilon: gives width {width}, over {MAX_WIDTH}")
    return problems


def options(spec: dict) -> dict:
    """``DEFAULTS`` overlaid with the spec's sections."""
    return merge_defaults(DEFAULTS, spec)


def sketch_shape(sketch: dict) -> tuple[int, int]:
    """(width, depth) from explicit values, else from epsilon and delta."""
    width = sketch.get("width") or math.ceil(math.e / float(sketch["epsilon"]))
    depth = sketch.get("depth") or max(1, math.ceil(math.log(1.0 / float(sketch["delta"]))))
    return int(width), int(depth)


def stride(depth: int) -> int:
    """Key distance between two rows of the sketch table."""
    return ((1 << 64) - 1) // depth


def counter_keys(flat: np.ndarray, width: int, depth: int) -> np.ndarray:
    """Table keys of counters given as ``row * width + column`` (int64): uint64, same order."""
    flat = np.asarray(flat, dtype=np.int64)
    return ((flat // width).astype(np.uint64) * np.uint64(stride(depth))
            + (flat % width).astype(np.uint64))


# -- the sketch math ----------------------------------------------------------------
class CountMin:
    """A count-min sketch in one process: the math the app runs, and the single-machine
    baseline the benchmark compares against."""

    def __init__(self, width: int, depth: int, seed: int = 1):
        self.width, self.depth = int(width), int(depth)
        self.family = MultiplyShift(self.depth, self.width, seed)
        self.counts = np.zeros(self.depth * self.width, dtype=np.int64)

    def batch_counters(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The ``depth * width`` counter increments of distinct ``ids`` seen ``counts`` times."""
        if ids.size == 0:
            return np.zeros(self.depth * self.width, dtype=np.int64)
        flat = self.family.flat_columns(ids).ravel()
        weights = np.tile(np.asarray(counts, dtype=np.float64), self.depth)
        out = np.bincount(flat, weights=weights, minlength=self.depth * self.width)
        return out.astype(np.int64)   # exact: float64 sums of integers below 2**53

    def add(self, ids: np.ndarray, counts: np.ndarray) -> None:
        self.counts += self.batch_counters(ids, counts)

    def query(self, ids) -> np.ndarray:
        flat = self.family.flat_columns(np.asarray(ids, dtype=np.uint64))
        return self.counts[flat].min(axis=0)


def aggregate_dense(items: np.ndarray, vocabulary: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids of a batch of small ids (in [0, vocabulary)) and their counts."""
    c = np.bincount(items, minlength=vocabulary)
    ids = np.flatnonzero(c)
    return ids.astype(np.uint64), c[ids]


def aggregate_sparse(items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids of a batch of arbitrary 64-bit ids and their counts."""
    ids, counts = np.unique(items, return_counts=True)
    return ids.astype(np.uint64, copy=False), counts


# -- the data -----------------------------------------------------------------------
def zipf_block(seed: int, j: int, size: int, vocabulary: int, exponent: float) -> np.ndarray:
    """Block ``j`` of the seeded stream: ``size`` ids in [0, vocabulary), P(id r) roughly
    proportional to (r + 1) ** -exponent (continuous inverse CDF in float32, floored)."""
    u = np.random.default_rng([int(seed), int(j)]).random(size, dtype=np.float32)
    if abs(exponent - 1.0) < 1e-9:
        u *= np.float32(math.log(vocabulary + 1.0))
        x = np.exp(u)
    else:
        s = 1.0 - exponent
        u *= np.float32((vocabulary + 1.0) ** s - 1.0)
        u += np.float32(1.0)
        x = np.power(u, np.float32(1.0 / s))
    ids = x.astype(np.int64)
    ids -= 1
    np.clip(ids, 0, vocabulary - 1, out=ids)
    return ids


def num_blocks(items: int) -> int:
    return -(-int(items) // GEN_BLOCK)


def _block_size(items: int, j: int) -> int:
    return min(GEN_BLOCK, int(items) - j * GEN_BLOCK)


def zipf_batches(data: dict, blocks: range, batch_size: int):
    """Batches (int64 id arrays) of the generated stream's blocks ``blocks``: whole
    blocks, ``batch_size`` rounded up to a multiple of the block size."""
    per = max(1, -(-batch_size // GEN_BLOCK))
    seed, n, vocab, s = int(data["seed"]), int(data["items"]), int(data["vocabulary"]), float(data["exponent"])
    for b0 in range(blocks.start, blocks.stop, per):
        parts = [zipf_block(seed, j, _block_size(n, j), vocab, s) for j in range(b0, min(b0 + per, blocks.stop))]
        yield parts[0] if len(parts) == 1 else np.concatenate(parts)


def file_batches(pieces, batch_size: int):
    """Batches (uint64 token-id arrays) of at least ``batch_size`` tokens (except the last)."""
    buf: list[np.ndarray] = []
    have = 0
    for ids in iter_shard_token_ids(pieces):
        buf.append(ids)
        have += ids.size
        if have >= batch_size:
            yield np.concatenate(buf)
            buf, have = [], 0
    if have:
        yield np.concatenate(buf)


class Stream:
    """One shard of the job's item stream, in batches, with the matching local counting."""

    def __init__(self, data: dict, shard: int, num_shards: int, batch_size: int):
        self.files = data.get("files")
        if self.files is not None:
            self.paths = expand_files(self.files)
            plan = plan_shards(self.paths, num_shards)
            self.pieces = plan[shard]
            self.total = None   # unknown until read
            self._batches = file_batches(self.pieces, batch_size)
            self.vocabulary = None
        else:
            nb = num_blocks(data["items"])
            lo, hi = nb * shard // num_shards, nb * (shard + 1) // num_shards
            self.total = sum(_block_size(data["items"], j) for j in range(lo, hi))
            self._batches = zipf_batches(data, range(lo, hi), batch_size)
            self.vocabulary = int(data["vocabulary"])

    def next_batch(self) -> np.ndarray | None:
        return next(self._batches, None)

    def aggregate(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.vocabulary is not None:
            return aggregate_dense(items, self.vocabulary)
        return aggregate_sparse(items)


def exact_counts(data: dict, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct items of the whole stream (every shard) and their exact counts."""
    if data.get("files") is not None:
        pieces = [p for shard in plan_shards(expand_files(data["files"]), num_shards) for p in shard]
        ids = [a for a in iter_shard_token_ids(pieces)]
        return aggregate_sparse(np.concatenate(ids) if ids else np.empty(0, np.uint64))
    vocab = int(data["vocabulary"])
    counts = np.zeros(vocab, dtype=np.int64)
    for items in zipf_batches(data, range(num_blocks(data["items"])), 1 << 22):
        counts += np.bincount(items, minlength=vocab)
    ids = np.flatnonzero(counts)
    return ids.astype(np.uint64), counts[ids]


def pick_queries(ids: np.ndarray, counts: np.ndarray, queries: int, heavy: int,
                 seed: int) -> np.ndarray:
    """Positions (into ``ids``) of the ``heavy`` most frequent items and a seeded uniform
    sample of the others, ``queries`` in all (fewer if there are fewer distinct items)."""
    n = ids.size
    heavy = min(heavy, n)
    top = np.argsort(-counts, kind="stable")[:heavy] if heavy else np.empty(0, np.int64)
    rest = np.setdiff1d(np.arange(n), top, assume_unique=True)
    take = min(queries - heavy, rest.size)
    rng = np.random.default_rng([int(seed), 0x51])
    sample = rng.choice(rest, size=take, replace=False) if take > 0 else np.empty(0, np.int64)
    return np.concatenate([top, np.sort(sample)]).astype(np.int64)


# -- the app ------------------------------------------------------------------------
def push_counters(table, counters: np.ndarray, width: int, depth: int, once=None,
                  keyed: bool = False) -> list[int]:
    """Push one batch's counter increments: dense spans per row, or sparse keys when the
    batch touched under a quarter of the counters. Returns the timestamps. ``once(i)``:
    the identity of the batch's i-th push (``JobContext.once``), or None. ``keyed``: a
    dense row goes as keys too, since filters apply to ``push`` only (the job names
    some); a row's key list is the same every batch, so key caching sends it once."""
    nz = np.flatnonzero(counters)
    if nz.size == 0:
        return []
    ident = once or (lambda i: None)
    if nz.size * 4 < counters.size:
        return [table.push(counter_keys(nz, width, depth), counters[nz].reshape(-1, 1), once=ident(0))]
    rows = counters.reshape(depth, width, 1)
    if keyed:
        cols = np.arange(width, dtype=np.uint64)
        return [table.push(cols + np.uint64(r * stride(depth)), rows[r], once=ident(r)) for r in range(depth)]
    return [table.push_span(r * stride(depth), rows[r], once=ident(r)) for r in range(depth)]


def check_filters(spec: dict, source: str) -> list[str]:
    """Problems of the job's ``filters`` on the sketch table (int64 counters summed),
    each naming the key: zstd and significant apply (decision 112)."""
    if spec.get("filters") is None:
        return []
    try:
        build_chain(spec["filters"], TableInfo("sketch", "int64", 1, "sum"))
    except ConfigError as e:
        return [f"{source}: {p}" for p in e.data.get("problems", [e.message])]
    return []


async def query(table, family: MultiplyShift, ids: np.ndarray, max_keys: int) -> np.ndarray:
    """Count-min estimates of ``ids``: pull every row's counter, take the minimum."""
    if ids.size == 0:
        return np.empty(0, np.int64)
    flat = family.flat_columns(ids)
    keys = counter_keys(flat.ravel(), family.width, family.depth)
    uniq, inverse = np.unique(keys, return_inverse=True)
    step = max(1, min(max_keys, 1 << 20))
    vals = np.concatenate([(await table.pull(uniq[i:i + step]))[:, 0] for i in range(0, uniq.size, step)])
    return vals[inverse].reshape(family.depth, -1).min(axis=0)


async def run(kv, ctx) -> dict:
    """Stream this worker's shard into the sketch; rank 0 then measures the error."""
    problems = validate(ctx.spec, "job spec")
    if problems:
        raise ConfigError("; ".join(problems))
    opts = options(ctx.spec)
    data, tr, ev = opts["data"], opts["train"], opts["eval"]
    width, depth = sketch_shape(opts["sketch"])
    sketch = CountMin(width, depth, int(opts["sketch"]["seed"]))
    batch_size, in_flight = int(tr["batch_size"]), int(tr["in_flight"])

    filters = ctx.spec.get("filters") or None   # the sketch's (validate checked them)
    table = await kv.table("sketch", width=1, dtype="int64", updater="sum", consistency="eventual",
                           **({"filters": filters} if filters else {}))
    ranks = await kv.table("ranks", width=7, dtype="float64", updater="assign", consistency="eventual")
    stream = await asyncio.to_thread(Stream, data, ctx.shards[0], ctx.num_workers, batch_size)

    def step():
        """Make the next batch and its counter increments (off the event loop)."""
        t0 = time.perf_counter()
        items = stream.next_batch()
        t1 = time.perf_counter()
        if items is None:
            return None
        c1 = time.thread_time()
        counters = sketch.batch_counters(*stream.aggregate(items))
        return items.size, counters, t1 - t0, time.perf_counter() - t1, time.thread_time() - c1

    pending: deque[list[int]] = deque()
    n_items = n_batches = 0
    t_make = t_insert = cpu_insert = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    while True:
        got = await asyncio.to_thread(step)
        if got is None:
            break
        size, counters, dt_make, dt_count, cpu_count = got
        t0, c0 = time.perf_counter(), time.thread_time()
        # named by shard and batch: a shard run again after its worker died counts once
        pending.append(push_counters(table, counters, width, depth,
                                     lambda i, b=n_batches: ctx.once(b * depth + i), keyed=bool(filters)))
        cpu_insert += cpu_count + time.thread_time() - c0
        while len(pending) > in_flight:   # bound the batches in flight
            for ts in pending.popleft():
                await kv.wait(ts)
        t_make += dt_make
        t_insert += dt_count + time.perf_counter() - t0
        n_items += size
        n_batches += 1
        kv.clock()
        if n_batches % int(tr["report_every"]) == 0:
            now = time.perf_counter() - start
            await ctx.report(progress=_progress(stream, n_items), metrics=[{
                "series": f"worker{ctx.rank}", "time": now, "items": n_items,
                "inserts_per_s": n_items / max(t_insert, 1e-9), "items_per_s": n_items / max(now, 1e-9)}])
    t0 = time.perf_counter()
    if filters:
        await kv.flush()   # what they held back, before this rank says it is done
    while pending:
        for ts in pending.popleft():
            await kv.wait(ts)
    t_insert += time.perf_counter() - t0
    t_stream = time.perf_counter() - start
    cpu_stream = time.process_time() - cpu_start
    mine = {"rank": ctx.rank, "items": n_items, "batches": n_batches, "width": width, "depth": depth,
            "inserts_per_s": n_items / max(t_insert, 1e-9), "items_per_s": n_items / max(t_stream, 1e-9),
            "inserts_per_cpu_s": n_items / max(cpu_insert, 1e-9), "items_per_cpu_s": n_items / max(cpu_stream, 1e-9),
            "insert_seconds": t_insert, "make_seconds": t_make, "stream_seconds": t_stream,
            "insert_cpu_seconds": cpu_insert, "stream_cpu_seconds": cpu_stream}
    await ctx.report(progress=0.98 if ctx.rank == 0 else 1.0, metrics=[{
        "series": f"worker{ctx.rank}", "time": t_stream, "items": n_items,
        "inserts_per_s": mine["inserts_per_s"], "items_per_s": mine["items_per_s"]}])
    await kv.wait(ranks.push(np.array([ctx.rank], np.uint64),
                             np.array([[1.0, n_items, t_insert, t_stream, n_batches, cpu_insert, cpu_stream]])))
    if ctx.rank != 0:
        return mine

    # rank 0: every shard is in the sketch once every rank has written its row
    rows = await wait_for_ranks(ranks, ctx.num_workers)
    t_eval = time.perf_counter()
    ids, counts = await asyncio.to_thread(exact_counts, data, ctx.num_workers)
    total = int(counts.sum())
    pick = pick_queries(ids, counts, int(ev["queries"]), int(ev["heavy"]), int(data.get("seed", 0)))
    q_ids, q_true = ids[pick], counts[pick]
    q_est = await query(table, sketch.family, q_ids, kv.limits.max_keys)
    err = q_est - q_true
    eps, delta = math.e / width, math.exp(-depth)
    bound = eps * total
    for i in range(0, pick.size, QUERY_CHUNK):
        sl = slice(i, i + QUERY_CHUNK)
        await ctx.report(metrics=[
            {"series": "query", "item": int(x), "true": int(t), "estimate": int(e), "error": int(e - t),
             "bound": bound} for x, t, e in zip(q_ids[sl], q_true[sl], q_est[sl])])
    rates = rows[:, 1] / np.maximum(rows[:, 2], 1e-9)
    e2e = rows[:, 1] / np.maximum(rows[:, 3], 1e-9)
    over = int(np.count_nonzero(err > bound))
    summary = {
        "rank": 0, "batches": n_batches, "items_total": total, "items_in_sketch": int(rows[:, 1].sum()),
        "distinct_items": int(ids.size), "width": width, "depth": depth,
        "epsilon": eps, "delta": delta, "bound_eps_n": bound,
        "queries": int(pick.size), "underestimates": int(np.count_nonzero(err < 0)),
        "over_bound": over, "frac_over_bound": over / max(1, pick.size),
        "mean_error": float(err.mean()) if err.size else 0.0, "max_error": int(err.max()) if err.size else 0,
        "mean_error_over_n": float(err.mean() / max(total, 1)) if err.size else 0.0,
        "inserts_per_s_worker_min": round(float(rates.min())),
        "inserts_per_s_worker_mean": round(float(rates.mean())),
        "items_per_s_worker_mean": round(float(e2e.mean())),
        # the same per CPU second of the worker (insert path: CPU of counting, hashing and
        # issuing pushes; end to end: the whole worker process while streaming), which
        # does not count time the worker spent waiting for a core
        "inserts_per_cpu_s_worker_mean": round(float(np.mean(rows[:, 1] / np.maximum(rows[:, 5], 1e-9)))),
        "items_per_cpu_s_worker_mean": round(float(np.mean(rows[:, 1] / np.maximum(rows[:, 6], 1e-9)))),
        "items_per_s_total": round(float(rows[:, 1].sum() / max(rows[:, 3].max(), 1e-9))),
        "stream_seconds": float(rows[:, 3].max()), "eval_seconds": time.perf_counter() - t_eval,
    }
    folder = save_folder(opts["sketch"]["save"], ctx.spec)
    if folder is not None:
        await save_model(folder, table, sketch.family, data, ids, counts,
                         int(opts["sketch"]["candidates"]), kv.limits.max_keys, summary)
    await ctx.report(progress=1.0)
    return summary


async def save_model(folder: str, table, family: MultiplyShift, data: dict, ids: np.ndarray, counts: np.ndarray,
                     candidates: int, max_keys: int, summary: dict) -> None:
    """Rank 0: the whole sketch pulled from the servers into ``model.npz`` (``counts``
    (depth, width) int64, ``candidates`` the most frequent items' ids and ``names`` their
    strings, for heavy hitters), with ``model.json`` (hash scheme, shape, seed)."""
    width, depth = family.width, family.depth
    rows = []
    step = max(1, min(max_keys, 1 << 20))
    for r in range(depth):
        keys = np.arange(width, dtype=np.uint64) + np.uint64(r * stride(depth))
        rows.append(np.concatenate([(await table.pull(keys[i:i + step]))[:, 0] for i in range(0, width, step)]))
    top = np.argsort(-counts, kind="stable")[:candidates]
    cand = ids[top]
    tokens = data.get("files") is not None
    names = (await asyncio.to_thread(token_names, expand_files(data["files"]), cand) if tokens
             else [str(int(x)) for x in cand])
    write_model(folder, "cms", {"counts": np.stack(rows).astype(np.int64), "candidates": cand,
                                "names": np.array(names, dtype=str)}, {
        "width": width, "depth": depth, "seed": family.seed,
        "items": "tokens" if tokens else "ids",
        "item_ids": ("psd.apps.hashing.token_ids of each whitespace-separated token (public: "
                     "psd.apps.hashing.token_id)" if tokens else "the integer itself"),
        "hash": "psd.apps.hashing.MultiplyShift(depth, width, seed): row r, column h_r(id)",
        "epsilon": math.e / width, "delta": math.exp(-depth),
        "items_total": summary["items_total"],
        "candidates": "the most frequent items of the stream by exact count at the end of the run",
    })


def token_names(paths: list[str], wanted: np.ndarray) -> list[str]:
    """The token each id of ``wanted`` stands for, found by reading ``paths`` until all are
    (an id no token has, which cannot happen for ids taken from the stream, gets '')."""
    want = np.asarray(wanted, dtype=np.uint64)
    found: dict[int, str] = {}
    for path in paths:
        with _open(path) as f:
            for line in f:
                if len(found) == want.size:
                    break
                ids = token_ids(line)
                hit = np.flatnonzero(np.isin(ids, want))
                if hit.size:
                    toks = line.split()
                    for i in hit:
                        found.setdefault(int(ids[i]), toks[i].decode("utf-8", errors="replace"))
    return [found.get(int(x), "") for x in want]


def _progress(stream: Stream, n_items: int) -> float:
    if stream.total:
        return min(0.97, 0.97 * n_items / stream.total)
    return 0.5


# -- the model and the Python API --------------------------------------------------------
class Model:
    """A saved count-min sketch: ``counts`` (depth, width), the hash family, and the
    stream's most frequent items by name (``model.npz`` / ``model.json``)."""

    def __init__(self, counts: np.ndarray, seed: int, items: str, candidates: np.ndarray, names,
                 header: dict | None = None):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.depth, self.width = self.counts.shape
        self.family = MultiplyShift(self.depth, self.width, int(seed))
        self.items = items                       # "tokens" (strings) or "ids" (integers)
        self.candidates = np.asarray(candidates, dtype=np.uint64)
        self.names = [str(n) for n in names]
        self.header = header or {}
        self.summary: dict = {}
        self.metrics: list[dict] = []

    @classmethod
    def load(cls, folder) -> "Model":
        """The model a run wrote into ``folder`` (its ``sketch.save``)."""
        a, head = read_model(folder, "cms")
        return cls(a["counts"], head["seed"], head["items"], a["candidates"], a["names"].tolist(), head)

    def ids(self, items) -> np.ndarray:
        """The 64-bit ids of ``items``: strings of tokens (hashed as the stream was), or
        integers / decimal strings for a generated stream of ids."""
        from psd.errors import BadRequestError

        if self.items == "ids":
            return np.array([int(x) for x in items], dtype=np.uint64)
        out = np.empty(len(items), dtype=np.uint64)
        for i, item in enumerate(items):
            got = token_ids(item.encode() if isinstance(item, str) else bytes(item))
            if got.size != 1:
                raise BadRequestError(f"cms query: {item!r} is not one whitespace-free token")
            out[i] = got[0]
        return out

    def query(self, items) -> np.ndarray:
        """Count-min estimates of ``items`` (never below the true counts)."""
        ids = self.ids(list(items))
        if ids.size == 0:
            return np.empty(0, np.int64)
        return self.counts.ravel()[self.family.flat_columns(ids)].min(axis=0)

    def heavy_hitters(self, k: int = 10) -> list[tuple[str, int]]:
        """The ``k`` items with the largest estimates among the model's candidates (the
        stream's most frequent items), as (item, estimate), largest first."""
        if not self.candidates.size:
            return []
        est = self.counts.ravel()[self.family.flat_columns(self.candidates)].min(axis=0)
        order = np.argsort(-est, kind="stable")[:k]
        return [(self.names[i], int(est[i])) for i in order]


def fit(stream, *, epsilon: float = 0.001, delta: float = 0.01, servers: int = 2, workers: int = 2,
        output=None, verbose: bool = False, **options) -> Model:
    """Count a stream of tokens into a count-min sketch by running the ``cms`` app with
    ``psd run`` (a local cluster in a child process). ``stream``: an iterable of strings,
    each one or more whitespace-separated tokens (a line, a document or a word); it is
    written to ``output/data/stream.txt``. ``options``: ``consistency``, ``timeout``,
    ``name``, ``filters`` (the sketch table's: zstd, significant), and ``sketch``,
    ``train`` or ``eval`` keys (``width``, ``depth``, ``seed``,
    ``candidates``, ``batch_size``, ``queries``, ...). Returns the :class:`Model`, with
    the run's ``summary`` and ``metrics``."""
    from psd.apps.runjob import run_folder, run_job
    from psd.errors import BadRequestError

    job: dict = {"name": "cms_fit", "app": "cms", "servers": servers, "workers": workers,
                 "sketch": {"epsilon": epsilon, "delta": delta}, "train": {}, "eval": {}}
    for key, value in options.items():
        section = next((sec for sec in ("sketch", "train", "eval") if key in _CHECKS[sec]), None)
        if key in ("consistency", "max_delay", "timeout", "name", "cluster", "filters"):
            job[key] = value
        elif section is not None:
            job[section][key] = value
            if key in ("width", "depth"):
                job["sketch"].pop({"width": "epsilon", "depth": "delta"}[key], None)
        else:
            raise BadRequestError(f"cms.fit(): unknown option {key!r}")
    with run_folder(output) as (folder, temporary):
        path = folder / "data" / "stream.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with open(path, "w", encoding="utf-8") as f:
            for item in stream:
                f.write(str(item) + "\n")
                n += 1
        if n == 0:
            raise BadRequestError("cms.fit: the stream is empty")
        job["data"] = {"files": str(path)}
        job["sketch"]["save"] = str(folder)
        summary, metrics = run_job(job, folder, "cms.fit", verbose)
        model = Model.load(folder)
        model.summary, model.metrics = summary, metrics
        return model

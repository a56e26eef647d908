"""LDA topic model by collapsed Gibbs sampling, with the word-topic counts on the servers.

Tables (in the job's namespace, so ``nwk`` is ``J3/nwk`` for job J3 and jobs on one cluster
never share them):

- ``nwk``: width K (``model.topics``), ``model.dtype`` int32 or int64,
  updater ``sum``. Row ``mix64(word id)`` holds the word's topic counts (the mixer
  spreads the ids over the whole key ring, so every server gets a share); the reserved
  key ``2**64 - 1`` holds the topic totals. It follows the job's consistency model:
  ``sequential`` gives bulk-synchronous AD-LDA, ``bounded``/``eventual`` let workers
  sample on staler counts.
- ``stats`` (float64, ``assign``, always eventual): per iteration and rank,
  the log-likelihood sum and token count, which rank 0 adds up at the end.
- ``ranks`` (float64, ``assign``, eventual): one row per rank, set when the
  rank is done (:mod:`psd.apps.rendezvous`).

Workers. Each worker holds its documents (a contiguous shard) and their topic
assignments z. It pushes the counts of its random initial z, then every iteration:
pulls the rows of the words its documents use plus the totals row, sweeps its tokens,
pushes the count deltas (rows that changed, and the totals), waits for that push to be
acknowledged (so its next pull includes its own moves under any model) and calls
``kv.clock()``.

The sweep is vectorised: the tokens are cut into ``train.blocks`` blocks by their
position in their document (position mod blocks), so a block holds about one token of
each document, and all tokens of a block are resampled at once from the exact
collapsed conditional ``(n_dk + alpha)(n_wk + beta)/(n_k + V beta)`` with their own
assignment removed; the counts are then updated for the block. Within a block, tokens
of the same word see each other's previous assignments (the same approximation
AD-LDA makes between workers, here inside one worker between a handful of tokens).

Reports. Every iteration each worker reports its per-token log-likelihood
``mean log sum_k theta_dk phi_kw`` (theta and phi the smoothed estimates from its
current counts) as ``series: worker<rank>``; at the end rank 0 reports the global one
per iteration (``loglik``, ``perplexity`` = exp(-loglik)), prints the top words of
every topic in the summary (``topic_00`` ...), and, on a generated corpus, how many
planted topics it recovered (greedy one-to-one matching by top-word overlap; a topic
counts when at least half its top words match).

Data. ``data.generator: planted`` (default; :mod:`psd.apps.datasets.topics`) or
``data.files``: text files, one document per non-empty line (``data.per: line``) or
per file (``per: file``), lower-cased letter words; the vocabulary keeps words seen at
least ``data.min_count`` times and in at most ``data.max_df`` of the documents. Every
worker reads every file to build the same vocabulary (fine for corpora of a few
million tokens), then keeps its shard of the documents.
"""
from __future__ import annotations

import asyncio
import math
import time

import numpy as np

from psd.apps.datasets import shard_bounds
from psd.apps.datasets.text import check_files, expand_files, read_documents, vocabulary
from psd.apps.datasets.topics import Corpus, corpus_from_documents, make_planted_corpus, match_topics
from psd.apps.hashing import mix64
from psd.apps.options import Check, check_sections, is_int, is_num, merge_defaults
from psd.apps.rendezvous import wait_for_ranks
from psd.errors import ConfigError

DEFAULTS: dict = {
    "data": {
        "generator": "planted",
        "seed": 42,
        "documents": 2000,
        "vocabulary": 2000,
        "topics": None,            # planted topics; default model.topics
        "doc_length": 100,         # mean (Poisson)
        "dominant_words": 10,      # per planted topic
        "dominant_mass": 0.7,      # share of a planted topic on its dominant words
        "doc_alpha": 0.1,          # Dirichlet concentration of the document mixtures
        "files": None,             # text files instead of the generator
        "per": "line",             # files: one document per line, or per file
        "min_count": 2,            # files: drop rarer words
        "max_df": 0.5,             # files: drop words in more than this share of documents
    },
    "model": {
        "topics": 10,
        "alpha": 0.1,              # document-topic prior
        "beta": 0.01,              # topic-word prior
        "dtype": "int32",          # of the word-topic table
    },
    "train": {
        "iterations": 50,
        "blocks": 64,              # blocks per sweep (by token position in its document)
        "seed": 0,                 # of the sampler
        "top_words": 10,           # per topic, in the summary
    },
}

TOTAL_KEY = (1 << 64) - 1
STATS_SHIFT = 20                   # stats key: iteration << STATS_SHIFT | rank
PLOTS = [
    {"file": "loglik.png", "x": "iteration", "ys": ["loglik"],
     "title": "LDA: per-token log-likelihood per iteration (all workers, and each)"},
]
_GENERATOR_KEYS = ("generator", "documents", "vocabulary", "topics", "doc_length", "dominant_words",
                   "dominant_mass", "doc_alpha")
_FILE_KEYS = ("per", "min_count", "max_df")


# -- options ------------------------------------------------------------------------
_CHECKS: dict[str, dict[str, Check]] = {
    "data": {
        "generator": (lambda v: v == "planted", "'planted' (or give data.files instead)"),
        "seed": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
        "documents": (lambda v: is_int(v) and 1 <= v <= 10_000_000, "an integer in [1, 10000000]"),
        "vocabulary": (lambda v: is_int(v) and 2 <= v <= 10_000_000, "an integer in [2, 10000000]"),
        "topics": (lambda v: v is None or (is_int(v) and 1 <= v <= 10_000), "an integer in [1, 10000]"),
        "doc_length": (lambda v: is_num(v) and 1 <= v <= 100_000, "a number in [1, 100000]"),
        "dominant_words": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "dominant_mass": (lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "doc_alpha": (lambda v: is_num(v) and 0 < v <= 100, "a number in (0, 100]"),
        "files": (lambda v: True, ""),   # checked by check_files (see validate)
        "per": (lambda v: v in ("line", "file"), "'line' or 'file'"),
        "min_count": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "max_df": (lambda v: is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    },
    "model": {
        "topics": (lambda v: is_int(v) and 2 <= v <= 10_000, "an integer in [2, 10000]"),
        "alpha": (lambda v: is_num(v) and 0 < v <= 100, "a number in (0, 100]"),
        "beta": (lambda v: is_num(v) and 0 < v <= 100, "a number in (0, 100]"),
        "dtype": (lambda v: v in ("int32", "int64"), "'int32' or 'int64'"),
    },
    "train": {
        "iterations": (lambda v: is_int(v) and 1 <= v <= 100_000, "an integer in [1, 100000]"),
        "blocks": (lambda v: is_int(v) and 1 <= v <= 100_000, "an integer in [1, 100000]"),
        "seed": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
        "top_words": (lambda v: is_int(v) and 1 <= v <= 1000, "an integer in [1, 1000]"),
    },
}


def validate(spec: dict, source: str) -> list[str]:
    """Problems with the ``data``, ``model`` and ``train`` sections, each naming file and key."""
    problems = check_sections(
        spec, source, _CHECKS, app="lda", unused_sections=("tables", "filters", "eval", "sketch"),
        special={("data", "files"): lambda v: [] if v is None else check_files(v, source, "data.files")})
    if problems:
        return problems
    data = spec.get("data") or {}
    reads_files = data.get("files") is not None
    for key in (_GENERATOR_KEYS if reads_files else _FILE_KEYS):
        if key in data:
            problems.append(f"{source}: data.{key}: " + (
                "only for the planted generator; this job reads data.files (give one or the other)"
                if reads_files else "only with data.files"))
    if not reads_files and not problems:
        d = options(spec)["data"]
        k = d["topics"] or options(spec)["model"]["topics"]
        if d["dominant_words"] * k > d["vocabulary"]:
            problems.append(f"{source}: data.dominant_words: {k} topics x {d['dominant_words']} "
                            f"words exceed data.vocabulary ({d['vocabulary']})")
    return problems


def options(spec: dict) -> dict:
    """``DEFAULTS`` overlaid with the spec's sections."""
    return merge_defaults(DEFAULTS, spec)


def make_corpus(data: dict, topics: int) -> Corpus:
    """The whole corpus a ``data`` section describes; identical on every worker."""
    if data.get("files") is not None:
        docs = read_documents(expand_files(data["files"]), per=data["per"])
        vocab = vocabulary(docs, min_count=int(data["min_count"]), max_df=float(data["max_df"]))
        return corpus_from_documents(docs, vocab)
    return make_planted_corpus(int(data["documents"]), int(data["vocabulary"]), int(data["topics"] or topics),
                               float(data["doc_length"]), int(data["seed"]),
                               dominant_words=int(data["dominant_words"]),
                               dominant_mass=float(data["dominant_mass"]), doc_alpha=float(data["doc_alpha"]))


def word_keys(word_ids) -> np.ndarray:
    """Table keys of word ids (a bijection, so no two words share a row)."""
    keys = mix64(np.asarray(word_ids, dtype=np.uint64))
    if np.any(keys == np.uint64(TOTAL_KEY)):
        raise ValueError("a word id hashes to the reserved totals key")  # 1 in 2**64 per word
    return keys


# -- the sampler ------------------------------------------------------------------------
class LocalSampler:
    """One worker's documents, their topic assignments and the counts it samples with."""

    def __init__(self, corpus: Corpus, num_words: int, topics: int, alpha: float, beta: float,
                 blocks: int, seed: int):
        self.K, self.V = int(topics), int(num_words)
        self.alpha, self.beta = float(alpha), float(beta)
        self.rng = np.random.default_rng([int(seed), 0x5A4])
        self.doc = corpus.doc_ids()
        self.num_docs = corpus.num_docs
        self.num_tokens = int(self.doc.size)
        # local vocabulary in table-key order, so the pulled rows line up
        uniq, inverse = np.unique(corpus.words, return_inverse=True)
        keys = word_keys(uniq)
        order = np.argsort(keys)
        self.word_ids = uniq[order]
        self.keys = np.append(keys[order], np.uint64(TOTAL_KEY))
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        self.w = rank[inverse].astype(np.int64)
        self.z = self.rng.integers(0, self.K, size=self.num_tokens)
        # counts as float64 (exact for integers below 2**53): the sampler's arithmetic
        # needs floats, and converting on every gather would cost a pass
        self.ndk = np.zeros((self.num_docs, self.K), dtype=np.float64)
        np.add.at(self.ndk.ravel(), self.doc * self.K + self.z, 1.0)
        self.doc_len = np.diff(corpus.indptr).astype(np.float64)
        pos = np.arange(self.num_tokens) - corpus.indptr[self.doc]
        nblocks = max(1, min(int(blocks), int(pos.max()) + 1 if pos.size else 1))
        block = pos % nblocks
        order = np.argsort(block, kind="stable")
        bounds = np.searchsorted(block[order], np.arange(nblocks + 1))
        #: per block: token positions, their documents and local words (fixed for the run)
        self.blocks = [(ix, self.doc[ix], self.w[ix]) for ix in
                       (order[bounds[b]:bounds[b + 1]] for b in range(nblocks)) if ix.size]
        self.nwk = np.zeros((self.word_ids.size, self.K), dtype=np.float64)
        self.nk = np.zeros(self.K, dtype=np.float64)

    def initial_counts(self) -> np.ndarray:
        """(local words + 1, K) counts of the initial assignments; the last row: totals."""
        counts = np.zeros((self.word_ids.size + 1, self.K), dtype=np.int64)
        np.add.at(counts.ravel(), self.w * self.K + self.z, 1)
        counts[-1] = np.bincount(self.z, minlength=self.K)
        return counts

    def load(self, rows: np.ndarray) -> None:
        """Take pulled rows (local words in key order, then the totals) as the counts."""
        self._pulled = rows.astype(np.int64)
        self.nwk = self._pulled[:-1].astype(np.float64)
        self.nk = self._pulled[-1].astype(np.float64)

    def deltas(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys and rows that changed since :meth:`load` (totals last, when changed)."""
        now = np.vstack([self.nwk, self.nk[None, :]]).astype(np.int64)
        delta = now - self._pulled
        changed = np.flatnonzero(np.any(delta != 0, axis=1))
        return self.keys[changed], delta[changed]

    def sweep(self) -> int:
        """Resample every token once, block by block; returns how many changed topic."""
        K, ab, bb, vb = self.K, self.alpha, self.beta, self.V * self.beta
        ndk, nwk, nk, z = self.ndk, self.nwk, self.nk, self.z
        moved = 0
        for idx, d, w in self.blocks:
            zo = z[idx]
            r = np.arange(idx.size)
            # the conditional with everyone's counts, then the own topic's column redone
            # with this token taken out
            p = ndk[d]
            p += ab
            nw = nwk[w]
            nw += bb
            p *= nw
            p *= 1.0 / (nk + vb)
            nd_own = ndk[d, zo] - 1.0
            nw_own = np.maximum(nwk[w, zo] - 1.0, 0.0)  # stale counts may lag our own
            p[r, zo] = (nd_own + ab) * (nw_own + bb) / np.maximum(nk[zo] - 1.0 + vb, vb)
            np.cumsum(p, axis=1, out=p)
            u = self.rng.random(idx.size)
            u *= p[:, -1]
            zn = np.minimum((p < u[:, None]).sum(axis=1), K - 1)
            c = zn != zo
            if not c.any():
                continue
            d, w, zo, zn = d[c], w[c], zo[c], zn[c]
            np.add.at(ndk.ravel(), d * K + zo, -1.0)
            np.add.at(ndk.ravel(), d * K + zn, 1.0)
            np.add.at(nwk.ravel(), w * K + zo, -1.0)
            np.add.at(nwk.ravel(), w * K + zn, 1.0)
            nk += np.bincount(zn, minlength=K) - np.bincount(zo, minlength=K)
            z[idx[c]] = zn
            moved += int(c.sum())
        return moved

    def loglik(self) -> float:
        """Sum over this worker's tokens of log sum_k theta_dk phi_kw (current counts)."""
        if self.num_tokens == 0:
            return 0.0
        theta = (self.ndk + self.alpha) / (self.doc_len + self.K * self.alpha)[:, None]
        phi = (np.maximum(self.nwk, 0) + self.beta) / (np.maximum(self.nk, 0) + self.V * self.beta)[None, :]
        p = np.einsum("ij,ij->i", theta[self.doc], phi[self.w])
        return float(np.log(p).sum())


def top_words(nwk: np.ndarray, n: int) -> list[list[int]]:
    """Word ids of the ``n`` largest counts of every topic (a (V, K) count matrix)."""
    n = min(n, nwk.shape[0])
    top = np.argsort(-nwk, axis=0, kind="stable")[:n]
    return [top[:, k].tolist() for k in range(nwk.shape[1])]


def corpus_loglik(corpus: Corpus, theta: np.ndarray, phi: np.ndarray) -> float:
    """Per-token log-likelihood mean log sum_k theta_dk phi_kw of a whole corpus (for
    comparing a model from anywhere: theta (D, K), phi (K, V), rows normalised)."""
    doc = corpus.doc_ids()
    p = np.einsum("ij,ji->i", theta[doc], phi[:, corpus.words])
    return float(np.log(np.maximum(p, 1e-300)).mean())


def recovered(learned_top: list[list[int]], topics: np.ndarray, n: int) -> int:
    """How many planted topics a greedy one-to-one matching pairs with a learned topic
    sharing at least half of its top ``n`` words."""
    planted_top = [np.argsort(-topics[k], kind="stable")[:n].tolist() for k in range(topics.shape[0])]
    return sum(1 for _, _, overlap in match_topics(learned_top, planted_top) if 2 * overlap >= n)


# -- the app ------------------------------------------------------------------------
async def run(kv, ctx) -> dict:
    """Sample this worker's documents for ``train.iterations`` sweeps; rank 0 then reports
    the global log-likelihood curve and the topics."""
    problems = validate(ctx.spec, "job spec")
    if problems:
        raise ConfigError("; ".join(problems))
    opts = options(ctx.spec)
    data, model, tr = opts["data"], opts["model"], opts["train"]
    K, iterations = int(model["topics"]), int(tr["iterations"])
    start = time.perf_counter()

    corpus = await asyncio.to_thread(make_corpus, data, K)
    d0, d1 = shard_bounds(corpus.num_docs, ctx.shards[0], ctx.num_workers)
    sampler = await asyncio.to_thread(LocalSampler, corpus.docs(d0, d1), corpus.num_words, K,
                                      float(model["alpha"]), float(model["beta"]), int(tr["blocks"]),
                                      int(tr["seed"]) * 1_000_003 + ctx.shards[0])
    dtype = np.dtype(model["dtype"])
    nwk = await kv.table("nwk", width=K, dtype=model["dtype"], updater="sum")
    stats = await kv.table("stats", width=2, dtype="float64", updater="assign", consistency="eventual")
    ranks = await kv.table("ranks", width=4, dtype="float64", updater="assign", consistency="eventual")

    await kv.wait(nwk.push(sampler.keys, sampler.initial_counts().astype(dtype)))
    kv.clock()
    t_sample = t_comm = 0.0
    last = None
    for it in range(1, iterations + 1):
        t0 = time.perf_counter()
        rows = await nwk.pull(sampler.keys)
        t1 = time.perf_counter()
        sampler.load(rows)
        moved = await asyncio.to_thread(sampler.sweep)
        keys, delta = sampler.deltas()
        t2 = time.perf_counter()
        ts = nwk.push(keys, delta.astype(dtype)) if keys.size else None
        ll = await asyncio.to_thread(sampler.loglik)
        stat_ts = stats.push(np.array([it << STATS_SHIFT | ctx.rank], np.uint64),
                             np.array([[ll, sampler.num_tokens]], np.float64))
        t3 = time.perf_counter()
        if ts is not None:
            await kv.wait(ts)   # our next pull must include our own moves
        await kv.wait(stat_ts)
        kv.clock()
        t_sample += (t2 - t1) + (t3 - t2)
        t_comm += (t1 - t0) + (time.perf_counter() - t3)
        last = ll / max(1, sampler.num_tokens)
        await ctx.report(progress=0.97 * it / iterations, metrics=[{
            "series": f"worker{ctx.rank}", "iteration": it, "loglik": last,
            "moved": moved / max(1, sampler.num_tokens), "time": time.perf_counter() - start}])
    seconds = time.perf_counter() - start
    mine = {"rank": ctx.rank, "documents": sampler.num_docs, "tokens": sampler.num_tokens,
            "iterations": iterations, "loglik_local": last, "sample_seconds": t_sample,
            "comm_seconds": t_comm, "tokens_per_s": sampler.num_tokens * iterations / max(t_sample, 1e-9)}
    await kv.wait(ranks.push(np.array([ctx.rank], np.uint64),
                             np.array([[1.0, sampler.num_tokens, seconds, t_sample]])))
    if ctx.rank != 0:
        return mine

    # rank 0: once every rank is done, the counts are complete
    done = await wait_for_ranks(ranks, ctx.num_workers)
    skeys = np.array([it << STATS_SHIFT | r for it in range(1, iterations + 1)
                      for r in range(ctx.num_workers)], np.uint64)
    st = (await stats.pull(skeys)).reshape(iterations, ctx.num_workers, 2).sum(axis=1)
    curve = [{"iteration": it, "loglik": float(s[0] / max(s[1], 1)),
              "perplexity": float(math.exp(-s[0] / max(s[1], 1)))} for it, s in zip(range(1, iterations + 1), st)]
    await ctx.report(metrics=curve)

    all_keys = word_keys(np.arange(corpus.num_words))
    order = np.argsort(all_keys)
    counts = np.zeros((corpus.num_words, K), dtype=np.int64)
    step = 1 << 16
    for i in range(0, order.size, step):
        sel = order[i:i + step]
        counts[sel] = await nwk.pull(all_keys[sel])
    n_top = int(tr["top_words"])
    top = top_words(counts, n_top)
    await ctx.report(metrics=[{"series": "topic", "topic": k, "words": [corpus.vocab[w] for w in t],
                               "word_ids": t, "tokens": int(counts[:, k].sum())} for k, t in enumerate(top)])
    tokens_total = int(done[:, 1].sum())
    summary = {
        "rank": 0, "documents": corpus.num_docs, "tokens": tokens_total, "vocabulary": corpus.num_words,
        "topics": K, "iterations": iterations,
        "loglik_first": curve[0]["loglik"], "loglik": curve[-1]["loglik"],
        "perplexity": curve[-1]["perplexity"], "counts_total": int(counts.sum()),
        "tokens_per_s_worker_mean": round(float(np.mean(done[:, 1] * iterations / np.maximum(done[:, 3], 1e-9)))),
        "train_seconds": float(done[:, 2].max()),
    }
    if corpus.topics is not None:
        summary["topics_planted"] = int(corpus.topics.shape[0])
        summary["topics_recovered"] = recovered(top, corpus.topics, n_top)
        # the same measure under the true (planted) topics and mixtures, for reference
        summary["loglik_planted"] = await asyncio.to_thread(corpus_loglik, corpus, corpus.doc_topics,
                                                            corpus.topics)
    for k, t in enumerate(top):
        summary[f"topic_{k:02d}"] = " ".join(corpus.vocab[w] for w in t[:n_top])
    await ctx.report(progress=1.0)
    return summary

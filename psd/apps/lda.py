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
from psd.apps.datasets.text import _WORD, check_files, expand_files, read_documents, vocabulary
from psd.apps.datasets.topics import Corpus, corpus_from_documents, make_planted_corpus, match_topics
from psd.apps.hashing import mix64
from psd.apps.options import Check, check_sections, is_int, is_num, merge_defaults
from psd.apps.model import SAVE_CHECK, read_model, save_folder, write_model
from psd.apps.rendezvous import wait_for_ranks
from psd.errors import ConfigError
from psd.filters import TableInfo, build_chain
from psd.keysets import unique

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
    "train": {
        "iterations": 300,         # at most this many sweeps (eval stops earlier)
        "blocks": 64,              # blocks per sweep (by token position in its document)
        "seed": 0,                 # of the sampler
        "top_words": 10,           # per topic, in the summary
    },
    "eval": {
        "heldout": 0.1,            # share of the documents held out (a seeded choice); 0: none
        "every": 5,                # sweeps between held-out perplexities
        "patience": 3,             # evaluations in a row without improvement that stop the run
        "tol": 0.002,              # an improvement: the best perplexity lowered by this share
        "sweeps": 20,              # fold-in sweeps of a held-out document's first half
        "seed": 7,                 # of the held-out choice and the fold-in sampler
    },
    "model": {
        "topics": 10,
        "alpha": 0.1,              # document-topic prior
        "beta": None,              # topic-word prior; None: data-scaled (default_beta)
        "dtype": "int32",          # of the word-topic table
        "save": True,              # folder for model.npz and model.json; true: the run folder
    },
}

TOTAL_KEY = (1 << 64) - 1
#: the data-scaled topic-word prior: BETA_SCALE * sqrt(N / (K V)), at most BETA_SCALE
BETA_SCALE = 0.1
STATS_SHIFT = 20                   # stats key: iteration << STATS_SHIFT | rank
PLOTS = [
    {"file": "loglik.png", "x": "iteration", "ys": ["loglik"],
     "title": "LDA: per-token log-likelihood per iteration (all workers, and each)"},
    {"file": "heldout.png", "x": "iteration", "ys": ["heldout_perplexity"],
     "title": "LDA: held-out perplexity by document completion"},
]
HELDOUT_KEY_BASE = 1 << 40         # stats key of the held-out perplexity of an evaluation
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
        "beta": (lambda v: v is None or (is_num(v) and 0 < v <= 100),
                 "a number in (0, 100], or null for the data-scaled prior"),
        "dtype": (lambda v: v in ("int32", "int64"), "'int32' or 'int64'"),
        "save": SAVE_CHECK,
    },
    "eval": {
        "heldout": (lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "every": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "patience": (lambda v: is_int(v) and v >= 1, "a positive integer"),
        "tol": (lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "sweeps": (lambda v: is_int(v) and 1 <= v <= 1000, "an integer in [1, 1000]"),
        "seed": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    },
    "train": {
        "iterations": (lambda v: is_int(v) and 1 <= v <= 100_000, "an integer in [1, 100000]"),
        "blocks": (lambda v: is_int(v) and 1 <= v <= 100_000, "an integer in [1, 100000]"),
        "seed": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
        "top_words": (lambda v: is_int(v) and 1 <= v <= 1000, "an integer in [1, 1000]"),
    },
}


def check_filters(spec: dict, source: str) -> list[str]:
    """Problems of the job's ``filters`` on the word-topic table (integer counts summed),
    each naming the key: zstd and significant apply (decision 112)."""
    if spec.get("filters") is None:
        return []
    model = options(spec)["model"]
    try:
        build_chain(spec["filters"], TableInfo("nwk", model["dtype"], int(model["topics"]), "sum"))
    except ConfigError as e:
        return [f"{source}: {p}" for p in e.data.get("problems", [e.message])]
    return []


def validate(spec: dict, source: str) -> list[str]:
    """Problems with the ``data``, ``model`` and ``train`` sections, each naming file and key."""
    problems = check_sections(
        spec, source, _CHECKS, app="lda", unused_sections=("tables", "sketch"),
        special={("data", "files"): lambda v: [] if v is None else check_files(v, source, "data.files")})
    if problems:
        return problems
    problems += check_filters(spec, source)
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


def default_beta(tokens: int, vocabulary: int, topics: int) -> float:
    """The topic-word prior when the job names none: ``BETA_SCALE * sqrt(c)``, at most
    ``BETA_SCALE``, where ``c = N / (K V)`` is the mean count of a (word, topic) cell.

    Why scaled: beta is a pseudo-count added to every cell, so what matters is its size
    against the cells' counts. A fixed 0.01 smoothed the mails (c = 2) too little, 16%
    above the best held-out perplexity of the grid 0.01-0.3 on 3000 short mails; a
    fixed 0.1 smoothed a sparse corpus (c = 0.12: V 20,000, K 50) too much, 26% above.
    This rule was within 1% of that grid's best on four corpora (docs/jobs.md)."""
    cell = tokens / max(1, topics * vocabulary)
    return BETA_SCALE * min(1.0, math.sqrt(cell)) if cell > 0 else BETA_SCALE


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


# -- held-out perplexity by document completion --------------------------------------------
def heldout_split(num_docs: int, share: float, seed: int) -> np.ndarray:
    """Which documents are held out: a seeded ``share`` of them (at least one when the
    share is positive, and never all); the same on every worker."""
    n = min(num_docs - 1, max(1, round(share * num_docs))) if share > 0 and num_docs >= 2 else 0
    mask = np.zeros(num_docs, dtype=bool)
    mask[np.random.default_rng([int(seed), 0x4E1D]).choice(num_docs, size=n, replace=False)] = True
    return mask


def subset(corpus: Corpus, docs: np.ndarray) -> Corpus:
    """The documents ``docs`` (indices, in that order) of ``corpus``."""
    lengths = np.diff(corpus.indptr)[docs]
    indptr = np.zeros(docs.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    starts = np.repeat(corpus.indptr[docs], lengths)
    pos = starts + (np.arange(indptr[-1]) - np.repeat(indptr[:-1], lengths))
    return Corpus(indptr, corpus.words[pos], corpus.vocab)


def completion_split(corpus: Corpus) -> tuple[Corpus, Corpus]:
    """Every document cut into the tokens at even positions (observed: they fix the
    document's mixture) and at odd ones (predicted)."""
    pos = np.arange(corpus.words.size) - corpus.indptr[corpus.doc_ids()]
    halves = []
    for keep in (pos % 2 == 0, pos % 2 == 1):
        counts = np.bincount(corpus.doc_ids()[keep], minlength=corpus.num_docs)
        indptr = np.zeros(corpus.num_docs + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        halves.append(Corpus(indptr, corpus.words[keep], corpus.vocab))
    return halves[0], halves[1]


def topic_word(nwk: np.ndarray, beta: float) -> np.ndarray:
    """phi as a (V, K) array: column k is topic k's smoothed word distribution, from
    word-topic counts ``nwk`` (V, K)."""
    nwk = np.maximum(np.asarray(nwk, dtype=np.float64), 0.0)
    return (nwk + beta) / (nwk.sum(axis=0) + nwk.shape[0] * beta)[None, :]


def fold_in(corpus: Corpus, phi: np.ndarray, alpha: float, sweeps: int, seed: int, blocks: int = 16
            ) -> np.ndarray:
    """Document-topic counts (D, K) of ``corpus`` by Gibbs sampling against a fixed model
    ``phi`` (V, K): only the documents' assignments move. Vectorised as the trainer's
    sweep (tokens in blocks by position, a block resampled at once)."""
    K = phi.shape[1]
    rng = np.random.default_rng([int(seed), 0xF01D])
    doc, w = corpus.doc_ids(), corpus.words
    z = rng.integers(0, K, size=w.size)
    ndk = np.zeros((corpus.num_docs, K))
    np.add.at(ndk.ravel(), doc * K + z, 1.0)
    pos = np.arange(w.size) - corpus.indptr[doc]
    nb = max(1, min(int(blocks), int(pos.max()) + 1 if pos.size else 1))
    groups = [np.flatnonzero(pos % nb == b) for b in range(nb)]
    for _ in range(int(sweeps)):
        for idx in groups:
            if not idx.size:
                continue
            d, zo = doc[idx], z[idx]
            p = ndk[d] + alpha
            p[np.arange(idx.size), zo] -= 1.0
            p *= phi[w[idx]]
            np.cumsum(p, axis=1, out=p)
            u = rng.random(idx.size) * p[:, -1]
            zn = np.minimum((p < u[:, None]).sum(axis=1), K - 1)
            np.add.at(ndk.ravel(), d * K + zo, -1.0)
            np.add.at(ndk.ravel(), d * K + zn, 1.0)
            z[idx] = zn
    return ndk


def completion_perplexity(observed: Corpus, target: Corpus, phi: np.ndarray, alpha: float, sweeps: int,
                          seed: int) -> float:
    """exp(-mean log p(w)) over the ``target`` tokens, each document's mixture folded in
    from its ``observed`` tokens against ``phi`` (V, K): document completion."""
    if target.words.size == 0:
        return float("nan")
    K = phi.shape[1]
    ndk = fold_in(observed, phi, alpha, sweeps, seed)
    theta = (ndk + alpha) / (ndk.sum(axis=1) + K * alpha)[:, None]
    doc = target.doc_ids()
    p = np.einsum("ij,ij->i", theta[doc], phi[target.words])
    return float(np.exp(-np.log(np.maximum(p, 1e-300)).mean()))


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

    ev = opts["eval"]
    corpus = await asyncio.to_thread(make_corpus, data, K)
    held = heldout_split(corpus.num_docs, float(ev["heldout"]), int(ev["seed"]))
    training = subset(corpus, np.flatnonzero(~held)) if held.any() else corpus
    d0, d1 = shard_bounds(training.num_docs, ctx.shards[0], ctx.num_workers)
    # every worker holds the whole corpus, so all resolve the same prior
    beta = float(model["beta"]) if model["beta"] is not None else default_beta(
        int(training.words.size), corpus.num_words, K)
    sampler = await asyncio.to_thread(LocalSampler, training.docs(d0, d1), corpus.num_words, K,
                                      float(model["alpha"]), beta, int(tr["blocks"]),
                                      int(tr["seed"]) * 1_000_003 + ctx.shards[0])
    dtype = np.dtype(model["dtype"])
    filters = ctx.spec.get("filters") or None   # the word-topic table's (validate checked them)
    nwk = await kv.table("nwk", width=K, dtype=model["dtype"], updater="sum",
                         **({"filters": filters} if filters else {}))
    stats = await kv.table("stats", width=2, dtype="float64", updater="assign", consistency="eventual")
    heldout = None
    if held.any():   # the held-out documents' halves and the table rows of their words
        observed, target = completion_split(subset(corpus, np.flatnonzero(held)))
        h_words = unique(np.concatenate([observed.words, target.words]))
        h_keys = word_keys(h_words)
        h_order = np.argsort(h_keys)
        heldout = (observed, target, h_words, h_keys, h_order)
    every, patience, tol = int(ev["every"]), int(ev["patience"]), float(ev["tol"])
    best, stale, evals, stopped = math.inf, 0, [], "iterations"
    ranks = await kv.table("ranks", width=4, dtype="float64", updater="assign", consistency="eventual")

    # every push of the counts is named by this shard and its sweep (ctx.once): a shard run
    # again after its worker died is not counted twice (docs/fault-tolerance.md)
    await kv.wait(nwk.push(sampler.keys, sampler.initial_counts().astype(dtype), once=ctx.once(0)))
    kv.clock()
    t_sample = t_comm = 0.0
    last = None
    it = 0
    for it in range(1, iterations + 1):
        t0 = time.perf_counter()
        rows = await nwk.pull(sampler.keys)
        t1 = time.perf_counter()
        sampler.load(rows)
        moved = await asyncio.to_thread(sampler.sweep)
        keys, delta = sampler.deltas()
        t2 = time.perf_counter()
        ts = nwk.push(keys, delta.astype(dtype), once=ctx.once(it)) if keys.size else None
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
        if heldout is not None and (it % every == 0 or it == iterations):
            # rank 0 measures, every worker reads the same figure and takes the same decision
            key = np.array([HELDOUT_KEY_BASE + it], np.uint64)
            if ctx.rank == 0:
                ppl = await _heldout_perplexity(nwk, heldout, corpus.num_words, K, float(model["alpha"]), beta,
                                                int(ev["sweeps"]), int(ev["seed"]) + it)
                await kv.wait(stats.push(key, np.array([[ppl, 1.0]])))
                await ctx.report(metrics=[{"iteration": it, "heldout_perplexity": ppl,
                                           "time": time.perf_counter() - start}])
            else:
                ppl = float((await wait_for_ranks(stats, 1, key=key))[0, 0])
            evals.append((it, ppl))
            if ppl < best * (1.0 - tol):
                best, stale = ppl, 0
            else:
                stale += 1
                if stale >= patience:
                    stopped = "converged"
                    break
    iterations = it
    if filters:   # the counts they held back, before this rank says it is done; the clock
        await kv.flush()   # closes the iteration, so sequential applies them (and a pull
        kv.clock()         # after it sees them)
    seconds = time.perf_counter() - start
    mine = {"rank": ctx.rank, "documents": sampler.num_docs, "tokens": sampler.num_tokens, "stopped": stopped,
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
        "topics": K, "iterations": iterations, "alpha": float(model["alpha"]), "beta": beta,
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
    if evals:
        summary.update(heldout_perplexity=evals[-1][1], heldout_perplexity_best=min(p for _, p in evals),
                       heldout_documents=int(held.sum()), stopped=stopped)
    for k, t in enumerate(top):
        summary[f"topic_{k:02d}"] = " ".join(corpus.vocab[w] for w in t[:n_top])
    folder = save_folder(model["save"], ctx.spec)
    if folder is not None:
        write_model(folder, "lda", {"nwk": counts, "vocab": np.array(corpus.vocab, dtype=str)}, {
            "topics": K, "alpha": float(model["alpha"]), "beta": beta, "vocabulary": corpus.num_words,
            "rows": "nwk[v] is word vocab[v]'s topic counts; table key mix64(v) (psd.apps.hashing.mix64)",
            "tokenizer": "lower-cased runs of two or more letters (psd.apps.datasets.text.read_documents)",
            "documents": corpus.num_docs, "tokens": tokens_total, "iterations": iterations,
            "final": {k: summary[k] for k in ("perplexity", "heldout_perplexity") if k in summary}})
    await ctx.report(progress=1.0)
    return summary


async def _heldout_perplexity(nwk, heldout, num_words: int, K: int, alpha: float, beta: float, sweeps: int,
                              seed: int) -> float:
    """Document completion on the held-out documents against the table's current counts."""
    observed, target, h_words, h_keys, order = heldout
    rows = await nwk.pull(np.append(h_keys[order], np.uint64(TOTAL_KEY)))
    counts = np.zeros((h_words.size, K))
    counts[order] = rows[:-1]
    totals = np.maximum(rows[-1].astype(np.float64), 0.0)
    phi = np.full((num_words, K), 0.0)
    phi[h_words] = (np.maximum(counts, 0.0) + beta) / (totals + num_words * beta)[None, :]
    return await asyncio.to_thread(completion_perplexity, observed, target, phi, alpha, sweeps, seed)


# -- the model and the Python API --------------------------------------------------------
class Model:
    """A saved LDA model (``model.npz``: ``nwk`` (V, K) topic-word counts, ``vocab`` the
    V words; ``model.json``: topics, alpha, beta, tokenizer; :mod:`psd.apps.model`)."""

    def __init__(self, nwk: np.ndarray, vocab, alpha: float, beta: float, header: dict | None = None,
                 summary: dict | None = None, metrics: list[dict] | None = None):
        self.nwk = np.asarray(nwk)
        self.vocab = [str(w) for w in vocab]
        self.alpha, self.beta = float(alpha), float(beta)
        self.header = header or {}
        self.summary = summary or {}        # summary.json of the run that trained it (fit)
        self.metrics = metrics or []        # its metrics.jsonl records (fit)
        self._index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def load(cls, folder) -> "Model":
        """The model a run wrote into ``folder`` (its ``model.save``)."""
        arrays, head = read_model(folder, "lda")
        return cls(arrays["nwk"], arrays["vocab"].tolist(), head["alpha"], head["beta"], head)

    @property
    def topics(self) -> int:
        return int(self.nwk.shape[1])

    @property
    def topic_word(self) -> np.ndarray:
        """phi (K, V): each topic's smoothed distribution over the vocabulary."""
        return topic_word(self.nwk, self.beta).T

    def top_words(self, n: int = 10) -> list[list[str]]:
        """The ``n`` most frequent words of every topic."""
        return [[self.vocab[w] for w in t] for t in top_words(self.nwk, n)]

    def corpus(self, docs) -> Corpus:
        """``docs`` (strings, tokenised as the app tokenises files, or lists of words) as a
        corpus over this model's vocabulary; unknown words are dropped, empty documents kept."""
        rows = [[self._index[w] for w in (_WORD.findall(d.lower()) if isinstance(d, str) else d)
                 if w in self._index] for d in docs]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        words = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(indptr[-1]))
        return Corpus(indptr, words, self.vocab)

    def transform(self, docs, sweeps: int = 50, seed: int = 0) -> np.ndarray:
        """Topic mixtures (D, K) of new documents: ``sweeps`` Gibbs sweeps of their tokens
        against the fixed model, then the smoothed document-topic counts. A document with
        no known word gets the uniform mixture."""
        c = self.corpus(docs)
        ndk = fold_in(c, topic_word(self.nwk, self.beta), self.alpha, sweeps, seed)
        return (ndk + self.alpha) / (ndk.sum(axis=1) + self.topics * self.alpha)[:, None]

    def perplexity(self, docs, sweeps: int = 20, seed: int = 0) -> float:
        """Perplexity of ``docs`` by document completion (the app's held-out measure)."""
        observed, target = completion_split(self.corpus(docs))
        return completion_perplexity(observed, target, topic_word(self.nwk, self.beta), self.alpha, sweeps, seed)


def fit(docs, topics: int = 10, *, servers: int = 2, workers: int = 2, output=None, verbose: bool = False,
        alpha: float = 0.1, beta: float | None = None, min_count: int = 2, max_df: float = 0.5,
        **options) -> Model:
    """Train LDA on in-memory documents (strings, or lists of words) by running the
    ``lda`` app with ``psd run`` (a local cluster in a child process). The documents are
    written one per line to ``output/data/docs.txt`` and tokenised as the app tokenises
    files (lower-cased runs of letters). ``options``: ``consistency``, ``timeout``,
    ``name``, ``filters`` (the word-topic table's: zstd, significant), and ``train`` keys (``iterations``, ``blocks``, ``seed``) or ``eval`` keys
    (``heldout``, ``every``, ``patience``, ``tol``, ``sweeps``). ``output``: a folder
    that keeps the run (model.npz, model.json, metrics, plots); by default temporary.
    ``beta=None``: the data-scaled prior (:func:`default_beta`). Returns the
    :class:`Model`, with the run's ``summary`` and ``metrics``."""
    from psd.apps.runjob import run_folder, run_job
    from psd.errors import BadRequestError

    texts = [d if isinstance(d, str) else " ".join(d) for d in docs]
    if not texts:
        raise BadRequestError("lda.fit: no documents")
    job: dict = {"name": "lda_fit", "app": "lda", "servers": servers, "workers": workers,
                 "consistency": "sequential", "model": {"topics": topics, "alpha": alpha, "beta": beta},
                 "train": {}, "eval": {}}
    for key, value in options.items():
        if key in ("consistency", "max_delay", "timeout", "name", "cluster", "filters"):
            job[key] = value
        elif key in _CHECKS["train"]:
            job["train"][key] = value
        elif key in _CHECKS["eval"]:
            job["eval"][key] = value
        else:
            raise BadRequestError(f"lda.fit(): unknown option {key!r}; expected one of consistency, max_delay, "
                                  f"timeout, name, cluster, filters, {', '.join((*_CHECKS['train'], *_CHECKS['eval']))}")
    with run_folder(output) as (folder, temporary):
        path = folder / "data" / "docs.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(" ".join(t.split()) or "." for t in texts) + "\n", encoding="utf-8")
        job["data"] = {"files": str(path), "per": "line", "min_count": min_count, "max_df": max_df}
        job["model"]["save"] = str(folder)
        summary, metrics = run_job(job, folder, "lda.fit", verbose)
        model = Model.load(folder)
        model.summary, model.metrics = summary, metrics
        return model

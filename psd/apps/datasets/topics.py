"""A seeded corpus with planted topics, so a topic model's recovery can be checked.

Topic k is a distribution over the vocabulary: ``dominant_mass`` of it on its own
``dominant_words`` words (disjoint between topics, chosen by a seeded permutation,
weighted 1/(j+1)), the rest spread over the whole vocabulary by a sparse Dirichlet.
Document d has a topic mixture theta_d ~ Dirichlet(doc_alpha) and a Poisson length;
each token draws a topic from theta_d and a word from that topic. Everything comes
from one generator seeded by ``seed`` in a fixed order, and sampling is vectorised
(one searchsorted over row-offset cumulative sums), so every worker builds the same
corpus and takes its own documents.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Corpus:
    """Documents in CSR form: document d is ``words[indptr[d]:indptr[d+1]]``."""

    indptr: np.ndarray            # int64, documents + 1
    words: np.ndarray             # int64 word ids in [0, len(vocab))
    vocab: list[str]              # word names by id
    topics: np.ndarray | None = None      # planted (K, V) topic-word distributions
    doc_topics: np.ndarray | None = None  # planted (D, K) mixtures

    @property
    def num_docs(self) -> int:
        return int(self.indptr.size - 1)

    @property
    def num_words(self) -> int:
        return len(self.vocab)

    def doc_ids(self) -> np.ndarray:
        """The document of every token."""
        return np.repeat(np.arange(self.num_docs, dtype=np.int64), np.diff(self.indptr))

    def docs(self, d0: int, d1: int) -> "Corpus":
        """Documents ``d0:d1`` (no planted truth attached)."""
        lo, hi = int(self.indptr[d0]), int(self.indptr[d1])
        return Corpus(self.indptr[d0:d1 + 1] - lo, self.words[lo:hi], self.vocab)

    def counts_matrix(self):
        """The (documents x vocabulary) bag-of-words matrix, scipy.sparse CSR."""
        from scipy.sparse import csr_matrix

        m = csr_matrix((np.ones(self.words.size, dtype=np.float64), self.words, self.indptr),
                       shape=(self.num_docs, self.num_words))
        m.sum_duplicates()
        return m


def _categorical_rows(rng: np.random.Generator, probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each entry of ``rows``, a draw from the categorical distribution ``probs[row]``:
    one searchsorted over the rows' cumulative sums, each row shifted by its index."""
    n_rows, n_cols = probs.shape
    cum = np.cumsum(probs, axis=1)
    cum /= cum[:, -1:]
    cum += np.arange(n_rows, dtype=np.float64)[:, None]
    u = rng.random(rows.size) + rows
    flat = np.searchsorted(cum.ravel(), u, side="right")
    return np.clip(flat - rows * n_cols, 0, n_cols - 1)


def make_planted_corpus(documents: int, vocabulary: int, topics: int, doc_length: float, seed: int, *,
                        dominant_words: int = 10, dominant_mass: float = 0.7,
                        doc_alpha: float = 0.1, background_beta: float = 0.05) -> Corpus:
    """A corpus of ``documents`` documents over ``vocabulary`` words from ``topics`` planted topics."""
    if dominant_words * topics > vocabulary:
        raise ValueError(f"{topics} topics x {dominant_words} dominant words exceed the "
                         f"vocabulary of {vocabulary}")
    rng = np.random.default_rng([int(seed), 0x1DA])
    perm = rng.permutation(vocabulary)
    background = rng.gamma(background_beta, size=(topics, vocabulary)) + 1e-12
    background /= background.sum(axis=1, keepdims=True)
    phi = (1.0 - dominant_mass) * background
    weights = 1.0 / np.arange(1, dominant_words + 1)
    weights /= weights.sum()
    for k in range(topics):
        phi[k, perm[k * dominant_words:(k + 1) * dominant_words]] += dominant_mass * weights
    theta = rng.gamma(doc_alpha, size=(documents, topics)) + 1e-12
    theta /= theta.sum(axis=1, keepdims=True)
    lengths = np.maximum(1, rng.poisson(doc_length, size=documents))
    indptr = np.zeros(documents + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    docs = np.repeat(np.arange(documents, dtype=np.int64), lengths)
    z = _categorical_rows(rng, theta, docs)
    words = _categorical_rows(rng, phi, z)
    width = len(str(vocabulary - 1))
    vocab = [f"w{i:0{width}d}" for i in range(vocabulary)]
    return Corpus(indptr, words.astype(np.int64), vocab, topics=phi, doc_topics=theta)


def corpus_from_documents(docs: list[list[str]], vocab: list[str]) -> Corpus:
    """Documents given as word lists, restricted to ``vocab`` (empty documents dropped)."""
    index = {w: i for i, w in enumerate(vocab)}
    rows = [[index[w] for w in doc if w in index] for doc in docs]
    rows = [r for r in rows if r]
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    words = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(indptr[-1]))
    return Corpus(indptr, words, list(vocab))


def match_topics(learned_top: list[list[int]], planted_top: list[list[int]]) -> list[tuple[int, int, int]]:
    """Greedy one-to-one matching of learned to planted topics by top-word overlap:
    (learned, planted, overlap) pairs, largest overlaps first."""
    sets_l = [set(t) for t in learned_top]
    sets_p = [set(t) for t in planted_top]
    pairs = sorted(((len(a & b), i, j) for i, a in enumerate(sets_l) for j, b in enumerate(sets_p)),
                   key=lambda t: (-t[0], t[1], t[2]))
    used_l: set[int] = set()
    used_p: set[int] = set()
    out = []
    for overlap, i, j in pairs:
        if i in used_l or j in used_p:
            continue
        used_l.add(i)
        used_p.add(j)
        out.append((i, j, overlap))
    return out

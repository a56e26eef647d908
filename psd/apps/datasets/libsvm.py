"""LIBSVM / SVMlight text files, streamed in chunks of rows.

One example per line::

    <label> [qid:<n>] <feature>:<value> <feature>:<value> ...   [# comment]

Labels are binary, written -1/+1 or 0/1 (both read as 0/1). A feature is a
non-negative integer id, used as the key directly, or, with ``hash_features`` on,
hashed to a 64-bit key: integer ids by :func:`psd.apps.hashing.mix64` (a bijection,
so distinct ids never collide), and then feature names are allowed too, hashed by
:func:`psd.apps.hashing.token_ids` (the ids the text apps give the same tokens).
Files may be plain or compressed (``.gz``, ``.bz2``, ``.xz``).

:func:`read_chunks` yields :class:`SparseDataset` chunks of at most ``chunk_rows``
rows, so a file is never held whole as text; only the compact arrays of the rows a
caller keeps stay in memory. Several files are shards of one data set: with at least
as many files as shards, shard ``s`` reads the files ``i`` with ``i % num_shards ==
s``; with fewer, every shard reads every file and keeps every ``num_shards``-th row.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import itertools
import lzma
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from psd.apps.datasets.synthetic import SparseDataset
from psd.apps.hashing import mix64, token_ids
from psd.errors import ConfigError

CHUNK_ROWS = 65_536
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


# -- hashing ----------------------------------------------------------------------------
def hash_tokens(tokens: list[bytes]) -> np.ndarray:
    """64-bit keys of feature ids as written: integers in [0, 2**64) by ``mix64``,
    anything else (names) by ``token_ids``; vectorised over each kind."""
    out = np.empty(len(tokens), dtype=np.uint64)
    is_int = np.fromiter((t.isdigit() and (len(t) < 20 or int(t) < 2**64) for t in tokens),
                         dtype=bool, count=len(tokens))
    if is_int.any():
        ints = [int(t) for t, i in zip(tokens, is_int) if i]
        out[is_int] = mix64(np.array(ints, dtype=np.uint64))
    if not is_int.all():
        out[~is_int] = token_ids(b" ".join(t for t, i in zip(tokens, is_int) if not i))
    return out


# -- files ------------------------------------------------------------------------------
def expand_files(value, key: str, source: str) -> tuple[list[Path], list[str]]:
    """The files a job's ``data.files`` (or ``data.test_files``) names, and problems.

    ``value`` is a path or glob, or a list of them; globs expand in sorted order.
    Every file must be readable now: a job should fail before a cluster starts,
    with the file named, not later in a worker."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        return [], [f"{source}: {key}: expected a file path or glob, or a list of them, got {value!r}"]
    paths: list[Path] = []
    problems: list[str] = []
    for pattern in value:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                problems.append(f"{source}: {key}: no file matches {pattern!r}")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(os.path.expanduser(pattern)))
    for path in paths:
        try:
            with _open(path) as f:
                f.read(1)
        except IsADirectoryError:
            problems.append(f"{source}: {key}: {str(path)!r} is a directory; expected a LIBSVM file "
                            f"(use a glob such as {str(path / '*')!r} for the files in it)")
        except (OSError, EOFError, lzma.LZMAError) as e:
            problems.append(f"{source}: {key}: cannot read {str(path)!r}: "
                            f"{getattr(e, 'strerror', None) or e}")
    return paths, problems


def _open(path: Path):
    opener = _OPENERS.get(path.suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")


def shard_plan(files: list[Path], shard_index: int, num_shards: int) -> tuple[list[Path], bool]:
    """The files shard ``shard_index`` reads, and whether it keeps only every
    ``num_shards``-th row of them (when there are fewer files than shards)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard {shard_index} of {num_shards} does not exist")
    if len(files) >= num_shards:
        return [f for i, f in enumerate(files) if i % num_shards == shard_index], False
    return list(files), True


# -- parsing ----------------------------------------------------------------------------
def _bad(path: Path, lineno: int, what: str) -> ConfigError:
    return ConfigError(f"{path}:{lineno}: {what}")


def _parse(path: Path, rows: list[tuple[int, bytes]], hash_features: bool) -> SparseDataset:
    """CSR arrays of the parsed lines ``(line number, text)``; row entries sorted by
    key, repeated keys in a row summed."""
    labels: list[bytes] = []
    counts: list[int] = []
    feats: list[bytes] = []
    for lineno, line in rows:
        toks = line.split()
        labels.append(toks[0])
        f = toks[1:]
        if f and f[0].startswith(b"qid:"):
            f = f[1:]
        counts.append(len(f))
        feats.extend(f)
    try:
        y = np.array(labels).astype(np.float64)
    except ValueError:
        for (lineno, _), lab in zip(rows, labels):
            try:
                float(lab)
            except ValueError:
                raise _bad(path, lineno, f"label {lab.decode(errors='replace')!r} is not a number; "
                                         f"expected -1/+1 or 0/1 first on the line") from None
        raise
    bad = ~np.isin(y, (-1.0, 0.0, 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise _bad(path, rows[i][0], f"label {labels[i].decode()!r} is not binary; expected -1/+1 or 0/1")

    pieces = b" ".join(feats).replace(b":", b" ").split()
    if len(pieces) != 2 * len(feats) or sum(f.count(b":") for f in feats) != len(feats):
        row_of = np.repeat(np.arange(len(rows)), counts)
        for i, f in enumerate(feats):
            if f.count(b":") != 1 or not f.partition(b":")[0] or not f.partition(b":")[2]:
                raise _bad(path, rows[int(row_of[i])][0], f"expected FEATURE:VALUE, got {f.decode(errors='replace')!r}")
    id_tokens, value_tokens = pieces[0::2], pieces[1::2]
    try:
        values = np.array(value_tokens).astype(np.float64) if feats else np.empty(0)
    except ValueError:
        row_of = np.repeat(np.arange(len(rows)), counts)
        for i, v in enumerate(value_tokens):
            try:
                float(v)
            except ValueError:
                raise _bad(path, rows[int(row_of[i])][0], f"feature value {v.decode(errors='replace')!r} "
                                                          f"is not a number") from None
        raise
    keys = _keys(path, rows, counts, id_tokens, hash_features)
    return _csr(keys, values, np.asarray(counts, dtype=np.int64), (y > 0).astype(np.float32))


def _keys(path: Path, rows, counts, id_tokens: list[bytes], hash_features: bool) -> np.ndarray:
    if not id_tokens:
        return np.empty(0, dtype=np.uint64)
    ints = all(t.isdigit() for t in id_tokens)
    if ints and max(len(t) for t in id_tokens) < 20:  # below 10**19 < 2**64: no overflow
        ids = np.array(id_tokens).astype(np.uint64)
        return mix64(ids) if hash_features else ids
    if hash_features:
        return hash_tokens(id_tokens)
    row_of = np.repeat(np.arange(len(rows)), counts)
    for i, t in enumerate(id_tokens):
        if not t.isdigit() or int(t) >= 2**64:
            raise _bad(path, rows[int(row_of[i])][0],
                       f"feature id {t.decode(errors='replace')!r} is not an integer in [0, 2**64); "
                       f"set data.hash_features: true to hash feature names to keys")
    return np.array([int(t) for t in id_tokens], dtype=np.uint64)


def _csr(keys: np.ndarray, values: np.ndarray, counts: np.ndarray, labels: np.ndarray) -> SparseDataset:
    """Rows sorted by key within each row, repeats summed, explicit zeros kept."""
    n = counts.size
    row = np.repeat(np.arange(n, dtype=np.int64), counts)
    order = np.lexsort((keys, row))
    row, keys, values = row[order], keys[order], values[order]
    if keys.size:
        start = np.ones(keys.size, dtype=bool)
        start[1:] = (row[1:] != row[:-1]) | (keys[1:] != keys[:-1])
        if not start.all():
            first = np.flatnonzero(start)
            values = np.add.reduceat(values, first)
            row, keys = row[first], keys[first]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n), out=indptr[1:])
    return SparseDataset(indptr, keys.astype(np.uint64, copy=False), values.astype(np.float32), labels)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, text without comment) of every non-empty line."""
    try:
        with _open(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.split(b"#", 1)[0].strip()
                if line:
                    yield lineno, line
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise ConfigError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def read_chunks(files: Iterable[Path | str], *, hash_features: bool = False, chunk_rows: int = CHUNK_ROWS,
                keep_every: int = 1, keep_offset: int = 0) -> Iterator[SparseDataset]:
    """Chunks of at most ``chunk_rows`` examples from ``files`` in order.

    ``keep_every``/``keep_offset`` keep only the rows whose index (counted over all
    the files, from 0) is ``keep_offset`` modulo ``keep_every``: the row-interleaved
    shards of :func:`shard_plan`. A malformed line raises ``ConfigError`` naming the
    file and line."""
    if chunk_rows < 1 or keep_every < 1 or not 0 <= keep_offset < keep_every:
        raise ValueError("need chunk_rows >= 1 and 0 <= keep_offset < keep_every")
    counter = itertools.count()
    for path in map(Path, files):
        lines = (item for item in _lines(path) if next(counter) % keep_every == keep_offset)
        while True:
            rows = list(itertools.islice(lines, chunk_rows))
            if not rows:
                break
            yield _parse(path, rows, hash_features)


def concat(chunks: Iterable[SparseDataset]) -> SparseDataset:
    """One data set of the chunks, in order."""
    chunks = list(chunks)
    if not chunks:
        return SparseDataset(np.zeros(1, np.int64), np.empty(0, np.uint64), np.empty(0, np.float32),
                             np.empty(0, np.float32))
    offsets = np.cumsum([0] + [c.nnz for c in chunks[:-1]])
    indptr = np.concatenate([chunks[0].indptr[:1]] + [c.indptr[1:] + off for c, off in zip(chunks, offsets)])
    return SparseDataset(indptr, np.concatenate([c.indices for c in chunks]),
                         np.concatenate([c.values for c in chunks]), np.concatenate([c.labels for c in chunks]))


def load_shard(files: list[Path], shard_index: int, num_shards: int, *, hash_features: bool = False,
               chunk_rows: int = CHUNK_ROWS) -> SparseDataset:
    """Shard ``shard_index`` of ``num_shards`` of the data set ``files`` make up,
    streamed in chunks into compact arrays."""
    mine, interleave = shard_plan(files, shard_index, num_shards)
    every, offset = (num_shards, shard_index) if interleave else (1, 0)
    return concat(read_chunks(mine, hash_features=hash_features, chunk_rows=chunk_rows,
                              keep_every=every, keep_offset=offset))


def write_libsvm(path: Path | str, data: SparseDataset, *, zero_one: bool = False) -> None:
    """Write ``data`` as a LIBSVM file (labels -1/+1 unless ``zero_one``)."""
    neg, pos = ("0", "1") if zero_one else ("-1", "+1")
    with open(path, "w") as f:
        for i in range(len(data)):
            lo, hi = int(data.indptr[i]), int(data.indptr[i + 1])
            feats = " ".join(f"{int(k)}:{float(v):.9g}" for k, v in zip(data.indices[lo:hi], data.values[lo:hi]))
            f.write(f"{pos if data.labels[i] > 0 else neg} {feats}\n")

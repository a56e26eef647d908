"""Text files as app input: naming them in a job, cutting them into shards, streaming
their tokens in chunks (never loading a file whole).

Shards. Plain files are cut by bytes: the concatenated bytes of all plain files are
split into ``num_shards`` equal ranges, and a shard owns the tokens whose *first byte*
lies in its range (it skips a token that began before its range and reads past its end
to finish its last token), so the shards partition the token stream exactly, whatever
the number of shards. Compressed files (``.gz``, ``.dz``: gzip) cannot be cut by
bytes; each goes whole to the shard with the fewest bytes so far (largest first).
"""
from __future__ import annotations

import glob
import gzip
import os
import re
from typing import Iterator

import numpy as np

from psd.apps.hashing import WHITESPACE, token_ids

COMPRESSED = (".gz", ".dz")
CHUNK = 1 << 20
_WS_RE = re.compile(rb"[ \t\n\r\x0b\x0c]")
_WS_CHARS = [bytes([c]) for c in WHITESPACE]


def _is_pattern(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def expand_files(files) -> list[str]:
    """A job's ``files`` value (a path, a glob pattern, or a list of them) as a list of
    paths, each pattern expanded (``**`` recursive) and sorted, duplicates dropped."""
    items = [files] if isinstance(files, str) else list(files or [])
    out: list[str] = []
    for item in items:
        out.extend(sorted(glob.glob(item, recursive=True)) if _is_pattern(item) else [item])
    return list(dict.fromkeys(out))


def check_files(files, source: str, key: str) -> list[str]:
    """Problems with a ``files`` value, each naming ``source`` and ``key``: the wrong type,
    a pattern that matches nothing, a path that is not a readable file."""
    ok_type = isinstance(files, str) or (isinstance(files, list) and files
                                         and all(isinstance(f, str) and f for f in files))
    if not ok_type or not files:
        return [f"{source}: {key}: expected a path, a glob pattern or a list of them, got {files!r}"]
    items = [files] if isinstance(files, str) else files
    problems = []
    for item in items:
        if _is_pattern(item):
            if not [p for p in glob.glob(item, recursive=True) if os.path.isfile(p)]:
                problems.append(f"{source}: {key}: pattern {item!r} matches no file")
        elif not os.path.isfile(item):
            problems.append(f"{source}: {key}: cannot read {item!r}: no such file")
        elif not os.access(item, os.R_OK):
            problems.append(f"{source}: {key}: cannot read {item!r}: permission denied")
    return problems


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(COMPRESSED) else open(path, "rb")


def plan_shards(paths: list[str], num_shards: int) -> list[list[tuple[str, int, int | None]]]:
    """Pieces ``(path, start, end)`` of every shard (``end`` None: to the end of the file).
    Deterministic: every process computes the same plan from the same file list."""
    shards: list[list[tuple[str, int, int | None]]] = [[] for _ in range(num_shards)]
    load = [0] * num_shards
    files = [p for p in paths if os.path.isfile(p)]
    plain = [(p, os.path.getsize(p)) for p in files if not p.endswith(COMPRESSED)]
    packed = sorted(((p, os.path.getsize(p)) for p in files if p.endswith(COMPRESSED)),
                    key=lambda ps: (-ps[1], ps[0]))
    total = sum(size for _, size in plain)
    offset = 0
    for path, size in plain:
        for s in range(num_shards):
            lo, hi = total * s // num_shards, total * (s + 1) // num_shards
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                shards[s].append((path, a - offset, b - offset))
                load[s] += b - a
        offset += size
    for path, size in packed:
        s = min(range(num_shards), key=lambda i: (load[i], i))
        shards[s].append((path, 0, None))
        load[s] += size
    return shards


def _last_ws(buf: bytes) -> int:
    return max(buf.rfind(c) for c in _WS_CHARS)


def iter_token_ids(path: str, start: int = 0, end: int | None = None,
                   chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """64-bit ids (:func:`psd.apps.hashing.token_ids`) of the tokens whose first byte lies
    in ``[start, end)`` of ``path``, one array per chunk read."""
    compressed = path.endswith(COMPRESSED)
    if compressed and (start or end is not None):
        raise ValueError(f"{path}: a compressed file is read whole")
    with _open(path) as f:
        skip = False
        if start > 0:
            f.seek(start - 1)
            before = f.read(1)
            skip = bool(before) and before not in _WS_CHARS
        remaining = float("inf") if end is None else end - start
        carry = b""
        while remaining > 0:
            data = f.read(int(min(chunk, remaining)))
            if not data:
                break
            remaining -= len(data)
            buf = carry + data if carry else data
            if skip:  # the tail of a token that began in the previous shard
                m = _WS_RE.search(buf)
                if m is None:
                    carry = b""
                    continue
                buf, skip = buf[m.start():], False
            cut = _last_ws(buf)
            body, carry = buf[:cut + 1], buf[cut + 1:]
            if body:
                yield token_ids(body)
        if carry:  # the last token runs past ``end``: read on to its end
            while True:
                more = f.read(1 << 16)
                if not more:
                    break
                m = _WS_RE.search(more)
                if m is not None:
                    carry += more[:m.start()]
                    break
                carry += more
            yield token_ids(carry)


def iter_shard_token_ids(pieces, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    for path, start, end in pieces:
        yield from iter_token_ids(path, start, end, chunk)


# -- documents (LDA) ------------------------------------------------------------------
_WORD = re.compile(r"[^\W\d_]{2,}")


def read_documents(paths: list[str], per: str = "line") -> list[list[str]]:
    """Lower-cased words (letters only, two or more) of every document: each non-empty
    line (``per="line"``) or each file (``per="file"``) is one document."""
    docs: list[list[str]] = []
    for path in paths:
        with _open(path) as f:
            text = f.read().decode("utf-8", errors="replace").lower()
        if per == "file":
            words = _WORD.findall(text)
            if words:
                docs.append(words)
        else:
            for line in text.splitlines():
                words = _WORD.findall(line)
                if words:
                    docs.append(words)
    return docs


def vocabulary(docs: list[list[str]], min_count: int = 2, max_df: float = 0.5) -> list[str]:
    """Words seen at least ``min_count`` times and in at most ``max_df`` of the documents,
    most frequent first (ties by the word), so every process builds the same ids."""
    from collections import Counter

    counts: Counter = Counter()
    df: Counter = Counter()
    for doc in docs:
        counts.update(doc)
        df.update(set(doc))
    limit = max_df * len(docs)
    kept = [w for w, c in counts.items() if c >= min_count and df[w] <= limit]
    return sorted(kept, key=lambda w: (-counts[w], w))


__all__ = ["expand_files", "check_files", "plan_shards", "iter_token_ids", "iter_shard_token_ids",
           "read_documents", "vocabulary"]

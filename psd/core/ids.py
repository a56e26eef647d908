"""The numbers a process makes up: request ids and stream epochs.

Both start at a random point in every process: servers remember request ids per sender
name and streams by epoch, and a name can come back (a scheduler that crashed before
saving a registration hands it out again), so counting from 1 again would make a new
process's first pushes look like resends of the old one's. The simulation reseeds them
(``reseed``) so that a run replays exactly.
"""
from __future__ import annotations

import itertools
import random
import secrets

_rids = itertools.count(secrets.randbits(62) + 1)
_epochs = itertools.count(secrets.randbits(40) + 1)


def next_rid() -> int:
    """A fresh request id (exactly-once is per sender and rid)."""
    return next(_rids)


def next_epoch() -> int:
    """A stream epoch above every one this process used before."""
    return next(_epochs)


def reseed(seed: int) -> None:
    """Start both counters at points drawn from ``seed`` (the simulation's replay)."""
    global _rids, _epochs
    rng = random.Random(seed)
    _rids = itertools.count(rng.getrandbits(62) + 1)
    _epochs = itertools.count(rng.getrandbits(40) + 1)

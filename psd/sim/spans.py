"""The span workload of ``Settings.spans``: dense key spans beside the random keys.

Random uint64 keys live in a server's hash rows; only span pushes of at least
``RUN_MIN`` keys (or ones that touch a run) make dense runs, and a pull of a dense run
is what the store lends zero-copy (``psd.store.runs``, ``lending``). So that the
simulation keeps exercising what lending must guarantee, workers here also push and pull
one region of consecutive keys:

- each worker owns one block of the region (``BLOCK`` keys, at least ``RUN_MIN``): it
  alone pushes there, so its pulls of its own block are checked as for its own random
  keys (under ``eventual``: exactly its pushes issued before);
- the region straddles a range boundary of the ring in about half the seeds, so span
  requests are cut between servers, and range moves and copies carry runs;
- a request is one span, two spans or the same keys as a key list (the keyed path that
  the store turns into a span when the keys are consecutive); a push covers a whole
  block (which makes or refreshes a run) or part of one.

Checking key by key would cost a few hundred times a random key's check. But the keys
between two consecutive edges of span pushes, block boundaries and range boundaries
(a *segment*) were pushed by the same pushes with the same slots, so the checker reads
each distinct value of a segment once, through the same per-key checks as the random
keys (``Run._check_read``, ``Run._check_copy``).
"""
from __future__ import annotations

import numpy as np

from psd.cluster.rows import Rows
from psd.sim.run import PULL_LOSSLESS, SLOTS, PullRecord, PushRecord

#: keys per worker's block (drawn per seed): at least RUN_MIN (256), so a push of a
#: whole block makes a dense run on its server when the ring does not cut it
BLOCK = (256, 320)
#: the share of a worker's pushes and pulls that go to the region
SHARE = 0.5
KEY_END = 2**64


class Spans:
    """The region, the span requests issued, and their checks, for one ``Run``."""

    def __init__(self, run) -> None:
        self.run = run
        self.rng = run.rng
        self.lo = self.block = self.hi = 0  # placed at the first span request (the ring is known then)
        self.slots: np.ndarray | None = None  # slots used, per key of the region
        self.edges: set[int] = set()  # where span pushes begin and end
        self.pushes: list = []  # PushRecord, keys: the keys pushed, slots: ndarray
        self.pulls: list = []  # PullRecord
        self.started: set[int] = set()  # workers that pushed to their block

    def wants(self) -> bool:
        """Whether the next push or pull goes to the region (draws from the seed)."""
        return self.rng.random() < SHARE

    # -- the workload ------------------------------------------------------------------
    def _place(self, ring) -> None:
        rng, workers = self.rng, len(self.run.workers)
        self.block = rng.randint(*BLOCK)
        n = self.block * workers
        begins = [r.begin for r in ring.ranges if 0 < r.begin < KEY_END]
        if begins and rng.random() < 0.5:  # across a range boundary
            lo = rng.choice(begins) - rng.randint(1, n - 1)
        else:
            lo = rng.randrange(KEY_END - n)
        self.lo = min(max(lo, 0), KEY_END - n - 1)
        self.hi = self.lo + n
        self.slots = np.zeros(n, np.int64)
        self.edges = {self.lo + i * self.block for i in range(workers + 1)}

    def _spans(self, lo: int, n: int) -> list[tuple[int, int]]:
        """One span of [lo, lo+n): all of it, a part, or two disjoint parts."""
        rng, shape = self.rng, self.rng.random()
        if shape < 0.35:
            return [(lo, n)]
        if shape < 0.8:
            a = rng.randrange(n)
            return [(lo + a, rng.randint(1, n - a))]
        a, b, c, d = sorted(rng.sample(range(n + 1), 4))
        return [(lo + a, b - a), (lo + c, d - c)]

    def _ready(self, w: int) -> None:
        if self.slots is None:
            self._place(self.run.workers[w].core.ring)

    def push(self, w: int) -> None:
        run, rng = self.run, self.rng
        self._ready(w)
        lo = self.lo + w * self.block
        # a worker's first push covers its block: a run from the start (if no range cuts it)
        spans = self._spans(lo, self.block) if w in self.started else [(lo, self.block)]
        self.started.add(w)
        keys = span_keys(spans)
        at = (keys - np.uint64(self.lo)).astype(np.intp)
        if int(self.slots[at].max()) >= SLOTS:
            return
        slots = self.slots[at].copy()
        self.slots[at] += 1
        for lo, n in spans:
            self.edges.update((lo, lo + n))
        values = (np.ones(keys.size, np.int64) << (2 * slots)).reshape(-1, 1)
        run._order += 1
        worker = run.workers[w]
        rec = PushRecord(w, keys, slots, worker.core.clock_value, run.world.now, run._order)
        self.pushes.append(rec)
        rows = Rows(keys=keys, values=values) if rng.random() < 0.25 else Rows(spans=spans, values=values)
        ts = worker.issue("push", run.table, rows)
        run._inflight[(w, ts)] = rec

    def pull(self, w: int, own: bool) -> None:
        run, rng = self.run, self.rng
        self._ready(w)
        spans = self._spans(self.lo + w * self.block, self.block) if own else self._spans(self.lo, self.hi - self.lo)
        keys = span_keys(spans)
        run._order += 1
        worker = run.workers[w]
        rec = PullRecord(w, keys, worker.core.clock_value, run.world.now, run._order)
        self.pulls.append(rec)
        if rng.random() < 0.25:
            rows = Rows(keys=keys, meta={"pf": PULL_LOSSLESS} if run.s.pull_filters else None)
        else:
            rows = Rows(spans=spans)  # (pull filters need a key list)
        ts = worker.issue("pull", run.table, rows)
        run._inflight[(w, ts)] = rec

    # -- the checks --------------------------------------------------------------------
    def _cuts(self, extra=()) -> np.ndarray:
        cuts = {c for c in self.edges if self.lo <= c <= self.hi}
        cuts.update(c for c in extra if self.lo < c < self.hi)
        return np.array(sorted(cuts), np.uint64)

    def _loss_edges(self) -> list[int]:
        """Where the push slots allowed lost (``Run.lost_ok``: ``Settings.restore``) change
        along the region: a segment's keys must share them, as they share their pushes."""
        lost, edges, before = self.run.lost_ok, [], None
        if not lost:
            return edges
        for k in range(self.lo, self.hi):
            if lost.get(k) != before:
                edges.append(k)
                before = lost.get(k)
        return edges

    def _history(self, cuts: np.ndarray) -> list[list[tuple[int, int, float, int, bool]]]:
        """Per segment [cuts[i], cuts[i+1]): its pushes as (slot, order, issued, clock,
        acked), the shape ``Run._check_read`` takes for one key."""
        hist: list[list] = [[] for _ in range(max(0, cuts.size - 1))]
        for p in self.pushes:
            seg, first = np.unique(np.searchsorted(cuts, p.keys, "right") - 1, return_index=True)
            acked = p.outcome == "acked"
            for s, i in zip(seg.tolist(), first.tolist()):
                hist[s].append((int(p.slots[i]), p.order, p.issued, p.clock, acked))
        return hist

    def region(self) -> list[int]:
        """The region's keys (none before the first span request placed it)."""
        return list(range(self.lo, self.hi)) if self.slots is not None else []

    def owner_of(self, key: int) -> int:
        return (key - self.lo) // self.block

    def check_pulls(self, worker_id: dict, dead_workers: set) -> None:
        if self.slots is None:
            return
        cuts = self._cuts(self._loss_edges())
        hist = self._history(cuts)
        for pull in self.pulls:
            if pull.values is None:
                continue
            seg = np.searchsorted(cuts, pull.keys, "right") - 1
            pairs, first = np.unique(np.stack([seg, pull.values]), axis=1, return_index=True)
            for (s, value), i in zip(pairs.T.tolist(), first.tolist()):
                k = int(pull.keys[i])
                self.run._check_read(pull, k, value, hist[s], self.owner_of(k), worker_id, dead_workers)

    def check_copies(self, ring, servers: dict) -> None:
        """What ``Run.check_end`` checks of each random key, per segment of the region:
        every live owner's copy holds each acked push once and nothing never pushed, and
        the copies agree."""
        if self.slots is None:
            return
        extra = [r.begin for r in ring.ranges]
        for srv in servers.values():
            extra += [c for r in srv.core.incoming for c in (r.begin, r.end)]
        cuts = self._cuts(extra + self._loss_edges())
        hist = self._history(cuts)
        table_name = self.run.table.name
        for s, pushes in enumerate(hist):
            if not pushes:
                continue
            a, b = int(cuts[s]), int(cuts[s + 1])
            issued = {p[0] for p in pushes}
            acked = {p[0] for p in pushes if p[4]}
            owners = ring.owners_at(a)
            copies: dict[str, np.ndarray] = {}
            for node in owners:
                srv = servers.get(node)
                if srv is None:
                    continue
                table = srv.core.tables.get(table_name)
                if table is None:
                    self.run.violate(f"{node} owns keys {a}..{b - 1} but has no table")
                    continue
                if any(r.begin <= a < r.end for r in srv.core.incoming):
                    continue  # still being copied in
                copies[node] = table.pull_span(a, b - a)[:, 0]
            if not copies:
                if acked and any(n in servers for n in owners) and not self.run.s.bounded:
                    self.run.violate(f"keys {a}..{b - 1}: no live owner answered, though acked pushes went to them")
                continue
            for node, vals in copies.items():
                uniq, first = np.unique(vals, return_index=True)
                for value, i in zip(uniq.tolist(), first.tolist()):
                    self.run._check_copy(a + i, node, value, acked, issued, owners, ring)
            nodes = list(copies)
            for node in nodes[1:]:
                differ = np.flatnonzero(copies[node] != copies[nodes[0]])
                if differ.size:
                    i = int(differ[0])
                    self.run.violate(f"key {a + i}: copies disagree: "
                                     f"{ {n: int(v[i]) for n, v in copies.items()} }")
                    break

    def counts(self) -> dict:
        pushes, pulls = self.pushes, self.pulls
        return {"pushes": len(pushes), "acked": sum(p.outcome == "acked" for p in pushes),
                "pulls": len(pulls), "answered": sum(p.values is not None for p in pulls),
                "keys_pulled": sum(int(p.keys.size) for p in pulls if p.values is not None)}


def span_keys(spans: list[tuple[int, int]]) -> np.ndarray:
    """The keys of ``spans`` ([(lo, count), ...]), in order."""
    return np.concatenate([np.uint64(lo) + np.arange(n, dtype=np.uint64) for lo, n in spans])

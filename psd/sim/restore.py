"""A range that loses every copy, restored from the newest checkpoint
(``Settings.restore``, with ``checkpoints``; at replication 1 its only copy).

Once a checkpoint has a manifest, a server that leads ranges dies; the scheduler gives it
up after ``restore_unavailable_after`` and restores its ranges from the newest checkpoint,
which the servers load as the daemon does (``Checkpoints.restore``: the files read, then
``ServerCore.restore``). The checker knows exactly which acked pushes may be lost: at the
death it records every (key, push) the dead server had acknowledged, wholly or for its
part of the push; of those, the ones the dead copy held (applied, or kept by its gate for
the clock boundary or a cut) and the checkpoint did not. Only they may be missing from
the settled copies, from later checkpoints and from what pulls must see
(``Run.lost_ok``). A server the scheduler gives up while it still lives (stalled or cut
off that long) counts the same from that moment (``Restore.watch``). A restored key holds
every push its checkpoint held, and none of the lost ones comes back; with an evicting
table, a row evicted after its restore (``Run.evictions``) may lack them, and then holds
none of them (only pushes applied after the eviction).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from psd.sim.nodes import SimServer
from psd.sim.run import PushRecord, _decode
from psd.sim.spans import span_keys
from psd.store.checkpoint import read_server_file

#: seconds a range has no copy before the scheduler restores it
RESTORE_AFTER = 0.5


class Restore:
    def __init__(self, run, checkpoints):
        self.run, self.ckpt, self.world = run, checkpoints, run.world
        self.lost: list[SimServer] = []  # servers that died with the only copy of their ranges
        #: (key, slot) of every push a lost server had acknowledged when it died
        self.acked_by_lost: set[tuple[int, int]] = set()
        self.lost_at = float("inf")
        self.restored_keys = 0
        #: per server the scheduler gave up while it lived (stalled or cut off past the
        #: failure timeout and restore_unavailable_after): key -> push slots it held then
        self.given_up: dict[str, dict[int, set[int]]] = {}
        self.given_up_at: dict[str, float] = {}  # (when, by node: its copy is stale after)

    def plan(self) -> None:
        rng, pace = self.run.rng, self.run.pace
        self.world.at(rng.uniform(pace.faults_from, pace.duration - 0.2), self._lose, None)

    def _lose(self) -> None:
        """``Settings.restore``: once a checkpoint has a manifest, a server that leads
        ranges dies (replication 1: the only copy of them), and with it the other owners
        of one range it leads; their successors join later."""
        run, world = self.run, self.world
        ring = run.scheduler.core.state.ring
        live = [s for s in run.servers if s.alive and s.name in world.processes and ring.led_by(s.core.node_id)]
        if not self.ckpt.manifests() or not live:
            if world.now < run.pace.duration:
                world.after(0.05, self._lose, None)
            return
        victim = run.rng.choice(live)
        for srv in self._copies_of_one_range(victim, ring):
            self.acked_by_lost |= self._acked_by(srv.core.node_id)
            self.lost.append(srv)
            self.lost_at = min(self.lost_at, world.now)
            run.outcome.faults.append(f"lost {srv.core.node_id}@{world.now:.2f}")
            world.kill(srv.name)
            srv.alive = False
            world.after(run.rng.uniform(*run.pace.restart), run.add_server, None)
        run.killed = run.s.replication  # (no fault kills any more: the checker knows only these)

    def _copies_of_one_range(self, victim: SimServer, ring) -> list[SimServer]:
        """The victim, and at replication above 1 the other live owners of a range it
        leads (drawn): all die, so that range has no copy left."""
        if self.run.s.replication == 1:
            return [victim]
        node = victim.core.node_id
        owners = self.run.rng.choice([o for o in ring.owners if o and o[0] == node])
        return [victim] + [s for s in self.run.servers if s is not victim and s.core.node_id in owners
                           and s.alive and s.name in self.world.processes]

    def watch(self) -> None:
        """After each step of the scheduler: a server it gave up that still lives (stalled
        or cut off, not killed) loses, like a dead one, what it acked since the checkpoint
        (documented: its stale copy is dropped when it registers again). What it held and
        had acked is recorded now; a push it acks later (waking up) must not be lost: it
        must refuse it (``ServerCore.serving_alone``)."""
        run = self.run
        abandoned = run.scheduler.core.state.abandoned
        if not abandoned or abandoned <= self.given_up.keys() | {s.core.node_id for s in self.lost}:
            return
        for srv in run.servers:
            node = srv.core.node_id
            if node in abandoned and node not in self.given_up and srv not in self.lost and srv.alive:
                self.given_up[node] = _held_by(srv, run.table.name, self.run.workload_keys())
                self.given_up_at[node] = self.world.now
                self.acked_by_lost |= self._acked_by(node)
                self.lost_at = min(self.lost_at, self.world.now)
                run.outcome.faults.append(f"given up {node}@{self.world.now:.2f}")

    def _acked_by(self, node: str) -> set[tuple[int, int]]:
        """(key, slot) of the pushes acknowledged by now wholly, or for their part sent
        to ``node`` (which its worker will never send again)."""
        run = self.run
        pushes = run.pushes + (run.spans.pushes if run.spans is not None else [])
        out = {(k, slot) for p in pushes if p.outcome == "acked" for k, slot in zip(p.keys.tolist(), p.slots)}
        for w, worker in enumerate(run.workers):
            for ts, req in worker.core.requests.items():
                rec = run._inflight.get((w, ts))
                rec = rec[0] if isinstance(rec, tuple) else rec
                if not isinstance(rec, PushRecord):
                    continue
                slot_of = dict(zip(rec.keys.tolist(), np.asarray(rec.slots).tolist()))
                for part in req.parts:
                    if (part.server == node and part.reply is not None and part.reply.op == "ok"
                            and part.rows is not None):
                        out |= {(k, slot_of[k]) for k in _keys_of(part.rows).tolist() if k in slot_of}
        return out

    def allow_lost(self) -> None:
        """``Settings.restore``: the push slots each restored key may have lost: those its
        dead copy held beyond the checkpoint it was restored from (``Run.lost_ok``)."""
        for entry, k, dead, restored in self._restored_keys():
            lost = {s for s in dead - restored if (k, s) in self.acked_by_lost}
            if lost:
                self.run.lost_ok.setdefault(k, set()).update(lost)

    def _restored_keys(self):
        """(restore entry, key, slots its dead copies held, slots the checkpoint held) of
        every workload key in a range the scheduler restored."""
        run = self.run
        for entry in run.scheduler.core.restored:
            folder = Path(entry["checkpoint"])
            values = self._values_of(folder)
            keys = [k for k in run.workload_keys() if any(r["begin"] <= k <= r["last"] for r in entry["ranges"])]
            copies = [_held_by(s, run.table.name, keys) for s in run.servers
                      if s.core.node_id in entry["servers"] and s.core.node_id not in self.given_up]
            copies += [self.given_up[n] for n in entry["servers"] if n in self.given_up]
            for k in keys:
                held: set[int] = set()
                for copy in copies:
                    held |= copy.get(k, set())
                yield entry, k, held, _decode(values.get(k, 0))[0]

    def _values_of(self, folder: Path) -> dict[int, int]:
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        out: dict[int, int] = {}
        for file in manifest["files"]:
            for tname, (_spec, keys, vals, _state) in read_server_file(folder / file).items():
                if tname == self.run.table.name:
                    out.update(zip(keys.tolist(), vals[:, 0].tolist()))
        return out

    def check(self, final: dict[int, int]) -> dict:
        """Each restored key holds its checkpoint's pushes, and of those its dead copy
        held beyond them none it had acked (its worker never sends them again); with an
        evicting table, a row evicted after its newest restore holds none of them."""
        restored_keys = list(self._restored_keys())
        newest = {k: entry["time"] for entry, k, _, _ in restored_keys}  # (the list is in order)
        for entry, k, dead, restored in restored_keys:
            self.restored_keys += 1
            settled = final.get(k)
            if settled is not None:
                self._check_key(entry, k, dead, restored, _decode(settled)[0], entry["time"] == newest[k])
        return {"lost": len(self.lost), "restores": len(self.run.scheduler.core.restored),
                "keys restored": self.restored_keys,
                "slots allowed lost": sum(len(v) for v in self.run.lost_ok.values())}

    def _check_key(self, entry: dict, k: int, dead: set[int], restored: set[int], now: set[int],
                   newest: bool) -> None:
        """Key ``k`` restored by ``entry`` with the push slots ``restored``, holding
        ``now`` at the end. Evicted since, it may lack them; and once evicted it holds only
        pushes applied after, never one the checkpoint held (unless a later restore
        brought them back: ``newest`` is False)."""
        name = f"key {k} restored from {Path(entry['checkpoint']).name}"
        evicted = self._evicted_since(k, entry["time"])
        if restored - now and not evicted:
            self.run.violate(f"{name}: lacks push slot(s) {sorted(restored - now)} the checkpoint held "
                             f"(its row not evicted since)")
        if evicted and newest and restored & now:
            self.run.violate(f"{name}: its row evicted since, yet holds push slot(s) {sorted(restored & now)} "
                             f"the checkpoint held")
        back = {s for s in (now & dead) - restored if (k, s) in self.acked_by_lost}
        if back:
            self.run.violate(f"{name}: holds acked push slot(s) {sorted(back)} that only the lost copy held")

    def _evicted_since(self, k: int, since: float) -> bool:
        """Whether key ``k``'s row was evicted after ``since`` (a restore began) by a
        server the scheduler had not given up by then: a row its table evicted may lack
        what the checkpoint held (pushed again, it holds only the later pushes). A stale
        copy's evictions say nothing of the restored one."""
        return any(since < t < self.given_up_at.get(node, float("inf"))
                   for t, node in self.run.evictions.get(k, ()))


def _held_by(server: SimServer, table_name: str, keys: list[int]) -> dict[int, set[int]]:
    """Per key of ``keys``, the push slots a (dead) server held: applied to its table, or
    acked and kept by its gate (for the clock boundary, or a checkpoint's cut)."""
    table = server.core.tables.get(table_name)
    held: dict[int, set[int]] = {k: set() for k in keys}
    if table is not None and held:
        ordered = sorted(held)  # (a table pulls sorted keys)
        values = table.pull(np.array(ordered, np.uint64))[:, 0].tolist()
        held = {k: _decode(int(v))[0] for k, v in zip(ordered, values)}
    for policy in server.core.gate.policies.values():
        kept = [what for *_, what in policy._pushes]
        kept += [what for _w, _c, apply, what in policy._past_cut if apply is not None]
        for what in kept:
            rows = getattr(what, "rows", None)
            if getattr(what, "table", None) != table_name or rows is None:
                continue
            for k, v in zip(_keys_of(rows).tolist(), rows.values[:, 0].tolist()):
                if k in held:
                    held[k] |= _decode(int(v))[0]
    return held


def _keys_of(rows) -> np.ndarray:
    """The keys a request's rows name: its key list, or its spans' keys."""
    return rows.keys if rows.keys is not None else span_keys(rows.spans)

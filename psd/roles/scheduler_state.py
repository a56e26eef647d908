"""The scheduler's durable state, so a restarted scheduler resumes its cluster.

What is kept: the ring, server addresses, node id counters, tables, members (with the
role of the key that registered each) and job progress. What is not: heartbeats and
connections, which servers and workers renew on their own (ZeroMQ reconnects them to
the same address). The file is JSON, replaced atomically; ring changes and table
creation are saved at once, job progress at most a few times a second.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from psd.cluster.assignment import Assignment
from psd.cluster.jobs import Job
from psd.schema import TableSpec

FILE = "scheduler.json"


def save(scheduler, folder: Path) -> None:
    s = scheduler
    state = {
        "ring": s.ring.to_wire(), "addresses": s.addresses,
        # numbers reserved count as handed out: a restart resumes above them
        "counts": {role: max(n, s.ids_saved.get(role, 0)) for role, n in s.counts.items()},
        "tables": [t.to_wire() for t in s.tables.values()],
        "members": [{"node": p.node, "role": p.role, "state": p.state.value, "by": s.registered_by.get(p.node)}
                    for p in s.liveness.peers.values()],
        "worker_clocks": s.worker_clocks,
        "jobs": [dict(asdict(j), shards_done=sorted(j.shards_done), ranks={str(k): v for k, v in j.ranks.items()},
                      progress={str(k): v for k, v in j.progress.items()}) for j in s.jobs.jobs.values()],
        "next_job": s.jobs._next, "next_checkpoint": s.checkpoints.next_id,
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, folder / FILE)


def load(scheduler, folder: Path, now: float) -> bool:
    """Restore a saved state into a fresh scheduler; False when there is none."""
    path = folder / FILE
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    s = scheduler
    s.ring = Assignment.from_wire(state["ring"])
    s.addresses = dict(state["addresses"])
    s.counts = dict(state["counts"])
    for spec in state["tables"]:
        s.tables[spec["name"]] = TableSpec.from_wire(spec)
    for m in state["members"]:
        if m["state"] in ("active", "suspect"):  # they get a full timeout to heartbeat again
            s.liveness.join(m["node"], m["role"], now)
            s.registered_by[m["node"]] = m.get("by")  # the key role that registered it (older files: none)
    s.worker_clocks = {w: int(c) for w, c in state["worker_clocks"].items()}
    for j in state["jobs"]:
        job = Job(**{**j, "ranks": {int(k): v for k, v in j["ranks"].items()},
                     "progress": {int(k): v for k, v in j["progress"].items()},
                     "shards_done": set(j["shards_done"])})
        s.jobs.jobs[job.id] = job
    s.jobs._next = int(state["next_job"])
    s.checkpoints.next_id = max(s.checkpoints.next_id, int(state["next_checkpoint"]))
    return True

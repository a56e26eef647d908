"""What the scheduler knows of the cluster, in one object with explicit save and load.

Durable (``to_dict`` / ``load``; the daemon writes it to ``state_dir/scheduler.json``, a
restarted scheduler resumes from it): the ring, server addresses, node id counters,
tables, members (with the role of the key that registered each), worker clocks and job
progress. Not durable: heartbeats, servers' stats and peer reports, which the nodes
renew on their own within a heartbeat interval.
"""
from __future__ import annotations

from dataclasses import asdict

from psd.cluster.assignment import Assignment
from psd.cluster.jobs import Job, JobBook
from psd.cluster.liveness import Liveness, State
from psd.config import ClusterConfig
from psd.schema import TableSpec

#: worker numbers reserved with each save of the state: one save per this many joins
ID_BLOCK = 64


class ClusterState:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.liveness = Liveness(config.heartbeat_interval, config.heartbeat_misses, config.worker_timeout)
        #: node -> the role of the key that registered it (``Message.peer``; None under
        #: security: none): requests in a node's name must come with that key
        self.registered_by: dict[str, str | None] = {}
        self.addresses: dict[str, str] = {}
        self.stats: dict[str, dict] = {}  # the last stats each server sent
        self.counts = {"server": 0, "worker": 0}
        #: node numbers saved as handed out already (blocks of ID_BLOCK): a restart after
        #: a crash resumes above them, so a name is never handed out twice
        self.ids_saved = {"server": 0, "worker": 0}
        self.ring = Assignment(version=0)
        #: the last final ring: where the data surely is (a joint ring's new owners may
        #: still lack it; a ring change plans its copies from this one)
        self.stable: Assignment | None = None
        #: servers declared dead that registered again: old name -> new one (a range only
        #: the old one held is the new one's: it still has the data)
        self.rejoined: dict[str, str] = {}
        #: dead servers given up on: ranges only they held were restored from a checkpoint
        #: (``restore_unavailable_after``), not kept for their return
        self.abandoned: set[str] = set()
        self.tables: dict[str, TableSpec] = {}
        self.jobs = JobBook()
        self.worker_clocks: dict[str, int] = {}
        self.next_checkpoint = 1
        #: the leadership term (docs/fault-tolerance.md, "Standby scheduler"): 0 without
        #: standbys; a standby that takes over leads at a higher one
        self.epoch = 0
        self.metrics_at: dict[str, str] = {}  # metrics endpoints workers announced (meta.metrics)
        #: dead servers a server registered since has made up for (health: not DEGRADED for them)
        self.replaced: set[str] = set()
        self.flagged: set[str] = set()  # workers currently flagged as stragglers
        #: the durable part changed: written at the next tick (job progress, membership)
        self.dirty = False

    def live(self, role: str) -> list[str]:
        return self.liveness.live(role)

    def new_node(self, role: str) -> str:
        """The next node id of ``role`` (``S<n>`` / ``W<n>``), never handed out before."""
        node = f"{'S' if role == 'server' else 'W'}{self.counts[role]}"
        self.counts[role] += 1
        return node

    def reserve_ids(self, role: str) -> bool:
        """Whether a save must reserve a new block of ids before ``role``'s latest id is
        handed out (then ``ids_saved`` is raised; lower it back if the save fails)."""
        if self.counts[role] <= self.ids_saved[role]:
            return False
        self.ids_saved[role] = self.counts[role] + ID_BLOCK
        return True

    # -- save and load -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "ring": self.ring.to_wire(), "addresses": self.addresses,
            "stable": self.stable.to_wire() if self.stable is not None else None, "rejoined": self.rejoined,
            "abandoned": sorted(self.abandoned),
            # numbers reserved count as handed out: a restart resumes above them
            "counts": {role: max(n, self.ids_saved.get(role, 0)) for role, n in self.counts.items()},
            "tables": [t.to_wire() for t in self.tables.values()],
            "members": [{"node": p.node, "role": p.role, "state": p.state.value, "by": self.registered_by.get(p.node)}
                        for p in self.liveness.peers.values()],
            "worker_clocks": self.worker_clocks,
            "jobs": [dict(asdict(j), shards_done=sorted(j.shards_done), ranks={str(k): v for k, v in j.ranks.items()},
                          progress={str(k): v for k, v in j.progress.items()}) for j in self.jobs.jobs.values()],
            "next_job": self.jobs._next, "next_checkpoint": self.next_checkpoint, "epoch": self.epoch,
        }

    def load(self, state: dict, now: float) -> None:
        """Resume from a saved ``to_dict``; members that were live get a full timeout to
        heartbeat again."""
        self.ring = Assignment.from_wire(state["ring"])
        stable = state.get("stable")  # (older files: none; the ring was final then)
        self.stable = Assignment.from_wire(stable) if stable else self.ring
        self.rejoined = dict(state.get("rejoined") or {})
        self.abandoned = set(state.get("abandoned") or [])
        self.addresses = dict(state["addresses"])
        self.counts = dict(state["counts"])
        for spec in state["tables"]:
            self.tables[spec["name"]] = TableSpec.from_wire(spec)
        for m in state["members"]:
            if m["state"] in (State.ACTIVE.value, State.SUSPECT.value):
                self.liveness.join(m["node"], m["role"], now)
                self.registered_by[m["node"]] = m.get("by")  # the key role that registered it (older files: none)
        self.worker_clocks = {w: int(c) for w, c in state["worker_clocks"].items()}
        for j in state["jobs"]:
            job = Job(**{**j, "ranks": {int(k): v for k, v in j["ranks"].items()},
                         "progress": {int(k): v for k, v in j["progress"].items()},
                         "shards_done": set(j["shards_done"])})
            self.jobs.jobs[job.id] = job
        self.jobs._next = int(state["next_job"])
        self.next_checkpoint = max(self.next_checkpoint, int(state["next_checkpoint"]))
        self.epoch = int(state.get("epoch", 0))

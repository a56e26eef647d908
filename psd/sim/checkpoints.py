"""Checkpoints in the simulation (``Settings.checkpoints``): taken while the workload
runs and faults strike, and checked to be the consistent cut they promise.

An admin asks the scheduler for checkpoints at moments the seed picks (``psd
checkpoint``, with a ``wait`` the seed picks too), and in half the seeds the scheduler's
own timer takes them as well (``checkpoint_interval``). The files are the daemons' own:
the servers' ``Write`` effects and the scheduler's ``Run`` steps (folder, manifest,
LATEST) run their functions, unchanged, into a folder of this run's own that the run
removes; each answer comes back after a delay the seed picks, as from the daemons'
writer threads. Some writes fail (a full disk), and some servers die with their file
written but not yet reported (a server dying mid-cut).

Checked once the run has settled (``check``), for every checkpoint with a manifest:

* its files are those of the manifest, each at the manifest's cut and ring; every range
  of the ring is led by a server that wrote a file, and each key is in the file of its
  range's primary only (every range of every table in it once);
* each workload key's value in it holds exactly the pushes made at worker clocks below
  the cut that were applied: no push at the cut or later, every acked push below it,
  none twice, and none below it that the key's settled copies hold but the checkpoint
  does not (a push below the cut applied after the file was written); a worker that
  registered after the checkpoint began (not among the manifest's workers) pushes
  after it; one that was gone (declared dead) is not checked;

and for all of them: the scheduler wrote a manifest for each checkpoint it counted as
taken and none for one that failed, every admin whose checkpoint succeeded names one
with a manifest, and once the workers have left no server still holds pushes for a cut
(those held by a failed checkpoint were applied: the run's own invariants then check
that none was lost or applied twice). ``Settings.restore`` adds a range that loses its
only copy and is restored from the newest checkpoint (psd.sim.restore).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import msgpack
import numpy as np
import zstandard

from psd.cluster.assignment import Assignment
from psd.codec import Message
from psd.codec.message import error_reply
from psd.config import ClusterConfig
from psd.core.checkpoints import hold_step
from psd.core.effects import Run as RunStep
from psd.core.effects import Write
from psd.errors import PsdError
from psd.sim.nodes import SCHEDULER, SimScheduler, SimServer, _Caller
from psd.sim.restore import RESTORE_AFTER, Restore
from psd.sim.run import _decode
from psd.sim.world import Connection, Process, World
from psd.store.checkpoint import load_server_file, read_server_file

#: seconds a write takes before its answer reaches the core (the daemons' writer thread)
WRITE_TIME = (0.0005, 0.03)
#: one file write in this many fails (the disk is full: the server refuses the cut)
WRITE_FAILS = 12
#: one admin checkpoint in this many has a server die once its file is written, before
#: it reports it (within the run's kill budget)
DIE_MID_CUT = 4


def _scratch() -> str:
    """A folder of this run's own, in memory where the machine has a tmpfs (fsync is
    then free), else in the temp folder."""
    shm = Path("/dev/shm")
    return tempfile.mkdtemp(prefix="psd-sim-ckpt-", dir=str(shm) if shm.is_dir() else None)


class SimAdmin(Process):
    """An operator's ``psd checkpoint``: asks the scheduler, records the answer."""

    name = "admin"

    def __init__(self, world: World):
        self.world = world
        self.caller = _Caller()

    def deliver(self, conn: Connection, msg: Message) -> None:
        self.caller.answered(msg)

    def checkpoint(self, wait: float, answered) -> None:
        self.caller.request(self.world, self.world.connect(self.name, SCHEDULER), self.name,
                            Message("checkpoint", meta={"wait": wait}), answered, "admin")


class Checkpoints:
    """The checkpoints of one run: the files port of its servers and scheduler, the
    admin, and the checks."""

    def __init__(self, run):
        self.run = run
        self.world: World = run.world
        self.root = Path(_scratch())
        self.admin = SimAdmin(self.world)
        self.asked = 0
        self.answers: list[dict] = []   # the admin's: {"ok": bool, "id"/"error": ...}
        self.interval = 0.0
        self.killed_mid_cut = 0
        self.write_failures = 0
        self._die_at_write: str | None = None  # the process armed to die once its file is written
        #: server process -> (since when it holds every push with no cut, its last step)
        self._holding: dict[str, tuple[float, float]] = {}
        self._hold_flagged: set[str] = set()
        #: ``Settings.restore``: a range's only copy lost, then restored (psd.sim.restore)
        self.restore_check = Restore(run, self) if run.s.restore else None
        #: checkpoint folder -> the workers registered when it began (its first step)
        self.known_at_start: dict[str, set[str]] = {}
        self.began: dict[str, float] = {}  # checkpoint folder -> when it began

    def configure(self, config: ClusterConfig) -> ClusterConfig:
        """The run's config, with checkpoints into this run's folder (and, in half the
        seeds, the scheduler's timer); no restore of ranges that lost every copy."""
        rng = self.run.rng
        self.interval = rng.choice((0.0, rng.uniform(0.15, 0.4)))
        return dataclasses.replace(config, checkpoint_dir=str(self.root), checkpoint_interval=self.interval,
                                   restore_unavailable_after=RESTORE_AFTER if self.restore_check else 0)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- asking for checkpoints ---------------------------------------------------------
    def plan(self) -> None:
        """The admin's asks: one to three, at moments of the workload the seed picks
        (faults may be under way then), each waiting ``wait`` seconds for the workers."""
        rng, pace = self.run.rng, self.run.pace
        self.world.add(self.admin)
        if self.restore_check is not None:
            self.restore_check.plan()
        for _ in range(rng.randint(1, 3)):
            at = rng.uniform(pace.start + 0.05, pace.duration)
            wait = rng.uniform(0.2, 2.0)
            die = rng.randrange(DIE_MID_CUT) == 0
            self.world.at(at, lambda wait=wait, die=die: self._ask(wait, die), None)

    def _ask(self, wait: float, die: bool) -> None:
        self.asked += 1
        self.run.outcome.faults.append(f"checkpoint@{self.world.now:.2f}")
        if die and self._die_at_write is None:
            live = [s for s in self.run.servers if s.alive and s.name in self.world.processes]
            if self.run.killed < self.run.s.replication - 1 and len(live) > 1:
                self.run.killed += 1
                self._die_at_write = self.run.rng.choice(live).name

        def answered(reply: Message) -> None:
            if reply.op == "ok":
                self.answers.append({"ok": True, "id": reply.meta["id"], "cut": reply.meta["cut"]})
            else:
                self.answers.append({"ok": False, "error": reply.meta.get("message", reply.meta)})
        self.admin.checkpoint(wait, answered)

    def hold_bound(self) -> float:
        """How long a server may hold every push for a checkpoint whose cut has not come:
        the hold's bound (twice the scheduler's hold step, itself the failure detector's
        dead time at most), plus a tick and a message's way."""
        return 2 * hold_step(self.run.config) + 0.1

    def watch_hold(self, srv: SimServer) -> None:
        """After each step of a server: pushes stay acknowledged and unreadable for a
        checkpoint's hold (phase 1, no cut yet) no longer than ``hold_bound``, counting only
        the time the server ran (a stalled one handles nothing, and lets go when it runs:
        a gap between its steps longer than three of its 0.05 s ticks is a stall). A hold
        or a cut lost with a connection used to hold them for ``request_timeout``."""
        now, core, name = self.world.now, srv.core, srv.name
        if core._checkpoint is not None or not any(p.cut is not None for p in core.gate.policies.values()):
            self._holding.pop(name, None)
            return
        since, last = self._holding.get(name, (now, now))
        if now - last > 0.15:
            since += now - last
        self._holding[name] = (since, now)
        if now - since > self.hold_bound() and name not in self._hold_flagged:
            self._hold_flagged.add(name)
            self.run.violate(f"{core.node_id} held every push for a checkpoint {now - since:.2f} s with no cut "
                             f"(bound {self.hold_bound():.2f} s)")

    def workload_over(self, settle: float) -> float:
        """The workload stopped: so does the scheduler's timer (its workers no longer
        clock, so a cut above their clocks would wait for them to leave). Returns how long
        the run may settle: long enough for a checkpoint whose request was lost with a
        connection to fail (``request_timeout``) and release what it held."""
        self.run.scheduler.core._next_checkpoint = None
        return max(settle, self.run.config.request_timeout + 2.0)

    def running(self) -> int:
        """Checkpoints the scheduler started and has not yet counted taken or failed."""
        c = self.run.scheduler.core
        return c.state.next_checkpoint - 1 - c.checkpoints.taken - c.checkpoints.failed

    def restore(self, server: SimServer, conn: Connection, msg: Message) -> None:
        """The scheduler's ``restore``: read the files as the daemon does, then the core
        loads the ranges it was given."""
        try:
            folder = Path(msg.meta["folder"])
            files = [load_server_file(folder / name) for name in msg.meta["files"]]
        except Exception as err:  # noqa: BLE001 - answered, as the daemon does
            self.world.send(conn, server.name, error_reply(msg, PsdError(str(err)), server.core.node_id))
            return
        server._execute(server.core.restore(msg, files, self.world.now))

    # -- the files port (SimServer.files, SimScheduler.files) ---------------------------------
    def write(self, server: SimServer, effect: Write) -> None:
        """A server's checkpoint file: written now (its content was taken at the cut),
        answered after the seed's delay; or the write fails; or the server dies with its
        file written, before it answers."""
        rng, world = self.run.rng, self.world
        result, error = None, None
        if rng.randrange(WRITE_FAILS) == 0:
            self.write_failures += 1
            error = OSError(28, f"No space left on device (simulated): {effect.path}")
        else:
            result = effect.write()
        if self._die_at_write == server.name:
            self._die_at_write = None
            self.killed_mid_cut += 1
            self.run.outcome.faults.append(f"died mid-cut@{world.now:.2f}")
            world.kill(server.name)
            server.alive = False
            world.after(rng.uniform(*self.run.pace.restart), self.run.add_server, None)
            return

        def answer() -> None:
            server._execute(server.core.written(effect.token, result, error, world.now))
        world.after(rng.uniform(*WRITE_TIME), answer, server.name)

    def run_step(self, scheduler: SimScheduler, effect: RunStep) -> None:
        """A step of the scheduler's procedure (a folder, a manifest): run now, answered
        after the seed's delay."""
        world = self.world
        result, error = None, None
        if effect.what.startswith("mkdir "):
            name = Path(effect.what[6:]).name
            self.known_at_start[name] = {w.core.node_id for w in self.run.workers if w.ready}
            self.began[name] = world.now
        try:
            result = effect.fn()
        except Exception as err:  # noqa: BLE001 - handed to the procedure, as the daemon does
            error = err

        def answer() -> None:
            scheduler._execute(scheduler.core.answered(effect.token, result, error, world.now))
        world.after(self.run.rng.uniform(*WRITE_TIME), answer, scheduler.name)

    # -- the checks -----------------------------------------------------------------------
    def manifests(self) -> dict[int, tuple[Path, dict]]:
        out = {}
        for folder in sorted(self.root.glob("ckpt-*")):
            path = folder / "MANIFEST.json"
            if path.exists():
                manifest = json.loads(path.read_text())
                out[int(manifest["id"])] = (folder, manifest)
        return out

    def check(self) -> dict:
        """Every invariant above; returns the counts (``Outcome.checkpoints``)."""
        run, violate = self.run, self.run.violate
        core = run.scheduler.core
        taken, failed = core.checkpoints.taken, core.checkpoints.failed
        manifests = self.manifests()
        running = self.running()  # (a manifest written, not yet answered)
        if not taken <= len(manifests) <= taken + running:
            violate(f"checkpoints: the scheduler took {taken} ({failed} failed, {running} still running), but "
                    f"{len(manifests)} have a manifest ({sorted(manifests)})")
        for answer in self.answers:
            if answer["ok"] and answer["id"] not in manifests:
                violate(f"checkpoint {answer['id']} was reported taken, but has no manifest")
        refused = sum(not a["ok"] for a in self.answers)
        if refused > failed:
            violate(f"checkpoints: the admin was refused {refused} time(s), the scheduler counts {failed} failed")
        if manifests:
            latest = (self.root / "LATEST").read_text().strip()
            if latest != manifests[max(manifests)][0].name:
                violate(f"checkpoints: LATEST names {latest}, the newest with a manifest is "
                        f"{manifests[max(manifests)][0].name}")
        final = self._settled_values()
        for ckpt_id, (folder, manifest) in manifests.items():
            self._check_one(ckpt_id, folder, manifest, final)
        if running == 0:  # (the timer may have started one as the run ended)
            self._check_released()
        counts = {"asked": self.asked, "taken": taken, "failed": failed, "periodic": int(self.interval > 0),
                  "killed mid-cut": self.killed_mid_cut, "write failures": self.write_failures,
                  "keys checked": self._keys_checked}
        if self.restore_check is not None:
            counts.update(self.restore_check.check(final))
        return counts

    def before_end(self) -> None:
        """Before the run's own checks: the pushes a lost copy may take with it."""
        if self.restore_check is not None:
            self.restore_check.allow_lost()

    _keys_checked = 0

    def _check_one(self, ckpt_id: int, folder: Path, manifest: dict, final: dict[int, int]) -> None:
        run, violate = self.run, self.run.violate
        cut = int(manifest["cut"])
        ring = Assignment.from_wire(manifest["ring"])
        name = f"checkpoint {ckpt_id} (cut at clock {cut}, ring v{ring.version})"
        values: dict[int, int] = {}
        writers: set[str] = set()
        for file in manifest["files"]:
            path = folder / file
            body = read_server_file(path)
            node = path.stem
            if node in writers:
                violate(f"{name}: {node} wrote two files")
            writers.add(node)
            for tname, (_spec, keys, vals, _state) in body.items():
                if tname != run.table.name:
                    continue
                for k, v in zip(keys.tolist(), vals[:, 0].tolist()):
                    owners = ring.owners_at(k)
                    if not owners or owners[0] != node:
                        violate(f"{name}: key {k} is in {node}'s file, but the ring gives it to "
                                f"{owners[0] if owners else 'nobody'}")
                    if k in values:
                        violate(f"{name}: key {k} is in two files")
                    values[k] = v
        _check_header(self, name, folder, manifest)
        leaders = {owners[0] for owners in ring.owners if owners}
        if leaders - writers:
            violate(f"{name}: no file from {sorted(leaders - writers)}, which lead ranges of its ring")
        if run.s.bounded:  # (evictions: a row's pushes are not all in its value)
            return
        pushes: dict[int, list] = {}
        covered = set(manifest.get("workers", ()))
        known = self.known_at_start.get(folder.name, set())
        for p in run.pushes:
            worker = run.workers[p.worker].core.node_id
            if worker in covered:
                clock = p.clock
            elif worker not in known:  # (registered after it began: every push after it)
                clock = cut
            else:  # (gone when it began: its pushes went through before it, or after)
                continue
            for k, slot in zip(p.keys.tolist(), p.slots):
                pushes.setdefault(k, []).append((slot, clock, p.outcome))
        for k, made in pushes.items():
            self._keys_checked += 1
            held, doubled = _decode(values.get(k, 0))
            below = {s for s, clock, _ in made if clock < cut}
            clock_of = {s: clock for s, clock, _ in made}
            if doubled:
                violate(f"{name}: key {k} holds push slot(s) {sorted(doubled)} twice")
            late = held - below
            if late:
                violate(f"{name}: key {k} holds push slot(s) {sorted(late)} made at clock(s) "
                        f"{sorted({clock_of.get(s, -1) for s in late})}, not below the cut")
            missed = {s for s, clock, outcome in made if clock < cut and outcome == "acked"} - held
            if self.restore_check is not None and self.began.get(folder.name, 0.0) > self.restore_check.lost_at:
                missed -= run.lost_ok.get(k, set())
            if missed:
                violate(f"{name}: key {k} misses acked push slot(s) {sorted(missed)} made at clock(s) "
                        f"{sorted({clock_of[s] for s in missed})}, below the cut")
            settled = final.get(k)
            if settled is not None:
                after = (_decode(settled)[0] & below) - held - missed
                if after:
                    violate(f"{name}: key {k}: push slot(s) {sorted(after)} made at clock(s) "
                            f"{sorted({clock_of[s] for s in after})} below the cut were applied after it "
                            f"was written")

    def _settled_values(self) -> dict[int, int]:
        """Each workload key's value on its first live owner at the end (None where no
        live owner holds it settled: then only the checkpoint's own checks apply)."""
        run = self.run
        ring = run.scheduler.core.state.ring
        servers = {s.core.node_id: s for s in run.servers if s.alive and s.name in self.world.processes}
        out = {}
        for k in run.workload_keys():
            for node in ring.owners_at(k):
                srv = servers.get(node)
                table = srv.core.tables.get(run.table.name) if srv is not None else None
                if table is None or any(r.begin <= k < r.end for r in srv.core.incoming):
                    continue
                out[k] = int(table.pull(np.array([k], np.uint64))[0, 0])
                break
        return out

    def _check_released(self) -> None:
        """Once every worker has left and no checkpoint runs, no server holds pushes for a
        checkpoint's cut."""
        if any(w.alive for w in self.run.workers):
            return
        for srv in self.run.servers:
            if not srv.alive or srv.name not in self.world.processes:
                continue
            gate = srv.core.gate
            stuck = [p for p in gate.policies.values() if p.cut is not None or p._past_cut]
            if stuck:
                self.run.violate(f"{srv.core.node_id} still holds pushes for a checkpoint cut at the end "
                                 f"(cut {stuck[0].cut}, {len(stuck[0]._past_cut)} held)")


def _check_header(ck: Checkpoints, name: str, folder: Path, manifest: dict) -> None:
    """Each file names the manifest's cut and ring (read from its header)."""
    for file in manifest["files"]:
        body = msgpack.unpackb(zstandard.ZstdDecompressor().decompress((folder / file).read_bytes()), raw=False)
        ring = Assignment.from_wire(manifest["ring"]).version
        if body["cut"] != manifest["cut"] or body["ring"] != ring or body["node"] != Path(file).stem:
            ck.run.violate(f"{name}: {file} says node {body['node']}, cut {body['cut']}, ring v{body['ring']}; "
                           f"the manifest: cut {manifest['cut']}, ring v{ring}")

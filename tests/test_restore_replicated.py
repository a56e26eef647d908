"""A restore onto several copies serves a range only once every copy has loaded it
(decision 156): the scheduler's ``restore`` carries ``meta.hold`` (load, keep refusing),
then a ``restore`` with ``meta.open`` and no files serves the ranges everywhere.
``ServerCore``s driven by hand: no sockets, no clock.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range, range_to_wire
from psd.codec import Message
from psd.config import ClusterConfig
from psd.core.effects import Ask, Refuse, Reply
from psd.core.procedures import Calls
from psd.core.scheduler import SchedulerCore
from psd.core.server import ServerCore
from psd.schema import TableSpec

SPEC = TableSpec("t", 1, "int64")
KEYS = np.array([10, 20], np.uint64)
WHOLE = Range(0, KEY_SPACE_END)
RING = Assignment(version=1, ranges=(WHOLE,), owners=(("S0", "S1"),),
                  addresses={"S0": "tcp://S0", "S1": "tcp://S1"})


def _core(node: str) -> ServerCore:
    core = ServerCore(ClusterConfig(security="none", replication=2), secure=False)
    core.node_id = node
    core.ring = RING
    core._create(SPEC)
    core.fence.confirmed(0.0)
    core.fence.heard("S1" if node == "S0" else "S0", 0.0)
    return core


def _restore(core: ServerCore, meta: dict, files: list, now: float) -> list:
    return core.restore(Message("restore", id=200, meta={"ranges": [range_to_wire(WHOLE)], **meta}), files, now)


def _push(core: ServerCore, rid: int, now: float) -> list:
    return core.handle(None, Message("push", id=rid, sender="W0", table="t", clock=0, meta={"rid": rid},
                                     arrays=[KEYS, np.full((KEYS.size, 1), 5, np.int64)]), now)


def _ops(effects: list) -> list[str]:
    return [e.msg.op for e in effects if isinstance(e, Reply)] + [e.error.code for e in effects
                                                                  if isinstance(e, Refuse)]


def _given_to_restore(node: str) -> ServerCore:
    """A copy of a range given to it empty, to be restored (the ring said so)."""
    core = _core(node)
    core.restoring = [WHOLE]
    return core


def _forwarded(effects: list) -> bool:
    """Whether the primary applied a push and forwarded it to its replica."""
    return any(isinstance(e, Ask) and e.msg.op == "replicate" for e in effects)


def test_a_loaded_copy_keeps_refusing_its_range_until_the_scheduler_opens_it():
    primary = _given_to_restore("S0")
    assert _ops(_restore(primary, {"folder": "/ck", "files": [], "hold": True}, [], 0.1)) == ["ok"]
    assert _ops(_push(primary, 1, 0.2)) == ["unavailable"]  # the replica may not have loaded yet
    assert _ops(_restore(primary, {"folder": "/ck", "files": [], "open": True}, [], 0.3)) == ["ok"]
    assert primary.restoring == []
    assert _forwarded(_push(primary, 2, 0.4))


def test_an_older_schedulers_restore_serves_the_range_once_loaded():
    core = _given_to_restore("S0")
    assert _ops(_restore(core, {"folder": "/ck", "files": []}, [], 0.1)) == ["ok"]
    assert core.restoring == [] and _forwarded(_push(core, 1, 0.2))


def _scheduler() -> SchedulerCore:
    core = SchedulerCore(ClusterConfig(security="none", replication=2, checkpoint_dir="/ck",
                                       restore_unavailable_after=1.0), secure=False, now=0.0)
    for node in ("S0", "S1"):
        core.state.liveness.join(node, "server", 0.0)
    core.ring_changes.restoring = [WHOLE]
    return core


def _answer(calls: Calls, *errors: str) -> list:
    """Each ask's answer: ok, or an error from the nodes named."""
    return [Message("error", sender=n, meta={"code": "unavailable", "message": "disk"}) if n in errors
            else m.reply(meta={"keys": 2}) for n, m in calls.asks]


def test_the_scheduler_opens_the_restored_ranges_only_once_every_server_loaded_them():
    core = _scheduler()
    steps = core._restore_pieces(Path("/ck/ckpt-000001"), {"files": ["S0.psd"]}, ["S9"], 1.0)
    load = next(steps)
    assert sorted(n for n, _ in load.asks) == ["S0", "S1"]
    assert all(m.op == "restore" and m.meta["hold"] and m.meta["files"] == ["S0.psd"] for _, m in load.asks)
    opening = steps.send(_answer(load))
    assert core.ring_changes.restoring == []  # (rings no longer say to refuse them)
    assert sorted(n for n, _ in opening.asks) == ["S0", "S1"]
    assert all(m.op == "restore" and m.meta["open"] and m.meta["files"] == [] for _, m in opening.asks)
    try:
        steps.send(_answer(opening))
    except StopIteration:
        pass
    assert len(core.restored) == 1 and core.restored[0]["keys"] == 4


def test_a_load_that_failed_somewhere_opens_nothing_and_is_tried_again_everywhere():
    core = _scheduler()
    steps = core._restore_pieces(Path("/ck/ckpt-000001"), {"files": ["S0.psd"]}, ["S9"], 1.0)
    load = next(steps)
    try:
        steps.send(_answer(load, "S1"))
        raise AssertionError("opened after a failed load")
    except StopIteration:
        pass
    assert core.ring_changes.restoring == [WHOLE] and core.restored == []
    core._watch_orphans(2.0)  # (no range without a live copy: only the failed pieces)
    assert core._restoring_orphans  # the retry started: it loads on every server again


def test_a_server_that_missed_the_open_is_asked_again():
    core = _scheduler()
    steps = core._restore_pieces(Path("/ck/ckpt-000001"), {"files": ["S0.psd"]}, ["S9"], 1.0)
    opening = steps.send(_answer(next(steps)))
    pause = steps.send(_answer(opening, "S1"))
    again = next(steps) if not isinstance(pause, Calls) else pause
    assert [n for n, _ in again.asks] == ["S1"] and again.asks[0][1].meta["open"]


def test_real_daemons_restore_a_range_onto_two_copies_and_serve_it(tmp_path):
    """Both servers of a range die; the scheduler restores it onto two others, in the
    two steps, and serves it: the checkpoint's push, not the one after, then new ones."""
    import psd
    from psd.client import admin
    from conftest import wait_for
    with psd.LocalCluster(servers=4, replication=2, security="none", checkpoint_dir=str(tmp_path),
                          heartbeat_interval=0.1, restore_unavailable_after=0.5) as cluster:
        first = cluster.status()["ranges"][0]
        keys = np.array([first["last"]], np.uint64)
        with psd.connect(cluster.scheduler) as kv:
            table = kv.table("t", dtype="int64")
            kv.wait(table.push(keys, np.ones((1, 1), np.int64)))  # (applied: the cut counts it)
            kv.clock()
            assert admin.call(cluster.scheduler, "checkpoint", timeout=30)["cut"] == 1
            table.push(keys, np.full((1, 1), 2, np.int64))  # lost with both copies
            table.pull(keys)
            victims = [cluster.server(node) for node in first["owners"]]
            for child in victims:
                child.proc.kill()
            wait_for(lambda: cluster.status()["restored"], 30, "the restore")
            assert table.pull(keys).ravel().tolist() == [1]
            table.push(keys, np.full((1, 1), 4, np.int64))
            assert table.pull(keys).ravel().tolist() == [5]
            owners = next(r["owners"] for r in cluster.status()["ranges"] if r["begin"] <= keys[0] <= r["last"])
            assert len(owners) == 2 and not set(owners) & set(first["owners"])

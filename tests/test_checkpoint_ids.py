"""A checkpoint file carries the request ids of exactly the pushes it holds, and a restore
installs them with the rows (decision 154): a push the checkpoint holds whose answer was
lost is not applied again when its worker resends it after the restore; one it lacks is
applied once. ``ServerCore``s driven by hand: no sockets, no clock.
"""
from __future__ import annotations

import logging
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.codec import Message
from psd.core.effects import Reply, Write
from psd.core.seen import ids_of_arrays
from psd.core.server import ServerCore
from psd.errors import ConfigError
from psd.schema import TableSpec
from psd.store.checkpoint import load_server_file, write_server_file

from servercores import lone_server

SPEC = TableSpec("t", 1, "int64")
KEYS = np.array([10, 20], np.uint64)


def _core() -> ServerCore:
    return lone_server(SPEC)


def _push(core: ServerCore, rid: int, clock: int, value: int, now: float, sender: str = "W0",
          once: list | None = None) -> list:
    meta = {"rid": rid} if once is None else {"rid": rid, "once": once}
    out = core.handle(None, Message("push", id=rid, sender=sender, table="t", clock=clock, meta=meta,
                                    arrays=[KEYS, np.full((KEYS.size, 1), value, np.int64)]), now)
    assert [e.msg.op for e in out if isinstance(e, Reply)] == ["ok"]
    return out


def _values(core: ServerCore) -> list[int]:
    return core.tables["t"].pull(KEYS).ravel().tolist()


def _checkpoint(tmp_path: Path, once: bool = False) -> Path:
    """A server's file for a checkpoint cut at clock 1 that holds W0's push 1 (clock 0,
    applied before the hold) and not its push 2 (clock 1: held by the cut, acknowledged
    before the file was written, applied after it); ``once``: a job's pushes, steps 1
    and 2 of shard J/0."""
    core = _core()
    _push(core, 1, 0, 1, 0.1, once=["J/0", 1] if once else None)
    core.control(Message("ckpt_hold", id=100, meta={"within": 10.0}), 0.2)
    _push(core, 2, 1, 2, 0.3, once=["J/0", 2] if once else None)
    core.control(Message("ckpt_cut", id=101, meta={"cut": 1, "workers": ["W0"], "folder": str(tmp_path),
                                                   "timeout": 5}), 0.4)
    out = core.handle(None, Message("clock", id=102, sender="W0", clock=1, meta={"clock": 1}), 0.5)
    writes = [e for e in out if isinstance(e, Write)]
    assert len(writes) == 1
    core.written(writes[0].token, writes[0].write(), None, 0.6)
    assert _values(core) == [3, 3]  # (the held push went through after the snapshot)
    return Path(writes[0].path)


def _restored(path: Path) -> ServerCore:
    core = _core()
    core.restore(Message("restore", id=200, meta={"folder": str(path.parent)}), [load_server_file(path)], 1.0)
    assert _values(core) == [1, 1]
    return core


def test_a_resent_push_the_checkpoint_holds_is_not_applied_again_and_one_it_lacks_is(tmp_path):
    core = _restored(_checkpoint(tmp_path))
    _push(core, 1, 0, 1, 1.1)  # in the checkpoint: its answer was lost, its worker resends it
    assert _values(core) == [1, 1]
    _push(core, 2, 1, 2, 1.2)  # acked before the file was written, but not in it
    assert _values(core) == [3, 3]
    _push(core, 2, 1, 2, 1.3)  # and from now on a resend of it is one
    assert _values(core) == [3, 3]


def test_the_file_names_the_pushes_it_holds_for_the_ranges_its_server_led(tmp_path):
    from psd.core.seen import ids_of_arrays
    ids = load_server_file(_checkpoint(tmp_path)).ids
    assert [(g.ranges, list(ids_of_arrays(g.senders, g.counts, g.rids))) for g in ids] == [
        (((0, KEY_SPACE_END),), [("W0", 1)])]


def test_a_restore_replaces_the_ids_a_copy_brought_for_its_range(tmp_path):
    """A copy of the range brought push 2's id (its source had applied it); the restore
    replaces the range's rows with the checkpoint's, which lack it: its resend applies."""
    path = _checkpoint(tmp_path)
    core = _core()
    core.partly.note_copy(Range(0, KEY_SPACE_END), ["W0"], np.array([1], np.uint64), np.array([2], np.uint64))
    core.restore(Message("restore", id=200, meta={"folder": str(tmp_path)}), [load_server_file(path)], 1.0)
    _push(core, 2, 1, 2, 1.1)
    assert _values(core) == [3, 3]
    _push(core, 1, 0, 1, 1.2)
    assert _values(core) == [3, 3]


def test_an_older_file_without_ids_still_loads_and_says_exactly_once_is_not_kept(tmp_path, caplog):
    path = _checkpoint(tmp_path)
    body = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(path.read_bytes()), raw=False)
    del body["ids"]  # as psd wrote files before decision 154
    path.write_bytes(zstandard.ZstdCompressor().compress(msgpack.packb(body, use_bin_type=True)))
    assert load_server_file(path).ids is None
    with caplog.at_level(logging.WARNING, logger="psd.server"):
        core = _restored(path)
    assert any("without request ids" in r.getMessage() for r in caplog.records)
    _push(core, 1, 0, 1, 1.1)  # as before: applied again
    assert _values(core) == [2, 2]


def test_a_restore_replaces_the_ids_of_pushes_the_server_applied_to_those_rows_itself(tmp_path):
    """The restoring server applied push 2 (after the cut) itself, holding the rows then:
    once key 10 is restored without it, a resend applies it to key 10, and only there."""
    from psd.cluster.ranges import range_to_wire
    path = _checkpoint(tmp_path)
    core = _core()
    _push(core, 2, 1, 2, 0.1)
    core.restore(Message("restore", id=200, meta={"folder": str(tmp_path), "ranges": [range_to_wire(Range(0, 16))]}),
                 [load_server_file(path)], 1.0)
    assert _values(core) == [1, 2]
    _push(core, 2, 1, 2, 1.1)
    assert _values(core) == [3, 2]
    _push(core, 2, 1, 2, 1.2)
    assert _values(core) == [3, 2]


def test_a_shard_run_again_after_a_restore_applies_only_the_steps_the_checkpoint_lacks(tmp_path):
    """A job's pushes carry a sender-free identity (``meta.once``): a shard run again by
    another worker after the restore applies step 2 (after the cut), not step 1."""
    core = _restored(_checkpoint(tmp_path, once=True))
    _push(core, 51, 0, 1, 1.1, sender="W1", once=["J/0", 1])
    assert _values(core) == [1, 1]
    _push(core, 52, 1, 2, 1.2, sender="W1", once=["J/0", 2])
    assert _values(core) == [3, 3]


def test_a_restore_replaces_the_steps_the_server_applied_to_those_rows_itself(tmp_path):
    from psd.cluster.ranges import range_to_wire
    path = _checkpoint(tmp_path, once=True)
    core = _core()
    _push(core, 2, 1, 2, 0.1, once=["J/0", 2])
    core.restore(Message("restore", id=200, meta={"folder": str(tmp_path), "ranges": [range_to_wire(Range(0, 16))]}),
                 [load_server_file(path)], 1.0)
    assert _values(core) == [1, 2]
    _push(core, 52, 1, 2, 1.1, sender="W1", once=["J/0", 2])  # the shard run again
    assert _values(core) == [3, 2]


def test_a_restore_keeps_every_sources_window_of_a_senders_ids():
    """Each source of a sender's ids (each file's group, the restorer's own) may hold a
    full window of recent ids: none pushes another's out."""
    from psd.core.seen import PartlyApplied, Seen
    seen, partly = Seen(window=4), PartlyApplied(window=4)
    for rid in range(10, 14):
        seen.add("W0", rid)
    everywhere = (Range(0, KEY_SPACE_END),)
    partly.replace(seen, [Range(0, 100)], [(everywhere, [("W0", [5])]), (everywhere, [("W0", [1, 2, 3, 4])])])
    assert [partly.applied_in("W0", rid) for rid in (5, 1, 4)] == [[Range(0, 100)]] * 3
    assert [partly.applied_in("W0", rid) for rid in (10, 13)] == [[Range(100, KEY_SPACE_END)]] * 2
    assert ("W0", 10) not in seen


def test_a_push_in_one_file_is_not_applied_again_when_another_holds_a_full_window(tmp_path):
    """Two servers' files restored onto one: W0's push 5 in S0's file still counts though
    S1's file holds a full window of W0's later ids."""
    mid = 1 << 63
    two = Assignment(version=1, ranges=(Range(0, mid), Range(mid, KEY_SPACE_END)), owners=(("S0",), ("S1",)),
                     addresses={"S0": "tcp://S0", "S1": "tcp://S1"})
    paths = []
    for name in ("S0", "S1"):
        core = _core()
        core.node_id, core.ring = name, two
        core.seen.window = 4
        if name == "S0":
            _push(core, 5, 0, 1, 0.1)
        else:
            for rid in range(100, 104):
                core.seen.add("W0", rid)
        tables, _ = core._checkpoint_tables()
        paths.append(tmp_path / f"{name}.psd")
        write_server_file(paths[-1], name, 1, 1, tables, core._checkpoint_ids(two.led_by(name)))
    core = _core()
    core.partly.window = 4
    core.restore(Message("restore", id=200, meta={"folder": str(tmp_path)}), [load_server_file(p) for p in paths], 1.0)
    assert _values(core) == [1, 1]
    _push(core, 5, 0, 1, 1.1)  # its answer was lost: resent
    assert _values(core) == [1, 1]


def _rewritten(path: Path, change) -> Path:
    body = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(path.read_bytes()), raw=False)
    change(body)
    path.write_bytes(zstandard.ZstdCompressor().compress(msgpack.packb(body, use_bin_type=True)))
    return path


def _set(key: str, value):
    return lambda body: body["ids"][0].__setitem__(key, value)


@pytest.mark.parametrize("change, what", [
    (lambda body: body["ids"].append({**body["ids"][0], "counts": np.array([3], "<u8").tobytes()}), "counts"),
    (_set("ranges", [[5, 2]]), "ranges"),
    (_set("ranges", [[-1, 3]]), "ranges"),
    (_set("senders", [12345]), "senders"),
    (_set("rids", b"\0" * 12), "bytes"),
    (_set("counts", np.array([2], "<u8").tobytes()), "counts"),
    (lambda body: body["ids"][0].pop("senders"), "map"),
    (lambda body: body.__setitem__("ids", {}), "list"),
])
def test_a_file_with_malformed_ids_is_refused_whole_when_read(tmp_path, change, what):
    """Checked at load, before a restore installs anything: found while installing the
    ids, after the rows, it left a restore half done (or, for a sender not a string,
    broke every later ``drop_tables``)."""
    path = _rewritten(_checkpoint(tmp_path), change)
    with pytest.raises(ConfigError, match=f"{path}.*{what}"):
        load_server_file(path)


def test_a_push_a_copy_brought_still_kept_is_left_out_of_the_receivers_snapshot():
    """A range copy carries the pushes its source keeps for the clock boundary, and the
    ids its source noted for them on arrival: the receiver's snapshot, taken while one
    is still kept, names its id only once it is applied (before, without the push's ids
    on the copy, it named it: after a restore its resend was dropped, an acked push lost)."""
    from psd.cluster.ranges import range_to_wire
    from psd.core.effects import Ask
    spec = TableSpec("q", 1, "int64", "sum", {"consistency": "sequential"})
    a = Range(0, 1000)
    s0, s1 = _core(), _core()
    s1.node_id = "S1"
    for core in (s0, s1):
        core._create(spec)
        for worker in ("W0", "W1"):
            core.handle(None, Message("clock", id=1, sender=worker, clock=0, meta={"clock": 0}), 0.05)
    s0.handle(None, Message("push", id=7, sender="W0", table="q", clock=0, meta={"rid": 7},
                            arrays=[np.array([10], np.uint64), np.ones((1, 1), np.int64)]), 0.1)
    assert len(s0.gate.kept()) == 1
    out = s0.control(Message("transfer", id=8, meta={"range": range_to_wire(a), "dst": "S1", "address": "tcp://S1"}),
                     0.2)
    for ask in [e for e in out if isinstance(e, Ask)]:
        ask.msg.sender = "S0"
        assert type(s1.handle(None, ask.msg, 0.3)[-1]) is Reply
    assert [k.ids for _c, k in s1.gate.kept()] == [(("W0", 7),)]
    assert ("W0", 7) not in set(ids_of_arrays(*_named(s1._checkpoint_ids([a]))))
    for worker in ("W0", "W1"):  # the clock boundary: the kept push is applied
        s1.handle(None, Message("clock", id=2, sender=worker, clock=1, meta={"clock": 1}), 0.4)
    assert s1.tables["q"].pull(np.array([10], np.uint64)).ravel().tolist() == [1]
    assert ("W0", 7) in set(ids_of_arrays(*_named(s1._checkpoint_ids([a]))))


def _named(groups) -> tuple:
    """Every id of a snapshot's groups, in the frame form."""
    return ([s for g in groups for s in g.senders], np.concatenate([g.counts for g in groups]),
            np.concatenate([g.rids for g in groups]))


def test_a_copy_after_a_restore_carries_each_sources_ids_for_its_rows():
    """A restore keeps each source's ids whole, as arrays for its ranges (a copy or a
    snapshot then takes them without a step per id): a copy of a range outside the
    restored one carries the restorer's own ids, one inside the file's."""
    from psd.core.seen import PartlyApplied, Seen
    seen, partly = Seen(window=4), PartlyApplied(window=4)
    for rid in (10, 11):
        seen.add("W0", rid)
    partly.note_ranges("W1", 3, (Range(0, 50), Range(200, 300)))
    partly.replace(seen, [Range(0, 100)], [((Range(0, KEY_SPACE_END),), [("W0", np.array([5, 6], np.uint64))])])
    core = _core()
    core.seen, core.partly = seen, partly
    seen.add("W0", 12)
    assert list(ids_of_arrays(*core._seen_for_copy(Range(100, 200)))) == [("W0", 12), ("W0", 10), ("W0", 11)]
    assert list(ids_of_arrays(*core._seen_for_copy(Range(0, 100)))) == [("W0", 12), ("W0", 5), ("W0", 6)]
    assert list(ids_of_arrays(*core._seen_for_copy(Range(250, 260)))) == [("W0", 12), ("W0", 10), ("W0", 11),
                                                                         ("W1", 3)]


def test_a_senders_restored_ids_are_forgotten_once_it_sent_a_window_of_newer_ones():
    from psd.core.seen import PartlyApplied, Seen
    seen, partly = Seen(window=4), PartlyApplied(window=4)
    partly.replace(seen, [Range(0, 100)], [((Range(0, KEY_SPACE_END),), [("W0", [5]), ("W1", [5])])])
    for rid in range(10, 14):
        seen.add("W0", rid)
    partly.age(seen)
    assert partly.applied_in("W0", 5) == [] and partly.applied_in("W1", 5) == [Range(0, 100)]


@pytest.mark.parametrize("ids", [[["W0"]], [[7, 1]], [["W0", -1]], "W0/7"])
def test_a_kept_push_with_malformed_ids_is_refused_whole(ids):
    from psd.cluster.ranges import range_to_wire
    from psd.core.effects import Refuse
    from psd.errors import ProtocolError
    core = _core()
    msg = Message("install", id=9, sender="S1", table="t", ring=1,
                  meta={"range": range_to_wire(Range(0, 1000)), "copy": "S1.1", "kept": 0, "origin": "W0", "ids": ids},
                  arrays=[np.array([10], np.uint64), np.ones((1, 1), np.int64)])
    out = core.handle(None, msg, 0.1)
    assert type(out[-1]) is Refuse and isinstance(out[-1].error, ProtocolError) and "meta.ids" in str(out[-1].error)

"""The blocking client's small pull (psd/client/small_pull.py) against real daemons.

A pull of a few keys in one range goes as one message to that range's primary; every
other pull, and every small pull that gets no plain answer, goes the general way. The
tests check both routes read what was pushed, that the small route was really taken
(or really left), and that a small pull to a server SIGKILLed a moment ago still gets
the right values from its replica.
"""
from __future__ import annotations

import signal
import threading
import time
from bisect import bisect_right

import numpy as np
import pytest

import psd
from psd.client import admin, small_pull
from psd.schema import SMALL_PULL
from psd.transport.rpc import RpcSocket

from conftest import wait_for

KEYS = np.unique(np.random.default_rng(5).integers(0, 2**64 - 1, 400, dtype=np.uint64, endpoint=True))


class Taken:
    """The small pulls sent the short way (answered there or handed back) and the
    pulls that were not."""

    def __init__(self, monkeypatch):
        self.sent, self.not_sent = [], 0
        send = small_pull.send

        def counted_send(*args):
            pull = send(*args)
            if pull is None:
                self.not_sent += 1
            else:
                self.sent.append(pull)
            return pull

        monkeypatch.setattr(small_pull, "send", counted_send)

    @property
    def short(self) -> int:
        return sum(p.short for p in self.sent)

    @property
    def handed_back(self) -> int:
        return sum(not p.short for p in self.sent)


def _by_range(ring, keys: np.ndarray) -> dict[int, np.ndarray]:
    idx = np.array([bisect_right(ring.inner_begin_list, int(k)) for k in keys])
    return {int(i): keys[idx == i] for i in np.unique(idx)}


def _reference(width: int) -> np.ndarray:
    return (np.arange(KEYS.size * width, dtype=np.int64).reshape(-1, width) * 3 + 1)


def test_small_pulls_go_as_one_message_and_read_what_was_pushed(monkeypatch):
    ref = _reference(2)
    with psd.LocalCluster(servers=3) as cluster, psd.connect(cluster) as kv:
        t = kv.table("ints", width=2, dtype="int64")
        kv.wait(t.push(KEYS, ref))
        taken = Taken(monkeypatch)
        ranges = _by_range(kv.aio.ring, KEYS)
        assert len(ranges) > 3, "the keys should spread over many ranges"
        for keys in ranges.values():
            pick = keys[: SMALL_PULL - 1]
            got = t.pull(pick)
            np.testing.assert_array_equal(got, ref[np.searchsorted(KEYS, pick)])
        assert taken.short == len(ranges) and taken.handed_back == 0 and taken.not_sent == 0
        # not small: many keys, keys of two ranges, no keys
        first, second = list(ranges.values())[:2]
        for keys in (KEYS, np.concatenate([first[:2], second[:2]]), KEYS[:0]):
            np.testing.assert_array_equal(t.pull(keys), ref[np.searchsorted(KEYS, keys)])
        assert taken.short == len(ranges) and taken.not_sent == 3
        # a strided view of the keys is sent as its values
        view = ranges[max(ranges, key=lambda i: ranges[i].size)][::2][:5]
        np.testing.assert_array_equal(t.pull(view), ref[np.searchsorted(KEYS, view)])
        assert taken.short == len(ranges) + 1


def test_an_error_on_the_short_way_is_raised_by_the_general_one(monkeypatch):
    with psd.LocalCluster(servers=1) as cluster, psd.connect(cluster) as kv:
        t = kv.table("gone", width=1, dtype="int32")
        kv.wait(t.push(KEYS[:3], np.ones((3, 1), np.int32)))
        admin.call(cluster.scheduler, "drop_tables", tables=[t.name])
        taken = Taken(monkeypatch)
        with pytest.raises(psd.UnknownTableError, match="gone"):
            t.pull(KEYS[:3])
        assert taken.handed_back == 1


def test_a_small_pull_to_a_killed_server_is_answered_by_its_replica(monkeypatch):
    ref = _reference(1)
    with psd.LocalCluster(servers=3, replication=2) as cluster, psd.connect(cluster) as kv:
        t = kv.table("ints", width=1, dtype="int64")
        kv.wait(t.push(KEYS, ref))
        ring = kv.aio.ring
        first = bisect_right(ring.inner_begin_list, int(KEYS[0]))
        victim, theirs = ring.owners[first][0], _by_range(ring, KEYS)[first][:10]
        np.testing.assert_array_equal(t.pull(theirs), ref[np.searchsorted(KEYS, theirs)])
        taken = Taken(monkeypatch)
        cluster.kill_server(victim, sig=signal.SIGKILL)
        started = time.monotonic()
        got = t.pull(theirs)
        assert time.monotonic() - started < 20
        np.testing.assert_array_equal(got, ref[np.searchsorted(KEYS, theirs)])
        assert taken.handed_back == 1  # the short way got no answer: the general way re-routed
        np.testing.assert_array_equal(t.pull(theirs), ref[np.searchsorted(KEYS, theirs)])
        assert taken.short == 1  # and the next small pull goes to the new primary


def _server_pulls(cluster: psd.LocalCluster) -> int:
    return sum(n["counters"].get("pull", 0) for n in cluster.status()["nodes"] if n["role"] == "server")


def test_a_compressed_answer_is_read_not_asked_for_again(monkeypatch):
    """Under zstd a server compresses replies of 4 KiB and more: the short way hands
    such an answer to the codec instead of sending the pull a second time."""
    with psd.LocalCluster(servers=1, compression="zstd") as cluster, \
            psd.connect(cluster, psd.ClusterConfig(compression="zstd")) as kv:
        t = kv.table("wide", width=64, dtype="float32")
        keys = KEYS[:20]
        vals = np.tile(np.arange(64, dtype=np.float32), (keys.size, 1))  # compresses well
        kv.wait(t.push(keys, vals))
        taken = Taken(monkeypatch)
        for _ in range(10):
            np.testing.assert_array_equal(t.pull(keys), vals)
        assert len(taken.sent) == 10 and taken.handed_back == 10  # (compressed: the codec read them)
        wait_for(lambda: _server_pulls(cluster) >= 10, 10, "the server's pull counter")
        time.sleep(0.3)  # a pull asked twice would show by now
        assert _server_pulls(cluster) == 10


def test_a_held_small_pull_is_waited_for_not_asked_for_again(monkeypatch):
    """Sequential consistency holds a worker's pull until the others reach its clock:
    the short way's 50 ms pass without an answer, and the pull is then waited for under
    its own id, not sent again (the server would hold and answer both)."""
    with psd.LocalCluster(servers=1, consistency="sequential", num_workers=2) as cluster, \
            psd.connect(cluster) as a, psd.connect(cluster) as b:
        ta, tb = a.table("seq", width=1, dtype="int64"), b.table("seq", width=1, dtype="int64")
        keys = KEYS[:5]
        a.clock()
        threading.Timer(0.4, b.clock).start()  # b reaches clock 1 only later
        started = time.monotonic()
        taken = Taken(monkeypatch)
        np.testing.assert_array_equal(ta.pull(keys), np.zeros((5, 1), np.int64))
        assert time.monotonic() - started >= 0.3, "the pull was not held"
        assert taken.handed_back == 1
        tb.pull(keys)
        wait_for(lambda: _server_pulls(cluster) >= 2, 10, "the server's pull counter")
        time.sleep(0.3)
        assert _server_pulls(cluster) == 2


def test_other_answers_read_on_the_short_way_reach_their_requests(monkeypatch):
    """A push's acknowledgement that arrives while a small pull reads the same socket
    is handed to the socket's usual handling: the push's wait returns."""
    handed = []
    receive = RpcSocket.receive
    monkeypatch.setattr(RpcSocket, "receive", lambda self, frames: (handed.append(1), receive(self, frames)))
    with psd.LocalCluster(servers=1) as cluster, \
            psd.connect(cluster, psd.ClusterConfig(request_timeout=3)) as kv:
        t = kv.table("ints", width=1, dtype="int64")
        keys = KEYS[:6]
        for i in range(1, 21):
            ts = t.push(keys, np.ones((6, 1), np.int64))
            np.testing.assert_array_equal(t.pull(keys), np.full((6, 1), i))
            kv.wait(ts)
    assert handed, "no acknowledgement came in during a small pull: the test proves nothing"

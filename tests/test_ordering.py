"""Issue order on the wire: a push is sent when push() returns, so the clock() that
follows it (and any later request) can never overtake it."""
import asyncio

import numpy as np
import pytest

import psd


@pytest.fixture
def seq_cluster():
    """A fresh group per test: a worker counts at a server from its first request, and
    until num_workers have joined the missing ones count as clock 0. With departed workers
    of an earlier test filling the group's slots, a newcomer could be passed by."""
    with psd.LocalCluster(servers=2, consistency="sequential", num_workers=2) as cluster:
        yield cluster


@pytest.mark.asyncio
async def test_push_then_clock_without_waiting_is_seen_by_the_next_clock(seq_cluster):
    a = await psd.aio.connect(seq_cluster.scheduler)
    b = await psd.aio.connect(seq_cluster.scheduler)
    try:
        ta = await a.table("order", dtype="int64")
        tb = await b.table("order", dtype="int64")
        keys = np.array([3, 2**63 + 3], dtype=np.uint64)  # on both servers
        for it in range(1, 6):
            ta.push(keys, np.ones(2, np.int64))  # not awaited
            a.clock()
            tb.push(keys, np.ones(2, np.int64))
            b.clock()
            got_a, got_b = await asyncio.gather(ta.pull(keys), tb.pull(keys))
            assert (got_a == 2 * it).all() and (got_b == 2 * it).all(), (it, got_a, got_b)
    finally:
        await a.close()
        await b.close()


def test_sync_push_is_on_the_wire_when_push_returns(seq_cluster):
    with psd.connect(seq_cluster.scheduler) as a, psd.connect(seq_cluster.scheduler) as b:
        ta = a.table("order2", dtype="int64")
        tb = b.table("order2", dtype="int64")
        keys = np.array([7, 2**63 + 7], dtype=np.uint64)
        for it in range(1, 4):
            ta.push(keys, np.ones(2, np.int64))
            a.clock()
            tb.push(keys, np.ones(2, np.int64))
            b.clock()
            ts = ta.pull_async(keys)
            assert (tb.pull(keys) == 2 * it).all()
            assert (a.wait(ts) == 2 * it).all()

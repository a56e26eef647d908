"""A ``ServerCore`` driven by hand, for tests of the server's pure logic."""
from __future__ import annotations

from psd.cluster.assignment import Assignment
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.config import ClusterConfig
from psd.core.server import ServerCore
from psd.schema import TableSpec


def lone_server(spec: TableSpec) -> ServerCore:
    """S0, leading every key alone (replication 1), with ``spec`` created and its lease
    confirmed at time 0."""
    core = ServerCore(ClusterConfig(security="none", replication=1), secure=False)
    core.node_id = "S0"
    core.ring = Assignment(version=1, ranges=(Range(0, KEY_SPACE_END),), owners=(("S0",),),
                           addresses={"S0": "tcp://S0"})
    core._create(spec)
    core.fence.confirmed(0.0)
    return core

"""Network partitions on an emulated multi-host cluster (psd/testing/netcluster.py): one
scheduler host, three server hosts, two client hosts and an operator host, replication
2, CurveZMQ, every daemon under a systemd-like supervisor that restarts it on failure.

In each test two clients push to keys of their own without pause, log every
acknowledgement and read their keys back five times a second (psd/testing/pushlog.py).
A link is cut while they do, then healed. After each, whatever the cut:

* no acknowledged push is lost and none is applied twice: every key holds exactly the
  sum of the pushes its client saw acknowledged (none failed: a client waits out the
  partition within its request_timeout);
* no read ever showed less than the pushes acknowledged before it was issued
  (read-your-writes) or more than had been issued;
* the cluster is back to OK within 15 s of the heal with no operator action, and the
  same clients, never re-created, push and read again.

Before the quorum failure detector (docs/design-decisions.md 60-61) the first three
failed: cutting the scheduler off for 5 s made it declare every server dead, and the
servers, told so on heal, dropped every table and exited; a server cut off (from all or
from the scheduler only) exited for good on heal and the cluster stayed DEGRADED.

Root only: skipped, with the reason, where network namespaces cannot be made. Every
namespace, link and process made is removed, also on failure.
"""
from __future__ import annotations

import time

import pytest

from psd.testing import NetCluster, unsupported
from psd.testing.netns import NetError

_REASON = unsupported()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"emulated hosts need network namespaces: {_REASON}")

#: seconds a link stays cut: more than the failure timeout of these settings
#: (heartbeat 0.2 s x 5 misses: suspect after 1 s, dead after 2 s)
CUT = 5.0
#: the cluster must be OK again this long after the heal at most
HEALED_WITHIN = 15.0


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    cluster = NetCluster(servers=3, clients=2, rate="1gbit", replication=2, security="curve",
                         run_dir=tmp_path_factory.mktemp("partitions"))
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


_seeds = iter(range(10, 250, 2))


def _status(net: NetCluster) -> dict:
    return net.status(timeout=10)


def _servers(st: dict) -> dict[str, dict]:
    return {n["id"]: n for n in st["nodes"] if n["role"] == "server"}


def _server_on(net: NetCluster, st: dict, host: str) -> dict:
    """The live server node advertised at ``host``'s address."""
    ip = net.host(host).ip
    [node] = [n for n in _servers(st).values() if n["state"] == "active" and f"//{ip}:" in n["address"]]
    return node


class Pushing:
    """Two clients pushing and reading back, started at once, checked at the end."""

    def __init__(self, net: NetCluster):
        seed = next(_seeds)
        self.net = net
        self.pushers = [net.start_pusher(f"client{i}", seed=seed + i, window=8, read_every=0.2) for i in range(2)]
        self._until_acked(20, 30.0)

    def _until_acked(self, more: int, timeout: float) -> None:
        start = [len(p.log().acked) for p in self.pushers]
        deadline = time.monotonic() + timeout
        while any(len(p.log().acked) < s + more for p, s in zip(self.pushers, start)):
            assert time.monotonic() < deadline, \
                f"a client did not get {more} more pushes acknowledged within {timeout} s: " \
                f"{[len(p.log().acked) for p in self.pushers]} (from {start}); logs in {self.net.run_dir}"
            time.sleep(0.1)

    def resumed(self) -> None:
        """Both clients, never re-created, get pushes acknowledged and reads answered again."""
        reads = [len(p.log().reads) for p in self.pushers]
        self._until_acked(20, 30.0)
        deadline = time.monotonic() + 15
        while any(len(p.log().reads) < r + 2 for p, r in zip(self.pushers, reads)):
            assert time.monotonic() < deadline, "a client's reads were not answered again after the heal"
            time.sleep(0.1)

    def check(self) -> None:
        logs = [p.stop() for p in self.pushers]
        for log in logs:
            assert log.done, f"client {log.seed} did not stop cleanly; logs in {self.net.run_dir}"
            assert not log.failed, f"client {log.seed}: pushes failed: {log.failed[:3]}"
            assert not log.stale_reads, f"client {log.seed}: reads broke read-your-writes: {log.stale_reads[:3]}"
            assert len(log.reads) > 2, f"client {log.seed}: only {len(log.reads)} reads answered"
        result = self.net.verify_pushes("operator", self.pushers)
        assert result["ok"], result["problems"]
        assert result["uncertain"] == 0 and result["acked"] == sum(len(log.acked) for log in logs)


def _healed_ok(net: NetCluster) -> dict:
    """Heal every link; the status once health is OK again (within HEALED_WITHIN)."""
    net.heal()
    healed = time.monotonic()
    while True:
        st = _status(net)
        if st["health"]["state"] == "ok":
            return st
        assert time.monotonic() - healed < HEALED_WITHIN, \
            f"not OK {HEALED_WITHIN} s after the heal: {st['health']}"
        time.sleep(0.3)


def _no_restarts(net: NetCluster) -> None:
    for host in ("scheduler", "server0", "server1", "server2"):
        unit = net.unit(host)
        assert unit.exits == [] and len(unit.starts) == 1, f"{host}'s daemon exited: {unit.exits}; " \
                                                           f"its log: {unit.log_tail()[-2000:]}"


def test_scheduler_cut_off_then_healed(net):
    """The scheduler hears no server for 5 s. It must take that for its own isolation,
    not for the death of every server: no ring change during the cut, no daemon exits,
    and the data plane goes on without it (operations.md: pushes and pulls do not pass
    through the scheduler)."""
    pushing = Pushing(net)
    before = _status(net)
    net.partition("scheduler")
    at_cut = [len(p.log().acked) for p in pushing.pushers]
    time.sleep(CUT)
    during = [len(p.log().acked) - n for p, n in zip(pushing.pushers, at_cut)]
    after = _healed_ok(net)
    assert after["ring_version"] == before["ring_version"], "the ring changed while the scheduler was cut off"
    assert _servers(after).keys() == _servers(before).keys()
    pushing.resumed()
    pushing.check()
    _no_restarts(net)
    assert all(n > 20 for n in during), f"pushes stopped while the scheduler was cut off: {during} acked"


def test_server_cut_from_the_scheduler_only(net):
    """A server the scheduler cannot hear but every other server and client can: the
    other servers vouch for it, so it is not declared dead and keeps its ranges."""
    pushing = Pushing(net)
    before = _status(net)
    node = _server_on(net, before, "server2")
    net.block("server2", "scheduler")
    time.sleep(CUT)
    during = _status(net)
    assert _servers(during)[node["id"]]["state"] != "dead", "a server its peers still hear was declared dead"
    assert during["ring_version"] == before["ring_version"]
    after = _healed_ok(net)
    assert _servers(after)[node["id"]]["state"] == "active" and after["ring_version"] == before["ring_version"]
    pushing.resumed()
    pushing.check()
    _no_restarts(net)


def test_server_cut_off_longer_than_the_failure_timeout_rejoins(net):
    """A server nobody hears for 5 s is declared dead (its replicas take over: the ring
    changes, which also shows the scheduler acting again after its own cut above). On
    the heal it registers again as a new member, without a restart, and the cluster is
    OK with three servers; nothing it held stale is served."""
    pushing = Pushing(net)
    before = _status(net)
    node = _server_on(net, before, "server1")
    net.partition("server1")
    deadline = time.monotonic() + CUT
    dead_seen = False
    while time.monotonic() < deadline:
        st = _status(net)
        dead_seen = dead_seen or _servers(st)[node["id"]]["state"] == "dead"
        time.sleep(0.5)
    assert dead_seen, "a server cut off from everyone for 5 s was not declared dead"
    moved = _status(net)["ring_version"]
    assert moved > before["ring_version"]
    after = _healed_ok(net)
    back = _server_on(net, after, "server1")
    assert back["id"] != node["id"]  # a new member, at the same host
    assert sum(n["state"] == "active" for n in _servers(after).values()) == 3
    assert any(back["id"] in r["owners"] for r in after["ranges"]), "the rejoined server got no ranges"
    pushing.resumed()
    pushing.check()
    _no_restarts(net)


def test_client_cut_off_longer_than_the_worker_timeout(net):
    """A client nobody hears for longer than worker_timeout (5 s) is declared dead; its
    pushes that were in flight at the cut are resent after the heal and applied once
    (servers keep its request ids while it keeps resending), and it goes on."""
    pushing = Pushing(net)
    net.partition("client1")
    deadline = time.monotonic() + net.settings["worker_timeout"] + 2.0
    cut_worker = pushing.pushers[1].log().node
    declared = False
    while time.monotonic() < deadline:
        nodes = {n["id"]: n for n in _status(net)["nodes"]}
        declared = declared or nodes[cut_worker]["state"] == "dead"
        time.sleep(0.5)
    assert declared, "a client cut off past worker_timeout was not declared dead"
    _healed_ok(net)
    pushing.resumed()
    pushing.check()
    _no_restarts(net)


def test_scheduler_host_cut_off_for_good_a_standby_takes_over(tmp_path_factory):
    """The scheduler's host is cut off and never comes back. A standby scheduler on
    another host (configs: ``standby``) sees the leader silent, the servers see it silent
    too and vote for the standby, which leads from its copy of the state: the ring goes on
    (at a higher version), the client keeps pushing and reading without being re-created,
    nothing acknowledged is lost, and `psd status` on the operator host, given the same
    YAML, answers from the new leader. The takeover time is printed."""
    run_dir = tmp_path_factory.mktemp("standby")
    with NetCluster(servers=3, clients=1, rate="1gbit", replication=2, security="curve", standby=True,
                    run_dir=run_dir) as net:
        pusher = net.start_pusher("client0", seed=next(_seeds), window=8, read_every=0.2)
        deadline = time.monotonic() + 30
        while len(pusher.log().acked) < 20:
            assert time.monotonic() < deadline, f"no pushes acknowledged; logs in {run_dir}"
            time.sleep(0.1)
        before = _status(net)
        assert before["epoch"] == 1 and before["standby"] == [net.standby_address]
        net.partition("scheduler")
        cut = time.monotonic()
        st = {"health": "no answer"}
        while True:
            try:  # (psd status gives each scheduler 2.5 s: the standby, busy taking over on a
                st = _status(net)  # loaded machine, may miss it; an operator asks again)
            except NetError as e:
                if "no answer from the scheduler" not in str(e):
                    raise
            else:
                if st["epoch"] == 2 and st["health"]["state"] == "ok":
                    break
            assert time.monotonic() - cut < 30, f"no standby took over within 30 s: {st['health']}"
            time.sleep(0.2)
        took = time.monotonic() - cut
        print(f"\nstandby took over {took:.1f} s after the scheduler host was cut off (OK in status)")
        assert st["scheduler"] == net.standby_address and st["ring_version"] > before["ring_version"] + 1000
        acked = len(pusher.log().acked)
        reads = len(pusher.log().reads)
        deadline = time.monotonic() + 30
        while len(pusher.log().acked) < acked + 20 or len(pusher.log().reads) < reads + 2:
            assert time.monotonic() < deadline, f"the client did not go on under the new leader; logs in {run_dir}"
            time.sleep(0.1)
        log = pusher.stop()
        assert log.done and not log.failed and not log.stale_reads, (log.failed[:3], log.stale_reads[:3])
        result = net.verify_pushes("operator", [pusher], scheduler=net.standby_address)
        assert result["ok"], result["problems"]
        assert result["uncertain"] == 0 and result["acked"] == len(log.acked)
        standby = net.unit("standby")
        assert standby.exits == [] and len(standby.starts) == 1, standby.log_tail()[-2000:]

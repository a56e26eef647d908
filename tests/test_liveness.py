"""The failure detector's rules (psd/cluster/liveness.py), as pure logic: a server is
declared dead only with a quorum of voters, so a scheduler cut off from everyone, or a
server cut off from the scheduler alone, never turns into the death of servers."""
from __future__ import annotations

from psd.cluster.liveness import Liveness, State, quorum
from psd.core.fence import Fence

INTERVAL, MISSES = 0.1, 4  # suspect after 0.4 s of silence, dead after 0.8 s


def cluster(servers: int = 3) -> Liveness:
    live = Liveness(INTERVAL, MISSES)
    for i in range(servers):
        live.join(f"S{i}", "server", 0.0)
    return live


def beat(live: Liveness, now: float, who, silent_to: dict | None = None) -> None:
    """Heartbeats from ``who`` at ``now``, each reporting the peers it has not heard from."""
    silent_to = silent_to or {}
    for node in who:
        live.seen(node, now)
        others = [p for p in live.peers if p != node and live.peers[p].role == "server"]
        live.report(node, {p: silent_to.get(p, 0.05) for p in others}, now)


def states(live: Liveness) -> dict:
    return {n: p.state for n, p in live.peers.items()}


def test_a_killed_server_is_declared_dead_with_the_others_agreeing():
    live = cluster()
    for t in range(1, 13):  # S2 dies at 0; S0 and S1 beat and say they lost it
        now = t * 0.1
        beat(live, now, ["S0", "S1"], {"S2": now})
        live.tick(now)
    assert states(live)["S2"] == State.DEAD
    assert live.live("server") == ["S0", "S1"]


def test_a_scheduler_cut_off_from_every_server_declares_nobody_dead():
    live = cluster()
    for t in range(1, 60):  # nothing arrives for 6 s
        live.tick(t * 0.1)
    assert set(states(live).values()) == {State.SUSPECT}
    assert live.isolated(5.9)
    beat(live, 6.0, ["S0", "S1", "S2"])  # the heal: everyone is back, nobody was lost
    live.tick(6.0)
    assert set(states(live).values()) == {State.ACTIVE} and not live.isolated(6.0)


def test_a_server_cut_from_the_scheduler_only_stays_a_member():
    live = cluster()
    for t in range(1, 60):  # S2's beats do not arrive; S0 and S1 still hear from it
        now = t * 0.1
        beat(live, now, ["S0", "S1"], {"S2": 0.05})
        live.tick(now)
    assert states(live)["S2"] == State.SUSPECT, "the others reach it: it is not dead"
    assert not live.isolated(5.9)


def test_losing_most_servers_at_once_is_taken_for_the_schedulers_own_isolation():
    live = cluster(3)
    for t in range(1, 60):  # only S0 beats; it reports losing both others
        now = t * 0.1
        beat(live, now, ["S0"], {"S1": now, "S2": now})
        live.tick(now)
    # H and S0 are 2 of 4 voters: no majority, so no ring change until more are heard
    assert states(live)["S1"] == State.SUSPECT and states(live)["S2"] == State.SUSPECT
    assert live.isolated(5.9)


def test_two_servers_one_dies_the_scheduler_and_the_survivor_are_a_majority():
    live = cluster(2)
    for t in range(1, 13):
        now = t * 0.1
        beat(live, now, ["S0"], {"S1": now})
        live.tick(now)
    assert states(live)["S1"] == State.DEAD


def test_a_lone_server_is_never_declared_dead_on_silence():
    live = cluster(1)
    for t in range(1, 100):
        live.tick(t * 0.1)
    assert states(live)["S0"] == State.SUSPECT  # the only copy is waited for, never given up


def test_stale_reports_do_not_count():
    live = cluster()
    beat(live, 0.0, ["S0", "S1"], {"S2": 5.0})
    for t in range(1, 13):  # nothing more arrives from anyone: old reports are no evidence
        live.tick(t * 0.1)
    assert states(live)["S2"] == State.SUSPECT


def test_quorums_of_the_scheduler_and_of_the_fence_always_meet():
    """Any set the scheduler can declare a death with and any set a server can keep its
    lease with share a voter, for every cluster size: the sizes add up past the voters."""
    for servers in range(1, 12):
        voters = servers + 1
        assert quorum(voters) * 2 > voters
        f = Fence(lease=0.7)
        names = tuple(f"S{i}" for i in range(servers))
        for i in range(1, servers):
            f.peer_answered(names[i], 1.0, 1.0)
            vouched = f.ok("S0", names, 1.5)
            assert vouched == (i + 1 >= quorum(voters))

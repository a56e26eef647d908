"""The rules that choose a leader among schedulers (psd/core/election.py), alone and over
random interleavings: standbys running for leader whenever their rules allow, servers
voting, links cut and healed at random, heartbeats lost. Two properties must hold in
every schedule: no two schedulers win the same epoch, and nobody wins while the leader
reaches a majority of the servers (a standby cut off from the leader, or a slow one, must
not take over a cluster whose leader is alive)."""
from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from psd.core.election import Ballot, Candidacy, majority

LEASE = 1.0


def test_a_server_votes_only_once_its_leader_is_silent_past_the_lease():
    b = Ballot(LEASE)
    b.heard(1, "tcp://a:1", now=10.0)
    vote = b.ask(2, "tcp://b:1", now=10.5)
    assert not vote.granted and "answered 0.50 s ago" in vote.why
    assert b.ask(2, "tcp://b:1", now=11.2).granted
    # one vote per epoch, and never for an epoch at or below one it has seen
    assert not b.ask(2, "tcp://c:1", now=20.0).granted
    again = b.ask(1, "tcp://c:1", now=20.0)
    assert not again.granted and "not above 2" in again.why
    assert b.ask(3, "tcp://c:1", now=20.0).granted and b.leader == "tcp://c:1"


def test_a_standby_runs_after_silence_or_its_leader_isolated_and_wins_with_a_majority():
    c = Candidacy(epoch=1, takeover_after=2.0, retry=1.0, now=0.0)
    c.heard(1, isolated=False, now=1.0)
    assert c.should_run(2.5) is None
    assert "no answer from the leader for 2.0 s" in c.should_run(3.0)
    c.heard(1, isolated=True, now=3.0)  # it answers, but hears too few servers itself
    c.heard(1, isolated=True, now=4.0)
    assert c.should_run(4.0) is None
    c.heard(1, isolated=True, now=5.0)
    assert "heard from too few servers for 2.0 s" in c.should_run(5.0)
    epoch = c.start(["S0", "S1", "S2"], now=5.0)
    assert epoch == 2 and c.should_run(5.1) is None  # one election at a time
    c.vote("S0", epoch, True, "")
    assert not c.won()
    c.vote("S9", epoch, True, "")  # not a voter of this election
    c.vote("S1", epoch - 1, True, "")  # an answer to another election
    assert not c.won()
    c.vote("S2", epoch, True, "")
    assert c.won()


def test_an_election_that_fails_is_retried_at_a_higher_epoch():
    c = Candidacy(epoch=4, takeover_after=1.0, retry=1.0, now=0.0)
    first = c.start(["S0", "S1", "S2"], now=2.0)
    c.vote("S0", first, False, "its leader answered")
    c.vote("S1", first, False, "its leader answered")
    assert c.lost() and not c.won()
    c.end()
    assert c.should_run(2.5) is None  # not before retry
    assert c.start(["S0", "S1", "S2"], now=3.0) == first + 1  # S2 may have voted in `first`


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_schedules_never_have_two_leaders(data):
    servers = data.draw(st.integers(1, 5), label="servers")
    standbys = data.draw(st.integers(1, 3), label="standbys")
    names = [f"S{i}" for i in range(servers)]
    ballots = {n: Ballot(LEASE) for n in names}
    # scheduler 0 leads at epoch 1 and has just been heard by everyone
    leaders: dict[int, int] = {1: 0}  # epoch -> scheduler
    alive_leader = 0
    cands = {i: Candidacy(1, takeover_after=LEASE, retry=0.5, now=0.0) for i in range(1, standbys + 1)}
    reach = {(s, n): True for s in range(standbys + 1) for n in names}  # scheduler s reaches server n
    follows = {i: True for i in cands}  # standby i reaches the leader
    for n in names:
        ballots[n].heard(1, "L0", 0.0)
    now = 0.0
    leader_kept_majority_since = 0.0
    for _ in range(data.draw(st.integers(1, 60), label="steps")):
        now += data.draw(st.sampled_from([0.05, 0.1, 0.3, 0.7]), label="dt")
        action = data.draw(st.sampled_from(["beat", "cut", "heal", "follow", "run", "cutfollow"]), label="act")
        if action == "cut":
            reach[(data.draw(st.integers(0, standbys)), data.draw(st.sampled_from(names)))] = False
        elif action == "heal":
            reach[(data.draw(st.integers(0, standbys)), data.draw(st.sampled_from(names)))] = True
        elif action == "cutfollow":
            i = data.draw(st.integers(1, standbys))
            follows[i] = not follows[i]
        # the leader's heartbeats reach the servers it reaches (every step: time passes)
        epoch_now = max(leaders)
        reached = [n for n in names if reach[(alive_leader, n)]]
        for n in reached:
            ballots[n].heard(epoch_now, f"L{alive_leader}", now)
        if len(reached) < majority(servers):
            leader_kept_majority_since = math.inf
        elif leader_kept_majority_since == math.inf:
            leader_kept_majority_since = now
        for i, cand in cands.items():
            if i == alive_leader:
                continue
            if follows[i] and action != "run":
                cand.heard(epoch_now, isolated=len(reached) < majority(servers), now=now)
            if cand.should_run(now) is None:
                continue
            epoch = cand.start(names, now)
            for n in names:
                if reach[(i, n)]:
                    vote = ballots[n].ask(epoch, f"L{i}", now)
                    cand.vote(n, epoch, vote.granted, vote.why, ballots[n].epoch)
            if cand.won():
                assert epoch not in leaders, f"two leaders at epoch {epoch}: {leaders[epoch]} and {i}"
                # a leader that reached a majority for a whole lease cannot be replaced
                assert now - leader_kept_majority_since < LEASE or leader_kept_majority_since == math.inf, \
                    f"scheduler {i} won epoch {epoch} while the leader reached a majority since " \
                    f"{leader_kept_majority_since:.2f} (now {now:.2f})"
                leaders[epoch] = i
                alive_leader = i
                leader_kept_majority_since = now
            cand.end()

"""The server's consistency gate as plain logic: checkpoint cuts and sequential pushes."""
import numpy as np

from psd.cluster.assignment import Assignment
from psd.cluster.clocks import AutoDelay
from psd.cluster.ranges import KEY_SPACE_END, Range
from psd.codec import Message
from psd.config import ClusterConfig
from psd.core.effects import Write
from psd.core.gate import Gate, Policy, Setting
from psd.core.server import ServerCore
from psd.schema import TableSpec


def make(consistency="eventual"):
    g = Gate(Setting(consistency, 2, 3, (0, 8)))
    for w in ("W0", "W1", "W2"):
        g.clock(w, 42, 0.0)
    return g


def test_hold_phase_holds_every_new_push_and_reports_the_highest_clock():
    g = make()
    applied = []
    g.note_push(42)
    assert g.hold_all() == 42
    g.policy(None).push("W0", 43, lambda: applied.append(43))
    g.policy(None).push("W1", 41, lambda: applied.append(41))
    assert applied == []  # nothing new is applied until the cut is known


def test_cut_applies_earlier_pushes_snapshots_when_all_reach_it_then_releases():
    g = make()
    applied, snapshots = [], []
    g.hold_all()
    g.policy(None).push("W0", 43, lambda: applied.append(("W0", 43)))
    g.policy(None).push("W2", 42, lambda: applied.append(("W2", 42)))
    g.cut(43, {"W0", "W1", "W2"}, lambda: snapshots.append(list(applied)))
    assert applied == [("W2", 42)]  # below the cut: goes ahead
    g.clock("W0", 43, 0.0)
    g.clock("W1", 43, 0.0)
    assert snapshots == []  # W2 has not finished clock 42 yet
    g.clock("W2", 43, 0.0)
    assert snapshots == [[("W2", 42)]]  # the snapshot holds exactly the clocks below 43
    assert applied == [("W2", 42), ("W0", 43)]  # then the held push goes through


def test_a_departed_worker_does_not_block_the_cut():
    g = make()
    snapshots = []
    g.cut(43, {"W0", "W1", "W2"}, lambda: snapshots.append(True))
    g.clock("W0", 43, 0.0)
    g.clock("W1", 43, 0.0)
    g.leave("W2", 0.0)
    assert snapshots == [True]


def test_a_pull_after_its_own_held_push_waits_for_the_cut_and_sees_it():
    """Eventual: a push held by the cut is acked on arrival; its worker's next pull must
    see it, and must not see the push it sends after the pull."""
    g = make()
    table: list[int] = []
    reads: list[list[int]] = []
    g.hold_all()
    g.cut(43, {"W0", "W1", "W2"}, lambda: None)
    g.policy(None).push("W0", 43, lambda: table.append(1))  # held: at the cut
    assert not g.policy(None).pull("r1", "W0", 43, lambda: reads.append(list(table)), 0.0)
    g.policy(None).push("W0", 43, lambda: table.append(2))  # after the pull
    assert g.policy(None).pull("r2", "W1", 42, lambda: reads.append(list(table)), 0.0)  # needs nothing held
    assert reads == [[]]
    assert {k: g.policy(None).stats()[k] for k in ("held_pulls", "buffered_pushes")} == {
        "held_pulls": 1, "buffered_pushes": 2}  # (what the cut holds counts)
    g.release_cut()
    assert reads == [[], [1]] and table == [1, 2]
    assert g.policy(None).stats()["held_pulls"] == 0 == g.policy(None).stats()["buffered_pushes"]


def test_a_sequential_pull_waiting_for_the_cut_sees_exactly_the_clocks_below_it():
    """Sequential: a pull the clocks release while the hold phase holds a push below its
    clock waits for it; the push of its own clock, kept for the clock boundary, stays
    kept while it waits (the floor passing it meanwhile), and goes after the read."""
    g = Gate(Setting("sequential", 0, 2, (0, 8)))
    for w in ("W0", "W1"):
        g.clock(w, 8, 0.0)
    p = g.policy(None)
    table: list[str] = []
    reads: list[list[str]] = []
    p.push("W1", 9, lambda: table.append("W1@9"))  # kept for the clock boundary
    assert not p.pull("r", "W1", 9, lambda: reads.append(list(table)), 0.0)
    g.hold_all()
    p.push("W0", 8, lambda: table.append("W0@8"))  # held by the hold phase
    for clock in (9, 10):  # the floor passes 9, then 10: the pull waits for the held push
        g.clock("W0", clock, 0.0)
        g.clock("W1", clock, 0.0)
    assert reads == [] and table == []
    g.cut(11, {"W0", "W1"}, lambda: None)
    assert reads == [["W0@8"]] and table == ["W0@8", "W1@9"]


def test_the_cut_waits_for_an_unsynced_worker_and_holds_an_unlisted_one():
    """A clock sent at a ring before our takeover does not vouch for the cut; a worker
    the cut does not list (it registered later) has every push held until after it."""
    g = make()
    snapshots, table = [], []
    g.hold_all()
    g.cut(43, {"W0", "W1", "W2"}, lambda: snapshots.append(list(table)))
    g.policy(None).push("W9", 0, lambda: table.append("W9"))  # unlisted: after the cut
    g.clock("W0", 43, 0.0)
    g.clock("W1", 43, 0.0)
    g.clock("W2", 43, 0.0, synced=False)
    assert snapshots == []
    g.clock("W2", 44, 0.0)
    assert snapshots == [[]] and table == ["W9"]


def test_sequential_push_waits_for_the_clock_boundary():
    g = make("sequential")
    applied = []
    g.policy(None).push("W0", 42, lambda: applied.append(42))
    assert applied == []
    for w in ("W0", "W1", "W2"):
        g.clock(w, 43, 0.0)
    assert applied == [42]


# -- max_delay auto in a closed loop, on virtual time ------------------------------------
def finish_time(max_delay, seed: int, *, workers: int = 4, iterations: int = 240,
                slow_chance: float = 0.1, slow: float = 4.0) -> tuple[float, list[int]]:
    """When the last of ``workers`` finishes ``iterations`` clocks through one bounded
    ``Policy`` (the server's gate), each iteration a pull then about one second of work,
    slowed by ``slow`` seconds with probability ``slow_chance`` (transient stragglers, as
    scripts/bench_consistency.py has them); and the taus the policy went through."""
    import heapq
    import random
    rng = random.Random(seed)   # every setting meets the same slow iterations
    length = {(f"W{i}", c): rng.uniform(0.8, 1.2) + (slow if rng.random() < slow_chance else 0.0)
              for i in range(workers) for c in range(iterations)}
    policy = Policy(Setting("bounded", max_delay, workers, (0, 8)))
    clock = {f"W{i}": 0 for i in range(workers)}
    events: list[tuple[float, str]] = []
    taus = [policy.tau]

    def work(w: str, now: float) -> None:
        heapq.heappush(events, (now + length[w, clock[w]], w))

    def pull(w: str, now: float) -> None:
        policy.pull((w, clock[w]), w, clock[w], lambda: work(w, policy_now[0]), now)

    policy_now = [0.0]
    for w in clock:
        policy.clocks.join(w)
    for w in clock:
        pull(w, 0.0)
    now = 0.0
    while events:
        now, w = heapq.heappop(events)
        policy_now[0] = now
        clock[w] += 1
        policy.clock(w, clock[w], now)
        taus.append(policy.tau)
        if clock[w] < iterations:
            pull(w, now)
        else:
            policy.leave(w, now)
    return now, taus


def test_auto_delay_is_as_fast_as_the_best_fixed_tau_under_transient_stragglers():
    """The gate's own loop (pulls report how far ahead they are, held pulls their waits):
    auto must finish within 3% of the best fixed tau, clearly ahead of tau 4."""
    seeds = range(3)
    times = {tau: sum(finish_time(tau, s)[0] for s in seeds) for tau in (1, 2, 4, 8, "auto")}
    best = min(t for tau, t in times.items() if tau != "auto")
    assert times["auto"] <= 1.03 * best, times
    assert times["auto"] < 0.97 * times[4], times
    for seed in seeds:
        _, taus = finish_time("auto", seed)
        top = taus.index(8)
        assert top < 200                             # climbed within 50 clocks a worker
        assert min(taus[top:]) == 8                  # and stayed up across the stragglers


def test_auto_delay_stays_low_without_stragglers():
    """Only jitter: workers drift apart slowly, so tau stays tight (it grows only as
    far as their drift, a clock or two, makes pulls wait)."""
    for seed in range(2):
        _, taus = finish_time("auto", seed, slow_chance=0.0)
        assert sorted(taus)[len(taus) // 2] <= 2 and max(taus) <= 4


def test_a_pull_held_across_a_raise_counts_only_its_wait_under_the_new_tau():
    """Otherwise the waits a raise ends would be charged to the new tau at once and
    raise it again, a step too far for every pull the old tau held."""
    policy = Policy(Setting("bounded", "auto", 2, (0, 8)))
    policy.auto = AutoDelay(0, 8, window=2)
    ran = []
    policy.clock("W0", 3, 0.0)
    policy.clock("W1", 1, 0.0)
    assert not policy.pull("a", "W0", 2, lambda: ran.append("a"), 0.0)   # lead 1: held at tau 0
    assert not policy.pull("b", "W0", 3, lambda: ran.append("b"), 0.0)   # lead 2: held
    policy.clock("W1", 2, 10.0)        # "a" runs after 10 s
    policy.clock("W1", 3, 11.0)        # the window: 10 s of 11 waited: tau 0 -> 1, "b" runs
    assert ran == ["a", "b"] and policy.tau == 1
    policy.clock("W0", 4, 12.0)        # no pull waited under tau 1: it stays
    assert policy.tau == 1


def test_a_held_pull_that_raises_does_not_stop_the_drain_or_reapply_pushes():
    """A held pull runs inside another request's handler (a clock message here): if it
    raises, the pulls released with it still run, and the kept pushes applied in that
    drain are not applied again by the next one."""
    g = make("sequential")
    p = g.policy(None)
    applied, answered = [], []
    p.push("W0", 42, lambda: applied.append(42))

    def broken():
        raise RuntimeError("the table went away")
    assert not p.pull("a", "W0", 43, broken, 0.0)
    assert not p.pull("b", "W1", 43, lambda: answered.append("b"), 0.0)
    g.clock("W0", 43, 0.0)
    g.clock("W1", 43, 0.0)
    try:
        g.clock("W2", 43, 0.0)
    except RuntimeError as err:
        assert "went away" in str(err)
    else:
        raise AssertionError("the pull's error should reach the handler that drained it")
    assert answered == ["b"] and applied == [42]
    for w in ("W0", "W1", "W2"):
        g.clock(w, 44, 1.0)
    assert applied == [42], "a push applied before the error must not be applied again"


def test_a_callback_that_raises_in_the_cut_s_replay_loses_nothing_the_cut_held():
    """The cut's replay runs acknowledged pushes and waiting pulls inside another request
    (the release, a clock message): one that raises (a LimitError from a reindex, say)
    does not drop the rest of the replay or leave a later policy cut; the first error
    is raised once every policy let its pushes through."""
    def boom():
        raise MemoryError("apply failed")
    for consistency in ("eventual", "sequential"):
        g = make(consistency)
        other = g.policy({"consistency": "bounded", "max_delay": 1})
        p = g.policy(None)
        table: list[str] = []
        reads: list[list[str]] = []
        g.hold_all()
        p.push("W0", 42, boom)
        p.push("W1", 42, lambda: table.append("W1@42"))
        other.push("W1", 42, lambda: table.append("other"))
        assert not p.pull("r", "W1", 43, lambda: reads.append(list(table)), 0.0)
        raised = []
        for step in [lambda: g.cut(43, {"W0", "W1", "W2"}, lambda: None)] + [
                lambda w=w: g.clock(w, 43, 0.0) for w in ("W0", "W1", "W2")]:
            try:  # (sequential: the clock-42 pushes wait for the clock boundary)
                step()
            except MemoryError:
                raised.append(True)
        assert raised == [True], "the push's error should reach the handler that ran it"
        assert sorted(table) == ["W1@42", "other"], consistency
        assert len(reads) == 1 and "W1@42" in reads[0], consistency  # (after the push it must see)
        assert p.cut is None and other.cut is None and not p._past_cut and not other._past_cut


def test_the_cut_waits_for_the_push_of_a_request_held_whole():
    """Sequential, a worker not yet registered holding the floor at 0: an older client's
    pushpull at clock 1 is held whole (it pushes only when released), as a current
    client's push would be kept; the cut at 5 is written only once that push is in."""
    for older in (False, True):
        g = Gate(Setting("sequential", 0, 3, (0, 8)))
        for w in ("W0", "W1"):
            g.clock(w, 1, 0.0)
        p = g.policy(None)
        table: list[str] = []
        snapshots: list[list[str]] = []

        def push():
            p.push("W0", 1, lambda: table.append("W0@1"))
        if older:
            assert not p.pull("pp", "W0", 1, push, 0.0, pushes=True)
        else:
            push()
            assert not p.pull("pp", "W0", 1, lambda: None, 0.0)
        g.hold_all()
        for w in ("W0", "W1"):
            g.clock(w, 5, 0.0)
        g.cut(5, {"W0", "W1"}, lambda: snapshots.append(list(table)))
        assert snapshots == [], older  # the clock-1 push, below the cut, is not in yet
        g.clock("W2", 5, 0.0)  # (it registers and passes the cut: the floor passes clock 1)
        assert snapshots == [["W0@1"]], older



def test_a_request_held_whole_is_not_parked_behind_the_cut_that_waits_for_it():
    """Bounded tau 1, cut at 6: a worker that joined after the hold (unlisted) pushes at
    clock 0, held by the cut; a listed worker's pushpull held whole at clock 5 must see
    it, but the cut waits for that pushpull's own push. Parked whole behind the cut, it
    would wait for a cut that waits for it: it pushes when the clocks allow, the snapshot
    holds its push, and only its pull part waits for the cut."""
    g = Gate(Setting("bounded", 1, 0))
    p = g.policy(None)
    for w in ("w1", "w2"):
        g.clock(w, 5, 0.0)
    g.hold_all()
    table: list[str] = []
    snapshots: list[list[str]] = []
    g.cut(6, {"w1", "w2"}, lambda: snapshots.append(list(table)))
    p.push("w3", 0, lambda: table.append("w3@0"))

    def pushpull():
        table.append("w1@5")
        p.after_push("r1", "w1", 5, lambda: table.append("w1 pulled"), 1.0)
    p.pull("r1", "w1", 5, pushpull, 1.0, pushes=True)
    for c in range(1, 5):
        g.clock("w3", c, 2.0)
    g.clock("w1", 6, 3.0)
    g.clock("w2", 6, 3.0)
    assert snapshots == [["w1@5"]]
    assert table == ["w1@5", "w3@0", "w1 pulled"]  # (the pull part after the push it must see)

class _NoScan(list):
    """The cut's queue, which a request while the cut holds must not read through."""

    def __iter__(self):
        raise AssertionError("a request scanned every entry the cut holds")


def _sees_held_by_scan(p: Policy, worker: str, clock: int) -> bool:
    tau = p.clocks.tau
    return any(apply is not None and ((tau != 0 and w == worker and c <= clock)
                                      or (tau is not None and c < clock - tau))
               for w, c, apply, _ in p._past_cut)


def test_requests_during_a_cut_ask_what_it_holds_without_scanning_it():
    """A pull asks whether it must see a held push, a sequential push how far kept pushes
    wait: from the lowest held clock per worker and the lowest waiting pull, kept as the
    queue grows, not by reading the queue (0.6 ms a pull with 4,000 held). Random
    requests check those answers against a scan of the queue."""
    import random
    rng = random.Random(7)
    for model, tau in (("eventual", 0), ("bounded", 2), ("sequential", 0)):
        g = Gate(Setting(model, tau, 3, (0, 8)))
        for w in ("W0", "W1", "W2"):
            g.clock(w, 10, 0.0)
        p = g.policy(None)
        g.hold_all()
        g.cut(12, {"W0", "W1", "W2"}, lambda: None)
        p._past_cut = _NoScan(p._past_cut)
        for i in range(300):
            w, c = rng.choice(("W0", "W1", "W2")), rng.randint(9, 16)
            if rng.random() < 0.5:
                p.push(w, c, lambda: None)
            else:
                p.pull(("r", i), w, c, lambda: None, 0.0)
            queue = list.copy(p._past_cut)
            p._past_cut = queue  # (the scan below may read it)
            for w2, c2 in [(x, y) for x in ("W0", "W1", "W2") for y in range(9, 17)]:
                assert p._sees_held(w2, c2) == _sees_held_by_scan(p, w2, c2), (model, i, w2, c2)
            waiting = [c2 for _w, c2, apply, _ in queue if apply is None]
            assert p._keep_from(11) == min([11, *waiting]), (model, i)
            p._past_cut = _NoScan(queue)
        p._past_cut = list.copy(p._past_cut)
        g.release_cut()
        assert not p._past_cut and p._sees_held("W0", 99) is False and p._keep_from(None) is None


def test_a_cut_that_times_out_answers_the_scheduler_whatever_its_release_raises():
    """The server's core: a cut that times out refuses the checkpoint, then lets its held
    pushes through; one that raises (in the tick, with nobody to answer) is logged, and
    the refusal still goes out. A hold that lapses likewise."""
    from psd.cluster.assignment import Assignment
    from psd.cluster.ranges import KEY_SPACE_END, Range
    from psd.codec import Message
    from psd.config import ClusterConfig
    from psd.core.effects import Refuse
    from psd.core.server import ServerCore
    from psd.errors import PsdTimeoutError
    core = ServerCore(ClusterConfig(security="none", num_workers=1), secure=False)
    core.node_id = "S0"
    core.ring = Assignment(version=1, ranges=(Range(0, KEY_SPACE_END),), owners=(("S0",),),
                           addresses={"S0": "tcp://S0"})
    core.control(Message("ckpt_hold", id=1, sender="H0"), 0.0)
    applied = []

    def boom():
        raise MemoryError("apply failed")
    core.gate.policy(None).push("W0", 1, boom)
    core.gate.policy(None).push("W0", 1, lambda: applied.append(1))
    core.control(Message("ckpt_cut", id=2, sender="H0", meta={"cut": 1, "workers": ["W0"], "timeout": 1}), 0.0)
    out = [e for e in core.tick(5.0) if isinstance(e, Refuse)]
    assert [type(e.error) for e in out] == [PsdTimeoutError] and out[0].request.id == 2
    assert applied == [1] and core.gate.policy(None).cut is None
    # a hold whose cut never comes lapses in the tick the same way
    core.control(Message("ckpt_hold", id=3, sender="H0", meta={"within": 1}), 10.0)
    core.gate.policy(None).push("W0", 1, boom)
    core.gate.policy(None).push("W0", 1, lambda: applied.append(2))
    core.tick(20.0)
    assert applied == [1, 2] and core.gate.policy(None).cut is None


def _new_server(gone: list[str]):
    """A server joining a sequential group of two workers for the first time, after W0
    left (the scheduler's register answer lists it); W1 has clocked 1 to it."""
    spec = TableSpec("t", 1, "int64")
    core = ServerCore(ClusterConfig(security="none", consistency="sequential", num_workers=2, replication=1),
                      secure=False)
    ring = Assignment(version=4, ranges=(Range(0, KEY_SPACE_END),), owners=(("S3",),),
                      addresses={"S3": "tcp://s3"})
    core.registered({"node": "S3", "ring": ring.to_wire(), "tables": [spec.to_wire()], "gone_workers": gone}, 1.0)
    core.fence.confirmed(1.0)
    core.handle(None, Message("clock", sender="W1", ring=4, meta={"clock": 1}), 1.1)
    pull = Message("pull", id=7, sender="W1", table="t", ring=4, clock=1, meta={"rid": 7},
                   arrays=[np.array([10], np.uint64)])
    return core, core.handle(None, pull, 1.2)


def test_a_new_server_does_not_wait_for_a_worker_that_left_before_it_joined():
    """``worker_left`` went to the servers live then; a server that joins later learns the
    departure from its register answer, or it counts W0 as missing (clock 0) for ever
    and holds every pull past clock 0 (decision 155)."""
    core, out = _new_server(["W0"])
    assert [e.msg.op for e in out] == ["ok"]
    assert core.gate.live_workers() == {"W1"}


def test_a_new_server_still_waits_for_a_worker_that_has_not_reached_it():
    core, out = _new_server([])
    assert out == [] and core.gate.policy(None).clocks.held() == 1  # W0 may still come


def test_a_server_outside_its_ring_writes_its_cut_without_waiting_for_clocks():
    """S1 joined, and its join's ring change waits for the checkpoint (RING_LOCK): no
    worker knows it, so none sends it a clock, and waiting for W0's would stall the
    checkpoint, and every ring change behind it (a death's too), until the cut's
    timeout (decision 155). It leads nothing: its file is empty, whenever written."""
    core = ServerCore(ClusterConfig(security="none", num_workers=1), secure=False)
    core.node_id = "S1"
    core.ring = Assignment(version=1, ranges=(Range(0, KEY_SPACE_END),), owners=(("S0",),),
                           addresses={"S0": "tcp://S0", "S1": "tcp://S1"})
    core.control(Message("ckpt_hold", id=1, sender="H0"), 0.0)
    out = core.control(Message("ckpt_cut", id=2, sender="H0", meta={"cut": 3, "workers": ["W0"], "folder": "/x",
                                                                    "timeout": 60}), 0.1)
    assert [type(e) for e in out] == [Write]
    member = ServerCore(ClusterConfig(security="none", num_workers=1), secure=False)
    member.node_id, member.ring = "S0", core.ring
    member.control(Message("ckpt_hold", id=1, sender="H0"), 0.0)
    out = member.control(Message("ckpt_cut", id=2, sender="H0", meta={"cut": 3, "workers": ["W0"], "folder": "/x",
                                                                      "timeout": 60}), 0.1)
    assert out == [] and member.gate.lagging(3, ["W0"]) == ["W0"]  # a member waits for W0's clock

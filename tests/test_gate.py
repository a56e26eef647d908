"""The server's consistency gate as plain logic: checkpoint cuts and sequential pushes."""
from psd.core.gate import Gate, Setting


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


def test_sequential_push_waits_for_the_clock_boundary():
    g = make("sequential")
    applied = []
    g.policy(None).push("W0", 42, lambda: applied.append(42))
    assert applied == []
    for w in ("W0", "W1", "W2"):
        g.clock(w, 43, 0.0)
    assert applied == [42]

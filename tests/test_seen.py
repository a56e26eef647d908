"""PartlyApplied's memory of copied-in request ids (psd/core/seen.py), as pure logic: a
resend of a recent request must not apply the rows a range copy already brought in,
however many senders' ids that copy carried."""
from __future__ import annotations

import numpy as np

from psd.cluster.ranges import Range
from psd.cluster.rows import Rows
from psd.core.seen import WINDOW, PartlyApplied, Seen


def _copy_arrays(ids_per_sender: dict[str, range]):
    senders = list(ids_per_sender)
    counts = np.array([len(ids_per_sender[s]) for s in senders], dtype=np.uint64)
    rids = np.concatenate([np.array(ids_per_sender[s], dtype=np.uint64) for s in senders])
    return senders, counts, rids


def test_a_copy_of_many_senders_keeps_each_senders_recent_ids():
    """Two workers with more ids each than one window: the copy comes in sender by
    sender. A single bound for all senders kept only the second one's ids, so a resend
    of W1's newest request applied the copied rows a second time."""
    partly = PartlyApplied()
    r = Range(100, 200)
    n = WINDOW + 5000
    partly.note_copy(r, *_copy_arrays({"W1": range(n), "W2": range(n)}))
    rows = Rows(keys=np.array([150, 250], dtype=np.uint64), values=np.ones((2, 1), np.float32))
    for sender in ("W1", "W2"):
        left = partly.not_applied(rows, [(sender, n - 1)])  # the newest: may still be resent
        assert left is not None and left.keys.tolist() == [250], sender  # the copied row is not applied again
        # the oldest ids, beyond each sender's window, are forgotten (they are never resent)
        assert partly.not_applied(rows, [(sender, 0)]) is rows
    assert len(partly.copied_into(Range(0, 300))) == 2 * WINDOW
    assert partly.copied_into(Range(300, 400)) == []


def test_a_range_copied_in_twice_is_remembered_once_per_id():
    partly = PartlyApplied(window=8)
    for _ in range(3):
        partly.note_copy(Range(0, 10), *_copy_arrays({"W1": range(4)}))
    partly.note_copy(Range(10, 20), *_copy_arrays({"W1": range(2, 6)}))
    rows = Rows(keys=np.array([5, 15, 25], dtype=np.uint64), values=np.ones((3, 1), np.float32))
    assert partly.not_applied(rows, [("W1", 3)]).keys.tolist() == [25]  # in both copies
    assert partly.not_applied(rows, [("W1", 1)]).keys.tolist() == [15, 25]
    assert partly.not_applied(rows, [("W1", 5)]).keys.tolist() == [5, 25]


def test_a_resent_id_stays_among_the_newest():
    """A push refused by a replica is resent for up to request_timeout while its worker
    keeps pushing: each resend makes its id the newest again, so it is not forgotten
    (and then applied a second time) after WINDOW other pushes."""
    seen = Seen(window=4)
    seen.add("w", 1)
    for rid in range(2, 20):
        seen.touch("w", 1)  # resent between every two new pushes
        seen.add("w", rid)
    assert ("w", 1) in seen and len(seen) == 4
    seen.touch("w", 99)  # (an id it does not hold: nothing changes)
    assert ("w", 99) not in seen
    plain = Seen(window=4)
    for rid in range(1, 20):
        plain.add("w", rid)
    assert ("w", 1) not in plain


def test_forgetting_a_sender_drops_its_ids_pieces_and_copies_only():
    seen, partly = Seen(), PartlyApplied()
    seen.add("w1", 1)
    seen.add("w2", 1)
    rows = Rows(keys=np.array([1, 2], dtype=np.uint64), values=np.ones((2, 1)))
    partly.note_piece(rows, [("w1", 7), ("w2", 7)])
    partly.note_copy(Range(0, 10), ["w1", "w2"], np.array([1, 1], np.uint64), np.array([9, 9], np.uint64))
    seen.forget("w1")
    partly.forget("w1")
    assert ("w1", 1) not in seen and ("w2", 1) in seen and seen.senders() == {"w2"}
    assert partly.not_applied(rows, [("w1", 7)]) is rows and partly.not_applied(rows, [("w1", 9)]) is rows
    assert partly.not_applied(rows, [("w2", 7)]) is None and partly.not_applied(rows, [("w2", 9)]) is None
    assert partly.senders() == {"w2"}


def test_activity_moves_with_every_new_or_resent_id_only():
    """(what a server watches before it forgets a departed worker's ids)"""
    seen = Seen()
    assert seen.activity("w") == 0
    seen.add("w", 1)
    a = seen.activity("w")
    assert ("w", 1) in seen and seen.activity("w") == a  # looking is not activity
    seen.touch("w", 1)
    assert seen.activity("w") > a
    b = seen.activity("w")
    seen.add("v", 1)
    seen.touch("w", 2)  # an id it does not hold
    assert seen.activity("w") == b
    seen.note_activity("w")  # its ids arrived with a range copy
    assert seen.activity("w") > b
    seen.forget("w")
    assert seen.activity("w") == 0 and seen.senders() == {"v"}


def test_ids_applied_over_the_same_ranges_share_one_tuple_of_them():
    """A forward holding part of a push (decision 97) is noted by its ranges; pushes over the
    same ranges keep one tuple between them, and an id noted twice gains only new ranges."""
    partly = PartlyApplied(window=8)
    a, b = Range(0, 10), Range(20, 30)
    for rid in range(5):
        partly.note_ranges("W1", rid, (a, b))
    assert len({id(partly._copies_of(("W1", rid))) for rid in range(5)}) == 1
    partly.note_ranges("W1", 0, (b, Range(40, 50)))
    assert partly.applied_in("W1", 0) == [a, b, Range(40, 50)] and partly.applied_in("W1", 1) == [a, b]
    rows = Rows(keys=np.array([5, 15, 25, 45], dtype=np.uint64), values=np.ones((4, 1), np.float32))
    assert partly.not_applied(rows, [("W1", 1)]).keys.tolist() == [15, 45]

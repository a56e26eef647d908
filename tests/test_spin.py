"""When a reader keeps checking its socket (psd/transport/spin.py): pure logic."""
from psd.transport.spin import Spin


def test_no_budget_no_spin():
    spin = Spin()
    assert not spin
    assert spin.budget(1.0) == 0.0


def test_a_fixed_budget_spins_whatever_the_gaps():
    spin = Spin(fixed=0.001)
    assert spin.budget(1.0) == 0.001
    spin.arrived(5.0)  # long after
    assert spin.budget(6.0) == 0.001


def test_an_adaptive_budget_spins_only_after_close_requests_in_a_row():
    spin = Spin(adaptive=0.0003)
    assert spin
    assert spin.budget(1.0) == 0.0  # no request seen yet after a dry queue
    spin.arrived(1.0002)  # 200 us after the queue ran dry: a request-reply loop?
    assert spin.budget(1.0005) == 0.0  # one close gap is not yet a loop
    spin.arrived(1.0007)
    assert spin.budget(1.0009) == 0.0  # nor two (a pull, a push, a clock)
    spin.arrived(1.001)
    assert spin.budget(1.0012) == 0.0003  # three in a row: spin
    spin.arrived(1.0014)
    assert spin.budget(1.0016) == 0.0003
    for start in (1.0116, 1.0220):  # iterations 10 ms apart: a pull, a push, a clock
        spin.arrived(start)
        for t in (start + 0.0002, start + 0.0004):
            assert spin.budget(t) == 0.0
            spin.arrived(t + 0.0001)
        assert spin.budget(start + 0.0006) == 0.0


def test_the_gap_counts_from_the_first_time_the_queue_ran_dry():
    """A reader may find the queue dry several times before the next request (a spin
    pass that ran out, then the loop's next pass): the gap is from the first."""
    spin = Spin(adaptive=0.0003)
    for t in (1.0, 1.001, 1.002):
        spin.budget(t)
        spin.arrived(t + 0.0001)
    assert spin.budget(2.0) == 0.0003
    spin.budget(2.00025)
    spin.arrived(2.0004)  # 400 us after it first ran dry, 150 us after the second look
    assert spin.budget(2.001) == 0.0

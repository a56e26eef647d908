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


def test_an_adaptive_budget_spins_only_after_a_close_request():
    spin = Spin(adaptive=0.0003)
    assert spin
    assert spin.budget(1.0) == 0.0  # no request seen yet after a dry queue
    spin.arrived(1.0002)  # 200 us after the queue ran dry: a request-reply loop
    assert spin.budget(1.0005) == 0.0003
    spin.arrived(1.0007)
    assert spin.budget(1.0009) == 0.0003
    spin.arrived(1.0109)  # 10 ms later: the client computes between requests
    assert spin.budget(1.011) == 0.0
    spin.arrived(1.0112)
    assert spin.budget(1.0115) == 0.0003


def test_the_gap_counts_from_the_first_time_the_queue_ran_dry():
    """A reader may find the queue dry several times before the next request (a spin
    pass that ran out, then the loop's next pass): the gap is from the first."""
    spin = Spin(adaptive=0.0003)
    spin.budget(1.0)
    spin.arrived(1.0001)
    spin.budget(2.0)
    spin.budget(2.00025)
    spin.arrived(2.0004)  # 400 us after it first ran dry, 150 us after the second look
    assert spin.budget(2.001) == 0.0

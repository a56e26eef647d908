"""The scheduler's job book as plain logic: ranks, released shards, repeated reports."""
from psd.cluster.jobs import JobBook


def test_a_resent_report_is_applied_once():
    book = JobBook()
    job = book.submit({"app": "x"}, 2)
    book.poll("W0")
    book.report(job.id, 0, metrics=[{"epoch": 1}], seq=1, reporter="W0")
    book.report(job.id, 0, metrics=[{"epoch": 1}], seq=1, reporter="W0")  # the answer was lost
    book.report(job.id, 0, metrics=[{"epoch": 2}], seq=2, reporter="W0")
    assert job.metrics == [{"epoch": 1}, {"epoch": 2}]


def test_a_dead_workers_shard_goes_to_the_next_poller_and_only_done_ends_the_job():
    book = JobBook()
    job = book.submit({"app": "x"}, 2)
    assert book.poll("W0")[1] == 0 and book.poll("W1")[1] == 1
    assert book.poll("W2") is None
    assert book.release("W1") == [(job.id, 1)]
    assert book.poll("W2") == (job, 1)
    book.report(job.id, 0, done=True, seq=1, reporter="W0")
    assert job.state == "running"
    book.report(job.id, 1, done=True, seq=1, reporter="W2")  # its own sequence, not W1's
    assert job.state == "done" and job.shards_done == {0, 1}
    assert book.poll("W0") is None  # nothing left to take

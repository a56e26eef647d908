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


def test_only_the_newest_ended_jobs_are_kept():
    book = JobBook()
    jobs = [book.submit({"app": "x"}, 1) for _ in range(5)]
    for job in jobs[:4]:
        book.poll("W0")
        book.report(job.id, 0, done=True)
    jobs[0].tables_dropped = jobs[1].tables_dropped = True
    jobs[2].keep_tables = True
    # J4 ended but its tables are not dropped yet: kept until they are; J5 still runs
    assert book.prune_ended(1) == ["J1", "J2"]
    assert sorted(book.jobs) == ["J3", "J4", "J5"]
    assert book.forgotten("J1") and not book.forgotten("J3") and not book.forgotten("J6")
    assert not book.forgotten("W1") and not book.forgotten("J") and not book.forgotten("Jx")


def test_jobs_are_kept_by_when_they_ended():
    """A long job submitted before many short ones is the newest ended when it ends."""
    book = JobBook()
    long = book.submit({"app": "x"}, 1)
    book.poll("W0")
    short = []
    for _ in range(3):
        job = book.submit({"app": "x"}, 1)
        book.poll("W1")
        book.report(job.id, 0, done=True)
        job.tables_dropped = True
        short.append(job)
    book.report(long.id, 0, done=True)
    long.tables_dropped = True
    assert book.prune_ended(1) == [j.id for j in short]
    assert list(book.jobs) == [long.id]
    assert not book.forgotten("J05") and not book.forgotten("J²") and not book.forgotten("J0")

"""Summing apps count every item once across a worker's death (issue 16, item 4).

A job's pushes carry an identity that does not depend on which worker sends them
(``JobContext.once``: job, shard, push number). When a worker is SIGKILLed mid-job, the
scheduler gives its shard to another worker, which runs it again from the start; the
servers recognise the pushes they applied already, row by row (also on a replica that
took over, or after a range moved), and apply only the rest. Without the identities the
re-run's early pushes were counted twice.

Checked against exact counts computed in this process: the count-min sketch equals the
sketch of the exact counts, counter for counter; LDA's word-topic counts sum, per word,
to the number of tokens of that word in the training documents.
"""
from __future__ import annotations

import signal

import numpy as np

from conftest import JobUnderWay

import psd
from psd.apps import cms, lda

SETTINGS = dict(servers=2, replication=2, heartbeat_interval=0.1, worker_timeout=1.0)

CMS_JOB = {
    "name": "once-cms", "app": "cms", "keep_tables": True,
    "data": {"generator": "zipf", "seed": 5, "items": 3_000_000, "vocabulary": 50_000, "exponent": 1.1},
    "sketch": {"epsilon": 0.01, "delta": 0.05, "seed": 3},
    "train": {"batch_size": 1 << 15, "in_flight": 2, "report_every": 1},
    "eval": {"queries": 50, "heavy": 10},
}

LDA_JOB = {
    "name": "once-lda", "app": "lda", "keep_tables": True, "consistency": "sequential",
    "data": {"generator": "planted", "seed": 7, "documents": 400, "vocabulary": 300, "doc_length": 60,
             "dominant_words": 10, "dominant_mass": 0.7, "doc_alpha": 0.1},
    "model": {"topics": 5, "alpha": 0.1, "beta": 0.01, "dtype": "int32"},
    "train": {"iterations": 40, "blocks": 16},
    "eval": {"heldout": 0.1, "every": 100, "patience": 2, "tol": 0.002},
}


def _run_killing_one(cluster, job: dict, at: float, server: bool = False) -> tuple[str, dict]:
    """Submit ``job`` to two ranks with three worker daemons; SIGKILL rank 1's worker
    once its progress passes ``at``; the spare worker runs rank 1 again (``server``: and
    a server is SIGKILLed too, so its replicas take over and ranges move meanwhile). The
    final status."""
    run = JobUnderWay(cluster, job, ranks=2, daemons=3)
    victim_id, victim = run.worker(1, above=at)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(5)
    if server:
        cluster.kill_server(1)
    final = run.end(180)
    assert final["state"] == "done", final.get("error")
    assert final["ranks"]["1"] != victim_id  # run again, by another worker
    assert any(m.get("event") == "shard_released" and m["rank"] == 1 for m in final["metrics"])
    return run.id, final


def test_count_min_counts_every_item_once_across_a_killed_worker_and_server():
    with psd.LocalCluster(**{**SETTINGS, "servers": 3}) as cluster:
        job_id, final = _run_killing_one(cluster, CMS_JOB, at=0.3, server=True)
        opts = cms.options(CMS_JOB)
        width, depth = cms.sketch_shape(opts["sketch"])
        ids, counts = cms.exact_counts(opts["data"], 2)
        want = cms.CountMin(width, depth, int(opts["sketch"]["seed"])).batch_counters(ids, counts)
        want = want.reshape(depth, width)
        with psd.connect(cluster.scheduler, namespace=job_id) as kv:
            table = kv.table("sketch", width=1, dtype="int64", updater="sum", consistency="eventual")
            got = np.stack([table.pull(np.arange(r * cms.stride(depth), r * cms.stride(depth) + width,
                                                 dtype=np.uint64))[:, 0] for r in range(depth)])
        assert (got.sum(axis=1) == counts.sum()).all(), \
            f"items in each sketch row: {got.sum(axis=1).tolist()}, in the stream: {int(counts.sum())}"
        assert np.array_equal(got, want), f"{int((got != want).sum())} of {got.size} counters differ"


def test_lda_counts_every_token_once_across_a_killed_worker():
    with psd.LocalCluster(**SETTINGS) as cluster:
        job_id, final = _run_killing_one(cluster, LDA_JOB, at=0.2)
        opts = lda.options(LDA_JOB)
        topics = int(opts["model"]["topics"])
        corpus = lda.make_corpus(opts["data"], topics)
        held = lda.heldout_split(corpus.num_docs, float(opts["eval"]["heldout"]), int(opts["eval"]["seed"]))
        training = lda.subset(corpus, np.flatnonzero(~held))
        want = np.bincount(training.words, minlength=corpus.num_words)
        present = np.flatnonzero(want)
        with psd.connect(cluster.scheduler, namespace=job_id) as kv:
            table = kv.table("nwk", width=topics, dtype="int32", updater="sum", consistency="sequential",
                             num_workers=2)
            keys = lda.word_keys(present)
            order = np.argsort(keys)
            rows = np.empty((present.size, topics), np.int32)
            rows[order] = table.pull(keys[order])
        bad = np.flatnonzero(rows.sum(axis=1) != want[present])
        assert bad.size == 0, (f"{bad.size} of {present.size} words hold another count than their tokens, e.g. "
                               f"word {int(present[bad[0]])}: {int(rows[bad[0]].sum())} vs {int(want[present[bad[0]]])}")

"""The L1 logistic-regression job with its default kkt filter against the same job with
``filters: []``: the same objective (within 0.5%) and support (Jaccard >= 0.95), far
fewer gradient rows pushed; bytes per stage in metrics.jsonl and the summary; bad
filter settings in a job file refused at load, naming the key."""
from __future__ import annotations

import json

import numpy as np
import pytest

import psd
from psd.apps import APPS
from psd.apps.model import read_model
from psd.errors import ConfigError
from psd.jobs.runner import run_parsed
from psd.jobs.spec import parse_job


def job(out, **extra) -> dict:
    return {"name": "kkt", "app": "logreg", "servers": 2, "workers": 2, "output": str(out),
            "consistency": "sequential",  # (the same weights every run: what differs is kkt's doing)
            "data": {"examples": 20_000, "features": 30_000, "nnz": 20, "seed": 3},
            "train": {"l1": 1e-4, "blocks": 8, "passes": 10, "tol": 0}, "model": {"save": True}, **extra}


def support(folder) -> set:
    arrays, _ = read_model(folder, "logreg")
    return set(arrays["keys"][arrays["w"] != 0].tolist())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in (("kkt", {}), ("none", {"filters": []})):
        folder = tmp_path_factory.mktemp(name)
        spec = parse_job(job(folder, **extra), f"{name}.yaml", APPS)
        run = run_parsed(spec, APPS, psd.LocalCluster.for_job, output=folder, quiet=True, plots=False)
        assert run.state == "done", run.error
        out[name] = run
    return out


def test_kkt_reaches_the_same_objective_and_support(runs):
    kkt, none = runs["kkt"], runs["none"]
    assert kkt.summary["objective"] == pytest.approx(none.summary["objective"], rel=0.005)
    a, b = support(kkt.output), support(none.output)
    assert len(b) > 50 and len(a & b) / len(a | b) >= 0.95


def test_kkt_pushes_fewer_rows_and_bytes_counted_by_stage(runs):
    kkt, none = runs["kkt"], runs["none"]
    rec = {n: next(r for r in run.metrics if r.get("record") == "traffic") for n, run in runs.items()}
    sent, pushed = map(int, rec["kkt"]["filtered_rows"]["w"].split("/"))
    assert sent < 0.7 * pushed  # (a third of the rows or more skipped, rechecks every 3rd pass included)
    assert "filtered_rows" not in rec["none"]
    assert rec["kkt"]["workers_sent_wire"] < 0.8 * rec["none"]["workers_sent_wire"]
    assert rec["kkt"]["servers_sent_wire"] < 0.8 * rec["none"]["servers_sent_wire"]
    for r in rec.values():
        assert r["workers_sent_before_filters"] >= r["workers_sent_raw"] >= r["workers_sent_after_kc"] > 0
    lines = [json.loads(x) for x in (kkt.output / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["record"] == "traffic"
    summary = json.loads((kkt.output / "summary.json").read_text())
    assert 0 < summary["workers_saved"] < 1 and summary["bytes_servers_sent_wire"] > 0


@pytest.mark.parametrize("filters,needle", [
    (["kkt", {"significant": {"threshold": 0.1}}], "filters[1]: filter 'significant' holds rows back"),
    ([{"kkt": {"delta": 0.5}}], "filters[0].delta: expected a number below l1"),
    ([{"quantize": {"to": "int3"}}], "filters[0].to: expected float16 or int8"),
    (["gzip"], "filters[0]: unknown filter 'gzip'"),
])
def test_bad_filters_in_a_job_are_refused_at_load(tmp_path, filters, needle):
    with pytest.raises(ConfigError) as err:
        parse_job(job(tmp_path, filters=filters), "job.yaml", APPS)
    assert "job.yaml: " + needle in str(err.value)


def test_kkt_under_eventual_is_refused(tmp_path):
    spec = job(tmp_path, filters=["kkt"])
    spec["consistency"] = "eventual"
    with pytest.raises(ConfigError, match=r"filters\[0\]: kkt with the prox solver needs consistency"):
        parse_job(spec, "job.yaml", APPS)


# -- filters on the summing apps: count-min's sketch and LDA's word-topic counts -----------
CMS_DATA = {"generator": "zipf", "items": 1_000_000, "vocabulary": 20_000, "seed": 5}   # 16 blocks: 8 batches a worker


def cms_job(out, filters) -> dict:
    return {"name": "cmsf", "app": "cms", "servers": 2, "workers": 2, "output": str(out), "filters": filters,
            "data": CMS_DATA, "sketch": {"width": 500, "depth": 3, "seed": 2},
            "train": {"batch_size": 1 << 16}, "eval": {"queries": 200, "heavy": 20}}


def lda_job(out, filters) -> dict:
    return {"name": "ldaf", "app": "lda", "servers": 2, "workers": 2, "output": str(out), "filters": filters,
            "consistency": "sequential",
            "data": {"documents": 200, "vocabulary": 300, "doc_length": 40, "dominant_words": 8, "seed": 2},
            "model": {"topics": 5}, "train": {"iterations": 6, "blocks": 4}, "eval": {"heldout": 0}}


def run_job(spec, folder):
    run = run_parsed(parse_job(spec, "job.yaml", APPS), APPS, psd.LocalCluster.for_job, output=folder,
                     quiet=True, plots=False)
    assert run.state == "done", run.error
    return run, next(r for r in run.metrics if r.get("record") == "traffic")


def rows_let_through(traffic: dict, table: str) -> tuple[int, int]:
    sent, pushed = map(int, traffic["filtered_rows"][table].split("/"))
    return sent, pushed


@pytest.fixture(scope="module")
def exact_sketch():
    from psd.apps import cms
    sketch = cms.CountMin(500, 3, seed=2)
    sketch.add(*cms.exact_counts(cms.options({"data": CMS_DATA})["data"], 2))
    return sketch.counts.reshape(3, 500)


@pytest.mark.parametrize("filters", [
    [{"zstd": {"level": 3, "threshold": 0}}],            # lossless (with key caching, on by default)
    [{"significant": {"threshold": 100}}, "zstd"],       # lossy until the flush: held-back counts
], ids=["zstd", "significant"])
def test_cms_with_filters_counts_exactly(tmp_path, exact_sketch, filters):
    """The sketch a filtered job leaves equals the exact one (the same hash functions over
    the exact counts of the stream): zstd and key caching lose nothing, and
    ``significant``'s held-back counts all arrive with the flush before queries."""
    run, traffic = run_job(cms_job(tmp_path, filters), tmp_path)
    arrays, _ = read_model(tmp_path, "cms")
    assert np.array_equal(arrays["counts"], exact_sketch)
    assert run.summary["underestimates"] == 0
    if "significant" in str(filters):
        sent, pushed = rows_let_through(traffic, "sketch")
        assert sent < 0.9 * pushed                 # it did hold counters back
    else:   # a dense row's key list is the same every batch: sent once, then its signature
        assert traffic["workers_sent_after_kc"] < 0.8 * traffic["workers_sent_raw"]
        assert traffic["workers_sent_wire"] < traffic["workers_sent_after_kc"]   # zstd squeezed


def test_lda_with_filters_keeps_every_count(tmp_path):
    """``significant`` holds back small count changes (the samplers read counts up to
    ``threshold`` per cell per worker behind); the flush at the end sends them, so the
    table adds up to the corpus exactly and no cell goes negative."""
    run, traffic = run_job(lda_job(tmp_path, [{"significant": {"threshold": 2}}, "zstd"]), tmp_path)
    assert run.summary["counts_total"] == run.summary["tokens"] > 0
    arrays, _ = read_model(tmp_path, "lda")
    assert arrays["nwk"].min() >= 0 and arrays["nwk"].sum() == run.summary["tokens"]
    sent, pushed = rows_let_through(traffic, "nwk")
    assert sent < pushed


@pytest.mark.parametrize("make,filters,needle", [
    (cms_job, ["quantize"], "filters[0]: filter 'quantize' changes values; table 'sketch' holds int64"),
    (cms_job, [{"significant": {}}], "filters[0].threshold: missing"),
    (lda_job, ["kkt"], "filters[0]: filter 'kkt' changes values; table 'nwk' holds int32"),
    (lda_job, [{"zstd": {"level": 99}}], "filters[0].level"),
])
def test_bad_filters_in_cms_and_lda_jobs_are_refused_naming_the_key(tmp_path, make, filters, needle):
    with pytest.raises(ConfigError) as err:
        parse_job(make(tmp_path, filters), "job.yaml", APPS)
    assert str(err.value).count("job.yaml: " + needle) == 1   # named once, by the job and the app

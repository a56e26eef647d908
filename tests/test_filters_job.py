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

"""The psd command as a user meets it: psd run, bad job files, psd status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import psd

PSD = [sys.executable, "-m", "psd"]


def run_psd(*args, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*PSD, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


SMALL_JOB = {
    "name": "small", "app": "logreg_sgd", "servers": 2, "workers": 2,
    "data": {"generator": "sparse_logreg", "seed": 7, "examples": 20000, "features": 100000, "nnz": 15},
    "train": {"epochs": 3, "batch_size": 250},   # the data-scaled step
}


def write_job(tmp_path: Path, job: dict | str, name="job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(job if isinstance(job, str) else yaml.safe_dump(job))
    return path


def test_psd_run_trains_and_writes_outputs(tmp_path):
    out = tmp_path / "out"
    job = write_job(tmp_path, {**SMALL_JOB, "output": str(out)})
    res = run_psd("run", str(job), "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "small: done" in res.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "test_logloss" in r]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    assert evals[-1]["test_logloss"] < evals[0]["test_logloss"] < 0.6931  # learns from zero weights
    assert evals[-1]["test_auc"] > 0.7
    workers = {r["series"] for r in records if "series" in r}
    assert workers == {"worker0", "worker1"}  # both ranks trained and reported
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "done" and summary["examples"] == 18000  # both shards counted
    assert 0.5 < summary["learning_rate"] < 5   # 8 / (2 workers x lambda_max ~ 2): measured 1.6
    for png in ("loss.png", "auc.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("job, expect", [
    ({k: v for k, v in SMALL_JOB.items() if k != "app"}, "app: missing"),
    ({**SMALL_JOB, "workers": "two"}, "workers: expected a positive integer, got 'two'"),
    ({**SMALL_JOB, "app": "nosuchapp"}, "app: unknown app 'nosuchapp'"),
    ({**SMALL_JOB, "train": {"epochs": 0}}, "train.epochs: expected a positive integer"),
    ({**SMALL_JOB, "colour": "red"}, "unknown key 'colour'"),
    ({**SMALL_JOB, "cluster": {"heartbeat_interval": -1}}, "heartbeat_interval: expected a positive number"),
    ("app: [unclosed\n", "not valid YAML at line"),
    ("- just\n- a list\n", "expected a map at the top level"),
])
def test_bad_job_file_exits_2_with_one_clear_line(tmp_path, job, expect):
    path = write_job(tmp_path, job)
    res = run_psd("run", str(path), timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and expect in lines[0]


def test_unreadable_job_file_exits_2(tmp_path):
    missing = tmp_path / "nope.yaml"
    res = run_psd("run", str(missing), timeout=60)
    assert res.returncode == 2
    assert str(missing) in res.stderr and "cannot read" in res.stderr


def test_status_cli_human_and_json():
    with psd.LocalCluster(servers=2, heartbeat_interval=0.1) as cluster:
        with psd.connect(cluster.scheduler) as kv:
            w = kv.table("emb", width=4, dtype="float64", updater="sum")
            keys = np.arange(0, 2**64 - 2**59, 2**59, dtype=np.uint64)  # spans both ranges
            kv.wait(w.push(keys, np.ones((keys.size, 4))))
            deadline = time.monotonic() + 10
            while cluster.status()["tables"]["emb"]["keys"] != keys.size:  # carried on heartbeats
                assert time.monotonic() < deadline, cluster.status()["tables"]
                time.sleep(0.05)
            res = run_psd("status", "--scheduler", cluster.scheduler, "--json", timeout=30)
            assert res.returncode == 0, res.stderr
            st = json.loads(res.stdout)
            servers = [n for n in st["nodes"] if n["role"] == "server"]
            assert len(servers) == 2 and all(n["state"] == "active" for n in servers)
            assert st["tables"]["emb"]["keys"] == keys.size
            assert st["tables"]["emb"]["bytes"] >= keys.size * (8 + 32)
            owners = [r["owners"] for r in st["ranges"]]
            assert {o[0] for o in owners} == {"S0", "S1"} and all(len(o) == 1 for o in owners)
            assert st["ranges"][0]["begin"] == 0 and st["ranges"][-1]["last"] == 2**64 - 1
            assert sum(n["counters"].get("push", 0) for n in servers) == 2  # one push cut in two
            time.sleep(0.5)  # idle longer than 3 heartbeat intervals: still alive (heartbeat thread)
            human = run_psd("status", "--scheduler", cluster.scheduler, timeout=30)
            assert human.returncode == 0
            assert "emb" in human.stdout and "S1" in human.stdout and "3/3 active" in human.stdout


def test_status_without_scheduler_says_so():
    res = run_psd("status", "--scheduler", "tcp://127.0.0.1:1", "--security", "none", timeout=30)
    assert res.returncode == 1
    assert "no answer from the scheduler at tcp://127.0.0.1:1" in res.stderr
    env = {k: v for k, v in os.environ.items() if k != "PSD_KEYS"}
    keyless = subprocess.run([*PSD, "status", "--scheduler", "tcp://127.0.0.1:1"], capture_output=True, text=True,
                             timeout=30, env=env)
    assert keyless.returncode == 1
    assert "no CurveZMQ keys for the cluster at tcp://127.0.0.1:1: set PSD_KEYS" in keyless.stderr


def test_submit_to_a_running_cluster_of_daemons(tmp_path):
    """`psd submit` takes the path `psd run` takes, on daemons already running: worker
    daemons (not started for the job) pick up its shards."""
    from psd.local import daemon_argv
    out = tmp_path / "out"
    job = write_job(tmp_path, {**SMALL_JOB, "output": str(out), "workers": 2})
    with psd.LocalCluster(servers=2) as cluster:
        workers = [cluster.spawn(f"w{i}", daemon_argv("worker", "--config", str(cluster.config_path),
                                                      "--scheduler", cluster.scheduler)) for i in range(2)]
        res = run_psd("submit", str(job), "--scheduler", cluster.scheduler, "--follow", "--quiet")
        assert res.returncode == 0, res.stderr[-2000:]
        assert "submitted to" in res.stdout and "small: done" in res.stdout
        st = cluster.status()
        assert st["jobs"][0]["state"] == "done" and st["jobs"][0]["shards_done"] == [0, 1]
        ranks = set(st["jobs"][0]["ranks"].values())
        assert ranks == {w.ready_path.read_text().strip() for w in workers}  # both daemons worked
        assert all(w.proc.poll() is None for w in workers)  # and stay up for the next job
        assert (out / "loss.png").exists() and (out / "metrics.jsonl").read_text()


def test_a_straggling_worker_is_named_in_the_jobs_metrics(tmp_path):
    out = tmp_path / "out"
    job = write_job(tmp_path, {
        **SMALL_JOB, "output": str(out), "workers": 3, "consistency": "eventual",
        "cluster": {"straggler_lag": 3},
        "train": {**SMALL_JOB["train"], "slow_rank": 2, "slow_seconds": 0.06}})
    res = run_psd("run", str(job), "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r.get("event") == "straggler"]
    assert events, "no straggler event in metrics.jsonl"
    assert all(e["lag"] > 3 for e in events)
    # the slowed rank is named (a worker that starts late can lag for a moment too)
    by_rank = {r: sum(e["rank"] == r for e in events) for r in {e["rank"] for e in events}}
    assert 2 in by_rank, events


def test_psd_run_output_folder_receives_the_model(tmp_path):
    """`psd run --output DIR` passes DIR on to the workers: the model (here a count-min
    sketch, with no `sketch.save` in the file) lands in DIR, not in the file's `output`."""
    from psd.apps import cms
    job = write_job(tmp_path, {
        "name": "tiny-cms", "app": "cms", "servers": 1, "workers": 2, "output": "from-file",
        "data": {"generator": "zipf", "seed": 3, "items": 200_000, "vocabulary": 5000, "exponent": 1.1},
        "sketch": {"epsilon": 0.01, "delta": 0.05}, "eval": {"queries": 50, "heavy": 10}})
    res = run_psd("run", str(job), "--quiet", "--output", "given", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    model = cms.Model.load(tmp_path / "given")        # model.json + model.npz beside summary.json
    assert (tmp_path / "given" / "summary.json").is_file()
    assert int(model.counts.sum()) == 200_000 * model.depth   # every item once per row
    assert not (tmp_path / "from-file").exists()


@pytest.mark.parametrize("name", ["logreg", "cms", "lda"])
def test_shipped_jobs_save_their_model_in_the_run_folder(name):
    from psd.apps import APPS
    from psd.apps.model import save_folder
    from psd.jobs.runner import _submitted
    from psd.jobs.spec import load_job
    job = load_job(str(Path(__file__).resolve().parent.parent / "configs" / "jobs" / f"{name}.yaml"), APPS)
    spec = _submitted(job, Path("/somewhere/run"))
    section = "sketch" if name == "cms" else "model"
    assert save_folder(spec[section].get("save"), spec) == "/somewhere/run"

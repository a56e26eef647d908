"""Several jobs on one long-lived cluster: each job's tables live in its own namespace
(``<job id>/<name>``), `psd status` lists jobs with their tables, and a job's tables are
dropped when it ends unless its file says ``keep_tables: true``. Clients outside any
job keep the default namespace (plain names)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import psd
from psd.client import admin
from psd.errors import ConfigError
from psd.apps import APPS
from psd.jobs.spec import parse_job
from psd.local import daemon_argv
from conftest import wait_for

TOP = 2**64 - 1
KEYS = np.array([0, 17, 2**63, TOP], dtype=np.uint64)


def server_memory(st: dict) -> int:
    """Table bytes on every server together, as their last heartbeats said."""
    return sum((n.get("memory") or {}).get("bytes", 0) for n in st["nodes"] if n["role"] == "server")


@pytest.fixture(scope="module")
def cluster():
    with psd.LocalCluster(servers=2, replication=2) as c:
        yield c


def test_two_namespaces_do_not_collide(cluster):
    with psd.connect(cluster, namespace="ja") as a, psd.connect(cluster, namespace="jb") as b, \
            psd.connect(cluster) as plain:
        wa, wb, w = a.table("w", dtype="int64"), b.table("w", dtype="int64"), plain.table("w", dtype="int64")
        assert (wa.name, wb.name, w.name) == ("ja/w", "jb/w", "w")
        a.wait(wa.push(KEYS, np.full(4, 1, np.int64)))
        b.wait(wb.push(KEYS, np.full(4, 2, np.int64)))
        plain.wait(w.push(KEYS, np.full(4, 3, np.int64)))
        assert wa.pull(KEYS).ravel().tolist() == [1] * 4
        assert wb.pull(KEYS).ravel().tolist() == [2] * 4
        assert w.pull(KEYS).ravel().tolist() == [3] * 4
        # a namespace cannot reach into another; the default namespace names them in full
        assert a.table("jb/w", dtype="int64").name == "ja/jb/w"
        assert plain.table("jb/w", dtype="int64").pull(KEYS).ravel().tolist() == [2] * 4
        # the same name may have other settings in another namespace
        assert b.table("v", width=3).spec.width == 3 and a.table("v", width=1).spec.width == 1
        tables = cluster.status()["tables"]
        assert {"w", "ja/w", "jb/w", "ja/v", "jb/v", "ja/jb/w"} <= set(tables)
        assert tables["ja/w"]["namespace"] == "ja" and tables["w"]["namespace"] is None


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 65, 7])
def test_a_bad_namespace_is_refused_before_connecting(bad):
    with pytest.raises(psd.BadRequestError, match="namespace"):
        psd.connect("tcp://127.0.0.1:1", namespace=bad)


def test_dropping_a_namespace_frees_every_copy(cluster):
    with psd.connect(cluster, namespace="gone") as kv, psd.connect(cluster) as plain:
        keep = plain.table("stays", dtype="float64")
        plain.wait(keep.push(KEYS, np.ones(4)))
        t = kv.table("big", width=8, dtype="float64")
        keys = np.arange(0, TOP - 2**50, 2**50, dtype=np.uint64)  # spread over both servers
        kv.wait(t.push(keys, np.ones((keys.size, 8))))
        kv.table("small")
        st = wait_for(lambda: (lambda s: s if s["tables"]["gone/big"]["keys"] == 2 * keys.size else None)(
            cluster.status()), 10, "the heartbeats to carry the push")
        before = server_memory(st)
        assert before >= 2 * keys.size * (8 + 64)  # two copies
        reply = admin.call(cluster.scheduler, "drop_tables", namespace="gone")
        assert sorted(reply["dropped"]) == ["gone/big", "gone/small"]
        st = cluster.status()
        assert not [n for n in st["tables"] if n.startswith("gone/")]
        wait_for(lambda: server_memory(cluster.status()) <= before - 2 * keys.size * (8 + 64), 10,
                 "the servers to free the namespace")
        with pytest.raises(psd.UnknownTableError):
            kv.wait(t.push(keys[:1], np.ones((1, 8))))
        assert keep.pull(KEYS).ravel().tolist() == [1.0] * 4  # other namespaces are untouched
        fresh = kv.table("big", width=8, dtype="float64")  # a new table, empty
        np.testing.assert_array_equal(fresh.pull(keys[:2]), np.zeros((2, 8)))


def test_drop_requests_are_checked(cluster):
    for meta, code in [({}, psd.BadRequestError), ({"namespace": "a", "tables": ["x"]}, psd.BadRequestError),
                       ({"namespace": "a/b"}, psd.BadRequestError), ({"tables": "w"}, psd.BadRequestError),
                       ({"tables": ["w", "no-such-table"]}, psd.UnknownTableError)]:
        with pytest.raises(code):
            admin.call(cluster.scheduler, "drop_tables", **meta)
    assert admin.call(cluster.scheduler, "drop_tables", namespace="never-used")["dropped"] == []


def test_psd_drop_cli(cluster):
    with psd.connect(cluster, namespace="cli") as kv:
        kv.table("a")
        kv.table("b")
    psd_ = [sys.executable, "-m", "psd", "drop", "--scheduler", cluster.scheduler]
    res = subprocess.run([*psd_, "cli/a"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "dropped 1 table(s): cli/a" in res.stdout, res.stderr
    res = subprocess.run([*psd_, "--namespace", "cli"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "dropped 1 table(s): cli/b" in res.stdout, res.stderr
    res = subprocess.run(psd_, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "--namespace" in res.stderr
    assert not [n for n in cluster.status()["tables"] if n.startswith("cli/")]


# -- jobs -------------------------------------------------------------------------------------
def job(name: str, seed: int, **extra) -> dict:
    """A small logreg_sgd job; its 14 minibatches sleep 20 ms each, so that it lasts several
    of the tests' status polls (about 70 ms without: a poll could miss its table)."""
    return {"name": name, "app": "logreg_sgd", "workers": 1,
            "data": {"generator": "sparse_logreg", "seed": seed, "examples": 3000, "features": 2000, "nnz": 8},
            "train": {"epochs": 1, "batch_size": 200, "learning_rate": 0.5, "slow_rank": 0, "slow_seconds": 0.02},
            **extra}


def test_the_job_book_keeps_the_choice():
    from psd.cluster.jobs import JobBook
    book = JobBook()
    kept, dropped = book.submit({"app": "x", "name": "a", "keep_tables": True}, 1), book.submit({"app": "x"}, 1)
    assert (kept.keep_tables, dropped.keep_tables) == (True, False)
    d = kept.to_dict()
    assert (d["name"], d["namespace"], d["keep_tables"], d["tables_dropped"]) == ("a", kept.id, True, False)
    book.report(dropped.id, 0, done=True)
    assert dropped.ended and not kept.ended


def test_keep_tables_is_checked(cluster):
    assert parse_job(job("k", 1), "job.yaml", APPS).keep_tables is False
    assert parse_job(job("k", 1, keep_tables=True), "job.yaml", APPS).keep_tables is True
    with pytest.raises(ConfigError) as e:
        parse_job(job("k", 1, keep_tables="yes"), "job.yaml", APPS)
    assert str(e.value) == ("job.yaml: keep_tables: expected true (keep the job's tables when it ends) "
                            "or false (drop them, the default), got 'yes'")
    with pytest.raises(psd.BadRequestError, match="keep_tables"):
        admin.call(cluster.scheduler, "submit", job=job("k", 1, keep_tables="yes"), workers=1)
    assert not cluster.status()["jobs"]


def test_two_jobs_on_one_cluster_keep_or_drop_their_tables():
    """Two logreg_sgd jobs (both write table "w") run at once on long-lived worker
    daemons: each gets its own "<job>/w". The one with keep_tables keeps it; the other's
    tables are dropped on every server when it ends, so the servers' memory goes down."""
    with psd.LocalCluster(servers=2, replication=2) as cluster:
        workers = [cluster.spawn(f"w{i}", daemon_argv("worker", "--config", str(cluster.config_path),
                                                     "--scheduler", cluster.scheduler)) for i in range(2)]
        kept = admin.call(cluster.scheduler, "submit", job=job("kept", 1, keep_tables=True), workers=1)["job"]
        dropped = admin.call(cluster.scheduler, "submit", job=job("dropped", 2), workers=1)["job"]
        seen: set[str] = set()

        def both_done():
            st = cluster.status()
            seen.update(st["tables"])
            jobs = {j["id"]: j for j in st["jobs"]}
            return st if all(jobs[j]["state"] == "done" for j in (kept, dropped)) else None

        st = wait_for(both_done, 120, "both jobs to finish")
        assert {f"{kept}/w", f"{dropped}/w"} <= seen, seen  # each job had its own "w"
        jobs = {j["id"]: j for j in st["jobs"]}
        assert jobs[kept]["keep_tables"] and not jobs[kept]["tables_dropped"]
        assert jobs[dropped]["tables_dropped"] and jobs[dropped]["tables"] == {}
        assert jobs[kept]["name"] == "kept" and jobs[kept]["namespace"] == kept
        assert not [n for n in st["tables"] if n.startswith(f"{dropped}/")]
        kept_tables = wait_for(lambda: (lambda t: t if t.get(f"{kept}/w", {}).get("keys") else None)(
            {j["id"]: j for j in cluster.status()["jobs"]}[kept]["tables"]), 10, "the kept table's size")
        # the servers hold the kept job's tables, and nothing of the dropped one's
        wait_for(lambda: (lambda s: server_memory(s) == sum(t["bytes"] for t in s["tables"].values()))(
            cluster.status()), 10, "heartbeats after the drop")
        # the kept model can be read back in the job's namespace
        spec = cluster.status()["tables"][f"{kept}/w"]
        with psd.connect(cluster, namespace=kept) as kv:
            w = kv.table("w", spec["width"], spec["dtype"], spec["updater"], **spec["options"])
            assert np.count_nonzero(w.pull(np.arange(2000, dtype=np.uint64))) > 100
        res = subprocess.run([sys.executable, "-m", "psd", "status", "--scheduler", cluster.scheduler, "--json"],
                             capture_output=True, text=True, timeout=60)
        listed = {j["id"]: j for j in json.loads(res.stdout)["jobs"]}
        assert set(listed[kept]["tables"]) == set(kept_tables) and listed[dropped]["tables"] == {}
        human = subprocess.run([sys.executable, "-m", "psd", "status", "--scheduler", cluster.scheduler],
                               capture_output=True, text=True, timeout=60).stdout
        row = next(line for line in human.splitlines() if line.startswith(f"{kept} "))
        assert "kept" in row and "keep" in row and "w" in row, human
        assert "dropped" in next(line for line in human.splitlines() if line.startswith(f"{dropped} "))
        # a kept namespace is dropped by hand; the servers' memory goes back to zero
        admin.call(cluster.scheduler, "drop_tables", namespace=kept)
        wait_for(lambda: server_memory(cluster.status()) == 0, 10, "the servers to free the kept job")
        assert all(w.proc.poll() is None for w in workers)


def test_bundled_apps_name_their_tables_plainly_in_the_job_namespace():
    """The apps no longer put the job id into their table names: the namespace does it,
    so job J<n> of app logreg writes ``J<n>/w``, not ``J<n>/logreg.J<n>.w``."""
    small = {
        "logreg": {"data": {"examples": 2000, "features": 2000, "nnz": 8}, "train": {"blocks": 4, "passes": 1}},
        "cms": {"data": {"items": 100_000, "vocabulary": 3000}, "sketch": {"width": 50, "depth": 3},
                "eval": {"queries": 100, "heavy": 10}},
        "lda": {"data": {"documents": 40, "vocabulary": 60, "doc_length": 10, "dominant_words": 3},
                "model": {"topics": 3}, "train": {"iterations": 2}},
    }
    want = {"logreg": {"w", "users", "info", "stats"}, "cms": {"sketch", "ranks"}, "lda": {"nwk", "stats", "ranks"}}
    with psd.LocalCluster(servers=1) as cluster:
        cluster.spawn("w0", daemon_argv("worker", "--config", str(cluster.config_path),
                                        "--scheduler", cluster.scheduler))
        ids = {app: admin.call(cluster.scheduler, "submit", workers=1,
                               job={"name": app, "app": app, "workers": 1, "keep_tables": True, **spec})["job"]
               for app, spec in small.items()}

        def all_done():
            st = cluster.status()
            jobs = {j["id"]: j for j in st["jobs"]}
            assert not [j for j in jobs.values() if j["state"] == "failed"], jobs
            return st if all(jobs[i]["state"] == "done" for i in ids.values()) else None

        st = wait_for(all_done, 120, "the three jobs to finish")
        assert set(st["tables"]) == {f"{ids[app]}/{name}" for app, names in want.items() for name in names}
        for app, job_id in ids.items():
            assert all(st["tables"][f"{job_id}/{name}"]["namespace"] == job_id for name in want[app])

"""A shared cluster: worker keys limited to some namespaces (``psd keygen --add --worker
NAME --namespace PATTERN``). Such a key reads and writes the tables of its namespaces
and takes part in the jobs whose ids match; anything else is refused (ForbiddenError,
nothing changed), on the scheduler and on the servers' data path alike (the small-pull
fast path included). Operator keys and unlimited worker keys keep every right. Real
daemons under CurveZMQ; the pattern logic also as pure functions."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

import psd
from psd.client import admin
from psd.codec import Message, encode
from psd.config import ClusterConfig
from psd.keyroles import in_scope, scope_of
from psd.transport import security

from conftest import RawDealer


def test_scopes_are_fnmatch_patterns_over_namespaces():
    peer = "worker:w7@J7,team-*"
    assert scope_of(peer) == ("J7", "team-*")
    assert scope_of("worker:w1") is None and scope_of("client:ops") is None and scope_of(None) is None
    assert in_scope(scope_of(peer), "J7") and in_scope(scope_of(peer), "team-a")
    assert not in_scope(scope_of(peer), "J70") and not in_scope(scope_of(peer), "J8")
    assert not in_scope(scope_of(peer), None)  # the default namespace is not theirs
    assert in_scope(None, None) and in_scope(None, "J8")


def test_keygen_writes_the_scope_beside_the_worker_key(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "psd", "keygen", str(tmp_path), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    assert run().returncode == 0
    out = run("--add", "--worker", "w7", "--namespace", "J7", "--namespace", "team-*")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "authorized" / "workers" / "w7.namespaces").read_text() == "J7\nteam-*\n"
    roles = set(security.AllowList(tmp_path / "authorized").load().values())
    assert "worker:w7@J7,team-*" in roles and "client:client" in roles
    bad = run("--add", "--client", "ops2", "--namespace", "J7")
    assert bad.returncode != 0 and "--namespace limits worker keys" in bad.stderr
    bad = run("--add", "--worker", "w8", "--namespace", "J7/w")
    assert bad.returncode != 0 and "namespace pattern 'J7/w'" in bad.stderr
    # listed again without --namespace: every namespace (the scope file goes)
    assert run("--add", "--force", "--worker", "w7").returncode == 0
    assert not (tmp_path / "authorized" / "workers" / "w7.namespaces").exists()
    assert "worker:w7" in set(security.AllowList(tmp_path / "authorized").load().values())


def _client_folder(c, name: str, dest) -> str:
    dest.mkdir()
    shutil.copy(c.keys / "server.key", dest)
    shutil.copy(c.keys / f"{name}.key_secret", dest)
    return str(dest)


def _forbidden(err_or_reply, *words: str) -> None:
    if isinstance(err_or_reply, Message):
        assert err_or_reply.op == "error" and err_or_reply.meta["code"] == "forbidden", err_or_reply.meta
        message = err_or_reply.meta["message"]
    else:
        message = str(err_or_reply)
    assert all(w in message for w in words) and "Nothing was changed" in message, message


@pytest.fixture
def shared(tmp_path):
    """A cluster (CurveZMQ) with a table in namespace J8 and one in the default
    namespace, written by the operator key, and a worker key w7 limited to J7."""
    with psd.LocalCluster(servers=2, replication=2) as c:
        security.keygen(c.keys, workers=["w7"], namespaces=["J7"], add=True)
        keys = np.array([1, 2, 2**40, 2**63], dtype=np.uint64)
        with psd.connect(c.scheduler) as ops:
            for name in ("J8/w", "shared"):
                ops.wait(ops.table(name, dtype="int64").push(keys, np.full((keys.size, 1), 5, np.int64)))
        yield c, keys, _client_folder(c, "w7", tmp_path / "w7")


def test_a_limited_worker_key_touches_only_its_namespaces(shared):
    c, keys, folder = shared
    with psd.connect(c.scheduler, ClusterConfig(keys=folder)) as kv:
        mine = kv.table("J7/w", dtype="int64")
        kv.wait(mine.push(keys, np.ones((keys.size, 1), np.int64)))
        np.testing.assert_array_equal(mine.pull(keys).ravel(), [1, 1, 1, 1])
        for name in ("J8/w", "shared"):
            with pytest.raises(psd.ForbiddenError) as err:
                kv.table(name, dtype="int64")
            _forbidden(err.value, f"table {name!r}", "worker key 'w7' (namespaces J7)")

    # the servers refuse it too, for a client that skips the scheduler: push, and a
    # small pull (the fast path) as well as a big one
    w7 = security.load_client(folder)
    ring = admin.call(c.scheduler, "status")["ring_version"]
    for address in c.status()["nodes"]:
        if address["role"] != "server":
            continue
        d = RawDealer(address["address"], curve=w7)
        try:
            push = Message("push", id=1, sender="W-raw", table="J8/w", ring=ring, meta={"rid": 1},
                           arrays=[keys, np.full((keys.size, 1), 100, np.int64)])
            _forbidden(d.exchange(encode(push)), "table 'J8/w'", "namespace 'J8'")
            for n in (3, 5000):
                pull = Message("pull", id=2 + n, sender="W-raw", table="shared", ring=ring, meta={"rid": 2 + n},
                               arrays=[np.arange(1, n + 1, dtype=np.uint64)])
                _forbidden(d.exchange(encode(pull)), "table 'shared'", "the default namespace")
        finally:
            d.close()
    with psd.connect(c.scheduler) as ops:  # nothing changed; the operator key reads all
        for name in ("J8/w", "shared"):
            np.testing.assert_array_equal(ops.table(name, dtype="int64").pull(keys).ravel(), [5, 5, 5, 5])
        np.testing.assert_array_equal(ops.table("J7/w", dtype="int64").pull(keys).ravel(), [1, 1, 1, 1])


def test_a_limited_worker_key_takes_part_only_in_its_jobs(shared):
    c, _, folder = shared
    job = {"name": "x", "app": "logreg_sgd"}
    first = admin.call(c.scheduler, "submit", job=job, workers=1)["job"]
    second = admin.call(c.scheduler, "submit", job=job, workers=1)["job"]
    security.keygen(c.keys, workers=["w9"], namespaces=[second], add=True)
    w9 = security.load_client(_client_folder(c, "w9", c.workdir / "w9-keys"))
    d = RawDealer(c.scheduler, curve=w9)
    try:
        node = d.request(Message("register", meta={"role": "worker"})).meta["node"]
        got = d.request(Message("job_poll", sender=node)).meta
        assert got["job"] == second and got["rank"] == 0  # not the older job it may not touch
        _forbidden(d.request(Message("job_status", sender=node, meta={"job": first})), f"job {first}")
        _forbidden(d.request(Message("job_report", sender=node, meta={"job": first, "rank": 0, "error": "x"})),
                   f"job {first}")
    finally:
        d.close()
    st = admin.call(c.scheduler, "job_status", job=first)
    assert st["state"] == "waiting" and st["ranks"] == {}

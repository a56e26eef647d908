"""No process and no port outlives a LocalCluster: neither after close() nor after
its parent process is SIGKILLed (so a crashed test run leaves nothing behind)."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import psd


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _gone(pid: int) -> bool:
    """Exited. A zombie counts: it runs nothing and holds no sockets; only its
    parent (here: whoever adopted it) can reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _port_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _wait_until(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _kill_leftovers(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_close_leaves_no_process_or_port():
    cluster = psd.LocalCluster(servers=2)
    try:
        pids = [cluster.scheduler_proc.pid, *(s.pid for s in cluster.servers)]
        ports = [_port(cluster.scheduler), *(_port(s.address) for s in cluster.servers)]
        workdir = cluster.workdir
        assert len(set(pids)) == 3 and all(not _gone(p) for p in pids)
        assert not any(_port_free(p) for p in ports)  # they really were listening
        kids = {p.pid for p in psutil.Process().children(recursive=True)}
        assert set(pids) <= kids
        with psd.connect(cluster) as kv:  # a worker connection must not keep anything alive
            kv.wait(kv.table("x", width=1, dtype="int64").push([1], [[1]]))
    finally:
        cluster.close()
    try:
        assert all(_gone(p) for p in pids)  # close() waited for them
        assert not (set(pids) & {p.pid for p in psutil.Process().children(recursive=True)})
        assert _wait_until(lambda: all(_port_free(p) for p in ports), 5.0)
        assert not workdir.exists()
        cluster.close()  # idempotent
    finally:
        _kill_leftovers([p for p in pids if not _gone(p)])


PARENT = textwrap.dedent("""
    import json, sys, time
    import psd
    cluster = psd.LocalCluster(servers=2, fork=sys.argv[1] == "fork")
    print(json.dumps({"pids": [cluster.scheduler_proc.pid, *(s.pid for s in cluster.servers)],
                      "addresses": [cluster.scheduler, *(s.address for s in cluster.servers)],
                      "workdir": str(cluster.workdir)}), flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("sig, start", [(signal.SIGKILL, "fork"), (signal.SIGTERM, "fork"), (signal.SIGKILL, "exec")],
                         ids=["SIGKILL", "SIGTERM", "SIGKILL-exec"])
def test_children_die_with_their_parent(sig, start):
    """Whether the daemons were forked by the fork server or started with exec, nothing
    of the cluster outlives the process that made it."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, start], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pids: list[int] = []
    descendants: set[int] = set()
    info: dict = {}
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 90)
        assert ready, "the parent did not start its cluster in time"
        line = parent.stdout.readline()
        assert line, parent.stderr.read().decode()[-3000:]
        info = json.loads(line)
        pids = info["pids"]
        ports = [_port(a) for a in info["addresses"]]
        assert len(pids) == 3 and not any(_gone(p) for p in pids)
        descendants = {p.pid for p in psutil.Process(parent.pid).children(recursive=True)}
        assert set(pids) <= descendants  # with the fork server, it is a descendant too
        if start == "exec":
            assert descendants == set(pids)

        parent.send_signal(sig)
        parent.wait(10)
        assert _wait_until(lambda: all(_gone(p) for p in descendants), 5.0), \
            [(p, psutil.Process(p).status()) for p in descendants if not _gone(p)]
        assert _wait_until(lambda: all(_port_free(p) for p in ports), 5.0)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
        _kill_leftovers([p for p in {*pids, *descendants} if not _gone(p)])
        if info.get("workdir"):  # a killed parent cannot remove its cluster's folder: we do
            shutil.rmtree(info["workdir"], ignore_errors=True)


def test_close_is_prompt():
    cluster = psd.LocalCluster(servers=2)
    try:
        with psd.connect(cluster) as kv:
            kv.wait(kv.table("x", width=1, dtype="int64").push([1], [[1]]))
        procs = [cluster.scheduler_proc.proc, *(s.proc for s in cluster.servers)]
    finally:
        t0 = time.monotonic()
        cluster.close()
        took = time.monotonic() - t0
    assert all(p.returncode is not None for p in procs)
    assert took < 2.0, f"close() took {took:.1f} s"
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]  # clean SIGINT exits

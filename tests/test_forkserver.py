"""The fork server: daemons forked from a pre-imported interpreter behave as exec'd ones.

Real processes throughout: a real fork server forks real `psd` commands and daemons, and
the same commands run with `python -m psd` are the reference.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import psd
import psd.refusals
from psd import forkserver
from psd.local import Child, daemon_argv

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSD_")}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return {**env, **extra}


@pytest.mark.parametrize("argv", [["config", "check", "/nonexistent/cluster.yaml"],
                                  ["config", "check", "{cluster}"]],
                         ids=["config-error", "config-ok"])
def test_a_forked_command_exits_and_prints_as_the_exec_one(argv, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("security: none\nreplication: 2\n")
    argv = [a.format(cluster=cluster) for a in argv]
    env = _env(PSD_CONSISTENCY="eventual")  # the child's own environment, not the server's
    server = forkserver.shared(env)
    assert server is not None
    log = tmp_path / "forked.log"
    with open(log, "wb") as f:
        proc = server.spawn(argv, env, str(tmp_path), f.fileno())
        code = proc.wait(60)
    want = subprocess.run(daemon_argv(*argv), env=env, cwd=tmp_path, capture_output=True, timeout=60)
    assert isinstance(proc, forkserver.ForkedProcess) and proc.pid != os.getpid()
    assert code == want.returncode
    assert log.read_bytes() == want.stdout + want.stderr
    if argv[-1] == str(cluster):
        assert b"consistency eventual" in want.stdout  # so the env really reached both


def test_signals_and_exit_codes_of_a_forked_daemon():
    with psd.LocalCluster(servers=2, security="none") as cluster:
        stopped, killed = cluster.servers
        assert isinstance(killed.proc, forkserver.ForkedProcess)
        stopped.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.3)
            assert stopped.proc.poll() is None  # a stop is not an exit
            with open(f"/proc/{stopped.pid}/stat") as f:
                assert f.read().split(") ")[1][0] == "T"
        finally:
            stopped.proc.send_signal(signal.SIGCONT)
        cluster.kill_server(1)
        assert killed.proc.wait(10) == -signal.SIGKILL
        assert stopped.proc.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            stopped.proc.wait(0.1)
    assert stopped.proc.returncode == 0  # close() stopped it with SIGINT: a clean exit


def test_a_child_with_other_import_settings_is_started_with_exec(tmp_path):
    env = _env()
    assert forkserver.shared(env) is not None
    other = _env(NUMBA_CACHE_DIR=str(tmp_path / "numba"))  # read by numba at import
    assert forkserver.shared(other) is None
    child = Child("other", daemon_argv("config", "check", "/nonexistent.yaml"), tmp_path, other)
    try:
        assert isinstance(child.proc, subprocess.Popen)
        assert child.proc.wait(60) == 2
    finally:
        child._log.close()


def test_a_fork_server_whose_psd_source_changed_hands_over_to_a_fresh_one(tmp_path):
    """A checkout or upgrade while a cluster runs: a child forked from the old imports
    would mix old modules with new ones it imports later. The server declines and a new
    one, importing the new code, forks the child."""
    env = _env()
    first = forkserver.shared(env)
    assert first is not None
    source = psd.refusals.__file__  # loaded by every daemon; not the compiled kernels
    before = os.stat(source)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        with open(tmp_path / "child.log", "wb") as f:
            with pytest.raises(OSError, match="changed since the fork server started"):
                first.spawn(["config", "check", "/nonexistent.yaml"], env, str(tmp_path), f.fileno())
            assert first.stale
            proc = forkserver.spawn(["config", "check", "/nonexistent.yaml"], env, str(tmp_path), f.fileno())
        second = forkserver.shared(env)
        assert isinstance(proc, forkserver.ForkedProcess) and proc.wait(60) == 2
        assert second is not first and second.alive()
        assert first.alive() and first in forkserver._retired  # (its children would die with it)
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_daemons_forked_before_the_source_changed_keep_running(tmp_path):
    """A stale fork server was closed at the next spawn, and its children, who die with it
    (PR_SET_PDEATHSIG), were SIGKILLed: a running cluster lost its scheduler when any psd
    file changed (an upgrade; in the suite, the handover test touching a file while the
    other pytest process ran a cluster). The stale server now stays until the end."""
    env = _env()
    with psd.LocalCluster(servers=1, security="none") as cluster:
        daemons = [cluster.scheduler_proc.proc, cluster.servers[0].proc]
        assert all(isinstance(p, forkserver.ForkedProcess) for p in daemons)
        source = psd.refusals.__file__
        before = os.stat(source)
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        try:
            with open(tmp_path / "child.log", "wb") as f:
                proc = forkserver.spawn(["config", "check", "/nonexistent.yaml"], env, str(tmp_path), f.fileno())
            assert isinstance(proc, forkserver.ForkedProcess) and proc.wait(60) == 2
        finally:
            os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
        time.sleep(0.5)
        assert [p.poll() for p in daemons] == [None, None]
        assert cluster.status()["health"]["state"] == "ok"

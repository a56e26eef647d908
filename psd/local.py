"""LocalCluster: a real scheduler and real server daemons as child processes on loopback.

Children bind free ports themselves and report them through ready files, so there is
no port race. They are killed when the cluster is closed, when the interpreter exits,
and (through PR_SET_PDEATHSIG and a parent watch) when the parent dies unexpectedly.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import yaml

from psd import forkserver
from psd.client import admin
from psd.config import ClusterConfig, config_from_dict
from psd.errors import StartupError
from psd.transport import security, shm

_live: "weakref.WeakSet[LocalCluster]" = weakref.WeakSet()

#: open curve clusters' key folders, oldest first, and the caller's own PSD_KEYS: while
#: a cluster is open PSD_KEYS names its keys, so worker processes a test starts with
#: ``subprocess`` find them (``psd.connect(address)`` reads PSD_KEYS)
_exported: list[tuple[int, str]] = []
_callers_keys: list[str | None] = []


def _set_keys_env(value: str | None) -> str | None:
    """Set (or with None, remove) PSD_KEYS in this process; returns what it was."""
    env = os.environ
    old = env.get("PSD_KEYS")
    if value is None:
        env.pop("PSD_KEYS", None)
    else:
        env["PSD_KEYS"] = value
    return old


def _export_keys(owner: object, folder: str) -> None:
    old = _set_keys_env(folder)
    if not _exported:
        _callers_keys[:] = [old]
    _exported.append((id(owner), folder))


def _unexport_keys(owner: object) -> None:
    if not any(i == id(owner) for i, _ in _exported):
        return
    _exported[:] = [(i, f) for i, f in _exported if i != id(owner)]
    _set_keys_env(_exported[-1][1] if _exported else (_callers_keys or [None])[0])


@atexit.register
def _close_all() -> None:
    for cluster in list(_live):
        cluster.close()


class Child:
    """One daemon of a LocalCluster: ``proc`` is its process (a ``subprocess.Popen``, or a
    ``forkserver.ForkedProcess`` with the same methods when ``fork``)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, extra_env: dict[str, str] | None = None,
                 fork: bool = True):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.ready_path = workdir / f"{name}.ready"
        self._log = open(self.log_path, "wb")
        # the children's settings come from the cluster's config file alone: PSD_ variables
        # of the caller (PSD_BIND, say) must not reach every daemon
        env = {k: v for k, v in os.environ.items() if not k.startswith("PSD_")}
        # many daemons share the machine's cores: one BLAS thread each unless told otherwise
        # (measured: a 67k-float dot took 7 ms with OpenBLAS's threads, 0.07 ms without)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        env.update(extra_env or {})  # the cluster's own: PSD_KEYS, so any child finds its keys
        argv = [*argv, "--ready-file", str(self.ready_path), "--parent-pid", str(os.getpid())]
        forked = None
        if fork and argv[:3] == daemon_argv("")[:3]:
            forked = forkserver.spawn(argv[3:], env, os.getcwd(), self._log.fileno())
        self.proc: subprocess.Popen | forkserver.ForkedProcess
        if forked is not None:
            self.proc = forked
        else:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=forkserver.die_with_parent if sys.platform.startswith("linux") else None)
        self.address: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            if self.ready_path.exists():
                self.address = self.ready_path.read_text().strip()
                return self.address
            if self.proc.poll() is not None:
                raise StartupError(f"{self.name} exited with code {self.proc.returncode} during start-up:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.02)
        raise StartupError(f"{self.name} not ready in time:\n{self.log_tail()}")


def _free_ports(n: int) -> list[int]:
    """Ports free on 127.0.0.1 now (a standby's address must be known before it starts)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def daemon_argv(role: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "psd", role, *args]


class LocalCluster:
    """A whole cluster on 127.0.0.1; keyword arguments are cluster settings.

    ``with psd.LocalCluster(servers=3) as cluster: kv = psd.connect(cluster.scheduler)``

    CurveZMQ is on, with throwaway keys in the work folder (``cluster.keys``), unless
    ``security="none"`` or ``keys=FOLDER``. While open, ``PSD_KEYS`` names the keys in
    this process and its children, and ``psd.connect(cluster.scheduler)`` finds them.
    """

    def __init__(self, servers: int = 1, *, config: ClusterConfig | None = None,
                 startup_timeout: float = 90.0, workdir: str | None = None,
                 keep_workdir: bool = False, standbys: int = 0, fork: bool = True, **settings):
        """``standbys``: standby schedulers beside the first (each with its own state
        folder); then every scheduler has a fixed port and ``cluster.schedulers`` lists them.
        ``fork``: start the daemons from this process's fork server (``psd.forkserver``:
        about a second of CPU less per server), else each with ``python -m psd``."""
        if servers < 1:
            raise StartupError("a LocalCluster needs at least one server")
        self.num_servers = servers
        self.fork = fork
        base = (config or ClusterConfig()).to_dict()
        base.update(settings)
        base.pop("scheduler", None)
        self.config = config_from_dict({k: v for k, v in base.items() if k != "limits"} |
                                       {"limits": dict(base.get("limits") or {})}, "LocalCluster")
        self.startup_timeout = startup_timeout
        self._own_workdir = workdir is None
        self.keep_workdir = keep_workdir
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="psd-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.scheduler_proc: Child | None = None
        self.num_standbys = standbys
        self.standby_procs: list[Child] = []
        self.servers: list[Child] = []
        self.others: list[Child] = []  # worker daemons started through spawn()
        self.scheduler = ""
        #: the cluster's CurveZMQ key folder (throwaway keys in the work folder unless the
        #: settings name one); None under security="none"
        self.keys: Path | None = None
        self._client_keys = None
        self._env: dict[str, str] = {}  # for every child: PSD_KEYS
        self._closed = False
        _live.add(self)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_job(cls, job) -> "LocalCluster":
        """A cluster as a job file asks for it (a ``psd.jobs.spec.JobSpec``: its
        ``servers`` and ``cluster`` settings), for ``psd run``."""
        return cls(servers=job.servers, **job.cluster)

    # -- start-up --------------------------------------------------------------
    def _write_config(self) -> Path:
        if self.config.state_dir is None:  # so restart_scheduler() resumes the cluster
            self.config = self.config.replace(state_dir=str(self.workdir / "scheduler-state"))
        data = self.config.to_dict()
        if not self.config.standby:
            data.pop("scheduler")
        data["limits"] = dict(data["limits"])
        path = self.workdir / "cluster.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def _make_keys(self) -> None:
        """Throwaway CurveZMQ keys in the work folder (reused if a kept folder has them),
        unless the settings name a key folder or say security: none."""
        if self.config.security == "none":
            return
        if self.config.keys is None:
            folder = self.workdir / "keys"
            if not (folder / (security.SERVER + security.SECRET)).exists():
                security.keygen(folder)
            self.config = self.config.replace(keys=str(folder))
        self.keys = Path(self.config.keys)
        security.load_daemon(self.keys)  # fail here, not in every child, if they are unusable
        self._client_keys = security.load_client(self.keys)
        self._env = {"PSD_KEYS": str(self.keys)}
        _export_keys(self, str(self.keys))

    def _start(self) -> None:
        self._make_keys()
        self.config_path = self._write_config()
        deadline = time.monotonic() + self.startup_timeout
        if self.num_standbys:
            first, *others = [f"tcp://127.0.0.1:{p}" for p in _free_ports(1 + self.num_standbys)]
            self.config = self.config.replace(scheduler=first, standby=tuple(others))
            self.config_path = self._write_config()
            self._start_scheduler(first, deadline)
            for i, address in enumerate(others):
                child = Child(f"standby{i}", daemon_argv("scheduler", "--config", str(self.config_path), "--bind",
                                                         address),
                              self.workdir, {**self._env, "PSD_STATE_DIR": str(self.workdir / f"standby{i}-state")},
                              self.fork)
                self.standby_procs.append(child)
                child.wait_ready(deadline)
                security.register_local(address, self._client_keys)
        else:
            self._start_scheduler("tcp://127.0.0.1:0", deadline)
        for _ in range(self.num_servers):
            self.add_server(wait=False)
        for child in self.servers:
            child.wait_ready(deadline)
        self.wait_for_ring(self.num_servers, deadline)

    def wait_for_ring(self, servers: int, deadline: float | None = None) -> dict:
        """Until the ring spans ``servers`` servers and no ring change is under way."""
        deadline = deadline or time.monotonic() + self.startup_timeout
        while True:
            st = self.status()
            owners = {o for r in st["ranges"] for o in r["owners"]}
            if len(owners) == servers and not st["ring_changing"]:
                return st
            if time.monotonic() > deadline:
                raise StartupError(f"the ring did not settle on {servers} servers in time: "
                                   f"{len(owners)} hold ranges at ring v{st['ring_version']}")
            time.sleep(0.02)

    def _start_scheduler(self, bind: str, deadline: float) -> None:
        name = "scheduler" if self.scheduler_proc is None else f"scheduler-{time.monotonic_ns()}"
        self.scheduler_proc = Child(name, daemon_argv(
            "scheduler", "--config", str(self.config_path), "--bind", bind), self.workdir, self._env, self.fork)
        self.scheduler = self.scheduler_proc.wait_ready(deadline)
        security.register_local(self.scheduler, self._client_keys)

    def restart_scheduler(self, sig: int = signal.SIGKILL) -> None:
        """Kill the scheduler and start a new one on the same address and state folder."""
        old = self.scheduler_proc
        old.proc.send_signal(sig)
        old.proc.wait(10)
        old._log.close()
        self._start_scheduler(self.scheduler, time.monotonic() + self.startup_timeout)

    def add_server(self, wait: bool = True, args: Sequence[str] = ()) -> Child:
        """Start one more server daemon; it copies its ranges in while the others serve
        (with ``wait``, returns once the ring includes it). ``args``: more flags for it
        alone, e.g. ``("--limits-max-keys", "100")``."""
        child = Child(f"server{len(self.servers)}", daemon_argv(
            "server", "--config", str(self.config_path), "--scheduler", self.scheduler, *args),
            self.workdir, self._env, self.fork)
        self.servers.append(child)
        if wait:
            child.wait_ready(time.monotonic() + self.startup_timeout)
            live = sum(1 for c in self.servers if c.proc.poll() is None)
            self.wait_for_ring(live)
        return child

    def add_worker(self, name: str | None = None, one_job: bool = False, args: Sequence[str] = ()) -> Child:
        """Start a worker daemon, cleaned up with the cluster; it runs the shards of
        submitted jobs (``one_job``: it exits once the first job it took part in has
        ended). ``args``: more flags for it alone."""
        argv = daemon_argv("worker", "--config", str(self.config_path), "--scheduler", self.scheduler,
                           *(["--one-job"] if one_job else []), *args)
        return self.spawn(name or f"worker{len(self.others)}", argv)

    def spawn(self, name: str, argv: list[str]) -> Child:
        """Start another child (a worker daemon) that is cleaned up with the cluster."""
        child = Child(name, argv, self.workdir, self._env, self.fork)
        self.others.append(child)
        return child

    # -- faults and inspection -------------------------------------------------
    def server(self, which: int | str) -> Child:
        """A server child by start index, or by node id ("S1") as `psd status` shows it."""
        if isinstance(which, int):
            return self.servers[which]
        for node in self.status()["nodes"]:
            if node["id"] == which:
                for child in self.servers:
                    if child.address == node["address"]:
                        return child
        raise KeyError(f"no server {which!r} in this cluster")

    def node_id(self, i: int) -> str:
        """The node id the i-th started server registered as."""
        address = self.servers[i].address
        for node in self.status()["nodes"]:
            if node["address"] == address:
                return node["id"]
        raise KeyError(f"server {i} has not registered")

    def kill_server(self, which: int | str, sig: int = signal.SIGKILL) -> None:
        """Signal a server (SIGKILL by default; SIGSTOP/SIGCONT freeze and thaw it)."""
        child = self.server(which)
        child.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            child.proc.wait(5)

    @property
    def schedulers(self) -> list[str]:
        """Every scheduler's address, the first one's first."""
        return [self.scheduler, *self.config.standby]

    def status(self) -> dict:
        """The leading scheduler's status (with standbys, whichever leads answers)."""
        if self.config.standby:
            return admin.call(self.scheduler, "status", config=self.config)
        return admin.call(self.scheduler, "status")

    # -- teardown --------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        children = [*self.others, *self.servers]
        if self.scheduler_proc:
            children.append(self.scheduler_proc)
        children.extend(self.standby_procs)
        for child in children:  # SIGINT: the whole cluster stops, no server drains
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGCONT)
                child.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 3.0
        for child in children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
            child._log.close()
        if self.config.shm:  # what children killed on the way left in shared memory
            shm.sweep(self.config.shm_dir)
        if self.scheduler:
            security.unregister_local(self.scheduler)
        _unexport_keys(self)
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

"""An emulated multi-host psd cluster on one Linux machine, deployed as an operator would.

Why: every other multi-process test runs all daemons on 127.0.0.1, where a server that
advertises a loopback address, a host given the wrong keys, a bind that is not the
address others reach, or a name resolved once, all work by accident. Here each host is
a network namespace with its own address on a private subnet, its link shaped by tc,
and psd is deployed on it step by step as docs/operations.md ("Several machines, step by
step") tells an operator:

1. ``psd keygen`` one key folder on a trusted machine (here: the run folder), with an
   operator key and one worker key per client host;
2. copy to each host only what it needs: the daemons' pair and the allow-list to the
   scheduler and server hosts, ``server.key`` and its own pair to every other host;
3. write ONE cluster YAML with the scheduler's real address; per-host settings
   (``PSD_BIND``/``PSD_ADVERTISE``, ``PSD_KEYS``) go in each host's ``psd.env``;
4. ``psd config check`` it, then start the daemons with the real CLI inside the
   namespaces, supervised as the shipped systemd units say (supervisor.py).

The run folder mirrors the hosts' file systems (``hosts/NAME/etc/psd/...``) and holds
``state.json``, the record of every namespace, link and process made, written *before*
each is made, so :func:`teardown` (``scripts/netcluster.py down --run DIR``) removes
everything even after the tool itself was killed.

    with NetCluster(servers=3, clients=2, rate="1gbit", replication=2) as net:
        net.exec("client0", [sys.executable, "my_client.py", net.scheduler])
        net.status()                 # `psd status --json` from the operator host
        net.partition("server1"); net.heal(); net.rate("server0", "100mbit")
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import yaml

import psd
from psd.testing import netns
from psd.testing.netns import NetError
from psd.testing.pushlog import PushLog, read_log
from psd.testing.supervisor import Supervisor, Unit, UnitPolicy, die_with_parent

DEFAULT_SUBNET = "10.213.0.0/24"
SCHEDULER_PORT = 9300
STATE = "state.json"
#: the name suffix hosts get with ``names=True`` (.test is reserved for testing, RFC 2606)
DOMAIN = "psd.test"
UNITS = Path(psd.__file__).resolve().parent.parent / "configs" / "systemd"
#: settings for a small emulated cluster on a shared machine: heartbeats often enough
#: for tests to see failures quickly, not so often that 2 cores spend their time on them
DEFAULT_SETTINGS = {"heartbeat_interval": 0.2, "heartbeat_misses": 5, "worker_timeout": 5.0,
                    "startup_timeout": 60.0, "request_timeout": 30.0, "log_level": "info"}


#: clusters up in this process, taken down at interpreter exit if their owner did not
#: (held strongly: a cluster whose object was dropped still has namespaces to remove)
_live: "set[NetCluster]" = set()


@atexit.register
def _down_all() -> None:
    for net in list(_live):
        with contextlib.suppress(Exception):
            net.down()


@dataclass(frozen=True)
class Host:
    """One emulated machine: its role, namespace, root-side veth and address."""

    name: str
    role: str  # scheduler, server, client or operator
    index: int
    ns: str
    veth: str
    ip: str

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"


# -- the record ----------------------------------------------------------------------------------
class Record:
    """``RUN/state.json``: what a run made and the network's state (rates, links down,
    blocks), shared by the process holding the cluster and the CLI's other commands.
    Every change is a locked read-modify-write, written atomically."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / STATE
        self._lock_path = Path(run_dir) / ".state.lock"

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            raise NetError(f"{self.path} does not exist: no emulated cluster was made with this run folder "
                           f"(start one with `python scripts/netcluster.py up --run {self.path.parent}`)") from None

    @contextlib.contextmanager
    def change(self):
        """``with record.change() as data:`` edits the record under a lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            yield data
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), so
    a recorded pid is never mistaken for a later process that reused the number; None
    when it is not running (gone, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie runs no more


def _alive(entry: dict | None) -> bool:
    return bool(entry) and process_start(entry["pid"]) == entry["start"]


# -- teardown: also after a crash ---------------------------------------------------------
def teardown(run_dir: str | Path, *, grace: float = 5.0) -> list[str]:
    """Remove everything ``RUN/state.json`` records: stop the process holding the
    cluster (SIGTERM, then SIGKILL after ``grace``), kill every process in the
    namespaces, delete the namespaces, links and /etc/netns files. Safe to repeat;
    returns what it removed."""
    record = Record(Path(run_dir))
    data = record.read()
    removed: list[str] = []
    tool = data.get("tool")
    if tool and tool["pid"] != os.getpid() and _alive(tool):
        _stop_process(tool, grace)
        removed.append(f"process {tool['pid']} (the tool holding the cluster)")
    for entry in data.get("processes", {}).values():
        if _alive(entry):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(entry["pid"], signal.SIGKILL)
            removed.append(f"process {entry['pid']}")
    for ns in data.get("namespaces", []):
        for pid in netns.pids_in(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            removed.append(f"process {pid} in {ns}")
        if ns in netns.namespaces() or (netns.NETNS_ETC / ns).exists():
            _until_gone(ns)
            netns.remove_namespace(ns)
            removed.append(f"namespace {ns}")
    present = netns.links()
    for link in data.get("links", []):
        if link in present:
            netns.remove_link(link)
            removed.append(f"link {link}")
    with record.change() as d:
        d["removed"] = time.time()
        d["processes"] = {}
    return removed


def _stop_process(entry: dict, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(entry["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(entry) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(entry):
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry["pid"], signal.SIGKILL)


def _until_gone(ns: str, timeout: float = 5.0) -> None:
    """Wait until the killed processes of ``ns`` are gone (a namespace deleted under a
    dying process lingers until it exits)."""
    deadline = time.monotonic() + timeout
    while netns.pids_in(ns) and time.monotonic() < deadline:
        time.sleep(0.05)


# -- the cluster ------------------------------------------------------------------------------------
class NetCluster:
    """One scheduler host, ``servers`` server hosts, ``clients`` client hosts and one
    operator host on a bridge, links shaped to ``rate`` (None: unshaped), psd deployed
    and started (see the module doc). ``hosts``: the total instead (servers and clients
    split it, servers first). ``settings``: more cluster YAML settings. ``advertise``:
    servers bind ``tcp://0.0.0.0:0`` and advertise their address (or name) instead of
    binding it. ``names``: every host gets /etc/hosts names (``server0.psd.test``...), the
    YAML names the scheduler by name, servers advertise names. ``worker_daemons``: a
    ``psd worker`` on each client host (for ``psd submit``). ``restart_sec``: overrides
    the units' RestartSec. ``run_dir``: kept after ``down``; by default a temporary folder
    is made and removed. ``standby``: a second scheduler host, ``standby``, running a
    standby scheduler (the YAML's ``standby`` list; its psd.env binds its address)."""

    def __init__(self, *, servers: int = 3, clients: int = 2, hosts: int | None = None,
                 rate: str | None = "1gbit", replication: int = 2, security: str = "curve",
                 run_dir: str | Path | None = None, subnet: str = DEFAULT_SUBNET, settings: dict | None = None,
                 advertise: bool = False, names: bool = False, worker_daemons: bool = False,
                 startup_timeout: float = 60.0, restart_sec: float | None = None, standby: bool = False):
        if hosts is not None:
            servers, clients = _split(hosts)
        if servers < 1 or clients < 0:
            raise NetError(f"expected at least 1 server host and 0 or more client hosts, got {servers} and {clients}")
        if replication > servers:
            raise NetError(f"replication {replication} needs at least as many server hosts, got {servers}")
        if rate is not None:
            netns.rate_bits(rate)
        self.servers, self.clients, self.rate_default = servers, clients, rate
        self.replication, self.security = replication, security
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.advertise, self.names, self.worker_daemons = advertise, names, worker_daemons
        self.startup_timeout, self.restart_sec = startup_timeout, restart_sec
        self.standby = standby
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="psd-net-"))
        self.record = Record(self.run_dir)
        self.subnet = ipaddress.ip_network(subnet)
        self.tag = _free_tag()
        self.bridge = f"pn{self.tag}br"
        self.hosts: dict[str, Host] = {}
        self.units: dict[str, Unit] = {}
        self.supervisor: Supervisor | None = None
        self._procs: list[subprocess.Popen] = []
        self._up = False

    # -- life cycle ------------------------------------------------------------------------
    def up(self) -> "NetCluster":
        """Make the hosts, deploy psd and start it; returns once the ring spans every
        server host. A failure part way removes what was made, then raises."""
        if self.record.exists() and not self.record.read().get("removed"):
            raise NetError(f"{self.run_dir} holds a cluster that was not taken down: run "
                           f"`python scripts/netcluster.py down --run {self.run_dir}` first")
        _live.add(self)
        try:
            self._fresh_run_dir()
            self._plan()
            self._make_network()
            self._deploy()
            self._start()
        except BaseException:
            self.down()
            raise
        self._up = True
        return self

    def down(self) -> list[str]:
        """Stop every daemon and process, remove every namespace and link (also what a
        failed ``up`` made). The run folder stays if it was given."""
        if self.supervisor is not None:
            self.supervisor.close()
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(5)
        removed = teardown(self.run_dir) if self.record.exists() else []
        self._up = False
        _live.discard(self)
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return removed

    def __enter__(self) -> "NetCluster":
        return self if self._up else self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    @classmethod
    def attach(cls, run_dir: str | Path) -> "NetCluster":
        """The cluster a running ``up`` made in ``run_dir``, for the network commands,
        ``status`` and ``exec`` from another process (its daemons stay with their
        supervisor, in the process that made them)."""
        data = Record(Path(run_dir)).read()
        if data.get("removed"):
            raise NetError(f"the cluster in {run_dir} was taken down")
        self = cls(servers=1, clients=0, replication=1, run_dir=run_dir, subnet=data["subnet"],
                   security=data["security"])
        self.tag, self.bridge, self.names = data["tag"], data["bridge"], data.get("names", False)
        self.hosts = {h["name"]: Host(**h) for h in data["hosts"]}
        self._up = True
        return self

    #: what ``up`` writes into the run folder, removed before a new ``up`` on the same folder
    MADE = ("hosts", "keys", "logs", "notify", "pushlogs", "cluster.yaml", STATE)

    def _fresh_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in self.MADE:
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    # -- the plan: hosts, names, addresses ------------------------------------------------------
    def _plan(self) -> None:
        roles = ([("scheduler", "scheduler")] + ([("standby", "scheduler")] if self.standby else [])
                 + [(f"server{i}", "server") for i in range(self.servers)]
                 + [(f"client{i}", "client") for i in range(self.clients)] + [("operator", "operator")])
        addresses = list(self.subnet.hosts())
        if len(roles) > len(addresses) - 1:
            raise NetError(f"{len(roles)} hosts do not fit in {self.subnet}; pick a larger subnet")
        for index, (name, role) in enumerate(roles):
            self.hosts[name] = Host(name, role, index, f"psdnet-{self.tag}-{name}", f"pn{self.tag}h{index}",
                                    str(addresses[index + 1]))
        with self.record.change() as d:
            d.update(tag=self.tag, bridge=self.bridge, subnet=str(self.subnet), security=self.security,
                     names=self.names, hosts=[asdict(h) for h in self.hosts.values()],
                     tool={"pid": os.getpid(), "start": process_start(os.getpid())},
                     namespaces=[], links=[], processes={}, rates={}, down=[], blocks=[], removed=None)

    @property
    def scheduler(self) -> str:
        """The scheduler's address as every host reaches it (the cluster YAML's)."""
        host = self.hosts["scheduler"]
        return f"tcp://{host.fqdn if self.names else host.ip}:{SCHEDULER_PORT}"

    @property
    def standby_address(self) -> str:
        host = self.hosts["standby"]
        return f"tcp://{host.fqdn if self.names else host.ip}:{SCHEDULER_PORT}"

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise NetError(f"no host {name!r}; hosts: {', '.join(self.hosts)}") from None

    def role_hosts(self, role: str) -> list[Host]:
        return [h for h in self.hosts.values() if h.role == role]

    # -- the network -----------------------------------------------------------------------------
    def _make_network(self) -> None:
        with self.record.change() as d:
            d["links"].append(self.bridge)
        netns.make_bridge(self.bridge)
        for host in self.hosts.values():
            with self.record.change() as d:  # recorded first: a crash between the two still cleans up
                d["namespaces"].append(host.ns)
                d["links"].append(host.veth)
            netns.make_host(host.ns, host.veth, self.bridge, f"{host.ip}/{self.subnet.prefixlen}")
            if self.rate_default is not None:
                self._set_rate(host, self.rate_default)
        if self.names:
            self._write_names()

    def _write_names(self) -> None:
        """/etc/hosts in every namespace: every host's name (``ip netns exec`` shows each
        process the hosts file of its namespace)."""
        names = {h.fqdn: h.ip for h in self.hosts.values()}
        for host in self.hosts.values():
            netns.write_hosts_file(host.ns, names)

    def move(self, name: str, new_ip: str) -> None:
        """Give host ``name`` another address and update every hosts file (names only):
        a machine replaced by another, or renumbered. Connections to the old address
        break; peers find the new one only if they resolve the name again."""
        host = self.host(name)
        netns.ip("addr", "flush", "dev", "eth0", ns=host.ns)
        netns.ip("addr", "add", f"{new_ip}/{self.subnet.prefixlen}", "dev", "eth0", ns=host.ns)
        self.hosts[name] = Host(**{**asdict(host), "ip": new_ip})
        with self.record.change() as d:
            d["hosts"] = [asdict(h) for h in self.hosts.values()]
        if self.names:
            self._write_names()
        for other in self.hosts.values():  # its own link, and blocks naming its address
            self._reshape(other)

    def _set_rate(self, host: Host, rate: str | None) -> None:
        with self.record.change() as d:
            d["rates"][host.name] = rate
        self._reshape(host)

    def _reshape(self, host: Host) -> None:
        """Both ends of ``host``'s link as the record says: its rate, and towards it, the
        drops of blocked senders."""
        data = self.record.read()  # the truth, also when another process changed it
        rate = data["rates"].get(host.name)
        ips = {h["name"]: h["ip"] for h in data["hosts"]}
        blocked = tuple(sorted(ips[src] for src, dst in data["blocks"] if dst == host.name))
        netns.shape(host.veth, rate, blocked=blocked)
        netns.shape("eth0", rate, ns=host.ns)

    def rate(self, name: str, rate: str | None) -> None:
        """Shape ``name``'s link, both directions, to ``rate`` (e.g. ``100mbit``; None: unshaped)."""
        if rate is not None:
            netns.rate_bits(rate)
        self._set_rate(self.host(name), rate)

    def partition(self, *names: str) -> None:
        """Cut the links of ``names`` (their veths go down): they reach no one, no one
        reaches them. Several hosts cut together cannot reach each other either; to keep
        a group together and cut it from the rest, use :meth:`block` between groups."""
        for name in names:
            host = self.host(name)
            with self.record.change() as d:
                d["down"] = sorted(set(d["down"]) | {name})
            netns.set_up(host.veth, False)

    def block(self, src: str | list[str], dst: str | list[str], *, both: bool = True) -> None:
        """Drop packets from the ``src`` hosts to the ``dst`` hosts (and back unless
        ``both=False``: a one-way cut, where TCP still fails, its answers being lost)."""
        srcs = [src] if isinstance(src, str) else list(src)
        dsts = [dst] if isinstance(dst, str) else list(dst)
        for name in {*srcs, *dsts}:
            self.host(name)  # unknown names fail here, before anything changes
        pairs = {(s, t) for s in srcs for t in dsts if s != t}
        if both:
            pairs |= {(t, s) for s, t in pairs}
        with self.record.change() as d:
            d["blocks"] = sorted({tuple(b) for b in d["blocks"]} | pairs)
        for t in {t for _, t in pairs}:
            self._reshape(self.hosts[t])

    def heal(self) -> None:
        """Every link up and every block gone (rates stay)."""
        data = self.record.read()
        with self.record.change() as d:
            d["down"], d["blocks"] = [], []
        for name in data["down"]:
            netns.set_up(self.hosts[name].veth, True)
        for name in {t for _, t in data["blocks"]}:
            self._reshape(self.hosts[name])

    def links(self) -> dict:
        """Per host: address, rate, whether its link is up, whom it does not hear from."""
        data = self.record.read()
        return {h.name: {"role": h.role, "ip": h.ip, "rate": data["rates"].get(h.name),
                         "up": h.name not in data["down"],
                         "blocked_from": sorted(s for s, t in data["blocks"] if t == h.name)}
                for h in self.hosts.values()}

    # -- deployment, as an operator does it --------------------------------------------------------
    def host_dir(self, name: str) -> Path:
        """The folder standing for host ``name``'s root file system."""
        return self.run_dir / "hosts" / name

    def keys_dir(self, name: str) -> Path:
        return self.host_dir(name) / "etc" / "psd" / "keys"

    @property
    def config_path(self) -> Path:
        return self.run_dir / "cluster.yaml"

    def _deploy(self) -> None:
        if self.security == "curve":
            self._keygen()
            for host in self.hosts.values():
                self._install_keys(host)
        self._write_config()
        for host in self.hosts.values():
            self._write_env(host)
        self.exec("scheduler", self.psd_argv("config", "check", str(self.config_path)), timeout=60)

    def _keygen(self) -> None:
        """``psd keygen`` on the trusted machine: an operator key, a worker key per client host."""
        workers = [a for h in self.role_hosts("client") for a in ("--worker", h.name)]
        run = subprocess.run(self.psd_argv("keygen", str(self.run_dir / "keys"), "--client", "operator", *workers),
                             capture_output=True, text=True, env=self.base_env(), timeout=60)
        if run.returncode != 0:
            raise NetError(f"psd keygen failed ({run.returncode}): {run.stderr.strip()}")

    def _install_keys(self, host: Host) -> None:
        """Copy to ``host`` only what it needs (docs/operations.md, "Keys"): daemon
        hosts the daemons' pair and the allow-list, never a client's secret; other
        hosts ``server.key`` and their own pair. Folders 0700, secrets 0600."""
        source, target = self.run_dir / "keys", self.keys_dir(host.name)
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(target, 0o700)
        if host.role in ("scheduler", "server"):
            files = ["server.key", "server.key_secret"]
            shutil.copytree(source / "authorized", target / "authorized", dirs_exist_ok=True)
        else:
            files = ["server.key", f"{host.name}.key_secret"]
        for name in files:
            shutil.copy2(source / name, target / name)

    def _write_config(self) -> None:
        """The one cluster YAML every host reads. What differs per host is not here but in
        its psd.env: its bind/advertise address and where its keys are (PSD_KEYS; on real
        machines the same path everywhere, here each host's folder in the run folder)."""
        config = {"scheduler": self.scheduler, "replication": self.replication, "security": self.security,
                  "state_dir": str(self.host_dir("scheduler") / "var" / "lib" / "psd" / "scheduler"),
                  **({"standby": [self.standby_address]} if self.standby else {}), **self.settings}
        text = ("# written by psd.testing.netcluster: one file for every host; per-host settings\n"
                "# (PSD_BIND, PSD_ADVERTISE, PSD_KEYS) are in hosts/NAME/etc/psd/psd.env\n"
                + yaml.safe_dump(config, sort_keys=False))
        self.config_path.write_text(text)

    def host_env(self, host: Host) -> dict[str, str]:
        """What ``host``'s /etc/psd/psd.env sets."""
        env: dict[str, str] = {}
        if self.security == "curve":
            env["PSD_KEYS"] = str(self.keys_dir(host.name))
        if host.name == "standby":  # its own address and state folder
            env["PSD_BIND"] = self.standby_address
            env["PSD_STATE_DIR"] = str(self.host_dir(host.name) / "var" / "lib" / "psd" / "scheduler")
        if host.role == "server":
            me = host.fqdn if self.names else host.ip
            if self.advertise:
                env.update(PSD_BIND="tcp://0.0.0.0:0", PSD_ADVERTISE=f"tcp://{me}:0")
            else:
                env["PSD_BIND"] = f"tcp://{me}:0"
        return env

    def _write_env(self, host: Host) -> None:
        path = self.host_dir(host.name) / "etc" / "psd" / "psd.env"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in self.host_env(host).items()))

    # -- daemons -----------------------------------------------------------------------------------
    def psd_argv(self, *args: str) -> list[str]:
        """The psd command line (this interpreter's, so the same installation)."""
        return [sys.executable, "-m", "psd", *args]

    def base_env(self) -> dict[str, str]:
        """A clean environment, as systemd gives a service: none of the caller's
        variables (a PSD_ setting of the caller must not reach every host) but its
        PYTHONPATH, which is part of the installation (it is how a test runs another
        checkout's psd, e.g. the code before a fix)."""
        bin_dir = str(Path(sys.executable).parent)
        path = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
        return {**path, "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
                # many daemons share the machine's cores: one BLAS thread each (as LocalCluster)
                "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def _policy(self, unit_file: str, host: Host, instance: str = "") -> UnitPolicy:
        """The unit's systemd settings, its EnvironmentFile paths moved into the host's
        folder (``/etc/psd/psd.env`` -> ``RUN/hosts/NAME/etc/psd/psd.env``)."""
        path = UNITS / unit_file
        policy = UnitPolicy.from_file(path, instance) if path.exists() else UnitPolicy(
            environment_files=("/etc/psd/psd.env",))
        files = tuple(str(self.host_dir(host.name)) + f if f.startswith("/etc/") else f
                      for f in policy.environment_files)
        policy = policy.with_(environment_files=files)
        return policy if self.restart_sec is None else policy.with_(restart_sec=self.restart_sec)

    def add_unit(self, host_name: str, role: str, *, instance: str = "1", args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, name: str | None = None) -> Unit:
        """A supervised ``psd ROLE --config cluster.yaml`` on a host, as its unit runs it
        (``env`` is added to the unit's environment, like a ``systemctl edit`` drop-in)."""
        host = self.host(host_name)
        unit_file = "psd-scheduler.service" if role == "scheduler" else f"psd-{role}@.service"
        name = name or (f"{host.name}/psd-scheduler" if role == "scheduler" else f"{host.name}/psd-{role}@{instance}")
        unit = Unit(name=name, argv=self.psd_argv(role, "--config", str(self.config_path), *args),
                    policy=self._policy(unit_file, host, instance),
                    log_path=self.run_dir / "logs" / (name.replace("/", "_") + ".log"),
                    notify_path=self.run_dir / "notify" / f"{len(self.units)}.sock",
                    env={**self.base_env(), **(env or {})}, prefix=[netns.tool("ip"), "netns", "exec", host.ns])
        self.units[name] = self._supervisor().add(unit)
        return unit

    def _supervisor(self) -> Supervisor:
        if self.supervisor is None:
            self.supervisor = Supervisor(on_start=self._note_start)
        return self.supervisor

    def _note_start(self, unit: Unit, pid: int) -> None:
        with self.record.change() as d:
            d["processes"][unit.name] = {"pid": pid, "start": process_start(pid)}

    def _start(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        sched = self.add_unit("scheduler", "scheduler")
        self.supervisor.start(sched)
        sched.wait_ready(self.startup_timeout)
        if self.standby:
            second = self.add_unit("standby", "scheduler")
            self.supervisor.start(second)
            second.wait_ready(self.startup_timeout)
        servers = [self.add_unit(h.name, "server") for h in self.role_hosts("server")]
        for unit in servers:
            self.supervisor.start(unit)
        for unit in servers:
            unit.wait_ready(max(1.0, deadline - time.monotonic()))
        if self.worker_daemons:
            for h in self.role_hosts("client"):
                self.supervisor.start(self.add_unit(h.name, "worker"))
        self.wait_for_ring(self.servers, max(1.0, deadline - time.monotonic()))

    def unit(self, host_name: str, role: str | None = None) -> Unit:
        """The (first) unit on a host, or its unit of ``role``."""
        for name, unit in self.units.items():
            if name.startswith(f"{host_name}/") and (role is None or f"psd-{role}" in name):
                return unit
        raise NetError(f"no unit on host {host_name!r}" + (f" for role {role}" if role else "")
                       + f"; units: {', '.join(self.units)}")

    def kill(self, host_name: str, sig: int = signal.SIGKILL) -> Unit:
        """Signal the daemon on a host; its unit's policy decides what follows (SIGKILL:
        restarted after RestartSec)."""
        unit = self.unit(host_name)
        unit.kill(sig)
        return unit

    def stop(self, host_name: str) -> None:
        """``systemctl stop``: SIGTERM (a server drains), SIGKILL after TimeoutStopSec."""
        self.supervisor.stop(self.unit(host_name))

    def start(self, host_name: str, timeout: float = 60.0) -> str:
        """``systemctl start`` and wait for READY=1; returns what it said (its address)."""
        unit = self.unit(host_name)
        self.supervisor.start(unit)
        return unit.wait_ready(timeout)

    # -- looking and running things on hosts -----------------------------------------------------------
    def wait_for_ring(self, servers: int, timeout: float = 60.0) -> dict:
        """Until ``psd status`` shows the ring on ``servers`` servers with no change under way."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            owners = {o for r in st["ranges"] for o in r["owners"]}
            if len(owners) == servers and not st["ring_changing"]:
                return st
            if time.monotonic() > deadline:
                raise NetError(f"the ring did not settle on {servers} servers within {timeout:g} s: "
                               f"{len(owners)} hold ranges at ring v{st['ring_version']}; logs in "
                               f"{self.run_dir / 'logs'}")
            time.sleep(0.3)

    def status(self, host: str = "operator", timeout: float = 30.0) -> dict:
        """``psd status --json`` run on the operator host, as a dict."""
        out = self.exec(host, self.psd_argv("status", "--json", "--config", str(self.config_path)),
                        timeout=timeout).stdout
        return json.loads(out)

    def exec_env(self, host: Host, env: dict[str, str] | None = None) -> dict[str, str]:
        """A process on ``host`` gets a clean environment, its keys (PSD_KEYS) and ``env``."""
        keys = {"PSD_KEYS": str(self.keys_dir(host.name))} if self.security == "curve" else {}
        return {**self.base_env(), **keys, **(env or {})}

    def exec(self, host_name: str, argv: list[str], *, timeout: float = 60.0, env: dict[str, str] | None = None,
             check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` on a host and wait for it (text output captured). With ``check``,
        a non-zero exit raises NetError quoting its stderr."""
        host = self.host(host_name)
        proc = subprocess.run([netns.tool("ip"), "netns", "exec", host.ns, *argv], input=input,
                              capture_output=True, text=True, timeout=timeout, env=self.exec_env(host, env),
                              start_new_session=True)
        if check and proc.returncode != 0:
            raise NetError(f"on {host_name}: `{' '.join(argv)}` exited {proc.returncode}:\n"
                           f"{(proc.stderr or proc.stdout).strip()[-3000:]}")
        return proc

    def popen(self, host_name: str, argv: list[str], *, env: dict[str, str] | None = None,
              log: str | Path | None = None, **kw) -> subprocess.Popen:
        """Start ``argv`` on a host and return at once; it is killed on ``down`` (and,
        through PR_SET_PDEATHSIG, when the calling thread's process dies). Output goes
        to ``log`` (default: ``RUN/logs/HOST-N.log``) unless ``stdout`` is given."""
        host = self.host(host_name)
        if "stdout" not in kw:
            log_path = Path(log) if log else self.run_dir / "logs" / f"{host_name}-{len(self._procs)}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as out:
                return self.popen(host_name, argv, env=env, stdout=out, stderr=subprocess.STDOUT, **kw)
        proc = subprocess.Popen([netns.tool("ip"), "netns", "exec", host.ns, *argv], env=self.exec_env(host, env),
                                start_new_session=True, preexec_fn=die_with_parent,
                                **{"stdin": subprocess.DEVNULL, **kw})
        self._procs.append(proc)
        with self.record.change() as d:
            d["processes"][f"{host_name}/popen-{proc.pid}"] = {"pid": proc.pid, "start": process_start(proc.pid)}
        return proc

    # -- for partition tests: a client that logs what was acknowledged ---------------------------------
    def start_pusher(self, host_name: str, seed: int, *, window: int = 8, read_every: float = 0.0,
                     started_timeout: float = 30.0) -> "Pusher":
        """A client on ``host_name`` pushing to its own keys until stopped, logging every
        acknowledged push and, every ``read_every`` seconds, whether a read of its keys
        showed its own acknowledged writes (psd/testing/pushlog.py); returns once it has
        its table."""
        path = self.run_dir / "pushlogs" / f"{host_name}-{seed}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        proc = self.popen(host_name, [sys.executable, "-m", "psd.testing.pushlog", "push", self.scheduler,
                                      str(seed), str(path), "--window", str(window),
                                      "--read-every", str(read_every)],
                          log=self.run_dir / "logs" / f"pusher-{host_name}-{seed}.log")
        pusher = Pusher(self, host_name, seed, path, proc)
        pusher.wait_started(started_timeout)
        return pusher

    def verify_pushes(self, host_name: str, logs: list["Pusher"], timeout: float = 60.0,
                      scheduler: str | None = None) -> dict:
        """Pull every pushed key from ``host_name`` and check it against the logs
        (pushlog.expected): ``{"ok", "problems", "acked", "uncertain", "keys"}``;
        ``scheduler``: the one to ask (default: the YAML's)."""
        proc = self.exec(host_name, [sys.executable, "-m", "psd.testing.pushlog", "verify", scheduler or self.scheduler,
                                     *(str(p.path) for p in logs)], timeout=timeout, check=False)
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise NetError(f"verify on {host_name} exited {proc.returncode}: {proc.stderr.strip()[-3000:]}") from None


class Pusher:
    """A running pushlog client; ``stop()`` ends it and returns its log."""

    def __init__(self, net: NetCluster, host: str, seed: int, path: Path, proc: subprocess.Popen):
        self.net, self.host, self.seed, self.path, self.proc = net, host, seed, path, proc

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self.path.exists() and self.path.stat().st_size > 0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise NetError(f"pusher {self.seed} on {self.host} did not start (exit {self.proc.poll()}); "
                               f"its log: {self.net.run_dir / 'logs'}")
            time.sleep(0.05)

    def log(self) -> PushLog:
        """What it has logged so far."""
        return read_log(self.path)

    def stop(self, timeout: float = 60.0) -> PushLog:
        """SIGTERM, wait for its pushes in flight (pushlog.DRAIN_TIMEOUT), return the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return self.log()

    def kill(self) -> PushLog:
        self.proc.kill()
        self.proc.wait(10)
        return self.log()


def _free_tag() -> str:
    """Four hex digits naming this run's namespaces and links, not used by another run
    (link names must stay within 15 characters, so the tag is short)."""
    taken = " ".join([*netns.namespaces(), *netns.links()])
    while True:
        tag = secrets.token_hex(2)
        if f"pn{tag}" not in taken and f"psdnet-{tag}-" not in taken:
            return tag


def _split(hosts: int) -> tuple[int, int]:
    """``hosts`` in all: one scheduler, one operator, the rest servers then clients."""
    if hosts < 3:
        raise NetError(f"hosts={hosts}: expected at least 3 (a scheduler, a server and the operator host)")
    rest = hosts - 2
    servers = (rest + 1) // 2
    return servers, rest - servers


def on_signals(handler: Callable[[], None]) -> None:
    """Run ``handler`` once on SIGTERM, SIGINT or SIGHUP (the CLI's ``up``: everything it
    made goes with it)."""
    fired = threading.Event()

    def once(signum, frame):
        if not fired.is_set():
            fired.set()
            handler()
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, once)

"""An emulated multi-host cluster (psd/testing/netcluster.py): hosts are network
namespaces on a bridge, psd is deployed on them as docs/operations.md tells an operator
(keys per host, one cluster YAML, the real CLI under a systemd-like supervisor).

Root only (but for the supervisor's watchdog, checked on loopback): skipped, with the
reason, where namespaces cannot be made. Every test removes
every namespace, link, /etc/netns file and process it made, also when it fails, and
checks that nothing is left. The partition tools are checked here at the network level
only; how psd behaves under partitions is tests/test_partitions.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psd.testing import NetCluster, unsupported
from psd.testing.netcluster import UNITS
from psd.testing.netns import NETNS_ETC, qdiscs
from psd.testing.supervisor import Supervisor, Unit, UnitPolicy

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).resolve().parent / "netclient.py"
SCRIPT = ROOT / "scripts" / "netcluster.py"

_REASON = unsupported()
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"emulated hosts need network namespaces: {_REASON}")


# -- nothing left behind ------------------------------------------------------------------
def _made(net: NetCluster) -> dict:
    """What the record says was made (read before teardown clears the process list)."""
    if not net.record.exists():
        return {"processes": {}}
    return net.record.read()


def _leftovers(tag: str, made: dict) -> list[str]:
    """Namespaces, links, /etc/netns folders and processes of run ``tag`` still there."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    left = [line for line in names.splitlines() if f"psdnet-{tag}-" in line]
    left += [line.split(":")[1].strip() for line in links.splitlines() if f"pn{tag}" in line]
    left += [str(p) for p in NETNS_ETC.glob(f"psdnet-{tag}-*")]
    from psd.testing.netcluster import process_start
    left += [f"{name} (pid {e['pid']})" for name, e in made.get("processes", {}).items()
             if process_start(e["pid"]) == e["start"]]
    return left


def _down_and_check(net: NetCluster) -> None:
    made = _made(net)
    net.down()
    left = _leftovers(net.tag, made)
    assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """1 scheduler host, 3 server hosts, 2 client hosts, the operator host; 1gbit links,
    replication 2, CurveZMQ on, the scheduler reached by its address."""
    cluster = NetCluster(servers=3, clients=2, rate="1gbit", replication=2, security="curve",
                         run_dir=tmp_path_factory.mktemp("net"))
    try:
        cluster.up()
        yield cluster
    finally:
        _down_and_check(cluster)


# -- probes: small programs run inside hosts ----------------------------------------------------
PROBE = r"""
import socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "listen":        # UDP: did anything arrive within the timeout?
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, port)); s.settimeout(float(sys.argv[4]))
    print("ready", flush=True)
    try:
        s.recv(16); print("got")
    except socket.timeout:
        print("none")
elif mode == "send":         # a datagram every 50 ms for 1.5 s
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(30):
        try:
            s.sendto(b"x", (host, port))
        except OSError:
            pass
        time.sleep(0.05)
elif mode == "sink":        # TCP: seconds from the first byte to the end of the stream
    s = socket.create_server((host, port)); print("ready", flush=True)
    c, _ = s.accept(); first = c.recv(65536); t = time.monotonic(); n = len(first)
    while (b := c.recv(65536)):
        n += len(b)
    print(n, time.monotonic() - t)
else:                       # source: send N bytes
    for _ in range(100):
        try:
            s = socket.create_connection((host, port), timeout=5); break
        except OSError:
            time.sleep(0.05)
    s.sendall(b"\0" * int(sys.argv[4])); s.close()
"""


def _listen(net: NetCluster, host: str, *args: str) -> subprocess.Popen:
    proc = net.popen(host, [sys.executable, "-c", PROBE, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _reaches(net: NetCluster, src: str, dst: str, port: int = 5001) -> bool:
    """Whether UDP datagrams from ``src`` arrive at ``dst``: yes as soon as one does; no
    once the sender has sent for 1.5 s and half a second more has passed (so a slow
    start on a busy machine cannot make a link look cut)."""
    listener = _listen(net, dst, "listen", net.host(dst).ip, str(port), "30")
    sender = net.popen(src, [sys.executable, "-c", PROBE, "send", net.host(dst).ip, str(port)])
    sent = None
    while listener.poll() is None:
        if sent is None and sender.poll() is not None:
            sent = time.monotonic()
        if sent is not None and time.monotonic() - sent > 0.5:
            listener.kill()
            break
        time.sleep(0.02)
    sender.kill()
    sender.wait()
    return listener.communicate()[0].strip() == "got"


def _transfer_seconds(net: NetCluster, src: str, dst: str, size: int, port: int = 5002) -> float:
    sink = _listen(net, dst, "sink", net.host(dst).ip, str(port))
    net.exec(src, [sys.executable, "-c", PROBE, "source", net.host(dst).ip, str(port), str(size)])
    got, seconds = sink.communicate(timeout=60)[0].split()
    assert int(got) == size
    return float(seconds)


# -- the deployment --------------------------------------------------------------------------------
@needs_netns
def test_clients_on_other_hosts_push_and_pull_exactly(net):
    """Each client host runs a script that connects to the scheduler's address on the
    emulated network with its own worker key, pushes, pulls, and reads back exactly what
    it pushed; the operator host's `psd status` sees 3 healthy servers at their hosts'
    addresses (what they advertised), none at loopback."""
    runs = [net.popen(f"client{i}", [sys.executable, str(CLIENT), net.scheduler, str(i + 1)],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for proc in runs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"client failed: {out}\n{err[-2000:]}"
        results.append(json.loads(out))
    assert all(r["exact"] and r["keys"] > 1900 for r in results), results
    st = net.status()
    assert st["health"]["state"] == "ok", st["health"]
    servers = [n for n in st["nodes"] if n["role"] == "server" and n["state"] == "active"]
    assert len(servers) == 3
    server_ips = {h.ip for h in net.role_hosts("server")}
    assert {n["address"].split("//")[1].rsplit(":", 1)[0] for n in servers} == server_ips
    assert st["replication"] == 2 and all(len(r["owners"]) == 2 for r in st["ranges"])
    assert len({n["id"] for n in st["nodes"] if n["role"] == "worker"}) == 2  # one per client host


@needs_netns
def test_each_host_holds_only_the_keys_it_needs(net):
    """Daemon hosts: the daemons' pair and the allow-list, no client's secret; a client
    host: server.key and its own worker pair; the operator host: its operator pair."""
    def files(host: str) -> set[str]:
        folder = net.keys_dir(host)
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}

    for host in ("scheduler", "server0"):
        held = files(host)
        assert {"server.key", "server.key_secret", "authorized/server.key"} <= held
        assert not [f for f in held if f.endswith(".key_secret") and f != "server.key_secret"], held
    assert files("client1") == {"server.key", "client1.key_secret"}
    assert files("operator") == {"server.key", "operator.key_secret"}
    assert oct(net.keys_dir("client1").stat().st_mode & 0o777) == "0o700"
    assert "keys:" not in net.config_path.read_text()  # per host: PSD_KEYS in its psd.env
    assert f"scheduler: {net.scheduler}" in net.config_path.read_text()


@needs_netns
def test_a_server_host_without_its_bind_address_is_refused_and_not_restarted(net):
    """Found here: without PSD_BIND a server bound 127.0.0.1 and joined the ring at an
    address no other host reaches (status said OK; workers timed out on it). It now
    exits 2 naming the setting, and, as RestartPreventExitStatus=2 says, stays down."""
    env_file = net.host_dir("server2") / "etc" / "psd" / "psd.env"
    kept = env_file.read_text()
    env_file.write_text("".join(line + "\n" for line in kept.splitlines() if not line.startswith("PSD_BIND=")))
    try:  # a second server on that host, started while its psd.env lacks PSD_BIND
        unit = net.add_unit("server2", "server", instance="9")
        net.supervisor.start(unit)
        unit.wait_state({"failed", "active"}, 30)
    finally:
        env_file.write_text(kept)
    assert unit.wait_state({"failed"}, 30) == "failed"
    time.sleep(unit.policy.restart_sec + 0.5)
    assert [code for _, code in unit.exits] == [2] and len(unit.starts) == 1
    log = unit.log_tail()
    assert "127.0.0.1 is a loopback address, but the scheduler is at tcp://10.213." in log
    assert "PSD_BIND=tcp://THIS_HOST_ADDRESS:0" in log


# -- the network tools -------------------------------------------------------------------------------
@needs_netns
def test_links_are_shaped_in_both_directions(net):
    """A tbf on both ends of every link at the given rate; `rate` changes both, and a
    transfer in either direction takes as long as the rate says (generous bounds)."""
    host = net.host("client1")
    assert "tbf" in qdiscs(host.veth) and "rate 1Gbit" in qdiscs(host.veth)
    assert "rate 1Gbit" in qdiscs("eth0", ns=host.ns)
    size = 1_000_000
    fast = _transfer_seconds(net, "client1", "operator", size)
    net.rate("client1", "8mbit")  # 1 MB/s
    try:
        assert "rate 8Mbit" in qdiscs(host.veth) and "rate 8Mbit" in qdiscs("eth0", ns=host.ns)
        out = _transfer_seconds(net, "client1", "operator", size)   # shaped inside the namespace
        back = _transfer_seconds(net, "operator", "client1", size)  # shaped on the bridge side
    finally:
        net.rate("client1", "1gbit")
    assert 0.7 < out < 15 and 0.7 < back < 15, (out, back)
    assert fast < out / 3, (fast, out)


@needs_netns
def test_partition_block_and_heal_at_the_network_level(net):
    """`partition` cuts a host off; `block --one-way` drops one direction only; `heal`
    restores both. Checked with UDP datagrams, not with psd."""
    assert _reaches(net, "client1", "operator")
    net.partition("client1")
    try:
        assert not _reaches(net, "client1", "operator")
        assert net.links()["client1"]["up"] is False
    finally:
        net.heal()
    net.block("operator", "client1", both=False)
    try:
        assert net.links()["client1"]["blocked_from"] == ["operator"]
        assert "blackhole" in qdiscs(net.host("client1").veth)
        assert not _reaches(net, "operator", "client1")
        assert _reaches(net, "client1", "operator")
    finally:
        net.heal()
    assert _reaches(net, "operator", "client1")
    assert "blackhole" not in qdiscs(net.host("client1").veth)


@needs_netns
def test_pusher_logs_acked_pushes_and_verify_checks_them(net):
    """The helper for partition tests: a client pushing to its own keys until stopped,
    logging each acknowledged push; verify pulls and compares with the log."""
    pusher = net.start_pusher("client1", seed=5, window=4)
    deadline = time.monotonic() + 30
    while len(pusher.log().acked) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = pusher.stop()
    assert log.done and len(log.acked) >= 20 and not log.failed
    assert log.uncertain() == set()  # stopped cleanly: every issued push was acked
    result = net.verify_pushes("client0", [pusher])
    assert result["ok"] and result["acked"] == len(log.acked), result


@needs_netns
def test_a_killed_daemon_is_restarted_after_restart_sec(net):
    """The supervisor follows the unit: SIGKILL is a failure, so after RestartSec a new
    process starts and is READY (registered) again; SIGTERM is a clean stop."""
    unit = net.unit("server1")
    policy = unit.policy
    assert (policy.restart, policy.restart_sec, policy.restart_prevent) == ("on-failure", 2.0, frozenset({2}))
    assert policy.watchdog_sec == 30 and policy.timeout_stop_sec == 90  # read from psd-server@.service
    first = unit.pid
    net.kill("server1", signal.SIGKILL)
    unit.wait_state({"auto-restart"}, 10)  # exited; RestartSec to go
    address = unit.wait_ready(30)
    assert unit.pid != first and address.startswith(f"tcp://{net.host('server1').ip}:")
    (killed, code), (restarted, _) = unit.exits[-1], unit.starts[-1]
    assert code == -signal.SIGKILL and restarted - killed >= policy.restart_sec - 0.1


# -- by itself: a crash of the tool ---------------------------------------------------------
@needs_netns
def test_down_removes_everything_after_the_tool_was_killed(tmp_path):
    """The process holding the cluster is SIGKILLed: its daemons die with it
    (PR_SET_PDEATHSIG), and `netcluster.py down --run DIR` removes the rest from the
    record."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, str(SCRIPT), "--run", str(run), "up", "--foreground", "--servers", "1",
                               "--clients", "0", "--replication", "1", "--rate", "10mbit"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    made = {}
    try:
        line = holder.stdout.readline()
        assert line.startswith("up:"), line + holder.stderr.read()[-2000:] if holder.poll() is not None else line
        made = json.loads((run / "state.json").read_text())
        assert len(made["namespaces"]) == 3 and len(made["processes"]) == 2
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        from psd.testing.netcluster import process_start
        deadline = time.monotonic() + 10
        while any(process_start(e["pid"]) == e["start"] for e in made["processes"].values()):
            assert time.monotonic() < deadline, "the daemons outlived the tool"
            time.sleep(0.05)
        assert set(made["namespaces"]) <= set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                             text=True).stdout.split())  # still there
    finally:
        if holder.poll() is None:
            holder.kill()
        down = subprocess.run([sys.executable, str(SCRIPT), "--run", str(run), "down"], capture_output=True,
                              text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert "removed namespace" in down.stdout
    assert not _leftovers(made["tag"], made)


@needs_netns
def test_names_are_resolved_again_when_the_scheduler_moves(tmp_path):
    """Hosts know each other by name (/etc/hosts per namespace); the YAML names the
    scheduler, servers bind 0.0.0.0 and advertise their names. The scheduler host gets
    a new address and its daemon restarts on its state: the server, still running,
    finds it again because ZeroMQ resolves the name at every reconnect; a new client
    does too."""
    net = NetCluster(servers=1, clients=1, rate=None, replication=1, names=True, advertise=True, run_dir=tmp_path)
    try:
        net.up()
        assert net.scheduler == "tcp://scheduler.psd.test:9300"
        [server] = [n for n in net.status()["nodes"] if n["role"] == "server"]
        assert server["address"].startswith("tcp://server0.psd.test:")  # advertised, port filled in
        net.exec("client0", [sys.executable, str(CLIENT), net.scheduler, "1"])
        net.stop("scheduler")
        net.move("scheduler", "10.213.0.200")
        assert net.start("scheduler") == "tcp://10.213.0.200:9300"
        deadline = time.monotonic() + 20
        while True:
            nodes = {n["id"]: n for n in net.status()["nodes"]}
            if nodes[server["id"]]["state"] == "active" and nodes[server["id"]]["last_heartbeat"] < 1.0:
                break
            assert time.monotonic() < deadline, f"the server did not find the moved scheduler: {nodes}"
            time.sleep(0.3)
        assert len(net.unit("server0").starts) == 1  # reconnected, not restarted
        out = net.exec("client0", [sys.executable, str(CLIENT), net.scheduler, "2"]).stdout
        assert json.loads(out)["exact"]
    finally:
        _down_and_check(net)


# -- the supervisor alone (no root needed) ---------------------------------------------------
def test_the_watchdog_aborts_a_hung_daemon_and_it_is_restarted(tmp_path):
    """A real scheduler on loopback under the supervisor, WatchdogSec shortened to 1 s:
    fed every 0.5 s from its event loop it stays up; frozen (SIGSTOP, as a hung loop) it
    gets SIGABRT and, that being a failure, a restart after RestartSec."""
    policy = UnitPolicy.from_file(UNITS / "psd-scheduler.service").with_(
        watchdog_sec=1.0, restart_sec=0.2, environment_files=())
    supervisor = Supervisor()
    unit = supervisor.add(Unit(
        name="scheduler", policy=policy, log_path=tmp_path / "scheduler.log", notify_path=tmp_path / "notify.sock",
        argv=[sys.executable, "-m", "psd", "scheduler", "--bind", "tcp://127.0.0.1:0", "--security", "none"],
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8"}))
    try:
        supervisor.start(unit)
        assert unit.wait_ready(30).startswith("tcp://127.0.0.1:")
        first = unit.pid
        time.sleep(1.5)
        assert (unit.state, unit.pid) == ("active", first)  # fed: nothing happened
        os.kill(first, signal.SIGSTOP)
        unit.wait_state({"auto-restart"}, 10)
        assert unit.exits[-1][1] == -signal.SIGABRT
        unit.wait_ready(30)
        assert unit.pid not in (None, first) and len(unit.starts) == 2
    finally:
        supervisor.close()
    assert unit.pid is None and unit.state == "inactive"


# -- a job on the deployment, against the same job on one machine -------------------------------
def _logreg_job(tmp_path: Path, name: str, workers: int) -> Path:
    import yaml
    job = yaml.safe_load((ROOT / "configs" / "jobs" / "logreg.yaml").read_text())
    job.update(name=name, workers=workers, output=str(tmp_path / name))
    job.pop("model", None)  # (no model files: the objective is what is compared)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@needs_netns
def test_a_job_submitted_to_the_hosts_reaches_the_objective_of_psd_run(tmp_path):
    """The shipped logistic-regression job, submitted with `psd submit` from the operator
    host to 1 scheduler host, 3 server hosts and 3 worker hosts (`psd worker` under the
    supervisor, worker keys, replication 2, CurveZMQ), ends done with the objective
    `psd run` reaches with the same number of workers on one machine, within 1%."""
    net = NetCluster(servers=3, clients=3, rate="1gbit", replication=2, worker_daemons=True,
                     run_dir=tmp_path / "net")
    try:
        net.up()
        job = _logreg_job(tmp_path, "hosts", 3)
        out = net.exec("operator", net.psd_argv("submit", str(job), "--config", str(net.config_path), "--follow",
                                                "--quiet"), timeout=240)
        assert "done" in out.stdout, out.stdout + out.stderr
        hosts = json.loads((tmp_path / "hosts" / "summary.json").read_text())
        workers = {n["id"] for n in net.status()["nodes"] if n["role"] == "worker"}
        assert len(workers) == 3
    finally:
        _down_and_check(net)
    local = subprocess.run([sys.executable, "-m", "psd", "run", str(_logreg_job(tmp_path, "local", 3)), "--quiet"],
                           capture_output=True, text=True, timeout=240)
    assert local.returncode == 0, local.stderr[-2000:]
    alone = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert hosts["state"] == alone["state"] == "done"
    assert abs(hosts["objective"] - alone["objective"]) <= 0.01 * alone["objective"], (hosts, alone)

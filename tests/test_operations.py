"""Running psd as a service: exit codes, sd_notify, structured logs, systemd units.

Real ``psd`` processes with real unix datagram sockets standing in for systemd's
notification socket. Every wait is bounded and every process is killed at the end of
its test, whatever happens.
"""
from __future__ import annotations

import asyncio
import configparser
import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from psd.client import admin
from psd.config import ClusterConfig
from psd.errors import ConfigError, StartupError
from psd.roles.daemon import (EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_STARTUP, IdentityFilter, JsonFormatter,
                              LogIdentity, Notifier, run_daemon)

from conftest import shared_keys

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "configs" / "systemd"
#: bound on any one process start-up or exit (2 loaded cores)
SLOW = 20.0


def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus anything that would steer a daemon (PSD_*, systemd's)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PSD_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    return env | extra


def daemon_env(**extra: str) -> dict[str, str]:
    """``clean_env`` plus the CurveZMQ keys daemons need (security is on by default)."""
    return clean_env(PSD_KEYS=shared_keys(), **extra)


class NotifySocket:
    """A unix datagram socket like systemd's NOTIFY_SOCKET; records what arrives."""

    def __init__(self, abstract: bool = False):
        self.dir = tempfile.mkdtemp(prefix="psd-n")  # short: unix socket paths are <= 107 bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"psd-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)
        self.got: list[tuple[float, str]] = []

    def recv(self, timeout: float) -> str | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            text = self.sock.recv(4096).decode()
        except socket.timeout:
            return None
        self.got.append((time.monotonic(), text))
        return text

    def wait_for(self, field: str, timeout: float = SLOW) -> str:
        """The first datagram with the line ``field`` (e.g. READY=1) from now on."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            text = self.recv(left)
            if text is not None and field in text.split("\n"):
                return text
        raise AssertionError(f"no {field} within {timeout} s; got {[t for _, t in self.got]}")

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        start = len(self.got)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.recv(left)
        return self.got[start:]

    def receive_in_background(self) -> None:
        """Keep receiving on a thread (while this thread runs a daemon in-process)."""
        self._stop = threading.Event()

        def loop():
            while not self._stop.is_set():
                with contextlib.suppress(OSError):
                    self.recv(0.05)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop_background(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def close(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self.stop_background()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket():
    opened = []

    def open_(abstract: bool = False) -> NotifySocket:
        n = NotifySocket(abstract)
        opened.append(n)
        return n

    try:
        yield open_
    finally:
        for n in opened:
            n.close()


class Proc:
    """A ``psd`` subprocess whose stdout and stderr go to files."""

    def __init__(self, args: list[str], workdir: Path, name: str, env: dict[str, str] | None = None):
        self.name = name
        self.out_path, self.err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        self.started = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "psd", *args], env=env or daemon_env(),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=ROOT)

    def wait(self, timeout: float = SLOW) -> int:
        code = self.proc.wait(timeout)
        self.elapsed = time.monotonic() - self.started
        return code

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def psd_proc(tmp_path):
    """``psd_proc(args, name=..., env=...)`` starts ``python -m psd ARGS``; every one is
    killed after the test (the test asserts how those it waits for ended)."""
    started: list[Proc] = []

    def start(args: list[str], name: str | None = None, env: dict[str, str] | None = None) -> Proc:
        p = Proc(args, tmp_path, name or f"p{len(started)}", env)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- exit codes ------------------------------------------------------------------------------
def test_config_check(psd_proc, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("heartbeat_interval: 0\nreplication: 1\nconsistency: strong\n")
    ok = psd_proc(["config", "check", "configs/cluster.yaml"], "ok")
    broken = psd_proc(["config", "check", str(bad)], "broken")
    env = psd_proc(["config", "check", "configs/local.yaml"], "env",
                   env=clean_env(PSD_HEARTBEAT_INTERVAL="soon"))
    flagged = psd_proc(["config", "check", "configs/local.yaml", "--vnodes", "32"], "flagged",
                       env=clean_env(PSD_REPLICATION="2"))

    assert ok.wait() == 0, ok.stderr
    assert ok.stdout.splitlines() == [ok.stdout.strip()] and ok.stdout.startswith("OK configs/cluster.yaml: ")
    assert broken.wait() == 2
    assert broken.stdout == ""
    assert broken.stderr.splitlines() == [
        "psd: config error: 2 problems:",
        f"  {bad}:1: heartbeat_interval: expected a positive number of seconds, got 0",
        f"  {bad}:3: consistency: expected one of sequential, bounded, eventual, got 'strong'"]
    assert env.wait() == 2
    assert env.stderr.strip() == ("psd: config error: environment variable PSD_HEARTBEAT_INTERVAL: "
                                  "expected a positive number of seconds, got 'soon'")
    assert flagged.wait() == 0, flagged.stderr
    assert flagged.stdout.strip().endswith("(with PSD_REPLICATION, --vnodes)")


def test_daemons_exit_2_on_config_errors(psd_proc, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler: tcp://127.0.0.1:1\nlimits:\n  max_frames: -1\n")
    server = psd_proc(["server", "--config", str(bad)], "server")
    scheduler = psd_proc(["scheduler"], "scheduler", env=daemon_env(PSD_LIMITS_MAX_MESSAGE_BYTES="1 GiB"))
    worker = psd_proc(["worker", "--log-format", "xml"], "worker")
    assert server.wait() == 2
    assert f"{bad}:3: limits.max_frames: expected a positive integer, got -1" in server.stderr
    assert scheduler.wait() == 2
    assert "environment variable PSD_LIMITS_MAX_MESSAGE_BYTES: expected a positive integer" in scheduler.stderr
    assert worker.wait() == 2
    assert "flag --log-format: expected one of human, json, got 'xml'" in worker.stderr


def test_daemons_exit_3_on_start_up_failures(psd_proc):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        nobody = f"tcp://127.0.0.1:{free_port()}"
        sched = psd_proc(["scheduler", "--bind", f"tcp://127.0.0.1:{port}"], "scheduler-port")
        server_port = psd_proc(["server", "--scheduler", nobody, "--bind", f"tcp://127.0.0.1:{port}"], "server-port")
        server = psd_proc(["server", "--scheduler", nobody, "--startup-timeout", "1"], "server-unreachable")
        worker = psd_proc(["worker", "--scheduler", nobody, "--startup-timeout", "1"], "worker-unreachable")
        for p in (sched, server_port):
            assert p.wait() == 3, p.stderr
            assert "start-up failed: Address already in use" in p.stderr
        for p in (server, worker):
            assert p.wait() == 3, p.stderr
            assert (f"start-up failed: not ready within startup_timeout (1 s); is the scheduler at {nobody} "
                    f"running and reachable?") in p.stderr
            assert p.elapsed < 1 + SLOW / 2
    # human log lines name the node (S? until it has joined) and the role
    assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+ E S\?/server psd\.daemon: start-up failed", server.stderr, re.M)
    assert re.search(r" I -/worker psd\.daemon: exit 3 \(start-up failure\)$", worker.stderr, re.M)


# -- sd_notify -------------------------------------------------------------------------------
def test_scheduler_notifies_ready_feeds_the_watchdog_and_says_stopping(psd_proc, notify_socket):
    n = notify_socket()
    p = psd_proc(["scheduler", "--bind", "tcp://127.0.0.1:0"], "scheduler",
                 env=daemon_env(NOTIFY_SOCKET=n.address, WATCHDOG_USEC="200000"))
    ready = n.wait_for("READY=1")
    address = re.search(r"^STATUS=ready: (tcp://\S+)$", ready, re.M).group(1)
    # READY=1 came once it was bound and serving: it answers at once
    assert admin.call(address, "ping", timeout=5, config=ClusterConfig(keys=shared_keys())) is not None
    assert "STOPPING=1" not in [t for _, t in n.got]
    beats = [t for t, text in n.collect(0.8) if text == "WATCHDOG=1"]
    assert len(beats) >= 3, n.got                       # every 0.1 s: half of WATCHDOG_USEC
    assert max(np.diff(beats)) < 0.5
    p.proc.send_signal(signal.SIGTERM)
    stopping = n.wait_for("STOPPING=1", timeout=10)
    assert p.wait() == 0, p.stderr
    assert "STATUS=" in stopping
    assert [text for _, text in n.got].count(ready) == 1            # once


def test_notifier_speaks_to_abstract_sockets_and_honours_watchdog_pid(notify_socket):
    n = notify_socket(abstract=True)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": n.address, "WATCHDOG_USEC": "3000000"}, pid=42)
    assert notifier.watchdog_interval == 1.5
    assert notifier.send("READY=1", "STATUS=ok")
    assert n.recv(5) == "READY=1\nSTATUS=ok"
    other = Notifier.from_env({"NOTIFY_SOCKET": n.address, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "41"}, pid=42)
    assert other.watchdog_interval is None              # the watchdog is another process's
    assert Notifier.from_env({}).send("READY=1") is False
    odd = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert odd.address is None and "not a unix socket path" in odd.problem
    gone = Notifier("/nonexistent/psd-notify")
    assert gone.send("WATCHDOG=1") is False and gone.send("WATCHDOG=1") is False  # no exception


def test_watchdog_is_fed_from_the_event_loop(notify_socket):
    """A loop that hangs stops feeding the watchdog (so systemd restarts the daemon)."""
    n = notify_socket()

    async def role(stop, ready):
        ready("tcp://127.0.0.1:1")
        await asyncio.sleep(0.3)
        time.sleep(0.8)                                  # the loop hangs
        await asyncio.sleep(0.3)

    n.receive_in_background()
    code = run_daemon(role, event_loop="asyncio", notify=Notifier(n.address, 100_000))
    assert code == EXIT_OK
    n.stop_background()
    got = n.got
    beats = [t for t, text in n.got if text == "WATCHDOG=1"]
    assert len(beats) >= 4, got
    assert max(np.diff(beats)) > 0.7                     # nothing while it hung
    assert sorted(np.diff(beats))[len(beats) // 2] < 0.3
    assert "READY=1\nSTATUS=ready: tcp://127.0.0.1:1" in [t for _, t in n.got]
    assert n.got[-1][1].startswith("STOPPING=1")


@pytest.mark.parametrize("case,expected", [
    ("clean", EXIT_OK), ("config", EXIT_CONFIG), ("startup", EXIT_STARTUP), ("never_ready", EXIT_STARTUP),
    ("os_error", EXIT_STARTUP), ("bug_before_ready", EXIT_STARTUP), ("bug_after_ready", EXIT_FAILURE),
    ("psd_error_after_ready", EXIT_FAILURE)])
def test_exit_code_mapping(case, expected):
    async def role(stop, ready):
        if case == "config":
            raise ConfigError("bad")
        if case == "startup":
            raise StartupError("no")
        if case == "os_error":
            raise OSError(98, "Address already in use")
        if case == "bug_before_ready":
            raise KeyError("x")
        if case == "never_ready":
            await asyncio.sleep(30)
        ready("tcp://127.0.0.1:1")
        if case == "bug_after_ready":
            raise RuntimeError("bug")
        if case == "psd_error_after_ready":
            raise StartupError("lost")

    started = time.monotonic()
    assert run_daemon(role, event_loop="asyncio", startup_timeout=0.3) == expected
    assert time.monotonic() - started < 5


# -- structured logs -------------------------------------------------------------------------
def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]


def test_json_logs_name_node_and_role(psd_proc, notify_socket):
    ns, nv = notify_socket(), notify_socket()
    sched = psd_proc(["scheduler", "--bind", "tcp://127.0.0.1:0", "--log-format", "json"], "scheduler",
                     env=daemon_env(NOTIFY_SOCKET=ns.address))
    address = re.search(r"STATUS=ready: (tcp://\S+)", ns.wait_for("READY=1")).group(1)
    server = psd_proc(["server", "--scheduler", address], "server",
                      env=daemon_env(NOTIFY_SOCKET=nv.address, PSD_LOG_FORMAT="json"))
    nv.wait_for("READY=1")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.stderr
    sched.proc.send_signal(signal.SIGTERM)
    assert sched.wait() == 0, sched.stderr

    for records, role in ((json_lines(sched.stderr), "scheduler"), (json_lines(server.stderr), "server")):
        for r in records:
            assert {"ts", "level", "logger", "node", "role", "pid", "msg"} <= set(r), r
            assert r["role"] == role and r["level"] in ("debug", "info", "warning", "error")
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"])
    server_records = json_lines(server.stderr)
    joined = [r for r in server_records if r["msg"].startswith("S0 serving at")]
    assert joined and joined[0]["node"] == "S0" and isinstance(joined[0]["ring"], int)
    assert server_records[-1]["msg"] == "exit 0 (clean stop)" and server_records[-1]["node"] == "S0"
    sched_records = json_lines(sched.stderr)
    assert {r["node"] for r in sched_records} == {"H"}
    assert any(r["msg"].startswith("S0 joined as server") for r in sched_records)


def test_logs_never_dump_arrays():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(IdentityFilter(LogIdentity("server", "S3")))
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("psd.test_operations")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        values = np.arange(4096, dtype=np.float32) + 12345
        logger.warning("pushed %s to %r", values, {"w": values})
        logger.warning(values)
        logger.warning("keys %s", [np.arange(3000, dtype=np.uint64)])
    finally:
        logger.removeHandler(handler)
    records = json_lines(stream.getvalue())
    assert records[0]["msg"] == "pushed <float32[4096] 16 KiB> to {'w': <float32[4096] 16 KiB>}"
    assert records[1]["msg"] == "<float32[4096] 16 KiB>"
    assert records[2]["msg"] == "keys [<uint64[3000] 23 KiB>]"
    assert all(r["node"] == "S3" and r["role"] == "server" for r in records)
    assert "12345" not in stream.getvalue()


# -- systemd units ---------------------------------------------------------------------------
UNIT_FILES = ["psd-scheduler.service", "psd-server@.service", "psd-worker@.service"]


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string((UNITS / name).read_text())
    return parser


@pytest.mark.parametrize("name", UNIT_FILES)
def test_unit_files_have_what_operations_need(name):
    unit = read_unit(name)
    svc = unit["Service"]
    role = name.split("-")[1].split("@")[0].split(".")[0]
    assert svc["ExecStart"] == f"/usr/local/bin/psd {role} --config /etc/psd/cluster.yaml"
    assert svc["Type"] == "notify"
    assert svc["Restart"] == "on-failure"
    assert svc["RestartPreventExitStatus"] == "2"
    assert int(svc["WatchdogSec"]) > 0
    # a server drains on SIGTERM, bounded by request_timeout (30 s by default): the grace is above it
    assert int(svc["TimeoutStopSec"]) > (30 if role == "server" else 5)
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["User"] == "psd" and svc["StateDirectory"] == "psd"
    assert svc["ProtectSystem"] == "strict"
    for key in ("ProtectHome", "NoNewPrivileges", "PrivateTmp"):
        assert svc[key] == "yes", key
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` reports problems on stderr (often with exit status 0):
    a clean run prints nothing. It also checks that ExecStart's program exists, so the
    copies point at a stand-in for /usr/local/bin/psd."""
    fake = tmp_path / "psd"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    for name in UNIT_FILES:
        (tmp_path / name).write_text((UNITS / name).read_text().replace("/usr/local/bin/psd", str(fake)))
    # templates are checked through an instance, so %i is expanded as systemd would
    targets = [str(tmp_path / n) for n in ("psd-scheduler.service", "psd-server@1.service", "psd-worker@1.service")]
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *targets], capture_output=True, text=True,
                            timeout=SLOW, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    # and it does catch a broken unit
    broken = tmp_path / "psd-broken@.service"
    broken.write_text((tmp_path / "psd-server@.service").read_text().replace("Type=notify", "Type=notifyy"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "psd-broken@1.service")],
                            capture_output=True, text=True, timeout=SLOW, cwd=tmp_path)
    assert "Failed to parse service type" in result.stderr


def test_a_slow_preparation_keeps_the_watchdog_fed_and_is_not_start_up_time(notify_socket):
    """A server compiling its store on a cold cache (35 s on one core) under a unit with
    WatchdogSec=30 and startup_timeout 60 was killed by the watchdog, or failed start-up
    blaming the scheduler: the compile runs beside the loop, and the start-up clock
    starts after it."""
    n = notify_socket()
    prepared = []

    def prepare():
        time.sleep(1.0)                                  # blocks, as numba's compiler does
        prepared.append(time.monotonic())

    async def role(stop, ready):
        ready("tcp://127.0.0.1:1")
        await asyncio.sleep(0.2)

    n.receive_in_background()
    code = run_daemon(role, event_loop="asyncio", notify=Notifier(n.address, 100_000),
                      startup_timeout=0.3, prepare=prepare)
    n.stop_background()
    assert code == EXIT_OK, n.got
    assert prepared
    texts = [text for _, text in n.got]
    assert any(t.startswith("STATUS=preparing") for t in texts), texts
    assert any(t.startswith("EXTEND_TIMEOUT_USEC=") for t in texts), texts
    beats = [t for t, text in n.got if text == "WATCHDOG=1" and t <= prepared[0]]
    assert len(beats) >= 6, texts                        # fed every 0.1 s while it compiled
    assert max(np.diff(beats)) < 0.5, np.diff(beats)
    assert "READY=1\nSTATUS=ready: tcp://127.0.0.1:1" in texts


def test_a_failed_preparation_is_a_start_up_failure(notify_socket):
    n = notify_socket()

    def prepare():
        raise OSError(28, "No space left on device")

    async def role(stop, ready):
        raise AssertionError("the role must not start")

    n.receive_in_background()
    assert run_daemon(role, event_loop="asyncio", notify=Notifier(n.address), prepare=prepare) == EXIT_STARTUP
    n.stop_background()
    assert n.got and n.got[-1][1].startswith("STOPPING=1"), n.got  # systemd is told, as for any end

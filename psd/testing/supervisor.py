"""A small stand-in for systemd: start daemons, restart them as the shipped units say.

The emulated hosts have no systemd, yet what an operator relies on is what the units in
``configs/systemd/`` make systemd do: ``Type=notify`` readiness (``READY=1`` on
``$NOTIFY_SOCKET``), ``Restart=on-failure`` after ``RestartSec``, never after an exit
status in ``RestartPreventExitStatus`` (2: a config error), the watchdog
(``WatchdogSec``: no ``WATCHDOG=1`` for that long and the daemon gets SIGABRT),
``TimeoutStartSec`` and ``TimeoutStopSec``, and the start limit (``StartLimitBurst``
starts within ``StartLimitIntervalSec`` and the unit stays failed). :class:`UnitPolicy`
reads those settings from the unit files themselves, so the emulation follows them when
they change; :class:`Supervisor` applies them.

One thread does every start, so ``PR_SET_PDEATHSIG`` (which fires when the *thread* that
forked a child ends) kills the daemons when the process holding the supervisor dies,
even by SIGKILL. Each daemon leads its own process group, so a stop reaches its
children too.
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import resource
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

log = logging.getLogger("psd.testing.supervisor")

_PR_SET_PDEATHSIG = 1
#: signals after which Restart=on-failure does not restart (systemd.service(5))
CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})
TICK = 0.05


try:  # loaded now: a child between fork and exec must not dlopen or import (locks)
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


def die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL when the thread that started it ends."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def child_setup() -> None:
    """Runs in a daemon before exec: it dies with the supervisor's thread, and leaves no
    core file when the watchdog aborts it (SIGABRT dumps core by default)."""
    die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# -- the unit file ----------------------------------------------------------------------------
def _seconds(text: str) -> float:
    """systemd time spans as the units use them: ``2``, ``90s``, ``5min``, ``500ms``."""
    text = text.strip()
    for suffix, scale in (("ms", 1e-3), ("min", 60.0), ("s", 1.0), ("h", 3600.0)):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * scale
    return float(text)


def read_unit_file(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (every section), each key's values in order."""
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        values.setdefault(key.strip(), []).append(value.strip())
    return values


@dataclass(frozen=True)
class UnitPolicy:
    """What systemd does with one unit. The defaults are those of the shipped units;
    :meth:`from_file` reads the real ones."""

    restart: str = "on-failure"
    restart_sec: float = 2.0
    restart_prevent: frozenset = frozenset({2})
    watchdog_sec: float | None = 30.0
    timeout_start_sec: float = 90.0
    timeout_stop_sec: float = 30.0
    kill_signal: int = signal.SIGTERM
    start_limit_burst: int = 10
    start_limit_interval_sec: float = 300.0
    environment_files: tuple = ()

    @classmethod
    def from_file(cls, path: Path, instance: str = "") -> "UnitPolicy":
        v = {k: vals[-1] for k, vals in read_unit_file(path).items()}
        watchdog = _seconds(v["WatchdogSec"]) if "WatchdogSec" in v else None
        return cls(
            restart=v.get("Restart", "no"),
            restart_sec=_seconds(v.get("RestartSec", "0.1")),
            restart_prevent=frozenset(int(x) for x in v.get("RestartPreventExitStatus", "").split() if x.isdigit()),
            watchdog_sec=watchdog or None,
            timeout_start_sec=_seconds(v.get("TimeoutStartSec", "90")),
            timeout_stop_sec=_seconds(v.get("TimeoutStopSec", "90")),
            kill_signal=getattr(signal, v.get("KillSignal", "SIGTERM")),
            start_limit_burst=int(v.get("StartLimitBurst", "5")),
            start_limit_interval_sec=_seconds(v.get("StartLimitIntervalSec", "10")),
            environment_files=tuple(f.lstrip("-").replace("%i", instance)
                                    for f in read_unit_file(path).get("EnvironmentFile", [])))

    def with_(self, **changes) -> "UnitPolicy":
        return replace(self, **changes)

    def restarts_after(self, returncode: int) -> bool:
        """Whether ``Restart=on-failure`` restarts a process that ended so (a negative
        code is the signal that killed it)."""
        if self.restart == "always":
            return True
        if self.restart != "on-failure":
            return False
        if returncode < 0:
            return -returncode not in CLEAN_SIGNALS
        return returncode != 0 and returncode not in self.restart_prevent


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines as ``EnvironmentFile=`` reads them (comments, blank lines and
    surrounding quotes dropped); a missing file is empty, as with the ``-`` prefix."""
    env: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return env
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


# -- one unit ----------------------------------------------------------------------------------
@dataclass
class Unit:
    """One supervised daemon: ``argv`` run with ``env`` (plus its policy's environment
    files, read at every start as systemd does) under ``prefix`` (``ip netns exec NS``).
    ``state`` is systemd's: inactive, activating, active, deactivating, auto-restart,
    failed."""

    name: str
    argv: list[str]
    policy: UnitPolicy
    log_path: Path
    notify_path: Path
    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)
    state: str = "inactive"
    #: what STATUS=ready: said (a daemon's bound address, or a worker's node id)
    address: str | None = None
    #: (time.time(), pid) of each start, (time.time(), returncode) of each exit
    starts: list = field(default_factory=list)
    exits: list = field(default_factory=list)
    proc: subprocess.Popen | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    _sock: socket.socket | None = None
    _since: float = 0.0        # monotonic: when the state last changed
    _watchdog: float = 0.0     # monotonic: the last WATCHDOG=1
    _restart_at: float = 0.0
    _stop_deadline: float = 0.0
    _stop_failed: bool = False  # stopped by the supervisor for a timeout: restart it

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def returncode(self) -> int | None:
        return self.exits[-1][1] if self.exits else None

    def wait_ready(self, timeout: float) -> str:
        """Until READY=1; returns the STATUS address. Raises naming the log if it failed."""
        if not self.ready.wait(timeout):
            raise TimeoutError(f"{self.name} not ready within {timeout:g} s (state {self.state}, exits "
                               f"{[c for _, c in self.exits]}); its log {self.log_path}:\n{self.log_tail()}")
        return self.address or ""

    def wait_state(self, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while self.state not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} is {self.state}, not {'/'.join(sorted(states))}, after "
                                   f"{timeout:g} s; its log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.02)
        return self.state

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the running process (a fault, not a stop: the policy decides what follows)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)


# -- the supervisor thread ---------------------------------------------------------------------
class Supervisor:
    """Runs units as their policies say, on a thread of its own. ``on_start(unit, pid)``
    is called after every start (the caller records the pid). Public methods may be
    called from any thread; starts and stops happen on the supervisor's."""

    def __init__(self, on_start: Callable[[Unit, int], None] | None = None):
        self.units: dict[str, Unit] = {}
        self.on_start = on_start
        self._orders: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._problem: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="psd-supervisor", daemon=True)
        self.thread.start()

    # -- asked from any thread -----------------------------------------------------------
    def add(self, unit: Unit) -> Unit:
        unit.notify_path.parent.mkdir(parents=True, exist_ok=True)
        unit.notify_path.unlink(missing_ok=True)
        unit._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        # a path, not an abstract name: abstract unix sockets belong to one network
        # namespace, and the daemons run in others
        unit._sock.bind(str(unit.notify_path))
        self.units[unit.name] = unit
        return unit

    def start(self, unit: Unit) -> None:
        """``systemctl start``: returns at once; ``unit.wait_ready`` waits for READY=1."""
        self._order("start", unit)

    def stop(self, unit: Unit, sig: int | None = None, timeout: float | None = None) -> None:
        """``systemctl stop``: ``sig`` (the unit's KillSignal by default), SIGKILL after
        ``timeout`` (its TimeoutStopSec); waits until it has ended."""
        unit.ended.clear()
        self._order("stop", unit, sig, timeout)
        if not unit.ended.wait((timeout or unit.policy.timeout_stop_sec) + 10):
            raise TimeoutError(f"{unit.name} did not stop; its log {unit.log_path}")

    def close(self, sig: int = signal.SIGINT, timeout: float = 3.0) -> None:
        """Stop every unit (SIGINT: at once, no server drains) and end the thread."""
        if self.thread.is_alive():
            for unit in self.units.values():
                unit.ended.clear()
                self._order("stop", unit, sig, timeout)
            deadline = time.monotonic() + timeout + 5
            for unit in self.units.values():
                unit.ended.wait(max(0.0, deadline - time.monotonic()))
            self._closing.set()
            self.thread.join(10)
        for unit in self.units.values():  # the thread is gone (or never ran): by hand
            if unit.proc is not None and unit.proc.poll() is None:
                _kill_group(unit.proc, signal.SIGKILL)
                unit.proc.wait(5)
            if unit._sock is not None:
                unit._sock.close()
                unit.notify_path.unlink(missing_ok=True)

    def _order(self, *order) -> None:
        if self._problem is not None:
            raise RuntimeError(f"the supervisor thread died: {self._problem!r}")
        self._orders.put(order)

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                self._take_orders()
                self._read_notifications(TICK)
                now = time.monotonic()
                for unit in list(self.units.values()):
                    self._step(unit, now)
        except BaseException as e:  # kept: the next order raises it in the caller's thread
            self._problem = e
            log.exception("supervisor thread died")

    def _take_orders(self) -> None:
        while True:
            try:
                order = self._orders.get_nowait()
            except queue.Empty:
                return
            kind, unit, *rest = order
            if kind == "start":
                if unit.state in ("inactive", "failed", "auto-restart"):
                    self._spawn(unit)
            elif kind == "stop":
                self._begin_stop(unit, *rest)

    def _read_notifications(self, timeout: float) -> None:
        socks = {u._sock: u for u in self.units.values() if u._sock is not None}
        if not socks:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(list(socks), [], [], timeout)
        for sock in readable:
            unit = socks[sock]
            while True:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                self._notified(unit, data.decode(errors="replace"))

    def _notified(self, unit: Unit, text: str) -> None:
        """One datagram: READY=1 comes with STATUS=ready: ADDRESS, so the address is
        taken before anyone waiting for readiness is woken."""
        now = time.monotonic()
        fields = dict(line.partition("=")[::2] for line in text.splitlines())
        if fields.get("STATUS", "").startswith("ready: "):
            unit.address = fields["STATUS"][len("ready: "):]
        if "WATCHDOG" in fields:
            unit._watchdog = now
        if fields.get("READY") == "1" and unit.state == "activating":
            self._set(unit, "active", now)
            unit._watchdog = now
            unit.ready.set()

    def _step(self, unit: Unit, now: float) -> None:
        p = unit.proc
        if p is not None and p.poll() is not None:
            self._exited(unit, p.returncode, now)
            return
        policy = unit.policy
        if unit.state == "auto-restart" and now >= unit._restart_at:
            self._spawn(unit)
        elif unit.state == "activating" and now - unit._since > policy.timeout_start_sec:
            log.warning("%s: not ready within TimeoutStartSec=%g; stopping it", unit.name, policy.timeout_start_sec)
            self._begin_stop(unit, None, None, failed=True)
        elif unit.state == "active" and policy.watchdog_sec and now - unit._watchdog > policy.watchdog_sec:
            log.warning("%s: no WATCHDOG=1 for WatchdogSec=%g; SIGABRT", unit.name, policy.watchdog_sec)
            unit._watchdog = now
            _kill_group(p, signal.SIGABRT)  # and SIGCONT: a stopped daemon must get it too
        elif unit.state == "deactivating" and p is not None and now > unit._stop_deadline:
            _kill_group(p, signal.SIGKILL)

    def _exited(self, unit: Unit, code: int, now: float) -> None:
        unit.exits.append((time.time(), code))
        unit.proc = None
        unit.ready.clear()
        log.info("%s exited with %s", unit.name, f"signal {-code}" if code < 0 else f"code {code}")
        if unit.state == "deactivating" and not unit._stop_failed:  # asked to stop
            self._set(unit, "inactive", now)
        elif unit._stop_failed or unit.policy.restarts_after(code):
            recent = [s for s in unit.starts if s[0] > time.time() - unit.policy.start_limit_interval_sec]
            if len(recent) >= unit.policy.start_limit_burst:
                log.warning("%s: %d starts within StartLimitIntervalSec; giving up", unit.name, len(recent))
                self._set(unit, "failed", now)
            else:
                unit._restart_at = now + unit.policy.restart_sec
                self._set(unit, "auto-restart", now)
        else:
            self._set(unit, "inactive" if code == 0 or -code in CLEAN_SIGNALS else "failed", now)
        unit._stop_failed = False
        unit.ended.set()

    def _spawn(self, unit: Unit) -> None:
        env = dict(unit.env)
        for f in unit.policy.environment_files:
            env.update(read_env_file(Path(f)))
        env["NOTIFY_SOCKET"] = str(unit.notify_path)
        if unit.policy.watchdog_sec:
            env["WATCHDOG_USEC"] = str(int(unit.policy.watchdog_sec * 1e6))
        unit.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(unit.log_path, "ab") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} start {len(unit.starts) + 1} of {unit.name}\n".encode())
            out.flush()
            try:
                unit.proc = subprocess.Popen([*unit.prefix, *unit.argv], env=env, stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=child_setup)
            except OSError as e:  # systemd's 203/EXEC: the unit fails, the others go on
                out.write(f"--- cannot start {unit.argv[0]}: {e}\n".encode())
                self._set(unit, "failed", time.monotonic())
                unit.ended.set()
                return
        unit.starts.append((time.time(), unit.proc.pid))
        unit.address = None
        unit.ended.clear()
        self._set(unit, "activating", time.monotonic())
        if self.on_start is not None:
            self.on_start(unit, unit.proc.pid)

    def _begin_stop(self, unit: Unit, sig: int | None, timeout: float | None, failed: bool = False) -> None:
        unit._stop_failed = failed
        if unit.proc is None or unit.proc.poll() is not None:
            if unit.state in ("auto-restart", "activating", "active"):
                self._set(unit, "inactive", time.monotonic())
            unit.ended.set()
            return
        self._set(unit, "deactivating", time.monotonic())
        unit._stop_deadline = time.monotonic() + (timeout if timeout is not None else unit.policy.timeout_stop_sec)
        _kill_group(unit.proc, sig if sig is not None else unit.policy.kill_signal)

    @staticmethod
    def _set(unit: Unit, state: str, now: float) -> None:
        if unit.state != state:
            log.debug("%s: %s -> %s", unit.name, unit.state, state)
        unit.state = state
        unit._since = now


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the daemon's process group (it leads one), and SIGCONT so a stopped
    daemon can act on it."""
    try:
        os.killpg(proc.pid, sig)
        if sig not in (signal.SIGKILL, signal.SIGCONT):
            os.killpg(proc.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass

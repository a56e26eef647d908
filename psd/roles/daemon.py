"""What every psd daemon shares: event loop choice, signals, readiness, exit codes, logs.

A daemon is ready when its role calls ``ready(address)``: the scheduler once it has
bound, a server once it has joined the ring, a worker once it has registered. Then:

* the address goes to ``--ready-file`` (how LocalCluster learns free ports without races);
* systemd hears ``READY=1`` on ``$NOTIFY_SOCKET`` (units use ``Type=notify``).

Under systemd the daemon also feeds the watchdog (``WATCHDOG=1`` every half of
``$WATCHDOG_USEC``) from a task on its event loop, so a hung loop stops feeding it,
and says ``STOPPING=1`` when a signal starts the shutdown. The environment is read
once by the command-line layer and handed down as a :class:`Notifier`.

Exit codes, for systemd's ``Restart=on-failure`` / ``RestartPreventExitStatus=2``:
0 clean stop, 1 failure after start-up, 2 configuration error (never retried),
3 start-up failure (port in use, scheduler not reachable within ``startup_timeout``).

When started by a parent that asked for it (``--parent-pid``), the daemon exits when
that parent is gone, so a killed test run never leaves servers behind.
"""
from __future__ import annotations

import asyncio
import gc
import contextlib
import datetime
import json
import logging
import os
import select
import signal
import socket
import sys
from pathlib import Path
from typing import Awaitable, Callable, Mapping

import numpy as np
import zmq

from psd.codec.message import describe_array
from psd.errors import ConfigError, PsdError, StartupError
from psd.transport import install_event_loop
from psd.transport.sockets import tune_malloc

log = logging.getLogger("psd.daemon")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_STARTUP = 0, 1, 2, 3
EXIT_MEANING = {EXIT_OK: "clean stop", EXIT_FAILURE: "failed after start-up",
                EXIT_CONFIG: "configuration error", EXIT_STARTUP: "start-up failure"}


# -- sd_notify ----------------------------------------------------------------------------
class Notifier:
    """The systemd notification protocol: newline-separated ``KEY=value`` lines in one
    datagram to the unix socket named by ``$NOTIFY_SOCKET`` (``@name`` is the abstract
    namespace). Without a socket every call is a no-op."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None):
        self.problem: str | None = None
        if address and not address.startswith(("/", "@")):
            self.problem = f"NOTIFY_SOCKET={address!r} is not a unix socket path; not notifying systemd"
            address = None
        self.address = address or None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._warned = False
        self.sent: set[str] = set()

    @classmethod
    def from_env(cls, env: Mapping[str, str], pid: int | None = None) -> "Notifier":
        """From ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (the watchdog
        is ours only if WATCHDOG_PID is unset or names this process)."""
        usec = None
        text = env.get("WATCHDOG_USEC")
        owner = env.get("WATCHDOG_PID")
        mine = owner is None or owner.strip() == str(pid if pid is not None else os.getpid())
        if text and mine:
            try:
                usec = int(text)
            except ValueError:
                usec = None
        notifier = cls(env.get("NOTIFY_SOCKET"), usec)
        if text and usec is None and mine and notifier.problem is None:
            notifier.problem = f"WATCHDOG_USEC={text!r} is not an integer; not feeding the watchdog"
        return notifier

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 messages: half the watchdog timeout."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            # never blocks the event loop: a full or missing socket drops the message
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
                s.sendto("\n".join(fields).encode(), target)
        except OSError as e:
            if not self._warned:  # once: a dead socket would otherwise flood the log
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, e)
            return False
        self.sent.update(f.split("=", 1)[0] for f in fields)
        return True


async def _feed_watchdog(notify: Notifier, interval: float) -> None:
    while True:
        notify.send("WATCHDOG=1")
        await asyncio.sleep(interval)


# -- logging ------------------------------------------------------------------------------
class LogIdentity:
    """Who is logging: the role, and the node id and ring version read from the role
    object (``source.node_id``, ``source.ring.version``) each time a record is written,
    so records follow the id the scheduler assigns once the node has joined. One per
    daemon process; read from every thread (a context variable would not reach the
    heartbeat thread)."""

    def __init__(self, role: str = "", node: str | None = None, source: object | None = None):
        self.role = role
        self.node = node
        self.source = source

    def node_id(self) -> str | None:
        found = getattr(self.source, "node_id", None)
        return found if isinstance(found, str) else self.node

    def ring_version(self) -> int | None:
        version = getattr(getattr(self.source, "ring", None), "version", None)
        return version if isinstance(version, int) else None

    def clock(self) -> int | None:
        """``source.log_clock()``: a worker's own clock; on a server or the scheduler the
        slowest worker clock it knows. Read from any thread, so a failure reads as unknown."""
        read = getattr(self.source, "log_clock", None)
        try:
            value = read() if callable(read) else None
        except Exception:
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None


class _ArrayShown:
    """An array in a log call, shown as ``<float32[4096] 16 KiB>``, never its contents."""

    __slots__ = ("text",)

    def __init__(self, a: np.ndarray):
        self.text = describe_array(a)

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


def _no_arrays(value, depth: int = 0):
    if isinstance(value, np.ndarray) and value.ndim > 0:
        return _ArrayShown(value)
    if depth < 2 and isinstance(value, (list, tuple)) and any(isinstance(v, (np.ndarray, list, tuple, dict))
                                                             for v in value):
        return type(value)(_no_arrays(v, depth + 1) for v in value) if isinstance(value, list) \
            else tuple(_no_arrays(v, depth + 1) for v in value)
    if depth < 2 and isinstance(value, dict):
        return {k: _no_arrays(v, depth + 1) for k, v in value.items()}
    return value


class IdentityFilter(logging.Filter):
    """Adds ``node``, ``role`` and ``ring`` to every record, and replaces array
    arguments by their shape and size."""

    def __init__(self, identity: LogIdentity):
        super().__init__()
        self.identity = identity

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.identity.node_id() or "-"
        record.role = self.identity.role or "-"
        record.ring = self.identity.ring_version()
        record.clock = self.identity.clock()
        # the human line's "who": S3/server v7 c12 (ring version and clock once known)
        record.where = (f"{record.node}/{record.role}" + (f" v{record.ring}" if record.ring else "")
                        + (f" c{record.clock}" if record.clock is not None else ""))
        record.msg = _no_arrays(record.msg)
        if isinstance(record.args, dict):
            record.args = _no_arrays(record.args)
        elif record.args:
            record.args = tuple(_no_arrays(a, 1) for a in record.args)
        return True


HUMAN_FORMAT = "%(asctime)s %(levelname).1s %(where)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, node, role, ring and clock (when known),
    pid, msg, and exc (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                  .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": getattr(record, "node", None),
            "role": getattr(record, "role", None),
        }
        ring = getattr(record, "ring", None)
        if ring is not None:
            out["ring"] = ring
        clock = getattr(record, "clock", None)
        if clock is not None:
            out["clock"] = clock
        out["pid"] = record.process
        out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str = "info", node: str = "", *, fmt: str = "human",
                  identity: LogIdentity | None = None, stream=None) -> LogIdentity:
    """Send every record to stderr (journald under systemd) as a human line or, with
    ``fmt="json"``, as a JSON line; each names the node and role. Returns the identity,
    whose ``source`` the caller points at the role object once it exists."""
    identity = identity or LogIdentity(node=node or None)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(IdentityFilter(identity))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(HUMAN_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.captureWarnings(True)
    return identity


# -- the daemon lifecycle -----------------------------------------------------------------
def write_ready(path: str | None, address: str) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(address)
        os.replace(tmp, path)


def _parent_alive(pid: int) -> Callable[[], bool]:
    """A check that process ``pid`` still runs. It need not be the real parent (a daemon
    forked by ``psd.forkserver`` watches the process that asked for it): a pidfd stays
    true to that process even once its pid is reused."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return lambda: False
    except (AttributeError, OSError):  # no pidfds: only the real parent can be watched
        return lambda: os.getppid() == pid
    return lambda: not select.select([fd], [], [], 0)[0]


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    alive = _parent_alive(pid)
    while not stop.is_set():
        if not alive():
            log.warning("parent %d is gone; shutting down", pid)
            stop.set()
            return
        await asyncio.sleep(0.5)


RoleMain = Callable[[asyncio.Event, Callable[[str], None]], Awaitable[None]]


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def tune_gc() -> None:
    """Collect cycles less often. A request allocates a few dozen short-lived objects,
    so at the default threshold (700) the collector ran every few requests and took a
    third of a server's time on small pulls (measured with py-spy). Objects alive at
    start-up (modules, config) are moved out of its sight for good."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def run_daemon(role_main: RoleMain, *, event_loop: str = "uvloop", ready_file: str | None = None,
               parent_pid: int | None = None, notify: Notifier | None = None,
               startup_timeout: float | None = None, startup_hint: str = "",
               identity: LogIdentity | None = None, metrics=None,
               prepare: Callable[[], object] | None = None) -> int:
    """Run ``role_main(stop, ready)`` until it returns or SIGTERM/SIGINT, and return the
    exit code (0 clean, 1 failure after start-up, 2 config, 3 start-up failure).

    ``startup_timeout``: seconds until ``ready`` must have been called, or the daemon
    stops with code 3 (``startup_hint`` is added to that message). ``notify``: where
    READY/STOPPING/WATCHDOG go (systemd). ``identity``: the log identity; a ready
    value that is not an address is the node id (a worker reports its id).
    ``metrics``: a MetricsEndpoint (``psd/roles/metrics.py: attach``), started on the
    loop before the role and closed after it; a port it cannot bind is a start-up failure.
    ``prepare``: blocking work before the role starts (a server compiling its store: up
    to a minute on a cold cache), run on a thread so that the loop keeps feeding the
    watchdog; systemd's start timeout is extended meanwhile, and ``startup_timeout``
    counts from its end (it bounds the wait for the cluster, not the compiler)."""
    install_event_loop(event_loop)
    tune_malloc()
    tune_gc()
    notify = notify or Notifier()
    state = {"ready": False, "stopping": False}

    def stopping(status: str) -> None:
        if not state["stopping"]:
            state["stopping"] = True
            notify.send("STOPPING=1", f"STATUS={status}")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        ready_event = asyncio.Event()

        # SIGTERM (systemd stop, `kill`): a server first hands its ranges over;
        # SIGINT (Ctrl-C, a whole LocalCluster shutting down): stop at once
        def on_signal(drain: bool) -> None:
            if not stop.is_set():
                log.info("%s", "SIGTERM: stopping gracefully (a server hands its ranges over first)"
                         if drain else "SIGINT: stopping now")
            stop.drain = drain
            stop.set()
            stopping("draining" if drain else "stopping")

        def on_ready(address: str) -> None:
            if identity is not None and not address.startswith("tcp://"):
                identity.node = address
            write_ready(ready_file, address)
            state["ready"] = True
            ready_event.set()
            notify.send("READY=1", f"STATUS=ready: {address}")

        stop.drain = True
        loop.add_signal_handler(signal.SIGTERM, on_signal, True)
        loop.add_signal_handler(signal.SIGINT, on_signal, False)
        if notify.problem:
            log.warning("%s", notify.problem)
        if metrics is not None:  # before the role, so it can announce the bound address
            await metrics.start()
        helpers = []
        if parent_pid:
            helpers.append(asyncio.create_task(_watch_parent(parent_pid, stop)))
        if notify.watchdog_interval:
            helpers.append(asyncio.create_task(_feed_watchdog(notify, notify.watchdog_interval)))
        role = None
        try:
            if prepare is not None:
                await _prepare(prepare, notify)
            role = asyncio.create_task(role_main(stop, on_ready))
            if startup_timeout is not None:
                await _until_ready(role, ready_event, stop, startup_timeout, startup_hint)
            if not role.cancelled():  # cancelled: stopped before it was ready
                await role
        finally:
            for task in helpers:
                await _cancel(task)
            if metrics is not None:
                await metrics.close()
            if role is not None and not role.done():
                await _cancel(role)
            stopping("stopped")

    code = EXIT_OK
    try:
        asyncio.run(main())
    except ConfigError as e:
        log.error("%s", e)
        code = EXIT_CONFIG
    except (StartupError, OSError, zmq.ZMQError, PsdError) as e:
        if state["ready"]:
            log.error("failed: %s", e)
            code = EXIT_FAILURE
        else:
            log.error("start-up failed: %s", e)
            code = EXIT_STARTUP
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("%s", "crashed" if state["ready"] else "crashed during start-up")
        code = EXIT_FAILURE if state["ready"] else EXIT_STARTUP
    log.info("exit %d (%s)", code, EXIT_MEANING[code])
    return code


#: how far each notice during ``prepare`` pushes systemd's start timeout (sent 3 times as often)
PREPARE_EXTEND = 30.0


async def _prepare(prepare: Callable[[], object], notify: Notifier) -> None:
    """Run ``prepare`` on a thread; the loop meanwhile feeds the watchdog (a 30 s
    WatchdogSec would kill a daemon whose loop a 35 s compile held) and extends systemd's
    start timeout. A thread, since a compile cannot be awaited."""
    notify.send("STATUS=preparing: compiling or loading the store's loops")
    work = asyncio.ensure_future(asyncio.to_thread(prepare))
    while not work.done():
        notify.send(f"EXTEND_TIMEOUT_USEC={int(PREPARE_EXTEND * 1e6)}")
        await asyncio.wait({work}, timeout=PREPARE_EXTEND / 3)
    work.result()


async def _until_ready(role: asyncio.Task, ready: asyncio.Event, stop: asyncio.Event,
                       timeout: float, hint: str) -> None:
    """Wait until the role is ready, has ended, or was stopped; past ``timeout``, stop
    it and raise StartupError. A stop before readiness ends the role at once (there is
    nothing to drain)."""
    waiters = [asyncio.create_task(ready.wait()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait({role, *waiters}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            await _cancel(w)
    if role.done() or ready.is_set():
        return
    if stop.is_set():
        # give a role that watches ``stop`` a moment to end by itself
        await asyncio.wait({role}, timeout=0.5)
        if not role.done():
            await _cancel(role)
        return
    await _cancel(role)
    raise StartupError(f"not ready within startup_timeout ({timeout:g} s){'; ' + hint if hint else ''}")

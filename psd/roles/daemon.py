"""What every psd daemon shares: event loop choice, signals, readiness, parent watch.

A daemon signals readiness by writing its bound address to ``--ready-file`` (how
LocalCluster learns free ports without races). When started by a parent that asked
for it (``--parent-pid``), the daemon exits when that parent is gone, so a killed
test run never leaves servers behind.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Awaitable, Callable

import zmq

from psd.errors import ConfigError, PsdError, StartupError
from psd.transport import install_event_loop
from psd.transport.sockets import tune_malloc

log = logging.getLogger("psd.daemon")

EXIT_OK, EXIT_CONFIG, EXIT_STARTUP = 0, 2, 3


def setup_logging(level: str = "info", node: str = "") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
        format=f"%(asctime)s %(levelname).1s {node + ' ' if node else ''}%(name)s: %(message)s")


def write_ready(path: str | None, address: str) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(address)
        os.replace(tmp, path)


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != pid:
            log.warning("parent %d is gone; shutting down", pid)
            stop.set()
            return
        await asyncio.sleep(0.5)


RoleMain = Callable[[asyncio.Event, Callable[[str], None]], Awaitable[None]]


def run_daemon(role_main: RoleMain, *, event_loop: str = "uvloop", ready_file: str | None = None,
               parent_pid: int | None = None) -> int:
    """Run ``role_main(stop, ready)`` until it returns or SIGTERM/SIGINT; map errors
    to the exit codes systemd acts on (0 clean, 2 config, 3 start-up)."""
    install_event_loop(event_loop)
    tune_malloc()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGTERM (systemd stop, `kill`): a server first hands its ranges over;
        # SIGINT (Ctrl-C, a whole LocalCluster shutting down): stop at once
        def on_signal(drain: bool) -> None:
            stop.drain = drain
            stop.set()

        stop.drain = True
        loop.add_signal_handler(signal.SIGTERM, on_signal, True)
        loop.add_signal_handler(signal.SIGINT, on_signal, False)
        watch = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
        try:
            await role_main(stop, lambda addr: write_ready(ready_file, addr))
        finally:
            if watch:
                watch.cancel()

    try:
        asyncio.run(main())
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except (StartupError, OSError, zmq.ZMQError) as e:
        log.error("start-up failed: %s", e)
        return EXIT_STARTUP
    except PsdError as e:
        log.error("%s", e)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        pass
    return EXIT_OK

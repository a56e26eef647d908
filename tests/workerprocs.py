"""Worker processes a test drives through stdin (``go`` / ``stop``) and that report
through a JSON file: the test's side (``WorkerProcs``), the worker's side
(``stdin_go_stop``), and a fixture helper that closes whatever a test made."""
from __future__ import annotations

import asyncio
import json
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator


class WorkerProcs:
    """One process per seed: ``script scheduler seed out.json *args``. Each prints
    ``ready``, works from ``go`` until ``stop``, then prints ``done`` and writes its file."""

    def __init__(self, script: Path, scheduler: str, seeds: list[int], tmp_path: Path, *args,
                 ready_timeout: float = 20.0):
        self.seeds = seeds
        self.outs = {s: tmp_path / f"{script.stem}-{s}.json" for s in seeds}
        self.procs = {s: subprocess.Popen([sys.executable, str(script), scheduler, str(s), str(self.outs[s]),
                                           *map(str, args)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                      for s in seeds}
        deadline = time.monotonic() + ready_timeout
        for s, p in self.procs.items():
            line = self._readline(p, deadline)
            assert line == "ready", f"worker {s} said {line!r}: {self._stderr(p)}"

    @staticmethod
    def _readline(p: subprocess.Popen, deadline: float) -> str:
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        return p.stdout.readline().decode().strip() if ready else "<nothing in time>"

    @staticmethod
    def _stderr(p: subprocess.Popen) -> str:
        if p.poll() is None:
            p.kill()
        try:
            return p.communicate(timeout=5)[1].decode()[-3000:]
        except Exception as e:
            return f"<no stderr: {e}>"

    def _say(self, word: str) -> None:
        for p in self.procs.values():
            p.stdin.write(f"{word}\n".encode())
            p.stdin.flush()

    def go(self) -> float:
        self._say("go")
        return time.time()

    def stop(self, timeout: float = 60.0) -> list[dict]:
        self._say("stop")
        deadline = time.monotonic() + timeout
        records = []
        for s, p in self.procs.items():
            line = self._readline(p, deadline)
            assert line == "done", f"worker {s} said {line!r}: {self._stderr(p)}"
            p.wait(max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, f"worker {s} exited {p.returncode}: {self._stderr(p)}"
            records.append(json.loads(self.outs[s].read_text()))
        return records

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=5)
            except Exception:
                pass


def closing(make: Callable) -> Iterator[Callable]:
    """For a fixture: yields ``make``'s wrapper; everything it made is closed afterwards,
    whatever the test did."""
    made = []

    def wrapped(*args, **kw):
        thing = make(*args, **kw)
        made.append(thing)
        return thing

    try:
        yield wrapped
    finally:
        for thing in made:
            thing.close()


def stdin_go_stop() -> tuple[asyncio.Event, asyncio.Event]:
    """The worker's side, inside its running loop: events set when the test writes
    ``go`` and ``stop`` (a closed stdin means stop: the test is gone)."""
    loop = asyncio.get_running_loop()
    go, stop = asyncio.Event(), asyncio.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            word = line.strip()
            if word == "go":
                loop.call_soon_threadsafe(go.set)
            elif word == "stop":
                break
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_stdin, daemon=True).start()
    return go, stop

"""Multi-step work of a core (a ring change, a checkpoint, a table created on every
server), written as plain generators and run without an event loop.

A procedure yields what it waits for and is resumed with the outcome:

* ``Calls``: requests to nodes, resumed with their answers (a Message, or the exception
  that stands for a failure or a timeout), in the order asked;
* ``Sleep``: resumed after that many seconds;
* ``Acquire`` / ``Release``: a named lock (ring changes and checkpoints take the same one,
  so a range is written by one primary), granted in the order asked.

Its return value is the answer to the request that started it (when one did). The
runner asks its owner for ``Ask`` effects and is told of answers (``answered``) and of
the time (``tick``): deterministic, so a simulation replays any interleaving exactly.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

from psd.codec import Message
from psd.errors import PsdTimeoutError

log = logging.getLogger("psd.scheduler")

Procedure = Generator[Any, Any, Any]


@dataclass(slots=True)
class Calls:
    """Ask ``asks`` ((node, message) pairs) and resume with their answers, in order; an
    answer missing after ``timeout`` seconds is a PsdTimeoutError."""

    asks: list[tuple[str, Message]]
    timeout: float


@dataclass(slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True)
class Acquire:
    lock: str


@dataclass(slots=True)
class Release:
    lock: str


@dataclass
class _Running:
    gen: Procedure
    done: Callable[[Any, BaseException | None], None] | None
    tokens: dict[int, int] = field(default_factory=dict)  # token -> index in the answers
    answers: list = field(default_factory=list)
    nodes: list = field(default_factory=list)
    deadline: float | None = None
    wake_at: float | None = None


class Runner:
    """Runs procedures for a core. ``ask(node, msg, token)`` is how the core sends (it
    turns into an effect, carried out after the core's call returns: an answer never
    arrives from inside ``ask``); ``forget(node, token)`` when it is no longer awaited."""

    def __init__(self, ask: Callable[[str, Message, int], None], forget: Callable[[str, int], None]):
        self._ask, self._forget = ask, forget
        self._running: set[_Running] = set()
        self._by_token: dict[int, _Running] = {}
        self._tokens = itertools.count(1)
        self._holders: dict[str, _Running] = {}
        self._queues: dict[str, deque[_Running]] = {}

    def start(self, gen: Procedure, now: float, done: Callable[[Any, BaseException | None], None] | None = None):
        """Run ``gen`` until it first waits; ``done(result, error)`` when it ends."""
        run = _Running(gen, done)
        self._running.add(run)
        self._step(run, None, None, now)

    def busy(self, lock: str) -> int:
        """How many procedures hold or wait for ``lock``."""
        return (lock in self._holders) + len(self._queues.get(lock, ()))

    def answered(self, token: int, reply: Message | None, error: BaseException | None, now: float) -> bool:
        """An answer to one of the procedures' calls; False if none waited for it."""
        run = self._by_token.pop(token, None)
        if run is None:
            return False
        i = run.tokens.pop(token)
        run.answers[i] = error if error is not None else reply
        if not run.tokens:
            self._step(run, run.answers, None, now)
        return True

    def tick(self, now: float) -> None:
        for run in list(self._running):
            if run.tokens and run.deadline is not None and now >= run.deadline:
                for token, i in list(run.tokens.items()):
                    self._by_token.pop(token, None)
                    self._forget(run.nodes[i], token)
                    run.answers[i] = PsdTimeoutError(f"{run.nodes[i]} did not answer in time", node=run.nodes[i])
                run.tokens.clear()
                self._step(run, run.answers, None, now)
            elif run.wake_at is not None and now >= run.wake_at:
                run.wake_at = None
                self._step(run, None, None, now)

    def _step(self, run: _Running, value, error: BaseException | None, now: float) -> None:
        while True:
            try:
                wait = run.gen.throw(error) if error is not None else run.gen.send(value)
            except StopIteration as stop:
                self._end(run, stop.value, None, now)
                return
            except Exception as err:  # the procedure failed: its request gets the error
                self._end(run, None, err, now)
                return
            value, error = None, None
            kind = type(wait)
            if kind is Calls:
                if not wait.asks:
                    value = []
                    continue
                run.answers = [None] * len(wait.asks)
                run.nodes = [node for node, _ in wait.asks]
                run.deadline = now + wait.timeout
                for i, (node, msg) in enumerate(wait.asks):
                    token = next(self._tokens)
                    run.tokens[token] = i
                    self._by_token[token] = run
                for token, i in list(run.tokens.items()):
                    node, msg = wait.asks[i]
                    self._ask(node, msg, token)  # (an answer may come back at once: then we resume there)
                return
            if kind is Sleep:
                run.wake_at = now + wait.seconds
                return
            if kind is Acquire:
                if wait.lock not in self._holders:
                    self._holders[wait.lock] = run
                    continue
                self._queues.setdefault(wait.lock, deque()).append(run)
                return
            if kind is Release:
                self._release(wait.lock, run, now)
                continue
            error = TypeError(f"a procedure yielded {wait!r}")

    def _release(self, lock: str, run: _Running, now: float) -> None:
        if self._holders.get(lock) is not run:
            return
        del self._holders[lock]
        queue = self._queues.get(lock)
        if queue:
            nxt = queue.popleft()
            self._holders[lock] = nxt
            self._step(nxt, None, None, now)

    def _end(self, run: _Running, result, error: BaseException | None, now: float) -> None:
        self._running.discard(run)
        for lock, holder in list(self._holders.items()):  # a procedure that ended holding a lock
            if holder is run:
                self._release(lock, run, now)
        if run.done is not None:
            run.done(result, error)
        elif error is not None:
            log.error("a background procedure failed: %r", error, exc_info=error)

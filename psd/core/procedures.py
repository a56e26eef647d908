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
from psd.errors import PsdError, PsdTimeoutError, error_from_wire

log = logging.getLogger("psd.scheduler")

Procedure = Generator[Any, Any, Any]


@dataclass(slots=True)
class Calls:
    """Ask ``asks`` ((node, message) pairs) and resume with their answers, in order; an
    answer missing after ``timeout`` seconds is a PsdTimeoutError, and so is one whose
    node (or, with ``watch``, one of the nodes listed for that call) is declared gone.
    ``all_or_nothing``: resume at the first failure (its answer in its place, those not
    awaited None), when the others' answers could not change the outcome: a step that
    fails anyway must not keep waiting (holding a lock) for them."""

    asks: list[tuple[str, Message]]
    timeout: float
    watch: list[tuple[str, ...]] | None = None
    all_or_nothing: bool = False


def failure(answer) -> PsdError | None:
    """The error an answer of ``Calls`` stands for (a refusal, a failure, a timeout), or
    None for a plain reply."""
    if isinstance(answer, PsdError):
        return answer
    if isinstance(answer, BaseException):
        return PsdError(str(answer))
    if isinstance(answer, Message) and answer.op == "error":
        m = answer.meta
        return error_from_wire(str(m.get("code", "remote")), str(m.get("message", "")), answer.sender or None,
                               m.get("data") if isinstance(m.get("data"), dict) else None)
    return None


@dataclass(slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True)
class Do:
    """Have the driver run ``fn()`` (file I/O: a manifest, a folder); resumed with its
    result, or its exception thrown in."""

    what: str
    fn: Callable[[], Any]


@dataclass(slots=True)
class Acquire:
    lock: str


@dataclass(slots=True)
class Release:
    lock: str


@dataclass(eq=False)
class _Running:
    gen: Procedure
    done: Callable[[Any, BaseException | None], None] | None
    tokens: dict[int, int] = field(default_factory=dict)  # token -> index in the answers
    answers: list = field(default_factory=list)
    nodes: list = field(default_factory=list)
    watched: list = field(default_factory=list)  # per call: the nodes whose loss fails it
    all_or_nothing: bool = False  # of the current Calls
    doing: int | None = None  # the token of a Do the driver is running
    deadline: float | None = None
    wake_at: float | None = None
    resume: Any = None  # what the procedure is resumed with at ``wake_at`` (a Calls' answers)


class Runner:
    """Runs procedures for a core. ``ask(node, msg, token)`` is how the core sends (it
    turns into an effect, carried out after the core's call returns: an answer never
    arrives from inside ``ask``); ``forget(node, token)`` when it is no longer awaited."""

    def __init__(self, ask: Callable[[str, Message, int], None], forget: Callable[[str, int], None],
                 do: Callable[[Do, int], None]):
        self._ask, self._forget, self._do = ask, forget, do
        self._running: dict[_Running, None] = {}  # (in start order: a replay runs them alike)
        self._by_token: dict[int, _Running] = {}
        self._tokens = itertools.count(1)
        self._holders: dict[str, _Running] = {}
        self._queues: dict[str, deque[_Running]] = {}
        self._gone: set[str] = set()  # nodes declared gone: a call to one fails at once

    def start(self, gen: Procedure, now: float, done: Callable[[Any, BaseException | None], None] | None = None):
        """Run ``gen`` until it first waits; ``done(result, error)`` when it ends."""
        run = _Running(gen, done)
        self._running[run] = None
        self._step(run, None, None, now)

    def busy(self, lock: str) -> int:
        """How many procedures hold or wait for ``lock``."""
        return (lock in self._holders) + len(self._queues.get(lock, ()))

    def answered(self, token: int, reply: Message | None, error: BaseException | None, now: float) -> bool:
        """An answer to one of the procedures' calls; False if none waited for it."""
        run = self._by_token.pop(token, None)
        if run is None:
            return False
        if run.doing == token:  # the driver ran a Do: its result (or error) resumes the procedure
            run.doing = None
            self._step(run, reply, error, now)
            return True
        i = run.tokens.pop(token)
        run.answers[i] = error if error is not None else reply
        if run.all_or_nothing and failure(run.answers[i]) is not None:
            self._fail_early(run, now)
        elif not run.tokens:
            self._step(run, run.answers, None, now)
        return True

    def node_gone(self, node: str, now: float) -> None:
        """``node`` died or left: calls that depend on it fail now, not at their timeout,
        and so do later ones (node names are never reused)."""
        self._gone.add(node)
        for run in list(self._running):
            hit = [(t, i) for t, i in run.tokens.items() if node in run.watched[i]]
            if not hit:
                continue
            for token, i in hit:
                del run.tokens[token]
                self._by_token.pop(token, None)
                self._forget(run.nodes[i], token)
                run.answers[i] = PsdTimeoutError(f"{node} is gone", node=node)
            if run.all_or_nothing:
                self._fail_early(run, now)
            elif not run.tokens:
                self._step(run, run.answers, None, now)

    def _fail_early(self, run: _Running, now: float) -> None:
        """An ``all_or_nothing`` call failed: forget the calls ``run`` still waits for
        (their answers stay None) and resume it at the next tick, not from inside this
        call: a driver may answer an ask synchronously while it still sends the same
        step's other asks, and what the procedure sends next (a release) must not reach
        a node before them."""
        for token, i in run.tokens.items():
            self._by_token.pop(token, None)
            self._forget(run.nodes[i], token)
        run.tokens.clear()
        run.wake_at, run.resume = now, run.answers

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
                value, run.wake_at, run.resume = run.resume, None, None
                self._step(run, value, None, now)

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
                run.watched = [set(w) for w in wait.watch] if wait.watch else [{n} for n in run.nodes]
                run.deadline = now + wait.timeout
                run.all_or_nothing = wait.all_or_nothing
                gone = {i for i in range(len(run.nodes)) if run.watched[i] & self._gone}
                for i in gone:
                    run.answers[i] = PsdTimeoutError(f"{run.nodes[i]} is gone", node=run.nodes[i])
                if gone and wait.all_or_nothing:
                    value = run.answers  # (it fails as it starts: nothing asked)
                    continue
                for i, (node, msg) in enumerate(wait.asks):
                    if i in gone:
                        continue
                    token = next(self._tokens)
                    run.tokens[token] = i
                    self._by_token[token] = run
                if not run.tokens:
                    value = run.answers
                    continue
                for token, i in list(run.tokens.items()):
                    node, msg = wait.asks[i]
                    self._ask(node, msg, token)
                return
            if kind is Sleep:
                run.wake_at = now + wait.seconds
                return
            if kind is Do:
                token = next(self._tokens)
                run.doing = token
                self._by_token[token] = run
                self._do(wait, token)
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
        self._running.pop(run, None)
        for lock, holder in list(self._holders.items()):  # a procedure that ended holding a lock
            if holder is run:
                self._release(lock, run, now)
        if run.done is not None:
            run.done(result, error)
        elif error is not None:
            log.error("a background procedure failed: %r", error, exc_info=error)

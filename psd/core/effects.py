"""What a core asks its driver to do.

A core (``ServerCore``, ``ClientCore``, ``SchedulerCore``) decides; it never sends,
sleeps or reads the clock. Each call takes a message or an answer and the current time,
and leaves effects in the core's ``outbox``, which the driver (the asyncio daemon, or
the simulation) carries out in order. Answers to ``Ask`` come back as
``core.answered(token, reply, now)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psd.codec import Message

#: where a reply goes: the data socket (ROUTER, by route), or the link to the scheduler
DATA = "data"
LINK = "link"


@dataclass(slots=True)
class Reply:
    """Answer ``msg`` (already a reply: its id names the request) on ``via`` to ``route``.
    ``leases``: lent table views among its arrays, held until the transport has sent them."""

    route: Any
    msg: Message
    via: str = DATA
    leases: list = field(default_factory=list)


@dataclass(slots=True)
class Refuse:
    """Answer ``request`` with ``error`` (a PsdError, or a bug to log and report as internal)."""

    route: Any
    request: Message
    error: Exception
    via: str = DATA


@dataclass(slots=True)
class Ask:
    """Send ``msg`` to server ``node`` at ``address`` on this node's connection to it; its
    answer (or failure) comes back as ``answered(token, ...)``."""

    node: str
    address: str
    msg: Message
    token: int


@dataclass(slots=True)
class Forget:
    """Stop waiting for the answer to ``Ask`` ``token``."""

    node: str
    token: int


@dataclass(slots=True)
class Tell:
    """Send a one-way message (no answer expected) to server ``node``."""

    node: str
    address: str
    msg: Message


@dataclass(slots=True)
class Write:
    """Write a file (a checkpoint's part): ``write(path)`` returns what to report; the
    driver calls ``written(token, result_or_error, now)`` once done."""

    token: int
    path: str
    write: Any


@dataclass(slots=True)
class Stop:
    """Stop the daemon (asked to shut down)."""

    reason: str


@dataclass(slots=True)
class Rejoin:
    """Register again: the cluster declared this node dead or forgot it while it was cut
    off or frozen; it keeps what the current ring still needs of its data."""

    previous: str
    ring: int


@dataclass(slots=True)
class Follow:
    """Link to the scheduler at ``address`` (this server voted for it to lead): the link
    and its heartbeats move there, so the old leader can no longer reach this server."""

    address: str


@dataclass(slots=True)
class Notify:
    """Send ``msg`` to node ``node`` as a request whose answer nobody waits for (a ring
    notice to a worker); the driver stops listening after a while."""

    node: str
    msg: Message


@dataclass(slots=True)
class Save:
    """Persist the scheduler's durable state (``ClusterState.to_dict``) now."""

    state: dict


@dataclass(slots=True)
class Run:
    """Run ``fn()`` (file I/O a procedure needs) and report its result, or its exception,
    as ``answered(token, result, error, now)``."""

    token: int
    what: str
    fn: Any


@dataclass(slots=True)
class DropRoute:
    """Forget how to reach ``node`` (a departed worker the scheduler no longer lists)."""

    node: str

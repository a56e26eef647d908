"""The PsdError family, typed by who has to act on the error.

Every error travels on the wire as a ``code`` plus a message; the client turns the
code back into the same class, so ``except psd.KeysError`` works whether the
problem was found locally or by a server.
"""
from __future__ import annotations


class PsdError(Exception):
    """Root of every error psd raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, node: str | None = None, **data):
        super().__init__(message)
        self.message = message
        self.node = node
        self.data = data

    def __str__(self) -> str:
        return f"{self.node}: {self.message}" if self.node else self.message


# --- the operator must act -------------------------------------------------
class ConfigError(PsdError):
    """A config or job file is wrong; the message names the file and key."""

    code = "config"


class StartupError(PsdError):
    """A daemon or local cluster could not start (port, child died, timeout)."""

    code = "startup"


# --- the peer sent something wrong; it gets an error reply -----------------
class ProtocolError(PsdError):
    """A message could not be decoded: not msgpack, bad frame lengths, unknown op."""

    code = "protocol"


class UnknownFilterError(ProtocolError):
    """A push names a filter (``meta.flt``) this receiver does not know, or its filter
    fields are malformed: nothing was applied. Upgrade the receiver, or take the filter
    off the table (docs/jobs.md, "Filters")."""

    code = "unknown_filter"


class ShmError(ProtocolError):
    """A payload frame said to be in shared memory could not be used: the connection
    agreed on no shared memory (the receiver restarted, or has it off), the segment is
    not the sender's, the range lies outside it, or the file is not private to this
    user. Nothing was applied; the sender's transport sends the message again inline
    (docs/protocol.md, "Shared memory")."""

    code = "shm"


class MessageTooLargeError(ProtocolError):
    """A message or frame is over the configured limit; raise the limit or split it."""

    code = "too_large"


class AuthError(PsdError):
    code = "auth"


class ForbiddenError(PsdError):
    """The sender's key is listed, but its role may not do this (a client key sending
    what only the daemons send, a worker key sending what only operators send, or a
    request in the name of a node another key registered). Nothing was applied.
    ``data``: ``{op, needs}`` (``server``, ``operator`` or ``registrant``)."""

    code = "forbidden"


# --- the caller passed bad arguments ----------------------------------------
class BadRequestError(PsdError):
    """The request is well-formed but its content is invalid; nothing was applied."""

    code = "bad_request"


class KeysError(BadRequestError):
    """Keys are not a sorted, duplicate-free uint64 array."""

    code = "bad_keys"


class ValuesError(BadRequestError):
    """Values have the wrong shape or dtype for the table."""

    code = "bad_values"


class UnknownTableError(BadRequestError):
    code = "unknown_table"


class UnknownUpdaterError(BadRequestError):
    code = "unknown_updater"


class TableMismatchError(BadRequestError):
    """A table was opened with a width/dtype/updater other than the one it has."""

    code = "table_mismatch"


# --- a configured resource limit would be exceeded -------------------------
class LimitError(PsdError):
    """A cluster limit (``limits.max_tables``, ``limits.max_memory_bytes``) would be
    exceeded; nothing was applied. Drop tables, add servers, or raise the limit. ``data``
    names the limit and holds the numbers."""

    code = "limit"


# --- the client library retries ---------------------------------------------
class NotOwnerError(PsdError):
    """The server no longer owns these keys; the client refreshes the ring and resends."""

    code = "not_owner"


class NotReplicatedError(PsdError):
    """A replica refused a push its primary applied: the push is not durable. The client
    resends it under the same request id (applied once) until ``request_timeout``; raised
    after that, naming the replica and its reason."""

    code = "not_replicated"


class OutOfOrderError(PsdError):
    """A request reached a server out of the order it was sent in (an earlier one was
    lost with its connection, or refused and is being sent again): it was not applied.
    The client sends everything from the first unadmitted request again, in order.
    ``data``: ``{epoch, from}``, the stream and the first sequence number to resend."""

    code = "out_of_order"


class UnavailableError(PsdError):
    """No server can serve these keys now: the servers holding them are unreachable or
    still confirming they are members. Nothing was applied; the client retries until
    ``request_timeout``, and raises this after it. Retry later; ``psd status`` shows
    which ranges are unavailable and why."""

    code = "unavailable"


class StaleRingError(PsdError):
    """A message was sent at an older ring than one the receiver acted on (a worker's
    clock, from before the ring that gave the server new ranges). It was recorded; the
    sender asks the scheduler for the ring. ``data``: ``{ring}``, the receiver's."""

    code = "stale_ring"


class BusyError(PsdError):
    """A server holds as much unanswered work from this connection as it allows
    (``limits.max_inflight_bytes``); nothing was applied. The client waits and sends the
    request again; raised only when that does not succeed within ``request_timeout``."""

    code = "busy"


class KeysUnknownError(PsdError):
    """A request named its keys by a key-list signature (``meta.kc``) that this server
    does not hold for the sender and table (it restarted, evicted it, or never had it),
    or whose length or end keys do not match what it holds: nothing was applied. The
    client sends the request again with its keys, in order (automatic). ``data``:
    ``{sig}``, the signature refused."""

    code = "keys_unknown"


class NotLeaderError(PsdError):
    """This scheduler is a standby (or was deposed): it follows the leader and answers
    nothing else. ``data``: ``{leader, epoch}``; clients and daemons switch to the
    leader on their own; an operator's command names it in the message."""

    code = "not_leader"


class PsdTimeoutError(PsdError):
    """No reply in time; the peer may be dead or overloaded."""

    code = "timeout"


class RemoteError(PsdError):
    """A peer failed in a way it could not classify (a bug on its side)."""

    code = "remote"


_BY_CODE = {cls.code: cls for cls in (
    PsdError, ConfigError, StartupError, ProtocolError, ShmError, UnknownFilterError, MessageTooLargeError, AuthError, ForbiddenError,
    BadRequestError, KeysError, ValuesError, UnknownTableError, UnknownUpdaterError,
    TableMismatchError, LimitError, NotOwnerError, NotReplicatedError, OutOfOrderError, UnavailableError, NotLeaderError,
    KeysUnknownError,
    BusyError, StaleRingError, PsdTimeoutError, RemoteError)}


def error_from_wire(code: str, message: str, node: str | None, data: dict | None = None) -> PsdError:
    """Rebuild the typed error a peer reported."""
    cls = _BY_CODE.get(code, RemoteError)
    return cls(message, node=node, **(data or {}))


def describe(value, limit: int = 60) -> str:
    """A bad value as an error message shows it: the repr of a scalar, cut to ``limit``
    characters; only the type and size of a map or list (a peer's could be huge or deeply
    nested, and its repr would be as large, or fail)."""
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

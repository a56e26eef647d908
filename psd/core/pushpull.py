"""A pushpull whose push stands and whose pull part was refused: the answer's wire form.

A pushpull the consistency gate held while a ring change moved its rows away cannot be
refused whole: its push was applied and forwarded, and a refusal would have the worker
send it again (under fresh ids when re-cut in pieces). So the server acknowledges the
push, once its replicas hold it, in an ``ok`` reply without frames whose ``meta`` names
the refusal of the pull part (``PULL_REFUSED``: code, message and data, as an error
reply's); the worker counts the push as done and sends the pull again, alone, by the
new ring (decision 129).

Only a client that says it understands that answer gets it: its pushpulls carry
``meta.pull_refusable: true`` (``PULL_REFUSABLE``). An older client would fail the
request with ``bad_values`` although its push stands, and an app that retries on any
error would apply the push twice; so a pushpull without the flag is held whole by the
gate instead, its push applied only when its pull part may run, and a ring change
meanwhile refuses it whole, ``not_owner``, with nothing applied (decision 143).
"""
from __future__ import annotations

from psd.codec import Message
from psd.errors import PsdError, ProtocolError, error_from_wire

#: the reply's ``meta`` field: ``{code, message, data}`` of the pull part's refusal
PULL_REFUSED = "pull_refused"
#: the request's ``meta`` flag (``true``): the sender takes a ``PULL_REFUSED`` answer
PULL_REFUSABLE = "pull_refusable"


def refusal(err: PsdError) -> dict:
    """The wire form of the pull part's refusal (``err``'s scalar data only)."""
    data = {k: v for k, v in err.data.items() if isinstance(v, (int, str, float, bool))}
    return {"code": err.code, "message": err.message, "data": data}


def pull_refused(reply: Message) -> PsdError | None:
    """The refusal of the pull part an ``ok`` answer to a pushpull names, if it names
    one; a malformed one is a ``ProtocolError`` (the request fails rather than guess)."""
    value = reply.meta.get(PULL_REFUSED)
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("code"), str) or reply.arrays:
        return ProtocolError(f"a pushpull answer's meta.{PULL_REFUSED} must be a map with a code and come "
                             f"without frames; got {value!r:.80}", node=reply.sender or None)
    data = value.get("data")
    return error_from_wire(value["code"], str(value.get("message", "")), reply.sender or None,
                           data if isinstance(data, dict) else None)

"""What a connection's key may do: the roles the ZAP handler gives keys, and the refusal
of a request whose key may not send it. Pure: the daemons' cores check roles without
knowing anything of CurveZMQ."""
from __future__ import annotations

from psd.errors import ForbiddenError

#: where listed keys live (psd/transport/security.py writes and reads them)
AUTHORIZED = "authorized"
#: the subfolder of ``authorized/`` that lists worker keys
WORKERS = "workers"
#: the role the ZAP handler gives an admitted connection, as its User-Id (RFC 27), which
#: libzmq attaches to every message of that connection: the daemons' key is "server"
#: (told by the key itself, not by its file name); a client key is "client:" + the name
#: of its file in authorized/. Daemons check it before ops only daemons send.
ROLE_SERVER = "server"
ROLE_CLIENT = "client:"
#: a client key listed in authorized/workers/: no operator ops
ROLE_WORKER = "worker:"
#: what ``forbidden`` names as needed for an operator's op: a client key (not a worker key)
OPERATOR = "operator"


def describe_role(peer: str | None) -> str:
    """A connection's role (``Message.peer``) as a message names it."""
    if peer == ROLE_SERVER:
        return "the server key"
    if peer and peer.startswith(ROLE_CLIENT):
        return f"client key {peer[len(ROLE_CLIENT):]!r}"
    if peer and peer.startswith(ROLE_WORKER):
        return f"worker key {peer[len(ROLE_WORKER):]!r}"
    return "no known key"


def forbidden(op: str, what: str, peer: str | None, needs: str = ROLE_SERVER) -> ForbiddenError:
    """The refusal of a request whose key may not do ``what``; ``needs``: the role that
    may (``server``, ``operator``), or a phrase naming the key that may."""
    wanted = {ROLE_SERVER: "the server key (only the scheduler and the servers send it)",
              OPERATOR: f"an operator key (a client key listed in {AUTHORIZED}/, not in {AUTHORIZED}/{WORKERS}/)"}
    return ForbiddenError(f"{what} needs {wanted.get(needs, needs)}; this request came with {describe_role(peer)}. "
                          f"Nothing was changed", op=op, needs=needs if needs in wanted else "registrant")

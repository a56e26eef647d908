"""What a connection's key may do: the roles the ZAP handler gives keys, and the refusal
of a request whose key may not send it. Pure: the daemons' cores check roles without
knowing anything of CurveZMQ."""
from __future__ import annotations

import re
from fnmatch import fnmatchcase

from psd.errors import ForbiddenError, PsdError

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
#: a worker key limited to some namespaces has them after its name in its User-Id:
#: ``worker:NAME@J7,team-*`` (a key's name never holds "@")
SCOPE_SEP = "@"
#: a namespace pattern (fnmatch: ``*``, ``?``, ``[...]``); namespaces hold no "/"
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,64}$")
#: the most patterns one key may carry (they travel in every connection's User-Id)
MAX_PATTERNS = 16


def check_patterns(patterns) -> list[str]:
    """Namespace patterns for a worker key, checked: each 1 to 64 characters of letters,
    digits, ``_ . -`` and the wildcards ``* ? [ ] !``."""
    patterns = list(patterns)
    for p in patterns:
        if not isinstance(p, str) or not _PATTERN.match(p):
            raise PsdError(f"namespace pattern {p!r}: expected 1 to 64 letters, digits, '_', '.', '-' or the "
                           f"wildcards '*', '?', '[...]' (e.g. J7 or team-a-*)")
    if len(patterns) > MAX_PATTERNS:
        raise PsdError(f"{len(patterns)} namespace patterns for one key; at most {MAX_PATTERNS}")
    return patterns


def scope_of(peer: str | None) -> tuple[str, ...] | None:
    """The namespace patterns a connection's key is limited to (None: every namespace:
    no security, the daemons' key, an operator key, an unlimited worker key)."""
    if not peer or not peer.startswith(ROLE_WORKER):
        return None
    _, sep, patterns = peer.partition(SCOPE_SEP)
    return tuple(patterns.split(",")) if sep else None


def in_scope(scope: tuple[str, ...] | None, namespace: str | None) -> bool:
    """Whether a key limited to ``scope`` may touch ``namespace`` (None: the default
    namespace, which a limited key may not)."""
    if scope is None:
        return True
    return namespace is not None and any(fnmatchcase(namespace, p) for p in scope)


def outside_scope(op: str, what: str, namespace: str | None, peer: str | None) -> ForbiddenError:
    """The refusal of a request of a limited worker key outside its namespaces."""
    where = f"namespace {namespace!r}" if namespace else "the default namespace"
    return ForbiddenError(f"{what} is in {where}, outside what {describe_role(peer)} may touch. Nothing was "
                          f"changed; use a key for that namespace (psd keygen --add --worker NAME --namespace "
                          f"PATTERN) or an operator key", op=op, needs="namespace")


def describe_role(peer: str | None) -> str:
    """A connection's role (``Message.peer``) as a message names it."""
    if peer == ROLE_SERVER:
        return "the server key"
    if peer and peer.startswith(ROLE_CLIENT):
        return f"client key {peer[len(ROLE_CLIENT):]!r}"
    if peer and peer.startswith(ROLE_WORKER):
        name, sep, patterns = peer[len(ROLE_WORKER):].partition(SCOPE_SEP)
        return f"worker key {name!r}" + (f" (namespaces {patterns.replace(',', ', ')})" if sep else "")
    return "no known key"


def forbidden(op: str, what: str, peer: str | None, needs: str = ROLE_SERVER) -> ForbiddenError:
    """The refusal of a request whose key may not do ``what``; ``needs``: the role that
    may (``server``, ``operator``), or a phrase naming the key that may."""
    wanted = {ROLE_SERVER: "the server key (only the scheduler and the servers send it)",
              OPERATOR: f"an operator key (a client key listed in {AUTHORIZED}/, not in {AUTHORIZED}/{WORKERS}/)"}
    return ForbiddenError(f"{what} needs {wanted.get(needs, needs)}; this request came with {describe_role(peer)}. "
                          f"Nothing was changed", op=op, needs=needs if needs in wanted else "registrant")

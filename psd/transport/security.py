"""CurveZMQ for every psd socket: key files, socket options, the allow-list, refusals.

A cluster's key folder (``psd keygen DIR``) holds:

* ``server.key`` / ``server.key_secret``: one key pair shared by every daemon that
  binds (the scheduler and the servers). They also present it as their client
  identity when they connect to each other.
* ``NAME.key`` / ``NAME.key_secret``: one pair per client (``--client NAME``; the
  default is one named ``client``).
* ``authorized/``: the allow-list the daemons check: a public key file per identity
  that may connect (the server key and every client key). A client key listed in
  ``authorized/workers/`` instead (``--worker NAME``) is a worker key: it may do what
  a worker does, not what an operator does (drain, drop, checkpoint, submit). Beside
  it, ``NAME.namespaces`` (``--namespace PATTERN``) limits it to the tables and jobs of
  those namespaces (one fnmatch pattern a line), for a cluster shared by several teams.

Files are ZeroMQ's ZPL certificates (``zmq.auth.load_certificate`` reads them);
secret files are mode 0600.

Bound ROUTERs are CURVE servers; a ZAP handler (RFC 27) on the daemon's context admits
only keys of the allow-list, and gives each connection its key's role as User-Id
(``server``, ``client:NAME`` or ``worker:NAME``), which the daemons check before the ops only daemons
send (:func:`forbidden` builds the refusal). Connecting DEALERs are CURVE clients with their own pair
and the server's public key. A refused peer gets nothing, not even an error reply; the
daemon logs one line per refused key (repeats are counted, not logged). A client sees
the refusal through a socket monitor while it registers (:class:`HandshakeWatch`) and
raises :class:`psd.AuthError` instead of timing out.
"""
from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import os
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from psd.errors import AuthError, PsdError
from psd.keyroles import (OPERATOR, ROLE_CLIENT, ROLE_SERVER, ROLE_WORKER, SCOPE_SEP, check_patterns,  # noqa: F401
                          describe_role, forbidden)
from psd.refusals import RefusalLog

log = logging.getLogger("psd.security")

SERVER = "server"
DEFAULT_CLIENT = "client"
AUTHORIZED = "authorized"
#: the subfolder of ``authorized/`` that lists worker keys
WORKERS = "workers"
PUBLIC, SECRET = ".key", ".key_secret"
#: beside a worker key in authorized/workers/: the namespace patterns it is limited to
SCOPE = ".namespaces"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"psd"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# -- key files --------------------------------------------------------------------------
def _write_cert(path: Path, public: bytes, secret: bytes | None) -> None:
    """A ZPL certificate; a secret one is created 0600 (never readable by others, not
    even for a moment)."""
    kind = "Secret" if secret else "Public"
    lines = [f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by psd keygen  ****",
             f"#   ZeroMQ CURVE {kind} Certificate",
             "#   Keep this file private: never give it to another user." if secret else
             "#   Give this file to whoever must trust or list this identity.",
             "", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    data = ("\n".join(lines) + "\n").encode()
    mode = 0o600 if secret else 0o644
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask; this is not
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_cert(path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a ZPL file, both z85; checked for length."""
    import zmq.auth
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise AuthError(f"{path}: not a readable key file ({e})") from None
    for what, key in (("public", public), ("secret", secret)):
        if key is not None and len(key) != 40:
            raise AuthError(f"{path}: the {what} key is not a 40-character z85 CurveZMQ key")
    return public, secret


def keygen(folder: str | Path, clients: list[str] | tuple[str, ...] = (), *,
           add: bool = False, force: bool = False, workers: list[str] | tuple[str, ...] = (),
           namespaces: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Write a cluster key set into ``folder`` and return the files written.

    Without ``add``: a new set (the server pair and one pair per client), refused if
    the folder already holds psd keys unless ``force`` (which replaces them and leaves
    only the new keys in ``authorized/``). With ``add``: new client pairs for the
    existing set (its server pair stays); an existing name is refused unless ``force``.
    ``workers``: pairs listed as worker keys (``authorized/workers/``), limited to the
    ``namespaces`` patterns when given. Neither clients nor workers: one client pair
    named ``client``."""
    folder = Path(folder)
    namespaces = check_patterns(namespaces)
    if namespaces and not workers:
        raise PsdError("--namespace limits worker keys: name them with --worker NAME (client keys are "
                       "operators' and touch every namespace)")
    names = list(clients) + list(workers)
    if not clients and not (add and workers):  # a new set always gets an operator key
        names.insert(0, DEFAULT_CLIENT)
    for name in names:
        if not _NAME.match(name) or name == SERVER:
            raise PsdError(f"client name {name!r}: expected letters, digits, '_', '.' or '-' "
                           f"(not {SERVER!r}, which is the daemons' key)")
    if len(set(names)) != len(names):
        raise PsdError(f"client names repeat: {', '.join(names)}")
    authorized = folder / AUTHORIZED
    server_secret = folder / (SERVER + SECRET)
    if add:
        if not server_secret.exists():
            raise PsdError(f"{folder} has no {SERVER}{SECRET}: create the key set first with `psd keygen {folder}`")
        taken = [n for n in names if (folder / (n + SECRET)).exists() or (authorized / (n + PUBLIC)).exists()
                 or (authorized / WORKERS / (n + PUBLIC)).exists()]
    else:
        existing = sorted(p.name for p in folder.glob("*" + SECRET)) if folder.is_dir() else []
        taken = existing
    if taken and not force:
        raise PsdError(f"{folder} already holds keys ({', '.join(taken)}); refusing to overwrite them. "
                       f"Pass --force to replace them (every daemon and client then needs the new files)"
                       + ("" if add else ", or --add --client NAME to add a client to this set"))
    folder.mkdir(parents=True, exist_ok=True)
    authorized.mkdir(exist_ok=True)
    written: list[Path] = []

    def pair(name: str, listed: Path) -> None:
        public, secret = zmq.curve_keypair()
        for path, sec in ((folder / (name + PUBLIC), None), (folder / (name + SECRET), secret),
                          (listed / (name + PUBLIC), None)):
            _write_cert(path, public, sec)
            written.append(path)

    if workers:
        (authorized / WORKERS).mkdir(exist_ok=True)
    for name in names:  # (--force: a name is listed anew, as what it is now)
        for listed in (authorized, authorized / WORKERS):
            (listed / (name + PUBLIC)).unlink(missing_ok=True)
        (authorized / WORKERS / (name + SCOPE)).unlink(missing_ok=True)
    if not add:
        for old in [*authorized.glob("*" + PUBLIC), *authorized.glob(f"{WORKERS}/*" + PUBLIC),
                    *authorized.glob(f"{WORKERS}/*" + SCOPE)]:
            old.unlink()  # a new set trusts only its own keys
        pair(SERVER, authorized)
    for name in names:
        pair(name, authorized / WORKERS if name in workers else authorized)
        if name in workers and namespaces:
            scope = authorized / WORKERS / (name + SCOPE)
            scope.write_text("".join(p + "\n" for p in namespaces))
            written.append(scope)
    return written


# -- what a socket needs ------------------------------------------------------------------
@dataclass(frozen=True)
class Curve:
    """One process's CurveZMQ identity: its own key pair and the cluster's server public
    key (z85 bytes). A daemon's own pair is the server pair and it has ``authorized``,
    the allow-list folder its ZAP handler reads."""

    public: bytes
    secret: bytes = field(repr=False)  # never in a log line or a traceback
    server_public: bytes
    folder: Path
    name: str
    authorized: Path | None = None

    @property
    def short(self) -> str:
        return self.public.decode()[:8]


def load_daemon(folder: str | Path) -> Curve:
    """The key set a binding daemon needs: the server pair and a non-empty allow-list.
    Raises AuthError saying what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AuthError(f"{folder} is not a folder; create the keys with `psd keygen {folder}`")
    secret_file = folder / (SERVER + SECRET)
    if not secret_file.exists():
        raise AuthError(f"{folder} has no {SERVER}{SECRET} (the daemons' key pair); "
                        f"create the keys with `psd keygen {folder}`")
    mode = secret_file.stat().st_mode & 0o777
    if mode & 0o027:  # like ssh: a secret others can read (or the group can change) is no secret
        raise AuthError(f"{secret_file} is readable or writable by others (mode {mode:04o}); the daemons' "
                        f"secret key must be private: chmod 600 (or 640 for a service group) {secret_file}")
    public, secret = _read_cert(secret_file)
    if secret is None:
        raise AuthError(f"{secret_file} holds no secret key")
    authorized = folder / AUTHORIZED
    if not authorized.is_dir() or not any(authorized.glob("*" + PUBLIC)):
        raise AuthError(f"{authorized} is missing or lists no public key (*.key); it is the allow-list "
                        f"`psd keygen` writes")
    allowed = AllowList(authorized).load()
    if z85.decode(public) not in allowed:
        raise AuthError(f"{authorized} does not list the server key {public.decode()[:8]}...: the daemons "
                        f"could not connect to each other")
    return Curve(public, secret, public, folder, SERVER, authorized)


def load_client(folder: str | Path) -> Curve:
    """A client's identity from a key folder: the server public key, and the client pair
    ``client.key_secret``, else the folder's only other ``*.key_secret``, else the server
    pair (a daemon host's folder). Raises AuthError saying what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AuthError(f"keys folder {folder} does not exist; create one with `psd keygen {folder}` "
                        f"or point PSD_KEYS / --keys / keys: at the cluster's")
    server_file = next((p for p in (folder / (SERVER + PUBLIC), folder / (SERVER + SECRET)) if p.exists()), None)
    if server_file is None:
        raise AuthError(f"{folder} has no {SERVER}{PUBLIC}: copy the cluster's {SERVER}{PUBLIC} there")
    server_public, _ = _read_cert(server_file)
    own = folder / (DEFAULT_CLIENT + SECRET)
    if not own.exists():
        others = sorted(p for p in folder.glob("*" + SECRET) if p.name != SERVER + SECRET)
        if len(others) == 1:
            own = others[0]
        elif (folder / (SERVER + SECRET)).exists():
            own = folder / (SERVER + SECRET)
        elif others:
            raise AuthError(f"{folder} holds several client keys ({', '.join(p.name for p in others)}); "
                            f"give each client host a folder with {SERVER}{PUBLIC} and its own key only")
        else:
            raise AuthError(f"{folder} has no client key (*{SECRET}); create one with "
                            f"`psd keygen KEYDIR --add --client NAME` and copy NAME{SECRET} here")
    public, secret = _read_cert(own)
    if secret is None:
        raise AuthError(f"{own} holds no secret key")
    return Curve(public, secret, server_public, folder, own.name[:-len(SECRET)])


#: keys a LocalCluster made for its scheduler address (None: that cluster runs with
#: ``security: none``), so ``psd.connect(cluster.scheduler)`` needs nothing more
_local: dict[str, Curve | None] = {}


def register_local(scheduler: str, curve: Curve | None) -> None:
    _local[scheduler] = curve


def unregister_local(scheduler: str) -> None:
    _local.pop(scheduler, None)


def for_client(scheduler: str, *, security: str = "curve", keys: str | Path | None = None,
               env_keys: str | None = None) -> Curve | None:
    """The identity a client uses for the cluster at ``scheduler`` (None: plaintext).

    ``security: none`` -> plaintext. Else the first of: ``keys`` (config, ``--keys``),
    the keys a LocalCluster of this process registered for this very address, and
    ``env_keys`` (the ``PSD_KEYS`` variable). Nothing found is an AuthError that says
    where keys go."""
    if security == "none":
        return None
    if keys:
        return load_client(keys)
    if scheduler in _local:
        return _local[scheduler]
    if env_keys:
        return load_client(env_keys)
    raise AuthError(f"no CurveZMQ keys for the cluster at {scheduler}: set PSD_KEYS=DIR (or `keys: DIR` in "
                    f"the config, or --keys DIR) to a folder holding the cluster's server.key and a client "
                    f"key pair (`psd keygen DIR` writes them), or use security: none for a plaintext cluster")


def apply_server(sock: zmq.Socket, curve: Curve) -> None:
    """Before bind: this socket is a CURVE server; the ZAP handler checks its peers."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    try:  # refuse everyone, rather than admit everyone, if no ZAP handler answers
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError):
        pass  # libzmq without the draft option: our handler is bound before any socket


def apply_client(sock: zmq.Socket, curve: Curve) -> None:
    """Before connect: this socket is a CURVE client of the cluster's server key."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)


# -- authorization by key role ----------------------------------------------------------------
class AllowList:
    """The public keys in ``authorized/`` (raw 32 bytes -> file name), re-read when
    a file is added or removed there (the folder's mtime changes) or a ``.namespaces``
    file changes, so a new client can be listed without a restart. A connection keeps
    the rights its key had when it connected."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._stamp: int | None = None
        self._keys: dict[bytes, str] = {}

    def load(self) -> dict[bytes, str]:
        """Listed public keys (raw) -> their role: ``client:NAME``, or ``worker:NAME``
        for a key in ``workers/`` (``worker:NAME@PATTERN,...`` when a NAME.namespaces
        file limits it)."""
        workers = self.folder / WORKERS
        try:
            stamp = (self.folder.stat().st_mtime_ns,
                     workers.stat().st_mtime_ns if workers.is_dir() else None,
                     tuple(p.stat().st_mtime_ns for p in sorted(workers.glob("*" + SCOPE))))
        except OSError:
            stamp = None
        if stamp != self._stamp or stamp is None:
            keys = {}
            for role, folder in ((ROLE_CLIENT, self.folder), (ROLE_WORKER, self.folder / WORKERS)):
                for path in sorted(folder.glob("*" + PUBLIC)):
                    try:
                        public, _ = _read_cert(path)
                        keys[z85.decode(public)] = role + path.name[:-len(PUBLIC)] + _scope(path, role)
                    except (AuthError, PsdError, ValueError, OSError) as e:
                        log.warning("allow-list: skipping %s: %s", path, e)
            self._keys, self._stamp = keys, stamp
        return self._keys


def _scope(key_path: Path, role: str) -> str:
    """What follows a worker key's name in its role: its namespace patterns, if listed."""
    scope = key_path.with_suffix(SCOPE)
    if role != ROLE_WORKER or not scope.exists():
        return ""
    patterns = check_patterns([line.strip() for line in scope.read_text().splitlines() if line.strip()])
    if not patterns:  # an empty file limits the key to nothing at all
        raise PsdError(f"{scope} lists no namespace: remove the file to give the key every namespace, or "
                       f"list the ones it may touch")
    return SCOPE_SEP + ",".join(patterns)


class Authenticator:
    """The ZAP handler of one daemon's context: admits CURVE clients whose public key is
    in the allow-list, with their role as User-Id (``server`` for the daemons' own key,
    ``client:NAME`` for ``authorized/NAME.key``), and logs refusals (its own and those
    the sockets' monitors see)."""

    def __init__(self, ctx: zmq.asyncio.Context, curve: Curve):
        self.ctx = ctx
        self.curve = curve
        self.allow = AllowList(curve.authorized)
        self._server_key = z85.decode(curve.public)  # raw 32 bytes, as ZAP names the peer's key
        self.refusals = RefusalLog()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.admitted = 0
        self.refused = 0
        self._tasks: set[asyncio.Task] = set()
        self._spawn(self._serve())

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                self.sock.send_multipart(self.answer(frames))
            except (zmq.ZMQError, ValueError) as e:
                log.warning("ZAP: cannot answer a request: %s", e)

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request (routing id, delimiter, then RFC 27 frames)."""
        if len(frames) < 9 or frames[1] != b"" or frames[2] != b"1.0":
            route, request_id = frames[0], (frames[3] if len(frames) > 3 else b"")
            return [route, b"", b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""]
        route, _, version, request_id, domain, address, _identity, mechanism, *creds = frames
        listed = None
        if mechanism == b"CURVE" and creds and len(creds[0]) == 32:
            listed = self.allow.load().get(creds[0])
        if listed is not None:
            self.admitted += 1
            role = ROLE_SERVER if creds[0] == self._server_key else listed
            return [route, b"", version, request_id, b"200", b"OK", role.encode(), b""]
        self.refused += 1
        key = z85.encode(creds[0]).decode() if creds and len(creds[0]) == 32 else f"<{mechanism.decode('ascii', 'replace')}>"
        self.note(f"key {key[:12]}", f"refused client key {key[:12]}... from {address.decode('ascii', 'replace') or '?'}"
                  f": not in {self.curve.authorized}")
        return [route, b"", version, request_id, b"400", b"key not authorized", b"", b""]

    def note(self, key: str, line: str) -> None:
        repeats = self.refusals.note(key, time.monotonic())
        if repeats is not None:
            log.warning("%s%s", line, f" ({repeats} more refusal(s) of it not logged)" if repeats else "")

    def watch(self, sock: zmq.asyncio.Socket, endpoint: str) -> None:
        """Log handshakes a bound socket refused before ZAP was asked: a plaintext peer,
        a peer that has the wrong server key. (The monitor sees only connection events,
        never messages: it costs nothing per request.)"""
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
                                          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._spawn(self._watch(monitor, endpoint))

    async def _watch(self, monitor: zmq.asyncio.Socket, endpoint: str) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    # the peer hung up first: a plaintext client that saw our greeting, or a probe
                    self.note("handshake dropped", f"a peer hung up during the handshake on {endpoint} (a client "
                              f"without CurveZMQ keys, or a port probe; peer address not reported by ZeroMQ)")
                    continue
                if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                    continue
                why = PROTOCOL_REASONS.get(event["value"], f"protocol error {event['value']:#x}")
                self.refused += 1
                self.note(f"handshake {event['value']}", f"refused a connection to {endpoint}: {why} "
                          f"(peer address not reported by ZeroMQ)")
        finally:
            monitor.close(0)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.sock.close(0)


PROTOCOL_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the peer does not use CurveZMQ (a plaintext client, "
                                                "or one with security: none)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "the peer encrypted for another server key (it has another "
                                           "cluster's server.key)",
}

_authenticators: "weakref.WeakKeyDictionary[zmq.Context, Authenticator]" = weakref.WeakKeyDictionary()


def authenticator(ctx: zmq.asyncio.Context, curve: Curve) -> Authenticator:
    """The context's ZAP handler, started on first use (before any CURVE server binds)."""
    auth = _authenticators.get(ctx)
    if auth is None:
        auth = _authenticators[ctx] = Authenticator(ctx, curve)
    elif auth.curve.authorized != curve.authorized:
        raise AuthError(f"this process already serves the allow-list {auth.curve.authorized}; "
                        f"one daemon per process")
    return auth


# -- the client side: see a refusal instead of a timeout ------------------------------------------
_watch_ids = itertools.count()
_WATCHED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL |
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class HandshakeWatch:
    """A socket monitor on one connecting socket, for the first exchange only (the
    scheduler handshake): tells a refusal from a slow peer. Attach before connect;
    close once the first reply came (nothing is watched on the data path).

    libzmq's I/O thread sends each monitor event with a blocking send: a monitor whose
    reader is not connected, or already closed, stops that thread for good, and every
    socket of the context with it. So the reader connects before the monitor starts and
    closes only after it stopped, even when a Ctrl-C lands in between."""

    #: connections dropped during the handshake, with no success, before we call it a refusal
    #: (a wrong server key looks like that; one alone may be a peer restarting)
    DROPS = 2

    def __init__(self, sock: zmq.Socket):
        self._sock = sock
        self.drops = 0
        self.reason: str | None = None
        self.monitor = sock.context.socket(zmq.PAIR)
        try:
            address = f"inproc://psd-handshake-{os.getpid()}-{next(_watch_ids)}"
            self.monitor.connect(address)  # inproc may connect before the bind below
            sock.monitor(address, _WATCHED)
        except BaseException:
            self.close()
            raise

    def feed(self, frames: list) -> str | None:
        """Take one monitor message; the failure kind once there is one: ``auth`` (the
        key is not listed), ``mechanism`` (one side has no CurveZMQ), ``dropped`` (the
        server hung up mid-handshake: the server key is wrong) or ``protocol``."""
        event = parse_monitor_message(frames)
        kind = event["event"]
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.drops = 0
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.reason = "auth"
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.reason = ("mechanism" if event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
                           else "protocol")
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.drops += 1
            if self.drops >= self.DROPS:
                self.reason = "dropped"
        return self.reason

    async def failure(self) -> str:
        """Wait for a failure (asyncio monitor); returns its kind."""
        while True:
            reason = self.feed(await self.monitor.recv_multipart())
            if reason:
                return reason

    def poll(self, timeout_ms: int) -> str | None:
        """Read what arrived within ``timeout_ms`` (blocking monitor); a failure kind or None."""
        while self.monitor.poll(timeout_ms):
            timeout_ms = 0
            reason = self.feed(self.monitor.recv_multipart())
            if reason:
                return reason
        return None

    def close(self) -> None:
        try:
            self._stop()
        finally:  # a KeyboardInterrupt before the stop took effect: stop again, then close
            try:
                self._stop()
            finally:
                self.monitor.close(0)

    def _stop(self) -> None:
        try:
            self._sock.monitor(None, 0)
        except zmq.ZMQError:  # the socket is closed already: so is its monitor
            pass


def refusal_error(reason: str, address: str, curve: Curve | None, who: str = "scheduler") -> AuthError:
    """The AuthError a client raises when ``address`` refused its handshake."""
    where = f"the {who} at {address}"
    if curve is None:
        # the server may hang up before we read its greeting: "dropped" means the same here
        msg = (f"{where} requires CurveZMQ and this client has no keys (it refused the plaintext handshake: "
               f"{reason}): set PSD_KEYS=DIR (or `keys: DIR` in the config, or --keys DIR) to the cluster's key "
               f"folder (`psd keygen DIR` writes one)")
    elif reason == "mechanism":
        msg = (f"{where} does not use CurveZMQ (it runs with security: none); connect with security: none, "
               f"or give the cluster keys")
    elif reason == "auth":
        msg = (f"{where} refused this client's key {curve.short}... ({curve.folder / (curve.name + SECRET)}): "
               f"it is not in the cluster's authorized/ folder. List it: copy {curve.name}{PUBLIC} into "
               f"authorized/ on every daemon host, or create a listed key with `psd keygen DIR --add --client NAME`")
    elif reason == "dropped":
        msg = (f"{where} hung up during the CurveZMQ handshake: the server key in {curve.folder} "
               f"({curve.server_public.decode()[:8]}...) is probably not this cluster's; use the cluster's "
               f"server.key (PSD_KEYS / --keys / keys:), or connect with security: none if the cluster runs "
               f"without CurveZMQ")
    else:
        msg = f"{where} refused the CurveZMQ handshake ({reason}); check the keys in {curve.folder}"
    return AuthError(msg, reason=reason)

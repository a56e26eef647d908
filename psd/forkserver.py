"""A fork server for LocalCluster: daemons forked from an interpreter that has already
imported psd and loaded the compiled store.

Starting a daemon with ``python -m psd`` costs a server about a second of CPU before it
serves (imports 0.8 s, numba's cached kernels 0.9 s), and a test suite or ``psd run``
starts hundreds. The fork server pays that once: it imports the daemons' modules, warms
the store, then forks one child per daemon. A child is a real, separate process that
runs the same ``psd.cli.main.main(argv)`` as ``python -m psd`` would, with its own
environment, working folder and log; only the imports are inherited.

What a fork cannot change after the fact decides when it is used: ``sys.path``
(PYTHONPATH), the BLAS thread count numpy read at import and numba's settings
(``NUMBA_*``) are fixed in the fork server, so a child whose environment differs in
those is started the ordinary way (``_import_env``). The server holds no sockets, event
loop or threads when it forks.

Protocol: one SOCK_SEQPACKET socket pair between the caller and the server, JSON
datagrams. The caller sends ``{"argv", "env", "cwd"}`` with the child's log file
descriptor attached; the server answers ``{"pid"}`` (or ``{"error"}``) and later, when
the child ends, ``{"exit": pid, "code": returncode}``. The server ends when its caller
does (it watches the caller's pidfd), and its children get SIGKILL when it ends.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_MAX_DATAGRAM = 1 << 20
#: seconds a starting server may take to say it is ready. Its start loads the compiled
#: store, or compiles it (about 35 s of CPU: no writable numba cache), which a loaded
#: machine stretches past minutes; a server that dies says so at once (its socket
#: closes), so the bound only stops one that hangs. Past it the caller starts daemons
#: the ordinary way for good (each compiling alone), so it must not cut off a slow start
START_TIMEOUT = 600.0
#: not ``-m psd.forkserver``: the package imports this module first, and runpy would
#: then run a second copy of it
_MAIN = "import sys; from psd.forkserver import serve; serve(int(sys.argv[1]), int(sys.argv[2]))"

#: environment variables read at import time by Python, numpy/BLAS or numba: a child
#: whose values differ from the fork server's cannot be forked from it
_IMPORT_PREFIXES = ("PYTHON", "NUMBA_", "OPENBLAS_", "OMP_", "MKL_", "LD_")


def _import_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_PREFIXES)}


# -- the caller's side ---------------------------------------------------------------
class ForkedProcess:
    """The part of ``subprocess.Popen`` LocalCluster and the tests use, for a forked child.

    Exit codes follow Popen's convention (negative: killed by that signal)."""

    def __init__(self, server: "ForkServer", pid: int, args: list[str]):
        self._server, self.pid, self.args = server, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._server._drain(0.0)
            self.returncode = self._server._exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            if not self._server._drain(0.05 if left is None else min(left, 0.05)) and not self._server.alive():
                self._server._exits.setdefault(self.pid, -signal.SIGKILL)  # died with the server
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class ForkServer:
    """The caller's handle on one fork server process (one per caller process and
    import environment: ``shared``)."""

    def __init__(self, env: dict[str, str]):
        self.import_env = _import_env(env)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self._lock = threading.Lock()
        self._exits: dict[int, int] = {}
        #: psd's source changed under the server: its forks would mix old and new code
        self.stale = False
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MAIN, str(theirs.fileno()), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env, pass_fds=(theirs.fileno(),))
        theirs.close()
        ready = self._recv(START_TIMEOUT)
        if ready is None or "ready" not in ready:
            self.close()
            raise OSError(f"the fork server did not start: {ready}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, log_fd: int) -> ForkedProcess:
        """Fork a child running ``psd.cli.main.main(argv)`` with stdout and stderr on
        ``log_fd``."""
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
        with self._lock:
            socket.send_fds(self._sock, [request], [log_fd])
            deadline = time.monotonic() + 30.0
            while True:
                reply = self._recv(max(0.0, deadline - time.monotonic()))
                if reply is None or reply.get("closed"):
                    raise OSError("the fork server did not answer a spawn request")
                if "exit" in reply:
                    self._exits[reply["exit"]] = reply["code"]
                    continue
                if "error" in reply:
                    self.stale = self.stale or reply.get("stale", False)
                    raise OSError(f"the fork server could not start {argv[:1]}: {reply['error']}")
                self._exits.pop(reply["pid"], None)  # an earlier child's, whose pid this reuses
                return ForkedProcess(self, reply["pid"], ["psd", *argv])

    def _recv(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return None
        data = self._sock.recv(_MAX_DATAGRAM)
        return json.loads(data) if data else {"closed": True}

    def _drain(self, timeout: float) -> bool:
        """Read exit notices; True if any message came."""
        if not self._lock.acquire(timeout=max(timeout, 0.01)):
            return False
        try:
            got = False
            while True:
                msg = self._recv(timeout if not got else 0.0)
                if msg is None or msg.get("closed"):
                    return got
                got = True
                if "exit" in msg:
                    self._exits[msg["exit"]] = msg["code"]
        except OSError:
            return False
        finally:
            self._lock.release()

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)


_servers: list[ForkServer] = []
#: stale servers kept open: their children die with them (PR_SET_PDEATHSIG), so a server
#: whose psd source changed under it forks nothing more but lives until the caller ends
_retired: list[ForkServer] = []
_broken = False


def shared(env: dict[str, str]) -> ForkServer | None:
    """This process's fork server for children with ``env``'s import settings, started
    on first use; None when children with that environment must be started with exec
    (not Linux, another import environment than the running server's, or the server
    could not start)."""
    global _broken
    if _broken or not sys.platform.startswith("linux"):
        return None
    for server in _servers:
        if server.import_env == _import_env(env):
            if server.alive() and not server.stale:
                return server
            _servers.remove(server)
            if server.alive():  # stale: its running children (a cluster's daemons) need it
                _retired.append(server)
            else:
                server.close()
            break
    if _servers:  # one per caller: another import environment starts the ordinary way
        return None
    try:
        server = ForkServer(env)
    except OSError:
        _broken = True
        return None
    _servers.append(server)
    return server


def spawn(argv: list[str], env: dict[str, str], cwd: str, log_fd: int) -> ForkedProcess | None:
    """Fork ``psd argv`` from the shared fork server; None: start it with exec instead.
    A server that finds psd's source changed since it started declines, and a fresh one
    (importing the new code) takes over."""
    for _ in range(2):
        server = shared(env)
        if server is None:
            return None
        try:
            return server.spawn(argv, env, cwd, log_fd)
        except OSError:
            if not server.stale:
                return None
    return None


@atexit.register
def _close_servers() -> None:
    for server in [*_servers, *_retired]:
        server.close()
    _servers.clear()
    _retired.clear()


# -- the fork server's side ----------------------------------------------------------
def _preload() -> None:
    """Import what every daemon imports, and load the compiled store, before any fork."""
    import psd.apps  # noqa: F401  (workers and the scheduler's job checks)
    import psd.cli.main  # noqa: F401
    import psd.jobs.spec  # noqa: F401
    import psd.jobs.worker  # noqa: F401
    import psd.roles.daemon  # noqa: F401
    import psd.roles.metrics  # noqa: F401
    import psd.roles.scheduler  # noqa: F401
    import psd.roles.server  # noqa: F401
    import psd.roles.standby  # noqa: F401
    from psd.store import kernels
    kernels.warm()


def _sources() -> dict[str, int]:
    """The modification time of every psd module loaded here."""
    out = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and (name == "psd" or name.startswith("psd.")):
            out[path] = _mtime(path)
    return out


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _changed(sources: dict[str, int]) -> str | None:
    """A loaded module whose file changed since (an upgrade, a checkout): a child
    forked now would run the old module beside new ones it imports lazily."""
    return next((path for path, mtime in sources.items() if _mtime(path) != mtime), None)


def die_with_parent() -> None:
    """In a child (before exec, or just forked): SIGKILL when its parent ends (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the daemon's parent watch still ends it


def _run_child(sock: socket.socket, closing: list[int], request: dict, log_fd: int) -> None:
    """In the forked child: become the daemon ``request`` names; never returns."""
    code = 1
    try:
        die_with_parent()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in any new interpreter
        sock.close()
        for fd in closing:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(devnull)
        os.close(log_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["psd", *request["argv"]]
        atexit._clear()
        from psd.cli.main import main
        try:
            code = main(request["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - the child must end here, never in the server's loop
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _recv_request(sock: socket.socket) -> tuple[dict, int] | None:
    data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_DATAGRAM, 1)
    if not data:
        return None
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError("a spawn request needs exactly one log file descriptor")
    return json.loads(data), fds[0]


def serve(sock_fd: int, caller: int) -> None:
    sock = socket.socket(fileno=sock_fd)
    try:
        _preload()
    except BaseException as e:  # noqa: BLE001 - tell the caller, who starts children with exec
        sock.send(json.dumps({"error": f"preload failed: {e!r}"}).encode())
        raise
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # a Ctrl-C in the terminal reaches the daemons themselves, which stop cleanly; were the
    # server to die of it first, their PDEATHSIG would SIGKILL them instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    caller_fd = os.pidfd_open(caller)
    closing = [wake_r, wake_w, caller_fd]
    sys.stdout.flush()
    sock.send(json.dumps({"ready": os.getpid()}).encode())
    sources = _sources()
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([sock, wake_r, caller_fd], [], [])
        if caller_fd in ready:
            # the caller ended: so do we, at once (an interpreter with numba loaded takes
            # seconds to tear down), and our children with us (their PDEATHSIG)
            os._exit(0)
        if wake_r in ready:
            os.read(wake_r, 4096)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            sock.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
        if sock in ready:
            try:
                got = _recv_request(sock)
            except (ValueError, OSError) as e:
                sock.send(json.dumps({"error": str(e)}).encode())
                continue
            if got is None:
                os._exit(0)  # the caller closed its end
            request, log_fd = got
            changed = _changed(sources)
            if changed is not None:
                os.close(log_fd)
                sock.send(json.dumps({"error": f"{changed} changed since the fork server started",
                                      "stale": True}).encode())
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_child(sock, closing, request, log_fd)
            os.close(log_fd)
            children.add(pid)
            sock.send(json.dumps({"pid": pid}).encode())

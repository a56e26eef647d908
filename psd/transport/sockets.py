"""Socket construction: one place sets the options every psd socket shares."""
from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from psd.transport.security import Curve, HandshakeWatch, apply_client, apply_server, authenticator


def install_event_loop(name: str = "uvloop") -> str:
    """Use uvloop when asked for and installed; return the loop actually used."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


def async_context(io_threads: int | None = None) -> zmq.asyncio.Context:
    """The process's asyncio context; ``io_threads``: how many ZeroMQ I/O threads it
    runs (a daemon sets it once, before its first socket: each connection's CurveZMQ
    encryption runs on one of them)."""
    ctx = zmq.asyncio.Context.instance(io_threads=io_threads or 1)
    if io_threads and ctx.get(zmq.IO_THREADS) != io_threads:
        ctx.set(zmq.IO_THREADS, io_threads)  # (takes effect only before the first socket)
    return ctx


def _common(sock: zmq.Socket, max_message_bytes: int | None) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # the client bounds its own in-flight requests
    sock.setsockopt(zmq.RCVHWM, 0)
    if max_message_bytes:
        # hard cap per frame, far above the soft limit that gets an error reply:
        # a peer sending more than this is disconnected before we allocate it
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)


def bind_router(ctx: zmq.Context, address: str, max_message_bytes: int | None = None, *,
                security: Curve | None) -> tuple[zmq.Socket, str]:
    """Bind a ROUTER; ``address`` may end in ``:0`` or ``:*`` for a free port.
    ``security``: the daemon's keys (a CURVE server whose peers the context's ZAP handler
    checks against the allow-list), or None for plaintext (``security: none``). An
    asyncio context is needed for CURVE (the ZAP handler is a task on its loop)."""
    auth = authenticator(ctx, security) if security is not None else None
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, max_message_bytes)
    if security is not None:
        apply_server(sock, security)
    # a send to a connection that is gone fails at once (EHOSTUNREACH) instead of being
    # dropped: a striped reply then takes another connection (psd/transport/stripes.py)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # a connection with a routing id already held (a stripe connection that came back,
    # psd/transport/stripes.py, before the old one's close was seen) takes it over: by
    # default ZeroMQ ignores it for good, and the stripe lost every chunk from then on
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if address.endswith(":0"):
        address = address[:-2] + ":*"
    sock.bind(address)
    bound = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    if auth is not None:
        auth.watch(sock, bound)
    return sock, bound


def connect_dealer(ctx: zmq.Context, address: str, max_message_bytes: int | None = None, *,
                   security: Curve | None) -> zmq.Socket:
    """A DEALER connected to ``address``; ``security``: this process's keys (a CURVE
    client of the cluster's server key), or None for plaintext."""
    return _dealer(ctx, address, max_message_bytes, security)[0]


def connect_watched(ctx: zmq.Context, address: str, max_message_bytes: int | None = None, *,
                    security: Curve | None) -> tuple[zmq.Socket, HandshakeWatch]:
    """``connect_dealer`` with a monitor on its handshake (attached before connecting),
    for a first exchange that should fail fast with AuthError when refused. Close the
    watch once answered."""
    return _dealer(ctx, address, max_message_bytes, security, watch=True)


def dealer_options(max_message_bytes: int | None, security: Curve | None):
    """What ``connect_dealer`` sets on its socket before connecting, as a function of the
    socket (for the stripe connections beside it)."""
    def configure(sock: zmq.Socket) -> None:
        _common(sock, max_message_bytes)
        if security is not None:
            apply_client(sock, security)
    return configure


def _dealer(ctx, address, max_message_bytes, security, watch=False):
    sock = ctx.socket(zmq.DEALER)
    watcher = None
    try:
        _common(sock, max_message_bytes)
        if security is not None:
            apply_client(sock, security)
        watcher = HandshakeWatch(sock) if watch else None
        sock.connect(address)
    except BaseException:  # a bad option, or Ctrl-C: no socket is left open behind
        try:
            if watcher is not None:
                watcher.close()
        finally:
            sock.close(0)
        raise
    return sock, watcher


def tune_malloc() -> None:
    """Keep large message buffers on the heap. glibc maps every block over 32 MiB with
    mmap and unmaps it on free, so each large message costs a page fault per 4 KiB
    (measured: most of a 1e7-key dense push+pull). Freed memory then stays with the
    process (up to 1 GiB) instead of going back to the system: a fair trade for a
    daemon whose working set is its tables."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)        # M_MMAP_MAX: never use mmap for allocations
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    except (OSError, AttributeError):
        pass

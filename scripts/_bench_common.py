"""Helpers shared by the benchmarks in scripts/: process hygiene, the bare pyzmq echo
server used as a baseline, and result aggregation.

Everything here talks to 127.0.0.1 only. Child processes ask the kernel to kill them
when their parent dies (PR_SET_PDEATHSIG) and also poll their parent's pid, so an
interrupted benchmark leaves nothing running.
"""
from __future__ import annotations

import ctypes
import os
import signal
import statistics
import struct
import sys

import numpy as np

KEY_SPACE_END = 1 << 64
LOOPBACK = "tcp://127.0.0.1:*"

#: bare protocol header: op byte + reply size. op b"D" = data (reply `nbytes` bytes,
#: or a 1-byte ack when nbytes is 0), op b"Q" = quit.
BARE_HEADER = struct.Struct("<cQ")


# -- process hygiene -----------------------------------------------------------
def die_with_parent() -> None:
    """Get SIGKILL when the parent process dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def stop_process(proc, timeout: float = 3.0) -> None:
    """Terminate one multiprocessing.Process we started, escalating to SIGKILL."""
    if proc is None or proc.pid is None:
        return
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout)


# -- key layout ----------------------------------------------------------------
def server_begins(num_servers: int) -> list[int]:
    """Equal-width range starts: how the bare baseline splits its bytes across servers."""
    return [(KEY_SPACE_END * i) // num_servers for i in range(num_servers)]


def split_span(lo: int, n: int, num_servers: int) -> list[tuple[int, int, int]]:
    """(server, offset, count) pieces of the dense span [lo, lo+n), non-empty only."""
    begins = server_begins(num_servers)
    ends = begins[1:] + [KEY_SPACE_END]
    out = []
    for s, (b, e) in enumerate(zip(begins, ends)):
        a, z = max(lo, b), min(lo + n, e)
        if a < z:
            out.append((s, a - lo, z - a))
    return out


def split_keys(keys: np.ndarray, num_servers: int) -> list[tuple[int, int, int]]:
    """(server, i0, i1) pieces of sorted uint64 ``keys``, non-empty only."""
    begins = np.array(server_begins(num_servers)[1:], dtype=np.uint64)
    cuts = [0, *np.searchsorted(keys, begins).tolist(), keys.size]
    return [(s, cuts[s], cuts[s + 1]) for s in range(num_servers) if cuts[s + 1] > cuts[s]]


# -- the bare pyzmq baseline ---------------------------------------------------
def bare_router(ctx, conn):
    """A bare server's ROUTER on a free loopback port, unbounded queues; its address goes
    to the parent over ``conn``."""
    import zmq

    sock = ctx.socket(zmq.ROUTER)
    for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
        sock.setsockopt(opt, val)
    sock.bind(LOOPBACK)
    conn.send(sock.getsockopt(zmq.LAST_ENDPOINT).decode())
    conn.close()
    return sock


def bare_requests(sock, parent_pid: int):
    """The requests a bare server receives, as they come, until its parent is gone."""
    while True:
        if not sock.poll(500):
            if os.getppid() != parent_pid:
                return
            continue
        yield sock.recv_multipart(copy=False)


def bare_server_main(conn, parent_pid: int) -> None:
    """A ROUTER echo: ack a push, answer a pull with a same-size payload (zero-copy).

    Runs in its own process (started with the "spawn" method) and sends its bound
    address through ``conn``; it exits on a quit message, or when the parent is gone.
    """
    import zmq

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    from psd.transport.sockets import tune_malloc
    tune_malloc()  # the same allocator settings as psd's daemons: compare transports, not malloc
    ctx = zmq.Context()
    sock = bare_router(ctx, conn)
    reply = np.ones(0, dtype=np.uint8)
    ack = b"k"
    try:
        for frames in bare_requests(sock, parent_pid):
            ident, head = frames[0], frames[1]
            op, nbytes = BARE_HEADER.unpack(head.buffer)
            if op == b"Q":
                return
            if nbytes == 0:
                sock.send_multipart([ident, ack], copy=False)
            else:
                if reply.size < nbytes:
                    reply = np.ones(nbytes, dtype=np.uint8)
                sock.send_multipart([ident, memoryview(reply)[:nbytes]], copy=False)
    finally:
        sock.close(0)
        ctx.term()


class BareClient:
    """Plain blocking pyzmq DEALERs, one per echo server; no framework at all."""

    def __init__(self, addresses: list[str]):
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.socks = []
        for addr in addresses:
            s = self.ctx.socket(zmq.DEALER)
            for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
                s.setsockopt(opt, val)
            s.connect(addr)
            self.socks.append(s)

    def roundtrip(self, requests: list[tuple[int, list, int]]) -> list:
        """Send every (server, payload frames, reply_nbytes) request, then await each
        reply; returns the reply payload frames (zmq.Frame, zero-copy)."""
        for s, frames, nbytes in requests:
            self.socks[s].send_multipart([BARE_HEADER.pack(b"D", nbytes), *frames], copy=False)
        return [self.socks[s].recv(copy=False) for s, _, _ in requests]

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.ctx.term()


def stop_bare_server(address: str) -> None:
    """Ask one echo server to quit (best effort; the caller still terminates it)."""
    import zmq

    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 200)
        s.connect(address)
        s.send_multipart([BARE_HEADER.pack(b"Q", 0)])
        s.close(200)
    finally:
        ctx.term()


# -- aggregation ---------------------------------------------------------------
def aggregate_rates(workers: list[dict], name: str) -> dict:
    """Per repetition: every worker's units summed over the span from the earliest
    start to the latest end (workers run a repetition together, behind a barrier).
    Returns the median and best rate per unit over the repetitions."""
    per_worker = [w["tests"][name] for w in workers if name in w["tests"]]
    if not per_worker:
        return {}
    reps = min(len(p) for p in per_worker)
    rates: dict[str, list[float]] = {}
    for r in range(reps):
        recs = [p[r] for p in per_worker]
        dur = max(x["t1"] for x in recs) - min(x["t0"] for x in recs)
        for unit in recs[0]["units"]:
            rates.setdefault(unit, []).append(sum(x["units"][unit] for x in recs) / dur)
    return {unit: {"median": statistics.median(v), "best": max(v), "reps": v} for unit, v in rates.items()}


def latency_summary(workers: list[dict], name: str) -> dict:
    samples = np.concatenate([np.asarray(w["lat"][name]) for w in workers if name in w["lat"]])
    return {"p50_us": float(np.percentile(samples, 50)), "p99_us": float(np.percentile(samples, 99)),
            "mean_us": float(samples.mean()), "n": int(samples.size)}


def fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e4:
        return f"{x / 1e3:.1f} k"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


# -- a server's own status -----------------------------------------------------------
def server_status(address: str, timeout_ms: int = 10_000) -> dict:
    """What a server says of itself (its ``status`` answer's meta: counters, traffic),
    asked on its data socket; a silent server ends the benchmark naming it."""
    import zmq

    from psd.codec import Limits, Message, decode, encode
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(address)
        s.send_multipart(encode(Message("status", id=1, sender="bench")))
        if not s.poll(timeout_ms):
            raise SystemExit(f"no status from the server at {address}")
        return decode(s.recv_multipart(), Limits(max_header_bytes=1 << 20)).meta
    finally:
        s.close(0)

"""RpcSocket's reading, against real ZeroMQ sockets on loopback: a busy socket must not
starve the rest of its event loop, and a socket paused behind a slow handler must not
spin."""
from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from psd.codec import Message, decode, encode
from psd.errors import ProtocolError
from psd.transport import RpcSocket


def _pair(ctx: zmq.asyncio.Context) -> tuple[zmq.Socket, zmq.Socket]:
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return router, dealer


def _replies(dealer: zmq.Socket, n: int, timeout: float, op: str = "ok") -> int:
    """How many of ``n`` answers (each must be ``op``) came within ``timeout``."""
    got, deadline = 0, time.monotonic() + timeout
    while got < n and dealer.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        assert decode(dealer.recv_multipart()).op == op
        got += 1
    return got


@pytest.mark.asyncio
@pytest.mark.parametrize("n, cost", [(3000, 0.0003), (300, 0.003)])
async def test_a_busy_socket_leaves_the_loop_time_for_its_timers(n, cost):
    """``n`` queued requests at ``cost`` s each are a second of work: the loop's timers
    (a server's heartbeats) must still run on time meanwhile. A pass of the socket
    ends after DRAIN_BATCH requests or DRAIN_SECONDS, whichever comes first: 64
    requests of 3 ms held the loop for 0.2 s a pass, and a timer for up to three."""
    ctx = zmq.asyncio.Context()
    router, dealer = _pair(ctx)

    def slow(route, msg):
        end = time.perf_counter() + cost
        while time.perf_counter() < end:
            pass
        return msg.reply()

    rpc = RpcSocket(router, "S-test", handler=slow, router=True)
    try:
        for i in range(n):
            dealer.send_multipart(encode(Message("ping", id=i + 1, sender="W-test")))
        await asyncio.sleep(0.3)  # all of them queued before reading starts
        late = []

        async def ticker():
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                late.append(time.perf_counter() - t - 0.01)

        serving = asyncio.ensure_future(rpc.serve())
        ticking = asyncio.ensure_future(ticker())
        got = await asyncio.get_running_loop().run_in_executor(None, _replies, dealer, n, 30.0)
        serving.cancel()
        ticking.cancel()
        assert got == n
        assert late and max(late) < 0.25, f"a timer ran {max(late):.2f} s late while the socket was busy"
    finally:
        rpc.close()
        dealer.close(0)
        ctx.term()


@pytest.mark.asyncio
async def test_a_socket_paused_behind_a_slow_handler_does_not_spin():
    """A sequential socket reads nothing while a handler that suspends is running; the
    messages waiting meanwhile must not make the loop call it again and again."""
    ctx = zmq.asyncio.Context()
    router, dealer = _pair(ctx)

    async def slow(msg):
        await asyncio.sleep(1.0)
        return msg.reply()

    rpc = RpcSocket(router, "S-test", handler=lambda route, msg: slow(msg), router=True)
    serving = asyncio.ensure_future(rpc.serve())
    other = None
    try:
        dealer.send_multipart(encode(Message("ping", id=1, sender="W-test")))
        await asyncio.sleep(0.2)  # the first one is being handled: reading is paused
        # a second peer: its connection wakes the socket's descriptor
        other = zmq.Context.instance().socket(zmq.DEALER)
        other.setsockopt(zmq.LINGER, 0)
        other.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        other.send_multipart(encode(Message("ping", id=2, sender="W-other")))
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(0.6)
        cpu = time.process_time() - cpu0
        assert cpu < 0.3, f"the loop burnt {cpu:.2f} s of CPU in {time.perf_counter() - t0:.2f} s while paused"
        run = asyncio.get_running_loop().run_in_executor
        assert await run(None, _replies, dealer, 1, 10.0) == 1  # both are answered once the
        assert await run(None, _replies, other, 1, 10.0) == 1  # first handler is done
    finally:
        serving.cancel()
        rpc.close()
        dealer.close(0)
        if other is not None:
            other.close(0)
        ctx.term()


@pytest.mark.asyncio
async def test_repeated_rejections_are_logged_once_then_counted(caplog):
    """Every bad request gets its error reply, but a peer repeating one must not flood
    the daemon's log: one line per sender, op and error, then a count."""
    ctx = zmq.asyncio.Context()
    router, dealer = _pair(ctx)

    def refuse(route, msg):
        raise ProtocolError(f"{msg.op} is not served here")

    rpc = RpcSocket(router, "S-test", handler=refuse, router=True)
    serving = asyncio.ensure_future(rpc.serve())
    try:
        with caplog.at_level("WARNING", logger="psd.transport"):
            for i in range(50):
                dealer.send_multipart(encode(Message("bogus", id=i + 1, sender="W-test")))
            dealer.send_multipart(encode(Message("other", id=99, sender="W-test")))
            replies = await asyncio.get_running_loop().run_in_executor(None, _replies, dealer, 51, 10.0, "error")
        assert replies == 51  # every one was answered
        lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
        assert len(lines) == 2, lines  # one for "bogus", one for "other"
    finally:
        serving.cancel()
        rpc.close()
        dealer.close(0)
        ctx.term()


def _dealer(endpoint: str, identity: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(endpoint)
    return sock


@pytest.mark.asyncio
@pytest.mark.parametrize("reroute_first", [False, True])
async def test_a_reply_from_a_peers_new_connection_reaches_its_request(reroute_first):
    """A peer whose connection ZeroMQ re-made (a new identity) answers a request sent to
    the old one: once the owner of the socket says both are the same peer (the scheduler
    does on the node's next heartbeat), the reply is delivered, whichever came first. A
    reply from any other connection is still never taken for it."""
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    rpc = RpcSocket(router, "sched-test", router=True)
    serving = asyncio.ensure_future(rpc.serve())
    old, new, other = _dealer(endpoint, b"old"), _dealer(endpoint, b"new"), _dealer(endpoint, b"other")
    try:
        await asyncio.sleep(0.2)  # connected
        fut = rpc.request(Message("transfer"), b"old")
        got = await asyncio.get_running_loop().run_in_executor(None, lambda: old.poll(3000) and old.recv_multipart())
        request = decode(got)
        other.send_multipart(encode(request.reply(sender="intruder")))
        await asyncio.sleep(0.2)
        assert not fut.done(), "a reply from an unrelated connection was taken"
        if reroute_first:
            rpc.reroute(b"old", b"new")
        new.send_multipart(encode(request.reply(sender="S1", meta={"copied": 7})))
        await asyncio.sleep(0.2)
        assert not fut.done() or reroute_first
        if not reroute_first:
            rpc.reroute(b"old", b"new")
        reply = await asyncio.wait_for(fut, 2)
        assert reply.meta == {"copied": 7} and reply.sender == "S1"
    finally:
        serving.cancel()
        rpc.close()
        for sock in (old, new, other):
            sock.close(0)
        ctx.term()

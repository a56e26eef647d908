"""ZeroMQ sockets on an asyncio loop. Moves messages; does not interpret them."""
from psd.transport.rpc import RpcSocket, Route, is_reply, error_reply
from psd.transport.sockets import bind_router, connect_dealer, async_context, install_event_loop

__all__ = ["RpcSocket", "Route", "is_reply", "error_reply", "bind_router", "connect_dealer",
           "async_context", "install_event_loop"]

"""``GET /metrics`` over HTTP/1.x, on the daemon's own asyncio loop (no threads).

Deliberately small: one request per connection (``Connection: close``), ``GET`` and
``HEAD`` of ``/metrics`` only, request heads limited in size and time, a bounded number
of connections at once. The text comes from a render function called on the loop, so it
reads the role's state between two of its handlers, never in the middle of one.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import Callable

from psd.errors import StartupError
from psd.transport.metrics import CONTENT_TYPE

log = logging.getLogger("psd.metrics")

#: a request head larger than this is refused (a scrape's is a few hundred bytes)
MAX_HEAD = 8192
#: seconds a client has to send its request head, and to take the answer
HEAD_TIMEOUT = 5.0
#: connections served at once; more are answered 503 and closed
MAX_CONNECTIONS = 16

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d+)$")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


def split_host_port(address: str) -> tuple[str, int]:
    """``127.0.0.1:9400`` -> ("127.0.0.1", 9400); ``[::1]:0`` -> ("::1", 0)."""
    m = _HOST_PORT.match(address)
    if not m or int(m["port"]) > 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return m["host"].strip("[]"), int(m["port"])


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsEndpoint:
    """Serves ``render()`` at ``http://ADDRESS/metrics``. ``start`` binds (port 0 picks a
    free port) and sets ``address`` to what was bound."""

    def __init__(self, address: str, render: Callable[[], str], on_started: Callable[[str], None] | None = None):
        self.host, self.port = split_host_port(address)
        self.render = render
        self.on_started = on_started
        self.address: str | None = None
        self.scrapes = 0
        self._server: asyncio.AbstractServer | None = None
        self._open = 0

    async def start(self) -> str:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD,
                                                      reuse_address=True)
        except OSError as e:
            raise StartupError(f"metrics: cannot listen on {join_host_port(self.host, self.port)}: "
                               f"{e.strerror or e}") from None
        port = self._server.sockets[0].getsockname()[1]
        self.address = join_host_port(self.host, port)
        log.info("metrics at http://%s/metrics", self.address)
        if self.on_started is not None:
            self.on_started(self.address)
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                await self._respond(writer, 503, "too many metrics connections\n")
                return
            try:
                head = await asyncio.wait_for(self._read_head(reader), HEAD_TIMEOUT)
            except asyncio.TimeoutError:
                await self._respond(writer, 408, "request head not received in time\n")
                return
            except (ValueError, asyncio.LimitOverrunError):
                await self._respond(writer, 431, f"request head over {MAX_HEAD} bytes\n")
                return
            if not head.strip():
                return
            status, body, extra = self._answer(head)
            await self._respond(writer, status, body, extra, head_only=head.startswith(b"HEAD "))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the client went away, or does not read its answer
        except Exception:  # never let a scrape take the daemon down
            log.exception("metrics: serving a request failed")
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), HEAD_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                writer.transport.abort()
            finally:
                self._open -= 1

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> bytes:
        """The request line and headers, up to the blank line (CRLF or bare LF), at most
        MAX_HEAD bytes. A request line without a version (``GET /metrics``, as netcat
        users type it) has no headers."""
        head = b""
        while True:
            line = await reader.readline()  # ValueError past the stream's limit
            head += line
            if len(head) > MAX_HEAD:
                raise ValueError("request head too large")
            if not line or line in (b"\r\n", b"\n") or (head == line and len(line.split()) == 2):
                return head

    def _answer(self, head: bytes) -> tuple[int, str, dict]:
        line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) not in (2, 3):
            return 400, "expected a request line like: GET /metrics HTTP/1.1\n", {}
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return 405, "only GET and HEAD\n", {"Allow": "GET, HEAD"}
        if target.split("?", 1)[0] != "/metrics":
            return 404, "metrics are at /metrics\n", {}
        try:
            text = self.render()
        except Exception:
            log.exception("metrics: rendering failed")
            return 500, "rendering the metrics failed; see the daemon's log\n", {}
        self.scrapes += 1
        return 200, text, {"Content-Type": CONTENT_TYPE}

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: str, extra: dict | None = None,
                       head_only: bool = False) -> None:
        data = body.encode()
        headers = {"Content-Type": "text/plain; charset=utf-8", **(extra or {}),
                   "Content-Length": str(len(data)), "Connection": "close"}
        head = f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode("latin-1") + (b"" if head_only else data))
        await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)  # a client that does not read is cut off

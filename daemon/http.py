"""The daemon's HTTP servers: the bounded ``Server`` under both, and the status server:
``/status`` (JSON), ``/metrics`` (Prometheus), ``/healthz``.

The status server binds loopback by default (``tiered.status_address``) and answers GET and
HEAD only; every other method gets 405. It reads the daemon's state and never changes it.
Neither server's cost grows with the connections a client opens: see ``Server``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from socketserver import _SocketWriter  # type: ignore[attr-defined]
from typing import Any

from tiered import ConfigError

log = logging.getLogger(__name__)

Route = Callable[[], tuple[int, str, bytes]]

MAX_PENDING = 256
"""Connections at most whose request has not been answered yet (a head still coming in, or
waiting for a worker): a flood closes the oldest, not the server."""
HEAD_DEADLINE_SECONDS = 10.0
BACKLOG = 1024
"""The listen backlog: a burst of connects from every node of a 1,000-node job is queued by
the kernel, not reset."""
MAX_HEAD_BYTES = 65536


class Handler(BaseHTTPRequestHandler):
    """A handler of ``Server``: its request is the connection and the head the intake read."""

    timeout = 30.0

    def setup(self) -> None:
        conn, head = self.request
        self.connection = conn
        conn.settimeout(self.timeout)
        self.rfile = io.BufferedReader(_Replay(head, conn.makefile("rb", buffering=0)))
        self.wfile = _SocketWriter(conn)


class _Replay(io.RawIOBase):
    """The bytes the intake read first, then the socket's."""

    def __init__(self, head: bytes, raw: Any) -> None:
        self._head = memoryview(head)
        self._raw = raw

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return int(self._raw.readinto(buffer) or 0)


@dataclass
class _Pending:
    sock: socket.socket
    peer: Any
    since: float
    head: bytearray = field(default_factory=bytearray)


class Server:
    """An HTTP server with bounded cost, on threads of its own.

    One intake thread accepts connections (listen backlog ``BACKLOG``) and reads each request's
    head without blocking; a connection whose head is not in within ``HEAD_DEADLINE_SECONDS``
    is closed, and of more than ``max_pending`` connections without a whole head (or waiting for
    a worker) the oldest is closed: a slow client holds a slot, never a thread, and cannot
    starve one that sends its request at once. ``workers`` fixed threads answer the requests
    whose head is in. A bind that fails is one ``ConfigError`` naming the setting to change
    (``key``, and where else it is set)."""

    def __init__(
        self,
        address: str,
        handler: type[Handler],
        *,
        key: str,
        elsewhere: str,
        thread: str,
        workers: int = 4,
        max_pending: int = MAX_PENDING,
        head_deadline: float = HEAD_DEADLINE_SECONDS,
    ) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        self.handler = handler
        self.max_pending = max_pending
        self.head_deadline = head_deadline
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, int(port)))
            self._sock.listen(BACKLOG)
        except OSError as err:
            self._sock.close()
            why = {
                errno.EADDRINUSE: "the address is in use (another daemon, or another program?)",
                errno.EADDRNOTAVAIL: "no interface of this host has that address",
                errno.EACCES: "a port below 1024 needs privileges",
            }.get(err.errno or 0, err.strerror or str(err))
            raise ConfigError(
                f"{key} {address}: {why}; choose another with {key} or {elsewhere}"
            ) from None
        self._sock.setblocking(False)
        self._ready: queue.Queue[tuple[socket.socket, Any, bytes] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._intake, name=thread, daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"{thread}-{i}", daemon=True)
            for i in range(workers)
        ]

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stopping.set()
        for _ in self._threads[1:]:
            self._ready.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=5)
        self._sock.close()

    # -- the intake: one thread, no blocking call but select --

    def _intake(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, None)
        pending: dict[socket.socket, _Pending] = {}  # oldest first
        try:
            while not self._stopping.is_set():
                for key, _events in sel.select(timeout=0.25):
                    if key.data is None:
                        self._accept(sel, pending)
                    else:
                        self._read(sel, pending, key.data)
                now = time.monotonic()
                while pending:
                    oldest = next(iter(pending.values()))
                    if now - oldest.since < self.head_deadline:
                        break
                    self._drop(sel, pending, oldest, b"408 Request Timeout")
        finally:
            for p in list(pending.values()):
                self._drop(sel, pending, p, None)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, pending: dict[socket.socket, _Pending]) -> None:
        for _ in range(BACKLOG):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # out of file descriptors, say: the oldest make room
                log.warning("Accepting a connection failed: %s", err)
                if pending:
                    self._drop(sel, pending, next(iter(pending.values())), None)
                return
            if len(pending) + self._ready.qsize() >= self.max_pending:
                if not pending:  # every slot waits for a worker
                    _close(conn, b"503 Service Unavailable")
                    continue
                self._drop(sel, pending, next(iter(pending.values())), b"503 Service Unavailable")
            conn.setblocking(False)
            p = _Pending(conn, peer, time.monotonic())
            pending[conn] = p
            sel.register(conn, selectors.EVENT_READ, p)

    def _read(
        self, sel: selectors.BaseSelector, pending: dict[socket.socket, _Pending], p: _Pending
    ) -> None:
        try:
            data = p.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sel, pending, p, None)
            return
        start = max(0, len(p.head) - 3)
        p.head += data
        if p.head.find(b"\r\n\r\n", start) >= 0 or p.head.find(b"\n\n", start) >= 0:
            sel.unregister(p.sock)
            del pending[p.sock]
            p.sock.setblocking(True)
            self._ready.put((p.sock, p.peer, bytes(p.head)))
        elif len(p.head) > MAX_HEAD_BYTES:
            self._drop(sel, pending, p, b"431 Request Header Fields Too Large")

    def _drop(
        self,
        sel: selectors.BaseSelector,
        pending: dict[socket.socket, _Pending],
        p: _Pending,
        status: bytes | None,
    ) -> None:
        sel.unregister(p.sock)
        del pending[p.sock]
        _close(p.sock, status)

    # -- the workers --

    def _work(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            conn, peer, head = item
            try:
                self.handler((conn, head), peer, self)  # type: ignore[arg-type]
            except Exception as err:  # one broken exchange must not end the worker
                log.debug("HTTP exchange with %s failed: %s", peer, err)
            finally:
                _close(conn, None)


def _close(conn: socket.socket, status: bytes | None) -> None:
    """Close a connection, first telling the client ``status`` when it can take it now."""
    with contextlib.suppress(OSError):
        if status is not None:
            conn.setblocking(False)
            conn.send(b"HTTP/1.0 " + status + b"\r\nContent-Length: 0\r\n\r\n")
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)  # the client sees the end now, as socketserver does it
    with contextlib.suppress(OSError):
        conn.close()


class _Handler(Handler):
    routes: dict[str, Route] = {}
    server_version = "tiered"
    sys_version = ""

    def do_GET(self) -> None:
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self._send(404, "text/plain", b"not found\n")
            return
        try:
            code, ctype, body = route()
        except Exception as err:  # a broken view must not kill the server thread
            log.exception("HTTP %s failed", self.path)
            code, ctype, body = 500, "text/plain", f"{type(err).__name__}\n".encode()
        self._send(code, ctype, body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def _refuse(self) -> None:
        self._send(405, "text/plain", b"method not allowed\n", allow=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def _send(self, code: int, ctype: str, body: bytes, *, allow: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if allow:
            self.send_header("Allow", "GET, HEAD")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s", format % args)


class StatusServer(Server):
    def __init__(self, address: str, routes: dict[str, Route]) -> None:
        handler = type("Handler", (_Handler,), {"routes": routes})
        super().__init__(
            address,
            handler,
            key="tiered.status_address",
            elsewhere="TIERED_STATUS_ADDRESS",
            thread="tiered-http",
        )

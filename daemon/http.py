"""The daemon's HTTP server: ``/status`` (JSON), ``/metrics`` (Prometheus), ``/healthz``.

It binds loopback by default (``tiered.status_address``) and answers GET and HEAD only; every
other method gets 405. It reads the daemon's state and never changes it.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tiered import ConfigError

log = logging.getLogger(__name__)

Route = Callable[[], tuple[int, str, bytes]]


class _Handler(BaseHTTPRequestHandler):
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


class Server:
    """A ``ThreadingHTTPServer`` on a thread of its own. A bind that fails is one
    ``ConfigError`` naming the setting to change (``key``, and where else it is set)."""

    def __init__(
        self,
        address: str,
        handler: type[BaseHTTPRequestHandler],
        *,
        key: str,
        elsewhere: str,
        thread: str,
    ) -> None:
        host, _, port = address.rpartition(":")
        try:
            self.httpd = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
        except OSError as err:
            why = {
                errno.EADDRINUSE: "the address is in use (another daemon, or another program?)",
                errno.EADDRNOTAVAIL: "no interface of this host has that address",
                errno.EACCES: "a port below 1024 needs privileges",
            }.get(err.errno or 0, err.strerror or str(err))
            raise ConfigError(
                f"{key} {address}: {why}; choose another with {key} or {elsewhere}"
            ) from None
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=thread, daemon=True)

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        return f"{host_text}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


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

"""A small HTTP proxy on loopback that makes a storage server flaky, for fault tests.

Each request is forwarded to ``target`` unless the dice say otherwise: answer 503 (``error``),
drop the connection without answering (``reset``), or wait first (``latency`` seconds).
Counts of what it did are kept in ``stats``.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FaultProxy:
    def __init__(
        self,
        target: str,
        *,
        error: float = 0.0,
        reset: float = 0.0,
        latency: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.target = urlsplit(target)
        self.error, self.reset, self.latency = error, reset, latency
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stats = {"forwarded": 0, "error": 0, "reset": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    roll = proxy.rng.random()
                if proxy.latency:
                    threading.Event().wait(proxy.latency)
                if roll < proxy.reset:
                    proxy._count("reset")
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if roll < proxy.reset + proxy.error:
                    proxy._count("error")
                    payload = b'{"error": {"code": 503, "message": "injected"}}'
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(
                    proxy.target.hostname, proxy.target.port, timeout=60
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.target.hostname}:{proxy.target.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()
                proxy._count("forwarded")

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _count(self, what: str) -> None:
        with self.lock:
            self.stats[what] += 1

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

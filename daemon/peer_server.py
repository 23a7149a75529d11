"""The peer server: what other nodes' daemons send their steps to, and get them back from.

It binds ``tiered.peer_listen_address`` (the status server stays on loopback). Every request
must be signed with the job's secret, for this job and this node, and is taken once
(``tiered.peerauth``); a request of another peer protocol version gets 426 naming both; a node
may write and read only its own replicas, and only under ``.tiered/peers/node-<rank>/``: nothing
else of this node is ever read or served. It answers one request per connection (HTTP/1.0), at
most two transfers in at a time, and drops a sender that goes quiet for
``tiered.peer_timeout_seconds``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.http import Handler, Server
from tiered import (
    ChecksumMismatch,
    LayoutError,
    PeerProtocolMismatch,
    PeerRefused,
    StorageError,
    TieredError,
)
from tiered.sidecar import (
    PROTOCOL_VERSION,
    VERSION_HEADER,
    PeerAuth,
    PeerStore,
    read_header,
    replica_stream,
)

log = logging.getLogger("daemon")

_PATH = re.compile(r"/v1/replicas/(0|[1-9][0-9]{0,8})(?:/(0|[1-9][0-9]{0,18}))?")
MAX_TRANSFERS_IN = 2
PEER_WORKERS = 8
"""Requests answered at once: two transfers in, the rest listings and steps served back."""


@dataclass
class PeerContext:
    """What the server's handlers read: set once, then read by the handler threads."""

    store: PeerStore
    auth: PeerAuth
    rank: Callable[[], int]
    nodes: Callable[[], int]
    keep: int
    free_bytes: Callable[[], int]
    slots: threading.Semaphore


class _PeerHandler(Handler):
    ctx: PeerContext
    server_version = "tiered-peer"
    sys_version = ""
    timeout = 30.0

    def _route(self) -> tuple[int, int | None] | None:
        match = _PATH.fullmatch(self.path)
        if match is None:
            self._send(404, {"error": "not found"})
            return None
        return int(match.group(1)), int(match.group(2)) if match.group(2) else None

    def _authorized(self, owner: int) -> bool:
        ctx = self.ctx
        try:
            rank = ctx.auth.check_request(
                self.headers.get("X-Tiered-Auth"), self.command, self.path, receiver=ctx.rank()
            )
            if rank != owner:
                raise PeerRefused(f"node {rank} asked for node {owner}'s replicas")
            if rank == ctx.rank() or not 0 <= rank < ctx.nodes():
                raise PeerRefused(f"node {rank} is not another node of this {ctx.nodes()}")
        except PeerProtocolMismatch as err:
            log.warning("Refused a peer request from %s: %s", self.client_address[0], err)
            self._send(426, {"error": str(err)})
            return False
        except PeerRefused as err:
            log.warning("Refused a peer request from %s: %s", self.client_address[0], err)
            self._send(401, {"error": str(err)})
            return False
        except StorageError as err:  # the record of nonces cannot take it: refused, closed
            log.error("Refused a peer request from %s: %s", self.client_address[0], err)
            self._send(503, {"error": str(err)})
            return False
        return True

    def do_GET(self) -> None:
        route = self._route()
        if route is None or not self._authorized(route[0]):
            return
        owner, step = route
        store = self.ctx.store
        if step is None:
            held = [
                {"step": r.step, "epoch": r.epoch, "identity": r.identity, "bytes": r.bytes}
                for r in store.replicas(owner)
            ]
            self._send(200, {"replicas": held})
            return
        info = store.info(owner, step)
        if info is None:
            self._send(404, {"error": f"no replica of node {owner}'s step {step} here"})
            return
        header, raw, sig, _received = info
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(header.stream_length(raw)))
        self.send_header("X-Tiered-Replica-Sig", sig)
        self.send_header(VERSION_HEADER, str(PROTOCOL_VERSION))
        self.end_headers()
        try:
            for chunk in replica_stream(
                header, lambda rel: store.open_file(owner, step, rel), raw=raw
            ):
                self.wfile.write(chunk)
        except (OSError, TieredError) as err:
            # The copy here is damaged (or the requester left): it is not a copy any more.
            log.warning("Serving node %d's step %d stopped: %s", owner, step, err)
            if not isinstance(err, ConnectionError | TimeoutError):
                store.drop(owner, step)
            self.close_connection = True
            return
        log.info("Served node %d its step %d back (%d bytes)", owner, step, header.total_bytes)

    def do_PUT(self) -> None:
        route = self._route()
        if route is None or not self._authorized(route[0]):
            return
        owner, step = route
        if step is None:
            self._send(405, {"error": "PUT takes /v1/replicas/<rank>/<step>"})
            return
        if not self.ctx.slots.acquire(blocking=False):
            self._send(503, {"error": "busy: too many transfers in; try again later"})
            return
        try:
            self._receive(owner, step)
        finally:
            self.ctx.slots.release()

    def _receive(self, owner: int, step: int) -> None:
        ctx = self.ctx
        started = time.monotonic()
        try:
            length = int(self.headers.get("Content-Length", ""))
            header, raw = read_header(self.rfile)  # type: ignore[arg-type]
            ctx.auth.check_header(raw, self.headers.get("X-Tiered-Replica-Sig"))
            if header.owner != owner or header.step != step:
                raise LayoutError(
                    f"the body is node {header.owner}'s step {header.step}, the path says "
                    f"node {owner}'s step {step}"
                )
            if length != header.stream_length(raw):
                raise LayoutError(
                    f"Content-Length {length} is not the replica's {header.stream_length(raw)}"
                )
            replica = ctx.store.receive(
                self.rfile,  # type: ignore[arg-type]
                header,
                raw,
                sig=self.headers.get("X-Tiered-Replica-Sig", ""),
                free_bytes=ctx.free_bytes(),
                keep=ctx.keep,
            )
        except ValueError:
            self._send(411, {"error": "a Content-Length is needed"})
            return
        except PeerRefused as err:
            log.warning("Refused node %d's step %d: %s", owner, step, err)
            self._send(401, {"error": str(err)})
            return
        except (ChecksumMismatch, LayoutError) as err:
            log.warning("Refused node %d's step %d: %s", owner, step, err)
            self._send(400, {"error": str(err)})
            return
        except StorageError as err:
            log.warning("Could not keep node %d's step %d: %s", owner, step, err)
            self._send(507 if "no room" in str(err) else 500, {"error": str(err)})
            return
        log.info(
            "Keeping node %d's step %d (%d bytes in %.1f s, every file verified)",
            owner,
            step,
            replica.bytes,
            time.monotonic() - started,
        )
        self._send(200, {"step": step, "identity": replica.identity})

    def _refuse(self) -> None:
        self._send(405, {"error": "method not allowed"})

    do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _refuse

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header(VERSION_HEADER, str(PROTOCOL_VERSION))
            if code == 426:
                self.send_header("Upgrade", f"tiered-peer/{PROTOCOL_VERSION}")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the other side is gone
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        log.debug("peer http %s", format % args)


class PeerServer(Server):
    def __init__(self, address: str, ctx: PeerContext, *, timeout: float) -> None:
        handler = type("Handler", (_PeerHandler,), {"ctx": ctx, "timeout": timeout})
        super().__init__(
            address,
            handler,
            key="tiered.peer_listen_address",
            elsewhere="tiered.peer_addresses",
            thread="tiered-peers",
            workers=PEER_WORKERS,
        )


# -- sending ---------------------------------------------------------------------------------

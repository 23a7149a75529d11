"""Peer replication in the daemon: the server other nodes' daemons send their steps to (and get
them back from), and the job that sends this node's newest step to its partners.

The server binds ``tiered.peer_listen_address`` (the status server stays on loopback). Every
request must be signed with the job's secret, for this job and this node, and is taken once
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
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from daemon.base import DaemonBase
from daemon.http import Handler, Server
from daemon.jobs import pacer
from daemon.state import with_item, without
from daemon.workers import Job, Outcome, Progress
from tiered import (
    ChecksumMismatch,
    LayoutError,
    LocalTier,
    PeerProtocolMismatch,
    PeerRefused,
    StorageError,
    TieredError,
)
from tiered.sidecar import (
    PEER_NONCES,
    PROTOCOL_VERSION,
    VERSION_HEADER,
    NonceRecord,
    PeerAuth,
    PeerClient,
    PeerStore,
    RateLimiter,
    clients_for,
    header_for,
    held_by_every_peer,
    job_identity,
    listen_address,
    load_secret,
    partners,
    read_header,
    replica_stream,
    replication_pace,
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


@dataclass(frozen=True)
class Sent:
    """How one partner came to hold a step: sent now, or held already."""

    how: str
    bytes: int
    seconds: float


def replicate(
    local: LocalTier,
    rank: int,
    step: int,
    clients: list[PeerClient],
    *,
    limiter: RateLimiter | None = None,
) -> Job:
    """Send local ``step`` to each of ``clients`` that does not hold this very copy yet, at
    ``limiter``'s pace (default: each client's cap)."""

    def run(progress: Progress) -> tuple[str, dict[int, Sent | BaseException]]:
        manifest = local.manifest(step)
        header = header_for(local, step, rank, manifest)
        out: dict[int, Sent | BaseException] = {}
        for client in clients:
            started = time.monotonic()
            try:
                if any(h.step == step and h.identity == manifest.identity for h in client.held()):
                    out[client.rank] = Sent("held", 0, 0.0)
                    continue
                client.send(local.step_dir(step), header, progress=progress, limiter=limiter)
                out[client.rank] = Sent("sent", header.total_bytes, time.monotonic() - started)
            except (TieredError, OSError) as err:
                out[client.rank] = err
        return manifest.identity, out

    return Job("replicate", step, run, data=[c.rank for c in clients], pacer=limiter)


class Peering(DaemonBase):
    """Part of ``Daemon``: its peers."""

    peer_server: PeerServer | None
    peer_store: PeerStore
    _peer_clients: tuple[tuple[int, ...], list[PeerClient]] | None

    def _peer_ranks(self) -> list[int]:
        explicit = self.cfg.tiered.peers
        if explicit is None and self.mtc is not None and self.mtc.active is not None:
            explicit = list(self.mtc.active.peer_ranks) or None
        return partners(self.topology.rank, self.topology.nodes, explicit)

    def _start_peers(self) -> None:
        """Start the peer server (with peer replication configured)."""
        if not self.cfg.peering:
            return
        auth = PeerAuth(
            load_secret(self.cfg),
            self.topology.rank,
            job=job_identity(self.cfg.durable_url),
            record=NonceRecord(self.local.tiered_dir / PEER_NONCES),
        )
        self.peer_store.clean_partial()
        ctx = PeerContext(
            store=self.peer_store,
            auth=auth,
            rank=lambda: self.topology.rank,
            nodes=lambda: self.topology.nodes,
            keep=self.cfg.tiered.peer_keep,
            free_bytes=self._local_free_now,
            slots=threading.Semaphore(MAX_TRANSFERS_IN),
        )
        address = listen_address(self.cfg, self.topology.rank, self.topology.nodes)
        self.peer_server = PeerServer(address, ctx, timeout=self.cfg.tiered.peer_timeout_seconds)
        self.peer_server.start()
        log.info(
            "Peer server on %s; this node's steps go to nodes %s",
            self.peer_server.address,
            self._peer_ranks() or "none yet (one node)",
        )

    def _local_free_now(self) -> int:
        """Room for a replica: the free bytes less the floor the daemon keeps free
        (``tiered.min_free_local_fraction``), so others' copies never push this node's own
        saves into disk pressure."""
        capacity = self.cfg.tiered.local_capacity
        try:
            free = self.local.free_bytes(capacity)
            total = capacity if capacity is not None else shutil.disk_usage(self.local.root).total
        except OSError:
            return 0
        return max(0, free - int(total * self.cfg.tiered.min_free_local_fraction))

    def _shed_replicas(self) -> None:
        """Under disk pressure: keep only each partner's newest copy."""
        for owner in {r.owner for r in self.peer_store.replicas()}:
            for step in self.peer_store.prune(owner, keep=1):
                log.warning(
                    "Local disk pressure: dropped node %d's step %d from the peer store",
                    owner,
                    step,
                )

    def _clients(self) -> list[PeerClient]:
        ranks = tuple(self._peer_ranks())
        if self._peer_clients is None or self._peer_clients[0] != ranks:
            clients = clients_for(self.cfg, self.topology.rank, self.topology.nodes, list(ranks))
            self._peer_clients = (ranks, clients)
        return self._peer_clients[1]

    def _submit_replication(self) -> None:
        """Send the newest committed local step to the partners that lack it (one job at a
        time, on its own lane: it never holds up training or promotion)."""
        if self.peer_server is None or not self.topology.multi or self.peer_lane.busy:
            return
        nodes = self.topology.nodes
        steps = [s for s in self.local.scan(with_size=True) if s.committed and s.fits(nodes)]
        if not steps:
            return
        newest = steps[-1]
        state, now = self.state, time.monotonic()
        due = [
            c
            for c in self._clients()
            if state.peer_sent.get(c.rank) != (newest.step, newest.identity)
            and now >= state.peer_retry_at.get(c.rank, 0.0)
        ]
        if due:
            pace = replication_pace(newest.size, newest.reason, local=steps, rules=self.rules)
            limiter = pacer(self.cfg.tiered.peer_bandwidth_mb_per_s, pace.bytes_per_s)
            job = replicate(self.local, self.topology.rank, newest.step, due, limiter=limiter)
            self.peer_lane.submit(job)

    def _on_replicate(self, outcome: Outcome) -> None:
        step = outcome.job.step or 0
        state = self.state
        if outcome.error is not None:
            err = outcome.error
            if not isinstance(err, TieredError | OSError):
                raise err
            if not self.local.step_dir(step).exists():
                return  # pruned meanwhile; the next newest goes next
            outcome_map: dict[int, Sent | BaseException] = dict.fromkeys(outcome.job.data, err)
            identity = None
        else:
            identity, outcome_map = outcome.value
        for rank, result in outcome_map.items():
            if isinstance(result, Sent):
                if result.how == "sent":
                    self.metrics.peer_bytes_sent.inc(result.bytes)
                    log.info(
                        "Replicated step %d to peer node %d (%d bytes in %.1f s)",
                        step,
                        rank,
                        result.bytes,
                        result.seconds,
                    )
                self.metrics.peer_step.labels(peer=str(rank)).set(step)
                state = replace(
                    state,
                    peer_sent=with_item(state.peer_sent, rank, (step, identity)),
                    peer_errors=without(state.peer_errors, rank),
                    peer_failures=without(state.peer_failures, rank),
                    peer_retry_at=without(state.peer_retry_at, rank),
                )
                continue
            message = str(result).splitlines()[0] if str(result) else type(result).__name__
            failures = state.peer_failures.get(rank, 0) + 1
            delay = min(
                self.cfg.tiered.retry_max_seconds,
                self.cfg.tiered.retry_initial_seconds * 2 ** (failures - 1),
            )
            if message != state.peer_errors.get(rank) or failures % 20 == 0:
                log.warning(
                    "Replicating step %d to peer node %d failed (%d in a row; next try in "
                    "%.0f s; training and promotion go on): %s",
                    step,
                    rank,
                    failures,
                    delay,
                    message,
                )
            self.metrics.errors.labels(kind="peer").inc()
            state = replace(
                state,
                peer_errors=with_item(state.peer_errors, rank, message),
                peer_failures=with_item(state.peer_failures, rank, failures),
                peer_retry_at=with_item(state.peer_retry_at, rank, time.monotonic() + delay),
            )
        self.state = state

    def _replicated_step(self) -> int | None:
        """The newest local step every partner is known to hold (None: not all hold one)."""
        if self.peer_server is None or not self.topology.multi:
            return None
        sent = self.state.peer_sent
        return held_by_every_peer(sent[r][0] if r in sent else None for r in self._peer_ranks())

    def peers_view(self) -> dict[str, Any] | None:
        """The status's ``peers`` block: what this node sent, and what it keeps for others."""
        if self.peer_server is None:
            return None
        state = self.state
        held = self.peer_store.replicas()
        return {
            "address": self.peer_server.address,
            "sends_to": {
                str(rank): {
                    "step": state.peer_sent[rank][0] if rank in state.peer_sent else None,
                    "error": state.peer_errors.get(rank),
                }
                for rank in self._peer_ranks()
            },
            "holds": [
                {"node": r.owner, "step": r.step, "epoch": r.epoch, "bytes": r.bytes} for r in held
            ],
            "holds_bytes": sum(r.bytes for r in held),
        }

"""Peer replication between nodes: who sends to whom, how a request proves it comes from the
job, and the client side of the transport (``daemon.peers`` serves it).

Each node's daemon sends its newest committed local step to its partners: the next node in a
ring by default, or the ranks ``tiered.peers`` (or orbax's ``peer-ranks`` in
``replicator.yaml``) names. A partner keeps it in its peer store (``tiered.storage.replicas``).
When a node comes back empty, it asks its partners for its own steps before the restore
agreement (``recover_own``), so the agreement sees them as local again.

The transport is plain HTTP between the daemons, on ``tiered.peer_listen_address``:

    GET /v1/replicas/<rank>         the replicas of node <rank> held here (JSON)
    GET /v1/replicas/<rank>/<step>  one of them, as the replica stream
    PUT /v1/replicas/<rank>/<step>  store one (the body is the replica stream)

Every request is signed with the job's shared secret (``tiered.peer_secret_file``), for one
receiver, once (``tiered.peerauth``: peer protocol v2); the receiver refuses any other request,
and a rank that is not the path's: a node may write and read its own replicas only. The replica
header (the manifest) carries its own HMAC, written by the owner and checked by the owner again
when it reads the copy back, so a peer cannot pass off another manifest; every file is checked
against that manifest's size and checksums as it arrives, on both sides.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiered.config import TieredConfig
from tiered.errors import (
    ChecksumMismatch,
    ConfigError,
    LayoutError,
    PeerProtocolMismatch,
    PeerRefused,
    StorageError,
)
from tiered.layout import COMMIT_MARKER, step_name, tmp_name
from tiered.logs import fields
from tiered.manifest import Manifest
from tiered.peerauth import (
    AUTH_HEADER,
    PROTOCOL_VERSION,
    SIG_HEADER,
    VERSION_HEADER,
    PeerAuth,
    job_identity,
    mismatch,
)
from tiered.storage import LocalTier
from tiered.storage.local import step_metadata
from tiered.storage.replicas import Header, encode, read_header, receive_files
from tiered.storage.transfer import RateLimiter

log = logging.getLogger(__name__)

MIN_SECRET_BYTES = 16


# -- who, where ------------------------------------------------------------------------------


def partners(rank: int, nodes: int, explicit: list[int] | tuple[int, ...] | None) -> list[int]:
    """The nodes this node sends its steps to: ``explicit`` when given, else the next in a
    ring. Itself and ranks outside the job are never partners."""
    if nodes < 2:
        return []
    if explicit:
        return sorted({p for p in explicit if p != rank and 0 <= p < nodes})
    return [(rank + 1) % nodes]


def peer_address(cfg: TieredConfig, rank: int, nodes: int) -> str:
    """``host:port`` of node ``rank``'s peer server (``tiered.peer_addresses``: a list by rank,
    or one template with ``{rank}``, such as a headless service's DNS names)."""
    spec = cfg.tiered.peer_addresses
    if spec is None:
        raise ConfigError("tiered.peer_addresses is not set: peers cannot be reached")
    if isinstance(spec, str):
        return spec.format(rank=rank)
    if len(spec) != nodes:
        raise ConfigError(
            f"tiered.peer_addresses lists {len(spec)} addresses for a job of {nodes} nodes: "
            "give one per node, in rank order, or a template with {rank}"
        )
    return spec[rank]


def listen_address(cfg: TieredConfig, rank: int, nodes: int) -> str:
    """Where this node's peer server binds: ``tiered.peer_listen_address``, else every
    interface on the port of its own entry in ``tiered.peer_addresses``."""
    if cfg.tiered.peer_listen_address:
        return cfg.tiered.peer_listen_address
    spec = cfg.tiered.peer_addresses
    if isinstance(spec, list) and rank >= len(spec):
        raise ConfigError(f"tiered.peer_addresses has no address for node {rank}")
    own = spec[rank] if isinstance(spec, list) else peer_address(cfg, rank, nodes)
    return f"0.0.0.0:{own.rpartition(':')[2]}"


def load_secret(cfg: TieredConfig) -> bytes:
    """The job's shared secret, from ``tiered.peer_secret_file`` (a mounted Kubernetes Secret)."""
    path = cfg.tiered.peer_secret_file
    if not path:
        raise ConfigError(
            "tiered.peer_secret_file is not set: peer replication needs a shared secret so that "
            "only this job's nodes can write or read replicas (mount one from a Kubernetes "
            "Secret; `openssl rand -hex 32` makes one)"
        )
    try:
        with open(path, "rb") as f:
            secret = f.read(4097).strip()  # small: a key, not data
    except OSError as err:
        raise ConfigError(
            f"tiered.peer_secret_file {path}: {err.strerror or err}; peers cannot authenticate"
        ) from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"tiered.peer_secret_file {path}: the secret is {len(secret)} bytes; at least "
            f"{MIN_SECRET_BYTES} are needed (`openssl rand -hex 32`)"
        )
    return secret


# -- the client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """A replica of this node's held by a peer, as that peer lists it."""

    step: int
    epoch: int | None
    identity: str
    bytes: int


class PeerClient:
    """This node talking to one peer's server."""

    def __init__(
        self,
        rank: int,
        address: str,
        auth: PeerAuth,
        *,
        timeout: float,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.rank = rank
        self.address = address
        self.auth = auth
        self.timeout = timeout
        self.limiter = limiter

    def __str__(self) -> str:
        return f"node {self.rank} ({self.address})"

    def _connect(self) -> http.client.HTTPConnection:
        host, _, port = self.address.rpartition(":")
        return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.timeout)

    def _path(self, step: int | None = None) -> str:
        base = f"/v1/replicas/{self.auth.rank}"
        return base if step is None else f"{base}/{step}"

    @contextlib.contextmanager
    def _exchange(self, failed: str) -> Iterator[http.client.HTTPConnection]:
        """One connection to the peer, closed after; a network or protocol error becomes a
        transient ``StorageError`` saying ``failed``."""
        conn = self._connect()
        try:
            yield conn
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise StorageError(f"{failed}: {err}", transient=True) from None
        finally:
            conn.close()

    def _answer(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        """The peer's response; ``PeerProtocolMismatch`` when its server is of another version
        (every v2 answer names its version; the servers before it named none)."""
        resp = conn.getresponse()
        theirs = resp.getheader(VERSION_HEADER)
        if theirs != str(PROTOCOL_VERSION):
            body = resp.read(2000).decode(errors="replace").strip()
            named = f"v{theirs}" if theirs else "v1 (an older tiered, which names no version)"
            raise PeerProtocolMismatch(
                f"peer {self}: {mismatch(named)} (HTTP {resp.status} {body})"
            )
        return resp

    def _fail(self, what: str, resp: http.client.HTTPResponse) -> StorageError:
        body = resp.read(2000).decode(errors="replace").strip()
        message = f"peer {self}: {what}: HTTP {resp.status} {body}"
        if resp.status in (401, 403):
            return PeerRefused(message)
        return StorageError(message, transient=resp.status >= 500 or resp.status == 507)

    def held(self) -> list[Held]:
        """This node's replicas the peer holds, newest first."""
        path = self._path()
        with self._exchange(f"peer {self} does not answer") as conn:
            conn.request(
                "GET",
                path,
                headers={AUTH_HEADER: self.auth.request_header("GET", path, to=self.rank)},
            )
            resp = self._answer(conn)
            if resp.status != 200:
                raise self._fail("listing its replicas", resp)
            data = json.loads(resp.read(16 * 2**20))  # a short list of steps
        return [
            Held(
                step=int(r["step"]),
                epoch=r.get("epoch"),
                identity=str(r["identity"]),
                bytes=int(r["bytes"]),
            )
            for r in data.get("replicas", [])
        ]

    def send(
        self,
        step_dir: Path,
        header: Header,
        *,
        progress: Callable[[int, int], None] | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        """Stream one local step to the peer (it checks every byte as it arrives), at
        ``limiter``'s pace (default: this client's cap)."""
        raw = header.to_bytes()
        path = self._path(header.step)
        total = header.stream_length(raw)
        with self._exchange(f"peer {self}: sending step {header.step} failed") as conn:
            conn.putrequest("PUT", path)
            conn.putheader(AUTH_HEADER, self.auth.request_header("PUT", path, to=self.rank))
            conn.putheader(SIG_HEADER, self.auth.sign_header(raw))
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(total))
            conn.endheaders()

            def open_file(rel: str) -> Any:
                return _open_inside(step_dir, rel)

            chunks = encode(header, open_file, raw=raw)
            dropped = self._stream(conn, chunks, total, progress, limiter or self.limiter)
            if dropped is not None:
                # The peer may have answered (and closed) before taking it all: say why.
                try:
                    resp = self._answer(conn)
                except (OSError, http.client.HTTPException):
                    raise StorageError(
                        f"peer {self} dropped the transfer of step {header.step} after "
                        f"{dropped[0]} of {total} bytes: {dropped[1]}",
                        transient=True,
                    ) from None
                raise self._fail(f"storing step {header.step}", resp) from None
            resp = self._answer(conn)
            if resp.status != 200:
                raise self._fail(f"storing step {header.step}", resp)
            resp.read()

    def _stream(
        self,
        conn: http.client.HTTPConnection,
        chunks: Iterator[bytes],
        total: int,
        progress: Callable[[int, int], None] | None,
        limiter: RateLimiter | None,
    ) -> tuple[int, OSError] | None:
        """Send ``chunks``; (bytes sent, the error) when the peer's side of the connection
        failed. An error reading this node's own files is not the peer's: it is raised."""
        done = 0
        while True:
            try:
                chunk = next(chunks, None)
            except OSError as err:  # this node's own file (pruned meanwhile, say)
                raise StorageError(
                    f"reading the local step to send it: {err}", transient=False
                ) from None
            if chunk is None:
                return None
            if limiter is not None:
                limiter.take(len(chunk))
            try:
                conn.send(chunk)
            except OSError as err:
                return done, err
            done += len(chunk)
            if progress is not None:
                progress(done, total)

    def fetch(self, step: int, dest: Path) -> Header:
        """Download this node's step ``step`` from the peer into ``dest`` (a new directory),
        every byte checked against the owner-signed manifest; raises on any difference."""
        path = self._path(step)
        with self._exchange(f"peer {self}: reading step {step} failed") as conn:
            conn.request(
                "GET",
                path,
                headers={AUTH_HEADER: self.auth.request_header("GET", path, to=self.rank)},
            )
            resp = self._answer(conn)
            if resp.status != 200:
                raise self._fail(f"reading step {step}", resp)
            header, raw = read_header(resp)
            self.auth.check_header(raw, resp.getheader(SIG_HEADER))
            if header.owner != self.auth.rank or header.step != step:
                raise LayoutError(
                    f"peer {self} answered for step {step} with node {header.owner}'s step "
                    f"{header.step}"
                )
            dest.mkdir(parents=True)
            receive_files(resp, header, dest)
            return header


def _open_inside(step_dir: Path, rel: str) -> Any:
    """A file of a local step for sending, never through a symlink that leaves the step."""
    path = step_dir / rel
    real = os.path.realpath(path)
    if not Path(real).is_relative_to(os.path.realpath(step_dir)):
        raise LayoutError(f"{path}: symlink points outside the step directory; not sent")
    return open(real, "rb")


def header_for(local: LocalTier, step: int, rank: int, manifest: Manifest) -> Header:
    """What a replica of this node's local ``step`` carries."""
    step_dir = local.step_dir(step)
    epoch = step_metadata(step_dir).epoch
    with open(step_dir / COMMIT_MARKER, "rb") as f:
        marker = f.read(65536).decode(errors="replace")  # orbax's marker: one small line
    return Header(owner=rank, step=step, epoch=epoch, marker=marker, manifest=manifest)


# -- a node that lost its disk ---------------------------------------------------------------


@dataclass(frozen=True)
class Recovered:
    step: int
    peer: int
    bytes: int
    seconds: float


def clients_for(cfg: TieredConfig, rank: int, nodes: int, ranks: list[int]) -> list[PeerClient]:
    auth = PeerAuth(load_secret(cfg), rank, job=job_identity(cfg.durable_url))
    rate = cfg.tiered.peer_bandwidth_mb_per_s
    limiter = RateLimiter(rate * 1e6) if rate else None
    return [
        PeerClient(
            r,
            peer_address(cfg, r, nodes),
            auth,
            timeout=cfg.tiered.peer_timeout_seconds,
            limiter=limiter,
        )
        for r in ranks
    ]


def recover_own(
    cfg: TieredConfig,
    local: LocalTier,
    *,
    rank: int,
    nodes: int,
    explicit: list[int] | tuple[int, ...] | None = None,
    newer_than: int | None = None,
) -> list[Recovered]:
    """Bring back from the peers this node's steps it lacks and they hold (newer than its
    newest committed local step and ``newer_than``), each verified, so the restore agreement
    sees them as local. A peer that is down, refuses, or serves bytes that differ is logged
    and skipped; the next one holding the step is tried."""
    if not cfg.peering or nodes < 2:
        return []
    clients = clients_for(cfg, rank, nodes, partners(rank, nodes, cfg.tiered.peers or explicit))
    mine = [s.step for s in local.scan() if s.committed and s.fits(nodes)]
    floor = max([*mine, newer_than if newer_than is not None else -1])
    offers: dict[int, list[tuple[PeerClient, Held]]] = {}
    for client in clients:
        try:
            held = client.held()
        except StorageError as err:
            log.warning("No replicas from peer %s: %s", client, err)
            continue
        for h in held:
            if h.step > floor:
                offers.setdefault(h.step, []).append((client, h))
    if not offers:
        if not mine:
            log.warning(
                "Node %d holds no local step, and its peers %s hold none of its steps newer "
                "than %s",
                rank,
                [c.rank for c in clients],
                f"step {floor}" if floor >= 0 else "nothing",
            )
        return []
    recovered = []
    wanted = sorted(offers, reverse=True)[: cfg.tiered.peer_keep]
    for step in wanted:
        for client, _held in sorted(offers[step], key=lambda o: -(o[1].epoch or 0)):
            got = _fetch_into(local, client, step)
            if got is not None:
                recovered.append(got)
                break
        else:
            log.warning(
                "Node %d could not get its step %d from any peer (%s)",
                rank,
                step,
                ", ".join(str(c) for c, _ in offers[step]),
            )
    return recovered


def _fetch_into(local: LocalTier, client: PeerClient, step: int) -> Recovered | None:
    dest = local.step_dir(step)
    if (dest / COMMIT_MARKER).exists():
        return None
    local.staging_dir.mkdir(parents=True, exist_ok=True)
    partial = local.staging_dir / tmp_name(f"peer-{step_name(step)}")
    started = time.monotonic()
    try:
        header = client.fetch(step, partial)
        if dest.is_symlink():
            dest.unlink()
        elif dest.exists():
            shutil.rmtree(dest)  # no marker: an interrupted save or delete, not a checkpoint
        os.replace(partial, dest)
    except (StorageError, ChecksumMismatch, LayoutError, OSError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        log.warning("Peer %s could not give back step %d: %s", client, step, err)
        return None
    local.remember_manifest(step, header.manifest)
    seconds = time.monotonic() - started
    log.info(
        "Recovered this node's step %d from peer %s (%d bytes in %.1f s, every file verified)",
        step,
        client,
        header.total_bytes,
        seconds,
        extra=fields("peer_recovered", step=step, tier="local", bytes=header.total_bytes),
    )
    return Recovered(step=step, peer=client.rank, bytes=header.total_bytes, seconds=seconds)
